"""One description of each service of the stack, and one way to run it.

A :class:`Service` says everything needed to run one server: its command, environment,
OS account, working directory, ports, the files it needs made before it starts (a config
rendered into its work dir, a TLS certificate made at first start), how to tell that it is
ready, and how to stop it. :class:`Launched` runs one in its own process group (so a Ctrl-C
at a terminal reaches only the launcher, and stopping takes the whole group: workers and
children included) with its output in a log file. ``make demo`` (``demo/__main__.py``),
the tests' ``LockIOC``/``SoftIoc``/``Redis``/``REManager``/``OphydWebsocket``/``RemoteStack``
and the benchmarks all start services from the descriptions below; nothing else knows how.
The remote half (bluesky-httpserver, a seat per web user, nginx with the web page) is
:class:`WebAccess`.

Adding a service is describing it, e.g. an HTTPS front end under its own account::

    def frontend(work: Path, port: int) -> Service:
        cert, key = work / "tls" / "cert.pem", work / "tls" / "key.pem"
        return Service(
            "nginx", [NGINX, "-p", str(work), "-c", str(work / "nginx.conf"), ...],
            user="www-data", ports={"https": port},
            files=[SelfSignedCert(cert, key, names=("localhost", "127.0.0.1")),
                   Rendered(work / "nginx.conf", CONF.format(port=port, cert=cert, key=key))],
            ready=HTTPReady(f"https://127.0.0.1:{port}/", ca_file=cert))
"""
from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .install import Installation, as_user, me

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
#: CA's standard ports: never handed out as a "free" port (a stray server would answer).
CA_STANDARD_PORTS = (5064, 5065)
#: Server-side CA variables a client environment must not carry.
_CA_SERVER_VARS = ("EPICS_CA_SERVER_PORT", "EPICS_CAS_SERVER_PORT", "EPICS_CAS_INTF_ADDR_LIST",
                   "EPICS_CAS_BEACON_ADDR_LIST")


