// The page's lease keep-alive: Take, recognise the grant, renew every lease/3 while the
// grant lasts, stop when it ends. Pure: it is fed lock views and the time, and answers
// with the puts to send; the caller owns the socket and the timer.
//
// What issue 12 taught (a fresh clone's page took the lock and never renewed):
// - values are ordered by the IOC's timestamp before they get here (pvstore), so a late
//   replay of an old Token never looks like the lock changing hands;
// - Take needs a known lock (State and Token from a connected IOC), so a grant is
//   recognised against a real baseline;
// - the grant is recognised only from current values (State Held, this page's Session
//   and a Token written no earlier than State), never from the put's completion, which
//   ophyd-websocket does not report anyway; renewing starts only once it shows, so a
//   refused Take sends no Renew that would overwrite the refusal in Message;
// - nothing is decided while the lock is unknown: the grant is durable, so a lock IOC
//   that comes back still shows it, and renewing resumes at once;
// - a grant to this page's session that the page did not ask for in this tab (reload,
//   a second tab) is kept alive too: a user's lock never silently lapses while a page
//   of theirs is open. Only a grant this page released is left alone.
import { heldBy, type LockView } from "./view";

/** How long a Take waits for its grant before it gives up (Message then says why). */
export const GRANT_WAIT_MS = 10_000;

export interface Put {
  command: "Acquire" | "Renew" | "Release";
  body: Record<string, unknown>;
}

export type Outcome =
  | { kind: "waiting" }
  | { kind: "granted"; token: number }
  | { kind: "refused"; message: string }
  | { kind: "no-grant"; message: string }
  | { kind: "ended" }
  | { kind: "released" };

interface Pending {
  /** Token before the Take: a grant always raises it. */
  before: number;
  since: number;
  /** Timestamp of Message when Take was sent: a newer Acquire message is the answer. */
  messageTs: number;
}

interface Hold {
  token: number;
  lastRenew: number;
  renewNow: boolean;
}

export interface KeepAlive {
  session: string;
  /** Lease (s) this page asks for and renews with. */
  lease: number;
  pending: Pending | null;
  hold: Hold | null;
  /** Token of a grant this page released: never adopted again. */
  declined: number | null;
  wasKnown: boolean;
  outcome: Outcome | null;
}

export interface Step {
  ka: KeepAlive;
  puts: Put[];
}

export function createKeepAlive(session: string, lease: number): KeepAlive {
  return { session, lease, pending: null, hold: null, declined: null, wasKnown: false,
           outcome: null };
}

/** What Acquire and Request write: the session, the lease, and the note unless blank. */
export function askBody(session: string, lease: number, note?: string): Record<string, unknown> {
  const body: Record<string, unknown> = { session, lease };
  const text = note?.trim();
  if (text) body.note = text;
  return body;
}

/** How often a lease (or a request's lease) is renewed: a third of it, at most once a second. */
export function renewPeriod(lease: number): number {
  return Math.max(1000, (lease * 1000) / 3);
}

/** Take needs a known lock: State and a baseline Token from a connected lock IOC. */
export function canTake(view: LockView): boolean {
  return view.known && view.token !== null;
}

export function take(ka: KeepAlive, view: LockView, req: { lease: number; note?: string },
                     now: number): Step {
  if (!canTake(view) || view.token === null) return { ka, puts: [] };
  if (ka.hold !== null) return { ka, puts: [] };  // already ours: Renew, not Take
  return {
    ka: { ...ka, lease: req.lease, declined: null, outcome: { kind: "waiting" },
          pending: { before: view.token, since: now, messageTs: view.messageTs } },
    puts: [{ command: "Acquire", body: askBody(ka.session, req.lease, req.note) }],
  };
}

/** Release this page's grant (also on logout). Stops renewing at once. */
export function release(ka: KeepAlive, view: LockView): Step {
  const token = ka.hold?.token ?? (heldBy(view, ka.session) ? view.token : null);
  const asked = ka.hold !== null || ka.pending !== null || token !== null;
  return {
    ka: { ...ka, hold: null, pending: null, declined: token ?? ka.declined,
          outcome: asked ? { kind: "released" } : ka.outcome },
    puts: asked ? [{ command: "Release", body: { session: ka.session } }] : [],
  };
}

/** Is a renewal due? (Also while the lock is unknown: the puts fail harmlessly.) */
function renewal(ka: KeepAlive, hold: Hold, now: number): { hold: Hold; puts: Put[] } {
  if (!hold.renewNow && now - hold.lastRenew < renewPeriod(ka.lease)) return { hold, puts: [] };
  return {
    hold: { ...hold, lastRenew: now, renewNow: false },
    puts: [{ command: "Renew", body: { session: ka.session, lease: ka.lease } }],
  };
}

/** Feed the current view (on every lock update and on a timer). */
export function step(ka: KeepAlive, view: LockView, now: number): Step {
  if (!view.known) {
    // Decide nothing; keep renewing on schedule and renew at once when the lock is back.
    if (ka.hold === null) return { ka: { ...ka, wasKnown: false }, puts: [] };
    const r = renewal(ka, ka.hold, now);
    return { ka: { ...ka, wasKnown: false, hold: r.hold }, puts: r.puts };
  }
  let { pending, hold, outcome } = ka;
  const mine = heldBy(view, ka.session) && view.token !== null && view.token !== ka.declined;
  if (mine && view.token !== null) {
    if (hold === null || hold.token !== view.token) {
      // Our Take's grant starts its lease now; a grant we find (reload, another tab)
      // may be short of time: renew it at once.
      const ours = pending !== null && view.token > pending.before;
      hold = { token: view.token, lastRenew: now, renewNow: !ours };
      outcome = { kind: "granted", token: view.token };
      pending = null;
    } else if (!ka.wasKnown) {
      hold = { ...hold, renewNow: true };
    }
  } else if (hold !== null) {
    const otherSession = view.holder !== null && view.holder.session !== null &&
                         view.holder.session !== ka.session;
    const otherToken = view.tokenCurrent && view.token !== hold.token;
    if (view.state !== "Held" || otherToken || otherSession) {
      hold = null;                  // released, expired, force-released or taken over
      outcome = { kind: "ended" };
    }
    // Else Held with our token but a value of the grant not yet current: wait.
  }
  if (pending !== null) {
    const answered = view.messageTs > pending.messageTs && view.message.startsWith("Acquire:");
    if (answered && outcome?.kind === "waiting") outcome = { kind: "refused", message: view.message };
    if (now - pending.since >= GRANT_WAIT_MS) {
      pending = null;
      if (outcome?.kind === "waiting") outcome = { kind: "no-grant", message: view.message };
    }
  }
  let puts: Put[] = [];
  if (hold !== null) ({ hold, puts } = renewal(ka, hold, now));
  return { ka: { ...ka, pending, hold, outcome, wasKnown: true }, puts };
}

/** Is this page keeping a grant alive? */
export function renewing(ka: KeepAlive): boolean {
  return ka.hold !== null;
}
