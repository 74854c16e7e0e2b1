import { describe, expect, it } from "vitest";
import { reasonProblem } from "./ReasonDialog";

describe("operator reason", () => {
  it("is required where the lock requires it, and never a bare number", () => {
    expect(reasonProblem("  ", true)).toBe("a reason is required");
    expect(reasonProblem("", false)).toBe("");
    expect(reasonProblem("42", false)).toMatch(/in words/);
    expect(reasonProblem("beam study 42", true)).toBe("");
  });
});