# ---- ports ----------------------------------------------------------------------------
def port_free(port: int) -> bool:
    """Whether 127.0.0.1:``port`` is free for TCP and UDP (CA uses both).

    The TCP probe binds with SO_REUSEADDR, as every server we run does: connections of a
    stopped server left in TIME-WAIT do not keep a new one from listening, so they must
    not make the port look busy either (only a socket that listens does)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((LOOPBACK, port))
            tcp.listen(1)
    except OSError:
        return False
    return udp_port_free(port)


def udp_port_free(port: int) -> bool:
    """Whether UDP 127.0.0.1:``port`` is free (the CA repeater's port is UDP only)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LOOPBACK, port))
    except OSError:
        return False
    return True


def free_port(taken: set[int] | None = None) -> int:
    """A port free for TCP and UDP on 127.0.0.1, not in ``taken`` (which it joins)."""
    taken = set() if taken is None else taken
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((LOOPBACK, 0))
            port = tcp.getsockname()[1]
        if port not in taken and port not in CA_STANDARD_PORTS and port_free(port):
            taken.add(port)
            return port
    raise RuntimeError("no free port on 127.0.0.1")


class PortHold:
    """127.0.0.1:``ports`` held (TCP and UDP) for a service that is down or starting.

    While a server is down its port is free for anyone on the machine: the kernel binds
    client sockets to free ports of its ephemeral range (where ours come from too), the CA
    repeater binds its clients' ports to test them, other runs' ``free_port`` probes them;
    whoever holds the port when the server binds it again makes the server fail with
    EADDRINUSE. A hold binds each port with SO_REUSEADDR and never listens: every server we
    run binds its port with SO_REUSEADDR too (caproto, RSRV, redis, nginx, uvicorn, ZMQ) and
    still binds and listens, and (the newest socket) gets the port's datagrams; a plain
    bind by anyone else is refused."""

    def __init__(self, ports: Iterable[int]):
        self.sockets: list[socket.socket] = []
        try:
            for port in ports:
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    sock = socket.socket(socket.AF_INET, kind)
                    self.sockets.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((LOOPBACK, port))
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


# ---- Channel Access environments ------------------------------------------------------
def ca_client_env(server_ports: Sequence[int], base: Mapping[str, str] | None = None,
                  epics_bin: Path | None = None) -> dict[str, str]:
    """A CA client environment that sees exactly the servers on ``server_ports`` of
    127.0.0.1 (no broadcast on loopback). ``epics_bin`` goes first on PATH: libca clients
    start ``caRepeater`` from there."""
    env = dict(os.environ if base is None else base)
    for var in _CA_SERVER_VARS:
        env.pop(var, None)
    env.update(EPICS_CA_AUTO_ADDR_LIST="NO",
               EPICS_CA_ADDR_LIST=" ".join(f"{LOOPBACK}:{p}" for p in server_ports),
               EPICS_CA_MAX_ARRAY_BYTES="100000")
    if epics_bin is not None:
        env["PATH"] = f"{epics_bin}{os.pathsep}{env.get('PATH', '')}"
    return env


def ca_server_env(port: int) -> dict[str, str]:
    """What a CA server adds to its environment to serve on 127.0.0.1:``port`` only."""
    return {"EPICS_CAS_SERVER_PORT": str(port), "EPICS_CA_SERVER_PORT": str(port),
            "EPICS_CAS_INTF_ADDR_LIST": LOOPBACK, "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
            "EPICS_CAS_BEACON_ADDR_LIST": LOOPBACK}


# ---- accounts -------------------------------------------------------------------------
@dataclass(frozen=True)
class Runtime:
    """The Python (and its scripts) a service runs: this process's own for services of
    this account; the installation every account runs for the others (the checkout and
    its venv may be private)."""

    python: Path
    scripts: Path
    share: Path     # where clients/, db/, iocBoot/ are

    @classmethod
    def for_user(cls, user: str | None) -> "Runtime":
        if user is None or user == me():
            return cls(Path(sys.executable), Path(sys.executable).parent, REPO)
        inst = Installation.from_env()
        return cls(inst.python, inst.bin, inst.share)

    def script(self, name: str) -> Path:
        return self.scripts / name


def epics_bin() -> Path:
    """The real EPICS base binaries (not the console-script wrappers, which always exit 0)
    of the installation, runnable by every account."""
    return Installation.from_env().epics_bin()


def owned_dir(path: Path, user: str | None, mode: int = 0o700) -> Path:
    """``path`` made (if need be) and owned by ``user``'s account (None: ours)."""
    path.mkdir(parents=True, exist_ok=True)
    if user is not None and user != me():
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chmod(path, mode)
    return path


# ---- files a service needs before it starts ---------------------------------------------
@dataclass
class Rendered:
    """A file rendered into the service's work dir at every start (a config)."""

    path: Path
    text: str
    mode: int = 0o644

    def make(self, user: str | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.text)
        os.chmod(self.path, self.mode)


@dataclass
class SelfSignedCert:
    """A TLS key and self-signed certificate made at the first start and kept after
    (clients that trust it once keep trusting it), readable by the service's account."""

    cert: Path
    key: Path
    names: Sequence[str] = ("localhost", LOOPBACK)
    days: int = 825

    def make(self, user: str | None) -> None:
        if self.cert.exists() and self.key.exists():
            return
        self.cert.parent.mkdir(parents=True, exist_ok=True)
        alt = ",".join(f"IP:{n}" if n.replace(".", "").isdigit() or ":" in n else f"DNS:{n}"
                       for n in self.names)
        r = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
             "-days", str(self.days), "-subj", f"/CN={self.names[0]}",
             "-addext", f"subjectAltName={alt}", "-keyout", str(self.key),
             "-out", str(self.cert)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"openssl could not make {self.cert}:\n{r.stderr}")
        os.chmod(self.cert, 0o644)
        os.chmod(self.key, 0o600)
        if user is not None and user != me():
            entry = pwd.getpwnam(user)
            os.chown(self.key, entry.pw_uid, entry.pw_gid)


# ---- readiness ------------------------------------------------------------------------
Ready = Callable[[], bool]


def ca_ready(pv: str, env: Callable[[], Mapping[str, str]]) -> Ready:
    """Ready when ``pv`` answers a real ``caget`` (with the client environment ``env()``
    of the moment: a test network grows as servers join it)."""
    def check() -> bool:
        return subprocess.run([str(epics_bin() / "caget"), "-w", "1", pv], env=dict(env()),
                              capture_output=True, timeout=10).returncode == 0
    return check


def tcp_ready(port: int, send: bytes = b"", expect: bytes = b"") -> Ready:
    """Ready when 127.0.0.1:``port`` accepts (and answers ``send`` with ``expect``...)."""
    def check() -> bool:
        with socket.create_connection((LOOPBACK, port), timeout=1) as sock:
            if send:
                sock.sendall(send)
            return sock.recv(64).startswith(expect) if expect else True
    return check


def udp_bound(port: int) -> Ready:
    return lambda: not udp_port_free(port)


def http_ready(url: str, accept: Callable[[bytes], bool] | None = None,
               ca_file: Path | None = None) -> Ready:
    """Ready when GET ``url`` answers 2xx (and ``accept(body)``); HTTPS verified against
    ``ca_file`` (a service's own certificate), never unverified."""
    def check() -> bool:
        context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as answer:
                return accept is None or accept(answer.read())
        except (OSError, ValueError):
            return False
    return check


