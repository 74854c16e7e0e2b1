"""The caproto IOC around the pure lock machine.

Each command put runs under one asyncio lock: the machine decides, the store commits
(fsync), and only then are the PVs updated and the put completed. A refused put
raises :class:`LockRefused`, which caproto returns to the client as the put's error
(``caput -c -S`` shows it) and which is also written to ``$(P)Message``. A refusal
changes no PV but Message and raises no alarm; state PVs are written only when their
value or alarm changes. When the store cannot be written a command is refused with that
reason, and a lease that ends meanwhile is shown as not durable (INVALID alarm, every
gate closed) until the store takes it. A command's updates go to each client as one burst
(gates first, Message last), the commanding client's before its put's reply; the CA
server itself is in :mod:`.ca_server`.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import logging
import math
import time
from collections import deque
from typing import Any, Callable, NoReturn

import caproto as ca
from caproto import AlarmSeverity, AlarmStatus, ChannelType
from caproto.server import PVGroup, pvproperty
from caproto.server.server import PvpropertyByte

from . import contract
from .ca_server import REQUEST, STALL_TIMEOUT, LockServerContext, post
from .config import Config
from .machine import HELD, UNKNOWN_INDEX, LockMachine, LockState, Outcome
from .requests import Refused
from .store import Store, StoreWriteError

log = logging.getLogger("lock_ioc")

#: CA identity ("user@host") of the client whose put is being processed.
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="")

TICK = 0.2  # s: expiry is noticed within this (the issue allows 0.5 s)
STORE_RETRY = 1.0  # s: how often an expiry the store could not record is tried again

#: Alarm of the state PVs: none, or "the shown state is not durable" (store failing).
NO_ALARM = (AlarmStatus.NO_ALARM, AlarmSeverity.NO_ALARM)
NOT_DURABLE = (AlarmStatus.WRITE, AlarmSeverity.INVALID_ALARM)


class LockRefused(Exception):
    """Raised from a command PV's write so that caproto fails the CA put with this text."""


class CommandChannel(PvpropertyByte):
    """A command PV: a write runs the command; its value is the last accepted text.

    caproto hands the client's user and host to ``auth_write`` only; the command reads
    them from :data:`CALLER`. The text reaches the request parser as bytes, so invalid
    UTF-8 is refused with a clear message. The command runs outside caproto's
    ``ChannelData.write``, whose failure path would raise an alarm on the PV: a refusal
    is the lock working, not an alarm.
    """

    async def auth_write(self, hostname, username, data, data_type, metadata, **kwargs):
        token = CALLER.set(f"{username}@{hostname}")
        try:
            return await super().auth_write(hostname, username, data, data_type, metadata,
                                            **kwargs)
        except LockRefused as exc:
            await _tell_put_callback_client(str(exc))
            raise
        finally:
            CALLER.reset(token)

    async def write_from_dbr(self, data, data_type, metadata, *, flags=0):
        name = self.pvspec.name
        with self.group.burst():  # its updates reach the client before the put's reply
            try:
                raw = command_bytes(name, self.pvname, data, data_type)
            except Refused as exc:
                await self.group.refuse(name, exc.message)
            await self.group.command(name, raw)
            await post(self, raw, time.time())


def command_bytes(name: str, pvname: str, data, data_type) -> bytes:
    """The text of a put to a command PV, from the CA types people send.

    ``caput -S`` sends DBR_CHAR (the long-string convention); plain ``caput`` sends one
    DBR_STRING (up to 39 characters): a session name, accepted as it is. Numbers and
    enums are not text.
    """
    native = ca.native_type(data_type)
    if native == ChannelType.CHAR:
        return bytes(data)
    if native == ChannelType.STRING and len(data) == 1:
        value = data[0]
        return value if isinstance(value, bytes) else str(value).encode("utf-8")
    what = f"{len(data)} strings" if native == ChannelType.STRING else \
        f"a {ChannelType(data_type).name} value"
    raise Refused(f"{name}: refused: a command is text, got {what}; write it as a long "
                  f"string: caput -c -S {pvname} 'text'")


