"""Lock IOC latency and fan-out on this machine, each as a ratio to a reference measured
in the same run, samples of the things compared taken in turn.

* Latency (client pyepics/libca, one process, the lock's Python client monitoring the
  lock as any client does):

  - reference: a plain CA put with callback to $(P)Ping, a trivial PV on the same IOC;
  - put+monitors: a put with callback to $(P)Acquire / $(P)Release (which completes only
    after the state is durable on disk) until this process's monitors show the new
    State and Token;
  - client: ``BeamlineLock.acquire()`` / ``release()`` (what ``lockctl``, the RunEngine
    guard and the ophyd gate use): the put, then the client's own confirmation that its
    monitors show the grant with its token (or the release);
  - also, for scale: the same plain put to EPICS base's C ``softIoc``, and one durable
    commit of the lock's store (SQLite, ``synchronous=FULL``) on the same file system:
    with the plain put, the floor of a durable command.

  Target: acquire and release within 1.5x the plain put (median).

* Fan-out: 200 EPICS base ``camonitor`` processes (one CA circuit to each server each),
  each monitoring both $(P)State of the lock IOC and a comparable record (an ``mbbo``
  with the same three states) of EPICS base's C ``softIoc``; changes of the two alternate.
  The time from the start of the put that changes the state until the update reaches each
  client (its receive time, ``-t c``), and until it reached all of them. Target: the lock
  IOC's p99 per client within 1.5x the C server's, and under 100 ms.

Run: ``.venv/bin/python bench/bench_lock.py [--cycles N] [--clients N] [--profile FILE]``.
It starts its own lock IOC (state in a temporary directory under /tmp) and softIoc on free
ports, and stops everything it started.
"""
from __future__ import annotations

import argparse
import getpass
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _camonitors import Camonitors  # noqa: E402
from _stats import fmt, pct  # noqa: E402
from epics_env import HOST, CANetwork, LockIOC, Server, tool  # noqa: E402

CONFIG = """\
prefix: "BENCH:LOCK:"
lease: {{default: 60, max: 3600}}
state: {state}
groups:
  bench: {{users: [{user}]}}
  staff: {{users: [alice, bob]}}
"""
#: The C server's records: a state like the lock's, and a trivial PV like $(P)Ping.
REF_DB = """\
record(mbbo, "BENCH:REF:State") {
    field(ZRST, "Free")
    field(ONST, "Held")
    field(TWST, "Disabled")
}
record(longout, "BENCH:REF:Ping") {
}
"""
WARMUP = 10


class ProfiledLockIOC(LockIOC):
    """The lock IOC under cProfile (its statistics written to ``out`` when it stops)."""

    def __init__(self, *args, out: Path, **kwargs):
        self.out = out
        super().__init__(*args, **kwargs)

    def describe(self):
        service = super().describe()
        python, dash_m, *rest = service.argv
        service.argv = [python, "-m", "cProfile", "-o", str(self.out), dash_m, *rest]
        return service


def print_profile(path: Path, top: int) -> None:
    import pstats
    for key in ("tottime", "cumulative"):
        print(f"-- lock IOC profile, top {top} by {key} ({path})")
        pstats.Stats(str(path)).sort_stats(key).print_stats(top)


def latency(ioc: LockIOC, cycles: int) -> dict[str, list[float]]:
    """Each cycle: a plain put to Ping, an acquire and release through the lock's client,
    and a plain put to the C softIoc, in an order that rotates."""
    import ctypes

    import epics
    from beamline_lock.client import BeamlineLock, put_callback
    from epics import dbr
    lock = BeamlineLock(ioc.prefix, session="bench", lease=600, timeout=10)
    ping, ref_ping = epics.PV(ioc.pv("Ping")), epics.PV("BENCH:REF:Ping")
    for pv in (ping, ref_ping):
        pv.wait_for_connection(10)

    def plain_put(pv, i: int) -> None:
        # The put the client's commands use (put with callback, waiting without polling).
        if put_callback(pv, dbr.LONG, (ctypes.c_int32 * 1)(i), 10) != dbr.ECA_NORMAL:
            raise RuntimeError(f"put to {pv.pvname} failed")

    # The lock's own store on the same file system: one durable commit, the disk's part
    # of a command's floor.
    from lock_ioc.machine import Event, LockState
    from lock_ioc.store import Store
    store = Store(Path(ioc.workdir) / "floor.sqlite3")
    held = LockState(mode="Held", owner="bench@host", session="bench", token=1, expiry=1e10)

    def commit(i: int) -> None:
        store.commit(held, [Event(time.time(), "acquired", "bench@host", "bench", i)])

    steps = {
        "ping": lambda i: plain_put(ping, i),
        "acquire": lambda i: lock.acquire(),
        "release": lambda i: lock.release(),
        "softIoc ping": lambda i: plain_put(ref_ping, i),
        "commit": commit,
    }
    groups = [("ping",), ("acquire", "release"), ("softIoc ping",), ("commit",)]
    out: dict[str, list[float]] = {name: [] for name in steps}
    clock = time.perf_counter
    try:
        for i in range(cycles + WARMUP):
            k = i % len(groups)  # rotate: no step always follows the same one
            for group in groups[k:] + groups[:k]:
                for name in group:
                    t0 = clock()
                    steps[name](i)
                    if i >= WARMUP:
                        out[name].append(clock() - t0)
    finally:
        lock.close()
        store.close()
    return out


