"""The remote half of the system on free loopback ports, for the tests and the benchmark:
bluesky-httpserver, one ophyd-websocket seat per web user, nginx in front (docs/remote.md).

Each service is described once, in the launcher (``demo/services.py``: ``httpserver``,
``web_seat``, ``web_gateway``, started together by ``WebAccess``), exactly as ``make demo``
starts them. :class:`RemoteStack` is the tests' thin layer over it: the lock IOC, beamline
softIoc with the ACF, Redis and RE Manager (``tests/epics_env.py``, ``tests/qserver_env.py``,
themselves launcher services), then ``WebAccess`` on free ports into a launcher ``Stack``;
and it gives clients what they need: the HTTPS URL, the local CA that signed nginx's
certificate, logins and API keys, WebSockets through nginx.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import ssl
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from epics_env import ME, TEST_CONFIG, CANetwork, LockIOC, user_dir  # puts demo/ on the path
from ws_env import WsClient

from demo import services  # noqa: E402
from demo.services import CERT_NAMES, PASSWORD_PROVIDER as PROVIDER  # noqa: E402,F401

httpserver_config = services.client_module("httpserver_config")
nginx_config = services.client_module("nginx_config")

#: nginx runs unprivileged: as Debian's www-data when started by root.
NGINX_USER = "www-data" if os.getuid() == 0 else None
#: bluesky-httpserver runs as the queue's account (the dictionary provider needs no more;
#: PAM would need its group ``shadow``).
HTTPSERVER_USER = "bluesky" if os.getuid() == 0 else None
#: OS accounts the web users of the tests are (created by .ci/setup-system): staff,
#: operator, an observer (no lock group), and mallory, who has a password but no role.
ACCOUNTS = ("alice", "bob", "operator", "observer", "mallory")
OBSERVERS = ("observer",)
#: Whose ophyd-websocket seat the stack starts (each as that OS account).
WEB_USERS = ("alice", "bob", "operator", "observer")


def lock_config_text(prefix: str, state: Path) -> str:
    """The tests' lock config; this process's account (the RE worker's) is in ``queue``."""
    return TEST_CONFIG.format(prefix=prefix, state=state).replace(
        "users: [bluesky]", f"users: [bluesky, {ME}]")


class RemoteStack:
    """Lock IOC, beamline softIoc (ACF), Redis, RE Manager, bluesky-httpserver, a seat per
    web user, nginx: all real, on free ports of 127.0.0.1.

    ``seat_users``: whether each seat runs as its web user's OS account (the design) or as
    this process's account.
    """

    LOCK, BEAMLINE = "TST:LOCK:", "TST:"

    def __init__(self, workdir: Path, *, web_users: Iterable[str] = WEB_USERS,
                 observers: Iterable[str] = OBSERVERS, seat_users: bool = True,
                 access_token_max_age: float | None = None,
                 manager_env: Mapping[str, str] | None = None,
                 open_environment: bool = True) -> None:
        from qserver_env import REManager, Redis
        self.workdir = workdir
        # Runtime directories, each only its service's account may use (tmp_path is
        # private to this process's account).
        self.state = {"httpserver": user_dir(HTTPSERVER_USER, "httpserver"),
                      "nginx": user_dir(NGINX_USER, "nginx")}
        self.net = CANetwork()
        self.lock = LockIOC(self.net, workdir, prefix=self.LOCK,
                            config_text=lock_config_text(self.LOCK,
                                                         workdir / "lock-state.sqlite3"))
        self.web_users = tuple(web_users)
        self.observers = tuple(observers)
        self.passwords = {u: secrets.token_urlsafe(12) for u in ACCOUNTS}
        self.redis = Redis(workdir / "redis")
        self.manager = REManager(self.net, workdir / "manager", self.redis, env={
            "LOCK_PREFIX": self.LOCK, "BEAMLINE_PREFIX": self.BEAMLINE,
            "LOCK_CONNECT_TIMEOUT": "10", **(manager_env or {})})
        self.seat_users = seat_users
        self.access_token_max_age = access_token_max_age
        self.open_environment = open_environment
        self.beamline = None
        self.access: services.WebAccess | None = None
        #: The launcher's stack the remote half runs in (logs: ``log(name)``).
        self.stack = services.Stack(workdir)
        self.services: dict[str, services.Service] = {}
        self.running: dict[str, services.Launched] = {}
        self._launched: dict[str, services.Launched] = {}
        self._started: list = []
        self._ssl_cert_file = os.environ.get("SSL_CERT_FILE")   # api() sets it; stop() restores

    # -- lifecycle
    def start(self) -> RemoteStack:
        from beamline_env import SoftIoc
        try:
            self._started.append(self.lock.start())
            self.beamline = SoftIoc(self.net, self.workdir, self.lock.config,
                                    prefix=self.BEAMLINE)
            self._started.append(self.beamline.start())
            self._started.append(self.redis.start())
            self._started.append(self.manager.start(self.open_environment))
            self.describe()
            self._launched = self.access.start(self.stack, described=self.services)
            self.running = dict(self._launched)
        except BaseException:
            self.stop()
            raise
        return self

    def describe(self) -> None:
        """Describe httpserver, the seats and nginx (``demo.services.WebAccess``) on free
        ports, fixed from here on."""
        self.access = services.WebAccess(
            lock_config=self.lock.config, lock_prefix=self.LOCK,
            beamline_prefix=self.BEAMLINE, zmq_control=self.manager.control_addr,
            zmq_info=self.manager.info_addr, ca_env=self.net.client_env,
            passwords=self.passwords, observers=self.observers, web_users=self.web_users,
            ports=services.WebAccess.free_ports(self.web_users),
            dirs={**self.state, "tls": self.state["nginx"] / "tls"},
            httpserver_user=HTTPSERVER_USER, nginx_user=NGINX_USER,
            seats_as_web_users=self.seat_users and os.getuid() == 0,
            access_token_max_age=self.access_token_max_age)
        self.services = self.access.services()

    def log(self, name: str) -> Path:
        """Where service ``name`` ("httpserver", "seat:alice", "nginx") writes its output."""
        return self.workdir / f"{services.WebAccess.log_name(name)}.log"

    def start_service(self, name: str) -> services.Launched:
        """Start service ``name`` again after ``stop_service``."""
        self.running[name] = self.stack.restart(self._launched[name])
        return self.running[name]

    def stop_service(self, name: str) -> None:
        """Stop service ``name``; its ports stay held for ``start_service``."""
        launched = self.running.pop(name, None)
        if launched is not None:
            launched.stop(hold=True)

    def stop(self) -> None:
        self.stack.stop()
        self.running.clear()
        for part in reversed(self._started):
            part.stop()
        self._started.clear()
        for path in self.state.values():
            shutil.rmtree(path, ignore_errors=True)
        if self._ssl_cert_file is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = self._ssl_cert_file

    def __enter__(self) -> RemoteStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what clients need
    @property
    def https_port(self) -> int:
        return self.services["nginx"].ports["https"]

    @property
    def url(self) -> str:
        """The one door: https://localhost:<port>."""
        return f"https://{CERT_NAMES[0]}:{self.https_port}"

    @property
    def http_url(self) -> str:
        return f"http://{CERT_NAMES[0]}:{self.services['nginx'].ports['http']}"

    @property
    def direct_url(self) -> str:
        """bluesky-httpserver itself, behind nginx (for comparison only)."""
        return f"http://127.0.0.1:{self.services['httpserver'].ports['http']}"

    @property
    def ca_file(self) -> Path:
        """The local CA nginx's certificate chains to: what a client trusts."""
        return self.state["nginx"] / "tls" / "ca.crt"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def wss(self, path: str) -> str:
        return f"wss://{CERT_NAMES[0]}:{self.https_port}{path}"

    def api(self, user: str | None = None, password: str | None = None):
        """bluesky-queueserver-api in HTTP mode through nginx, logged in as ``user``. TLS
        is verified against the local CA (``SSL_CERT_FILE``, as a remote user sets it)."""
        from bluesky_queueserver_api.http import REManagerAPI
        os.environ["SSL_CERT_FILE"] = str(self.ca_file)
        api = REManagerAPI(http_server_uri=self.url, http_auth_provider=f"/{PROVIDER}/token")
        if user is not None:
            api.login(user, password=password or self.passwords[user])
        return api

    def api_key(self, user: str, expires_in: int = 900, scopes: list[str] | None = None) -> str:
        """A new API key of ``user`` (logged in with their password), through nginx."""
        api = self.api(user)
        try:
            return api.apikey_new(expires_in=expires_in, scopes=scopes)["secret"]
        finally:
            api.close()

    def subscribes(self, **socket_args) -> bool:
        """A PV socket through nginx (``socket()``'s arguments) opens, and the seat behind
        answers a subscription to the lock's State."""
        client = self.socket("pv-socket", **socket_args)
        try:
            answer = client.request({"action": "subscribe", "pvs": [self.LOCK + "State"]},
                                    lambda m: m.get("action") == "subscribe")
            return answer["subscribed"] == [self.LOCK + "State"]
        finally:
            client.close()

    def socket(self, path: str, *, api_key: str | None = None,
               headers: Mapping[str, str] | None = None) -> GatewaySocket:
        """A WebSocket through nginx to ``/ophyd/api/v1/<path>``, the key in the query as a
        browser's page would send it (or ``headers``, e.g. a Cookie)."""
        url = self.wss(f"/ophyd/api/v1/{path}") + (f"?api_key={api_key}" if api_key else "")
        return GatewaySocket(url, self.ssl_context(), headers=headers)


class GatewaySocket(WsClient):
    """``ws_env.WsClient`` over TLS through nginx (verified against the local CA), with
    extra handshake headers (a browser's Cookie or Origin).

    It runs websockets' asyncio client on an event loop of its own: the threaded client
    reads and writes one ``ssl.SSLSocket`` from two threads, which is not safe (now and
    then the upgrade request never leaves; python-socketio#1568 measured the same with
    Python 3.12). The asyncio client does all TLS I/O in one thread.
    """

    def __init__(self, url: str, context: ssl.SSLContext, *,
                 headers: Mapping[str, str] | None = None, timeout: float = 10) -> None:
        from websockets.asyncio.client import connect as aconnect
        self.messages = []
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._reader = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._reader.start()
        try:
            async def open_() -> object:
                return await aconnect(url, ssl=context, additional_headers=dict(headers or {}),
                                      open_timeout=timeout, max_size=None)
            self.ws = self._call(open_(), timeout + 5)
        except BaseException:
            self._stop_loop()
            raise
        self._reading = asyncio.run_coroutine_threadsafe(self._read_async(), self._loop)

    def _call(self, coro, timeout: float = 15):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _read_async(self) -> None:
        try:
            async for raw in self.ws:
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

    def send(self, **msg) -> int:
        """Send ``msg`` as JSON; returns the index of the next message to arrive."""
        start = self.mark()
        self._call(self.ws.send(json.dumps(msg)))
        return start

    def wait_closed(self, timeout: float = 15) -> tuple[int | None, str | None]:
        """Wait until the server closes the connection: (close code, reason)."""
        self._reading.result(timeout)
        return self.ws.close_code, self.ws.close_reason

    def close(self) -> None:
        try:
            self._call(self.ws.close())
            self._reading.result(5)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._reader.join(5)
        self._loop.close()