async def _tell_put_callback_client(message: str) -> None:
    """Make the refusal text visible to ``caput -c`` too.

    For a put with callback, libca reduces caproto's error reply to a status code
    ("Channel write request failed") and drops the text. An extra error reply that
    refers to a plain write carries the text to libca's default exception handler,
    which prints it (as it does for ``caput`` without ``-c``). Sent first, so the
    client sees the reason before its callback reports the failure.
    """
    req = REQUEST.get()
    if req is None or not isinstance(req[1], ca.WriteNotifyRequest):
        return
    circuit, command = req
    chan = circuit.circuit.channels_sid.get(command.sid)
    if chan is None:
        return
    # libca finds the channel of a failed plain write by the cid in its ioid field.
    plain = ca.WriteRequest(b"\0", ChannelType.CHAR, 1, command.sid, chan.cid)
    try:
        await circuit.send(ca.ErrorResponse(plain, chan.cid, ca.CAStatus.ECA_PUTFAIL,
                                            message))
    except Exception:  # the client went away; caproto handles the circuit
        log.warning("could not send refusal text", exc_info=True)


class _TidyLogs(logging.Filter):
    """No tracebacks in the IOC log for expected conditions.

    caproto logs every failed put with a traceback, but a refusal is the lock working;
    and a beacon that finds no caRepeater on the host (ICMP port unreachable) is
    worth one line, not a traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, LockRefused):
            record.exc_info = None
            record.msg, record.args = "put refused: %s", (str(exc),)
            record.levelno, record.levelname = logging.INFO, "INFO"
        elif exc is not None and str(record.msg).startswith("Failed to send beacon"):
            record.exc_info = None
            record.msg = str(record.msg).split(".")[0] + " (no caRepeater listening?)"
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class LockIOCBase(PVGroup):
    """Behaviour of the lock IOC; :func:`build_ioc` adds the PVs from the contract.

    ``lock_state`` is what the store holds. ``undurable`` is an expiry that has happened
    but that the store could not record yet (disk full): the PVs then show it with an
    INVALID alarm and every gate closed, and the clock retries it.
    """

    def __init__(self, *args, config: Config, store: Store, state: LockState,
                 clock: Callable[[], float] = time.time, undurable: Outcome | None = None,
                 published: dict[str, Any] | None = None, **kwargs):
        self.config = config
        self.store = store
        self.machine = LockMachine(config)
        self.lock_state = state
        self.undurable = undurable
        self.store_error = ""
        self.clock = clock
        self.event_lines = History(store.recent(config.history), config.history)
        self._published: dict[str, tuple[Any, tuple]] = dict(published or {})
        self._retry_at = 0.0
        self._cmd_lock: asyncio.Lock | None = None
        #: Groups PV updates so each client gets them in one write (the server context's
        #: ``burst``, set by :func:`serve`).
        self.burst: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        super().__init__(*args, **kwargs)

    # ---- values ---------------------------------------------------------------
    def values(self, now: float) -> dict[str, Any]:
        """Every state PV's value (by contract suffix) for the current lock state."""
        s = self.undurable.state if self.undurable is not None else self.lock_state
        held = s.mode == HELD
        vals: dict[str, Any] = {
            "State": s.mode,
            "Owner": s.owner if held else "",
            "Session": s.session if held else "",
            "Note": s.note if held else "",
            "Token": s.token,
            "Expiry": s.expiry if held else 0.0,
            "Remaining": float(math.ceil(s.remaining(now))),
            "DisabledReason": s.reason,
            "History": self.event_lines.text,
            "AcquiredAt": s.acquired if held else 0.0,
            "WaiterCount": len(s.waiters),
            "Waiters": self.machine.waiters_json(s),
            "YieldTo": self.machine.yield_to(s),
            # Fail closed while the shown state is not durable (as the gates).
            "HolderIndex": self.machine.holder_index(s) if self.undurable is None
            else UNKNOWN_INDEX,
        }
        for group, gate in self.machine.gates(s).items():
            # Fail closed while the shown state is not durable.
            vals[contract.gate_suffix(group)] = gate if self.undurable is None else 0
        return vals

    def channel(self, suffix: str):
        return self.pvdb[self.prefix + suffix]

    async def publish(self, now: float) -> None:
        """Write the PVs whose value or alarm changed (monitors fire once per change).

        Gates first: a burst goes out client by client in the order its updates were
        made, so the device IOCs, which enforce the lock, get theirs before the displays.
        """
        alarm = NO_ALARM if self.undurable is None else NOT_DURABLE
        stamp = time.time()
        values = sorted(self.values(now).items(),
                        key=lambda item: not item[0].startswith(contract.GATE_PREFIX))
        for suffix, value in values:
            seen = self._published.get(suffix)
            if seen == (value, alarm):
                continue
            self._published[suffix] = (value, alarm)
            if seen is not None and seen[1] == alarm:
                await post(self.channel(suffix), value, stamp)
            else:
                await self.channel(suffix).write(value, verify_value=False, timestamp=stamp,
                                                 status=alarm[0], severity=alarm[1])

    async def set_message(self, text: str) -> None:
        """The outcome of each command (one update per command, as a record's MPST
        "Always": a client confirms its command by the Message update it caused)."""
        await post(self.channel("Message"), clip(text, "Message"), time.time())

    async def apply(self, out: Outcome) -> None:
        """Make an outcome durable, then visible. Caller holds the command lock.

        Raises :class:`StoreWriteError` (nothing changed) when the store cannot be written.
        """
        try:
            self.store.commit(out.state, out.events)
        except StoreWriteError as exc:
            if not self.store_error:
                log.warning("the lock's store cannot be written: %s", exc)
            self.store_error = str(exc)
            raise
        if self.store_error:
            log.warning("the lock's store can be written again")
            self.store_error = ""
        if out.state.token != self.lock_state.token:
            # Every new grant announces itself with State first, also Held -> Held (a
            # hand-over): clients tell holding periods apart by State's update. Only the
            # value is forgotten: an unchanged alarm keeps State on the fast path (post).
            seen = self._published.get("State")
            if seen is not None:
                self._published["State"] = (None, seen[1])
        self.lock_state = out.state
        self.undurable = None
        for line in self.event_lines.extend(out.events):
            _log_soon("%s", line)
        await self.publish(self.clock())
        if out.message:
            await self.set_message(out.message)

    async def settle(self, expiry: Outcome) -> None:
        """Record an expiry; if the store cannot be written, show it as not durable
        (INVALID, gates closed) and let the clock retry it."""
        try:
            await self.apply(expiry)
        except StoreWriteError as exc:
            first = self.undurable is None
            self.undurable = expiry
            self._retry_at = self.clock() + STORE_RETRY
            if first:
                await self.publish(self.clock())
                await self.set_message(f"{expiry.message}, but the lock's store cannot be "
                                       f"written ({exc}): every gate is closed until it can")

    def lock(self) -> asyncio.Lock:
        if self._cmd_lock is None:
            self._cmd_lock = asyncio.Lock()
        return self._cmd_lock

    # ---- commands -------------------------------------------------------------
    async def command(self, name: str, raw: bytes) -> None:
        """Run a command put; raises :class:`LockRefused` with the reason if refused."""
        caller = CALLER.get() or "unknown@unknown"
        async with self.lock():
            try:
                out = self.machine.command(name, self.lock_state, caller, raw, self.clock())
            except Refused as exc:
                if getattr(exc, "pending", None) is not None:
                    # An expiry found on the way is real: record it as the clock would.
                    expiry = self.machine.expire(self.lock_state, self.clock())
                    if expiry is not None:
                        await self.settle(expiry)
                await self.refuse(name, exc.message)
            except Exception as exc:  # a bug; the machine is pure, so nothing changed
                log.exception("%s from %s failed", name, caller)
                await self.refuse(name, f"{name}: refused: internal error "
                                  f"({type(exc).__name__}: {exc}); nothing changed")
            try:
                await self.apply(out)
            except StoreWriteError as exc:
                await self.refuse(name, f"{name}: refused: the lock's store cannot be "
                                  f"written ({exc}); nothing changed")

    async def refuse(self, name: str, message: str) -> NoReturn:
        """Refuse a command put: the reason goes to Message and to the client."""
        await self.set_message(message)
        _log_soon("refused %s from %s: %s", name, CALLER.get() or "unknown@unknown", message)
        raise LockRefused(message)

    # ---- time -----------------------------------------------------------------
    async def run_clock(self) -> None:
        """Expire leases within TICK of their end; tick Remaining and Heartbeat.

        Nothing that goes wrong here may end the IOC: it is logged, and the clock goes on.
        """
        heartbeat = self.channel("Heartbeat")
        next_beat = self.clock() + 1.0
        while True:
            try:
                next_beat = await self._tick(heartbeat, next_beat)
            except Exception:
                log.exception("lock clock")
                await asyncio.sleep(TICK)

    async def _tick(self, heartbeat, next_beat: float) -> float:
        now = self.clock()
        due = self.machine.deadline(self.lock_state)
        if due is not None and now >= due and now >= self._retry_at:
            async with self.lock():
                out = self.undurable or self.machine.expire(self.lock_state, self.clock())
                if out is not None:
                    with self.burst():
                        await self.settle(out)
        with self.burst():
            await self.publish(now)
            if now >= next_beat:
                next_beat = max(next_beat + 1.0, now + 0.5)
                await post(heartbeat, heartbeat.value + 1, time.time())
        wait = min(TICK, max(0.0, next_beat - self.clock()))
        due = self.machine.deadline(self.lock_state)
        if due is not None:
            until = self._retry_at if self.undurable is not None else due
            wait = min(wait, max(0.0, until - self.clock()))
        await asyncio.sleep(wait + 0.001)
        return next_beat


