"""The lock as a pure state machine: no I/O, no clock of its own.

Every method takes the current state, the caller's CA identity, the raw command text
and ``now`` (POSIX seconds), and returns an :class:`Outcome` (the next state, the
events to log, the message to publish) or raises :class:`Refused`. The IOC persists an
outcome before it publishes it; tests and benchmarks drive this class directly.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt

from .config import Config
from .contract import BY_SUFFIX, COMMANDS, STATES
from .requests import Refused, decode, parse_reason, parse_session_request

FREE, HELD, DISABLED = STATES
#: Command PVs whose text the machine interprets (``Ping`` is not one of them).
TEXT_COMMANDS = tuple(c for c in COMMANDS if BY_SUFFIX[c].kind == "text")


@dataclasses.dataclass(frozen=True)
class LockState:
    mode: str = FREE
    owner: str = ""        # "user@host" of the holder
    session: str = ""
    note: str = ""
    token: int = 0         # fencing token of the latest grant; never decreases
    expiry: float = 0.0    # POSIX seconds; 0 when not held
    lease: float = 0.0     # length of the current lease, reused by a bare renew
    reason: str = ""       # why Disabled, and by whom

    def remaining(self, now: float) -> float:
        return max(0.0, self.expiry - now) if self.mode == HELD else 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LockState":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class Event:
    time: float
    kind: str     # acquired, renewed, released, expired, force-released, disabled, enabled, refused
    who: str
    session: str = ""
    token: int = 0
    detail: str = ""

    def line(self) -> str:
        """One human-readable History line."""
        stamp = _dt.datetime.fromtimestamp(self.time, _dt.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        parts = [stamp, self.kind, self.who or "-"]
        if self.session:
            parts.append(f"session={self.session}")
        parts.append(f"token={self.token}")
        if self.detail:
            parts.append(self.detail)
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Outcome:
    state: LockState
    events: tuple[Event, ...]
    message: str


def utc(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class LockMachine:
    """Rules of the lock, parameterised by the config (groups, lease limits)."""

    def __init__(self, config: Config):
        self.config = config

    # ---- derived views --------------------------------------------------------
    def gates(self, state: LockState) -> dict[str, int]:
        """1 for each group that may write gated devices in this state."""
        if state.mode == FREE:
            return {g.name: 1 for g in self.config.groups}
        if state.mode == DISABLED:
            return {g.name: int(g.operator) for g in self.config.groups}
        user, _, host = state.owner.rpartition("@")
        return {g.name: int(g.admits(user, host)) for g in self.config.groups}

    def holder_text(self, state: LockState, now: float) -> str:
        note = f", note {state.note!r}" if state.note else ""
        return (f"held by {state.owner} (session {state.session}{note}), token {state.token}, "
                f"until {utc(state.expiry)} ({state.remaining(now):.0f} s left)")

    # ---- time -----------------------------------------------------------------
    def expire(self, state: LockState, now: float) -> Outcome | None:
        """The lease ran out: Free, with an "expired" event. None if nothing to do."""
        if state.mode != HELD or now < state.expiry:
            return None
        event = Event(now, "expired", state.owner, state.session, state.token,
                      f"lease ended {utc(state.expiry)}")
        message = (f"lease of {state.owner} (session {state.session}, token {state.token}) "
                   f"expired at {utc(state.expiry)}")
        return Outcome(LockState(token=state.token), (event,), message)

    def _current(self, state: LockState, now: float) -> tuple[LockState, tuple[Event, ...]]:
        done = self.expire(state, now)
        return (done.state, done.events) if done else (state, ())

    # ---- commands -------------------------------------------------------------
    def command(self, name: str, state: LockState, caller: str, raw: bytes | str,
                now: float) -> Outcome:
        """Dispatch a write to command PV ``name`` by CA identity ``caller``."""
        handler = getattr(self, "_" + name.lower(), None)
        if handler is None or name not in TEXT_COMMANDS:
            raise Refused(f"{name}: not a command")
        text = decode(raw, name)
        state, pre = self._current(state, now)
        try:
            out = handler(state, caller, text, now)
        except Refused as exc:
            # Expiry discovered on the way is real even if the command is refused.
            exc.pending = Outcome(state, pre, exc.message) if pre else None
            raise
        return Outcome(out.state, pre + out.events, out.message)

    def _member(self, caller: str, command: str):
        user, _, host = caller.rpartition("@")
        groups = self.config.groups_of(user, host)
        if not groups:
            raise Refused(f"{command}: refused: {caller} is in no access group of this lock")
        return groups

    def _operator(self, caller: str, command: str) -> None:
        user, _, host = caller.rpartition("@")
        if not any(g.operator for g in self.config.groups_of(user, host)):
            raise Refused(f"{command}: refused: only operators may do this "
                          f"({caller} is in no operator group)")

    def _disabled_text(self, state: LockState) -> str:
        return f"lock is disabled ({state.reason})"

    def _acquire(self, state: LockState, caller: str, text: str, now: float) -> Outcome:
        req = parse_session_request(text, "Acquire", lease_max=self.config.lease_max,
                                    allowed=("session", "lease", "note"))
        self._member(caller, "Acquire")
        if state.mode == DISABLED:
            raise Refused(f"Acquire: refused: {self._disabled_text(state)}")
        if state.mode == HELD:
            if state.owner == caller and state.session == req.session:
                return self._extend(state, req.lease, req.note, now, "renewed",
                                    "Acquire")
            mine = " (by you, under another session)" if state.owner == caller else ""
            raise Refused(f"Acquire: refused: lock is {self.holder_text(state, now)}{mine}")
        lease = req.lease if req.lease is not None else self.config.lease_default
        new = LockState(HELD, caller, req.session, req.note or "", state.token + 1,
                        now + lease, lease)
        event = Event(now, "acquired", caller, req.session, new.token,
                      f"lease={lease:g}s" + (f" note={req.note!r}" if req.note else ""))
        return Outcome(new, (event,),
                       f"granted to {caller} (session {req.session}), token {new.token}, "
                       f"until {utc(new.expiry)} ({lease:g} s)")

    def _extend(self, state: LockState, lease: float | None, note: str | None,
                now: float, kind: str, command: str) -> Outcome:
        lease = lease if lease is not None else (state.lease or self.config.lease_default)
        new = dataclasses.replace(state, expiry=now + lease, lease=lease,
                                  note=state.note if note is None else note)
        event = Event(now, kind, state.owner, state.session, state.token, f"lease={lease:g}s")
        return Outcome(new, (event,),
                       f"{command}: renewed for {state.owner} (session {state.session}), "
                       f"token {state.token}, until {utc(new.expiry)} ({lease:g} s)")

    def _check_holder(self, state: LockState, caller: str, session: str, command: str,
                      now: float) -> None:
        if state.mode == DISABLED:
            raise Refused(f"{command}: refused: {self._disabled_text(state)}")
        if state.mode == FREE:
            what = ("nothing to release" if command == "Release" else
                    "acquire it again (a lease that ran out cannot be renewed)")
            raise Refused(f"{command}: refused: the lock is not held (it is Free): {what}")
        if state.owner != caller or state.session != session:
            raise Refused(f"{command}: refused: you ({caller}, session {session}) do not hold "
                          f"the lock; it is {self.holder_text(state, now)}")

    def _renew(self, state: LockState, caller: str, text: str, now: float) -> Outcome:
        req = parse_session_request(text, "Renew", lease_max=self.config.lease_max,
                                    allowed=("session", "lease"))
        self._check_holder(state, caller, req.session, "Renew", now)
        return self._extend(state, req.lease, None, now, "renewed", "Renew")

    def _release(self, state: LockState, caller: str, text: str, now: float) -> Outcome:
        req = parse_session_request(text, "Release", lease_max=self.config.lease_max,
                                    allowed=("session",))
        self._check_holder(state, caller, req.session, "Release", now)
        event = Event(now, "released", caller, state.session, state.token)
        return Outcome(LockState(token=state.token), (event,),
                       f"released by {caller} (session {state.session}, token {state.token})")

    def _forcerelease(self, state: LockState, caller: str, text: str, now: float) -> Outcome:
        reason = parse_reason(text, "ForceRelease", required=True)
        self._operator(caller, "ForceRelease")
        if state.mode != HELD:
            raise Refused(f"ForceRelease: refused: the lock is not held (it is {state.mode})")
        event = Event(now, "force-released", caller, state.session, state.token,
                      f"holder={state.owner} reason={reason!r}")
        return Outcome(LockState(token=state.token), (event,),
                       f"force-released by {caller}: took the lock from {state.owner} "
                       f"(session {state.session}, token {state.token}); reason: {reason}")

    def _disable(self, state: LockState, caller: str, text: str, now: float) -> Outcome:
        reason = parse_reason(text, "Disable", required=True)
        self._operator(caller, "Disable")
        if state.mode == DISABLED:
            raise Refused(f"Disable: refused: the lock is already disabled ({state.reason})")
        events = []
        if state.mode == HELD:
            events.append(Event(now, "force-released", caller, state.session, state.token,
                                f"holder={state.owner} reason={('disabled: ' + reason)!r}"))
        why = f"by {caller}: {reason}"
        events.append(Event(now, "disabled", caller, "", state.token, f"reason={reason!r}"))
        taken = f"; took the lock from {state.owner}" if state.mode == HELD else ""
        return Outcome(LockState(DISABLED, token=state.token, reason=why), tuple(events),
                       f"disabled {why}{taken}")

    def _enable(self, state: LockState, caller: str, text: str, now: float) -> Outcome:
        reason = parse_reason(text, "Enable", required=False)
        self._operator(caller, "Enable")
        if state.mode != DISABLED:
            raise Refused(f"Enable: refused: the lock is not disabled (it is {state.mode})")
        event = Event(now, "enabled", caller, "", state.token,
                      f"reason={reason!r}" if reason else "")
        return Outcome(LockState(token=state.token), (event,),
                       f"enabled by {caller}" + (f": {reason}" if reason else ""))
