"""Lock IOC with frozen CA clients: how long one may stall before it is dropped; memory.

A frozen client is EPICS base ``camonitor`` on the PVs a busy display watches (History,
Message, State, Token, Owner, ...), stopped with SIGSTOP once it has its first values (a
suspended laptop, a frozen GUI). pyepics drives acquire/release cycles with long notes, so
History updates are 16 kB.

* stall: one frozen client, the IOC's default bound. Reported: how long its socket took
  no data before it was dropped (from the IOC's log: the "is not reading" line comes 1 s
  after the socket stopped taking data, the "dropped" line when the bound ran out), and
  the time from SIGSTOP to the drop (the kernel first absorbs a few MB of updates).
* memory: 10 frozen clients kept connected (bound raised to an hour) and one healthy
  ``camonitor`` on State, through 10,000 state changes (5,000 acquire/release cycles);
  the IOC's resident memory (VmRSS) idle, with the 10 connected before the changes, and
  after them, and its peak (VmHWM). The healthy client must have seen all 10,000.

Run:  .venv/bin/python bench/bench_frozen_clients.py [--changes N] [--clients N]
It starts its own lock IOC on a free port and stops everything it started.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ca_clients import (DISPLAY_PVS, Camonitor, busy_config, drive,  # noqa: E402
                        drive_until)
from epics_env import HOST, CANetwork, LockIOC, wait_until  # noqa: E402

from lock_ioc.ca_server import STALL_TIMEOUT  # noqa: E402

STALLED, DROPPED = "is not reading", "dropped CA client"


def start_ioc(net: CANetwork, workdir: Path, *args: str) -> LockIOC:
    workdir.mkdir()
    ioc = LockIOC(net, workdir, prefix="BENCH:LOCK:", config_text=busy_config(
        "BENCH:LOCK:", workdir / "lock-state.sqlite3"))
    ioc.argv += list(args)
    return ioc.start()


def frozen_clients(net: CANetwork, ioc: LockIOC, workdir: Path, n: int) -> list[Camonitor]:
    mons = [Camonitor(net, [ioc.pv(p) for p in DISPLAY_PVS], workdir / f"frozen{i}.out", "-S")
            for i in range(n)]
    wait_until(lambda: all(m.lines(ioc.pv(p)) for m in mons for p in DISPLAY_PVS), 60,
               what="first values of every frozen client")
    for mon in mons:
        mon.freeze()
    return mons


def log_time(ioc: LockIOC, marker: str) -> float:
    """Time of the IOC's first log line containing ``marker`` (its local clock)."""
    line = next(ln for ln in ioc.log().splitlines() if marker in ln)
    return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def vm(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def stall(net: CANetwork, tmp: Path) -> dict[str, float]:
    ioc = start_ioc(net, tmp / "stall")
    mons: list[Camonitor] = []
    try:
        mons = frozen_clients(net, ioc, tmp / "stall", 1)
        stopped = time.time()
        drive_until(net, ioc.prefix, lambda: STALLED in ioc.log(), chunk=20)
        wait_until(lambda: DROPPED in ioc.log(), STALL_TIMEOUT + 30, 0.2, what="drop")
        full = log_time(ioc, STALLED) - 1.0  # the log line comes after 1 s without progress
        dropped = log_time(ioc, DROPPED)
        return {"stalled": dropped - full, "since_stop": dropped - stopped}
    finally:
        for mon in mons:
            mon.stop()
        ioc.stop()


def memory(net: CANetwork, tmp: Path, clients: int, changes: int) -> dict[str, int]:
    ioc = start_ioc(net, tmp / "memory", "--client-stall-timeout", "3600")
    mons: list[Camonitor] = []
    try:
        time.sleep(2)
        out = {"idle": vm(ioc.proc.pid)["VmRSS"]}
        mons = frozen_clients(net, ioc, tmp / "memory", clients)
        healthy = Camonitor(net, [ioc.pv("State")], tmp / "memory" / "healthy.out")
        mons.append(healthy)
        wait_until(lambda: healthy.values(ioc.pv("State")), 15, what="healthy monitor")
        out["connected"] = vm(ioc.proc.pid)["VmRSS"]
        drive(net, ioc.prefix, cycles=changes // 2, refusals=0)
        wait_until(lambda: len(healthy.values(ioc.pv("State"))) == changes + 1, 60,
                   what="the healthy client saw every change")
        status = vm(ioc.proc.pid)
        out.update(after=status["VmRSS"], peak=status["VmHWM"],
                   backlogged=ioc.log().count(STALLED), dropped=ioc.log().count(DROPPED))
        return out
    finally:
        for mon in mons:
            mon.stop()
        ioc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=10000)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()
    net = CANetwork()
    with tempfile.TemporaryDirectory(prefix="bench-frozen-") as tmp:
        s = stall(net, Path(tmp))
        m = memory(net, Path(tmp), args.clients, args.changes)
    mb = 1024
    print(f"lock IOC with frozen CA clients on {HOST}; clients: SIGSTOPped camonitor")
    print(f"stall bound (--client-stall-timeout)     {STALL_TIMEOUT:8.1f} s")
    print(f"socket took no data, until dropped       {s['stalled']:8.1f} s")
    print(f"SIGSTOP until dropped                    {s['since_stop']:8.1f} s"
          "   (the kernel first buffers ~4 MB of updates)")
    print(f"RSS idle                                 {m['idle'] / mb:8.1f} MB")
    print(f"RSS with {args.clients} frozen + 1 healthy client     "
          f"{m['connected'] / mb:8.1f} MB")
    print(f"RSS after {args.changes} state changes           {m['after'] / mb:8.1f} MB"
          f"   (peak {m['peak'] / mb:.1f} MB; {m['backlogged']} clients backlogged, "
          f"{m['dropped']} dropped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
