// The lock's PV names, taken from the ICD that lock_ioc/contract.py generates
// (docs/pv-interface.json), so the page cannot drift from the IOC: a suffix the page
// needs that the contract lacks fails the build's tests and the page's start.
import icd from "../../../docs/pv-interface.json";

/** Lock PVs whose values the page watches (State first: it decides the rest). */
export const WATCHED = ["State", "Owner", "Session", "Note", "Token", "Remaining", "Message",
                        "History", "DisabledReason", "LeaseDefault", "LeaseMax",
                        "Waiters", "WaiterCount", "YieldTo"] as const;
/** Command PVs the page puts to (ophyd-websocket puts only to subscribed PVs). */
export const COMMANDS = ["Acquire", "Renew", "Release", "ForceRelease", "Disable",
                         "Enable", "Request", "Withdraw", "Handover"] as const;

export type Watched = (typeof WATCHED)[number];
export type Command = (typeof COMMANDS)[number];

interface IcdEntry { pv: string; access: string; enum?: string[] }

const bySuffix = new Map<string, IcdEntry>(
  (icd.pvs as IcdEntry[]).map((e) => [e.pv.replace(icd.prefix_macro, ""), e]));

for (const suffix of WATCHED) {
  if (bySuffix.get(suffix)?.access !== "read-only") {
    throw new Error(`docs/pv-interface.json has no read-only PV ${suffix}`);
  }
}
for (const suffix of COMMANDS) {
  if (bySuffix.get(suffix)?.access !== "command") {
    throw new Error(`docs/pv-interface.json has no command PV ${suffix}`);
  }
}

/** State names in enum order (ophyd-websocket sends the index; its enum_strs win). */
export const STATE_NAMES: readonly string[] = bySuffix.get("State")?.enum ?? [];
export const DEFAULT_PREFIX: string = icd.default_prefix;
