"""caproto's asyncio CA server, made so that a client that stops reading hurts only itself,
and so that a command's monitor updates reach each client in one write, before its reply.

caproto (1.3) feeds every client's monitor updates from one context-wide task through a
bounded per-client queue whose ``put`` waits when the queue is full: one client that stops
reading (a suspended laptop, a frozen GUI) fills its queue and stops monitor updates for
every client; and as that task iterates caproto's live subscription lists across the wait,
a client subscribing or leaving meanwhile ends the server ("deque mutated during
iteration"). Like EPICS base's RSRV, here each client has its own bounded queue and its own
sending task; and an update costs no task switch on its way:

* :class:`LockServerContext` fans each update out to the subscribers at once (a snapshot
  of them), in the task that wrote the PV. Updates are gathered per client into a *burst*:
  all updates of one step of the event loop, or those inside :meth:`LockServerContext.burst`
  (a command's state PVs and Message). At its end each client's updates are serialised
  together and written with one send; for the client whose put caused the burst they are
  held and go out in the same send as its put's reply. So a client that put a command sees
  the updates it caused before the put completes (what the lock's client relies on).
* :class:`LockCircuit` writes a burst directly while its client keeps up; once its socket
  stops taking data the updates wait in :class:`PendingUpdates` (coalesced past a bound)
  for the circuit's own sending task, which drops the client after ``stall_timeout`` s.

caproto is used, not patched: these are subclasses of its asyncio server classes, and the
queues are the attributes (``subscription_queue``) caproto's servers define for this.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import queue
import socket
import struct
import threading

import caproto as ca
from caproto import ChannelType
from caproto.asyncio.server import Context as _AsyncioContext
from caproto.asyncio.server import VirtualCircuit as _AsyncioCircuit

log = logging.getLogger("lock_ioc")

#: (server circuit, CA request) being processed; tasks caproto spawns inherit it.
REQUEST: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("request", default=None)

#: Seconds a client's socket may take no data while updates wait for it before the client
#: is dropped. As EPICS_CA_CONN_TMO (30 s) for a CA client's view of a silent server. A
#: dropped libca client reconnects by itself when it runs again and gets current values.
STALL_TIMEOUT = 30.0

#: Bytes of updates a client may have waiting before they are coalesced to the latest of
#: each subscription. A command's burst is ~10 updates (under 20 kB with a full 16 kB
#: History), so a client that keeps up never reaches this and sees every value.
PENDING_LIMIT = 256 * 1024

#: A burst to at least this many clients is written by several threads at once.
PARALLEL_MIN = 8
#: Threads that write such bursts besides the event loop's. Each one the kernel schedules
#: on its own, as the C server's per-client threads: a send whose wake-up of a local
#: client takes one thread's CPU holds up only that thread's share (a same-run A/B with
#: 200 local camonitors: median to each client 1.57x the C server's with them, 2.0x
#: without).
SENDER_THREADS = 7


class PendingUpdates:
    """One client's monitor updates waiting for its socket to take data again.

    In order while below ``limit`` bytes; past it only the latest update of each
    subscription is kept, so a slow client may skip intermediate values but never ends on
    a stale one, and its memory stays bounded.
    """

    def __init__(self, limit: int = PENDING_LIMIT):
        self._base = self._limit = limit
        self._items: list = []
        self._bytes = 0
        self.coalesced = 0  # updates skipped so far (for the log)

    def __bool__(self) -> bool:
        return bool(self._items)

    def extend(self, commands) -> None:
        self._items.extend(commands)
        self._bytes += sum(len(c) for c in commands)
        if self._bytes > self._limit:
            self._coalesce()

    def _coalesce(self) -> None:
        seen: set[int] = set()
        kept = []
        for command in reversed(self._items):
            if command.subscriptionid not in seen:
                seen.add(command.subscriptionid)
                kept.append(command)
        kept.reverse()
        self.coalesced += len(self._items) - len(kept)
        self._items = kept
        self._bytes = sum(len(c) for c in kept)
        # Many large subscriptions may exceed the limit even coalesced: amortise.
        self._limit = max(self._base, 2 * self._bytes)

    def discard(self, subscription_ids: set[int]) -> None:
        """Forget updates of cancelled subscriptions (none may follow the cancel reply)."""
        self._items = [c for c in self._items if c.subscriptionid not in subscription_ids]
        self._bytes = sum(len(c) for c in self._items)

    def take(self) -> list:
        """All waiting updates, oldest first."""
        items, self._items, self._bytes, self._limit = self._items, [], 0, self._base
        return items


class _ToBurst:
    """A circuit's ``subscription_queue`` as caproto's context fills it: each update joins
    the context's current burst. ``put`` never waits."""

    def __init__(self, circuit: "LockCircuit"):
        self.circuit = circuit

    async def put(self, ref) -> None:
        command = ref()  # caproto hands a weak reference to an EventAddResponse
        if command is not None:
            self.circuit.context.collect(self.circuit, command)


