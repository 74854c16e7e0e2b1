"""The real ophyd-websocket server and a real websocket client, for the tests.

``OphydWebsocket`` runs the unmodified ``ophyd-websocket`` console script of the
installation every account runs, as the seat's service account ``oaswww`` (its CA
identity), on a free port, configured only through its environment: the documented seat
configuration ``clients/websocket/seat.env`` (``OAS_STARTUP_DIR=clients/startup``, the
shared gated startup directory, relative to the installed copy of the checkout it runs
in, ``$BEAMLINE_LOCK_PREFIX/share``), then ``OAS_HOST``/``OAS_PORT``,
the CA environment of the test network and the seat's ``LOCK_*`` settings. It runs in
its own process group, which ``stop()`` always kills entirely.

``WsClient`` is a plain ``websockets`` client whose reader thread stamps every message
with ``time.monotonic()`` on arrival, so a test can compare when an update arrived with
when the CA put that caused it returned.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from websockets.sync.client import ClientConnection, connect

from demo import services
from demo.services import stop_group

from epics_env import REPO, TEST_CONFIG, CANetwork, free_port

#: The seat's OS account (.ci/setup-system): its CA identity is ``oaswww@host``.
SEAT_USER = "oaswww"


def web_seat_config(prefix: str, state: Path) -> str:
    """The test lock config plus a ``web`` group holding only the seat's account (its CA
    identity). That account is in no other group, so the device IOC's ACF gates the
    seat's direct PV writes on ``Gate:web``."""
    return (TEST_CONFIG.format(prefix=prefix, state=state)
            + f"  web:      {{users: [{SEAT_USER}]}}\n")


class OphydWebsocket:
    """``ophyd-websocket`` on a free port of 127.0.0.1, one lock seat
    (``demo.services.ophyd_websocket``).

    ``session``: the seat's ``LOCK_SESSION`` (e.g. ``web:alice``): its gated devices write
    while the lock is held by the seat's account under that session (or while Free, with
    ``allow_free_writes``). ``env``: further environment, applied last.
    """

    def __init__(self, net: CANetwork, workdir: Path, *, lock_prefix: str,
                 beamline_prefix: str, session: str | None, allow_free_writes: bool = False,
                 name: str = "ows", env: dict[str, str] | None = None) -> None:
        self.net, self.port = net, free_port()
        self.log_path = workdir / f"{name}.log"
        settings = dict(LOCK_PREFIX=lock_prefix, BEAMLINE_PREFIX=beamline_prefix,
                        LOCK_SESSION=session or "",
                        LOCK_ALLOW_FREE_WRITES="1" if allow_free_writes else "0",
                        LOCK_CONNECT_TIMEOUT="10")
        settings.update(env or {})      # applied last
        self.service = services.ophyd_websocket(self.port, net.client_env(), settings,
                                                user=SEAT_USER, name=name)
        self.env = self.service.env
        self.launched: services.Launched | None = None

    @property
    def proc(self):
        return self.launched.proc if self.launched else None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    @property
    def pv_socket(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/v1/pv-socket"

    @property
    def device_socket(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/v1/device-socket"

    def start(self, timeout: float = 90) -> OphydWebsocket:
        """Start it and wait until its registry lists the startup directory's devices."""
        self.launched = services.Launched(self.service, self.log_path).start()
        try:
            self.launched.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """TERM the whole process group, KILL what is left of it, reap the leader."""
        if self.launched:
            self.launched.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


Message = dict[str, Any]


class WsClient:
    """A websocket client whose reader thread keeps every message with its arrival time."""

    def __init__(self, url: str, timeout: float = 10) -> None:
        # Entered like ``with connect(...)`` (what websockets >= 17.1 asks for); close()
        # is the exit.
        self.ws: ClientConnection = connect(url, open_timeout=timeout,
                                            max_size=None).__enter__()
        self.messages: list[tuple[float, Message]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for raw in self.ws:
                now = time.monotonic()
                try:
                    msg = json.loads(raw)
                except ValueError:
                    msg = {"unparsed": raw}
                with self._cond:
                    self.messages.append((now, msg))
                    self._cond.notify_all()
        except Exception:  # noqa: BLE001 - connection closed: waiters time out and say so
            pass

    def send(self, **msg: Any) -> int:
        """Send ``msg`` as JSON; returns the index of the next message to arrive."""
        with self._cond:
            start = len(self.messages)
        self.ws.send(json.dumps(msg))
        return start

    def mark(self) -> int:
        with self._cond:
            return len(self.messages)

    def wait_for(self, match: Callable[[Message], bool], timeout: float = 15,
                 start: int = 0, what: str = "") -> tuple[float, Message]:
        """The first message from index ``start`` on that ``match``es: (arrival, message)."""
        deadline = time.monotonic() + timeout
        seen = start
        with self._cond:
            while True:
                for arrived, msg in self.messages[seen:]:
                    if match(msg):
                        return arrived, msg
                seen = len(self.messages)
                left = deadline - time.monotonic()
                if left <= 0:
                    recent = [m for _, m in self.messages[start:]][-15:]
                    raise AssertionError(f"no websocket message {what or match} within "
                                         f"{timeout} s; recent: {recent}")
                self._cond.wait(left)

    def request(self, msg: Message, match: Callable[[Message], bool], wait: float = 15,
                what: str = "") -> Message:
        """Send ``msg`` and wait (up to ``wait`` s) for the reply that ``match``es."""
        return self.wait_for(match, wait, self.send(**msg), what or str(msg))[1]

    def close(self) -> None:
        self.ws.close()
        self._reader.join(5)


def lock_shim() -> Path:
    """The web page's lock client (web/src/lock/client.ts: PV store, keep-alive, socket
    wiring) bundled for node by ``npm run shim`` (web/src/lock/shim.ts)."""
    web = REPO / "web"
    for argv in ([str(web / "build")], ["npm", "--prefix", str(web), "run", "--silent", "shim"]):
        run = subprocess.run(argv, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{run.stdout}\n{run.stderr}")
    return web / "node_modules" / ".cache" / "lock-shim.cjs"


class Page:
    """The web page's lock client run by node against a real seat (``lock_shim``),
    driven as the page's buttons drive it (``take LEASE NOTE``, ``release``);
    ``views`` is what the page would show."""

    def __init__(self, url: str, prefix: str, session: str) -> None:
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node not found: the web page tests need Node.js >= 20")
        self.views: list[dict] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [node, "--experimental-websocket", "--no-warnings", str(lock_shim()), url, prefix,
             session],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.views.append(json.loads(line))
                self._cond.notify_all()

    def do(self, command: str) -> None:
        """``take LEASE NOTE...``, ``release``, ``renew``, ``request LEASE NOTE...``,
        ``withdraw`` or ``handover``, as the page's buttons do."""
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def wait_for(self, match: Callable[[dict], bool], timeout: float = 15,
                 what: str = "") -> dict:
        """The page's current view once it ``match``es."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (self.views and match(self.views[-1])):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(
                        f"the page never showed {what or match} within {timeout} s; last "
                        f"views: {self.views[-5:]}; stderr: {self._stderr()}")
                self._cond.wait(min(left, 0.5))
            return self.views[-1]

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return "(running)"
        return self.proc.stderr.read()

    def close(self) -> None:
        stop_group(self.proc, timeout=5)
