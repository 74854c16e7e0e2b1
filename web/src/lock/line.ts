// The line of requests waiting for the lock ($(P)Waiters, JSON, first in line first),
// and this page's own request in it: Request, renew it every lease/3 while it waits,
// Withdraw; Hand over (the holder, to the first in line). Pure: fed the PV store and the
// time, it answers with the puts to send; the caller owns the socket and the timer.
//
// A request lapses unless renewed within its lease; once granted, the grant is this
// page's session's and the keep-alive (keepalive.ts) keeps it, as any grant it finds.
import { record, type PvStore } from "./pvstore";
import { askBody, renewPeriod } from "./keepalive";
import { heldBy, type LockView } from "./view";

export interface Waiter {
  who: string;
  session: string;
  note: string;
  /** POSIX seconds the request was made. */
  since: number;
  /** POSIX seconds it lapses unless renewed. */
  expiry: number;
  lease: number;
  auto: boolean;
  group: string;
  authority: number | null;
}

export interface LineView {
  waiters: Waiter[];
  /** A higher-authority waiter the holder (the queue's plan) hands over to at its end. */
  yieldTo: string;
  /** This page's place in line (1 = first), null when not waiting. */
  place: number | null;
}

export interface LinePut {
  command: "Request" | "Withdraw" | "Handover";
  body: Record<string, unknown>;
}

/** This page's request while it waits: what it asked for and when it last renewed. */
export interface LineRequest {
  lease: number;
  note: string;
  /** When it was asked (page clock, ms). */
  since: number;
  lastRenew: number;
  /** Seen in $(P)Waiters since it was made (before that, a missing entry is not news). */
  seen: boolean;
}

export function parseWaiters(value: unknown): Waiter[] {
  if (typeof value !== "string" || !value.trim()) return [];
  try {
    const items: unknown = JSON.parse(value);
    if (!Array.isArray(items)) return [];
    return items.filter((w) => w && typeof w.who === "string").map((w) => ({
      who: w.who, session: String(w.session ?? ""), note: String(w.note ?? ""),
      since: Number(w.since) || 0, expiry: Number(w.expiry) || 0, lease: Number(w.lease) || 0,
      auto: w.auto !== false, group: String(w.group ?? ""),
      authority: typeof w.authority === "number" ? w.authority : null,
    }));
  } catch {
    return [];
  }
}

export function lineView(store: PvStore, session: string): LineView {
  const rec = record(store, "Waiters");
  const waiters = rec.connected ? parseWaiters(rec.value) : [];
  // ophyd-websocket never forwards "": a YieldTo that ended keeps its last value, so it
  // counts only while that waiter is still in line (it leaves the line when granted).
  const yieldRec = record(store, "YieldTo");
  const named = yieldRec.hasValue ? String(yieldRec.value ?? "") : "";
  const yieldTo = named && waiters.some((w) => w.who === named) ? named : "";
  const index = waiters.findIndex((w) => w.session === session);
  return { waiters, yieldTo, place: index < 0 ? null : index + 1 };
}

/** Ask for the lock (or ask again: keeps the place and renews the request). */
export function request(session: string, req: { lease: number; note?: string },
                        now: number): { req: LineRequest; puts: LinePut[] } {
  const note = req.note?.trim() ?? "";
  return { req: { lease: req.lease, note, since: now, lastRenew: now, seen: false },
           puts: [{ command: "Request", body: askBody(session, req.lease, note) }] };
}

/** Leave the line. */
export function withdraw(session: string): LinePut[] {
  return [{ command: "Withdraw", body: { session } }];
}

/** The holder gives the lock to the first in line (one step, new token). */
export function handover(session: string): LinePut[] {
  return [{ command: "Handover", body: { session } }];
}

/** How long a Request may go unseen in $(P)Waiters before the page forgets it. */
export const ANSWER_WAIT_MS = 10_000;

/**
 * Feed the view on every update and tick: renew the page's request every lease/3 while
 * it waits; forget it once granted, withdrawn, lapsed or refused (not in line).
 */
export function lineStep(req: LineRequest | null, view: LockView, line: LineView,
                         session: string, now: number): { req: LineRequest | null;
                                                          puts: LinePut[] } {
  if (req === null || !view.known) return { req, puts: [] };
  if (heldBy(view, session)) return { req: null, puts: [] };          // granted
  if (line.place === null) {
    // Not in line: gone (withdrawn, lapsed), or never there (refused, or not yet shown).
    const gone = req.seen || now - req.since >= ANSWER_WAIT_MS;
    return { req: gone ? null : req, puts: [] };
  }
  const seen = req.seen ? req : { ...req, seen: true };
  if (now - req.lastRenew < renewPeriod(req.lease)) return { req: seen, puts: [] };
  return { req: { ...seen, lastRenew: now },
           puts: [{ command: "Request", body: { session, lease: req.lease } }] };
}