class LockCircuit(_AsyncioCircuit):
    """A client's circuit: exposes the request being handled (see :data:`REQUEST`), writes
    each burst of monitor updates with one send (the put's reply appended when the burst
    is the put's), and drops the client when its socket stays stuck."""

    context: "LockServerContext"

    def __init__(self, circuit, client, context, **kwargs):
        super().__init__(circuit, client, context, **kwargs)
        self.subscription_queue = _ToBurst(self)
        self.pending = PendingUpdates()
        self._wake = asyncio.Event()
        self._backlogged = False  # the socket stopped taking data: updates wait in pending
        self._held: list[bytes] = []  # a burst waiting to go out with the put's reply
        self._writer = client.writer
        self.fd = self._writer.get_extra_info("socket").fileno()
        self._high_water = self._writer.transport.get_write_buffer_limits()[1]

    def who(self) -> str:
        host, port = self.circuit.address
        return f"{self.client_username}@{self.client_hostname} ({host}:{port})"

    async def _process_command(self, command):
        token = REQUEST.set((self, command))
        try:
            return await super()._process_command(command)
        finally:
            REQUEST.reset(token)

    async def _cull_subscriptions(self, db_entry, func):
        removed = await super()._cull_subscriptions(db_entry, func)
        if removed:
            ids = {sub.subscriptionid for _, sub in removed}
            self.pending.discard(ids)
            self.context.discard(self, ids)
        return removed

    # ---- sending -----------------------------------------------------------------------
    def deliver(self, commands: list, *, hold: bool = False) -> bytes | None:
        """One burst of updates: the bytes to send now, with one write (``hold``: kept
        for the next reply instead); when the socket is not taking data, they are left to
        the sending task. None when there is nothing to send now."""
        if not self.connected:
            return None
        if self._backlogged or self.pending or self._writer.transport.is_closing():
            self.pending.extend(commands)
            self._wake.set()
            return None
        data = self._serialize(commands)
        if hold:
            if not self._held:  # sent at the latest in the next step of the loop
                asyncio.get_running_loop().call_soon(self._flush_held)
            self._held.append(data)
            return None
        if self._held:
            data = b"".join(self._held) + data
            self._held.clear()
        return data

    def socket_idle(self) -> bool:
        """Whether nothing waits in the transport: bytes may go straight to the socket."""
        return self._writer.transport.get_write_buffer_size() == 0 and \
            not self._writer.transport.is_closing()

    def _flush_held(self) -> None:
        if self._held and self.connected:
            self.send_now(b"")

    def send_now(self, data: bytes) -> None:
        """Write through the transport (after any held burst); past its high-water mark
        the updates that follow wait in :attr:`pending`."""
        if self._held:
            data = b"".join(self._held) + data
            self._held.clear()
        try:
            self._writer.write(data)
        except Exception:
            log.exception("could not send monitor updates to CA client %s", self.who())
            return
        if self._writer.transport.get_write_buffer_size() > self._high_water:
            self._backlogged = True
            self._wake.set()

    async def _send_buffers(self, *buffers):
        """caproto's replies: after any burst held for them, in the same write."""
        if self._held:
            buffers = (b"".join(self._held), *buffers)
            self._held.clear()
        await super()._send_buffers(*buffers)

    async def subscription_queue_loop(self):
        """Send what waits for a client whose socket stopped taking data, once it takes
        data again; drop the client when it stays stuck."""
        self.events_on.set()
        writer = self._writer
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                if not self.connected or writer.transport.is_closing():
                    return
                if writer.transport.get_write_buffer_size() > self._high_water:
                    if not await self._drained(writer, self.pending):
                        return
                commands = self.pending.take()
                if not commands:
                    break
                self.send_now(self._serialize(commands))
            self._backlogged = False

    def _serialize(self, commands) -> bytes:
        """The bytes of updates: encoded ones as they are, others through caproto's
        protocol state (one bad update, e.g. a race with a cancel, loses only itself)."""
        out = []
        for command in commands:
            if type(command) is Update:
                out.append(command.data)
                continue
            try:
                out.extend(self.circuit.send(command))
            except Exception:
                log.exception("monitor update refused by caproto's protocol state for %s",
                              self.who())
        return b"".join(out)

    async def _drained(self, writer, pending: PendingUpdates) -> bool:
        """The socket stopped taking data: wait for it, at most the stall bound.

        Quiet for the first second (a busy client on a slow link); then logged once.
        """
        timeout = self.context.stall_timeout
        quiet = min(1.0, timeout)
        skipped = pending.coalesced
        try:
            try:
                async with asyncio.timeout(quiet):
                    await writer.drain()
                return True
            except TimeoutError:
                pass
            log.warning("CA client %s is not reading; its monitor updates wait (coalesced "
                        "to the latest of each PV); dropped if stuck for %g s",
                        self.who(), timeout)
            async with asyncio.timeout(timeout - quiet):
                await writer.drain()
        except TimeoutError:
            log.warning("dropped CA client %s: it has not read its updates for %g s",
                        self.who(), timeout)
            writer.transport.abort()  # caproto's reader sees the end and cleans up
            return False
        except (ConnectionError, OSError):
            return False  # it left; caproto's reader cleans up
        log.info("CA client %s reads again (%d intermediate updates skipped)", self.who(),
                 pending.coalesced - skipped)
        return True


