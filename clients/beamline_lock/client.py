"""Python client of the beamline lock, over pyepics (libca, the reference CA client).

One CA monitor per lock state PV keeps a local view of the lock that is never polled;
waits (for a grant to show, for a busy lock to become Free) are driven by those
monitors. Every command is a CA put with callback whose completion status we read
ourselves (pyepics' own put-with-callback reports success even when the IOC refused),
then confirmed through the state PVs and the fencing token, so "granted" here means
the IOC's published state shows our grant.

The gate for ophyd devices calls :meth:`BeamlineLock.check_write_allowed`, which uses
only monitored values and the local clock: no CA traffic per write.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import logging
import math
import os
import pwd
import queue
import socket
import threading
import time
from collections import deque
from typing import Any, Callable

import epics
import numpy as np
from epics import ca, dbr

from lock_ioc import contract

log = logging.getLogger("beamline_lock")

FREE, HELD, DISABLED = contract.STATES
#: Without a Heartbeat update for this long (the IOC ticks every second), the lock
#: state is unknown and gated writes fail closed.
STALE_AFTER = 3.0
#: State PVs this client monitors (History is large and read on demand).
MONITORED = ("State", "Owner", "Session", "Note", "Token", "Expiry", "Remaining",
             "Message", "Heartbeat", "DisabledReason", "AcquiredAt", "WaiterCount",
             "Waiters", "YieldTo")
COMMANDS = tuple(c for c in contract.COMMANDS if contract.BY_SUFFIX[c].kind == "text")
ECA_NORMAL = dbr.ECA_NORMAL


# ---- errors ----------------------------------------------------------------------
class LockError(Exception):
    """Base of every error of the lock client."""


class LockUnavailable(LockError):
    """The lock IOC is unreachable or silent: the lock state is unknown."""


class LockRefused(LockError):
    """The lock IOC refused a command, or the lock does not allow this write."""


class LockHeld(LockRefused):
    """Someone else holds the lock; carries who, under which session, until when."""

    def __init__(self, message: str, *, owner: str = "", session: str = "", note: str = "",
                 expiry: float = 0.0, token: int = 0):
        super().__init__(message)
        self.owner, self.session, self.note = owner, session, note
        self.expiry, self.token = expiry, token


class LockDisabled(LockRefused):
    """The lock is Disabled by an operator (only operator groups may write)."""


class LockNotHeld(LockRefused):
    """This client does not hold the lock (it is Free, or held under another session)."""


class LockLost(LockError):
    """This client held the lock and lost it (lease ran out, taken over, force-released)."""


class RequestLapsed(LockRefused):
    """This client's request left the line without a grant (not renewed in time)."""


@dataclasses.dataclass(frozen=True)
class Waiter:
    """A request waiting for the lock, as ``$(P)Waiters`` lists it (first in line first)."""

    who: str
    session: str
    note: str = ""
    since: float = 0.0       # POSIX seconds: when the request was made
    expiry: float = 0.0      # POSIX seconds: when it lapses unless renewed
    lease: float = 0.0
    auto: bool = True        # takes a released lock at once
    authority: int | None = None
    group: str = ""

    def waiting(self, now: float | None = None) -> float:
        """Seconds this request has waited."""
        return max(0.0, (time.time() if now is None else now) - self.since)

    def line(self, place: int, now: float | None = None) -> str:
        """``1. bob@ws2 session=edge staff (authority 20), waiting 12 s, ...``"""
        now = time.time() if now is None else now
        level = f" (authority {self.authority})" if self.authority is not None else ""
        note = f", note {self.note!r}" if self.note else ""
        auto = "takes it when released" if self.auto else "waits to be handed it"
        return (f"{place}. {self.who} session={self.session} {self.group}{level}, waiting "
                f"{self.waiting(now):.0f} s, {auto}, request lapses in "
                f"{max(0.0, self.expiry - now):.0f} s{note}")


def parse_waiters(text: str) -> tuple[Waiter, ...]:
    """``$(P)Waiters`` (JSON) as :class:`Waiter` objects; () for anything unreadable."""
    try:
        items = json.loads(text) if text else []
        fields = {f.name for f in dataclasses.fields(Waiter)}
        return tuple(Waiter(**{k: v for k, v in item.items() if k in fields})
                     for item in items)
    except (ValueError, TypeError, AttributeError):
        return ()


# ---- values --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LockStatus:
    """The lock as this client's monitors last saw it."""

    state: str = "unknown"     # Free / Held / Disabled, "unknown" when not connected
    owner: str = ""
    session: str = ""
    note: str = ""
    token: int = 0
    expiry: float = 0.0        # POSIX seconds, 0 when not held
    remaining: float = 0.0     # seconds left on the lease, from the IOC
    connected: bool = False    # all monitored PVs connected and heartbeat fresh
    message: str = ""
    disabled_reason: str = ""
    heartbeat_age: float = math.inf
    held_by_me: bool = False
    lost: str = ""             # why this client lost its grant ("" if not lost)
    event: str = ""            # what changed: a PV suffix, "connection", "lost", "granted"
    acquired_at: float = 0.0   # POSIX seconds the current grant began (0 when not held)
    waiters: tuple[Waiter, ...] = ()   # first in line first
    yield_to: str = ""         # a higher-authority waiter the holder's task yields to

    def describe(self) -> str:
        """One line a person understands."""
        if not self.connected:
            return "lock state unknown (lock IOC unreachable or silent)"
        if self.state == HELD:
            text = holder_text(self.owner, self.session, self.note, self.token, self.expiry,
                               self.remaining)
            if self.waiters:
                text += f"; {len(self.waiters)} waiting, first {self.waiters[0].who}"
            return text
        if self.state == DISABLED:
            return f"Disabled ({self.disabled_reason}), token {self.token}"
        return f"Free, token {self.token}"


