"""EPICS access security (ACF) for device IOCs, generated from the lock's config.

Each configured group becomes a ``UAG`` (and a ``HAG`` when it lists hosts), and so does
each user (``UAG(user<i>_<name>)``, ``i`` the user's number in ``$(P)HolderIndex``).
``ASG(GATED)`` is **exclusive to the holder**: it reads ``$(P)HolderIndex`` (INPA) and
``$(P)UserMap`` (INPB), and lets a user write while the lock is Free (A=0) or held by that
user (A=i, counted in the same user list: B=the map this file was made from, so a file
made from another config never admits the wrong person). A group the config marks
``shared`` also writes while any member holds (its ``$(P)Gate:<group>``, INPC..INPL);
operator groups write while the lock is Disabled (A=-1). When the lock IOC is
unreachable the inputs are invalid, no write rule matches, and gated records are
read-only for everyone (fail safe). An ASG has at most 12 inputs: two plus at most ten
shared groups; the number of users and groups is not limited.

``ASG(SAFE)`` is for stop and make-safe records: every group may write their VAL whatever
the lock says (also while the lock IOC is down), and they act on the gated records
through database links, which access security does not check. ``ASG(DEFAULT)`` keeps
ungated records as they were (read and write); ``ASG(READONLY)`` is for readbacks.
"""
from __future__ import annotations

import re

from lock_ioc.config import PREFIX, Config
from lock_ioc.contract import gate_suffix
from lock_ioc.machine import DISABLED_INDEX, FREE_INDEX

INPUTS = "ABCDEFGHIJKL"  # an ASG has INPA..INPL: at most 12 inputs
#: INPA: who holds the lock; INPB: the user list it counts in; then shared groups' gates.
HOLDER_INPUT, MAP_INPUT, SHARED_INPUTS = "A", "B", INPUTS[2:]
#: Characters of an ACF name (EPICS base asLib).
ACF_NAME_CHAR = re.compile(r"[^A-Za-z0-9_+:.-]")
ASG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,39}$")
RESERVED = ("DEFAULT", "READONLY")  # generated too


class AcfError(ValueError):
    """The config cannot be expressed as a valid ACF."""


def _names(items) -> str:
    return ", ".join(f'"{item}"' for item in items)


def _check_asg(name: str, what: str) -> None:
    if not ASG_NAME.match(name) or name in RESERVED:
        raise AcfError(f"invalid {what} name {name!r}: a letter then letters, digits or '_', "
                       "and not DEFAULT or READONLY (they are generated too)")


def _group_rule(g, level: int, calc: str = "", uag: str = "") -> list[str]:
    """One WRITE rule for group ``g`` (its UAG, or ``uag``; its HAG if it lists hosts;
    a CALC)."""
    lines = [f"    RULE({level}, WRITE) {{", f"        UAG({uag or g.name})"]
    if g.hosts:
        lines.append(f"        HAG({g.name})")
    if calc:
        lines.append(f'        CALC("{calc}")')
    return lines + ["    }"]


def user_uag(index: int, user: str) -> str:
    """The UAG of one user: ``user<HolderIndex>_<name>`` (unique, a valid ACF name)."""
    return f"user{index}_{ACF_NAME_CHAR.sub('_', user)}"


def _user_rules(config: Config) -> list[str]:
    """Per user: write while Free or while this user holds (any host its groups allow)."""
    lines = []
    a, b = HOLDER_INPUT, MAP_INPUT
    for index, user in enumerate(config.users, 1):
        groups = [g for g in config.groups if user in g.users]
        calc = f"{a}={FREE_INDEX}||({a}={index}&&{b}={config.user_map})"
        if any(not g.hosts for g in groups):
            groups = [next(g for g in groups if not g.hosts)]  # any host: one rule
        for g in groups:
            lines += _group_rule(g, 1, calc, uag=user_uag(index, user))
    return lines