# ---- a service, and one running ---------------------------------------------------------
@dataclass
class Service:
    """What it takes to run one server."""

    name: str
    argv: list[str]
    #: The whole environment it runs with (a CA client or server environment ...).
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    #: OS account (its CA identity); None: the launcher's own.
    user: str | None = None
    cwd: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)
    files: list = field(default_factory=list)        # Rendered, SelfSignedCert, ...: .make(user)
    ready: Ready | None = None
    ready_timeout: float = 30
    #: softIoc -S runs until its stdin closes: keep a pipe open (closing it stops it).
    stdin_pipe: bool = False
    stop_timeout: float = 10
    #: Hold ``ports`` while it is down or starting (``PortHold``); False for a server that
    #: binds without SO_REUSEADDR (EPICS base's caRepeater).
    hold_ports: bool = True

    def argv_as_user(self) -> list[str]:
        return as_user(self.user, self.argv)


class Launched:
    """One service running in its own process group, its log in ``log``."""

    def __init__(self, service: Service, log: Path):
        self.service, self.log = service, log
        self.proc: subprocess.Popen | None = None
        #: Stopped (or killed) and reaped by us: its process group is gone, and its
        #: number may name another group by now, which must never get our signals.
        self.ended = False
        #: Its ports, held from a kill (or ``stop(hold=True)``) or a start until it is
        #: ready: nobody else may take them meanwhile.
        self.hold: PortHold | None = None

    @property
    def name(self) -> str:
        return self.service.name

    def start(self) -> "Launched":
        """Start it (again, after a stop: same description, same log)."""
        if self.running():
            raise RuntimeError(f"{self.name} is running already")
        self._hold_ports()
        for item in self.service.files:
            item.make(self.service.user)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.service.argv_as_user(), env=self.service.env, cwd=self.service.cwd,
                stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE if self.service.stdin_pipe else subprocess.DEVNULL,
                start_new_session=True)
        self.ended = False
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Until the service's readiness check holds; fail with its log's tail if it
        exits or lags (a Ctrl-C, a BaseException, still gets through)."""
        ready = self.service.ready
        if ready is None:
            self._release_ports()
            return
        timeout = self.service.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; end of "
                                   f"{self.log}:\n{self.tail()}")
            try:
                if ready():
                    self._release_ports()   # it answers: it has bound them itself
                    return
            except Exception:  # noqa: BLE001 - not answering yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not become ready within {timeout:g} s; "
                                   f"end of {self.log}:\n{self.tail()}")
            time.sleep(0.1)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill9(self) -> None:
        """SIGKILL the whole group at once (a crash), and reap it; its ports stay held
        until it is started again and answers."""
        if self.running():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.ended = True
            self._hold_ports()

    def stop(self, timeout: float | None = None, hold: bool = False) -> None:
        """TERM then KILL the group; ``hold``: keep its ports for a start again."""
        if self.proc is not None and not self.ended:
            if self.proc.stdin:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
            stop_group(self.proc, self.service.stop_timeout if timeout is None else timeout)
            self.ended = True
        if hold:
            self._hold_ports()
        else:
            self._release_ports()

    def _hold_ports(self) -> None:
        if self.hold is None and self.service.hold_ports and self.service.ports:
            try:
                self.hold = PortHold(self.service.ports.values())
            except OSError as exc:
                raise RuntimeError(f"{self.name}: a port of {self.service.ports} is taken "
                                   f"by another process ({exc})") from None

    def _release_ports(self) -> None:
        if self.hold is not None:
            self.hold.close()
            self.hold = None


def stop_group(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    """TERM the process group led by ``proc``, KILL what is left after ``timeout``, reap
    the leader."""
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_alive(proc.pid):
            proc.poll()  # reap the leader so it does not count as alive
            time.sleep(0.05)
        if not group_alive(proc.pid):
            break
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _live_processes():
    """(pid, ppid, pgid) of every live (non-zombie) process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z":
            yield int(entry.name), int(fields[1]), int(fields[2])


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    return [pid for pid, _, group in _live_processes() if group == pgid]


def group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process of process group ``pgid`` exists."""
    return bool(group_pids(pgid))


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    return [child for child, parent, _ in _live_processes() if parent == pid]


def process_owner(pid: int) -> str:
    """The account a process runs as (its real uid), or "?" once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "?"
    uid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:"))
    return pwd.getpwuid(uid).pw_name