@dataclasses.dataclass
class _Grant:
    session: str
    token: int
    lease: float
    deadline: float  # time.monotonic() by which the lease surely ended (conservative)


@dataclasses.dataclass
class _Request:
    session: str
    token: int       # the lock's token when we asked: a grant to us is a later one
    lease: float
    deadline: float  # time.monotonic() by which the request surely lapsed


def ca_identity() -> str:
    """``user@host`` as libca sends it (getpwuid(getuid()) and gethostname())."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        import getpass
        user = getpass.getuser()
    return f"{user}@{socket.gethostname()}"


def until_text(expiry: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(expiry)) if expiry else "-"


def holder_text(owner: str, session: str, note: str, token: int, expiry: float,
                remaining: float) -> str:
    note_text = f", note {note!r}" if note else ""
    return (f"held by {owner} (session {session}{note_text}), token {token}, "
            f"until {until_text(expiry)} ({remaining:.0f} s left)")


def _text(value: Any) -> str:
    """A CHAR-array value from pyepics (array, scalar or None) as UTF-8 text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    data = np.atleast_1d(np.asarray(value)).astype(np.uint8).tobytes()
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")


# ---- put with callback, reading the CA status ------------------------------------------
class _PutWait:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.status: int | None = None


_INFLIGHT: set[_PutWait] = set()  # keeps the py_object alive until libca calls back


def _on_put(args) -> None:
    waiter = args.usr
    waiter.status = int(args.status)
    _INFLIGHT.discard(waiter)
    waiter.done.set()


_CB_PUT = dbr.make_callback(_on_put, dbr.event_handler_args)


def _put_text(pv: epics.PV, text: str, timeout: float) -> int | None:
    """CA put-with-callback of UTF-8 text; the CA status, or None if no reply in time."""
    data = text.encode("utf-8") + b"\0"
    count = min(len(data), ca.element_count(pv.chid))
    return put_callback(pv, dbr.CHAR, (ctypes.c_ubyte * count)(*data[:count]), timeout)


def put_callback(pv: epics.PV, dbr_type: int, buf: ctypes.Array, timeout: float
                 ) -> int | None:
    """CA put-with-callback of ``buf`` (a ctypes array of ``dbr_type``) that waits for
    the reply without polling; the CA status, or None if no reply in time."""
    ca.use_initial_context()
    count = len(buf)
    waiter = _PutWait()
    _INFLIGHT.add(waiter)
    ret = ca.libca.ca_array_put_callback(dbr_type, count, pv.chid, buf, _CB_PUT,
                                         ctypes.py_object(waiter))
    if ret != ECA_NORMAL:
        _INFLIGHT.discard(waiter)
        raise LockUnavailable(f"cannot send the command to {pv.pvname}: "
                              f"{ca.message(ret)}")
    ca.flush_io()
    waiter.done.wait(timeout)
    return waiter.status


class _Monitor:
    """One monitored lock PV: a libca subscription whose updates are decoded here.

    pyepics' ``PV`` turns each update into a dictionary of metadata, a numpy array and a
    round of its own callbacks (50-100 us per update, and a command brings about eight,
    all delivered before the command's put completes); the client needs only the value.
    So one ctypes call reads the value from the DBR libca hands over. The channel is
    pyepics' (shared with any other user of the name in this process), as is its
    connection callback; libca reinstalls the subscription itself after a reconnect.
    """

    #: (DBR type, decoder of the value in a DBR at an address with its element count).
    #: The TIME types: a plain DBR_CHAR update of an empty text has no payload, which
    #: libca takes for the end of the subscription; and other pyepics clients (ophyd)
    #: ask for these too, so the IOC encodes an update once for all of them.
    KINDS: dict[str, tuple[int, Callable[[int, int], Any]]] = {
        "enum": (dbr.TIME_ENUM, lambda addr, n: ctypes.c_uint16.from_address(
            addr + dbr.time_enum.value.offset).value),
        "long": (dbr.TIME_LONG, lambda addr, n: ctypes.c_int32.from_address(
            addr + dbr.time_long.value.offset).value),
        "double": (dbr.TIME_DOUBLE, lambda addr, n: ctypes.c_double.from_address(
            addr + dbr.time_double.value.offset).value),
        "text": (dbr.TIME_CHAR, lambda addr, n: ctypes.string_at(
            addr + dbr.time_char.value.offset, n).split(b"\0", 1)[0].decode(
            "utf-8", "replace")),
    }

    def __init__(self, pvname: str, kind: str, on_value: Callable[[Any], None],
                 on_connection: Callable[..., None]):
        self.pvname = pvname
        self.connected = False
        self._on_connection = on_connection
        dbr_type, decode = self.KINDS[kind]
        self._usr = ctypes.py_object((decode, on_value))  # kept while subscribed
        self._evid = ctypes.c_void_p()
        self.chid = ca.create_channel(pvname, connect=False, auto_cb=False,
                                      callback=self._on_conn)
        # Count 0: the server's current length (a text PV sends only its text).
        ret = ca.libca.ca_create_subscription(dbr_type, 0, self.chid, _MONITOR_MASK,
                                              _CB_MONITOR, self._usr,
                                              ctypes.byref(self._evid))
        if ret != ECA_NORMAL:
            raise LockUnavailable(f"cannot monitor {pvname}: {ca.message(ret)}")
        ca.flush_io()

    def _on_conn(self, pvname: str = "", conn: bool = False, **kwargs: Any) -> None:
        self.connected = bool(conn)
        if conn:
            # libca may keep the subscription request queued until this process next
            # flushes: a client that only listens (lockctl watch) would never get a value.
            ca.flush_io()
        self._on_connection(pvname=pvname, conn=conn)

    def close(self) -> None:
        ca.use_initial_context()
        ca.clear_subscription(self._evid)
        entry = ca._cache[ca.current_context()].get(self.pvname)
        if entry is not None and self._on_conn in entry.callbacks:
            entry.callbacks.remove(self._on_conn)
        self.connected = False


