"""A beamline's worth of gated device IOCs on one lock IOC, against EPICS base's C server.

N device IOCs (EPICS base ``softIoc``, the beamline's ``db/shutter.db``) each load the ACF
that ``lockctl acf`` generates from the lock's config, so each holds CA monitors on the
lock's ``$(P)Gate:<group>`` PVs; 200 ``camonitor`` clients watch ``$(P)State``. The
reference, measured in the same run with the same clients: a C ``softIoc`` serving the
same gate and state PVs as records. Each device IOC's ACF also has an ``ASG(REFGATED)``
(the generated ``ASG(GATED)`` rendered for the reference's prefix) and a record
``$(P)Ref:Open`` in it; each camonitor watches the reference's state too.

Measured, with N = 10, 20, 30 device IOCs (grown in one run):

* a lock change until every device IOC has changed a queue-group client's access rights
  (the ACF's gate input updated; the rights event reaches the client, caproto's client as
  ``bluesky``): an Acquire (rights revoked) and a Release (restored), put with callback by
  a staff member; the reference: a put to its ``Lock`` record, which changes its State (to
  the 200 monitors) and its ``Gate:queue`` at once, as a lock change does. Changes of the
  two alternate. Per change the time until the last of the N IOCs (and until each one);
* the lock IOC's resident memory (RSS) and CPU while idle with all of them connected
  (over ``--idle`` seconds), and the C server's, and how both grow from 10 to 30 IOCs.

Run: ``.venv/bin/python bench/bench_devices.py [--cycles N] [--clients N] [--idle S]``.
It starts everything on free ports in a temporary directory and stops it all.
"""
from __future__ import annotations

import argparse
import getpass
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _camonitors import Camonitors  # noqa: E402
from _stats import fmt, pct  # noqa: E402
from epics_env import HOST, REPO, CANetwork, LockIOC, Server, tool  # noqa: E402

from demo import services  # noqa: E402

PREFIX, REF = "BENCH:LOCK:", "BENCH:REF:"
CONFIG = """\
prefix: "{prefix}"
lease: {{default: 60, max: 3600}}
state: {state}
groups:
  queue:    {{users: [bluesky]}}
  staff:    {{users: [alice, bob, {user}]}}
  operator: {{users: [operator], operator: true}}
"""
#: The reference server: the lock's state and gates as records. A put to Lock (1 held by
#: staff, 0 free) changes State and Gate:queue at once, as a lock change does.
REF_DB = """\
record(longout, "{p}Lock") {{
    field(OUT, "{p}State PP")
    field(FLNK, "{p}Gate:queue")
}}
record(mbbo, "{p}State") {{
    field(ZRST, "Free")
    field(ONST, "Held")
    field(TWST, "Disabled")
}}
record(calcout, "{p}Gate:queue") {{
    field(INPA, "{p}Lock NPP")
    field(CALC, "A=0")
    field(PINI, "YES")
}}
record(longout, "{p}Gate:staff") {{
    field(VAL, "1")
    field(PINI, "YES")
}}
record(longout, "{p}Gate:operator") {{
    field(VAL, "1")
    field(PINI, "YES")
}}
"""
#: A record of each device IOC gated on the reference.
REF_RECORD = 'record(bo, "$(P)Ref:Open") {\n    field(ASG, "REFGATED")\n}\n'
SIZES = (10, 20, 30)  # device IOCs, grown in one run


def device_acf(lock_config: Path) -> str:
    """The generated ACF, plus ASG(REFGATED): its ASG(GATED) for the reference."""
    from beamline_lock.acf import render_acf
    from lock_ioc.config import load
    config = load(lock_config)
    ref = render_acf(config, "REFGATED", safe_asg="REFSAFE", prefix=REF)
    block = re.search(r"^ASG\(REFGATED\) \{.*?^\}$", ref, re.S | re.M).group(0)
    return services.checked_acf(render_acf(config) + "\n# The benchmark's reference.\n"
                                + block + "\n")


def device_ioc(work: Path, index: int, acf: str, net: CANetwork) -> services.Service:
    """Device IOC ``DEV<index>:`` on a free port: db/shutter.db and a reference-gated
    record."""
    prefix = f"DEV{index}:"
    work.mkdir(parents=True, exist_ok=True)
    port = services.free_port(set(net.ports))
    net.add(port)
    st_cmd = (f'asSetFilename("{work / "device.acf"}")\n'
              f'dbLoadRecords("{REPO / "db" / "shutter.db"}", "P={prefix}")\n'
              f'dbLoadRecords("{work / "ref.db"}", "P={prefix}")\n'
              "iocInit()\n")
    return services.soft_ioc(f"device IOC {prefix}", work / "st.cmd", port,
                             prefix + "Shutter:Status", net.client_env, cwd=work,
                             files=[services.Rendered(work / "device.acf", acf),
                                    services.Rendered(work / "ref.db", REF_RECORD),
                                    services.Rendered(work / "st.cmd", st_cmd)])


