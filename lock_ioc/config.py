"""Load and validate the lock's YAML configuration.

An invalid config must stop the IOC before it serves anything, with a message that
names the offending key (``groups.staff.users[1]: ...``), never a traceback.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import zlib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

#: Group names become PV names (``$(P)Gate:<group>``) and ACF UAG/HAG names.
GROUP_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
#: CA user and host names as EPICS access security compares them.
USER_NAME = re.compile(r"^[A-Za-z0-9_.@+-][A-Za-z0-9_.@+$-]{0,63}$")
HOST_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,253}$")
#: Prefix characters CA clients and record names accept.
PREFIX = re.compile(r"^[A-Za-z0-9_:.\-{}\[\]<>;]{1,60}$")

TOP_KEYS = {"prefix", "lease", "state", "groups", "history"}
LEASE_KEYS = {"default", "max"}
GROUP_KEYS = {"users", "hosts", "operator", "authority", "shared", "unattended"}
#: Authority levels are small whole numbers (higher wins; the default is 0).
AUTHORITY_RANGE = (-1000, 1000)


class ConfigError(ValueError):
    """The config is invalid; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Group:
    """An access group. ``authority``: a member's request for a lock held at a lower
    level takes it at once (see :mod:`lock_ioc.machine`). ``shared``: device IOCs admit
    every member while a member holds the lock (default: only the holder).
    ``unattended``: holders from this group (the queue) may declare a running task, which
    a higher-authority request waits for instead of taking the lock mid-task."""

    name: str
    users: tuple[str, ...]
    hosts: tuple[str, ...] = ()  # empty: any host
    operator: bool = False
    authority: int = 0
    shared: bool = False
    unattended: bool = False

    def admits(self, user: str, host: str) -> bool:
        """Membership as EPICS access security's UAG + HAG would decide it."""
        if user not in self.users:
            return False
        return not self.hosts or host.lower() in self.hosts


@dataclasses.dataclass(frozen=True)
class Config:
    prefix: str
    lease_default: float
    lease_max: float
    state: Path
    groups: tuple[Group, ...]
    history: int = 25
    source: str = "<embedded default>"

    def groups_of(self, user: str, host: str) -> tuple[Group, ...]:
        return tuple(g for g in self.groups if g.admits(user, host))

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    @functools.cached_property
    def users(self) -> tuple[str, ...]:
        """Every user name of the config, each once, in order of first appearance: the
        numbers ``$(P)HolderIndex`` publishes (1-based) and the device IOCs' ACF compares."""
        return tuple(dict.fromkeys(u for g in self.groups for u in g.users))

    def user_index(self, user: str) -> int:
        """1-based index of ``user`` in :attr:`users`; 0 if the config does not name it."""
        try:
            return self.users.index(user) + 1
        except ValueError:
            return 0

    @functools.cached_property
    def user_map(self) -> int:
        """A checksum of :attr:`users` (31 bits): the ACF admits a holder by index only
        while the lock IOC publishes the same map, so an ACF made from another user list
        never lets the wrong person in."""
        return zlib.crc32("\n".join(self.users).encode("utf-8")) & 0x7FFFFFFF

    def authority_of(self, user: str, host: str) -> int | None:
        """The highest authority of the groups admitting ``user@host`` (None: no group)."""
        levels = [g.authority for g in self.groups_of(user, host)]
        return max(levels) if levels else None

    def is_unattended(self, user: str, host: str) -> bool:
        return any(g.unattended for g in self.groups_of(user, host))