def _on_monitor(args) -> None:
    """libca's monitor callback: decode the value, hand it to the client."""
    if args.status != ECA_NORMAL or not args.raw_dbr:
        return
    decode, on_value = args.usr
    on_value(decode(args.raw_dbr, args.count))


_CB_MONITOR = dbr.make_callback(_on_monitor, dbr.event_handler_args)
_MONITOR_MASK = dbr.DBE_VALUE | dbr.DBE_ALARM


# ---- the client --------------------------------------------------------------------------
class BeamlineLock:
    """Client of the lock IOC at ``prefix``, acting as this process's CA identity.

    ``session``: the session this client acquires and renews under (and whose holds it
    accepts as its own). ``timeout``: seconds allowed for a command to be answered and
    confirmed. ``lease``: default lease for :meth:`acquire` and the context manager
    (None: the IOC's default). ``allow_free_writes``: whether gated devices may be
    written while the lock is Free (default False: a process must hold the lock).
    """

    def __init__(self, prefix: str = "BL:LOCK:", session: str | None = None, *,
                 timeout: float = 5.0, lease: float | None = None,
                 allow_free_writes: bool = False, connect_timeout: float | None = None,
                 identity: str | None = None):
        self.prefix = prefix
        self.session = session
        self.timeout = timeout
        self.lease = lease
        self.allow_free_writes = allow_free_writes
        self.identity = identity or ca_identity()
        self._cond = threading.Condition()
        self._values: dict[str, Any] = {s: None for s in MONITORED}
        self._fresh: set[str] = set()   # PVs that delivered a value since they connected
        self._hb_time = -math.inf       # time.monotonic() of the last Heartbeat update
        self._messages: deque[tuple[int, str]] = deque(maxlen=64)  # (seq, Message) seen
        self._msg_seq = 0
        self._grant: _Grant | None = None
        self._request: _Request | None = None
        self._handing_over = False
        self._lost = ""
        self._callbacks: dict[int, Callable[[LockStatus], None]] = {}
        self._next_cb = 0
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._keepalive: _KeepAlive | None = None
        self._closed = False
        # Plain attributes read by the gate without taking the lock.
        self._state: str | None = None
        self._owner = self._session = ""
        self._token = -1
        self._connected = False
        self._dispatcher = threading.Thread(target=self._dispatch, daemon=True,
                                            name=f"beamline-lock-callbacks {prefix}")
        self._dispatcher.start()
        self._aux: dict[str, epics.PV] = {}  # command PVs and PVs read on demand
        self._pvs: dict[str, _Monitor] = {}
        if ca.libca is None:
            ca.initialize_libca()
        ca.use_initial_context()
        for suffix in MONITORED:
            self._pvs[suffix] = _Monitor(
                prefix + suffix, contract.BY_SUFFIX[suffix].kind,
                functools.partial(self._on_value, suffix), self._on_conn)
        self.wait_connected(timeout if connect_timeout is None else connect_timeout)

    # ---- monitors ----------------------------------------------------------------
    def _suffix(self, pvname: str) -> str:
        return pvname[len(self.prefix):]

    def _on_conn(self, pvname: str = "", conn: bool = False, **_: Any) -> None:
        suffix = self._suffix(pvname)
        with self._cond:
            if not conn:
                self._fresh.discard(suffix)
            self._update_connected()
            self._cond.notify_all()
        self._emit("connection")

    def _on_value(self, suffix: str, value: Any) -> None:
        """A monitor update (from libca's thread), its value decoded by its kind."""
        if suffix == "State":
            value = contract.STATES[value] if 0 <= value < len(contract.STATES) \
                else f"state {value}"
        with self._cond:
            self._values[suffix] = value
            self._fresh.add(suffix)
            if suffix == "Heartbeat":
                self._hb_time = time.monotonic()
            elif suffix == "State":
                self._state = value
            elif suffix == "Owner":
                self._owner = value
            elif suffix == "Session":
                self._session = value
            elif suffix == "Token":
                self._token = value
            elif suffix == "Message":
                self._msg_seq += 1
                self._messages.append((self._msg_seq, value))
            self._update_connected()
            granted = self._check_request()
            self._check_grant()
            self._cond.notify_all()
        if suffix != "Heartbeat":
            self._emit(suffix)
        if granted:
            self._emit("granted")

    def _update_connected(self) -> None:
        """Caller holds the condition."""
        pvs = self._pvs
        self._connected = (len(self._fresh) == len(MONITORED) == len(pvs)
                           and all(pv.connected for pv in pvs.values()))

    def _grant_matches(self, grant: _Grant) -> bool:
        return (self._state == HELD and self._owner == self.identity
                and self._session == grant.session and self._token == grant.token)

    def _check_grant(self) -> None:
        """Mark our grant lost if the monitored state no longer shows it. Holds the cond."""
        grant = self._grant
        if grant is None or self._lost or not self._connected or self._handing_over \
                or self._grant_matches(grant):
            return
        self._set_lost_locked(self._lost_reason(grant))

    def _check_request(self) -> bool:
        """Our request became a grant (the lock gave it to us: a release, an expiry, a
        hand-over): take it as ours, as if acquired. Holds the cond; True if so."""
        req = self._request
        if req is None or not self._connected or self._state != HELD \
                or self._owner != self.identity or self._session != req.session \
                or self._token <= req.token:
            return False
        # Conservative: the grant began a moment before we saw it.
        left = min(req.lease, (self._values["Expiry"] or 0.0) - time.time()) - 0.5
        self._grant = _Grant(req.session, self._token, req.lease,
                             time.monotonic() + max(0.0, left))
        self._request, self._lost = None, ""
        self.session = req.session
        log.info("beamline lock: our request (session %s) was granted, token %d",
                 req.session, self._token)
        return True

    def _lost_reason(self, grant: _Grant) -> str:
        return f"our grant (session {grant.session}, token {grant.token}) ended: " \
               f"the lock is now {self._now_text()}"

    def _now_text(self) -> str:
        """The lock as the monitors show it, for messages (no I/O)."""
        if self._state == HELD:
            v = self._values
            return holder_text(self._owner, self._session, v["Note"] or "", self._token,
                               v["Expiry"] or 0.0, v["Remaining"] or 0.0)
        if self._state == DISABLED:
            return f"Disabled ({self._values['DisabledReason'] or ''}), token {self._token}"
        return f"{self._state}, token {self._token}"

    # ---- callbacks -----------------------------------------------------------------
    def add_callback(self, fn: Callable[[LockStatus], None]) -> int:
        """Call ``fn(status)`` on every change (from a dispatcher thread); returns an id."""
        with self._cond:
            self._next_cb += 1
            self._callbacks[self._next_cb] = fn
            return self._next_cb

    def remove_callback(self, cb_id: int) -> None:
        with self._cond:
            self._callbacks.pop(cb_id, None)

    def _emit(self, event: str) -> None:
        if self._callbacks:
            self._events.put(event)

    def _dispatch(self) -> None:
        """Run user callbacks outside libca's threads (they may do CA I/O themselves)."""
        while True:
            event = self._events.get()
            if event is None:
                return
            status = self.status(event)
            with self._cond:
                callbacks = list(self._callbacks.values())
            for fn in callbacks:
                try:
                    fn(status)
                except Exception:  # a broken callback must not stop the others
                    log.exception("beamline lock callback %r failed", fn)

    # ---- views ----------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """All monitored PVs connected with values, and the heartbeat fresh."""
        return self._connected and time.monotonic() - self._hb_time <= STALE_AFTER

    def wait_connected(self, timeout: float | None = None) -> bool:
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.connected:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    @property
    def held_by_me(self) -> bool:
        """This identity holds the lock under our session (and, if we acquired, our token)."""
        if not self.connected or self._lost:
            return False
        grant = self._grant
        if grant is not None:
            return self._grant_matches(grant) and time.monotonic() < grant.deadline
        return (self.session is not None and self._state == HELD
                and self._owner == self.identity and self._session == self.session)

    @property
    def lost(self) -> str:
        """Why our grant was lost ("" if it was not)."""
        return self._lost

    @property
    def token(self) -> int | None:
        """Fencing token of this client's grant, None if it holds none."""
        grant = self._grant
        return grant.token if grant else None

    @property
    def requesting(self) -> str | None:
        """The session of this client's request waiting in line, None if none."""
        req = self._request
        return req.session if req else None

    def waiters(self) -> tuple[Waiter, ...]:
        """The requests waiting for the lock, first in line first (monitored)."""
        return parse_waiters(self._values["Waiters"] or "")

    def status(self, event: str = "") -> LockStatus:
        with self._cond:
            v = dict(self._values)
            connected = self.connected
            age = time.monotonic() - self._hb_time
        return LockStatus(
            state=(v["State"] or "unknown") if connected else "unknown",
            owner=v["Owner"] or "", session=v["Session"] or "", note=v["Note"] or "",
            token=v["Token"] or 0, expiry=v["Expiry"] or 0.0, remaining=v["Remaining"] or 0.0,
            connected=connected, message=v["Message"] or "",
            disabled_reason=v["DisabledReason"] or "", heartbeat_age=age,
            held_by_me=self.held_by_me, lost=self._lost, event=event,
            acquired_at=v["AcquiredAt"] or 0.0, waiters=parse_waiters(v["Waiters"] or ""),
            yield_to=v["YieldTo"] or "")

    def history(self) -> list[str]:
        """The IOC's recent events, newest last (one CA read)."""
        return [line for line in self._read("History").splitlines() if line]

    # ---- the gate ---------------------------------------------------------------------
    def check_write_allowed(self, target: str = "") -> None:
        """Raise unless a gated write may go ahead now; monitored values only, no I/O.

        Allowed: this client holds the lock (its token is current and its lease cannot
        have run out), or this identity holds it under our session (acquired elsewhere,
        e.g. ``lockctl``), or the lock is Free and ``allow_free_writes``. Fails closed
        (:class:`LockUnavailable`) when the lock IOC is disconnected or silent.
        """
        grant = self._grant
        now = time.monotonic()
        # Fast path (a holder writing): plain attribute reads, no formatting.
        if (grant is not None and now < grant.deadline and self._connected
                and not self._lost and now - self._hb_time <= STALE_AFTER
                and self._token == grant.token and self._state == HELD
                and self._owner == self.identity and self._session == grant.session):
            return
        self._check_slow(target, grant, now)

    def _check_slow(self, target: str, grant: _Grant | None, now: float) -> None:
        what = f"{target}: write refused: " if target else "write refused: "
        if grant is not None and not self._lost and now >= grant.deadline:
            self._set_lost(f"our lease (session {grant.session}, token {grant.token}, "
                           f"{grant.lease:g} s) ran out before it was renewed")
        if self._lost:
            raise self._lost_error(what)
        if not self._connected:
            raise LockUnavailable(f"{what}the lock state is unknown: lock IOC {self.prefix} "
                                  "is not connected")
        age = now - self._hb_time
        if age > STALE_AFTER:
            raise LockUnavailable(f"{what}the lock state is unknown: no heartbeat from lock "
                                  f"IOC {self.prefix} for {age:.1f} s")
        if grant is not None:
            if self._grant_matches(grant):
                return
            with self._cond:
                self._check_grant()
            raise self._lost_error(what)
        state = self._state
        if state == HELD:
            if self.session is not None and self._owner == self.identity \
                    and self._session == self.session:
                return
            raise self._held_error(what)
        if state == FREE:
            if self.allow_free_writes:
                return
            raise LockNotHeld(f"{what}the lock is Free and this process does not hold it; "
                              f"acquire it first (lockctl acquire SESSION)")
        raise LockDisabled(f"{what}the lock is disabled "
                           f"({self._values['DisabledReason'] or 'no reason given'})")

    def _lost_error(self, what: str) -> LockLost:
        now = self._now_text() if self._connected else "unknown"
        return LockLost(f"{what}this process lost the lock: {self._lost} "
                        f"[lock now: {now}]")

    def _held_error(self, what: str) -> LockHeld:
        v = self._values
        owner, session, note = self._owner, self._session, v["Note"] or ""
        expiry, remaining = v["Expiry"] or 0.0, v["Remaining"] or 0.0
        mine = " (that is you, under another session)" if owner == self.identity else ""
        held = holder_text(owner, session, note, self._token, expiry, remaining)
        return LockHeld(f"{what}lock is {held}{mine}", owner=owner, session=session,
                        note=note, expiry=expiry, token=self._token)

    def _set_lost(self, reason: str) -> None:
        with self._cond:
            self._set_lost_locked(reason)

    def _set_lost_locked(self, reason: str) -> None:
        if self._lost:
            return
        self._lost = reason
        self._cond.notify_all()
        log.warning("beamline lock lost: %s", reason)
        self._emit("lost")

    # ---- commands ----------------------------------------------------------------------
    def _aux_pv(self, suffix: str) -> epics.PV:
        """A PV of the lock that is not monitored (commands, History, LeaseDefault)."""
        pv = self._aux.get(suffix)
        if pv is None:
            pv = self._aux[suffix] = epics.PV(self.prefix + suffix, form="native",
                                              auto_monitor=False)
        if not pv.connected and not pv.wait_for_connection(self.timeout):
            raise LockUnavailable(f"lock IOC {self.prefix} unreachable: {pv.pvname} did not "
                                  f"connect within {self.timeout:g} s")
        return pv

    def _require_connected(self) -> None:
        if not self.wait_connected(self.timeout):
            raise LockUnavailable(f"lock IOC {self.prefix} unreachable: the lock state is "
                                  f"unknown (no answer within {self.timeout:g} s)")

    def _read(self, suffix: str) -> Any:
        """One CA read (not the monitor), so it is ordered after our own earlier put."""
        pv = self._aux_pv(suffix)
        # Explicit count: pyepics would reuse the length of the last monitor update.
        value = pv.get(count=ca.element_count(pv.chid), use_monitor=False,
                       timeout=self.timeout)
        if value is None:
            raise LockUnavailable(f"lock IOC {self.prefix} unreachable: no answer reading "
                                  f"{pv.pvname}")
        return _text(value) if contract.BY_SUFFIX[suffix].kind == "text" else value

    def _send(self, suffix: str, text: str) -> int:
        """Put a command; raise a classified error with the IOC's reason if refused.

        Returns a mark for :meth:`_confirm` (how many Message updates we had seen).
        """
        self._require_connected()
        mark = self._msg_seq
        status = _put_text(self._aux_pv(suffix), text, self.timeout)
        if status is None:
            raise LockUnavailable(f"lock IOC {self.prefix} did not answer the {suffix} "
                                  f"command within {self.timeout:g} s; lock state unknown")
        if status == ECA_NORMAL:
            return mark
        reason = self._read("Message")
        if not reason.startswith(f"{suffix}:") and "refused" not in reason:
            reason = f"{suffix}: refused ({ca.message(status)}); lock IOC said: {reason}"
        raise self._classify(reason)

    def _classify(self, reason: str) -> LockRefused:
        if "lock is held by" in reason or "do not hold the lock; it is held" in reason:
            v = self._values
            return LockHeld(reason, owner=self._owner, session=self._session,
                            note=v["Note"] or "", expiry=v["Expiry"] or 0.0, token=self._token)
        if "lock is disabled" in reason:
            return LockDisabled(reason)
        if "not held" in reason or "do not hold" in reason:
            return LockNotHeld(reason)
        return LockRefused(reason)

    def _confirm(self, mark: int, predicate: Callable[[], bool], what: str) -> None:
        """Wait until the monitors show the outcome of our command.

        The IOC writes ``Message`` after all state PVs of an outcome, so once our
        monitor delivered the message our command produced (read back right after
        the put), every state PV of that outcome has reached us too.
        """
        message = self._read("Message")

        def done() -> bool:
            seen = any(seq > mark and text == message for seq, text in self._messages)
            return seen and predicate()
        with self._cond:
            if not self._cond.wait_for(done, self.timeout):
                raise LockUnavailable(f"the lock IOC {self.prefix} accepted the command but its "
                                      f"state PVs did not show {what} within "
                                      f"{self.timeout:g} s; lock state unknown")

    def _shown(self, mark: int, predicate: Callable[[], bool]) -> bool:
        """Whether the monitors already show the outcome of our command, as the put
        completed: no CA read needed.

        The lock IOC sends the updates a command caused (state PVs, then Message) to the
        commanding client before, and in the same write as, the put's reply; our monitors
        share that circuit, and libca runs their callbacks in the order the messages came.
        So once a Message update has come since ``mark``, every state PV shows our
        command's outcome (or a later one), and ``predicate`` decides. Otherwise (an IOC
        that replies first) the caller confirms through reads, as :meth:`_confirm` does.
        """
        with self._cond:
            return self._msg_seq > mark and predicate()

    def _confirm_hold(self, mark: int, session: str, started: float, lease: float) -> _Grant:
        """After a granted Acquire/Renew: wait until the monitors show it; our grant."""
        if self._shown(mark, lambda: self._state == HELD and self._owner == self.identity
                       and self._session == session):
            return _Grant(session, self._token, lease, started + lease)
        token = int(self._read("Token"))
        owner, got_session = self._read("Owner"), self._read("Session")
        if owner != self.identity or got_session != session:
            raise LockError(f"granted, but the lock IOC shows owner {owner!r} session "
                            f"{got_session!r}, not {self.identity!r} session {session!r} "
                            "(is this client's CA identity different? pass identity=)")
        self._confirm(mark, lambda: (self._state == HELD and self._owner == self.identity
                                     and self._session == session and self._token == token),
                      f"our grant (token {token})")
        return _Grant(session, token, lease, started + lease)

    def _lease_default(self) -> float:
        if self.lease is not None:
            return self.lease
        return float(self._read("LeaseDefault"))

    def acquire(self, session: str | None = None, lease: float | None = None,
                note: str | None = None, wait: float | None = None, *,
                keep_alive: bool = False, task: str | None = None) -> LockStatus:
        """Acquire (or, if we hold it under this session, renew) the lock.

        ``wait``: seconds to wait for a held or disabled lock to become Free (woken by
        the State monitor), None to fail at once with :class:`LockHeld`.
        ``keep_alive``: renew in the background at a third of the lease until
        :meth:`release`. ``task``: the running task an unattended holder (the queue)
        declares ("" ends it): a higher-authority request then waits for its end.
        Returns the status showing our grant.
        """
        session = session or self.session
        if not session:
            raise ValueError("acquire needs a session name (BeamlineLock(session=...) or "
                             "acquire(session))")
        self._require_connected()
        # Always name the lease, so our local deadline is exactly what the IOC granted.
        lease = float(lease) if lease is not None else self._lease_default()
        body: dict[str, Any] = {"session": session, "lease": lease}
        if note is not None:
            body["note"] = note
        if task is not None:
            body["task"] = task
        text = json.dumps(body)
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            started = time.monotonic()
            try:
                mark = self._send("Acquire", text)
                break
            except (LockHeld, LockDisabled):
                if deadline is None or time.monotonic() >= deadline:
                    raise
                with self._cond:  # event-driven: the State monitor wakes us
                    self._cond.wait_for(lambda: self._state == FREE,
                                        max(0.0, deadline - time.monotonic()))
        grant = self._confirm_hold(mark, session, started, lease)
        with self._cond:
            self.session = session
            self._grant = grant
            self._lost = ""
        if keep_alive:
            self._start_keepalive()
        return self.status("acquired")

    def renew(self, lease: float | None = None, session: str | None = None) -> LockStatus:
        """Extend the lease to ``lease`` seconds from now (None: the current lease length).

        Raises :class:`LockLost` if this client held a grant and it is gone.
        """
        grant = self._grant
        session = session or (grant.session if grant else self.session)
        if not session:
            raise ValueError("renew needs a session name")
        if lease is None and grant is not None:
            lease = grant.lease
        # No lease and no grant of ours (held via lockctl, say): a bare renew, so the IOC
        # keeps the lease length it granted.
        text = session if lease is None else json.dumps({"session": session,
                                                         "lease": float(lease)})
        started = time.monotonic()
        try:
            mark = self._send("Renew", text)
        except LockRefused as exc:
            if grant is not None:
                self._set_lost(str(exc))
                raise LockLost(f"this process lost the lock: {exc}") from None
            raise
        if lease is None:  # Remaining is rounded up to whole seconds: stay on the safe side
            lease = max(0.5, float(self._read("Remaining")) - 1.0)
        new = self._confirm_hold(mark, session, started, float(lease))
        with self._cond:
            if grant is not None and new.token != grant.token:
                # Same identity and session, but a later grant (another process): not ours.
                self._set_lost_locked(f"our grant (token {grant.token}) ended; the lock was "
                                      f"granted again (token {new.token})")
                raise LockLost(f"this process lost the lock: {self._lost}")
            self._grant = new
            self._lost = ""  # same token: the IOC held it for us all along
            self.session = session
        return self.status("renewed")

    def release(self, session: str | None = None) -> LockStatus:
        """Release the lock; raise :class:`LockLost` if our grant had already ended."""
        self._stop_keepalive()
        with self._cond:
            grant, self._grant = self._grant, None
            lost, self._lost = self._lost, ""
        session = session or (grant.session if grant else self.session)
        if not session:
            raise ValueError("release needs a session name")
        try:
            mark = self._send("Release", session)
        except LockRefused as exc:
            if grant is not None:
                raise LockLost(f"this process had already lost the lock"
                               f"{': ' + lost if lost else ''} ({exc})") from None
            raise
        if not self._shown(mark, lambda: not (self._state == HELD and
                                              self._owner == self.identity and
                                              self._session == session)):
            token = int(self._read("Token"))
            self._confirm(mark, lambda: not (self._state == HELD
                                             and self._owner == self.identity
                                             and self._session == session
                                             and self._token == token), "the release")
        return self.status("released")

    def _operator(self, suffix: str, reason: str, state: str) -> LockStatus:
        mark = self._send(suffix, reason)
        if not self._shown(mark, lambda: self._state == state):
            token = int(self._read("Token"))
            self._confirm(mark, lambda: self._state == state and self._token == token,
                          f"state {state}")
        return self.status(suffix)

    def force_release(self, reason: str) -> LockStatus:
        """Take the lock from its holder (operators only)."""
        return self._operator("ForceRelease", reason, FREE)

    def disable(self, reason: str) -> LockStatus:
        """Disable the lock: only operator groups may write (operators only)."""
        return self._operator("Disable", reason, DISABLED)

    def enable(self, reason: str = "") -> LockStatus:
        """End a Disable (operators only)."""
        return self._operator("Enable", reason, FREE)

    # ---- requests and hand-over ---------------------------------------------------------
    def request(self, session: str | None = None, lease: float | None = None,
                note: str | None = None, *, auto: bool = True, wait: float | None = None,
                keep_alive: bool = False) -> LockStatus:
        """Ask for the lock: granted at once if it is Free for us or held at a lower
        authority, else wait in line (``status().waiters`` says where).

        ``auto``: take the lock as soon as it is released to us (else Acquire it then).
        ``keep_alive``: renew the request at a third of its lease until it is granted
        (then the grant is kept alive) or withdrawn. ``wait``: seconds to wait for the
        grant, renewing the request meanwhile; if it does not come, the request is
        withdrawn and :class:`LockHeld` raised. Returns the status (``held_by_me`` when
        granted). A request renewed here again keeps its place."""
        session = session or self.session
        if not session:
            raise ValueError("request needs a session name")
        self._require_connected()
        lease = float(lease) if lease is not None else self._lease_default()
        body: dict[str, Any] = {"session": session, "lease": lease, "auto": auto}
        if note is not None:
            body["note"] = note
        started = time.monotonic()
        with self._cond:
            token = self._token
        mark = self._send("Request", json.dumps(body))
        message = self._read("Message")
        self._confirm(mark, lambda: True, "the request")
        with self._cond:
            self.session = session
            if self._state == HELD and self._owner == self.identity \
                    and self._session == session and self._token > token:
                self._grant = _Grant(session, self._token, lease, started + lease)
                self._request, self._lost = None, ""
            else:
                self._request = _Request(session, token, lease, started + lease)
        if keep_alive or wait is not None:
            self._start_keepalive()
        if wait is not None and self._grant is None:
            self._wait_for_grant(session, wait, message)
        return self.status("granted" if self._grant is not None else "requested")

    def await_grant(self, timeout: float | None = None) -> bool:
        """Wait (event-driven) until our waiting request is granted: True; False after
        ``timeout`` s with the request still waiting; :class:`RequestLapsed` if it left
        the line without a grant."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._grant is None and self._request is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            if self._grant is not None:
                return True
        raise RequestLapsed(f"our request left the line without a grant; the lock is "
                            f"{self._now_text()}")

    def _wait_for_grant(self, session: str, wait: float, message: str) -> None:
        if self.await_grant(wait):
            return
        try:
            self.withdraw(session)
        except LockRefused:
            pass  # granted or lapsed meanwhile
        if self._grant is not None:
            return
        raise LockHeld(f"Request: not granted within {wait:g} s (request withdrawn): "
                       f"{message}", owner=self._owner, session=self._session,
                       note=self._values["Note"] or "", expiry=self._values["Expiry"] or 0.0,
                       token=self._token)

    def renew_request(self) -> LockStatus:
        """Renew our waiting request (keeps its place); :class:`RequestLapsed` if it left
        the line."""
        req = self._request
        if req is None:
            raise RequestLapsed("this process has no request waiting")
        started = time.monotonic()
        try:
            self._send("Request", json.dumps({"session": req.session, "lease": req.lease}))
        except LockRefused as exc:
            with self._cond:
                if self._request is req:
                    self._request = None
            raise RequestLapsed(f"our request (session {req.session}) could not be "
                                f"renewed: {exc}") from None
        with self._cond:
            if self._request is req:
                req.deadline = started + req.lease
        return self.status("renewed")

    def withdraw(self, session: str | None = None) -> LockStatus:
        """Leave the line (our request under ``session``, default our pending one)."""
        req = self._request
        session = session or (req.session if req else self.session)
        if not session:
            raise ValueError("withdraw needs a session name")
        mark = self._send("Withdraw", session)   # a grant meanwhile is still adopted
        with self._cond:
            if self._request is not None and self._request.session == session:
                self._request = None
        self._confirm(mark, lambda: True, "the withdrawal")
        return self.status("withdrawn")

    def handover(self, to: str | None = None, *, to_session: str | None = None,
                 requeue: bool = False, session: str | None = None,
                 lease: float | None = None) -> LockStatus:
        """Hand the lock to the first in line, or to waiter ``to`` (``user@host`` or
        ``user``; ``to_session`` when they wait under several sessions), in one step.
        ``requeue``: wait in line for it again (kept alive like any request of ours)."""
        grant = self._grant
        session = session or (grant.session if grant else self.session)
        if not session:
            raise ValueError("handover needs a session name")
        body: dict[str, Any] = {"session": session}
        if to:
            body["to"] = to
        if to_session:
            body["to_session"] = to_session
        if requeue:
            body["requeue"] = True
            if lease is not None:
                body["lease"] = float(lease)
        text = json.dumps(body) if len(body) > 1 else session
        kept_alive = self._keepalive is not None
        self._stop_keepalive()   # no renewal may race the hand-over
        with self._cond:
            self._handing_over = True
        try:
            mark = self._send("Handover", text)
        except LockError:
            with self._cond:
                self._handing_over = False
                self._check_grant()
            if kept_alive:
                self._start_keepalive()
            raise
        token = int(self._read("Token"))
        started = time.monotonic()
        with self._cond:
            self._grant = None
            self._handing_over = False
            if requeue:
                req_lease = float(lease) if lease is not None else \
                    (grant.lease if grant else self._lease_default())
                self._request = _Request(session, token, req_lease, started + req_lease)
        if requeue:
            self._start_keepalive()
        self._confirm(mark, lambda: self._token >= token, "the hand-over")
        return self.status("handed-over")

    # ---- context manager and keep-alive ----------------------------------------------------
    def hold(self, session: str | None = None, lease: float | None = None,
             note: str | None = None, wait: float | None = None) -> "_Hold":
        """Context manager: acquire, keep the lease alive, release on exit (also on error)."""
        return _Hold(self, session, lease, note, wait)

    def __enter__(self) -> "BeamlineLock":
        self.acquire(keep_alive=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _release_on_exit(self, exc is not None)

    def _start_keepalive(self) -> None:
        self._stop_keepalive()
        self._keepalive = _KeepAlive(self)
        self._keepalive.start()

    def _stop_keepalive(self) -> None:
        ka, self._keepalive = self._keepalive, None
        if ka is not None:
            ka.stop()

    def close(self) -> None:
        """Stop the keep-alive and callbacks and drop the CA monitors (no release)."""
        if self._closed:
            return
        self._closed = True
        self._stop_keepalive()
        self._events.put(None)
        for monitor in self._pvs.values():
            monitor.close()
        for pv in self._aux.values():
            pv.clear_callbacks()
            pv.disconnect()

    def __repr__(self) -> str:
        return f"<BeamlineLock {self.prefix} {self.identity} session={self.session}: " \
               f"{self.status().describe()}>"


def _release_on_exit(lock: BeamlineLock, failing: bool) -> None:
    """Release; surface a lost lease or a failed release unless an exception is in flight."""
    try:
        lock.release()
    except LockError:
        if not failing:
            raise
        log.warning("beamline lock: release on exit failed", exc_info=True)


class _Hold:
    def __init__(self, lock: BeamlineLock, session, lease, note, wait):
        self.lock, self.args = lock, (session, lease, note, wait)

    def __enter__(self) -> BeamlineLock:
        session, lease, note, wait = self.args
        self.lock.acquire(session, lease, note, wait, keep_alive=True)
        return self.lock

    def __exit__(self, exc_type, exc, tb) -> None:
        _release_on_exit(self.lock, exc is not None)


class _KeepAlive(threading.Thread):
    """Renews our grant at a third of the lease; marks it lost when that fails for good.
    While we only wait in line, renews our request the same way, and goes on with the
    grant it becomes."""

    def __init__(self, lock: BeamlineLock):
        super().__init__(daemon=True, name=f"beamline-lock-keepalive {lock.prefix}")
        self.lock = lock
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        with self.lock._cond:
            self.lock._cond.notify_all()
        if self is not threading.current_thread():
            self.join(self.lock.timeout + 1)

    def run(self) -> None:
        lock = self.lock
        while True:
            grant = lock._grant
            if grant is None:
                if not self._keep_request():
                    return
                continue
            if lock.lost:
                return
            interval = max(0.1, grant.lease / 3)
            if self._stop_event.wait(interval):
                return
            if time.monotonic() >= grant.deadline:
                lock._set_lost(f"our lease (session {grant.session}, token {grant.token}) "
                               "ran out before it could be renewed")
                return
            try:
                lock.renew()
            except LockLost:
                return
            except LockUnavailable as exc:  # try again until the lease is surely over
                log.warning("beamline lock keep-alive: %s", exc)
            except LockError as exc:
                lock._set_lost(str(exc))
                return

    def _keep_request(self) -> bool:
        """Renew our request once its lease is a third gone, or wake early on a grant.
        False when there is nothing (left) to keep alive."""
        lock = self.lock
        req = lock._request
        if req is None:
            return False
        wake = time.monotonic() + max(0.1, req.lease / 3)
        with lock._cond:
            lock._cond.wait_for(lambda: lock._grant is not None or lock._request is not req
                                or self._stop_event.is_set(),
                                max(0.0, wake - time.monotonic()))
        if self._stop_event.is_set():
            return False
        if lock._grant is not None or lock._request is not req:
            return True
        if time.monotonic() >= req.deadline:
            with lock._cond:
                if lock._request is req:
                    lock._request = None
            log.warning("beamline lock keep-alive: our request (session %s) lapsed before "
                        "it could be renewed", req.session)
            return False
        try:
            lock.renew_request()
        except RequestLapsed as exc:
            if lock._grant is not None:
                return True   # granted meanwhile: keep the grant alive
            log.warning("beamline lock keep-alive: %s", exc)
            return False
        except LockUnavailable as exc:  # try again until the request surely lapsed
            log.warning("beamline lock keep-alive: %s", exc)
        return True
