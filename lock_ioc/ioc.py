"""The caproto IOC around the pure lock machine.

Each command put runs under one asyncio lock: the machine decides, the store commits
(fsync), and only then are the PVs updated and the put completed. A refused put
raises :class:`LockRefused`, which caproto returns to the client as the put's error
(``caput -c -S`` shows it) and which is also written to ``$(P)Message``.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import os
import socket
import time
from collections import deque
from typing import Any, Callable

import caproto as ca
from caproto import ChannelType
from caproto.asyncio.server import Context as _AsyncioContext
from caproto.asyncio.server import VirtualCircuit as _AsyncioCircuit
from caproto.server import PVGroup, pvproperty
from caproto.server.server import PvpropertyByte

from . import contract
from .config import Config
from .machine import HELD, LockMachine, LockState, Outcome
from .requests import Refused
from .store import Store

log = logging.getLogger("lock_ioc")

#: CA identity ("user@host") of the client whose put is being processed.
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="")

#: (server circuit, CA request) being processed; tasks caproto spawns inherit it.
REQUEST: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("request", default=None)

TICK = 0.2  # s: expiry is noticed within this (the issue allows 0.5 s)


class LockRefused(Exception):
    """Raised from a putter so that caproto fails the CA put with this text."""


class CommandChannel(PvpropertyByte):
    """Raw bytes for command PVs, recording the writer's CA identity.

    caproto hands the client's user and host to ``auth_write`` only; the putter
    reads them from :data:`CALLER`. Bytes (not str) so that invalid UTF-8 reaches
    the request parser and is refused with a clear message.
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


class LockCircuit(_AsyncioCircuit):
    """Server circuit that exposes the request being handled (see REQUEST)."""

    async def _process_command(self, command):
        token = REQUEST.set((self, command))
        try:
            return await super()._process_command(command)
        finally:
            REQUEST.reset(token)


class LockServerContext(_AsyncioContext):
    CircuitClass = LockCircuit

    async def tcp_handler(self, client, addr):
        # Like EPICS base's RSRV: no Nagle. A command's reply and its burst of monitor
        # updates are separate small writes; with Nagle on, the updates wait for the
        # client's delayed ACK (~40 ms) whenever a previous segment is unacknowledged.
        sock = client.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return await super().tcp_handler(client, addr)


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
    """Behaviour of the lock IOC; :func:`build_ioc` adds the PVs from the contract."""

    def __init__(self, *args, config: Config, store: Store, state: LockState,
                 clock: Callable[[], float] = time.time, **kwargs):
        self.config = config
        self.store = store
        self.machine = LockMachine(config)
        self.lock_state = state
        self.clock = clock
        self.event_lines = History(store.recent(config.history), config.history)
        self._published: dict[str, Any] = {}
        self._cmd_lock: asyncio.Lock | None = None
        super().__init__(*args, **kwargs)

    # ---- values ---------------------------------------------------------------
    def values(self, now: float) -> dict[str, Any]:
        """Every state PV's value (by contract suffix) for the current lock state."""
        s = self.lock_state
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
        }
        for group, gate in self.machine.gates(s).items():
            vals[contract.gate_suffix(group)] = gate
        return vals

    def channel(self, suffix: str):
        return self.pvdb[self.prefix + suffix]

    async def publish(self, now: float) -> None:
        """Write the PVs whose values changed (monitors fire once per change)."""
        for suffix, value in self.values(now).items():
            if self._published.get(suffix) != value:
                self._published[suffix] = value
                await self.channel(suffix).write(value, verify_value=False)

    async def set_message(self, text: str) -> None:
        await self.channel("Message").write(clip(text, "Message"), verify_value=False)

    async def apply(self, out: Outcome) -> None:
        """Make an outcome durable, then visible. Caller holds the command lock."""
        self.store.commit(out.state, out.events)
        self.lock_state = out.state
        self.event_lines.extend(out.events)
        for event in out.events:
            log.info("%s", event.line())
        await self.publish(self.clock())
        if out.message:
            await self.set_message(out.message)

    # ---- commands -------------------------------------------------------------
    async def command(self, name: str, raw: Any) -> Any:
        caller = CALLER.get() or "unknown@unknown"
        if self._cmd_lock is None:
            self._cmd_lock = asyncio.Lock()
        async with self._cmd_lock:
            try:
                out = self.machine.command(name, self.lock_state, caller,
                                           bytes(raw), self.clock())
            except Refused as exc:
                pending = getattr(exc, "pending", None)
                if pending is not None:
                    await self.apply(pending)
                await self.set_message(exc.message)
                log.info("refused %s from %s: %s", name, caller, exc.message)
                raise LockRefused(exc.message) from None
            await self.apply(out)
        return raw

    # ---- time -----------------------------------------------------------------
    async def run_clock(self) -> None:
        """Expire leases within TICK of their end; tick Remaining and Heartbeat."""
        if self._cmd_lock is None:
            self._cmd_lock = asyncio.Lock()
        heartbeat = self.channel("Heartbeat")
        next_beat = self.clock() + 1.0
        while True:
            now = self.clock()
            if self.lock_state.mode == HELD and now >= self.lock_state.expiry:
                async with self._cmd_lock:
                    out = self.machine.expire(self.lock_state, self.clock())
                    if out is not None:
                        await self.apply(out)
            await self.publish(now)
            if now >= next_beat:
                next_beat = max(next_beat + 1.0, now + 0.5)
                await heartbeat.write(heartbeat.value + 1, verify_value=False)
            wait = min(TICK, max(0.0, next_beat - self.clock()))
            if self.lock_state.mode == HELD:
                wait = min(wait, max(0.0, self.lock_state.expiry - self.clock()))
            await asyncio.sleep(wait + 0.001)


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

    def extend(self, events) -> None:
        if not events:
            return
        self.lines.extend(e.line() for e in events)
        lines = list(self.lines)
        while lines and len("\n".join(lines).encode("utf-8")) > contract.HISTORY_MAX:
            lines.pop(0)  # keep the newest that fit the PV
        self.text = "\n".join(lines)


