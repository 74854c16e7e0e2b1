"""Lock IOC latency on this machine, in one run.

* acquire-to-confirmed / release-to-confirmed: a CA put with callback to $(P)Acquire /
  $(P)Release (which completes only after the state is durable on disk) until this
  client's monitors show the new Token and State;
* baseline: a CA put with callback to $(P)Ping, a trivial PV on the same IOC
  (target: acquire ratio <= 1.5);
* fan-out: time from the start of a state-changing put until the State update reaches
  each of 200 monitoring clients: 200 EPICS base ``camonitor`` processes (one CA
  circuit each), stamping the receive time (``-t c``).

The client is pyepics (libca, the reference CA client). Run:
    .venv/bin/python bench/bench_lock.py [--cycles N] [--clients N]
It starts its own lock IOC on a free port (state in a temporary directory on the
file system of /tmp) and stops everything it started.
"""
from __future__ import annotations

import argparse
import datetime as dt
import getpass
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import fmt  # noqa: E402
from epics_env import HOST, CANetwork, LockIOC, tool, wait_until  # noqa: E402

CONFIG = """\
prefix: "BENCH:LOCK:"
lease: {{default: 60, max: 3600}}
state: {state}
groups:
  bench: {{users: [{user}]}}
  staff: {{users: [alice, bob]}}
"""


class Monitored:
    """pyepics monitors on State and Token; wait for a value with a condition."""

    def __init__(self, ioc: LockIOC):
        import epics
        self.cond = threading.Condition()
        self.values: dict[str, int | None] = {"State": None, "Token": None}
        self.pvs = [epics.PV(ioc.pv(n), callback=self._cb, auto_monitor=True)
                    for n in self.values]
        wait_until(lambda: None not in self.values.values(), 10, what="monitors")

    def _cb(self, pvname=None, value=None, **_):
        with self.cond:
            self.values[pvname.rsplit(":", 1)[1]] = int(value)
            self.cond.notify_all()

    def wait(self, **expect: int) -> None:
        with self.cond:
            if not self.cond.wait_for(
                    lambda: all(self.values[k] == v for k, v in expect.items()), 10):
                raise RuntimeError(f"not confirmed: {expect} ({self.values})")


def latency(ioc: LockIOC, cycles: int) -> dict[str, list[float]]:
    import epics
    acquire, release, ping = (epics.PV(ioc.pv(n)) for n in ("Acquire", "Release", "Ping"))
    for pv in (acquire, release, ping):
        pv.wait_for_connection(10)
    mon = Monitored(ioc)
    out: dict[str, list[float]] = {"ping": [], "acquire": [], "release": []}
    for i in range(cycles + 10):  # the first 10 are warm-up
        t0 = time.perf_counter()
        ping.put(i, wait=True, timeout=10)
        t1 = time.perf_counter()
        token = mon.values["Token"] + 1
        acquire.put("bench", wait=True, timeout=10)
        mon.wait(Token=token, State=1)
        t2 = time.perf_counter()
        release.put("bench", wait=True, timeout=10)
        mon.wait(State=0)
        t3 = time.perf_counter()
        if i >= 10:
            out["ping"].append(t1 - t0)
            out["acquire"].append(t2 - t1)
            out["release"].append(t3 - t2)
    return out


def fanout(ioc: LockIOC, net: CANetwork, clients: int, cycles: int
           ) -> tuple[list[float], list[float]]:
    import epics
    env = net.client_env()
    env["EPICS_CA_CONN_TMO"] = "30"
    procs = [subprocess.Popen([tool("camonitor"), "-t", "c", "-n", ioc.pv("State")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(clients)]
    lines: list[list[str]] = [[] for _ in procs]
    readers = [threading.Thread(target=lambda i=i: lines[i].extend(procs[i].stdout),
                                daemon=True) for i in range(clients)]
    for r in readers:
        r.start()
    try:
        wait_until(lambda: all(lines), 120, 0.2, what="all camonitors connected")
        acquire, release = epics.PV(ioc.pv("Acquire")), epics.PV(ioc.pv("Release"))
        acquire.wait_for_connection(10)
        release.wait_for_connection(10)
        starts: list[tuple[str, float]] = []
        for _ in range(cycles):
            for pv, value in ((acquire, "1"), (release, "0")):
                starts.append((value, time.time()))
                pv.put("fanout", wait=True, timeout=10)
                time.sleep(0.5)  # let every update land before the next change
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        for r in readers:
            r.join(10)
    per_client, to_all = [], []
    for k, (value, t0) in enumerate(starts):
        t_end = starts[k + 1][1] if k + 1 < len(starts) else float("inf")
        got = []
        for out in lines:
            for line in out:
                parts = line.split()
                if len(parts) < 4 or parts[3] != value:
                    continue
                stamp = f"{parts[1]} {parts[2]}".strip("()")  # client time: "(date time)"
                t = dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f")
                ts = t.timestamp()
                if t0 <= ts < t_end:
                    got.append(ts)
        if len(got) != clients:
            raise RuntimeError(f"change {k}: {len(got)} of {clients} clients saw it")
        per_client += [t - t0 for t in got]
        to_all.append(max(got) - t0)
    return per_client, to_all


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--fanout-cycles", type=int, default=10)
    args = parser.parse_args()
    net = CANetwork()
    with tempfile.TemporaryDirectory(prefix="bench-lock-") as tmp:
        state = Path(tmp) / "lock-state.sqlite3"
        ioc = LockIOC(net, Path(tmp), prefix="BENCH:LOCK:",
                      config_text=CONFIG.format(state=state, user=getpass.getuser()))
        ioc.start()
        try:
            os.environ.update(net.client_env())
            res = latency(ioc, args.cycles)
            per_client, to_all = fanout(ioc, net, args.clients, args.fanout_cycles)
        finally:
            ioc.stop()
    print(f"lock IOC benchmark on {HOST} ({os.cpu_count()} CPUs); client pyepics/libca; "
          f"state file under {tempfile.gettempdir()}")
    print(fmt("plain put+callback (Ping)", res["ping"], width=30, unit="ms"))
    print(fmt("acquire-to-confirmed", res["acquire"], width=30, unit="ms"))
    print(fmt("release-to-confirmed", res["release"], width=30, unit="ms"))
    base = statistics.median(res["ping"])
    print(f"ratio acquire/plain (median)   {statistics.median(res['acquire']) / base:6.2f}"
          "   (target <= 1.5)")
    print(f"ratio release/plain (median)   {statistics.median(res['release']) / base:6.2f}")
    print(fmt(f"change -> each of {args.clients} clients", per_client, width=30, unit="ms"))
    print(fmt(f"change -> all {args.clients} clients", to_all, width=30, unit="ms"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
