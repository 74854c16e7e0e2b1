"""``python -m demo`` (``make demo``): the whole system on loopback, stopped by Ctrl-C.

Starts, each in its own process group: the lock IOC, the simulated beamline on EPICS
base ``softIoc`` with the ACF generated from the lock's config, Redis, and the unmodified
``start-re-manager`` with the shared startup directory (its RunEngine runs under the
lock guard); opens the RE environment, prints a cheat sheet and waits. Ctrl-C (SIGINT)
or SIGTERM stops every process it started; nothing is left running.
"""
from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from beamline_lock.cli import seconds_type
from lock_ioc import contract

from .install import ensure
from .processes import Child, free_port, port_free, udp_port_free

REPO = Path(__file__).resolve().parent.parent
STARTUP_DIR = REPO / "clients" / "startup"
PERMISSIONS = REPO / "clients" / "qserver" / "user_group_permissions.yaml"
#: Fixed ports (the qserver tools' defaults for ZMQ); --free-ports picks free ones instead.
FIXED = {"lock": 5074, "beamline": 5076, "redis": 6390, "zmq_control": 60615,
         "zmq_info": 60625}
ME = pwd.getpwuid(os.getuid()).pw_name

LOCK_CONFIG = """\
# beamline-lock demo: the queue server's worker runs as {me} (group queue); {me} is also
# an operator here so that lockctl force-release works from your own shell.
prefix: "{prefix}"
lease: {{default: 60, max: 3600}}
state: {state}
groups:
  queue:    {{users: [bluesky, {me}]}}
  staff:    {{users: [alice, bob]}}
  operator: {{users: [operator, {me}], operator: true}}
"""


class Stop(BaseException):
    """SIGINT or SIGTERM: stop everything (a BaseException, so that no ``except
    Exception`` around a readiness probe can swallow it)."""


def _on_signal(signum, _frame) -> None:
    raise Stop(signal.Signals(signum).name)


