"""The remote half of the system on free loopback ports: bluesky-httpserver, one
ophyd-websocket seat per web user, nginx in front (docs/remote.md).

Provisional: each service is described once, declaratively, by a small function that
returns a :class:`Service` (command, environment, ports, readiness, stop, OS account,
files to prepare), and :func:`start` runs any of them. This is the shape the one
launcher (``demo/services.py``) takes, so moving these functions there is mechanical.

:class:`RemoteStack` starts the whole system the way the tests and the benchmark need it:
lock IOC, beamline softIoc with the ACF, Redis, RE Manager (``tests/qserver_env.py``),
then httpserver, the seats and nginx; and it gives clients: the HTTPS URL, the local
CA that signed nginx's certificate, logins and API keys, WebSockets through nginx.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pwd
import secrets
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from demo.install import as_user
from demo.processes import Child

from epics_env import (ME, REPO, TEST_CONFIG, CANetwork, LockIOC, free_port, installation,
                       user_dir)
from ws_env import DEVICES, SEAT_ENV, WsClient, read_env_file

sys.path.insert(0, str(REPO / "clients" / "httpserver"))
sys.path.insert(0, str(REPO / "clients" / "nginx"))
import httpserver_config  # noqa: E402  clients/ is not a package
import nginx_config  # noqa: E402

#: nginx runs unprivileged: as Debian's www-data when started by root.
NGINX_USER = "www-data" if os.getuid() == 0 else None
#: bluesky-httpserver runs as the queue's account (the dictionary provider needs no more;
#: PAM would need its group ``shadow``).
HTTPSERVER_USER = "bluesky" if os.getuid() == 0 else None
#: Where nginx's certificate is valid; clients use the first.
CERT_NAMES = ("localhost", "127.0.0.1")
#: The provider name of httpserver_config.dictionary_provider (demo and tests).
PROVIDER = "local"
#: OS accounts the web users of the tests are (created by .ci/setup-system): staff,
#: operator, an observer (no lock group), and mallory, who has a password but no role.
ACCOUNTS = ("alice", "bob", "operator", "observer", "mallory")
OBSERVERS = ("observer",)
#: Whose ophyd-websocket seat the stack starts (each as that OS account).
WEB_USERS = ("alice", "bob", "operator", "observer")


@dataclasses.dataclass
class Service:
    """One server process, described once: what runs, as whom, where it listens, what
    must exist before it starts, when it is ready, how long it may take to stop. The same
    fields as the launcher's ``demo.services.Service``."""

    name: str
    argv: list[str]
    env: dict[str, str]
    #: OS account it runs as (like systemd's ``User=``); None: the caller's.
    user: str | None = None
    cwd: Path | None = None
    ports: dict[str, int] = dataclasses.field(default_factory=dict)
    #: Made before each start: ``.make(user)`` (a rendered config, a certificate ...).
    files: list = dataclasses.field(default_factory=list)
    ready: Callable[[], bool] | None = None
    ready_timeout: float = 90.0
    stop_timeout: float = 10.0


def start(service: Service, log: Path) -> Child:
    """Start ``service`` in its own process group, its output in ``log``, and wait until
    it is ready. TERM then KILL to the group (``Child.stop``) ends it with every child."""
    for item in service.files:
        item.make(service.user)
    child = Child(service.name, as_user(service.user, service.argv), env=service.env,
                  log=log, cwd=service.cwd).start()
    try:
        child.wait_ready(service.ready or (lambda: True), service.ready_timeout)
    except BaseException:
        child.stop(service.stop_timeout)
        raise
    return child


def account_env(env: Mapping[str, str], user: str | None) -> dict[str, str]:
    """``env`` with HOME, USER and LOGNAME of the account the process runs as."""
    out = dict(env)
    if user is not None:
        entry = pwd.getpwnam(user)
        out.update(HOME=entry.pw_dir, USER=user, LOGNAME=user)
    return out