def _log_soon(msg: str, *args) -> None:
    """Log at INFO once the put being handled has been answered (formatting and writing
    the log need not be on the put's path); at once outside the event loop."""
    try:
        asyncio.get_running_loop().call_soon(log.info, msg, *args)
    except RuntimeError:
        log.info(msg, *args)


def clip(text: str, suffix: str) -> str:
    """Cut text to a text PV's size in UTF-8 bytes (never mid-character)."""
    limit = contract.BY_SUFFIX[suffix].max_length
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit - 3].decode("utf-8", "ignore") + "..."


class History:
    """The last N event lines and their text for ``$(P)History`` (formatted once)."""

    def __init__(self, events, size: int):
        self.lines: deque[str] = deque(maxlen=size)
        self.text = ""
        self.extend(events)

    def extend(self, events) -> list[str]:
        """Add events; their lines."""
        if not events:
            return []
        new = [e.line() for e in events]
        self.lines.extend(new)
        lines = list(self.lines)
        while lines and len("\n".join(lines).encode("utf-8")) > contract.HISTORY_MAX:
            lines.pop(0)  # keep the newest that fit the PV
        self.text = "\n".join(lines)
        return new


#: Per-subscription backlog caproto keeps (the last updates, for its own queue). The
#: lock's per-client queue (ca_server.PendingUpdates) does the queueing, so caproto need
#: keep only the last; its default (1000, reduced with a warning to 937 for the 16 kB
#: History) would hold up to 15 MB per History monitor.
BACKLOG = 1


