// The keep-alive under the orderings ophyd-websocket really produces (issue 12) and the
// faults a page meets. Times: page clock in ms (Page.now), IOC timestamps in s.
import { describe, expect, it } from "vitest";
import { GRANT_WAIT_MS } from "./keepalive";
import { FREE, HELD, Page, feedAll, freeLock, freeMessages, grantMessages, rng, shuffle,
         value } from "./testkit";

const ME = "web:alice";
const SEAT = "oaswww@ws1";

function granted(page: Page, token: number, ts: number, note = "from the page"): Page {
  return feedAll(page, grantMessages(SEAT, ME, note, token, ts));
}

describe("grant recognition", () => {
  it("renews every lease/3 once its grant shows, and never before", () => {
    const page = freeLock(new Page(ME, 30), 0, 100).take(30, "from the page");
    expect(page.puts).toEqual([{ command: "Acquire",
                                 body: { session: ME, lease: 30, note: "from the page" } }]);
    page.advance(5000);
    expect(page.count("Renew")).toBe(0);            // no grant yet: no Renew
    granted(page, 1, 105);
    expect(page.ka.outcome).toEqual({ kind: "granted", token: 1 });
    page.advance(9_900);
    expect(page.count("Renew")).toBe(0);
    page.advance(200);
    expect(page.count("Renew")).toBe(1);            // 10 s = 30 s / 3
    page.advance(30_000);
    expect(page.count("Renew")).toBe(4);
    expect(page.puts.at(-1)).toEqual({ command: "Renew", body: { session: ME, lease: 30 } });
  });

  it("keeps its grant when the old Token replay arrives after the new Token (issue 12)", () => {
    const page = freeLock(new Page(ME, 4), 0, 100).take(4);
    granted(page, 1, 101);
    // ophyd-websocket's second copy of the subscription's first value, delivered late.
    page.set("Token", 0, 100).set("State", FREE, 100);
    expect(page.view.token).toBe(1);
    expect(page.view.state).toBe("Held");
    page.advance(12_000);                            // 3 leases
    expect(page.ka.hold?.token).toBe(1);
    expect(page.count("Renew")).toBeGreaterThanOrEqual(8);   // every 1.33 s, 250 ms ticks
  });

  it("recognises a grant whatever order its PVs arrive in, with stale copies mixed in", () => {
    for (let seed = 1; seed <= 300; seed++) {
      const random = rng(seed);
      const page = freeLock(new Page(ME, 30), 6, 100).take(30, "n");
      const stale: [string, ReturnType<typeof value>][] = [
        ["Token", value(6, 100)], ["State", value(FREE, 100)], ["Token", value(5, 90)],
        ["Session", value("web:bob", 80)], ["Owner", value("other@x", 80)]];
      const msgs = shuffle([...grantMessages(SEAT, ME, "n", 7, 110), ...stale], random);
      const seen: (number | undefined)[] = [];
      for (const [s, m] of msgs) {
        page.msg(s, m);
        seen.push(page.ka.hold?.token);
      }
      // Once recognised, never lost; and recognised by the end.
      const first = seen.findIndex((t) => t !== undefined);
      expect(first, `seed ${seed}`).toBeGreaterThanOrEqual(0);
      expect(seen.slice(first).every((t) => t === 7), `seed ${seed}`).toBe(true);
      expect(page.view.state).toBe("Held");
    }
  });

  it("does not take another holder's grant for its own when its old Session is stale", () => {
    // alice held token 3 and released; her Take races bob's, and bob wins token 4.
    const page = freeLock(new Page(ME, 30), 2, 100);
    granted(page, 3, 101).advance(1000).release();
    feedAll(page, freeMessages("released by oaswww@ws1 (session web:alice, token 3)", 102));
    const renewed = page.count("Renew");
    page.take(30);
    // bob's grant: State and Token arrive, Session ("web:bob") is still on its way;
    // the page's Session still says web:alice, from token 3's period.
    page.set("State", HELD, 103).set("Token", 4, 103.004);
    expect(page.view.holder?.session).toBeNull();
    expect(page.ka.hold).toBeNull();
    page.set("Session", "web:bob", 103.002).set("Owner", "bob@ws2", 103.001);
    page.set("Message", "Acquire: refused: lock is held by bob@ws2 (session web:bob), token 4", 103.01);
    expect(page.ka.hold).toBeNull();
    expect(page.ka.outcome).toEqual({ kind: "refused",
      message: "Acquire: refused: lock is held by bob@ws2 (session web:bob), token 4" });
    page.advance(60_000);
    expect(page.count("Renew")).toBe(renewed);
  });

  it("a refused Take sends no Renew and ends with the refusal", () => {
    const page = freeLock(new Page(ME, 30), 11, 100);
    feedAll(page, grantMessages("bluesky@bl01", "queue", "plan scan", 12, 101));
    page.take(30, "try");
    const refusal = "Acquire: refused: lock is held by bluesky@bl01 (session queue, note 'plan scan'), token 12";
    page.set("Message", refusal, 102);
    expect(page.ka.outcome).toEqual({ kind: "refused", message: refusal });
    page.advance(GRANT_WAIT_MS + 1000);
    expect(page.ka.pending).toBeNull();
    expect(page.ka.outcome).toEqual({ kind: "refused", message: refusal });
    expect(page.count("Renew")).toBe(0);
  });

  it("a grant that follows someone else's refusal in Message is still kept alive", () => {
    const page = freeLock(new Page(ME, 30), 0, 100).take(30);
    page.set("Message", "Acquire: invalid session name 'not a session!'", 100.5);  // mallory
    granted(page, 1, 101);
    expect(page.ka.outcome).toEqual({ kind: "granted", token: 1 });
    page.advance(10_000);
    expect(page.count("Renew")).toBe(1);
  });

  it("gives up waiting after GRANT_WAIT_MS when nothing answers", () => {
    const page = freeLock(new Page(ME, 30), 0, 100).take(30);
    page.advance(GRANT_WAIT_MS);
    expect(page.ka.pending).toBeNull();
    expect(page.ka.outcome?.kind).toBe("no-grant");
  });
});