def http_ready(url: str, ca_file: Path | None = None) -> Callable[[], bool]:
    """Ready when GET ``url`` answers 200 (HTTPS verified against ``ca_file``)."""
    def check() -> bool:
        context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        with urllib.request.urlopen(url, timeout=2, context=context) as answer:
            return answer.status == 200
    return check


# ---- files made before a start ---------------------------------------------------------
@dataclasses.dataclass
class HttpserverState:
    """httpserver's state directory: its config (rendered at every start), the token-
    signing secret (made once, kept: logins and keys survive restarts; it reaches the
    process as ``QSERVER_HTTP_SERVER_SERVER_SECRET_KEYS``), the database's place."""

    state: Path
    config_text: str
    env: dict[str, str]

    def make(self, user: str | None) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "config.yml").write_text(self.config_text)
        secret = self.state / "secret"
        if not secret.exists():
            secret.write_text(secrets.token_hex(32))
            secret.chmod(0o600)
        self.env["QSERVER_HTTP_SERVER_SERVER_SECRET_KEYS"] = secret.read_text().strip()
        if user is not None:
            subprocess.run(["chown", "-R", f"{user}:", str(self.state)], check=True)


@dataclasses.dataclass
class NginxRuntime:
    """nginx's runtime directory (clients/nginx/nginx_config.py): config, auth.js, static
    root, the local CA and certificate made at the first start; checked with ``nginx -t``
    as the account that runs it."""

    state: Path
    cert_names: tuple[str, ...]
    render_args: dict

    def make(self, user: str | None) -> None:
        conf = nginx_config.prepare(self.state, cert_names=self.cert_names, owner=user,
                                    **self.render_args)
        checked = nginx_config.check_config(conf, user)
        if checked.returncode != 0:
            raise RuntimeError(f"nginx -t rejected {conf}:\n{checked.stderr}")


# ---- the services ----------------------------------------------------------------------
def httpserver(state: Path, *, lock_config, passwords: Mapping[str, str],
               observers: Iterable[str], zmq_control: str, zmq_info: str,
               port: int | None = None, user: str | None = None,
               access_token_max_age: float | None = None) -> Service:
    """bluesky-httpserver as its docs say: ``uvicorn bluesky_httpserver.server:app`` with
    ``QSERVER_HTTP_SERVER_CONFIG``, from the installation, as OS account ``user``; roles
    from ``lock_config`` (a ``Config``), passwords from ``passwords`` (dictionary provider
    ``local``). Its secret and its database of sessions and API keys live in ``state``."""
    port = port or free_port()
    settings = httpserver_config.render(
        lock_config, provider=httpserver_config.dictionary_provider(passwords),
        observers=observers, access_token_max_age=access_token_max_age)
    env = account_env(os.environ, user)
    env.update(QSERVER_HTTP_SERVER_CONFIG=str(state / "config.yml"),
               BLUESKY_HTTPSERVER_STATE=str(state), QSERVER_ZMQ_CONTROL_ADDRESS=zmq_control,
               QSERVER_ZMQ_INFO_ADDRESS=zmq_info, PYTHONUNBUFFERED="1")
    return Service(
        "bluesky-httpserver",
        [str(installation().script("uvicorn")), "--host", "127.0.0.1", "--port", str(port),
         "bluesky_httpserver.server:app"],
        env, user=user, cwd=state, ports={"http": port},
        files=[HttpserverState(state, httpserver_config.dump(settings, lock_config.source),
                               env)],
        # /api/auth/scopes answers without the RE Manager (200, empty for no credentials).
        ready=http_ready(f"http://127.0.0.1:{port}/api/auth/scopes"))


