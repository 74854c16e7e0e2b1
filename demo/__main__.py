"""``python -m demo`` (``make demo``): the whole system on loopback, stopped by Ctrl-C.

Starts, from the service descriptions of ``demo/services.py`` and each under the OS account
a site would give it: the lock IOC (``lockioc``), the simulated beamline on EPICS base
``softIoc`` with the ACF generated from the lock's config (``beamioc``), Redis, and the
unmodified ``start-re-manager`` with the shared startup directory (``bluesky``: its
RunEngine runs under the lock guard), and opens the RE environment; then the remote half
(``services.WebAccess``): bluesky-httpserver (``bluesky``), an ophyd-websocket seat for each
demo web user under that user's own account, and nginx (``www-data``) serving the web page
over HTTPS with a local CA made once and kept. Prints a cheat sheet and waits. Ctrl-C
(SIGINT) or SIGTERM stops every process it started; nothing is left running.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from beamline_lock.cli import seconds_type
from lock_ioc import contract

from . import services
from .install import ensure, me

REPO = Path(__file__).resolve().parent.parent
#: The demo's web users (OS accounts .ci/setup-system creates), each with a seat of their
#: own, and what their httpserver role lets them do; observers are in no lock group.
WEB_USERS = {"alice": "staff: edit and run the queue; takes the lock as web:alice",
             "bob": "staff: the same, as web:bob",
             "operator": "operator: pause, stop and abort plans; force-release, disable",
             "observer": "observer: reads the queue, the devices and the lock; writes nothing"}
OBSERVERS = ("observer",)
#: Fixed ports (the qserver tools' defaults for ZMQ; HTTPS 8443 for the web);
#: --free-ports picks free ones instead.
FIXED = {"lock": 5074, "beamline": 5076, "redis": 6390, "zmq_control": 60615,
         "zmq_info": 60625, "https": 8443, "http": 8080, "httpserver": 60610,
         **{f"seat:{user}": 41001 + n for n, user in enumerate(WEB_USERS)}}
ME = me()
#: The OS account of each service (.ci/setup-system creates them; www-data is Debian's).
ACCOUNTS = {"lock": "lockioc", "beamline": "beamioc", "queue": "bluesky",
            "httpserver": "bluesky", "nginx": "www-data"}

LOCK_CONFIG = """\
# beamline-lock demo: the queue server runs as bluesky (group queue); {me} is in the queue
# and operator groups too, so that lockctl and caput work from your own shell.
prefix: "{prefix}"
lease: {{default: 60, max: 3600}}
state: {state}
groups:
  queue:    {{users: [bluesky, {me}], authority: 10, unattended: true}}
  staff:    {{users: [alice, bob], authority: 20}}
  operator: {{users: [operator, {me}], operator: true, authority: 30}}
