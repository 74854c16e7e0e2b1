"""A WebSocket proxy that replays one of ophyd-websocket's own messages late.

ophyd-websocket 0.1.1 sends a PV's value from two threads of ophyd when a subscription
connects: the monitor's first event, and a replay of the value ophyd had cached when
the connection callback ran (``add_callback(run_now=True)``). Both copies are the same
message (same value, same IOC timestamp); which one reaches the socket last is up to the
thread scheduler. Under load the replay can come after a newer monitor update, so a page
sees a PV go *back* to an old value. The proxy makes that order certain: it forwards
everything unchanged, keeps a copy of the first message that ``hold`` matches, and sends
that copy again right after the first later message that ``release_after`` matches.
"""
from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

Message = dict[str, Any]


class ReplayProxy:
    """``ws://127.0.0.1:<port>/<path>`` -> ``<upstream>/<path>`` with one late replay."""

    def __init__(self, upstream: str, hold: Callable[[Message], bool],
                 release_after: Callable[[Message], bool]) -> None:
        self.upstream = upstream.rstrip("/")
        self.hold, self.release_after = hold, release_after
        self.held: str | None = None
        self.replayed = threading.Event()
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> "ReplayProxy":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("replay proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with serve(self._session, "127.0.0.1", 0, max_size=None) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    async def _session(self, client) -> None:
        async with connect(self.upstream + client.request.path, max_size=None) as upstream:
            async def down() -> None:
                async for raw in upstream:
                    await client.send(raw)
                    msg = _parse(raw)
                    if self.held is None and self.hold(msg):
                        self.held = raw
                    elif self.held is not None and not self.replayed.is_set() \
                            and self.release_after(msg):
                        await client.send(self.held)   # the late copy
                        self.replayed.set()

            async def up() -> None:
                async for raw in client:
                    await upstream.send(raw)

            tasks = [asyncio.create_task(down()), asyncio.create_task(up())]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            except ConnectionClosed:
                pass
            finally:
                for task in tasks:
                    task.cancel()


def _parse(raw: str | bytes) -> Message:
    try:
        msg = json.loads(raw)
    except ValueError:
        return {}
    return msg if isinstance(msg, dict) else {}
