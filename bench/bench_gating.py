"""Time from a granted Acquire to the device IOC refusing a non-holder's put.

One run on this machine: a real lock IOC and the simulated beamline on EPICS base softIoc
with the generated ACF. Per cycle: alice acquires (put with callback, completed = durable
grant); we time until the softIoc has revoked write access of a queue-group client
(bluesky) on $(P)Shutter:Open, i.e. until a put from it would be refused ("Write access
denied"). The softIoc reports access-rights changes to the client, so the moment is
observed as the access-rights event, without polling; the release direction is timed too.
Prints median and p99 over the cycles (default 100).

Run: .venv/bin/python bench/bench_gating.py [--cycles N]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import fmt  # noqa: E402
# epics_env first: it puts the checkout (demo/, which beamline_env imports) on the path.
from epics_env import HOST, CANetwork, LockIOC, wait_until  # noqa: E402
from beamline_env import SoftIoc  # noqa: E402


def run(lock: LockIOC, beamline: SoftIoc, cycles: int) -> tuple[list[float], list[float]]:
    from caproto import AccessRights
    from caproto.threading.client import Context
    alice = Context(client_name="alice", host_name=HOST)
    queue = Context(client_name="bluesky", host_name=HOST)
    acquire, release = alice.get_pvs(lock.pv("Acquire"), lock.pv("Release"), timeout=10)
    shutter, = queue.get_pvs(beamline.pv("Shutter:Open"), timeout=10)
    for pv in (acquire, release, shutter):
        pv.wait_for_connection(timeout=10)
    cond = threading.Condition()
    seen: dict[str, object] = {"rights": None, "t": 0.0}

    def on_rights(pv, rights):
        with cond:
            seen["rights"], seen["t"] = rights, time.perf_counter()
            cond.notify_all()

    shutter.access_rights_callback.add_callback(on_rights, run=True)

    def wait_rights(writable: bool) -> float:
        with cond:
            ok = cond.wait_for(lambda: seen["rights"] is not None and
                               (AccessRights.WRITE in seen["rights"]) == writable, 10)
        if not ok:
            raise RuntimeError(f"write access never became {writable}")
        return seen["t"]

    wait_rights(True)
    refuse, restore = [], []
    for i in range(cycles + 5):
        t0 = time.perf_counter()
        acquire.write(b"bench", wait=True, timeout=10)
        t1 = wait_rights(False)
        t2 = time.perf_counter()
        release.write(b"bench", wait=True, timeout=10)
        t3 = wait_rights(True)
        if i >= 5:
            refuse.append(t1 - t0)
            restore.append(t3 - t2)
    alice.disconnect()
    queue.disconnect()
    return refuse, restore


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    args = parser.parse_args()
    net = CANetwork()
    with tempfile.TemporaryDirectory(prefix="bench-gating-") as tmp:
        lock = LockIOC(net, Path(tmp)).start()
        beamline = SoftIoc(net, Path(tmp), lock.config)
        try:
            beamline.start()
            os.environ.update(net.client_env())
            wait_until(lambda: net.caput(beamline.pv("Shutter:Open"), "0", user="bluesky",
                                         text=False).returncode == 0, 20,
                       what="gates connected")
            refuse, restore = run(lock, beamline, args.cycles)
        finally:
            beamline.stop()
            lock.stop()
    print(f"device gating benchmark on {HOST} ({os.cpu_count()} CPUs), softIoc + ACF")
    print(fmt("Acquire -> device IOC refuses non-holder", refuse, width=44, unit="ms"))
    print(fmt("Release -> device IOC allows again", restore, width=44, unit="ms"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