def render_acf(config: Config, asg: str = "GATED", *, safe_asg: str = "SAFE",
               prefix: str | None = None) -> str:
    """The ACF text for device IOCs whose gated records use ``ASG(<asg>)`` and whose
    stop/make-safe records use ``ASG(<safe_asg>)``.

    ``prefix``: the lock IOC's PV prefix the gates are read from (default: the config's
    ``prefix``); it must be the prefix the lock IOC serves, e.g. its ``--prefix``.
    """
    _check_asg(asg, "ASG")
    _check_asg(safe_asg, "safe ASG")
    if safe_asg == asg:
        raise AcfError(f"the gated and the safe ASG must differ (both {asg!r})")
    prefix = config.prefix if prefix is None else prefix
    if not PREFIX.match(prefix):
        raise AcfError(f"invalid lock prefix {prefix!r}: expected a PV name prefix such as "
                       "'BL:LOCK:'")
    groups = config.groups
    shared = [g for g in groups if g.shared]
    if len(shared) > len(SHARED_INPUTS):
        raise AcfError(f"{len(shared)} shared groups, but an ASG has only "
                       f"{len(SHARED_INPUTS)} inputs left for their gates (INP"
                       f"{SHARED_INPUTS[0]}..INP{SHARED_INPUTS[-1]}): mark at most "
                       f"{len(SHARED_INPUTS)} groups shared in {config.source}")
    uags = {g.name for g in groups}
    for index, user in enumerate(config.users, 1):
        if user_uag(index, user) in uags:
            raise AcfError(f"group name {user_uag(index, user)!r} clashes with the UAG "
                           f"generated for user {user!r}: rename the group")
    lines = [
        f"# Generated by `lockctl acf` from {config.source}; do not edit.",
        f"# Lock PVs read from the lock IOC served under prefix {prefix}"
        + ("" if prefix == config.prefix else f" (the config says {config.prefix})") + ".",
        f"# Gated records use ASG({asg}); stop and make-safe records ASG({safe_asg}).",
        f"# Users by {prefix}HolderIndex number (user map {config.user_map}): "
        + ", ".join(f"{i} {u}" for i, u in enumerate(config.users, 1)) + ".",
        "",
    ]
    for g in groups:
        lines.append(f"UAG({g.name}) {{{_names(g.users)}}}")
    for index, user in enumerate(config.users, 1):
        lines.append(f"UAG({user_uag(index, user)}) {{{_names([user])}}}")
    for g in groups:
        if g.hosts:
            lines.append(f"HAG({g.name}) {{{_names(g.hosts)}}}")
    lines += [
        "",
        "# Ungated records: as without the lock.",
        "ASG(DEFAULT) {",
        "    RULE(1, READ)",
        "    RULE(1, WRITE)",
        "}",
        "",
        "# Readbacks nobody writes over CA.",
        "ASG(READONLY) {",
        "    RULE(1, READ)",
        "}",
        "",
        "# Stopping and making safe are never refused by the lock: every group writes the",
        "# VAL (level 0) of these records whatever the lock says, also while the lock IOC",
        "# is down. They act on gated records through database links (not access checked).",
        f"ASG({safe_asg}) {{",
        "    RULE(1, READ)",
    ]
    for g in groups:
        lines += _group_rule(g, 0)
    lines += [
        "}",
        "",
        "# Exclusive to the holder: a user writes while the lock is Free (A=0) or held by",
        "# that user (A=the user's number, B=the user map of this file). Shared groups: while",
        "# their gate is 1. Operator groups: while Disabled (A=-1). Lock IOC unreachable:",
        "# inputs invalid, no write.",
        f"ASG({asg}) {{",
        f'    INP{HOLDER_INPUT}("{prefix}HolderIndex")',
        f'    INP{MAP_INPUT}("{prefix}UserMap")',
    ]
    for letter, g in zip(SHARED_INPUTS, shared):
        lines.append(f'    INP{letter}("{prefix}{gate_suffix(g.name)}")')
    lines.append("    RULE(1, READ)")
    lines += _user_rules(config)
    for letter, g in zip(SHARED_INPUTS, shared):
        lines += _group_rule(g, 1, f"{letter}=1")
    for g in groups:
        if g.operator:
            lines += _group_rule(g, 1, f"{HOLDER_INPUT}={DISABLED_INDEX}")
    lines += ["}", ""]
    return "\n".join(lines)
