// What ophyd-websocket's answer to a device `set` means for the user. Pure.
//
// The page asks it to wait only briefly (config moveWaitSeconds): its `set` blocks the
// whole server while it waits, which would hold up a Stop. A move still under way then
// comes back as ophyd's "has not completed yet" error: not a failure, the motor moves
// and the page follows its readback.

export interface SetResult {
  kind: "busy" | "ok" | "moving" | "error";
  text: string;
}

export function setOutcome(value: number | string, msg: Record<string, unknown>): SetResult {
  if (typeof msg.error === "string") {
    if (msg.error.includes("has not completed yet")) {
      return { kind: "moving", text: `moving to ${value}` };
    }
    // "Could not set value of m1 to 1.5: m1: write refused: lock is held by ..." → the reason.
    const reason = msg.error.replace(/^Could not set value of \S+ to .*?: (?=\S+: )/, "");
    return { kind: "error", text: reason };
  }
  return { kind: "ok", text: String(msg.message ?? "done") };
}