class Stack:
    """Services started in order into one work dir and stopped together, newest first.

    Each service's log is ``<work>/<log name>.log``; ``<work>/processes.txt`` lists the
    process group of each (for people, and for tests looking for leftovers)."""

    def __init__(self, work: Path):
        self.work = work
        self.launched: list[Launched] = []

    def start(self, service: Service, log_name: str | None = None,
              wait: bool = True) -> Launched:
        launched = Launched(service, self.work / f"{log_name or _slug(service.name)}.log")
        self.launched.append(launched)
        return self.restart(launched, wait)

    def restart(self, launched: Launched, wait: bool = True) -> Launched:
        """Start ``launched`` (again, after it stopped: same description, same log)."""
        launched.start()
        with open(self.work / "processes.txt", "a") as out:
            out.write(f"{launched.proc.pid} {launched.name}\n")
        if wait:
            launched.wait_ready()
        return launched

    def dead(self) -> Launched | None:
        """The first service that is no longer running, if any."""
        return next((s for s in self.launched if not s.running()), None)

    def stop(self) -> None:
        for launched in reversed(self.launched):
            launched.stop()
        self.launched.clear()


def _slug(name: str) -> str:
    return "-".join(name.lower().replace("/", " ").split())


# ---- the services of the stack ----------------------------------------------------------
def ca_repeater(port: int, env: Mapping[str, str]) -> Service:
    """EPICS base's CA repeater on UDP ``port``."""
    return Service("caRepeater", [str(epics_bin() / "caRepeater")],
                   env=dict(env, EPICS_CA_REPEATER_PORT=str(port)), ports={"repeater": port},
                   ready=udp_bound(port), ready_timeout=10, hold_ports=False)


def lock_ioc(config: Path, port: int, ready_pv: str, client_env: Callable[[], Mapping],
             *, user: str | None = None, name: str = "lock IOC",
             args: Sequence[str] = ()) -> Service:
    """The lock IOC (``python -m lock_ioc --config``, then ``args``) serving CA on
    127.0.0.1:``port``; ready when ``ready_pv`` (its Heartbeat) answers."""
    rt = Runtime.for_user(user)
    return Service(name, [str(rt.python), "-m", "lock_ioc", "--config", str(config), *args],
                   env=dict(client_env(), **ca_server_env(port)), user=user, cwd=rt.share,
                   ports={"ca": port}, ready=ca_ready(ready_pv, client_env), ready_timeout=30)


def lock_ioc_procserv(config: Path, port: int, ready_pv: str,
                      client_env: Callable[[], Mapping], control: str, *,
                      user: str | None = "lockioc", info: Path | None = None,
                      name: str = "lock IOC (procServ)") -> Service:
    """The lock IOC as a site runs it: ``iocBoot/iocLock/procServ.sh`` (procServ, console
    on ``control``, e.g. ``unix:/run/lockioc/control``; restarts the IOC when it dies),
    under its own account; ``info``: procServ's info file (its PID and endpoint)."""
    rt = Runtime.for_user(user)
    env = dict(client_env(), **ca_server_env(port), LOCK_CONFIG=str(config),
               BEAMLINE_LOCK_PREFIX=str(Installation.from_env().prefix), PROCSERV_HOLDOFF="1")
    if info is not None:
        env["PROCSERV_INFO"] = str(info)
    return Service(name, [str(rt.share / "iocBoot" / "iocLock" / "procServ.sh"), control],
                   env=env, user=user, cwd=rt.share, ports={"ca": port},
                   ready=ca_ready(ready_pv, client_env), ready_timeout=30)


def procserv_child(launched: Launched) -> int | None:
    """The pid of the process procServ (started by ``launched``) runs now, if any."""
    if not launched.running():
        return None
    for pid in [launched.proc.pid, *children(launched.proc.pid)]:   # runuser -> procServ
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name == "procServ":
            kids = children(pid)
            return kids[0] if kids else None
    return None


#: The templates of the simulated beamline (db/) and their macros besides P.
BEAMLINE_DB = (("shutter.db", ""), ("softMotor.db", ",M=m1,EGU=mm"),
               ("softMotor.db", ",M=m2,EGU=deg"), ("detector.db", ""), ("beamline.db", ""))


def beamline_st_cmd(acf: Path, prefix: str, db: Path) -> str:
    """The startup script of the simulated beamline: its ACF, db/ under ``prefix``."""
    return (f'asSetFilename("{acf}")\n'
            + "".join(f'dbLoadRecords("{db / f}", "P={prefix}{m}")\n' for f, m in BEAMLINE_DB)
            + "iocInit()\n")


def render_beamline_acf(lock_config: Path) -> str:
    """The ACF generated from the lock's config, checked by EPICS base's ``ascheck``."""
    from beamline_lock.acf import render_acf
    from lock_ioc.config import load
    return checked_acf(render_acf(load(lock_config)))


def checked_acf(text: str) -> str:
    """``text`` if EPICS base's ``ascheck`` accepts it as an ACF."""
    check = subprocess.run([str(epics_bin() / "ascheck")], input=text, capture_output=True,
                           text=True)
    if check.returncode != 0:
        raise RuntimeError(f"ascheck rejected the generated ACF:\n{check.stderr}")
    return text