"""


class Stop(BaseException):
    """SIGINT or SIGTERM: stop everything (a BaseException, so that no ``except
    Exception`` around a readiness probe can swallow it)."""


def _on_signal(signum, _frame) -> None:
    raise Stop(signal.Signals(signum).name)


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.install = ensure()
        self.work = Path(args.workdir).resolve() if args.workdir else \
            Path(tempfile.mkdtemp(prefix="beamline-lock-demo-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.work.chmod(0o711)  # the services' accounts reach their own directories
        self.bin = self.install.epics_bin()
        self.ports = self._ports()
        self.stack = services.Stack(self.work)
        self.prefix, self.lock_prefix = args.prefix, args.prefix + "LOCK:"
        #: Kept across demos (the CA is made once, and trusted once), outside any home.
        self.tls_dir = Path(args.tls_dir).resolve() if args.tls_dir else \
            self.install.prefix / "var" / "demo-tls"
        self.passwords = {user: "".join(secrets.choice(string.ascii_letters + string.digits)
                                        for _ in range(12)) for user in WEB_USERS}
        self.web: services.WebAccess | None = None

    def _ports(self) -> dict[str, int]:
        if self.args.free_ports:
            taken: set[int] = set()
            return {name: services.free_port(taken) for name in FIXED}
        busy = [f"{name} {port}" for name, port in FIXED.items()
                if not services.port_free(port)]
        if busy:
            raise RuntimeError(f"port(s) in use on 127.0.0.1: {', '.join(busy)} (another "
                               "demo or RE Manager running?); use --free-ports")
        return dict(FIXED)

    # ---- environments ---------------------------------------------------------------
    def ca_client_env(self) -> dict[str, str]:
        """What a shell needs to reach the demo (env.sh)."""
        return {"EPICS_CA_AUTO_ADDR_LIST": "NO",
                "EPICS_CA_ADDR_LIST": f"127.0.0.1:{self.ports['lock']} "
                                      f"127.0.0.1:{self.ports['beamline']}",
                "EPICS_CA_MAX_ARRAY_BYTES": "100000",
                "LOCK_PREFIX": self.lock_prefix, "BEAMLINE_PREFIX": self.prefix,
                "QSERVER_ZMQ_CONTROL_ADDRESS": f"tcp://127.0.0.1:{self.ports['zmq_control']}",
                "QSERVER_ZMQ_INFO_ADDRESS": f"tcp://127.0.0.1:{self.ports['zmq_info']}"}

    def env(self) -> dict[str, str]:
        """The environment of every process of the demo: the CA client environment of the
        demo's servers; the real EPICS tools first on PATH (caRepeater for libca)."""
        env = services.ca_client_env([self.ports["lock"], self.ports["beamline"]],
                                     epics_bin=self.bin)
        env.update(self.ca_client_env())
        env["BEAMLINE_LOCK_DEMO"] = str(self.work)  # marks every process of this demo
        return env

    def lock_pv(self, suffix: str) -> str:
        """A lock PV name, from the contract (never a hand-typed suffix)."""
        if suffix.startswith(contract.GATE_PREFIX):
            return self.lock_prefix + suffix
        return contract.BY_SUFFIX[suffix].name(self.lock_prefix)

    def home(self, part: str) -> Path:
        """The work directory of one service, owned by its account, which must reach it."""
        user = ACCOUNTS[part]
        path = services.owned_dir(self.work / part, user)
        if subprocess.run(services.as_user(user, ["test", "-w", str(path)])).returncode != 0:
            raise RuntimeError(f"the account {user} cannot reach {path}: use a --workdir "
                               "that every account can reach (e.g. under /tmp)")
        return path

    # ---- the parts ------------------------------------------------------------------
    def start_repeater(self) -> None:
        """A CA repeater of our own unless one already serves this host: otherwise the
        first libca client (our readiness probes) would spawn one in our process group,
        and it would outlive the demo."""
        port = int(os.environ.get("EPICS_CA_REPEATER_PORT") or 5065)
        if not services.udp_port_free(port):
            return  # a repeater is there already: every libca client of ours uses it
        self.stack.start(services.ca_repeater(port, self.env()))

    def start_lock_ioc(self) -> None:
        home = self.home("lock")
        self.lock_config = home / "lock.yaml"
        services.Rendered(self.lock_config, LOCK_CONFIG.format(
            me=ME, prefix=self.lock_prefix, state=home / "lock-state.sqlite3")).make(None)
        self.stack.start(services.lock_ioc(self.lock_config, self.ports["lock"],
                                           self.lock_pv("Heartbeat"), self.env,
                                           user=ACCOUNTS["lock"]), "lock-ioc")

    def start_beamline(self) -> None:
        self.stack.start(services.beamline_ioc(self.home("beamline"), self.lock_config,
                                               self.prefix, self.ports["beamline"], self.env,
                                               user=ACCOUNTS["beamline"]), "softIoc")

    def start_redis(self) -> None:
        self.stack.start(services.redis(self.ports["redis"], self.work, self.env()))

    def start_manager(self) -> None:
        from bluesky_queueserver_api.zmq import REManagerAPI
        env = self.env()
        env["QUEUE_LOCK_LINGER"] = str(self.args.linger)
        manager = self.stack.start(services.re_manager(
            self.home("queue"), f"127.0.0.1:{self.ports['redis']}", self.ports["zmq_control"],
            self.ports["zmq_info"], env, user=ACCOUNTS["queue"]), "re-manager")
        api = REManagerAPI(zmq_control_addr=env["QSERVER_ZMQ_CONTROL_ADDRESS"],
                           zmq_info_addr=env["QSERVER_ZMQ_INFO_ADDRESS"], timeout_recv=5)
        try:
            resp = api.environment_open()
            if not resp["success"]:
                raise RuntimeError(f"cannot open the RE environment: {resp['msg']}")
            manager.service.ready_timeout = 120
            manager.wait_ready()
            if not api.status()["worker_environment_exists"]:
                raise RuntimeError("the RE environment failed to open; end of "
                                   f"{manager.log}:\n{manager.tail(6000)}")
        finally:
            api.close()

    def start_web(self) -> None:
        """bluesky-httpserver, a seat per web user, nginx with the web page (the launcher's
        ``WebAccess``, as the tests start it)."""
        self.tls_dir.parent.mkdir(parents=True, exist_ok=True)
        self.web = services.WebAccess(
            lock_config=self.lock_config, lock_prefix=self.lock_prefix,
            beamline_prefix=self.prefix,
            zmq_control=f"tcp://127.0.0.1:{self.ports['zmq_control']}",
            zmq_info=f"tcp://127.0.0.1:{self.ports['zmq_info']}", ca_env=self.env,
            passwords=self.passwords, observers=OBSERVERS, web_users=tuple(WEB_USERS),
            ports={name: self.ports[name] for name in self.ports
                   if name in ("http", "https", "httpserver") or name.startswith("seat:")},
            dirs={"httpserver": self.home("httpserver"), "nginx": self.home("nginx"),
                  "tls": self.tls_dir},
            httpserver_user=ACCOUNTS["httpserver"], nginx_user=ACCOUNTS["nginx"],
            env=self.env())
        self.web.start(self.stack, say=lambda what: print(f"demo: starting {what} ...",
                                                          flush=True))

    # ---- running ---------------------------------------------------------------------
    def start(self) -> None:
        for step, what in ((self.start_repeater, "CA repeater"),
                           (self.start_lock_ioc, "lock IOC"),
                           (self.start_beamline, "simulated beamline softIoc (ACF)"),
                           (self.start_redis, "Redis"),
                           (self.start_manager, "RE Manager + RE environment")):
            print(f"demo: starting {what} ...", flush=True)
            step()
        self.start_web()
        self.write_env_file()

    def write_env_file(self) -> None:
        lines = [f"export {k}={_quote(v)}" for k, v in self.ca_client_env().items()]
        # The real EPICS tools first: the venv's caget/caput are wrappers that exit 0.
        lines.append(f"export PATH={_quote(str(self.bin))}:"
                     f"{_quote(str(Path(sys.executable).parent))}:\"$PATH\"")
        (self.work / "env.sh").write_text("\n".join(lines) + "\n")

    def watch(self) -> int:
        """Wait for Ctrl-C/SIGTERM; a service that dies ends the demo with an error."""
        while True:
            dead = self.stack.dead()
            if dead is not None:
                print(f"demo: {dead.name} exited unexpectedly ({dead.proc.returncode}); "
                      f"end of {dead.log}:\n{dead.tail()}", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.5)

    def stop(self) -> None:
        self.stack.stop()

    def logs_note(self) -> str:
        if self.args.workdir or self.args.keep:
            return f"Logs: {self.work}"
        return (f"Logs: {self.work} (removed at Ctrl-C; --keep or --workdir DIR keeps "
                "them)")

    def cheat_sheet(self) -> str:
        p, lp, b = self.prefix, self.lock_prefix, self.bin
        gates = " ".join(self.lock_pv(contract.gate_suffix(g)) for g in ("queue", "staff"))
        return f"""
beamline-lock demo is running on 127.0.0.1 (Ctrl-C stops every process). {self.logs_note()}
  lock IOC {lp}* on CA port {self.ports['lock']} (as {ACCOUNTS['lock']}), beamline softIoc \
{p}* on CA port {self.ports['beamline']} (as {ACCOUNTS['beamline']}), Redis \
{self.ports['redis']}, RE Manager ZMQ {self.ports['zmq_control']}/{self.ports['zmq_info']} \
(as {ACCOUNTS['queue']})

In another shell:   source {self.work / 'env.sh'}

The lock (lockctl; you are {ME}@{socket.gethostname()}: groups queue and operator here)
  lockctl status                  lockctl watch                   lockctl history
  lockctl acquire mine --note "aligning" --lease 120              lockctl release mine
  lockctl force-release "beam dump drill"
The queue (qserver; its RunEngine holds the lock as bluesky, session "queue", while it runs)
  qserver queue add plan '{{"name": "scan", "args": [["det"], "m1", 0, 5, 6]}}'
  qserver queue add plan '{{"name": "count", "args": [["det"]], "kwargs": {{"num": 5}}}}'
  qserver queue start             qserver status                  qserver history get
  qserver-console-monitor         (the RE worker console: suspensions and their reasons)
  qserver function execute '{{"name": "lock_reacquire"}}' background
                                  (resume a plan suspended by a force-release)
  qserver function execute '{{"name": "lock_status"}}' background
                                  (then: qserver task result UID)
The devices (the softIoc's ACF asks the lock's Gate:<group> PVs)
  caget {p}m1:RBV {p}Shutter:Status {p}det:Counts {gates}
  caput -c {p}Shutter:Open 1      (you write as a queue member: allowed unless another
                                  group holds the lock)
  runuser -u alice -- {b}/caput -c {p}Shutter:Open 1     (as root, act as user alice:
                                  "Write access denied" while the queue holds the lock)
  runuser -u operator -- {b}/caput -c -S {self.lock_pv("ForceRelease")} "drill"
                                  (-c: a refused command exits 1 and says why)
Try: queue a scan, start it, then `lockctl acquire mine` (refused, names the queue); or
`lockctl force-release drill` mid-scan (the RunEngine suspends) and resume it with
lock_reacquire. See docs/queueserver.md.
{self.web_sheet()}
demo: ready
"""

    def web_sheet(self) -> str:
        """The remote half: the URL, the CA to trust, the accounts, the HTTP queue API."""
        web = self.web
        ca = web.ca_file
        width = max(map(len, WEB_USERS))
        accounts = "\n".join(f"  {user:<{width}}  {self.passwords[user]:<12}  {role}"
                             for user, role in WEB_USERS.items())
        return f"""
Remote users (docs/remote.md): the web page at  {web.url}/
  nginx (as {ACCOUNTS['nginx']}) on HTTPS {self.ports['https']} (HTTP {self.ports['http']} \
redirects), bluesky-httpserver {self.ports['httpserver']} (as {ACCOUNTS['httpserver']}), \
a seat per user (as that user)
  The certificate is signed by a local CA, made once and kept: {ca}
  (a browser: import it as an authority, or accept the warning; Python: SSL_CERT_FILE)
  user{' ' * (width - 4)}  password      role
{accounts}
The queue over HTTPS (bluesky-queueserver-api), e.g. in a Python shell:
  import os; os.environ["SSL_CERT_FILE"] = "{ca}"
  from bluesky_queueserver_api import BPlan
  from bluesky_queueserver_api.http import REManagerAPI
  RM = REManagerAPI(http_server_uri="{web.url}", http_auth_provider="/{services.PASSWORD_PROVIDER}/token")
  RM.login("alice", password="{self.passwords['alice']}")
  RM.item_add(BPlan("count", ["det"], num=5)); RM.queue_start(); RM.status()
"""