#: What a value change is for subscribers (caproto's writes of text PVs say the same).
VALUE_CHANGE = ca.SubscriptionType.DBE_VALUE | ca.SubscriptionType.DBE_LOG


async def post(chan, value, timestamp: float) -> None:
    """Set a PV's value and time stamp and send it to its subscribers.

    caproto's ``ChannelData.write`` without what a value computed by the IOC itself
    does not need (putter and verify hooks, metadata and alarm handling), which are most
    of its cost on a command's path. A change of alarm takes ``write``. A PV with a
    synchronised-filter subscription (which snapshots at writes) takes ``write`` too.
    """
    if chan._fill_at_next_write:
        await chan.write(value, verify_value=False, timestamp=timestamp)
        return
    data = chan._data
    data["value"] = chan.preprocess_value(value)
    data["timestamp"] = ca.TimeStamp.from_unix_timestamp(timestamp)
    await publish(chan)


async def publish(chan) -> None:
    """Send a PV's current value to its subscribers, as caproto's ``publish`` would.

    The lock's own PVs (enum, long, double, UTF-8 text) in their plain and TIME types
    (what libca clients, pyepics, camonitor and ophyd ask for) are encoded here, once
    per type, straight from the value; caproto's conversion (``ChannelData._read``)
    and message classes were most of an update's cost. Anything else (other types,
    channel filters, a client that asked for another element count or switched its
    events off) takes caproto's path, the same bytes at caproto's cost.
    """
    chan._content.clear()  # caproto's per-value cache of conversions (see its publish)
    plan = []
    for queue, syncs in chan._queues.items():
        for sync, by_type in syncs.items():
            for type_name, specs in by_type.items():
                if not specs:
                    continue
                data_type = ChannelType.__members__.get(type_name)
                if sync is not None or type(queue) is not _Fanout or data_type is None:
                    await chan.publish(VALUE_CHANGE)
                    return
                plan.append((queue.context, data_type, tuple(specs)))
    if not plan:
        return
    wire = _wire_value(chan)
    encoded = [None if wire is None else _encode_update(chan, data_type, *wire)
               for _, data_type, _ in plan]
    if any(data is None for data in encoded):
        await chan.publish(VALUE_CHANGE)
        return
    for (context, data_type, specs), data in zip(plan, encoded):
        await context.fan_out(chan, data_type, specs, data, wire[1])


