"""Cost of the ophyd lock gate: a gated ``EpicsSignal.put`` versus an ungated one.

Both signals write the same record (an ``ao`` in EPICS base ``softIoc``); the gated one
goes through ``beamline_lock.ophyd_gate.gate`` while this process holds the lock, so
every put runs the full check (monitored state, heartbeat age, fencing token, lease
deadline) and then the same CA put. Puts are ``wait=False`` (ophyd's default): the
cheapest put, so the gate's share is largest. Samples alternate in blocks, so drift
hits both sides alike. Also timed: the check alone.

Target: the gate adds under 5% of a raw put's median.

Run: ``.venv/bin/python bench/bench_gated_put.py [--puts N]``. It starts its own lock
IOC and softIoc on free ports (temporary directory) and stops them.
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
from _stats import fmt  # noqa: E402
from epics_env import HOST, CANetwork, LockIOC, Server, tool  # noqa: E402

CONFIG = """\
prefix: "BENCH:GATE:"
lease: {{default: 60, max: 3600}}
state: {state}
groups:
  bench: {{users: [{user}]}}
"""
DB = 'record(ao, "BENCH:sig") {\n    field(PREC, "3")\n}\n'
BLOCK = 500


def measure(lock_prefix: str, puts: int) -> dict[str, list[float]]:
    from ophyd import EpicsSignal

    class _NoopSignal(EpicsSignal):
        """An EpicsSignal whose put does nothing (no PV is ever connected)."""

        def __init__(self, name: str):
            super().__init__("BENCH:never-connected", name=name, auto_monitor=False)

        def put(self, value, **kwargs):
            return None

    from beamline_lock.client import BeamlineLock
    from beamline_lock.ophyd_gate import gate

    lock = BeamlineLock(lock_prefix, session="bench", timeout=10)
    raw = EpicsSignal("BENCH:sig", name="raw")
    gated = gate(EpicsSignal("BENCH:sig", name="gated"), lock)
    raw.wait_for_connection(10)
    gated.wait_for_connection(10)
    lock.acquire(lease=3600)
    clock = time.perf_counter
    out: dict[str, list[float]] = {"raw": [], "gated": [], "check": [], "wrapper": [],
                                   "noop": []}
    try:
        for sig in (raw, gated):  # warm-up
            for i in range(BLOCK):
                sig.put(float(i))
        done, order = 0, (("raw", raw), ("gated", gated))
        while done < puts:
            order = order[::-1]  # ABBA: neither side always runs first
            for key, sig in order:
                samples = out[key]
                put = sig.put
                for i in range(BLOCK):
                    t0 = clock()
                    put(float(i))
                    samples.append(clock() - t0)
            done += BLOCK
        check = lock.check_write_allowed
        for _ in range(puts):
            t0 = clock()
            check("gated")
            out["check"].append(clock() - t0)
        # The whole gate (wrapper + check) around a put that does nothing: the work the
        # gate adds, without the CA put's noise.
        noop = gate(_NoopSignal(name="noop"), lock)
        for _ in range(puts):
            t0 = clock()
            noop.put(1.0)
            out["wrapper"].append(clock() - t0)
        plain = _NoopSignal(name="plain").put
        for _ in range(puts):
            t0 = clock()
            plain(1.0)
            out["noop"].append(clock() - t0)
        if gated.get(use_monitor=False) != float(BLOCK - 1):
            raise RuntimeError("the gated puts did not reach the IOC")
    finally:
        lock.release()
        lock.close()
        from epics import ca
        ca.finalize_libca()  # leave CA before the IOCs stop (no disconnect warnings)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--puts", type=int, default=20000, help="puts per side")
    args = parser.parse_args()
    net = CANetwork()
    with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp:
        work = Path(tmp)
        (work / "bench.db").write_text(DB)
        lock_ioc = LockIOC(net, work, prefix="BENCH:GATE:",
                           config_text=CONFIG.format(state=work / "lock.sqlite3",
                                                     user=getpass.getuser()))
        dev = Server(net, [tool("softIoc"), "-S", "-d", str(work / "bench.db")],
                     log=work / "softioc.log", ready_pv="BENCH:sig")
        try:
            lock_ioc.start()
            dev.start()
            os.environ.update(net.client_env())  # before libca starts in this process
            res = measure(lock_ioc.prefix, args.puts)
        finally:
            dev.stop()
            lock_ioc.stop()
    raw_med, gated_med = statistics.median(res["raw"]), statistics.median(res["gated"])
    check_med = statistics.median(res["check"])
    print(f"gated put benchmark on {HOST} ({os.cpu_count()} CPUs); ophyd EpicsSignal.put "
          f"(wait=False) to a softIoc ao record; client pyepics/libca")
    print(fmt("ungated put", res["raw"], width=28, unit="us"))
    print(fmt("gated put", res["gated"], width=28, unit="us"))
    print(fmt("gate check alone", res["check"], width=28, unit="us"))
    print(fmt("no-op put, ungated", res["noop"], width=28, unit="us"))
    print(fmt("no-op put, gated", res["wrapper"], width=28, unit="us"))
    added = statistics.median(res["wrapper"]) - statistics.median(res["noop"])
    diff = gated_med - raw_med
    print(f"gate's added work (no-op gated - ungated)  {added * 1e6:6.2f} us = "
          f"{added / raw_med * 100:4.1f}% of a raw put's median   (target < 5%)")
    print(f"end to end (median gated - ungated put)    {diff * 1e6:6.2f} us = "
          f"{diff / raw_med * 100:4.1f}%   (includes run-to-run noise of a few us)")
    print(f"check alone / raw put median               {check_med / raw_med * 100:4.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