class Rights:
    """Write access of a queue-group client (``bluesky``) to each device IOC's records,
    as access-rights events (caproto's threading client)."""

    def __init__(self):
        from caproto.threading.client import Context
        self.ctx = Context(client_name="bluesky", host_name=HOST)
        self.cond = threading.Condition()
        self.writable: dict[str, bool] = {}
        self.changed: dict[str, float] = {}
        self.pvs: list = []
        self.callbacks: list = []

    def watch(self, names: list[str]) -> None:
        from caproto import AccessRights
        pvs = self.ctx.get_pvs(*names, timeout=10)
        for pv in pvs:
            pv.wait_for_connection(timeout=30)

            def on_rights(pv, rights, name=pv.name):
                with self.cond:
                    writable = AccessRights.WRITE in rights
                    if self.writable.get(name) != writable:
                        self.writable[name] = writable
                        self.changed[name] = time.perf_counter()
                    self.cond.notify_all()
            self.callbacks.append(on_rights)  # caproto keeps only a weak reference
            pv.access_rights_callback.add_callback(on_rights, run=True)
        self.pvs += pvs

    def wait(self, names: list[str], writable: bool, timeout: float = 30) -> list[float]:
        """Until all ``names`` are (not) writable; when each became so."""
        with self.cond:
            if not self.cond.wait_for(lambda: all(self.writable.get(n) == writable
                                                  for n in names), timeout):
                late = [n for n in names if self.writable.get(n) != writable]
                raise RuntimeError(f"{len(late)} of {len(names)} never became "
                                   f"{'writable' if writable else 'read-only'}: {late[:3]}")
            return [self.changed[n] for n in names]

    def close(self) -> None:
        self.ctx.disconnect()