def seat(net: CANetwork, *, web_user: str, lock_prefix: str, beamline_prefix: str,
         port: int | None = None, user: str | None = None) -> Service:
    """One ophyd-websocket seat for ``web_user``: ``clients/websocket/seat.env``, lock
    session ``web:<web_user>``, listening on loopback only, run as OS account ``user``
    (the web user's own account, so that its CA identity is theirs) from the
    installation every account runs (``demo/install.py``)."""
    port = port or free_port()
    inst = installation()
    env = account_env(net.client_env(), user)
    env.update(read_env_file(SEAT_ENV))
    env.update(OAS_HOST="127.0.0.1", OAS_PORT=str(port), LOCK_PREFIX=lock_prefix,
               BEAMLINE_PREFIX=beamline_prefix, LOCK_SESSION=f"web:{web_user}",
               LOCK_ALLOW_FREE_WRITES="0", LOCK_CONNECT_TIMEOUT="10", PYTHONUNBUFFERED="1")

    def lists_devices() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/devices",
                                    timeout=2) as answer:
            return tuple(sorted(json.load(answer).get("devices", []))) == DEVICES

    return Service(f"ophyd-websocket seat of {web_user}",
                   [str(inst.script("ophyd-websocket"))], env, user=user, cwd=inst.share,
                   ports={"http": port}, ready=lists_devices)


def nginx(state: Path, *, httpserver_port: int, seats: Mapping[str, int],
          http_port: int | None = None, https_port: int | None = None,
          user: str | None = NGINX_USER) -> Service:
    """Debian's nginx as an unprivileged process (``user``) on loopback ports, its whole
    runtime directory in ``state`` (config, auth.js, static root, certificate made at the
    first start). Ready when ``/`` answers over TLS verified against its local CA."""
    http_port, https_port = http_port or free_port(), https_port or free_port()
    runtime = NginxRuntime(state, CERT_NAMES, dict(
        http_port=http_port, https_port=https_port, httpserver=f"127.0.0.1:{httpserver_port}",
        seats=dict(seats), device_scope=httpserver_config.DEVICE_SCOPE))
    return Service("nginx", [nginx_config.NGINX, "-c", str(state / "nginx.conf"), "-e", "stderr"],
                   account_env(os.environ, user), user=user, cwd=state,
                   ports={"http": http_port, "https": https_port}, files=[runtime],
                   ready=http_ready(f"https://{CERT_NAMES[0]}:{https_port}/",
                                    state / "tls" / "ca.crt"),
                   ready_timeout=20)


# ---- the whole system ------------------------------------------------------------------
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
        self.services: dict[str, Service] = {}
        self.running: dict[str, Child] = {}
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
            for name in self.services:
                self.start_service(name)
        except BaseException:
            self.stop()
            raise
        return self

    def describe(self) -> None:
        """Describe httpserver, the seats and nginx (ports fixed from here on)."""
        from lock_ioc.config import load
        hs = httpserver(self.state["httpserver"],
                        lock_config=load(self.lock.config), passwords=self.passwords,
                        observers=self.observers, zmq_control=self.manager.control_addr,
                        zmq_info=self.manager.info_addr, user=HTTPSERVER_USER,
                        access_token_max_age=self.access_token_max_age)
        self.services["httpserver"] = hs
        for user in self.web_users:
            self.services[f"seat:{user}"] = seat(
                self.net, web_user=user, lock_prefix=self.LOCK,
                beamline_prefix=self.BEAMLINE, user=user if self.seat_users else None)
        self.services["nginx"] = nginx(
            self.state["nginx"], httpserver_port=hs.ports["http"],
            seats={u: self.services[f"seat:{u}"].ports["http"] for u in self.web_users})

    def log(self, name: str) -> Path:
        """Where service ``name`` ("httpserver", "seat:alice", "nginx") writes its output."""
        return self.workdir / f"{name.replace(':', '-')}.log"

    def start_service(self, name: str) -> Child:
        self.running[name] = start(self.services[name], self.log(name))
        return self.running[name]

    def stop_service(self, name: str) -> None:
        child = self.running.pop(name, None)
        if child is not None:
            child.stop(self.services[name].stop_timeout)

    def stop(self) -> None:
        for name in reversed(list(self.running)):
            self.stop_service(name)
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