def soft_ioc(name: str, st_cmd: Path, port: int, ready_pv: str,
             client_env: Callable[[], Mapping], *, user: str | None = None,
             cwd: Path | None = None, files: Sequence = ()) -> Service:
    """EPICS base's ``softIoc -S st.cmd`` (no shell: it runs until its stdin closes)."""
    return Service(name, [str(epics_bin() / "softIoc"), "-S", str(st_cmd)],
                   env=dict(client_env(), **ca_server_env(port)), user=user, cwd=cwd,
                   ports={"ca": port}, files=list(files), ready=ca_ready(ready_pv, client_env),
                   ready_timeout=30, stdin_pipe=True)


def beamline_ioc(work: Path, lock_config: Path, prefix: str, port: int,
                 client_env: Callable[[], Mapping], *, user: str | None = None,
                 name: str = "beamline softIoc", acf_text: str | None = None) -> Service:
    """The simulated beamline (db/ under ``prefix``) on ``softIoc`` with the ACF
    generated from ``lock_config`` (or ``acf_text``, e.g. what ``lockctl acf`` printed),
    both rendered into ``work``."""
    acf, st_cmd = work / "beamline.acf", work / "st.cmd"
    db = Runtime.for_user(user).share / "db"
    acf_text = render_beamline_acf(lock_config) if acf_text is None else checked_acf(acf_text)
    return soft_ioc(name, st_cmd, port, prefix + "RingCurrent", client_env, user=user,
                    cwd=work, files=[Rendered(acf, acf_text),
                                     Rendered(st_cmd, beamline_st_cmd(acf, prefix, db))])


