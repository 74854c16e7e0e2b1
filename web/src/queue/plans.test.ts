import { describe, expect, it } from "vitest";
import { itemText, parseValue, planFields, planItem, type PlanDescription } from "./plans";

const COUNT: PlanDescription = {
  name: "count",
  parameters: [
    { name: "detectors", kind: { name: "POSITIONAL_OR_KEYWORD", value: 1 }, annotation: { type: "typing.Sequence" } },
    { name: "num", kind: { name: "POSITIONAL_OR_KEYWORD", value: 1 }, default: "1" },
    { name: "md", kind: { name: "KEYWORD_ONLY", value: 3 }, default: "None" },
  ],
};

describe("plan form", () => {
  it("makes one field per parameter with its type and default", () => {
    expect(planFields(COUNT)).toEqual([
      { name: "detectors", role: "kwarg", hint: "typing.Sequence", required: true },
      { name: "num", role: "kwarg", hint: "default 1", required: false },
      { name: "md", role: "kwarg", hint: "default None", required: false },
    ]);
  });

  it("types values as JSON, else text; empty fields keep the default", () => {
    expect(parseValue(" 3 ")).toBe(3);
    expect(parseValue('["det"]')).toEqual(["det"]);
    expect(parseValue("det")).toBe("det");
    expect(planItem(COUNT, { detectors: '["det"]', num: "3", md: "" })).toEqual(
      { item_type: "plan", name: "count", args: [], kwargs: { detectors: ["det"], num: 3 } });
    expect(planItem(COUNT, { num: "three" }).kwargs).toEqual({ num: "three" });  // the server judges
  });

  it("passes *args and **kwargs", () => {
    const plan: PlanDescription = { name: "p", parameters: [
      { name: "a", kind: { value: 0 } }, { name: "rest", kind: { value: 2 } },
      { name: "extra", kind: { value: 4 } }] };
    expect(planItem(plan, { a: "1", rest: "[2, 3]", extra: '{"x": 1}' })).toEqual(
      { item_type: "plan", name: "p", args: [1, 2, 3], kwargs: { x: 1 } });
    expect(itemText({ name: "count", args: [], kwargs: { detectors: ["det"], num: 3 } }))
      .toBe('count(detectors=["det"], num=3)');
  });
});