def usage(pid: int) -> tuple[float, float]:
    """(CPU seconds used so far, resident memory in MB) of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text()
               .splitlines() if line.startswith("VmRSS:")) / 1024
    return cpu, rss


def idle(pids: dict[str, int], seconds: float) -> dict[str, tuple[float, float]]:
    """Per process: (CPU in % of one core over ``seconds`` of idling, RSS MB at the end)."""
    before = {k: usage(p)[0] for k, p in pids.items()}
    time.sleep(seconds)
    out = {}
    for k, p in pids.items():
        cpu, rss = usage(p)
        out[k] = ((cpu - before[k]) / seconds * 100, rss)
    return out


def cycles(rights: Rights, n: int, count: int, lock_pvs, ref_lock
           ) -> dict[str, list[tuple[float, list[float]]]]:
    """Alternate lock changes and reference changes; per change (to the last IOC, to each)."""
    gated = [f"DEV{i}:Shutter:Open" for i in range(n)]
    ref_lockd = [f"DEV{i}:Ref:Open" for i in range(n)]
    acquire, release = lock_pvs
    steps = [("lock", lambda: acquire.write(b"bench", wait=True, timeout=10), gated, False),
             ("ref", lambda: ref_lock.write([1], wait=True, timeout=10), ref_lockd, False),
             ("lock", lambda: release.write(b"bench", wait=True, timeout=10), gated, True),
             ("ref", lambda: ref_lock.write([0], wait=True, timeout=10), ref_lockd, True)]
    out: dict[str, list] = {"lock": [], "ref": []}
    for i in range(count + 2):  # 2 warm-up cycles
        order = steps if i % 2 == 0 else [steps[1], steps[0], steps[3], steps[2]]
        for side, put, names, writable in order:
            t0 = time.perf_counter()
            put()
            times = rights.wait(names, writable)
            if i >= 2:
                out[side].append((max(times) - t0, [t - t0 for t in times]))
            time.sleep(0.1)
    return out


def start_device(devices: services.Stack, work: Path, i: int, acf: str, net: CANetwork
                 ) -> None:
    """Start device IOC ``i``; on a port another process took meanwhile (this machine is
    shared), again on another."""
    for attempt in range(3):
        service = device_ioc(work / f"dev{i}", i, acf, net)
        try:
            devices.start(service, f"dev{i}-{attempt}")
            return
        except RuntimeError:
            devices.launched.pop().stop()
            net.ports.remove(service.ports["ca"])
    raise RuntimeError(f"device IOC {i} did not start (see {work}/dev{i}-*.log)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=30, help="cycles per size")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idling")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES),
                        help="numbers of device IOCs, grown in this order")
    args = parser.parse_args()
    net = CANetwork()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-devices-") as tmp:
        work = Path(tmp)
        (work / "ref-server.db").write_text(REF_DB.format(p=REF))
        lock = LockIOC(net, work, prefix=PREFIX, config_text=CONFIG.format(
            prefix=PREFIX, state=work / "lock-state.sqlite3", user=getpass.getuser()))
        ref = Server(net, [tool("softIoc"), "-S", "-d", str(work / "ref-server.db")],
                     log=work / "ref-softioc.log", ready_pv=REF + "State")
        devices = services.Stack(work)
        mons = rights = None
        try:
            lock.start()
            ref.start()
            os.environ.update(net.client_env())  # caproto's client reads it at start
            acf = device_acf(lock.config)
            from caproto.threading.client import Context
            staff = Context()  # this process's user, a staff member in the lock's config
            lock_pvs = staff.get_pvs(lock.pv("Acquire"), lock.pv("Release"), timeout=10)
            ref_lock, = staff.get_pvs(REF + "Lock", timeout=10)
            for pv in (*lock_pvs, ref_lock):
                pv.wait_for_connection(timeout=10)
            mons = Camonitors(args.clients, [lock.pv("State"), REF + "State"],
                              dict(net.client_env(), EPICS_CA_CONN_TMO="30"))
            mons.wait_connected()
            started = 0
            for n in args.sizes:
                for i in range(started, n):
                    start_device(devices, work, i, acf, net)
                started = n
                # A client that knows every device IOC started so far.
                if rights is not None:
                    rights.close()
                os.environ.update(net.client_env())
                rights = Rights()
                names = [f"DEV{i}:{r}" for i in range(n) for r in ("Shutter:Open", "Ref:Open")]
                rights.watch(names)
                rights.wait(names, True)  # every ACF has its gates
                times = cycles(rights, n, args.cycles, lock_pvs, ref_lock)
                use = idle({"lock": lock.proc.pid, "ref": ref.proc.pid}, args.idle)
                results.append((n, times, use))
            staff.disconnect()
        finally:
            if rights is not None:
                rights.close()
            if mons is not None:
                mons.stop()
            devices.stop()
            ref.stop()
            lock.stop()
    report(results, args)
    return 0


def report(results, args) -> None:
    print(f"device IOC benchmark on {HOST} ({os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}): N softIocs each with the generated ACF, "
          f"{args.clients} camonitors; reference: C softIoc serving the gates")
    for n, times, use in results:
        print(f"-- {n} device IOCs")
        last = {side: [t for t, _ in v] for side, v in times.items()}
        each = {side: [x for _, ts in v for x in ts] for side, v in times.items()}
        for side, label in (("lock", "lock IOC"), ("ref", "C softIoc")):
            print(fmt(f"change -> all {n} IOCs, {label}", last[side], width=34, unit="ms"))
            print(fmt(f"change -> each IOC, {label}", each[side], width=34, unit="ms"))
        print(f"ratio lock/C, all IOCs: median "
              f"{statistics.median(last['lock']) / statistics.median(last['ref']):5.2f}   "
              f"p99 {pct(last['lock'], 99) / pct(last['ref'], 99):5.2f}")
        (lcpu, lrss), (rcpu, rrss) = use["lock"], use["ref"]
        print(f"idle {args.idle:g} s: lock IOC CPU {lcpu:5.2f} % RSS {lrss:6.1f} MB; "
              f"C softIoc CPU {rcpu:5.2f} % RSS {rrss:6.1f} MB; ratio RSS {lrss / rrss:5.2f}"
              + (f", CPU {lcpu / rcpu:5.1f}" if rcpu > 0 else ", CPU (C server used none)"))
    if len(results) > 1:
        (n0, _, u0), (n1, _, u1) = results[0], results[-1]
        per = n1 - n0
        print(f"growth {n0} -> {n1} IOCs: lock IOC RSS {u1['lock'][1] - u0['lock'][1]:+.1f} MB "
              f"({(u1['lock'][1] - u0['lock'][1]) / per * 1024:.0f} kB per IOC), CPU "
              f"{u1['lock'][0] - u0['lock'][0]:+.2f} %; C softIoc RSS "
              f"{u1['ref'][1] - u0['ref'][1]:+.1f} MB, CPU {u1['ref'][0] - u0['ref'][0]:+.2f} %")


if __name__ == "__main__":
    sys.exit(main())