def _pvproperty(spec: contract.PVSpec, value: Any, putter=None) -> pvproperty:
    common = dict(name=spec.suffix, doc=spec.doc)
    if spec.kind == "text" and spec.command:
        return pvproperty(put=putter, value=b"", dtype=CommandChannel,
                          max_length=spec.max_length, **common)
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


def _command_putter(name: str):
    async def putter(group, instance, value):
        return await group.command(name, value)
    putter.__name__ = f"put_{name.lower()}"
    return putter


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
    if expired is not None:
        store.commit(expired.state, expired.events)
        state = expired.state
        log.info("lease ran out while the IOC was down: %s", expired.message)

    holder = LockIOCBase.__new__(LockIOCBase)  # only to compute initial values
    holder.lock_state, holder.machine = state, machine
    holder.event_lines = History(store.recent(config.history), config.history)
    initial = LockIOCBase.values(holder, clock())
    initial.update(Message=expired.message if expired else "", Heartbeat=0,
                   LeaseDefault=config.lease_default, LeaseMax=config.lease_max, Ping=0)

    namespace: dict[str, Any] = {}
    for spec in contract.PVS:
        putter = None
        if spec.command:
            putter = _ping if spec.suffix == "Ping" else _command_putter(spec.suffix)
        namespace[spec.attr] = _pvproperty(spec, initial.get(spec.suffix, ""), putter)
    heartbeat = contract.BY_SUFFIX["Heartbeat"]
    namespace[heartbeat.attr] = _pvproperty(heartbeat, 0)
    namespace[heartbeat.attr].startup(_start_clock)
    for group in config.group_names:
        spec = contract.GATE
        namespace["pv_gate_" + group] = pvproperty(
            name=contract.gate_suffix(group), value=initial[contract.gate_suffix(group)],
            dtype=int, read_only=True, doc=spec.doc.replace("<group>", group))
    cls = type(LockIOCBase)("LockIOC", (LockIOCBase,), namespace)
    return cls(prefix=prefix if prefix is not None else config.prefix, config=config,
               store=store, state=state, clock=clock)


def serve(ioc: LockIOCBase, *, interfaces: list[str] | None = None,
          log_pv_names: bool = False) -> None:
    """caproto's asyncio ``run``, with the lock's circuit class; stops on SIGINT/SIGTERM."""
    import signal

    import caproto.server.common as cas
    if "CAPROTO_SERVER_HIGH_LOAD_TIMEOUT_SEC" not in os.environ:
        # The lock is a low-rate server whose clients wait on its updates: send each
        # update at once. caproto's default (batch for up to 10 ms) holds the tail of
        # a command's burst of ~10 updates back from every client.
        cas.HIGH_LOAD_TIMEOUT = 0.0

    async def main() -> None:
        ctx = LockServerContext(ioc.pvdb, interfaces)
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
