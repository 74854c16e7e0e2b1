import { describe, expect, it } from "vitest";
import { duration, heldText, writeGate } from "./view";
import { DISABLED, Page, feedAll, freeLock, freeMessages, grantMessages } from "./testkit";
import { COMMANDS, STATE_NAMES, WATCHED } from "./contract";

const NAMES = { sessionPrefix: "web:", queueSession: "queue" };

describe("lock view", () => {
  it("names the holder as a user reads it, with the time left", () => {
    const page = freeLock(new Page(), 0, 100);
    feedAll(page, grantMessages("bluesky@bl01", "queue", "scan", 12, 101));
    page.set("Remaining", 720, 102);
    const view = page.view;
    expect(view.state).toBe("Held");
    expect(heldText(view.holder!, NAMES)).toBe("held by bluesky queue: scan, 12 min left");
    expect(writeGate(view, "web:alice", NAMES, false)).toEqual(
      { allowed: false, reason: "held by bluesky queue: scan, 12 min left" });
    expect(writeGate(view, "web:alice", NAMES, true).allowed).toBe(false);
    // The queue guard's own note names the queue already (measured: "bluesky queue: count").
    page.set("Note", "bluesky queue: count", 103);
    expect(heldText(page.view.holder!, NAMES)).toBe("held by bluesky queue: count, 12 min left");
  });

  it("shows no note of an earlier holder when the new holder declared none", () => {
    const page = freeLock(new Page(), 0, 100);
    feedAll(page, grantMessages("alice@ws1", "web:alice", "align", 1, 101));
    feedAll(page, freeMessages("released", 102));
    feedAll(page, grantMessages("bob@ws2", "web:bob", "", 2, 103));   // Note "" never arrives
    page.set("Remaining", 40, 104);
    expect(page.view.holder).toEqual({ owner: "bob@ws2", session: "web:bob", note: null,
                                       remaining: 40 });
    expect(heldText(page.view.holder!, NAMES)).toBe("held by bob (web), 40 s left");
  });

  it("lets the page write only under its own grant (or Free when the seat allows it)", () => {
    const page = freeLock(new Page(), 0, 100);
    expect(writeGate(page.view, "web:alice", NAMES, false)).toEqual(
      { allowed: false, reason: "the lock is free: take it to move devices" });
    expect(writeGate(page.view, "web:alice", NAMES, true).allowed).toBe(true);
    feedAll(page, grantMessages("oaswww@ws1", "web:alice", "", 1, 101));
    expect(writeGate(page.view, "web:alice", NAMES, false).allowed).toBe(true);
    expect(writeGate(page.view, "web:bob", NAMES, false).reason).toMatch(/^held by alice \(web\)/);
  });

  it("refuses writes while unknown, whatever the last value said", () => {
    const page = freeLock(new Page(), 0, 100);
    feedAll(page, grantMessages("oaswww@ws1", "web:alice", "", 1, 101));
    page.disconnect("Token");
    expect(page.view.state).toBe("unknown");
    expect(writeGate(page.view, "web:alice", NAMES, true)).toEqual(
      { allowed: false, reason: "lock state unknown: lock IOC not connected" });
  });

  it("Disabled says why", () => {
    const page = freeLock(new Page(), 0, 100);
    page.set("State", DISABLED, 101).set("DisabledReason", "beam off (operator@cr1)", 101.01);
    expect(page.view.state).toBe("Disabled");
    expect(writeGate(page.view, "web:alice", NAMES, true).reason).toBe(
      "lock disabled: beam off (operator@cr1)");
  });

  it("lists History newest first", () => {
    const page = freeLock(new Page(), 0, 100);
    page.set("History", "one\ntwo\nthree\n", 101);
    expect(page.view.history).toEqual(["three", "two", "one"]);
  });

  it("formats durations", () => {
    expect(duration(0.2)).toBe("1 s");
    expect(duration(89)).toBe("89 s");
    expect(duration(91)).toBe("2 min");
    expect(duration(7300)).toBe("2 h 02 min");
  });
});

describe("PV contract", () => {
  it("takes the PV names the page uses from docs/pv-interface.json", () => {
    expect(WATCHED).toContain("State");
    expect(COMMANDS).toContain("ForceRelease");
    expect(STATE_NAMES).toEqual(["Free", "Held", "Disabled"]);
  });
});