def _fail(key: str, why: str) -> ConfigError:
    return ConfigError(f"{key}: {why}")


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(key, f"expected a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise _fail(key, f"expected a positive number of seconds, got {value!r}")
    return float(value)


def _names(value: Any, key: str, pattern: re.Pattern, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _fail(key, f"expected a list of {what}s, got {value!r}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not pattern.match(item):
            raise _fail(f"{key}[{i}]", f"not a valid {what}: {item!r}")
        out.append(item)
    return tuple(out)


def _flag(body: dict, name: str, key: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise _fail(f"{key}.{name}", f"expected true or false, got {value!r}")
    return value


def _unknown(found: dict, allowed: set, key: str) -> None:
    extra = sorted(str(k) for k in found if k not in allowed)
    if extra:
        where = f"{key}." if key else ""
        raise _fail(f"{where}{extra[0]}",
                    f"unknown key (allowed: {', '.join(sorted(allowed))})")


def parse(data: Any, *, base_dir: Path, source: str) -> Config:
    """Validate a parsed YAML document; relative paths resolve against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    _unknown(data, TOP_KEYS, "")

    prefix = data.get("prefix", "BL:LOCK:")
    if not isinstance(prefix, str) or not PREFIX.match(prefix):
        raise _fail("prefix", f"expected a PV name prefix such as 'BL:LOCK:', got {prefix!r}")

    lease = data.get("lease", {})
    if not isinstance(lease, dict):
        raise _fail("lease", f"expected a mapping with default/max, got {lease!r}")
    _unknown(lease, LEASE_KEYS, "lease")
    lease_default = _number(lease.get("default", 60), "lease.default")
    lease_max = _number(lease.get("max", 3600), "lease.max")
    if lease_default > lease_max:
        raise _fail("lease.default", f"{lease_default:g} s is over lease.max ({lease_max:g} s)")
    if lease_max > 7 * 24 * 3600:
        raise _fail("lease.max", "at most one week (604800 s)")

    state = data.get("state", "var/lock-state.sqlite3")
    if not isinstance(state, str) or not state.strip():
        raise _fail("state", f"expected a file path, got {state!r}")
    state_path = Path(os.path.expanduser(state))
    if not state_path.is_absolute():
        state_path = base_dir / state_path

    history = data.get("history", 25)
    if isinstance(history, bool) or not isinstance(history, int) or not 20 <= history <= 100:
        raise _fail("history", f"expected a whole number of events from 20 to 100, got {history!r}")

    groups_raw = data.get("groups")
    if not isinstance(groups_raw, dict) or not groups_raw:
        raise _fail("groups", "expected a mapping of at least one group name to {users: [...]}")
    groups = []
    for name, body in groups_raw.items():
        key = f"groups.{name}"
        if not isinstance(name, str) or not GROUP_NAME.match(name):
            raise _fail(key, "group names start with a letter and use only letters, digits "
                             "and '_' (at most 32): they become PV and ACF names")
        if not isinstance(body, dict):
            raise _fail(key, f"expected a mapping with users/hosts/operator, got {body!r}")
        _unknown(body, GROUP_KEYS, key)
        users = _names(body.get("users"), f"{key}.users", USER_NAME, "user name")
        if not users:
            raise _fail(f"{key}.users", "a group needs at least one user")
        hosts = _names(body.get("hosts"), f"{key}.hosts", HOST_NAME, "host name")
        operator, shared, unattended = (_flag(body, name, key)
                                        for name in ("operator", "shared", "unattended"))
        authority = body.get("authority", 0)
        low, high = AUTHORITY_RANGE
        if isinstance(authority, bool) or not isinstance(authority, int) \
                or not low <= authority <= high:
            raise _fail(f"{key}.authority", f"expected a whole number from {low} to {high} "
                                            f"(higher wins), got {authority!r}")
        groups.append(Group(name, users, tuple(h.lower() for h in hosts), operator,
                            authority, shared, unattended))

    return Config(prefix=prefix, lease_default=lease_default, lease_max=lease_max,
                  state=state_path, groups=tuple(groups), history=history, source=source)


def load(path: str | os.PathLike | None = None) -> Config:
    """Load a config file, or the embedded default when ``path`` is None."""
    if path is None:
        text = resources.files("lock_ioc").joinpath("default.yaml").read_text()
        source, base_dir = "<embedded default>", Path.cwd()
    else:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: cannot read config: {exc}") from None
        source, base_dir = str(p), p.resolve().parent
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    try:
        return parse(data, base_dir=base_dir, source=source)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