class Senders:
    """Threads that write bytes to many non-blocking sockets at once, with the calling
    thread: :meth:`send` returns when every socket took what it would."""

    def __init__(self, threads: int = SENDER_THREADS):
        self._jobs: list[queue.SimpleQueue] = []
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        for k in range(threads):
            jobs: queue.SimpleQueue = queue.SimpleQueue()
            self._jobs.append(jobs)
            threading.Thread(target=self._run, args=(jobs,), daemon=True,
                             name=f"lock-ioc sender {k}").start()

    def send(self, items: list[tuple[int, bytes]]) -> list[int]:
        """Write each ``(fd, data)``; the bytes each socket took (0 when it took none)."""
        sent = [0] * len(items)
        parts = len(self._jobs) + 1
        for k, jobs in enumerate(self._jobs, 1):
            jobs.put((items, sent, k, parts))
        self._write(items, sent, 0, parts)
        for _ in self._jobs:
            self._done.get()
        return sent

    def _run(self, jobs: queue.SimpleQueue) -> None:
        while True:
            self._write(*jobs.get())
            self._done.put(None)

    @staticmethod
    def _write(items, sent: list[int], start: int, step: int) -> None:
        for i in range(start, len(items), step):
            fd, data = items[i]
            try:
                sent[i] = os.write(fd, data)
            except OSError:  # full (BlockingIOError) or gone: the transport takes over
                sent[i] = 0


class _Fanout:
    """The context's ``subscription_queue`` as caproto's PVs fill it (one item per PV
    write and data type): handed to the subscribers at once, in the writer's task."""

    def __init__(self, context: "LockServerContext"):
        self.context = context

    async def put(self, update) -> None:
        await self.context._subscription_queue_iteration(*update)


