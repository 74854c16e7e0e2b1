"""The lock's PV interface contract: the one place where PV names, types and roles live.

The IOC builds its PVs from this table, the clients and screens take their PV names
from it, and ``docs/pv-interface.md`` is rendered from it (``python -m lock_ioc.contract``).
Names are a contract with every tool on the beamline: add entries, never rename one.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

#: Values of ``$(P)State``, in enum order.
STATES: tuple[str, ...] = ("Free", "Held", "Disabled")

#: Gate PVs are ``$(P)Gate:<group>``, one per access group in the config.
GATE_PREFIX = "Gate:"

#: Longest text a command or text PV takes (bytes, UTF-8). Fits the default
#: ``EPICS_CA_MAX_ARRAY_BYTES`` (16384) of every CA client.
HISTORY_MAX = 16000
#: Longest ``$(P)Waiters`` text (bytes): the most waiters with the longest notes fit.
WAITERS_MAX = 16000


@dataclasses.dataclass(frozen=True)
class PVSpec:
    """One PV of the contract.

    kind: ``enum`` (DBF_ENUM), ``long`` (DBF_LONG), ``double`` (DBF_DOUBLE) or ``text``
    (a UTF-8 CHAR array, the EPICS long-string convention: ``caget -S`` / ``caput -S``).
    command: a write is a command to the lock; all other PVs refuse CA writes.
    """

    suffix: str
    kind: str
    command: bool
    doc: str
    enum: tuple[str, ...] = ()
    max_length: int = 0
    units: str = ""

    def name(self, prefix: str) -> str:
        return prefix + self.suffix

    @property
    def attr(self) -> str:
        """Python attribute name used for this PV in the IOC's PVGroup."""
        return "pv_" + self.suffix.replace(":", "_").lower()


PVS: tuple[PVSpec, ...] = (
    # ---- read-only state --------------------------------------------------------
    PVSpec("State", "enum", False, "Lock state.", enum=STATES),
    PVSpec("Owner", "text", False, 'CA identity of the holder as "user@host" ("" when not held).',
           max_length=256),
    PVSpec("Session", "text", False, "Session name the holder declared.", max_length=128),
    PVSpec("Note", "text", False, "Free-text purpose the holder declared.", max_length=512),
    PVSpec("Token", "long", False,
           "Fencing token: +1 on every grant, never decreases (also across restarts)."),
    PVSpec("Expiry", "double", False, "Lease end, POSIX seconds (0 when not held).", units="s"),
    PVSpec("Remaining", "double", False,
           "Seconds left on the lease (0 when not held); updated every second.", units="s"),
    PVSpec("Message", "text", False,
           "Outcome of the last command: granted, or exactly why refused.", max_length=1024),
    PVSpec("History", "text", False,
           "The last events, newest last, one per line (who, what, when, token).",
           max_length=HISTORY_MAX),
    PVSpec("Heartbeat", "long", False, "Incremented every second while the IOC runs."),
    PVSpec("DisabledReason", "text", False,
           "Why the lock is Disabled, and by whom (\"\" otherwise).", max_length=1024),
    PVSpec("LeaseDefault", "double", False, "Lease granted when a request names none.",
           units="s"),
    PVSpec("LeaseMax", "double", False, "Longest lease the lock grants.", units="s"),
    PVSpec("AcquiredAt", "double", False,
           "When the current grant (Token) began, POSIX seconds (0 when not held).", units="s"),
    PVSpec("WaiterCount", "long", False, "How many requests wait for the lock."),
    PVSpec("Waiters", "text", False,
           'The requests waiting for the lock, first in line first: a JSON array of '
           '{"who", "session", "note", "since", "expiry", "lease", "auto", "authority", '
           '"group"} (since/expiry in POSIX seconds; "[]" when nobody waits).',
           max_length=WAITERS_MAX),
    PVSpec("YieldTo", "text", False,
           "user@host of a higher-authority waiter the holder hands over to at the end of "
           "its running task (the queue's plan); \"\" otherwise.", max_length=256),
    PVSpec("HolderIndex", "long", False,
           "Who holds the lock, as a number device IOCs' ACF compares: 0 Free, i the i-th "
           "user of the config (1-based), -1 Disabled, -2 unknown (held by a user the "
           "config does not list, or the shown state is not durable)."),
    PVSpec("UserMap", "long", False,
           "Checksum of the config's user list HolderIndex counts in; the ACF admits a "
           "holder by index only while it matches."),
    # ---- commands -------------------------------------------------------------
    PVSpec("Acquire", "text", True,
           'Session name, or JSON {"session": s, "lease": seconds, "note": text}. '
           "The holder acquiring again renews.", max_length=2048),
    PVSpec("Renew", "text", True,
           'Session name, or JSON {"session": s, "lease": seconds}. Holder only.',
           max_length=2048),
    PVSpec("Release", "text", True, "Session name. Holder only.", max_length=2048),
    PVSpec("ForceRelease", "text", True, "Reason (required). Operators only.",
           max_length=2048),
    PVSpec("Disable", "text", True, "Reason (required). Operators only.", max_length=2048),
    PVSpec("Enable", "text", True, "Reason (optional). Operators only.", max_length=2048),
    PVSpec("Request", "text", True,
           'Ask for the lock: session name, or JSON {"session": s, "lease": seconds, '
           '"note": text, "auto": true}. Granted at once when the lock is Free and you are '
           "first in line, or held at a lower authority (unless the holder runs a task); "
           "else you wait in line. The request lapses unless renewed within its lease "
           '(Request again); "auto": false waits for a Handover or an Acquire instead of '
           "taking a released lock.", max_length=2048),
    PVSpec("Withdraw", "text", True, "Session name of your request: leave the line.",
           max_length=2048),
    PVSpec("Handover", "text", True,
           'Holder only: the holder\'s session (to the first in line), or JSON {"session": s, '
           '"to": "user@host", "to_session": s, "requeue": true}. One step: a new Token '
           'and owner; "requeue" puts the holder in line again.', max_length=2048),
    PVSpec("Ping", "long", True,
           "Accepts any integer and does nothing: a baseline for latency benchmarks."),
)

