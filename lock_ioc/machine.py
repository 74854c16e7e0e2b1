"""The lock as a pure state machine: no I/O, no clock of its own.

Every method takes the current state, the caller's CA identity, the raw command text
and ``now`` (POSIX seconds), and returns an :class:`Outcome` (the next state, the
events to log, the message to publish) or raises :class:`Refused`. The IOC persists an
outcome before it publishes it; tests and benchmarks drive this class directly.

Requests wait in one line, kept in :attr:`LockState.waiters` (so a grant and the line
are one durable row). *First in line* is the earliest request of the highest authority
(:meth:`LockMachine.ordered`); the lock grants on its own only to the first in line:

* a Free lock whose first in line asked for ``auto`` goes to them at once (after a
  release, an expiry, a force-release, a withdrawal or a lapse);
* a lock held at a lower authority than the first in line goes to them at once, unless
  the holder runs a declared task (an unattended group's holder, the queue's plan): then
  ``YieldTo`` names them and the holder hands over at the task's end;
* a Free lock with waiters is reserved: only the first in line (or a higher authority)
  may Acquire it.

A holder may also hand the lock to any waiter it names (Handover): new token, new owner,
in one step.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json

from .config import Config
from .contract import BY_SUFFIX, COMMANDS, STATES
from .requests import (Refused, SessionRequest, decode, parse_handover, parse_reason,
                       parse_session_request)

FREE, HELD, DISABLED = STATES
#: Command PVs whose text the machine interprets (``Ping`` is not one of them).
TEXT_COMMANDS = tuple(c for c in COMMANDS if BY_SUFFIX[c].kind == "text")
#: Most requests that may wait at once (they all fit ``$(P)Waiters``).
MAX_WAITERS = 8
#: ``$(P)HolderIndex`` values other than a user's index.
FREE_INDEX, DISABLED_INDEX, UNKNOWN_INDEX = 0, -1, -2


@dataclasses.dataclass(frozen=True)
class Waiter:
    """A request waiting for the lock; it lapses at ``expiry`` unless renewed."""

    who: str               # "user@host"
    session: str
    note: str = ""
    since: float = 0.0     # when the request was first made (its place in line)
    expiry: float = 0.0    # when it lapses
    lease: float = 0.0     # its lease, and the lease of the grant it becomes
    auto: bool = True      # take a released lock at once (else wait for Acquire/Handover)

    def is_(self, who: str, session: str) -> bool:
        return self.who == who and self.session == session


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
    acquired: float = 0.0  # when the current grant (token) began; 0 when not held
    task: str = ""         # the holder's declared running task (unattended groups only)
    waiters: tuple[Waiter, ...] = ()  # in order of arrival

    def remaining(self, now: float) -> float:
        return max(0.0, self.expiry - now) if self.mode == HELD else 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LockState":
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        wfields = {f.name for f in dataclasses.fields(Waiter)}
        values["waiters"] = tuple(Waiter(**{k: v for k, v in w.items() if k in wfields})
                                  for w in values.get("waiters", ()))
        return cls(**values)

    def vacated(self) -> "LockState":
        """Free, keeping the token and the line."""
        return LockState(token=self.token, waiters=self.waiters)


@dataclasses.dataclass(frozen=True)
class Event:
    time: float
    kind: str     # acquired, renewed, released, expired, force-released, disabled, enabled,
                  # requested, request-renewed, withdrawn, request-lapsed, request-dropped,
                  # handed-over, preempted
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
    """Rules of the lock, parameterised by the config (groups, authority, lease limits)."""

    def __init__(self, config: Config):
        self.config = config

    # ---- who ------------------------------------------------------------------------
    def authority(self, who: str) -> int | None:
        """Authority of ``user@host`` (the highest of its groups); None: in no group."""
        user, _, host = who.rpartition("@")
        return self.config.authority_of(user, host)

    def authority_text(self, who: str) -> str:
        """``staff (authority 20)``: the group that gives ``who`` its authority."""
        user, _, host = who.rpartition("@")
        groups = self.config.groups_of(user, host)
        if not groups:
            return "no group"
        top = max(groups, key=lambda g: g.authority)
        return f"{top.name} (authority {top.authority})"

    def _level(self, who: str) -> float:
        level = self.authority(who)
        return float("-inf") if level is None else level

    def ordered(self, state: LockState) -> tuple[Waiter, ...]:
        """The waiters, first in line first: highest authority, then earliest request."""
        indexed = list(enumerate(state.waiters))
        indexed.sort(key=lambda iw: (-self._level(iw[1].who), iw[0]))
        return tuple(w for _, w in indexed)

    def head(self, state: LockState) -> Waiter | None:
        line = self.ordered(state)
        return line[0] if line else None

    # ---- derived views --------------------------------------------------------
    def gates(self, state: LockState) -> dict[str, int]:
        """1 for each group the lock admits in this state (see ``$(P)Gate:<group>``)."""
        if state.mode == FREE:
            return {g.name: 1 for g in self.config.groups}
        if state.mode == DISABLED:
            return {g.name: int(g.operator) for g in self.config.groups}
        user, _, host = state.owner.rpartition("@")
        return {g.name: int(g.admits(user, host)) for g in self.config.groups}

    def holder_index(self, state: LockState) -> int:
        """``$(P)HolderIndex``: 0 Free, the holder's user index, -1 Disabled, -2 unknown."""
        if state.mode == FREE:
            return FREE_INDEX
        if state.mode == DISABLED:
            return DISABLED_INDEX
        return self.config.user_index(state.owner.rpartition("@")[0]) or UNKNOWN_INDEX

    def yield_to(self, state: LockState) -> str:
        """``$(P)YieldTo``: the first in line, if the holder's task defers their grant."""
        head = self.head(state)
        if state.mode == HELD and state.task and head is not None \
                and self._level(head.who) > self._level(state.owner):
            return head.who
        return ""

    def waiters_json(self, state: LockState) -> str:
        """``$(P)Waiters``: the line as JSON, first in line first."""
        out = []
        for w in self.ordered(state):
            user, _, host = w.who.rpartition("@")
            groups = self.config.groups_of(user, host)
            top = max(groups, key=lambda g: g.authority) if groups else None
            out.append({"who": w.who, "session": w.session, "note": w.note,
                        "since": w.since, "expiry": w.expiry, "lease": w.lease,
                        "auto": w.auto, "authority": top.authority if top else None,
                        "group": top.name if top else ""})
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))

    def holder_text(self, state: LockState, now: float) -> str:
        note = f", note {state.note!r}" if state.note else ""
        return (f"held by {state.owner} (session {state.session}{note}), token {state.token}, "
                f"until {utc(state.expiry)} ({state.remaining(now):.0f} s left)")

    def deadline(self, state: LockState) -> float | None:
        """When :meth:`expire` next has something to do (a lease or a request ends)."""
        times = [w.expiry for w in state.waiters]
        if state.mode == HELD:
            times.append(state.expiry)
        return min(times) if times else None

    # ---- time -----------------------------------------------------------------
    def expire(self, state: LockState, now: float) -> Outcome | None:
        """Leases and requests that ran out, in the order they ran out: a lapsed request
        leaves the line; an expired lease frees the lock, and the lock grants what it
        grants on its own (:meth:`_settle`) as of that moment. None if nothing ran out."""
        events: tuple[Event, ...] = ()
        messages: list[str] = []
        while True:
            due = self.deadline(state)
            if due is None or now < due:
                break
            if state.mode == HELD and state.expiry == due:
                event = Event(now, "expired", state.owner, state.session, state.token,
                              f"lease ended {utc(state.expiry)}")
                message = (f"lease of {state.owner} (session {state.session}, token "
                           f"{state.token}) expired at {utc(state.expiry)}")
                state = state.vacated()
            else:
                gone = next(w for w in state.waiters if w.expiry == due)
                state = dataclasses.replace(
                    state, waiters=tuple(w for w in state.waiters if w is not gone))
                event = Event(now, "request-lapsed", gone.who, gone.session, state.token,
                              f"request not renewed, lapsed {utc(gone.expiry)}")
                message = (f"request of {gone.who} (session {gone.session}) lapsed at "
                           f"{utc(gone.expiry)} (not renewed)")
            step = self._settle(Outcome(state, (event,), message), now, at=due)
            state, events = step.state, events + step.events
            messages.append(step.message)
        if not events:
            return None
        return Outcome(state, events, "; ".join(messages))

    def _current(self, state: LockState, now: float) -> tuple[LockState, tuple[Event, ...]]:
        done = self.expire(state, now)
        return (done.state, done.events) if done else (state, ())

    # ---- granting -------------------------------------------------------------
    def _grant(self, state: LockState, who: str, session: str, note: str, lease: float,
               now: float, how: str, task: str = "", at: float | None = None
               ) -> tuple[LockState, Event]:
        """A new grant (token + 1) to ``who`` as of ``at`` (default ``now``); their
        requests leave the line."""
        at = now if at is None else at
        new = LockState(HELD, who, session, note, state.token + 1, at + lease, lease,
                        acquired=at, task=task,
                        waiters=tuple(w for w in state.waiters if w.who != who))
        detail = f"lease={lease:g}s" + (f" note={note!r}" if note else "") + \
            (f" {how}" if how else "")
        return new, Event(now, "acquired", who, session, new.token, detail)

    def _grant_message(self, state: LockState) -> str:
        return (f"granted to {state.owner} (session {state.session}), token {state.token}, "
                f"until {utc(state.expiry)} ({state.lease:g} s)")

    def _settle(self, out: Outcome, now: float, at: float | None = None) -> Outcome:
        """Grants the lock makes on its own after any change (see the module doc):
        a Free lock to an ``auto`` first in line; a lock held at a lower authority
        without a running task to the first in line."""
        state, head = out.state, self.head(out.state)
        if head is None:
            return out
        if state.mode == FREE and head.auto:
            how = "(first in line, the lock was free)"
        elif state.mode == HELD and not state.task \
                and self._level(head.who) > self._level(state.owner):
            how = (f"(higher authority than the holder {state.owner}: "
                   f"{self.authority_text(head.who)} over "
                   f"{self.authority_text(state.owner)})")
            preempt = Event(now, "preempted", head.who, head.session, state.token,
                            f"holder={state.owner} session={state.session} "
                            f"{self.authority_text(head.who)} over "
                            f"{self.authority_text(state.owner)}")
            out = Outcome(state, out.events + (preempt,), out.message)
        else:
            return out
        new, event = self._grant(state, head.who, head.session, head.note, head.lease, now,
                                 how, at=at)
        message = (out.message + "; " if out.message else "") + self._grant_message(new) + \
            " " + how
        return Outcome(new, out.events + (event,), message)

    def _first_in_line(self, state: LockState, who: str, session: str) -> bool:
        """Whether ``who`` may take a Free lock now: nobody waits, they are the first in
        line, or their authority is above everyone's in line."""
        head = self.head(state)
        return head is None or head.is_(who, session) or \
            self._level(who) > self._level(head.who)

    def _reserved_text(self, state: LockState) -> str:
        head = self.head(state)
        return (f"the lock is Free but reserved for {head.who} (session {head.session}), "
                f"first of {len(state.waiters)} waiting; ask with Request to wait in line")

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
            if pre:
                exc.message = self._lapsed_hint(exc.message, pre, caller)
            exc.pending = Outcome(state, pre, exc.message) if pre else None
            raise
        out = self._settle(out, now)
        return Outcome(out.state, pre + out.events, out.message)

    @staticmethod
    def _lapsed_hint(message: str, pre: tuple[Event, ...], caller: str) -> str:
        """Say so when a refusal concerns a request that has just lapsed."""
        if not message.startswith(("Handover:", "Withdraw:")):
            return message
        for e in pre:
            if e.kind == "request-lapsed" and (e.who == caller or e.who in message
                                               or e.who.rpartition("@")[0] in message):
                return f"{message} (the request of {e.who}, session {e.session}, lapsed: " \
                       f"{e.detail})"
        return message

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

    def _check_task(self, caller: str, req: SessionRequest, command: str) -> None:
        if req.task:
            user, _, host = caller.rpartition("@")
            if not self.config.is_unattended(user, host):
                names = [g.name for g in self.config.groups if g.unattended]
                which = f" ({', '.join(names)})" if names else " (the config marks none)"
                raise Refused(f"{command}: refused: only holders of an unattended group"
                              f"{which} may declare a task")

    def _acquire(self, state: LockState, caller: str, text: str, now: float) -> Outcome:
        req = parse_session_request(text, "Acquire", lease_max=self.config.lease_max,
                                    allowed=("session", "lease", "note", "task"))
        self._member(caller, "Acquire")
        self._check_task(caller, req, "Acquire")
        if state.mode == DISABLED:
            raise Refused(f"Acquire: refused: {self._disabled_text(state)}")
        if state.mode == HELD:
            if state.owner == caller and state.session == req.session:
                return self._extend(state, req.lease, req.note, now, "renewed",
                                    "Acquire", req.task)
            mine = " (by you, under another session)" if state.owner == caller else ""
            raise Refused(f"Acquire: refused: lock is {self.holder_text(state, now)}{mine}")
        if not self._first_in_line(state, caller, req.session):
            raise Refused(f"Acquire: refused: {self._reserved_text(state)}")
        lease = req.lease if req.lease is not None else self.config.lease_default
        new, event = self._grant(state, caller, req.session, req.note or "", lease, now, "",
                                 req.task or "")
        return Outcome(new, (event,), self._grant_message(new))

    def _extend(self, state: LockState, lease: float | None, note: str | None,
                now: float, kind: str, command: str, task: str | None = None) -> Outcome:
        lease = lease if lease is not None else (state.lease or self.config.lease_default)
        new = dataclasses.replace(state, expiry=now + lease, lease=lease,
                                  note=state.note if note is None else note,
                                  task=state.task if task is None else task)
        event = Event(now, kind, state.owner, state.session, state.token, f"lease={lease:g}s")
        return Outcome(new, (event,),
                       f"{command}: renewed for {state.owner} (session {state.session}), "
                       f"token {state.token}, until {utc(new.expiry)} ({lease:g} s)")

    def _check_holder(self, state: LockState, caller: str, session: str, command: str,
                      now: float) -> None:
        if state.mode == DISABLED:
            raise Refused(f"{command}: refused: {self._disabled_text(state)}")
        if state.mode == FREE:
            what = {"Release": "nothing to release", "Handover": "nothing to hand over"}.get(
                command, "acquire it again (a lease that ran out cannot be renewed)")
            raise Refused(f"{command}: refused: the lock is not held (it is Free): {what}")
        if state.owner != caller or state.session != session:
            raise Refused(f"{command}: refused: you ({caller}, session {session}) do not hold "
                          f"the lock; it is {self.holder_text(state, now)}")

    def _renew(self, state: LockState, caller: str, text: str, now: float) -> Outcome:
        req = parse_session_request(text, "Renew", lease_max=self.config.lease_max,
                                    allowed=("session", "lease", "task"))
        self._check_holder(state, caller, req.session, "Renew", now)
        self._check_task(caller, req, "Renew")
        return self._extend(state, req.lease, None, now, "renewed", "Renew", req.task)

    def _waiting_text(self, state: LockState) -> str:
        return ",".join(w.who + "/" + w.session for w in self.ordered(state))

    def _release(self, state: LockState, caller: str, text: str, now: float) -> Outcome:
        req = parse_session_request(text, "Release", lease_max=self.config.lease_max,
                                    allowed=("session",))
        self._check_holder(state, caller, req.session, "Release", now)
        waiting = f"waiting={self._waiting_text(state)}" if state.waiters else ""
        event = Event(now, "released", caller, state.session, state.token, waiting)
        told = f"; {len(state.waiters)} waiting, first {self.head(state).who}" \
            if state.waiters else ""
        return Outcome(state.vacated(), (event,),
                       f"released by {caller} (session {state.session}, token {state.token})"
                       f"{told}")

    def _forcerelease(self, state: LockState, caller: str, text: str, now: float) -> Outcome:
        reason = parse_reason(text, "ForceRelease", required=True)
        self._operator(caller, "ForceRelease")
        if state.mode != HELD:
            raise Refused(f"ForceRelease: refused: the lock is not held (it is {state.mode})")
        event = Event(now, "force-released", caller, state.session, state.token,
                      f"holder={state.owner} reason={reason!r}")
        return Outcome(state.vacated(), (event,),
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
        return Outcome(LockState(DISABLED, token=state.token, reason=why,
                                 waiters=state.waiters), tuple(events),
                       f"disabled {why}{taken}")

    def _enable(self, state: LockState, caller: str, text: str, now: float) -> Outcome:
        reason = parse_reason(text, "Enable", required=False)
        self._operator(caller, "Enable")
        if state.mode != DISABLED:
            raise Refused(f"Enable: refused: the lock is not disabled (it is {state.mode})")
        event = Event(now, "enabled", caller, "", state.token,
                      f"reason={reason!r}" if reason else "")
        return Outcome(state.vacated(), (event,),
                       f"enabled by {caller}" + (f": {reason}" if reason else ""))

    # ---- requests and hand-over ---------------------------------------------------
    def _place_text(self, state: LockState, who: str, session: str) -> str:
        line = self.ordered(state)
        place = next(i for i, w in enumerate(line, 1) if w.is_(who, session))
        ahead = f", after {line[0].who}" if place > 1 else ""
        return f"place {place} of {len(line)}{ahead}"

    def _request(self, state: LockState, caller: str, text: str, now: float) -> Outcome:
        req = parse_session_request(text, "Request", lease_max=self.config.lease_max,
                                    allowed=("session", "lease", "note", "auto"))
        self._member(caller, "Request")
        mine = next((w for w in state.waiters if w.is_(caller, req.session)), None)
        if state.mode == DISABLED and mine is None:
            raise Refused(f"Request: refused: {self._disabled_text(state)}")
        if state.mode == HELD and state.owner == caller:
            what = ("renew it (Renew) instead" if state.session == req.session else
                    f"under session {state.session}: release it or hand it over first")
            raise Refused(f"Request: refused: you ({caller}) hold the lock; {what}")
        if mine is not None:
            lease = req.lease if req.lease is not None else mine.lease
            new_w = dataclasses.replace(
                mine, expiry=now + lease, lease=lease,
                note=mine.note if req.note is None else req.note,
                auto=mine.auto if req.auto is None else req.auto)
            kind = "request-renewed"
        else:
            if len(state.waiters) >= MAX_WAITERS:
                raise Refused(f"Request: refused: {len(state.waiters)} requests are waiting "
                              f"already, the most this lock keeps; try again later")
            lease = req.lease if req.lease is not None else self.config.lease_default
            new_w = Waiter(caller, req.session, req.note or "", now, now + lease, lease,
                           True if req.auto is None else req.auto)
            kind = "requested"
        waiters = tuple(new_w if w is mine else w for w in state.waiters)
        if mine is None:
            waiters += (new_w,)
        queued = dataclasses.replace(state, waiters=waiters)
        if state.mode == FREE and self._first_in_line(state, caller, req.session):
            new, event = self._grant(queued, caller, req.session, new_w.note, lease, now,
                                     "(requested while free)")
            return Outcome(new, (event,), "Request: " + self._grant_message(new))
        detail = (f"lease={lease:g}s" + (f" note={new_w.note!r}" if new_w.note else "")
                  + ("" if new_w.auto else " auto=false")
                  + f" {self._place_text(queued, caller, req.session).split(',')[0]}")
        event = Event(now, kind, caller, req.session, state.token, detail)
        out = Outcome(queued, (event,), "")
        settled = self._settle(out, now)
        if settled.state.owner == caller and settled.state.mode == HELD:
            return Outcome(settled.state, settled.events,
                           "Request: " + settled.message)
        if state.mode == HELD:
            whom = f"the lock is {self.holder_text(state, now)}"
            if self.yield_to(queued) == caller:
                whom += f", running task {state.task!r}: it hands over to you at its end"
        elif state.mode == DISABLED:
            whom = self._disabled_text(state)
        else:
            whom = self._reserved_text(state).split(";")[0]
        verb = "renewed" if mine is not None else "waiting"
        how = ("it goes to you when released" if new_w.auto else
               "when it is yours to take, Acquire it")
        return Outcome(queued, (event,),
                       f"Request: {verb} for {caller} (session {req.session}), "
                       f"{self._place_text(queued, caller, req.session)}; {whom}; {how}; "
                       f"renew the request before {utc(new_w.expiry)} ({lease:g} s) "
                       f"or it lapses")

    def _withdraw(self, state: LockState, caller: str, text: str, now: float) -> Outcome:
        req = parse_session_request(text, "Withdraw", lease_max=self.config.lease_max,
                                    allowed=("session",))
        mine = next((w for w in state.waiters if w.is_(caller, req.session)), None)
        if mine is None:
            raise Refused(f"Withdraw: refused: you ({caller}, session {req.session}) have no "
                          f"request waiting")
        event = Event(now, "withdrawn", caller, req.session, state.token, "")
        return Outcome(dataclasses.replace(state, waiters=tuple(
            w for w in state.waiters if w is not mine)), (event,),
            f"Withdraw: {caller} (session {req.session}) left the line")

    def _handover(self, state: LockState, caller: str, text: str, now: float) -> Outcome:
        req = parse_handover(text, lease_max=self.config.lease_max)
        self._check_holder(state, caller, req.session, "Handover", now)
        target = self._handover_target(state, caller, req.to, req.to_session)
        # The lock would not stay with the target: say so rather than hand it on at once.
        level = self._level(target.who)
        above = [w for w in self.ordered(state) if self._level(w.who) > level]
        if above:
            raise Refused(f"Handover: refused: {above[0].who} ({self.authority_text(above[0].who)})"
                          f" waits too and would take the lock at once from {target.who} "
                          f"({self.authority_text(target.who)}); hand it over to "
                          f"{above[0].who}")
        if req.requeue and self._level(caller) > level:
            raise Refused(f"Handover: refused: with requeue you ({self.authority_text(caller)}) "
                          f"would take the lock back at once from {target.who} "
                          f"({self.authority_text(target.who)}); hand it over without requeue")
        events = [Event(now, "handed-over", caller, state.session, state.token,
                        f"to={target.who} to_session={target.session} token={state.token + 1}"
                        + (" requeued" if req.requeue else ""))]
        new, event = self._grant(state, target.who, target.session, target.note,
                                 target.lease, now,
                                 f"handed over by {caller} (session {state.session}, token "
                                 f"{state.token})")
        events.append(event)
        message = (f"Handover: {caller} (session {state.session}, token {state.token}) handed "
                   f"the lock to {target.who} (session {target.session}), token {new.token}, "
                   f"until {utc(new.expiry)} ({new.lease:g} s)")
        if req.requeue:
            lease = req.lease if req.lease is not None else \
                (state.lease or self.config.lease_default)
            back = Waiter(caller, state.session, state.note, now, now + lease, lease, True)
            new = dataclasses.replace(new, waiters=new.waiters + (back,))
            events.append(Event(now, "requested", caller, state.session, new.token,
                                f"lease={lease:g}s (requeued at the hand-over) "
                                f"{self._place_text(new, caller, state.session).split(',')[0]}"))
            message += f"; {caller} waits in line again ({self._place_text(new, caller, state.session)})"
        return Outcome(new, tuple(events), message)

    def _handover_target(self, state: LockState, caller: str, to: str,
                         to_session: str) -> Waiter:
        line = self.ordered(state)
        if not to:
            if not line:
                raise Refused("Handover: refused: nobody is waiting for the lock; "
                              "Release it instead")
            return line[0]
        user = caller.rpartition("@")[0]
        if to in (caller, user) and not to_session:
            raise Refused(f"Handover: refused: you ({caller}) hold the lock already; "
                          "hand it over to someone who waits for it")
        found = [w for w in line if (w.who == to or w.who.rpartition("@")[0] == to)
                 and (not to_session or w.session == to_session)]
        if not found:
            if to in (caller, user):
                raise Refused(f"Handover: refused: you ({caller}) hold the lock already; "
                              "hand it over to someone who waits for it")
            who = to + (f" (session {to_session})" if to_session else "")
            waiting = ", ".join(f"{w.who} (session {w.session})" for w in line) or "nobody"
            raise Refused(f"Handover: refused: {who} is not waiting for the lock "
                          f"(waiting: {waiting}); a request lapses unless renewed")
        if len(found) > 1:
            sessions = ", ".join(f"{w.who} session {w.session}" for w in found)
            raise Refused(f"Handover: refused: {to} matches several requests ({sessions}): "
                          "name one with to (user@host) and to_session")
        return found[0]
