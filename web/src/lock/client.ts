// The page's lock seat client, without React or a DOM: ophyd-websocket's PV socket feeds
// the pure store (pvstore), the pure keep-alive (keepalive) decides the puts, a timer
// ticks it. The page uses it through useLock; tests run the very same code in node
// against a real seat (web/src/lock/shim.ts, tests/test_websocket.py).
import { ReconnectingSocket } from "../net/socket";
import { COMMANDS, WATCHED } from "./contract";
import { createKeepAlive, release, step, take, type KeepAlive, type Put } from "./keepalive";
import { handover, lineStep, lineView, request, withdraw, type LinePut, type LineRequest,
         type LineView } from "./line";
import { applyMessage, emptyStore, socketClosed, socketOpened, type PvStore } from "./pvstore";
import { heldBy, lockView, type LockView } from "./view";

export const TICK_MS = 500;

export type OperatorCommand = "ForceRelease" | "Disable" | "Enable";

export interface LockClientOptions {
  /** ws(s):// URL of ophyd-websocket's PV socket. */
  url: string;
  /** Lock IOC prefix, e.g. "BL:LOCK:". */
  prefix: string;
  /** This page's lock session, "web:<user>". */
  session: string;
  /** Lease (s) a Take asks for until told otherwise. */
  lease: number;
  /** Other PVs to subscribe on the same socket (the never-gated Stop records). */
  extraPvs?: string[];
  now?: () => number;
}

export class LockClient {
  store: PvStore = emptyStore();
  ka: KeepAlive;
  /** This page's request while it waits in line (line.ts), null when none. */
  req: LineRequest | null = null;
  /** Last error ophyd-websocket's PV socket sent (e.g. a refused Stop). */
  socketError = "";
  /** Called after every change of store, ka or socketError. */
  onChange: (() => void) | null = null;
  private socket: ReconnectingSocket;
  private timer: ReturnType<typeof setInterval>;
  private now: () => number;

  constructor(private opts: LockClientOptions) {
    this.ka = createKeepAlive(opts.session, opts.lease);
    this.now = opts.now ?? (() => performance.now());
    const pvs = [...WATCHED, ...COMMANDS].map((s) => opts.prefix + s).concat(opts.extraPvs ?? []);
    this.socket = new ReconnectingSocket(opts.url, {
      onOpen: () => {
        this.socket.send({ action: "subscribe", pvs });
        this.update(socketOpened(this.store));
      },
      onMessage: (msg) => {
        if (typeof msg.error === "string") {
          this.socketError = msg.error;
          this.changed();
          return;
        }
        if (typeof msg.pv !== "string") return;
        const key = msg.pv.startsWith(opts.prefix) ? msg.pv.slice(opts.prefix.length) : msg.pv;
        this.update(applyMessage(this.store, key, msg));
      },
      onClose: () => this.update(socketClosed(this.store)),
    });
    this.timer = setInterval(() => this.drive(), TICK_MS);
  }

  get view(): LockView {
    return lockView(this.store);
  }

  get session(): string {
    return this.opts.session;
  }

  /** Who waits for the lock, and this page's place. */
  get line(): LineView {
    return lineView(this.store, this.opts.session);
  }

  /** Ask for the lock: granted if it is free for us, else wait in line (kept renewed). */
  request(lease: number, note: string): void {
    const r = request(this.opts.session, { lease, note }, this.now());
    this.req = r.req;
    this.send(r.puts);
    this.changed();
  }

  withdraw(): void {
    this.req = null;
    this.send(withdraw(this.opts.session));
    this.changed();
  }

  /** The holder: give the lock to the first in line, in one step. */
  handover(): void {
    this.send(handover(this.opts.session));
  }

  take(lease: number, note: string): void {
    this.apply(take(this.ka, this.view, { lease, note }, this.now()));
  }

  renew(): void {
    this.send([{ command: "Renew", body: { session: this.opts.session, lease: this.ka.lease } }]);
  }

  release(): void {
    this.apply(release(this.ka, this.view));
  }

  /** ForceRelease / Disable / Enable: the reason is the PV's text (operators). */
  operator(command: OperatorCommand, reason: string): void {
    this.socket.send({ action: "set", pv: this.opts.prefix + command, value: reason, timeout: 5 });
  }

  /** A direct PV put on the same socket (the never-gated Stop records). */
  putPv(pv: string, value: number | string): boolean {
    this.socketError = "";
    this.changed();
    return this.socket.send({ action: "set", pv, value, timeout: 5 });
  }

  /** Release, then wait (at most `ms`) until the lock no longer shows this page's grant. */
  async releaseAndWait(ms: number): Promise<void> {
    this.release();
    const end = this.now() + ms;
    while (this.now() < end && this.socket.open && heldBy(this.view, this.opts.session)) {
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }

  close(): void {
    clearInterval(this.timer);
    this.onChange = null;
    this.socket.close();
  }

  private send(puts: Array<Put | LinePut>): void {
    for (const put of puts) {
      // A JSON object, never a bare value: ophyd-websocket turns numeric text into numbers.
      this.socket.send({ action: "set", pv: this.opts.prefix + put.command,
                         value: JSON.stringify(put.body), timeout: 5 });
    }
  }

  private apply(r: { ka: KeepAlive; puts: Put[] }): void {
    const changed = r.ka !== this.ka;
    this.ka = r.ka;
    this.send(r.puts);
    if (changed) this.changed();
  }

  private drive(): void {
    this.apply(step(this.ka, this.view, this.now()));
    const r = lineStep(this.req, this.view, this.line, this.opts.session, this.now());
    this.send(r.puts);
    if (r.req !== this.req) {
      this.req = r.req;
      this.changed();
    }
  }

  private update(next: PvStore): void {
    if (next === this.store) return;
    this.store = next;
    this.drive();
    this.changed();
  }

  private changed(): void {
    this.onChange?.();
  }
}
