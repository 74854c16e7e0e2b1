"""A/B of two versions of the lock (IOC and Python client) in the same run.

Side A is a git revision of this repository (exported to a temporary directory), side B
this checkout. Each side runs its own lock IOC (its own port, prefix and state file) and
its own client process (``_ab_worker.py`` with that side's ``clients/`` first on the
path). Cycles alternate between the sides (which goes first alternates too); each cycle
times a plain put with callback to that IOC's $(P)Ping, an acquire and a release through
``BeamlineLock`` (order rotated). Printed per round and over all rounds (median, and the
spread over rounds): each side's acquire and release as ratios to its own plain put, and
B's medians as ratios to A's.

``--fanout N``: instead, N ``camonitor`` processes each watch both IOCs' $(P)State (one
circuit to each) and the sides' state changes (an acquire, a release) alternate; the time
from the put until each client has the change, per side (median, p99) and B/A.

Run: ``.venv/bin/python bench/bench_ab.py --ref main [--rounds 5] [--cycles 200]
[--fanout 200]``.
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import statistics
import subprocess
import sys
import tarfile
import io
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(HERE))
from _camonitors import Camonitors  # noqa: E402
from _stats import pct  # noqa: E402
from bench_lock import CONFIG  # noqa: E402
from epics_env import HOST, CANetwork, LockIOC  # noqa: E402

STEPS = ("ping", "acquire", "release")
WARMUP = 10


class CheckoutLockIOC(LockIOC):
    """The lock IOC of another checkout (``python -m lock_ioc`` run from its directory)."""

    def __init__(self, *args, checkout: Path, **kwargs):
        self.checkout = checkout
        super().__init__(*args, **kwargs)

    def describe(self):
        service = super().describe()
        service.cwd = self.checkout
        return service


def export(ref: str, into: Path) -> str:
    """``git archive`` of ``ref`` unpacked into ``into``; its commit id."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref],
                            check=True, capture_output=True, text=True).stdout.strip()
    data = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return commit


class Side:
    def __init__(self, name: str, checkout: Path, work: Path, label: str):
        self.name, self.checkout, self.label = name, checkout, label
        self.net = CANetwork()
        prefix = f"AB{name}:LOCK:"
        work.mkdir()
        self.ioc = CheckoutLockIOC(
            self.net, work, prefix=prefix, checkout=checkout,
            config_text=CONFIG.replace('"BENCH:LOCK:"', f'"{prefix}"').format(
                state=work / "lock-state.sqlite3", user=getpass.getuser()))
        self.worker: subprocess.Popen | None = None

    def start(self) -> None:
        self.ioc.start()
        env = dict(self.net.client_env(),
                   PYTHONPATH=os.pathsep.join([str(self.checkout / "clients"),
                                               str(self.checkout)]))
        self.worker = subprocess.Popen([sys.executable, str(HERE / "_ab_worker.py"),
                                        self.ioc.prefix], env=env, cwd=self.checkout,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True)
        line = self.worker.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"side {self.name}: worker did not start ({line!r})")

    def cycle(self, k: int) -> dict[str, float]:
        self.worker.stdin.write(f"cycle {k}\n")
        self.worker.stdin.flush()
        return json.loads(self.worker.stdout.readline())

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.stdin.write("quit\n")
            self.worker.stdin.close()
            try:
                self.worker.wait(20)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
        self.ioc.stop()


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):5.2f} ({min(values):.2f}-{max(values):.2f})"


