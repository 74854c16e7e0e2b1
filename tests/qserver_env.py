"""Real Redis and a real bluesky-queueserver RE Manager for the tests, on free ports.

``Redis`` runs Debian's ``redis-server`` in a temporary directory (no persistence) and
``REManager`` runs the unmodified ``start-re-manager`` with the shared startup directory
(``clients/startup``), the CA environment of the test network and its own ZMQ control
and info ports. Both are described once in ``demo/services.py`` (as for ``make demo``),
run in their own process group and are stopped (TERM, then KILL) with every child, so
nothing is left behind.
"""
from __future__ import annotations

from pathlib import Path

from bluesky_queueserver_api.zmq import REManagerAPI

from demo import services
from demo.services import stop_group  # noqa: F401 - the tests' way to stop a process group

from epics_env import REPO, CANetwork, free_port

STARTUP_DIR = REPO / "clients" / "startup"
QSERVER_DIR = REPO / "clients" / "qserver"
PERMISSIONS = QSERVER_DIR / "user_group_permissions.yaml"


class Redis:
    """``redis-server`` on a free port of 127.0.0.1, data in ``workdir`` only
    (``demo.services.redis``)."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.launched: services.Launched | None = None
        self.log_path = workdir / "redis.log"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def proc(self):
        return self.launched.proc if self.launched else None

    def start(self) -> "Redis":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.launched = services.Launched(services.redis(self.port, self.workdir),
                                          self.log_path).start()
        try:
            self.launched.wait_ready()
        except RuntimeError as exc:
            self.stop()
            raise AssertionError(f"redis did not start: {exc}") from None
        return self

    def stop(self) -> None:
        if self.launched:
            self.launched.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class REManager:
    """The unmodified ``start-re-manager`` with the shared startup directory
    (``demo.services.re_manager``).

    ``env``: extra environment (lock and beamline prefixes, guard settings) on top of
    the CA client environment of ``net``. The list of existing plans and devices is
    written to ``workdir`` when the environment opens (never into the repository).
    """

    def __init__(self, net: CANetwork, workdir: Path, redis: Redis, *,
                 env: dict | None = None, startup_dir: Path = STARTUP_DIR,
                 permissions: Path = PERMISSIONS):
        self.net, self.workdir, self.redis = net, workdir, redis
        self.extra_env = dict(env or {})
        self.startup_dir, self.permissions = startup_dir, permissions
        self.control_port, self.info_port = free_port(), free_port()
        while self.info_port == self.control_port:
            self.info_port = free_port()
        self.launched: services.Launched | None = None
        self.log_path = workdir / "re-manager.log"
        self._api: REManagerAPI | None = None

    @property
    def control_addr(self) -> str:
        return f"tcp://127.0.0.1:{self.control_port}"

    @property
    def info_addr(self) -> str:
        return f"tcp://127.0.0.1:{self.info_port}"

    @property
    def proc(self):
        return self.launched.proc if self.launched else None

    def describe(self) -> services.Service:
        return services.re_manager(
            self.workdir, self.redis.addr, self.control_port, self.info_port, self.env(),
            startup_dir=self.startup_dir, permissions=self.permissions,
            extra_args=("--console-output", "ON"))

    def argv(self) -> list[str]:
        return self.describe().argv

    def env(self) -> dict:
        env = self.net.client_env()
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, open_environment: bool = True) -> "REManager":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.launched = services.Launched(self.describe(), self.log_path).start()
        try:
            try:
                self.launched.wait_ready()
            except RuntimeError as exc:
                raise AssertionError(str(exc)) from None
            if open_environment:
                self.open_environment()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def api(self) -> REManagerAPI:
        if self._api is None:
            self._api = REManagerAPI(zmq_control_addr=self.control_addr,
                                     zmq_info_addr=self.info_addr, timeout_recv=5)
        return self._api

    def open_environment(self, timeout: float = 90) -> None:
        """Open the RE Worker environment (loads the startup dir) and wait until ready."""
        resp = self.api.environment_open()
        assert resp["success"], resp
        self.api.wait_for_idle(timeout=timeout)
        status = self.api.status()
        if not status["worker_environment_exists"]:
            raise AssertionError("RE Worker environment failed to open; log:\n"
                                 + self.log()[-6000:])

    def stop(self) -> None:
        if self._api is not None:
            try:
                self._api.close()
            except Exception:  # noqa: BLE001 - best effort, the group is killed below
                pass
            self._api = None
        if self.launched:
            self.launched.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
