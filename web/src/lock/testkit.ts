// Test helpers: a page's lock state fed message by message, as ophyd-websocket delivers
// them (one PV per message, IOC timestamps), in whatever order a test chooses.
import { applyMessage, emptyStore, socketClosed, socketOpened, type PvMessage,
         type PvStore } from "./pvstore";
import { lockView, type LockView } from "./view";
import { createKeepAlive, release, step, take, type KeepAlive, type Put } from "./keepalive";

export const FREE = 0, HELD = 1, DISABLED = 2;

export function value(v: unknown, ts: number, connected = true): PvMessage {
  return { value: v, timestamp: ts, connected };
}

export class Page {
  store: PvStore = emptyStore();
  ka: KeepAlive;
  now = 0;
  puts: Put[] = [];

  constructor(session = "web:alice", lease = 30) {
    this.ka = createKeepAlive(session, lease);
  }

  get view(): LockView {
    return lockView(this.store);
  }

  private run(puts: Put[]): void {
    this.puts.push(...puts);
  }

  open(): this {
    this.store = socketOpened(this.store);
    return this.feed();
  }

  close(): this {
    this.store = socketClosed(this.store);
    return this.feed();
  }

  /** One message about a lock PV (suffix), then the keep-alive step the page runs. */
  msg(suffix: string, m: PvMessage): this {
    this.store = applyMessage(this.store, suffix, m);
    return this.feed();
  }

  set(suffix: string, v: unknown, ts: number): this {
    return this.msg(suffix, value(v, ts));
  }

  disconnect(...suffixes: string[]): this {
    for (const s of suffixes) this.store = applyMessage(this.store, s, { connected: false });
    return this.feed();
  }

  feed(): this {
    const r = step(this.ka, this.view, this.now);
    this.ka = r.ka;
    this.run(r.puts);
    return this;
  }

  /** Let time pass in ticks of `every` ms (the page's timer), stepping each time. */
  advance(ms: number, every = 250): this {
    const end = this.now + ms;
    while (this.now < end) {
      this.now = Math.min(end, this.now + every);
      this.feed();
    }
    return this;
  }

  take(lease = 30, note = ""): this {
    const r = take(this.ka, this.view, { lease, note }, this.now);
    this.ka = r.ka;
    this.run(r.puts);
    return this;
  }

  release(): this {
    const r = release(this.ka, this.view);
    this.ka = r.ka;
    this.run(r.puts);
    return this;
  }

  count(command: Put["command"]): number {
    return this.puts.filter((p) => p.command === command).length;
  }
}

/** The lock as a freshly subscribed page sees it: Free, token `token`, all at `ts`. */
export function freeLock(page: Page, token: number, ts: number): Page {
  page.open();
  for (const s of ["State", "Owner", "Session", "Note", "Token", "Remaining", "Message",
                   "History", "DisabledReason"]) {
    page.msg(s, { connected: true });
  }
  page.msg("State", { connected: true, enum_strs: ["Free", "Held", "Disabled"] });
  page.set("State", FREE, ts).set("Token", token, ts).set("Remaining", 0, ts);
  return page;
}

/** A grant as the lock IOC publishes it: State, Owner, Session, Note, Token, Message. */
export function grantMessages(owner: string, session: string, note: string, token: number,
                              ts: number): [string, PvMessage][] {
  const out: [string, PvMessage][] = [["State", value(HELD, ts)],
                                      ["Owner", value(owner, ts + 0.001)],
                                      ["Session", value(session, ts + 0.002)]];
  if (note) out.push(["Note", value(note, ts + 0.003)]);   // "" is never forwarded
  out.push(["Token", value(token, ts + 0.004)],
           ["Remaining", value(30, ts + 0.005)],
           ["Message", value(`granted to ${owner} (session ${session}), token ${token}`, ts + 0.006)]);
  return out;
}

/** A release/expiry/force-release: State Free (Owner/Session/Note "" are never forwarded). */
export function freeMessages(message: string, ts: number): [string, PvMessage][] {
  return [["State", value(FREE, ts)], ["Remaining", value(0, ts + 0.001)],
          ["Message", value(message, ts + 0.002)]];
}

export function feedAll(page: Page, msgs: [string, PvMessage][]): Page {
  for (const [s, m] of msgs) page.msg(s, m);
  return page;
}

/** Deterministic PRNG (mulberry32) for shuffled orderings. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function shuffle<T>(items: T[], random: () => number): T[] {
  const out = [...items];
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}
