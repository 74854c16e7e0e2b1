// The lock as a React hook: a LockClient for this user's seat, re-rendered on change.
import { useEffect, useMemo, useState } from "react";
import { owsSocketUrl, type AppConfig } from "../config";
import { createKeepAlive, type KeepAlive } from "./keepalive";
import { emptyStore } from "./pvstore";
import { LockClient, type OperatorCommand } from "./client";
import { lineView, type LineView } from "./line";
import { lockView, type LockView } from "./view";

export interface LockApi {
  view: LockView;
  ka: KeepAlive;
  session: string;
  socketOpen: boolean;
  socketError: string;
  take(lease: number, note: string): void;
  renew(): void;
  release(): void;
  operator(command: OperatorCommand, reason: string): void;
  putPv(pv: string, value: number | string): boolean;
  releaseAndWait(ms: number): Promise<void>;
  /** Who waits for the lock, and this page's place (line.ts). */
  line: LineView;
  /** This page has a request waiting (renewed while it waits). */
  requesting: boolean;
  request(lease: number, note: string): void;
  withdraw(): void;
  handover(): void;
}

const IDLE_VIEW = lockView(emptyStore());

export function useLock(cfg: AppConfig, user: string, apiKey: string, extraPvs: string[]): LockApi {
  const session = `${cfg.sessionPrefix}${user}`;
  const extraKey = extraPvs.join(" ");
  const [client, setClient] = useState<LockClient | null>(null);
  const [, setVersion] = useState(0);
  useEffect(() => {
    const c = new LockClient({
      url: owsSocketUrl(cfg, user, "pv-socket", window.location.href, apiKey),
      prefix: cfg.lockPrefix, session, lease: cfg.defaultLease,
      extraPvs: extraKey ? extraKey.split(" ") : [],
    });
    c.onChange = () => setVersion((v) => v + 1);
    setClient(c);
    return () => c.close();
  }, [cfg, user, apiKey, session, extraKey]);

  const store = client?.store;
  const view = useMemo(() => (client ? client.view : IDLE_VIEW), [client, store]);
  return {
    view, session,
    ka: client?.ka ?? createKeepAlive(session, cfg.defaultLease),
    socketOpen: store?.socketOpen ?? false,
    socketError: client?.socketError ?? "",
    take: (lease, note) => client?.take(lease, note),
    renew: () => client?.renew(),
    release: () => client?.release(),
    operator: (command, reason) => client?.operator(command, reason),
    putPv: (pv, value) => client?.putPv(pv, value) ?? false,
    releaseAndWait: async (ms) => { await client?.releaseAndWait(ms); },
    line: client ? client.line : lineView(emptyStore(), session),
    requesting: client?.req != null,
    request: (lease, note) => client?.request(lease, note),
    withdraw: () => client?.withdraw(),
    handover: () => client?.handover(),
  };
}