def redis(port: int, data_dir: Path, env: Mapping[str, str] | None = None,
          user: str | None = None) -> Service:
    """Debian's ``redis-server`` on 127.0.0.1:``port``, no persistence."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found: install Debian's redis-server (make system)")
    return Service("redis", [exe, "--port", str(port), "--bind", LOOPBACK, "--dir", str(data_dir),
                             "--save", "", "--appendonly", "no", "--daemonize", "no",
                             "--protected-mode", "yes"],
                   env=dict(os.environ if env is None else env), user=user, ports={"redis": port},
                   ready=tcp_ready(port, b"PING\r\n", b"+PONG"), ready_timeout=20)


def re_manager(work: Path, redis_addr: str, control_port: int, info_port: int,
               env: Mapping[str, str], *, user: str | None = None,
               startup_dir: Path | None = None, permissions: Path | None = None,
               extra_args: Sequence[str] = ()) -> Service:
    """The unmodified ``start-re-manager`` on the shared startup directory; ready when it
    answers on ZMQ (opening the RE environment is the caller's next step)."""
    rt = Runtime.for_user(user)
    startup_dir = startup_dir or rt.share / "clients" / "startup"
    permissions = permissions or rt.share / "clients" / "qserver" / "user_group_permissions.yaml"
    control = f"tcp://{LOOPBACK}:{control_port}"
    info = f"tcp://{LOOPBACK}:{info_port}"

    def answers() -> bool:
        from bluesky_queueserver_api.zmq import REManagerAPI
        api = REManagerAPI(zmq_control_addr=control, zmq_info_addr=info, timeout_recv=2)
        try:
            return api.status()["manager_state"] == "idle"
        finally:
            api.close()

    return Service(
        "start-re-manager",
        [str(rt.script("start-re-manager")), "--startup-dir", str(startup_dir),
         "--existing-plans-devices", str(work / "existing_plans_and_devices.yaml"),
         "--user-group-permissions", str(permissions), "--redis-addr", redis_addr,
         "--zmq-control-addr", control, "--zmq-info-addr", info,
         "--zmq-publish-console", "ON", *extra_args],
        env=dict(env, PYTHONUNBUFFERED="1"), user=user, cwd=work,
        ports={"zmq_control": control_port, "zmq_info": info_port}, ready=answers,
        ready_timeout=60, stop_timeout=15)


#: Devices clients/startup/10-devices.py defines: ophyd-websocket is ready when it lists them.
WS_DEVICES = ("beam", "det", "m1", "m2", "shutter")


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a shell environment file (comments and blanks skipped)."""
    env = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, val = line.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        env[key] = val
    return env


def ophyd_websocket(port: int, ca_env: Mapping[str, str], settings: Mapping[str, str], *,
                    user: str | None = "oaswww", name: str = "ophyd-websocket") -> Service:
    """The unmodified ``ophyd-websocket`` as one lock seat under its own account, configured
    only through its environment: the CA client environment ``ca_env``, the documented
    seat configuration ``clients/websocket/seat.env`` (its ``OAS_STARTUP_DIR`` is relative
    to the checkout it runs in), then ``settings`` (``LOCK_*`` ...); it listens on
    127.0.0.1:``port``, ready when its registry lists the startup directory's devices."""
    rt = Runtime.for_user(user)
    env = dict(ca_env)
    env.update(read_env_file(rt.share / "clients" / "websocket" / "seat.env"))
    env.update(settings)
    env.update(OAS_HOST=LOOPBACK, OAS_PORT=str(port), PYTHONUNBUFFERED="1")

    def lists_devices(body: bytes) -> bool:
        return tuple(sorted(json.loads(body).get("devices", []))) == WS_DEVICES

    return Service(name, [str(rt.script("ophyd-websocket"))], env=env, user=user,
                   cwd=rt.share, ports={"http": port},
                   ready=http_ready(f"http://{LOOPBACK}:{port}/api/v1/devices", lists_devices),
                   ready_timeout=90)


NGINX = "/usr/sbin/nginx"
NGINX_MODULES = Path("/usr/lib/nginx/modules")


def nginx_conf(work: Path, servers: str, modules: Sequence[str] = ()) -> str:
    """An nginx.conf whose every path (pid, logs, temp files) is inside ``work``, so that
    nginx runs unprivileged next to other instances; ``servers``: the ``server {}`` blocks;
    ``modules``: Debian's dynamic modules to load (e.g. ``ngx_http_js_module``)."""
    loads = "".join(f"load_module {NGINX_MODULES / m}.so;\n" for m in modules)
    temp = "".join(f"    {kind}_temp_path {work / 'tmp' / kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"{loads}worker_processes 1;\npid {work / 'nginx.pid'};\n"
            f"error_log {work / 'error.log'} info;\nevents {{ worker_connections 256; }}\n"
            f"http {{\n    include /etc/nginx/mime.types;\n"
            f"    access_log {work / 'access.log'};\n{temp}{servers}\n}}\n")


def nginx(work: Path, servers: str, ports: Mapping[str, int], ready: Ready, *,
          user: str | None = "www-data", modules: Sequence[str] = (),
          tls: SelfSignedCert | None = None, name: str = "nginx") -> Service:
    """Debian's nginx in the foreground, unprivileged (master and workers as ``user``),
    on loopback ports, its config rendered into ``work`` (owned by ``user``) at each
    start; ``tls``: a certificate made at the first start (``servers`` names its paths)."""
    owned_dir(work, user, 0o755)
    owned_dir(work / "tmp", user)
    conf = work / "nginx.conf"
    return Service(name, [NGINX, "-p", f"{work}/", "-c", str(conf), "-e", str(work / "error.log"),
                          "-g", "daemon off;"],
                   user=user, cwd=work, ports=dict(ports),
                   files=[*([tls] if tls else []), Rendered(conf, nginx_conf(work, servers, modules))],
                   ready=ready, ready_timeout=20)


# ---- the remote half: bluesky-httpserver, a seat per web user, nginx (docs/remote.md) ------
#: Where nginx's certificate is valid; clients use the first.
CERT_NAMES = ("localhost", LOOPBACK)
#: The httpserver provider of the demo's and the tests' passwords
#: (``httpserver_config.dictionary_provider``).
PASSWORD_PROVIDER = "local"
#: The files of clients/ that the launcher renders a service's config with (clients/ is
#: no package: they are loaded from the checkout by path).
_CLIENT_MODULES = {"httpserver_config": REPO / "clients" / "httpserver" / "httpserver_config.py",
                   "nginx_config": REPO / "clients" / "nginx" / "nginx_config.py"}


def client_module(name: str):
    """``httpserver_config`` or ``nginx_config`` (clients/), imported once."""
    if name not in sys.modules:
        import importlib.util
        spec = importlib.util.spec_from_file_location(name, _CLIENT_MODULES[name])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


@dataclass
class HttpserverState:
    """bluesky-httpserver's state directory: its config (rendered at every start), the
    token-signing secret (made once and kept, so logins and API keys survive a restart;
    it reaches the process as ``QSERVER_HTTP_SERVER_SERVER_SECRET_KEYS`` in ``env``, the
    service's own environment) and its database of sessions and keys."""

    state: Path
    config_text: str
    env: dict[str, str]

    def make(self, user: str | None) -> None:
        owned_dir(self.state, user)
        (self.state / "config.yml").write_text(self.config_text)
        secret = self.state / "secret"
        if not secret.exists():
            secret.write_text(secrets.token_hex(32))
            secret.chmod(0o600)
        self.env["QSERVER_HTTP_SERVER_SERVER_SECRET_KEYS"] = secret.read_text().strip()
        if user is not None and user != me():
            subprocess.run(["chown", "-R", f"{user}:", str(self.state)], check=True)


def httpserver(state: Path, lock_config: Path, *, port: int, zmq_control: str, zmq_info: str,
               passwords: Mapping[str, str], observers: Sequence[str] = (),
               user: str | None = "bluesky", env: Mapping[str, str] | None = None,
               access_token_max_age: float | None = None) -> Service:
    """The unmodified bluesky-httpserver as its docs say (``uvicorn
    bluesky_httpserver.server:app`` with ``QSERVER_HTTP_SERVER_CONFIG``), from the
    installation, as OS account ``user``, in front of the RE Manager at ``zmq_control`` /
    ``zmq_info``: roles from the lock's groups (``lock_config``), ``observers`` read only,
    the ``local`` provider with ``passwords``. Ready when ``/api/auth/scopes`` answers
    (it does without the RE Manager)."""
    from lock_ioc.config import load
    hc = client_module("httpserver_config")
    config = load(lock_config)
    settings = hc.render(config, provider=hc.dictionary_provider(passwords),
                         observers=observers, access_token_max_age=access_token_max_age)
    rt = Runtime.for_user(user)
    env = dict(os.environ if env is None else env)
    env.update(QSERVER_HTTP_SERVER_CONFIG=str(state / "config.yml"),
               BLUESKY_HTTPSERVER_STATE=str(state), QSERVER_ZMQ_CONTROL_ADDRESS=zmq_control,
               QSERVER_ZMQ_INFO_ADDRESS=zmq_info, PYTHONUNBUFFERED="1")
    return Service(
        "bluesky-httpserver",
        [str(rt.script("uvicorn")), "--host", LOOPBACK, "--port", str(port),
         "bluesky_httpserver.server:app"],
        env=env, user=user, cwd=state, ports={"http": port},
        files=[HttpserverState(state, hc.dump(settings, config.source), env)],
        ready=http_ready(f"http://{LOOPBACK}:{port}/api/auth/scopes"), ready_timeout=90)


def web_seat(web_user: str, port: int, ca_env: Mapping[str, str], *, lock_prefix: str,
             beamline_prefix: str, user: str | None) -> Service:
    """The ophyd-websocket seat of one web user: lock session ``web:<web_user>``, no writes
    while the lock is Free, run as OS account ``user`` (the web user's own, so that its CA
    identity is theirs; docs/remote.md)."""
    return ophyd_websocket(port, ca_env, {
        "LOCK_PREFIX": lock_prefix, "BEAMLINE_PREFIX": beamline_prefix,
        "LOCK_SESSION": f"web:{web_user}", "LOCK_ALLOW_FREE_WRITES": "0",
        "LOCK_CONNECT_TIMEOUT": "10"}, user=user, name=f"ophyd-websocket seat of {web_user}")


@dataclass
class GatewayRuntime:
    """nginx's runtime directory (clients/nginx/nginx_config.py): its config, auth.js and
    the page's ``config.json`` rendered at every start, the local CA and certificate in
    ``tls`` made at the first start and kept; checked with ``nginx -t`` as the account
    that runs it."""

    state: Path
    tls: Path
    web_root: Path
    web_config: dict
    render_args: dict

    def make(self, user: str | None) -> None:
        nc = client_module("nginx_config")
        owned_dir(self.state, user, 0o755)
        conf = nc.prepare(self.state, tls_dir=self.tls, cert_names=CERT_NAMES, owner=user,
                          web_root=self.web_root, web_config=self.web_config,
                          **self.render_args)
        checked = nc.check_config(conf, user)
        if checked.returncode != 0:
            raise RuntimeError(f"nginx -t rejected {conf}:\n{checked.stderr}")


def web_gateway(state: Path, *, http_port: int, https_port: int, httpserver_port: int,
                seats: Mapping[str, int], web_config: Mapping, tls: Path | None = None,
                user: str | None = "www-data", env: Mapping[str, str] | None = None) -> Service:
    """Debian's nginx, the only door for a browser (clients/nginx/nginx.conf.in): TLS on
    ``https_port`` (HTTP on ``http_port`` redirects), the web page read-only from the
    installation (``share/web/dist``) with ``web_config`` as its ``config.json``, ``/api/``
    to httpserver, ``/ophyd/`` to the user's own seat (``seats``: web user -> port) after
    the auth check. Unprivileged (``user``), its runtime directory ``state``; the
    certificates in ``tls`` (default ``state/tls``). Ready when ``/`` answers over TLS
    verified against its local CA."""
    nc = client_module("nginx_config")
    hc = client_module("httpserver_config")
    tls = tls or state / "tls"
    runtime = GatewayRuntime(
        state, tls, Runtime.for_user(user).share / "web" / "dist", dict(web_config),
        dict(http_port=http_port, https_port=https_port,
             httpserver=f"{LOOPBACK}:{httpserver_port}", seats=dict(seats),
             device_scope=hc.DEVICE_SCOPE))
    return Service("nginx", [nc.NGINX, "-c", str(state / "nginx.conf"), "-e", "stderr"],
                   env=dict(os.environ if env is None else env), user=user, cwd=state,
                   ports={"http": http_port, "https": https_port},
                   files=[runtime],
                   ready=http_ready(f"https://{CERT_NAMES[0]}:{https_port}/",
                                    ca_file=tls / "ca.crt"), ready_timeout=20)


@dataclass
class WebAccess:
    """The remote half of the stack, described once for ``make demo``, the tests and the
    benchmarks: bluesky-httpserver in front of the RE Manager, an ophyd-websocket seat per
    web user, nginx in front of both, each under its own account."""

    lock_config: Path
    lock_prefix: str
    beamline_prefix: str
    #: The RE Manager's ZMQ addresses (tcp://127.0.0.1:port).
    zmq_control: str
    zmq_info: str
    #: The CA client environment of the stack (the seats are CA clients).
    ca_env: Callable[[], Mapping[str, str]]
    #: Web user -> password (httpserver's ``local`` provider), observers read only.
    passwords: Mapping[str, str]
    observers: Sequence[str]
    #: Whose seat is started, in order.
    web_users: Sequence[str]
    #: ``http``, ``https``, ``httpserver`` and ``seat:<user>`` for each web user.
    ports: Mapping[str, int]
    #: Runtime directories: ``httpserver`` (its own account's), ``nginx``, ``tls``.
    dirs: Mapping[str, Path]
    httpserver_user: str | None = "bluesky"
    nginx_user: str | None = "www-data"
    #: Whether a seat runs as its web user's OS account (the design) or as ours.
    seats_as_web_users: bool = True
    access_token_max_age: float | None = None
    #: The environment httpserver and nginx start from (default: this process's).
    env: Mapping[str, str] | None = None

    @staticmethod
    def free_ports(web_users: Sequence[str], taken: set[int] | None = None) -> dict[str, int]:
        """Free ports of 127.0.0.1 for every service of the remote half."""
        taken = set() if taken is None else taken
        return {name: free_port(taken)
                for name in ("http", "https", "httpserver",
                             *(f"seat:{user}" for user in web_users))}

    @property
    def url(self) -> str:
        return f"https://{CERT_NAMES[0]}:{self.ports['https']}"

    @property
    def ca_file(self) -> Path:
        """The local CA nginx's certificate chains to: what a client trusts."""
        return self.dirs["tls"] / "ca.crt"

    def web_config(self) -> dict:
        """The page's ``config.json`` (web/src/config.ts)."""
        return {"authProvider": PASSWORD_PROVIDER, "lockPrefix": self.lock_prefix,
                "beamlinePrefix": self.beamline_prefix}

    @staticmethod
    def log_name(name: str) -> str:
        """The log of service ``name`` ("seat:alice" -> seat-alice.log)."""
        return name.replace(":", "-")

    def start(self, stack: Stack, say: Callable[[str], None] = lambda what: None,
              described: Mapping[str, Service] | None = None) -> dict[str, Launched]:
        """Start the remote half into ``stack`` (``described``: what ``services()``
        returned): httpserver and the seats together (each needs only the RE Manager and
        CA), nginx once they all answer. ``say(what)`` before each start."""
        described = self.services() if described is None else described
        started: dict[str, Launched] = {}
        for name, service in described.items():
            if name != "nginx":
                say(service.name)
                started[name] = stack.start(service, self.log_name(name), wait=False)
        for launched in started.values():
            launched.wait_ready()
        say("nginx (HTTPS, the web page)")
        started["nginx"] = stack.start(described["nginx"], self.log_name("nginx"))
        return started

    def services(self) -> dict[str, Service]:
        """In start order: ``httpserver`` (it needs the RE Manager), ``seat:<user>`` for
        each web user, ``nginx`` (it needs the ports of all of them)."""
        out = {"httpserver": httpserver(
            self.dirs["httpserver"], self.lock_config, port=self.ports["httpserver"],
            zmq_control=self.zmq_control, zmq_info=self.zmq_info, passwords=self.passwords,
            observers=self.observers, user=self.httpserver_user, env=self.env,
            access_token_max_age=self.access_token_max_age)}
        for user in self.web_users:
            out[f"seat:{user}"] = web_seat(
                user, self.ports[f"seat:{user}"], self.ca_env(), lock_prefix=self.lock_prefix,
                beamline_prefix=self.beamline_prefix,
                user=user if self.seats_as_web_users else None)
        out["nginx"] = web_gateway(
            self.dirs["nginx"], http_port=self.ports["http"], https_port=self.ports["https"],
            httpserver_port=self.ports["httpserver"],
            seats={u: self.ports[f"seat:{u}"] for u in self.web_users},
            web_config=self.web_config(), tls=self.dirs["tls"], user=self.nginx_user,
            env=self.env)
        return out