def fanout(sides: list[Side], clients: int, rounds: int, cycles: int) -> int:
    """Each round: ``cycles`` state changes per side, alternating, seen by every client."""
    import time

    import epics
    from epics import ca
    net = CANetwork()
    for side in sides:
        net.add(side.ioc.port)
    os.environ.update(net.client_env())
    mons = Camonitors(clients, [s.ioc.pv("State") for s in sides],
                      dict(net.client_env(), EPICS_CA_CONN_TMO="30"))
    per_round = []
    try:
        mons.wait_connected()
        pvs = {s.name: (epics.PV(s.ioc.pv("Acquire")), epics.PV(s.ioc.pv("Release")))
               for s in sides}
        for pair in pvs.values():
            for pv in pair:
                pv.wait_for_connection(10)
        for r in range(rounds):
            changes: dict[str, list] = {s.name: [] for s in sides}
            for i in range(cycles):
                order = sides if i % 2 == 0 else sides[::-1]
                for step, shown in ((0, "1"), (1, "0")):   # acquire, then release
                    for side in order:
                        changes[side.name].append((side.ioc.pv("State"), shown, time.time()))
                        pvs[side.name][step].put("fanout", wait=True, timeout=10)
                        time.sleep(0.3)   # every update lands before the next change
            per_round.append({n: [d for got, _ in mons.delays(c) for d in got]
                              for n, c in changes.items()})
            for lines in mons.lines:
                lines.clear()
        ca.finalize_libca()
    finally:
        mons.stop()
    print(f"A/B fan-out on {HOST} ({os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}); {sides[0].label}, {sides[1].label}; {clients} "
          f"camonitors watching both; {rounds} rounds of {2 * cycles} changes per side")
    for r, res in enumerate(per_round):
        print(f"round {r + 1}: " + "   ".join(
            f"{n}: each client median {statistics.median(v) * 1e3:6.1f} ms "
            f"p99 {pct(v, 99) * 1e3:6.1f} ms" for n, v in res.items()))
    print("over rounds, median (min-max):")
    for q, label in ((50, "median"), (99, "p99")):
        print(f"  B/A each client {label:6s} "
              f"{spread([pct(res['B'], q) / pct(res['A'], q) for res in per_round])}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="main", help="git revision of side A")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cycles", type=int, default=200, help="cycles per side per round")
    parser.add_argument("--fanout", type=int, default=0, metavar="N",
                        help="the fan-out to N camonitors instead (--cycles acquire+release "
                             "per side per round)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        work = Path(tmp)
        commit = export(args.ref, work / "a-src")
        sides = [Side("A", work / "a-src", work / "a", f"A = {args.ref} ({commit})"),
                 Side("B", REPO, work / "b", "B = this checkout")]
        rounds: list[dict[str, dict[str, list[float]]]] = []
        try:
            for side in sides:
                side.start()
            if args.fanout:
                return fanout(sides, args.fanout, args.rounds, args.cycles)
            for k in range(WARMUP):
                for side in sides:
                    side.cycle(k)
            for r in range(args.rounds):
                res = {s.name: {step: [] for step in STEPS} for s in sides}
                for i in range(args.cycles):
                    # Which side goes first alternates, and independently of it which
                    # of ping and acquire+release goes first within a side's cycle.
                    order = sides if i % 2 == 0 else sides[::-1]
                    for side in order:
                        for step, t in side.cycle(i // 2).items():
                            res[side.name][step].append(t)
                rounds.append(res)
        finally:
            for side in sides:
                side.stop()
    print(f"A/B on {HOST} ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}); "
          f"{sides[0].label}, {sides[1].label}; {args.rounds} rounds of {args.cycles} "
          "cycles per side, the sides alternating")
    med = [{n: {s: statistics.median(v) for s, v in side.items()} for n, side in r.items()}
           for r in rounds]
    for r, m in enumerate(med):
        cells = []
        for n in ("A", "B"):
            cells.append(f"{n}: ping {m[n]['ping'] * 1e3:6.3f} ms  acquire "
                         f"{m[n]['acquire'] / m[n]['ping']:4.2f}x  release "
                         f"{m[n]['release'] / m[n]['ping']:4.2f}x")
        print(f"round {r + 1}: " + "   ".join(cells))
    print("over rounds, median (min-max):")
    for n in ("A", "B"):
        for step in ("acquire", "release"):
            print(f"  {n} {step:8s} / {n} ping     "
                  f"{spread([m[n][step] / m[n]['ping'] for m in med])}")
    for step in STEPS:
        print(f"  B {step:8s} / A {step:8s} {spread([m['B'][step] / m['A'][step] for m in med])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
