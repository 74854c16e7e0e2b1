import { describe, expect, it } from "vitest";
import { ANSWER_WAIT_MS, handover, lineStep, lineView, parseWaiters, request, withdraw,
         type LineRequest } from "./line";
import { Page, feedAll, freeLock, freeMessages, grantMessages } from "./testkit";

const BOB = { who: "bob@ws2", session: "edge", note: "Fe edge", since: 100, expiry: 400,
              lease: 300, auto: true, authority: 20, group: "staff" };
const ME = { who: "oaswww@seat", session: "web:alice", note: "", since: 110, expiry: 410,
             lease: 300, auto: true, authority: 20, group: "web" };

function line(page: Page, waiters: object[], ts: number): Page {
  page.msg("Waiters", { connected: true });
  return page.set("Waiters", JSON.stringify(waiters), ts);
}

describe("the line of requests", () => {
  it("parses $(P)Waiters, first in line first, and anything unreadable as nobody", () => {
    expect(parseWaiters(JSON.stringify([BOB, ME]))).toEqual([BOB, ME]);
    expect(parseWaiters("[]")).toEqual([]);
    expect(parseWaiters("{not json")).toEqual([]);
    expect(parseWaiters(undefined)).toEqual([]);
    expect(parseWaiters('[{"who": "x@y", "session": "s"}]')[0]).toMatchObject(
      { who: "x@y", session: "s", note: "", auto: true, authority: null });
  });

  it("says this page's place, and shows YieldTo only while that waiter is in line", () => {
    const page = line(freeLock(new Page(), 0, 100), [BOB, ME], 101);
    page.set("YieldTo", "bob@ws2", 101);
    expect(lineView(page.store, "web:alice")).toEqual(
      { waiters: [BOB, ME], yieldTo: "bob@ws2", place: 2 });
    // bob got the lock: he left the line; YieldTo "" is never forwarded, so the old
    // value stays in the store and must not be shown.
    line(page, [ME], 102);
    expect(lineView(page.store, "web:alice")).toEqual({ waiters: [ME], yieldTo: "", place: 1 });
    page.msg("Waiters", { connected: false });
    expect(lineView(page.store, "web:alice").waiters).toEqual([]);
  });

  it("renews the page's request every lease/3 while it waits, and stops when granted", () => {
    const page = freeLock(new Page(), 0, 100);
    feedAll(page, grantMessages("bob@ws2", "edge", "", 1, 101));
    const asked = request("web:alice", { lease: 30, note: " mine " }, 0);
    expect(asked.puts).toEqual([{ command: "Request",
                                  body: { session: "web:alice", lease: 30, note: "mine" } }]);
    let req: LineRequest | null = asked.req;
    const puts: object[] = [];
    const at = (now: number) => {
      const r = lineStep(req, page.view, lineView(page.store, "web:alice"), "web:alice", now);
      req = r.req;
      puts.push(...r.puts);
    };
    at(500);                               // not shown yet: keep it, send nothing
    expect(req).not.toBeNull();
    line(page, [ME], 102);
    for (let now = 1000; now <= 31_000; now += 1000) at(now);
    expect(puts).toEqual(Array(3).fill({ command: "Request",
                                         body: { session: "web:alice", lease: 30 } }));
    // bob hands it over: the grant is the page's (the keep-alive keeps it); no more Requests.
    line(page, [], 103);
    feedAll(page, grantMessages("oaswww@seat", "web:alice", "mine", 2, 103));
    at(32_000);
    expect(req).toBeNull();
    at(60_000);
    expect(puts).toHaveLength(3);
  });

  it("forgets a request that left the line, or never showed (refused)", () => {
    const page = line(freeLock(new Page(), 0, 100), [ME], 101);
    feedAll(page, grantMessages("bob@ws2", "edge", "", 1, 100.5));
    let r = lineStep(request("web:alice", { lease: 30 }, 0).req, page.view,
                     lineView(page.store, "web:alice"), "web:alice", 100);
    expect(r.req?.seen).toBe(true);
    line(page, [], 102);                   // lapsed or withdrawn elsewhere
    r = lineStep(r.req, page.view, lineView(page.store, "web:alice"), "web:alice", 200);
    expect(r.req).toBeNull();
    const refused = request("web:alice", { lease: 30 }, 0).req;   // never in line
    r = lineStep(refused, page.view, lineView(page.store, "web:alice"), "web:alice", 5000);
    expect(r.req).toBe(refused);
    r = lineStep(refused, page.view, lineView(page.store, "web:alice"), "web:alice",
                 ANSWER_WAIT_MS);
    expect(r.req).toBeNull();
  });

  it("decides nothing while the lock is unknown", () => {
    const page = line(freeLock(new Page(), 0, 100), [ME], 101);
    feedAll(page, freeMessages("released", 102));
    const req = request("web:alice", { lease: 3 }, 0).req;
    page.close();
    expect(lineStep(req, page.view, lineView(page.store, "web:alice"), "web:alice", 60_000))
      .toEqual({ req, puts: [] });
  });

  it("withdraws and hands over with the page's session", () => {
    expect(withdraw("web:alice")).toEqual([{ command: "Withdraw", body: { session: "web:alice" } }]);
    expect(handover("web:alice")).toEqual([{ command: "Handover", body: { session: "web:alice" } }]);
  });
});