def _pvproperty(spec: contract.PVSpec, value: Any, putter=None) -> pvproperty:
    # Each PV its own alarm (caproto's default is one alarm shared by the whole group).
    common = dict(name=spec.suffix, doc=spec.doc, alarm_group=spec.suffix,
                  max_subscription_backlog=BACKLOG)
    if spec.kind == "text" and spec.command:
        return pvproperty(value=b"", dtype=CommandChannel, max_length=spec.max_length,
                          **common)
    if spec.kind == "text":
        return pvproperty(value=value, dtype=ChannelType.CHAR, max_length=spec.max_length,
                          string_encoding="utf-8", read_only=True, **common)
    if spec.kind == "enum":
        return pvproperty(value=value, dtype=ChannelType.ENUM, enum_strings=list(spec.enum),
                          read_only=True, **common)
    if spec.kind == "long":
        return pvproperty(put=putter, value=int(value), dtype=int,
                          read_only=not spec.command, **common)
    if spec.kind == "double":
        return pvproperty(value=float(value), dtype=float, read_only=True, precision=1,
                          units=spec.units, **common)
    raise ValueError(f"unknown PV kind {spec.kind!r}")


async def _ping(group, instance, value):
    return value


async def _start_clock(group, instance, async_lib):
    await group.run_clock()


