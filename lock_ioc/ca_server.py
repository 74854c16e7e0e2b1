"""caproto's asyncio CA server, made so that a client that stops reading hurts only itself.

caproto (1.3) feeds every client's monitor updates from one context-wide task through a
bounded per-client queue whose ``put`` waits when the queue is full: one client that stops
reading (a suspended laptop, a frozen GUI) fills its queue and stops monitor updates for
every client; and as that task iterates caproto's live subscription lists across the wait,
a client subscribing or leaving meanwhile ends the server ("deque mutated during
iteration"). Like EPICS base's RSRV, here each client has its own bounded queue and its own
sending task:

* :class:`PendingUpdates` replaces the circuit's ``subscription_queue`` (the attribute
  caproto's server circuits define for this); ``put`` never waits.
* :class:`LockCircuit` sends from its own task and drops a client whose socket has not
  taken data for ``stall_timeout`` seconds;
* :class:`LockServerContext` hands each update to a snapshot of the subscribers.

caproto is used, not patched: these are subclasses of its asyncio server classes.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import socket

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


class PendingUpdates:
    """One client's monitor updates not yet handed to its socket.

    In order while the client keeps up; past ``limit`` bytes only the latest update of
    each subscription is kept, so a slow client may skip intermediate values but never
    ends on a stale one, and its memory stays bounded.
    """

    def __init__(self, limit: int = PENDING_LIMIT):
        self._base = self._limit = limit
        self._items: list = []
        self._bytes = 0
        self._ready = asyncio.Event()
        self.coalesced = 0  # updates skipped so far (for the log)

    async def put(self, ref) -> None:
        """caproto's interface: a weak reference to an EventAddResponse. Never waits."""
        command = ref()
        if command is not None:
            self.add(command)

    def add(self, command) -> None:
        self._items.append(command)
        self._bytes += len(command)
        if self._bytes > self._limit:
            self._coalesce()
        self._ready.set()

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

    async def take(self) -> list:
        """Wait for updates; all of them, oldest first."""
        await self._ready.wait()
        self._ready.clear()
        items, self._items, self._bytes, self._limit = self._items, [], 0, self._base
        return items


class LockCircuit(_AsyncioCircuit):
    """A client's circuit: exposes the request being handled (see :data:`REQUEST`) and
    sends monitor updates from its own task, dropping the client when stuck."""

    context: "LockServerContext"

    def __init__(self, circuit, client, context, **kwargs):
        super().__init__(circuit, client, context, **kwargs)
        self.subscription_queue = PendingUpdates()

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
            self.subscription_queue.discard({sub.subscriptionid for _, sub in removed})
        return removed

    async def subscription_queue_loop(self):
        """Send this client's pending updates, all at once, whenever there are some."""
        self.events_on.set()
        pending: PendingUpdates = self.subscription_queue
        writer = self.client.writer
        high_water = writer.transport.get_write_buffer_limits()[1]
        while True:
            commands = await pending.take()
            if not commands:
                continue
            if not self.connected or writer.transport.is_closing():
                return
            try:
                writer.write(self._serialize(commands))
            except Exception:
                log.exception("could not send monitor updates to CA client %s", self.who())
                continue
            if writer.transport.get_write_buffer_size() > high_water:
                if not await self._drained(writer, pending):
                    return

    def _serialize(self, commands) -> bytes:
        try:
            return b"".join(self.circuit.send(*commands))
        except Exception:  # one bad update (a race with a cancel) must not lose the rest
            log.exception("monitor update refused by caproto's protocol state for %s",
                          self.who())
            out = []
            for command in commands:
                try:
                    out.extend(self.circuit.send(command))
                except Exception:
                    pass
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


class LockServerContext(_AsyncioContext):
    CircuitClass = LockCircuit

    def __init__(self, pvdb, interfaces=None, *, stall_timeout: float = STALL_TIMEOUT):
        super().__init__(pvdb, interfaces)
        self.stall_timeout = stall_timeout

    async def tcp_handler(self, client, addr):
        # Like EPICS base's RSRV: no Nagle. A command's reply and its burst of monitor
        # updates are separate small writes; with Nagle on, the updates wait for the
        # client's delayed ACK (~40 ms) whenever a previous segment is unacknowledged.
        sock = client.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return await super().tcp_handler(client, addr)

    async def _subscription_queue_iteration(self, sub_specs, metadata, values, flags, sub):
        """Hand one value to each subscriber, from a snapshot of the subscriber lists.

        ``sub`` set: a new subscription's first value, for it alone. One subscriber's
        failure is logged and never stops the updates of the others.
        """
        if sub is not None:
            targets = [(sub_specs[0], sub)]
        else:
            subscriptions = self.subscriptions
            targets = [(spec, s) for spec in sub_specs
                       for s in tuple(subscriptions.get(spec, ()))]
        for spec, target in targets:
            if not target.circuit.connected:
                continue
            try:
                await self._subscription_queue_send(spec, target, metadata=metadata,
                                                    values=values, flags=flags)
            except Exception:
                log.exception("monitor update of %s for %s failed",
                              getattr(spec.db_entry, "pvname", spec.db_entry),
                              target.circuit.who())