describe("the end of a grant", () => {
  it("stops renewing on a force-release and keeps a second grant alive", () => {
    const page = freeLock(new Page(ME, 30), 0, 100).take(30);
    granted(page, 1, 101).advance(10_000);
    expect(page.count("Renew")).toBe(1);
    feedAll(page, freeMessages("force-released by operator@cr1: drill", 120));
    expect(page.ka.hold).toBeNull();
    expect(page.ka.outcome).toEqual({ kind: "ended" });
    expect(page.view.message).toBe("force-released by operator@cr1: drill");
    page.advance(60_000);
    expect(page.count("Renew")).toBe(1);
    page.take(30);
    granted(page, 2, 200);
    expect(page.ka.hold?.token).toBe(2);
    page.advance(10_000);
    expect(page.count("Renew")).toBe(2);
  });

  it("stops when the lease expired and another user took the lock", () => {
    const page = freeLock(new Page(ME, 30), 0, 100).take(30);
    granted(page, 1, 101);
    // No Free arrives in between (coalesced): bob's grant shows directly.
    feedAll(page, grantMessages("bob@ws2", "web:bob", "", 2, 140));
    expect(page.ka.hold).toBeNull();
    expect(page.ka.outcome?.kind).toBe("ended");
  });

  it("Release stops renewing and a late Held copy does not revive the grant", () => {
    const page = freeLock(new Page(ME, 30), 0, 100).take(30);
    granted(page, 1, 101).advance(1000);
    page.release();
    expect(page.puts.at(-1)).toEqual({ command: "Release", body: { session: ME } });
    page.advance(20_000);                             // Release in flight: still Held
    expect(page.count("Renew")).toBe(0);
    feedAll(page, freeMessages("released by oaswww@ws1 (session web:alice, token 1)", 110));
    page.set("State", HELD, 101).set("Token", 1, 101.004);   // late copies
    expect(page.view.state).toBe("Free");
    page.advance(60_000);
    expect(page.count("Renew")).toBe(0);
  });
});

describe("faults", () => {
  it("lock IOC down and back with the durable grant: no decision while down, renews at once after", () => {
    const page = freeLock(new Page(ME, 30), 0, 100).take(30);
    granted(page, 1, 101).advance(5000);
    page.disconnect("State", "Owner", "Session", "Note", "Token", "Remaining", "Message");
    expect(page.view.state).toBe("unknown");
    page.advance(20_000);
    expect(page.ka.hold?.token).toBe(1);             // kept, and renewing tried on schedule
    const tried = page.count("Renew");
    expect(tried).toBe(2);
    // The IOC is back: it publishes its PVs afresh (State first), the grant intact. An
    // old cached copy of State (from before the restart) arrives in between.
    page.set("State", HELD, 200).set("State", FREE, 100).set("Owner", SEAT, 200.001)
      .set("Session", ME, 200.002).set("Note", "from the page", 200.003)
      .set("Token", 1, 200.004).set("Remaining", 3, 200.005);
    for (const s of ["Message"]) page.msg(s, { connected: true });
    expect(page.view.known).toBe(true);
    expect(page.ka.hold?.token).toBe(1);
    expect(page.count("Renew")).toBe(tried + 1);     // at once, not a period later
  });

  it("the lock IOC down is never shown as Free, and Take is not offered", () => {
    const page = freeLock(new Page(ME, 30), 0, 100);
    expect(page.view.state).toBe("Free");
    page.disconnect("State");
    expect(page.view.state).toBe("unknown");
    expect(page.view.unknownReason).toMatch(/lock IOC not connected/);
    page.take(30);
    expect(page.puts).toEqual([]);
  });

  it("socket closed: unknown, keeps the grant, renews when it is back", () => {
    const page = freeLock(new Page(ME, 30), 0, 100).take(30);
    granted(page, 1, 101);
    page.close();
    expect(page.view.state).toBe("unknown");
    expect(page.view.unknownReason).toMatch(/device server/);
    page.advance(15_000);
    expect(page.ka.hold?.token).toBe(1);
    const before = page.count("Renew");
    page.open();
    for (const s of ["State", "Owner", "Session", "Note", "Token", "Remaining", "Message"]) {
      page.msg(s, { connected: true });
    }
    // The values the page had are still current; the lock is known again.
    expect(page.view.state).toBe("Held");
    expect(page.count("Renew")).toBe(before + 1);
  });

  it("a page opened while its user holds the lock adopts and renews it at once", () => {
    const page = new Page(ME, 30);
    freeLock(page, 0, 100);
    granted(page, 1, 101);
    expect(page.ka.hold?.token).toBe(1);
    expect(page.count("Renew")).toBe(1);
  });

  it("a Take while the page holds the grant sends nothing", () => {
    const page = freeLock(new Page(ME, 30), 0, 100).take(30);
    granted(page, 1, 101);
    const n = page.puts.length;
    page.take(30);
    expect(page.puts.length).toBe(n);
  });
});