def fanout(ioc: LockIOC, net: CANetwork, clients: int, cycles: int
           ) -> dict[str, list[tuple[list[float], float]]]:
    import epics
    mons = Camonitors(clients, [ioc.pv("State"), "BENCH:REF:State"],
                      dict(net.client_env(), EPICS_CA_CONN_TMO="30"))
    changes: dict[str, list[tuple[str, str, float]]] = {"lock": [], "softIoc": []}
    try:
        mons.wait_connected()
        acquire, release, ref = (epics.PV(n) for n in (ioc.pv("Acquire"), ioc.pv("Release"),
                                                       "BENCH:REF:State"))
        for pv in (acquire, release, ref):
            pv.wait_for_connection(10)
        puts = [("lock", ioc.pv("State"), acquire, "fanout", "1"),
                ("softIoc", "BENCH:REF:State", ref, 1, "1"),
                ("lock", ioc.pv("State"), release, "fanout", "0"),
                ("softIoc", "BENCH:REF:State", ref, 0, "0")]
        for i in range(cycles):
            # Which server changes first alternates; the lock's acquire precedes its release.
            order = puts if i % 2 == 0 else [puts[1], puts[0], puts[3], puts[2]]
            for side, state_pv, pv, value, shown in order:
                changes[side].append((state_pv, shown, time.time()))
                pv.put(value, wait=True, timeout=10)
                time.sleep(0.5)  # let every update land before the next change
    finally:
        mons.stop()
    return {side: mons.delays(sorted(c, key=lambda c: c[2])) for side, c in changes.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--fanout-cycles", type=int, default=10)
    parser.add_argument("--profile", metavar="FILE", type=Path,
                        help="run the lock IOC under cProfile, write its statistics to FILE "
                             "and print the top entries (latency figures are then inflated)")
    args = parser.parse_args()
    net = CANetwork()
    with tempfile.TemporaryDirectory(prefix="bench-lock-") as tmp:
        work = Path(tmp)
        state = work / "lock-state.sqlite3"
        (work / "ref.db").write_text(REF_DB)
        kind, extra = (LockIOC, {}) if args.profile is None else \
            (ProfiledLockIOC, {"out": args.profile.resolve()})
        ioc = kind(net, work, prefix="BENCH:LOCK:",
                   config_text=CONFIG.format(state=state, user=getpass.getuser()), **extra)
        ref = Server(net, [tool("softIoc"), "-S", "-d", str(work / "ref.db")],
                     log=work / "softioc.log", ready_pv="BENCH:REF:State")
        try:
            ioc.start()
            ref.start()
            os.environ.update(net.client_env())  # before libca starts in this process
            res = latency(ioc, args.cycles)
            fan = fanout(ioc, net, args.clients, args.fanout_cycles) if args.clients else {}
            from epics import ca
            ca.finalize_libca()  # leave CA before the IOCs stop (no disconnect warnings)
        finally:
            ref.stop()
            ioc.stop()
    print(f"lock IOC benchmark on {HOST} ({os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}); client pyepics/libca; state file under "
          f"{tempfile.gettempdir()}")
    base = statistics.median(res["ping"])
    rows = [("plain put+callback (Ping)", "ping"), ("acquire-to-confirmed", "acquire"),
            ("release-to-confirmed", "release"), ("plain put to C softIoc", "softIoc ping"),
            ("durable store commit", "commit")]
    for label, key in rows:
        print(f"{fmt(label, res[key], width=28, unit='ms')}   "
              f"ratio {statistics.median(res[key]) / base:5.2f}")
    print("(ratio: median / median of the plain put to $(P)Ping in this run; "
          "target <= 1.5 for acquire and release)")
    print(f"floor of a durable command (plain put + store commit)      ratio "
          f"{1 + statistics.median(res['commit']) / base:5.2f}")
    if fan:
        print(f"fan-out: a state change until each of {args.clients} camonitor clients "
              "has it (both servers' changes alternate)")
        per = {side: [d for got, _ in v for d in got] for side, v in fan.items()}
        alls = {side: [last for _, last in v] for side, v in fan.items()}
        for side, label in (("lock", "lock IOC (caproto)"), ("softIoc", "C softIoc mbbo")):
            print(fmt(f"{label}, each client", per[side], width=28, unit="ms"))
            print(fmt(f"{label}, all clients", alls[side], width=28, unit="ms"))
        print(f"ratio lock/softIoc, each client: median "
              f"{statistics.median(per['lock']) / statistics.median(per['softIoc']):5.2f}"
              f"   p99 {pct(per['lock'], 99) / pct(per['softIoc'], 99):5.2f}"
              "   (target p99 <= 1.5, and < 100 ms)")
        print(f"ratio lock/softIoc, all clients: median "
              f"{statistics.median(alls['lock']) / statistics.median(alls['softIoc']):5.2f}"
              f"   p99 {pct(alls['lock'], 99) / pct(alls['softIoc'], 99):5.2f}")
    if args.profile is not None:
        print_profile(args.profile, 25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
