"""Real Redis and a real bluesky-queueserver RE Manager for the tests, on free ports.

``Redis`` runs Debian's ``redis-server`` in a temporary directory (no persistence) and
``REManager`` runs the unmodified ``start-re-manager`` with the shared startup directory
(``clients/startup``), the CA environment of the test network and its own ZMQ control
and info ports. Both run in their own process group and are stopped (TERM, then KILL)
with every child, so nothing is left behind.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from bluesky_queueserver_api.zmq import REManagerAPI

from demo.processes import stop_group

from epics_env import REPO, CANetwork, free_port, wait_until

STARTUP_DIR = REPO / "clients" / "startup"
QSERVER_DIR = REPO / "clients" / "qserver"
PERMISSIONS = QSERVER_DIR / "user_group_permissions.yaml"


def _start(argv: list[str], log: Path, env: dict, cwd: Path | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                start_new_session=True)


class Redis:
    """``redis-server`` on a free port of 127.0.0.1, data in ``workdir`` only."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "redis.log"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Redis":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found: run `make test` (it installs Debian's "
                               "redis-server through .ci/setup-system)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = _start([exe, "--port", str(self.port), "--bind", "127.0.0.1",
                            "--dir", str(self.workdir), "--save", "", "--appendonly", "no",
                            "--daemonize", "no", "--protected-mode", "yes"],
                           self.log_path, dict(os.environ))
        try:
            wait_until(self._pong, 20, 0.05, what=f"redis on port {self.port}")
        except AssertionError:
            self.stop()
            raise AssertionError(f"redis did not start; log:\n{self.log()}") from None
        return self

    def _pong(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"redis exited with {self.proc.returncode}:\n{self.log()}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    def stop(self) -> None:
        stop_group(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class REManager:
    """The unmodified ``start-re-manager`` with the shared startup directory.

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
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "re-manager.log"
        self._api: REManagerAPI | None = None

    @property
    def control_addr(self) -> str:
        return f"tcp://127.0.0.1:{self.control_port}"

    @property
    def info_addr(self) -> str:
        return f"tcp://127.0.0.1:{self.info_port}"

    def argv(self) -> list[str]:
        exe = Path(sys.executable).with_name("start-re-manager")
        return [str(exe),
                "--startup-dir", str(self.startup_dir),
                "--existing-plans-devices", str(self.workdir / "existing_plans_and_devices.yaml"),
                "--user-group-permissions", str(self.permissions),
                "--redis-addr", self.redis.addr,
                "--zmq-control-addr", f"tcp://127.0.0.1:{self.control_port}",
                "--zmq-info-addr", f"tcp://127.0.0.1:{self.info_port}",
                "--zmq-publish-console", "ON",
                "--console-output", "ON"]

    def env(self) -> dict:
        env = self.net.client_env()
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, open_environment: bool = True) -> "REManager":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = _start(self.argv(), self.log_path, self.env(), cwd=self.workdir)
        try:
            wait_until(self._answers, 60, 0.2, what="RE Manager to answer on ZMQ")
            if open_environment:
                self.open_environment()
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"start-re-manager exited with {self.proc.returncode}; "
                                 f"log:\n{self.log()[-4000:]}")
        return self.api.status().get("manager_state") == "idle"

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
        stop_group(self.proc, timeout=15)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
