"""The RunEngine lock guard on this machine, in one run.

* plan start: ``RE(plan)`` of an empty plan with the guard installed (the preprocessor
  acquires, or re-acquires under the queue's session, confirmed through the monitors)
  against the same without the guard, and a plain CA put with callback to ``$(P)Ping``
  (pyepics) as the baseline: the guard's cost per plan, as a ratio to a raw CA put;
* revocation: an operator's ``ForceRelease`` (put with callback, completed = durable)
  until the guard's suspender signal is high, i.e. until bluesky is asked to suspend
  the running plan (the issue's bound: 1 s). Each cycle the guard re-acquires and the
  plan resumes.

Real parts: a lock IOC and the simulated beamline softIoc with the generated ACF (the
startup directory's gated devices connect to it); the RunEngine runs in this process
with the shared startup directory's lock client. Run:
    .venv/bin/python bench/bench_guard.py [--cycles N]
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import fmt  # noqa: E402
from beamline_env import SoftIoc  # noqa: E402
from epics_env import HOST, CANetwork, LockIOC, admitting_me, wait_until  # noqa: E402


def load_startup(lock: LockIOC, beamline: SoftIoc) -> dict:
    """The lock client and gated devices of clients/startup, as the RE worker loads them."""
    os.environ.update(LOCK_PREFIX=lock.prefix, BEAMLINE_PREFIX=beamline.prefix,
                      LOCK_SESSION="queue", LOCK_CONNECT_TIMEOUT="10")
    ns: dict = {}
    for name in ("00-lock.py", "10-devices.py"):
        ns.update(runpy.run_path(str(REPO / "clients" / "startup" / name), init_globals=ns))
    return ns


def empty_plan():
    yield from ()


def time_plans(RE, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        RE(empty_plan())
        out.append(time.perf_counter() - t0)
    return out


def time_pings(ping, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        ping.put(i % 2, wait=True, timeout=10)
        out.append(time.perf_counter() - t0)
    return out


def revocations(RE, guard, lock: LockIOC, cycles: int) -> list[float]:
    """Run one long plan; another thread revokes and re-acquires ``cycles`` times."""
    from bluesky import plan_stubs as bps
    from caproto.threading.client import Context
    operator = Context(client_name="operator", host_name=HOST)
    force, = operator.get_pvs(lock.pv("ForceRelease"), timeout=10)
    force.wait_for_connection(timeout=10)
    cond = threading.Condition()
    high: dict[str, float | None] = {"t": None}

    def on_signal(value, **_):
        with cond:
            high["t"] = time.perf_counter() if value else None
            cond.notify_all()
    guard.signal.subscribe(on_signal, run=False)
    done = threading.Event()
    delays: list[float] = []
    errors: list[BaseException] = []

    def revoker() -> None:
        try:
            wait_until(lambda: guard.status()["plan_running"], 20, what="the plan to run")
            for i in range(cycles + 3):
                t0 = time.perf_counter()
                force.write(b"bench drill", wait=True, timeout=10)
                with cond:
                    if not cond.wait_for(lambda: high["t"] is not None, 10):
                        raise RuntimeError("the guard never tripped")
                    if i >= 3:
                        delays.append(high["t"] - t0)
                guard.reacquire()
                with cond:
                    if not cond.wait_for(lambda: high["t"] is None, 10):
                        raise RuntimeError("the guard never reset")
                time.sleep(0.05)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            done.set()

    def long_plan():
        while not done.is_set():
            yield from bps.checkpoint()
            yield from bps.sleep(0.02)

    thread = threading.Thread(target=revoker, daemon=True)
    thread.start()
    RE(long_plan())
    thread.join(10)
    operator.disconnect()
    if errors:
        raise errors[0]
    return delays


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=50)
    args = parser.parse_args()
    if args.cycles < 1:
        parser.error("--cycles must be at least 1")
    net = CANetwork()
    with tempfile.TemporaryDirectory(prefix="bench-guard-") as tmp:
        work = Path(tmp)
        lock = LockIOC(net, work, config_text=admitting_me("TST:LOCK:",
                                                           work / "lock-state.sqlite3"))
        lock.start()
        beamline = SoftIoc(net, work, lock.config, prefix="TST:")
        try:
            beamline.start()
            os.environ.update(net.client_env())
            import epics
            from bluesky import RunEngine
            from beamline_lock.re_guard import install_lock_guard
            ns = load_startup(lock, beamline)
            ping = epics.PV(lock.pv("Ping"))
            ping.wait_for_connection(10)
            plain_re = RunEngine({})
            guarded_re = RunEngine({})
            guard = install_lock_guard(guarded_re, ns["beamline_lock"], session="queue",
                                       linger=60, lease=30, resume_delay=0.1)
            n = args.cycles
            time_pings(ping, 10), time_plans(plain_re, 5), time_plans(guarded_re, 5)
            pings = time_pings(ping, n)
            plain = time_plans(plain_re, n)
            guarded = time_plans(guarded_re, n)
            revoke = revocations(guarded_re, guard, lock, n)
            guard.uninstall()
            ns["beamline_lock"].close()
        finally:
            beamline.stop()
            lock.stop()
    import statistics
    cost = [g - statistics.median(plain) for g in guarded]
    print(f"RunEngine lock guard benchmark on {HOST} ({os.cpu_count()} CPUs)")
    print(fmt("plain CA put with callback (Ping)", pings, width=44))
    print(fmt("RE(empty plan), no guard", plain, width=44))
    print(fmt("RE(empty plan), guard (acquire per plan)", guarded, width=44))
    print(f"{'guard cost per plan / raw CA put (medians)':<44} "
          f"{statistics.median(cost) / statistics.median(pings):8.2f}")
    print(fmt("ForceRelease -> guard suspends the plan", revoke, width=44))
    return 0


if __name__ == "__main__":
    sys.exit(main())
