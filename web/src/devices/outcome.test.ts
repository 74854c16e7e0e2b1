import { describe, expect, it } from "vitest";
import { setOutcome } from "./outcome";

describe("device set outcome", () => {
  it("a move still under way is not an error", () => {
    expect(setOutcome(5, { error: "Could not set value of m1 to 5: Status PVPositionerStatus(...) has not completed yet." }))
      .toEqual({ kind: "moving", text: "moving to 5" });
  });

  it("a refusal shows the gate's reason", () => {
    expect(setOutcome(1.5, { error: "Could not set value of m1 to 1.5: m1: write refused: lock is held by bluesky@bl01 (session queue, note 'plan scan')" }))
      .toEqual({ kind: "error", text: "m1: write refused: lock is held by bluesky@bl01 (session queue, note 'plan scan')" });
    expect(setOutcome(1, { message: "Successfully set m1 to 1" })).toEqual({ kind: "ok", text: "Successfully set m1 to 1" });
  });
});
