// The lock as a React hook: ophyd-websocket's PV socket feeds the pure store, and the
// pure keep-alive decides the puts; this file only wires sockets, timers and state.
import { useCallback, useEffect, useMemo, useRef, useState } from "react";
import { owsSocketUrl, type AppConfig } from "../config";
import { ReconnectingSocket } from "../net/socket";
import { COMMANDS, WATCHED, type Command } from "./contract";
import { createKeepAlive, release as kaRelease, step, take as kaTake, type KeepAlive,
         type Put } from "./keepalive";
import { applyMessage, emptyStore, socketClosed, socketOpened, type PvStore } from "./pvstore";
import { heldBy, lockView, type LockView } from "./view";

const TICK_MS = 500;

export interface LockApi {
  view: LockView;
  ka: KeepAlive;
  session: string;
  socketOpen: boolean;
  /** Last error ophyd-websocket's PV socket sent (e.g. a refused Stop). */
  socketError: string;
  take(lease: number, note: string): void;
  renew(): void;
  release(): void;
  /** ForceRelease / Disable / Enable with a reason (operators). */
  operator(command: Extract<Command, "ForceRelease" | "Disable" | "Enable">, reason: string): void;
  /** A direct PV put (the never-gated Stop records). */
  putPv(pv: string, value: number | string): boolean;
  /** Release if held, then wait (at most `ms`) until the lock no longer shows this page's grant. */
  releaseAndWait(ms: number): Promise<void>;
}

export function useLock(cfg: AppConfig, user: string, apiKey: string, extraPvs: string[]): LockApi {
  const session = `${cfg.sessionPrefix}${user}`;
  const [store, setStore] = useState<PvStore>(emptyStore);
  const [ka, setKa] = useState<KeepAlive>(() => createKeepAlive(session, cfg.defaultLease));
  const [socketError, setSocketError] = useState("");
  const storeRef = useRef(store);
  const kaRef = useRef(ka);
  const socketRef = useRef<ReconnectingSocket | null>(null);
  const prefix = cfg.lockPrefix;

  const send = useCallback((puts: Put[]) => {
    for (const put of puts) {
      // A JSON object, never a bare value: ophyd-websocket turns numeric text into numbers.
      socketRef.current?.send({ action: "set", pv: prefix + put.command,
                                value: JSON.stringify(put.body), timeout: 5 });
    }
  }, [prefix]);

  const drive = useCallback(() => {
    const r = step(kaRef.current, lockView(storeRef.current), performance.now());
    if (r.ka !== kaRef.current) {
      kaRef.current = r.ka;
      setKa(r.ka);
    }
    send(r.puts);
  }, [send]);

  const update = useCallback((next: PvStore) => {
    if (next === storeRef.current) return;
    storeRef.current = next;
    setStore(next);
    drive();
  }, [drive]);

  const extraKey = extraPvs.join(" ");
  useEffect(() => {
    const pvs = [...WATCHED, ...COMMANDS].map((s) => prefix + s)
      .concat(extraKey ? extraKey.split(" ") : []);
    const socket = new ReconnectingSocket(
      owsSocketUrl(cfg, user, "pv-socket", window.location.href, apiKey), {
        onOpen: () => {
          socket.send({ action: "subscribe", pvs });
          update(socketOpened(storeRef.current));
        },
        onMessage: (msg) => {
          if (typeof msg.error === "string") {
            setSocketError(msg.error);
            return;
          }
          const pv = msg.pv;
          if (typeof pv !== "string") return;
          const key = pv.startsWith(prefix) ? pv.slice(prefix.length) : pv;
          update(applyMessage(storeRef.current, key, msg));
        },
        onClose: () => update(socketClosed(storeRef.current)),
      });
    socketRef.current = socket;
    const timer = setInterval(drive, TICK_MS);
    return () => {
      clearInterval(timer);
      socket.close();
      socketRef.current = null;
    };
  }, [cfg, user, apiKey, prefix, extraKey, update, drive]);

  const view = useMemo(() => lockView(store), [store]);

  const apply = useCallback((r: { ka: KeepAlive; puts: Put[] }) => {
    kaRef.current = r.ka;
    setKa(r.ka);
    send(r.puts);
  }, [send]);

  const take = useCallback((lease: number, note: string) => {
    apply(kaTake(kaRef.current, lockView(storeRef.current), { lease, note }, performance.now()));
  }, [apply]);

  const renew = useCallback(() => {
    send([{ command: "Renew", body: { session, lease: kaRef.current.lease } }]);
  }, [send, session]);

  const release = useCallback(() => {
    apply(kaRelease(kaRef.current, lockView(storeRef.current)));
  }, [apply]);

  const operator = useCallback((command: "ForceRelease" | "Disable" | "Enable", reason: string) => {
    socketRef.current?.send({ action: "set", pv: prefix + command, value: reason, timeout: 5 });
  }, [prefix]);

  const putPv = useCallback((pv: string, value: number | string) => {
    setSocketError("");
    return socketRef.current?.send({ action: "set", pv, value, timeout: 5 }) ?? false;
  }, []);

  const releaseAndWait = useCallback(async (ms: number) => {
    apply(kaRelease(kaRef.current, lockView(storeRef.current)));
    const end = performance.now() + ms;
    while (performance.now() < end && socketRef.current?.open &&
           heldBy(lockView(storeRef.current), session)) {
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }, [apply, session]);

  return { view, ka, session, socketOpen: store.socketOpen, socketError, take, renew, release,
           operator, putPv, releaseAndWait };
}
