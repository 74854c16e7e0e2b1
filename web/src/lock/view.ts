// What the lock is, as far as the page can tell, derived from the PV store; and what
// that means for this page's device writes. Pure.
//
// "Current" values: the lock IOC writes a grant's PVs in one go, State first, then
// Owner, Session, Note, Token (lock_ioc/ioc.py publish). A value of Owner/Session/Note/
// Token older than the State it is shown with belongs to an earlier holding period:
// ophyd-websocket never forwards an empty string, so after a release Owner and Session
// keep their last value, and the next holder's empty Note never arrives. Such values
// are not shown and never taken for this page's grant.
import { record, type PvStore } from "./pvstore";
import { STATE_NAMES } from "./contract";

export type LockState = "unknown" | "Free" | "Held" | "Disabled";

export interface Holder {
  owner: string | null;
  session: string | null;
  note: string | null;
  remaining: number | null;
}

export interface LockView {
  known: boolean;
  /** Why the state is unknown ("" when known). */
  unknownReason: string;
  state: LockState;
  /** Fencing token (+1 per grant), once known. */
  token: number | null;
  /** Token is from the current holding period (written no earlier than State). */
  tokenCurrent: boolean;
  /** The holder, while Held; fields of an earlier period are null. */
  holder: Holder | null;
  message: string;
  messageTs: number;
  /** History lines, newest first. */
  history: string[];
  disabledReason: string;
  leaseDefault: number | null;
  leaseMax: number | null;
}

/** PVs that must be connected for the lock to be known. */
const NEEDED = ["State", "Owner", "Session", "Note", "Token", "Remaining", "Message"];

function text(store: PvStore, suffix: string): string {
  const rec = record(store, suffix);
  return rec.hasValue && rec.value !== null && rec.value !== undefined ? String(rec.value) : "";
}

function num(store: PvStore, suffix: string): number | null {
  const rec = record(store, suffix);
  const n = Number(rec.value);
  return rec.hasValue && Number.isFinite(n) ? n : null;
}

function stateName(store: PvStore): LockState | null {
  const rec = record(store, "State");
  if (!rec.hasValue) return null;
  const names = store.enums["State"] ?? STATE_NAMES;
  const name = typeof rec.value === "number" ? names[rec.value] : String(rec.value);
  return name === "Free" || name === "Held" || name === "Disabled" ? name : null;
}

/** Is `suffix`'s value from the current holding period (no older than State)? */
function current(store: PvStore, suffix: string): boolean {
  const rec = record(store, suffix);
  const state = record(store, "State");
  if (!rec.hasValue) return false;
  if (!Number.isFinite(state.ts) || !Number.isFinite(rec.ts)) return true;
  return rec.ts >= state.ts;
}

export function lockView(store: PvStore): LockView {
  let unknownReason = "";
  if (!store.socketOpen) unknownReason = "no connection to the device server (ophyd-websocket)";
  else if (!NEEDED.every((s) => record(store, s).connected)) {
    unknownReason = "lock IOC not connected";
  }
  const state = stateName(store);
  const token = num(store, "Token");
  if (!unknownReason && (state === null || token === null)) unknownReason = "waiting for the lock's state";
  const known = unknownReason === "";
  const shown: LockState = known && state !== null ? state : "unknown";
  const holder: Holder | null = shown === "Held" ? {
    owner: current(store, "Owner") ? text(store, "Owner") : null,
    session: current(store, "Session") ? text(store, "Session") : null,
    note: current(store, "Note") ? text(store, "Note") : null,
    remaining: num(store, "Remaining"),
  } : null;
  const history = text(store, "History").split("\n").map((l) => l.trim()).filter(Boolean).reverse();
  return {
    known, unknownReason, state: shown, token,
    tokenCurrent: current(store, "Token"),
    holder,
    message: text(store, "Message"),
    messageTs: record(store, "Message").ts,
    history,
    disabledReason: shown === "Disabled" ? text(store, "DisabledReason") : "",
    leaseDefault: num(store, "LeaseDefault"),
    leaseMax: num(store, "LeaseMax"),
  };
}

/** Is the lock, as known now, held under `session` in the current holding period? */
export function heldBy(view: LockView, session: string): boolean {
  return view.known && view.state === "Held" && view.holder?.session === session &&
         view.tokenCurrent;
}

export interface Names { sessionPrefix: string; queueSession: string }

/** "bluesky queue", "bob (web)", "alice@ws1 (session align)". */
export function holderName(holder: Holder, names: Names): string {
  const { session, owner } = holder;
  if (session === names.queueSession) return "bluesky queue";
  if (session !== null && session.startsWith(names.sessionPrefix)) {
    return `${session.slice(names.sessionPrefix.length)} (web)`;
  }
  if (session === null) return owner ?? "someone";
  return `${owner ?? "someone"} (session ${session})`;
}

/** "12 min", "45 s", "2 h 05 min". */
export function duration(seconds: number): string {
  const s = Math.max(0, Math.ceil(seconds));
  if (s < 90) return `${s} s`;
  const min = Math.ceil(s / 60);
  if (min < 120) return `${min} min`;
  return `${Math.floor(min / 60)} h ${String(min % 60).padStart(2, "0")} min`;
}

/**
 * "held by bluesky queue: scan, 12 min left". A note that already starts with the
 * holder's name (the queue guard's "bluesky queue: count") is not repeated.
 */
export function heldText(holder: Holder, names: Names): string {
  const name = holderName(holder, names);
  const bare = holder.note?.startsWith(`${name}: `) ? holder.note.slice(name.length + 2) : holder.note;
  const note = bare ? `: ${bare}` : "";
  const left = holder.remaining !== null ? `, ${duration(holder.remaining)} left` : "";
  return `held by ${name}${note}${left}`;
}

export interface WriteGate { allowed: boolean; reason: string }

/**
 * May this page's gated device writes go ahead? Mirrors the seat's ophyd gate
 * (clients/beamline_lock/ophyd_gate.py): only while held under the page's session, or
 * Free when the seat allows writing while Free; never while the lock is unknown.
 */
export function writeGate(view: LockView, session: string, names: Names,
                          allowFreeWrites: boolean): WriteGate {
  if (!view.known) return { allowed: false, reason: `lock state unknown: ${view.unknownReason}` };
  switch (view.state) {
    case "Disabled":
      return { allowed: false, reason: `lock disabled${view.disabledReason ? ": " + view.disabledReason : ""}` };
    case "Free":
      return allowFreeWrites ? { allowed: true, reason: "" }
        : { allowed: false, reason: "the lock is free: take it to move devices" };
    case "Held":
      if (heldBy(view, session)) return { allowed: true, reason: "" };
      if (view.holder?.session === session) return { allowed: false, reason: "your grant is arriving" };
      if (view.holder && view.holder.session === null) {
        return { allowed: false, reason: "held (holder details arriving)" };
      }
      return { allowed: false, reason: view.holder ? heldText(view.holder, names) : "held" };
    default:
      return { allowed: false, reason: "lock state unknown" };
  }
}