def _quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--free-ports", action="store_true",
                   help="use free ports instead of the fixed ones (CA 5074/5076, Redis "
                        "6390, ZMQ 60615/60625, HTTPS 8443, HTTP 8080, httpserver 60610, "
                        "seats 41001-41004)")
    p.add_argument("--tls-dir", help="where nginx's local CA and certificate are made once "
                                     "and kept (default: PREFIX/var/demo-tls)")
    p.add_argument("--workdir", help="directory for configs, state and logs (default: a new "
                                     "temporary directory, removed on a clean stop)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--prefix", default="BL:", help="device PV prefix (lock: PREFIX + LOCK:)")
    p.add_argument("--linger", type=seconds_type(allow_zero=True), default=5.0,
                   help="seconds the queue keeps the lock after its last plan (default 5)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    demo = None
    code = 1
    try:
        demo = Demo(args)
        demo.start()
        print(demo.cheat_sheet(), flush=True)
        code = demo.watch()
    except Stop as sig:
        print(f"\ndemo: {sig}: stopping ...", flush=True)
        code = 0
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"demo: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if demo is not None:
            demo.stop()
            if code == 0 and not args.workdir and not args.keep:
                shutil.rmtree(demo.work, ignore_errors=True)
                print(f"demo: removed {demo.work} (--keep or --workdir DIR keeps the logs)",
                      flush=True)
            else:
                print(f"demo: logs kept in {demo.work}", flush=True)
    print("demo: stopped, nothing left running", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