#: Gate PV template (one per configured group).
GATE = PVSpec(GATE_PREFIX + "{group}", "long", False,
              "1 while the lock admits <group>: Free, held by a member of <group>, or "
              "Disabled for an operator group; else 0. Device IOCs admit a group's members "
              "through it only where the config marks the group shared; otherwise only the "
              "holder writes (HolderIndex).")

BY_SUFFIX: dict[str, PVSpec] = {spec.suffix: spec for spec in PVS}
COMMANDS: tuple[str, ...] = tuple(spec.suffix for spec in PVS if spec.command)


def gate_suffix(group: str) -> str:
    return GATE_PREFIX + group


def all_pvs(prefix: str, groups: Iterable[str]) -> dict[str, PVSpec]:
    """Every PV name an IOC with these groups serves, mapped to its spec."""
    names = {spec.name(prefix): spec for spec in PVS}
    for group in groups:
        names[prefix + gate_suffix(group)] = GATE
    return names


def render_markdown() -> str:
    """The contract as the Markdown table of ``docs/pv-interface.md``."""
    kinds = {"enum": "DBF_ENUM", "long": "DBF_LONG", "double": "DBF_DOUBLE",
             "text": "DBF_CHAR[] (long string: `caget -S`, `caput -S`)"}
    lines = [
        "# Lock IOC PV interface",
        "",
        "Generated from `lock_ioc/contract.py` by `python -m lock_ioc.contract`; "
        "do not edit by hand (a test checks it is current).",
        "",
        "`$(P)` is the IOC prefix (default `BL:LOCK:`). Names are a contract: "
        "entries may be added, never renamed.",
        "",
        "| PV | type | access | meaning |",
        "|---|---|---|---|",
    ]
    for spec in PVS + (GATE,):
        kind = kinds[spec.kind]
        if spec.enum:
            kind += " " + "/".join(f"`{s}`" for s in spec.enum)
        if spec.max_length:
            kind += f", up to {spec.max_length} bytes"
        if spec.units:
            kind += f", {spec.units}"
        access = "write (command)" if spec.command else "read-only"
        name = "$(P)" + spec.suffix.replace("{group}", "&lt;group&gt;")
        lines.append(f"| `{name}` | {kind} | {access} | {spec.doc} |")
    lines += [
        "",
        "A refused command fails the CA put (the reason is visible with `caput -c -S`), "
        "changes nothing, and is also written to `$(P)Message`. A granted command "
        "completes only after the new state is durable on disk.",
        "",
    ]
    return "\n".join(lines)


#: Name and version of this contract, as other services' specs refer to it.
FORMAT = "lock-pv-contract/v1"


def render_json() -> str:
    """The contract as machine-readable JSON (``docs/pv-interface.json``, the ICD)."""
    import json

    def entry(spec: PVSpec) -> dict:
        out = {"pv": "$(P)" + spec.suffix.replace("{group}", "<group>"), "kind": spec.kind,
               "access": "command" if spec.command else "read-only", "doc": spec.doc}
        if spec.enum:
            out["enum"] = list(spec.enum)
        if spec.max_length:
            out["max_length"] = spec.max_length
        if spec.units:
            out["units"] = spec.units
        return out

    doc = {"format": FORMAT, "prefix_macro": "$(P)", "default_prefix": "BL:LOCK:",
           "pvs": [entry(s) for s in PVS], "per_group": [entry(GATE)]}
    return json.dumps(doc, indent=2) + "\n"


if __name__ == "__main__":
    import sys
    print(render_json() if "--json" in sys.argv[1:] else render_markdown(), end="")