def epics_bin() -> Path:
    """The real EPICS base binaries (not the wrappers) of the installation every account
    runs: the cheat sheet's ``runuser -u alice -- .../caput`` lines work as printed."""
    return ensure().epics_bin()


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.workdir).resolve() if args.workdir else \
            Path(tempfile.mkdtemp(prefix="beamline-lock-demo-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.bin = epics_bin()
        self.ports = self._ports()
        self.children: list[Child] = []
        self.prefix, self.lock_prefix = args.prefix, args.prefix + "LOCK:"

    def _ports(self) -> dict[str, int]:
        if self.args.free_ports:
            taken: set[int] = set()
            return {name: free_port(taken) for name in FIXED}
        busy = [f"{name} {port}" for name, port in FIXED.items() if not port_free(port)]
        if busy:
            raise RuntimeError(f"port(s) in use on 127.0.0.1: {', '.join(busy)} (another "
                               "demo or RE Manager running?); use --free-ports")
        return dict(FIXED)

    # ---- environments ---------------------------------------------------------------
    def ca_client_env(self) -> dict[str, str]:
        return {"EPICS_CA_AUTO_ADDR_LIST": "NO",
                "EPICS_CA_ADDR_LIST": f"127.0.0.1:{self.ports['lock']} "
                                      f"127.0.0.1:{self.ports['beamline']}",
                "EPICS_CA_MAX_ARRAY_BYTES": "100000",
                "LOCK_PREFIX": self.lock_prefix, "BEAMLINE_PREFIX": self.prefix,
                "QSERVER_ZMQ_CONTROL_ADDRESS": f"tcp://127.0.0.1:{self.ports['zmq_control']}",
                "QSERVER_ZMQ_INFO_ADDRESS": f"tcp://127.0.0.1:{self.ports['zmq_info']}"}

    def env(self, server_port: int | None = None) -> dict[str, str]:
        env = dict(os.environ)
        for var in ("EPICS_CA_SERVER_PORT", "EPICS_CAS_SERVER_PORT",
                    "EPICS_CAS_INTF_ADDR_LIST", "EPICS_CAS_BEACON_ADDR_LIST"):
            env.pop(var, None)
        env.update(self.ca_client_env())
        env["PATH"] = f"{self.bin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}" \
                      f"{env.get('PATH', '')}"  # caRepeater for libca clients
        env["BEAMLINE_LOCK_DEMO"] = str(self.work)  # marks every process of this demo
        if server_port is not None:
            env.update(EPICS_CAS_SERVER_PORT=str(server_port),
                       EPICS_CA_SERVER_PORT=str(server_port),
                       EPICS_CAS_INTF_ADDR_LIST="127.0.0.1",
                       EPICS_CAS_AUTO_BEACON_ADDR_LIST="NO",
                       EPICS_CAS_BEACON_ADDR_LIST="127.0.0.1")
        return env

    def lock_pv(self, suffix: str) -> str:
        """A lock PV name, from the contract (never a hand-typed suffix)."""
        if suffix.startswith(contract.GATE_PREFIX):
            return self.lock_prefix + suffix
        return contract.BY_SUFFIX[suffix].name(self.lock_prefix)

    def _answers(self, pv: str) -> bool:
        return subprocess.run([str(self.bin / "caget"), "-w", "1", pv], env=self.env(),
                              capture_output=True, timeout=10).returncode == 0

    def _spawn(self, child: Child) -> Child:
        self.children.append(child)
        child.start()
        with open(self.work / "processes.txt", "a") as out:  # for people and tests
            out.write(f"{child.proc.pid} {child.name}\n")
        return child

    # ---- the parts ------------------------------------------------------------------
    def start_repeater(self) -> None:
        """A CA repeater of our own unless one already serves this host: otherwise the
        first libca client (our readiness probes) would spawn one in our process group,
        and it would outlive the demo."""
        port = int(os.environ.get("EPICS_CA_REPEATER_PORT") or 5065)
        if not udp_port_free(port):
            return  # a repeater is there already: every libca client of ours uses it
        repeater = self._spawn(Child("caRepeater", [str(self.bin / "caRepeater")],
                                     env=self.env(), log=self.work / "caRepeater.log"))
        repeater.wait_ready(lambda: not udp_port_free(port), 10)

    def start_lock_ioc(self) -> None:
        config = self.work / "lock.yaml"
        config.write_text(LOCK_CONFIG.format(me=ME, prefix=self.lock_prefix,
                                             state=self.work / "lock-state.sqlite3"))
        self.lock_config = config
        ioc = self._spawn(Child("lock IOC", [sys.executable, "-m", "lock_ioc", "--config",
                                             str(config)],
                                env=self.env(self.ports["lock"]), log=self.work / "lock-ioc.log",
                                cwd=REPO))
        ioc.wait_ready(lambda: self._answers(self.lock_pv("Heartbeat")), 30)

    def start_beamline(self) -> None:
        from beamline_lock.acf import render_acf
        from lock_ioc.config import load
        acf = self.work / "beamline.acf"
        acf.write_text(render_acf(load(self.lock_config)))
        check = subprocess.run([str(self.bin / "ascheck"), str(acf)], capture_output=True,
                               text=True)
        if check.returncode != 0:
            raise RuntimeError(f"ascheck rejected the generated ACF:\n{check.stderr}")
        db = REPO / "db"
        loads = [("shutter.db", ""), ("softMotor.db", ",M=m1,EGU=mm"),
                 ("softMotor.db", ",M=m2,EGU=deg"), ("detector.db", ""), ("beamline.db", "")]
        st = self.work / "st.cmd"
        st.write_text(f'asSetFilename("{acf}")\n'
                      + "".join(f'dbLoadRecords("{db / f}", "P={self.prefix}{m}")\n'
                                for f, m in loads)
                      + "iocInit()\n")
        ioc = self._spawn(Child("beamline softIoc", [str(self.bin / "softIoc"), "-S", str(st)],
                                env=self.env(self.ports["beamline"]),
                                log=self.work / "softIoc.log", cwd=self.work, stdin_pipe=True))
        ioc.wait_ready(lambda: self._answers(self.prefix + "RingCurrent"), 30)

    def start_redis(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found: install Debian's redis-server "
                               "(make system)")
        port = self.ports["redis"]
        redis = self._spawn(Child("redis", [exe, "--port", str(port), "--bind", "127.0.0.1",
                                            "--dir", str(self.work), "--save", "",
                                            "--appendonly", "no", "--daemonize", "no"],
                                  env=self.env(), log=self.work / "redis.log"))

        def pong() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        redis.wait_ready(pong, 20)

    def start_manager(self) -> None:
        from bluesky_queueserver_api.zmq import REManagerAPI
        exe = Path(sys.executable).with_name("start-re-manager")
        control = f"tcp://127.0.0.1:{self.ports['zmq_control']}"
        info = f"tcp://127.0.0.1:{self.ports['zmq_info']}"
        env = self.env()
        env.update(QUEUE_LOCK_LINGER=str(self.args.linger), PYTHONUNBUFFERED="1")
        manager = self._spawn(Child(
            "start-re-manager",
            [str(exe), "--startup-dir", str(STARTUP_DIR),
             "--existing-plans-devices", str(self.work / "existing_plans_and_devices.yaml"),
             "--user-group-permissions", str(PERMISSIONS),
             "--redis-addr", f"127.0.0.1:{self.ports['redis']}",
             "--zmq-control-addr", control, "--zmq-info-addr", info,
             "--zmq-publish-console", "ON"],
            env=env, log=self.work / "re-manager.log", cwd=self.work))
        api = REManagerAPI(zmq_control_addr=control, zmq_info_addr=info, timeout_recv=5)
        try:
            manager.wait_ready(lambda: api.status()["manager_state"] == "idle", 60)
            resp = api.environment_open()
            if not resp["success"]:
                raise RuntimeError(f"cannot open the RE environment: {resp['msg']}")
            manager.wait_ready(lambda: api.status()["manager_state"] == "idle", 120)
            if not api.status()["worker_environment_exists"]:
                raise RuntimeError("the RE environment failed to open; end of "
                                   f"{manager.log}:\n{manager.tail(6000)}")
        finally:
            api.close()

    # ---- running ---------------------------------------------------------------------
    def start(self) -> None:
        for step, what in ((self.start_repeater, "CA repeater"),
                           (self.start_lock_ioc, "lock IOC"),
                           (self.start_beamline, "simulated beamline softIoc (ACF)"),
                           (self.start_redis, "Redis"),
                           (self.start_manager, "RE Manager + RE environment")):
            print(f"demo: starting {what} ...", flush=True)
            step()
        self.write_env_file()

    def write_env_file(self) -> None:
        lines = [f"export {k}={_quote(v)}" for k, v in self.ca_client_env().items()]
        # The real EPICS tools first: the venv's caget/caput are wrappers that exit 0.
        lines.append(f"export PATH={_quote(str(self.bin))}:"
                     f"{_quote(str(Path(sys.executable).parent))}:\"$PATH\"")
        (self.work / "env.sh").write_text("\n".join(lines) + "\n")

    def watch(self) -> int:
        """Wait for Ctrl-C/SIGTERM; a child that dies ends the demo with an error."""
        while True:
            for child in self.children:
                if not child.running():
                    print(f"demo: {child.name} exited unexpectedly "
                          f"({child.proc.returncode}); end of {child.log}:\n{child.tail()}",
                          file=sys.stderr, flush=True)
                    return 1
            time.sleep(0.5)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()

    def cheat_sheet(self) -> str:
        p, lp, b = self.prefix, self.lock_prefix, self.bin
        gates = " ".join(self.lock_pv(contract.gate_suffix(g)) for g in ("queue", "staff"))
        return f"""
beamline-lock demo is running on 127.0.0.1 (Ctrl-C stops every process). Logs: {self.work}
  lock IOC {lp}* on CA port {self.ports['lock']}, beamline softIoc {p}* on CA port \
{self.ports['beamline']}, Redis {self.ports['redis']}, RE Manager ZMQ \
{self.ports['zmq_control']}/{self.ports['zmq_info']}

In another shell:   source {self.work / 'env.sh'}

The lock (lockctl; you are {ME}@{socket.gethostname()}: groups queue and operator here)
  lockctl status                  lockctl watch                   lockctl history
  lockctl acquire mine --note "aligning" --lease 120              lockctl release mine
  lockctl force-release "beam dump drill"
The queue (qserver; its RunEngine holds the lock as session "queue" while it runs)
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
  caput {p}Shutter:Open 1         (you write as the queue's identity: allowed unless another
                                  group holds the lock)
  runuser -u alice -- {b}/caput {p}Shutter:Open 1        (as root, act as user alice:
                                  "Write access denied" while the queue holds the lock)
  runuser -u operator -- {b}/caput -S {self.lock_pv("ForceRelease")} "drill"
Try: queue a scan, start it, then `lockctl acquire mine` (refused, names the queue); or
`lockctl force-release drill` mid-scan (the RunEngine suspends) and resume it with
lock_reacquire. See docs/queueserver.md.
demo: ready
"""


def _quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--free-ports", action="store_true",
                   help="use free ports instead of the fixed ones (CA 5074/5076, Redis "
                        "6390, ZMQ 60615/60625)")
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
            else:
                print(f"demo: logs kept in {demo.work}", flush=True)
    print("demo: stopped, nothing left running", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
