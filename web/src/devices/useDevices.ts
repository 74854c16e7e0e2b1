// The simulated beamline's devices through ophyd-websocket's device socket: live values
// per ophyd signal (ordered by IOC timestamp, like the lock's PVs) and sets whose answers
// arrive in order (the socket handles one request at a time).
import { useCallback, useEffect, useRef, useState } from "react";
import { owsSocketUrl, type AppConfig } from "../config";
import { ReconnectingSocket } from "../net/socket";
import { applyMessage, emptyStore, socketClosed, socketOpened, type PvStore } from "../lock/pvstore";
import { setOutcome, type SetResult } from "./outcome";

export interface DevicesApi {
  store: PvStore;
  units: Record<string, string>;
  results: Record<string, SetResult>;
  set(device: string, value: number | string): boolean;
}

export function useDevices(cfg: AppConfig, user: string, apiKey: string): DevicesApi {
  const [store, setStore] = useState<PvStore>(emptyStore);
  const [units, setUnits] = useState<Record<string, string>>({});
  const [results, setResults] = useState<Record<string, SetResult>>({});
  const storeRef = useRef(store);
  const socketRef = useRef<ReconnectingSocket | null>(null);
  const pending = useRef<{ device: string; value: number | string }[]>([]);

  useEffect(() => {
    const update = (next: PvStore) => {
      storeRef.current = next;
      setStore(next);
    };
    const names = cfg.devices.map((d) => d.name);
    const socket = new ReconnectingSocket(
      owsSocketUrl(cfg, user, "device-socket", window.location.href, apiKey), {
        onOpen: () => {
          pending.current = [];
          socket.send({ action: "subscribe", devices: names });
          update(socketOpened(storeRef.current));
        },
        onMessage: (msg) => {
          const signal = typeof msg.signal === "string" ? msg.signal : null;
          if (signal && typeof msg.units === "string" && msg.units) {
            setUnits((u) => (u[signal] === msg.units ? u : { ...u, [signal]: String(msg.units) }));
          }
          if (signal) {
            update(applyMessage(storeRef.current, signal, msg));
            return;
          }
          const text = typeof msg.error === "string" ? msg.error
            : typeof msg.message === "string" ? msg.message : null;
          if (text === null || msg.action === "subscribe") return;
          const request = pending.current.shift();
          if (!request) return;
          setResults((r) => ({ ...r, [request.device]: setOutcome(request.value, msg) }));
        },
        onClose: () => {
          for (const request of pending.current) {
            setResults((r) => ({ ...r, [request.device]:
              { kind: "error", text: "no answer: the device server connection closed" } }));
          }
          pending.current = [];
          update(socketClosed(storeRef.current));
        },
      });
    socketRef.current = socket;
    return () => {
      socket.close();
      socketRef.current = null;
    };
  }, [cfg, user, apiKey]);

  const set = useCallback((device: string, value: number | string) => {
    const sent = socketRef.current?.send({ action: "set", device, value,
                                           timeout: cfg.moveWaitSeconds }) ?? false;
    if (sent) {
      pending.current.push({ device, value });
      setResults((r) => ({ ...r, [device]: { kind: "busy", text: `setting ${device} to ${value} …` } }));
    }
    return sent;
  }, [cfg.moveWaitSeconds]);

  return { store, units, results, set };
}