def build_ioc(config: Config, *, prefix: str | None = None,
              clock: Callable[[], float] = time.time, store: Store | None = None
              ) -> LockIOCBase:
    """Open the store, settle a lease that ran out while the IOC was down, build PVs.

    PV initial values come from the stored state, so no client ever sees a default
    (Free, gates open) for a lock that is in fact held.
    """
    for name in ("caproto.circ", "caproto.ctx"):
        logging.getLogger(name).addFilter(_TidyLogs())
    store = store or Store(config.state)
    machine = LockMachine(config)
    state = store.load() or LockState()
    expired = machine.expire(state, clock())
    undurable = None
    if expired is not None:
        try:
            store.commit(expired.state, expired.events)
            state = expired.state
            log.info("lease ran out while the IOC was down: %s", expired.message)
        except StoreWriteError as exc:
            undurable = expired  # shown as not durable and retried, as at run time
            log.warning("lease ran out while the IOC was down, but the lock's store cannot "
                        "be written (%s): every gate is closed until it can", exc)

    holder = LockIOCBase.__new__(LockIOCBase)  # only to compute initial values
    holder.lock_state, holder.machine, holder.undurable = state, machine, None
    holder.event_lines = History(store.recent(config.history), config.history)
    initial = LockIOCBase.values(holder, clock())
    published = {suffix: (value, NO_ALARM) for suffix, value in initial.items()}
    initial.update(Message=expired.message if expired else "", Heartbeat=0,
                   LeaseDefault=config.lease_default, LeaseMax=config.lease_max, Ping=0,
                   UserMap=config.user_map)

    namespace: dict[str, Any] = {}
    for spec in contract.PVS:
        putter = _ping if spec.suffix == "Ping" else None
        namespace[spec.attr] = _pvproperty(spec, initial.get(spec.suffix, ""), putter)
    heartbeat = contract.BY_SUFFIX["Heartbeat"]
    namespace[heartbeat.attr] = _pvproperty(heartbeat, 0)
    namespace[heartbeat.attr].startup(_start_clock)
    for group in config.group_names:
        suffix = contract.gate_suffix(group)
        namespace["pv_gate_" + group] = pvproperty(
            name=suffix, value=initial[suffix], dtype=int, read_only=True,
            alarm_group=suffix, max_subscription_backlog=BACKLOG,
            doc=contract.GATE.doc.replace("<group>", group))
    cls = type(LockIOCBase)("LockIOC", (LockIOCBase,), namespace)
    return cls(prefix=prefix if prefix is not None else config.prefix, config=config,
               store=store, state=state, clock=clock, undurable=undurable,
               published=published)


def serve(ioc: LockIOCBase, *, interfaces: list[str] | None = None,
          log_pv_names: bool = False, stall_timeout: float = STALL_TIMEOUT) -> None:
    """caproto's asyncio ``run`` with the lock's server context (per-client queues, a
    stuck client dropped after ``stall_timeout`` s); stops on SIGINT/SIGTERM."""
    import signal

    async def main() -> None:
        ctx = LockServerContext(ioc.pvdb, interfaces, stall_timeout=stall_timeout)
        ioc.burst = ctx.burst
        # What start-up made (modules, caproto, the PV database) lives as long as the IOC:
        # the collector need not scan it again at each full pass (a pass over everything
        # stops the event loop for tens of ms, e.g. while 200 clients come or go).
        gc.collect()
        gc.freeze()
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await ctx.run(log_pv_names=log_pv_names)
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
    ioc.store.close()
    log.info("lock IOC stopped")
