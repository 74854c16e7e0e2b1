// The newest known value of each PV, ordered by the IOC's timestamp, not by arrival.
//
// ophyd-websocket can deliver an older value of a PV after a newer one (when a
// subscription connects, ophyd sends the first value twice from two threads; the cached
// replay may come last). A page that trusts arrival order sees the lock's Token go back
// and believes its grant is gone (issue 12). So a value older than the one held is
// dropped, and so is what that stale message says about the connection.
//
// Pure: no sockets, no DOM, no clock. Used for lock PVs and device signals alike.

export interface PvRecord {
  value: unknown;
  /** IOC timestamp (POSIX seconds) of `value`; -Infinity before any. */
  ts: number;
  hasValue: boolean;
  connected: boolean;
}

export interface PvStore {
  /** The WebSocket to ophyd-websocket is open. */
  socketOpen: boolean;
  pvs: Readonly<Record<string, PvRecord>>;
  /** enum_strs of PVs that sent them (metadata messages). */
  enums: Readonly<Record<string, readonly string[]>>;
}

/** A message of ophyd-websocket's PV or device socket, reduced to what the store uses. */
export interface PvMessage {
  value?: unknown;
  timestamp?: unknown;
  connected?: unknown;
  enum_strs?: unknown;
}

const BLANK: PvRecord = { value: undefined, ts: -Infinity, hasValue: false, connected: false };

export function emptyStore(): PvStore {
  return { socketOpen: false, pvs: {}, enums: {} };
}

export function record(store: PvStore, key: string): PvRecord {
  return store.pvs[key] ?? BLANK;
}

/**
 * The socket opened (or reopened): nothing is connected until ophyd-websocket says so.
 * Values and their timestamps are kept, so a replay of an old cached value after a
 * reconnect is still recognised as old.
 */
export function socketOpened(store: PvStore): PvStore {
  const pvs: Record<string, PvRecord> = {};
  for (const [key, rec] of Object.entries(store.pvs)) pvs[key] = { ...rec, connected: false };
  return { ...store, socketOpen: true, pvs };
}

export function socketClosed(store: PvStore): PvStore {
  const pvs: Record<string, PvRecord> = {};
  for (const [key, rec] of Object.entries(store.pvs)) pvs[key] = { ...rec, connected: false };
  return { ...store, socketOpen: false, pvs };
}

/** Apply one message about `key`. Returns the same store when nothing changed. */
export function applyMessage(store: PvStore, key: string, msg: PvMessage): PvStore {
  const rec = record(store, key);
  let next: PvRecord = rec;
  let enums = store.enums;
  if (Array.isArray(msg.enum_strs) && msg.enum_strs.length > 0) {
    enums = { ...enums, [key]: msg.enum_strs.map(String) };
  }
  if ("value" in msg) {
    const ts = typeof msg.timestamp === "number" ? msg.timestamp : Number(msg.timestamp);
    const stamped = Number.isFinite(ts);
    if (stamped && ts < rec.ts) {
      // An older value delivered late: drop it, and its idea of the connection too.
      return enums === store.enums ? store : { ...store, enums };
    }
    next = { value: msg.value, ts: stamped ? ts : rec.ts, hasValue: true,
             connected: typeof msg.connected === "boolean" ? msg.connected : true };
  } else if (typeof msg.connected === "boolean") {
    next = { ...rec, connected: msg.connected };
  }
  if (next === rec && enums === store.enums) return store;
  return { ...store, pvs: { ...store.pvs, [key]: next }, enums };
}