class LockServerContext(_AsyncioContext):
    CircuitClass = LockCircuit

    def __init__(self, pvdb, interfaces=None, *, stall_timeout: float = STALL_TIMEOUT):
        super().__init__(pvdb, interfaces)
        self.stall_timeout = stall_timeout
        self.subscription_queue = _Fanout(self)
        self.senders = Senders()
        self._burst: dict[LockCircuit, list] = {}
        self._depth = 0        # explicit bursts open
        self._step_flush = False  # a flush at the end of this step of the loop is due

    async def tcp_handler(self, client, addr):
        # Like EPICS base's RSRV: no Nagle. A command's reply and its burst of monitor
        # updates are separate small writes; with Nagle on, the updates wait for the
        # client's delayed ACK (~40 ms) whenever a previous segment is unacknowledged.
        sock = client.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return await super().tcp_handler(client, addr)

    async def subscription_queue_loop(self):
        """Nothing to do: updates are handed out as they are written (:class:`_Fanout`)."""
        await asyncio.Event().wait()

    # ---- bursts ------------------------------------------------------------------------
    @contextlib.contextmanager
    def burst(self):
        """Updates written inside go to each client together, when the outermost burst
        ends; those to the client whose put is being handled go with its reply."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.flush()

    def collect(self, circuit: LockCircuit, command) -> None:
        """Add one update for one client to the current burst."""
        commands = self._burst.get(circuit)
        if commands is None:
            commands = self._burst[circuit] = []
        commands.append(command)
        if not self._depth and not self._step_flush:
            # Outside an explicit burst: those of this step of the loop go together.
            self._step_flush = True
            asyncio.get_running_loop().call_soon(self._flush_step,
                                                 context=contextvars.Context())

    def discard(self, circuit: LockCircuit, subscription_ids: set[int]) -> None:
        commands = self._burst.get(circuit)
        if commands:
            commands[:] = [c for c in commands if c.subscriptionid not in subscription_ids]

    def _flush_step(self) -> None:
        self._step_flush = False
        if not self._depth:
            self.flush()

    def flush(self) -> None:
        burst, self._burst = self._burst, {}
        request = REQUEST.get()
        replying = request[0] if request is not None and \
            isinstance(request[1], ca.WriteNotifyRequest) else None
        ready: list[tuple[LockCircuit, bytes]] = []
        for circuit, commands in burst.items():
            if not commands:
                continue
            try:
                data = circuit.deliver(commands, hold=circuit is replying)
            except Exception:
                log.exception("monitor updates for %s failed", circuit.who())
                continue
            if data:
                ready.append((circuit, data))
        if len(ready) < PARALLEL_MIN:
            for circuit, data in ready:
                circuit.send_now(data)
            return
        # Many clients: write to their sockets from several threads at once (the sends
        # release the GIL), so that one send's wake-up of a local client, which may take
        # this thread's CPU, does not hold up the others. Sockets with bytes still queued
        # in their transport, and what a socket does not take, go through the transport.
        direct = []
        for circuit, data in ready:
            if circuit.socket_idle():
                direct.append((circuit, data))
            else:
                circuit.send_now(data)
        sent = self.senders.send([(circuit.fd, data) for circuit, data in direct])
        for (circuit, data), n in zip(direct, sent):
            if n < len(data):
                circuit.send_now(data[n:])

    async def _subscription_queue_iteration(self, sub_specs, metadata, values, flags, sub):
        """Hand one value to each subscriber, from a snapshot of the subscriber lists.

        ``sub`` set: a new subscription's first value, for it alone. The update is encoded
        once per data type and count (caproto's own message) and only its subscription id
        differs per subscriber; subscriptions with channel filters take caproto's own path.
        One subscriber's failure is logged and never stops the updates of the others.
        """
        if sub is not None:
            targets = [(sub_specs[0], sub)]
        else:
            subscriptions = self.subscriptions
            targets = [(spec, s) for spec in sub_specs
                       for s in tuple(subscriptions.get(spec, ()))]
        encoded: dict[tuple, bytes] = {}
        for spec, target in targets:
            circuit = target.circuit
            if not circuit.connected:
                continue
            try:
                if _unfiltered(target.channel_filter) and circuit.events_on.is_set():
                    count = target.data_count or len(values)
                    key = (target.data_type, count)
                    data = encoded.get(key)
                    if data is None:
                        data = encoded[key] = _encode(target.data_type, count, metadata,
                                                      values)
                    self.collect(circuit, Update(target.subscriptionid, data))
                else:
                    await self._subscription_queue_send(spec, target, metadata=metadata,
                                                        values=values, flags=flags)
            except Exception:
                log.exception("monitor update of %s for %s failed",
                              getattr(spec.db_entry, "pvname", spec.db_entry),
                              circuit.who())


    async def fan_out(self, chan, data_type, specs, data: bytes, count: int) -> None:
        """Hand one update encoded by :func:`publish` (subscription id 0, ``count``
        elements) to each subscriber of ``specs``; those it does not fit take caproto's
        path."""
        subscriptions = self.subscriptions
        read = None
        for spec in specs:
            for target in tuple(subscriptions.get(spec, ())):
                circuit = target.circuit
                if not circuit.connected:
                    continue
                try:
                    if target.data_count in (0, count) and circuit.events_on.is_set() \
                            and _unfiltered(target.channel_filter):
                        self.collect(circuit, Update(target.subscriptionid, data))
                        continue
                    if read is None:
                        read = await chan._read(data_type)
                    await self._subscription_queue_send(spec, target, metadata=read[0],
                                                        values=read[1], flags=VALUE_CHANGE)
                except Exception:
                    log.exception("monitor update of %s for %s failed",
                                  getattr(chan, "pvname", chan), circuit.who())


class Update:
    """One encoded monitor update (an EventAddResponse) for one subscription."""

    __slots__ = ("subscriptionid", "data")

    def __init__(self, subscriptionid: int, encoded: bytes):
        self.subscriptionid = subscriptionid
        data = bytearray(encoded)
        _SUBSCRIPTION_ID.pack_into(data, 12, subscriptionid)  # the header's parameter2
        self.data = bytes(data)

    def __len__(self) -> int:
        return len(self.data)


_SUBSCRIPTION_ID = struct.Struct(">I")


def _unfiltered(channel_filter) -> bool:
    return channel_filter.arr is None and channel_filter.dbnd is None and \
        channel_filter.sync is None and not channel_filter.ts


def _encode(data_type, count: int, metadata, values) -> bytes:
    """An EventAddResponse as caproto makes it for this update (subscription id 0)."""
    if count != len(values):
        values = values[:count]
    command = ca.EventAddResponse(values, data_type, count, 1, 0, metadata=metadata)
    return b"".join([bytes(command.header), *map(bytes, command.buffers)])


_HEADER = struct.Struct(">HHHHII")      # a CA message header (EventAddResponse: 1)
_TIME_META = struct.Struct(">hh8s")     # status, severity, time stamp of a DBR_TIME_*
#: Per native type: the bytes between a DBR_TIME_* struct's stamp and its value.
_TIME_PAD = {ChannelType.ENUM: 2, ChannelType.CHAR: 3, ChannelType.LONG: 0,
             ChannelType.DOUBLE: 4}
_TIME_OF = {native: ChannelType(native + ChannelType.TIME_STRING) for native in _TIME_PAD}


def _wire_value(chan) -> tuple[bytes, int] | None:
    """A lock PV's value as CA elements (big-endian) and their count; None for values
    only caproto converts."""
    value, native = chan._data["value"], chan.data_type
    if native == ChannelType.ENUM:
        strings = chan._data.get("enum_strings") or ()
        if isinstance(value, str) and value in strings:
            return struct.pack(">H", list(strings).index(value)), 1
    elif native == ChannelType.LONG:
        if isinstance(value, int):
            return struct.pack(">i", value), 1
    elif native == ChannelType.DOUBLE:
        if isinstance(value, (float, int)):
            return struct.pack(">d", value), 1
    elif native == ChannelType.CHAR:
        if isinstance(value, str) and chan.string_encoding:
            data = value.encode(chan.string_encoding)
            return data, len(data)
    return None


def _encode_update(chan, data_type, elements: bytes, count: int) -> bytes | None:
    """An EventAddResponse of ``chan`` as ``data_type`` (its native or TIME type), byte
    for byte as caproto makes it (subscription id 0); None for other types."""
    native = chan.data_type
    if data_type == native:
        payload = elements
    elif data_type == _TIME_OF.get(native):
        alarm = chan.alarm
        payload = (_TIME_META.pack(alarm.status, alarm.severity,
                                   bytes(chan._data["timestamp"]))
                   + bytes(_TIME_PAD[native]) + elements)
    else:
        return None
    size = len(payload)
    padded = (size + 7) & ~7
    if padded >= 0xFFFF or count >= 0xFFFF:
        return None  # an extended header: caproto's
    return _HEADER.pack(1, padded, data_type, count, 1, 0) + payload + bytes(padded - size)
