"""Time for the lock IOC under procServ to serve again after ``kill -9``, in one run.

The lock IOC runs as a site runs it (``iocBoot/iocLock/procServ.sh``, as the account
``lockioc``, holdoff 1 s), held by alice. Each cycle kills the IOC process with SIGKILL
and measures until a new CA client (EPICS base ``caget``, polled every ~0.1 s) reads
``$(P)Heartbeat`` again; the lock must come back with the same owner and token. The
reference, measured the same way in the same run: EPICS base's C ``softIoc`` under the
same procServ settings.

    .venv/bin/python bench/bench_procserv.py [--cycles N]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stats import fmt  # noqa: E402
from epics_env import HOST, TEST_CONFIG, CANetwork, identity, tool, user_dir  # noqa: E402

from demo import services  # noqa: E402  (importable once epics_env put the checkout on the path)

PREFIX = "BENCH:PS:"


def serving(net: CANetwork, pv: str) -> bool:
    return net.run("caget", "-w", "0.1", pv).returncode == 0


def restarts(launched: services.Launched, net: CANetwork, pv: str, cycles: int,
             check=lambda: None) -> list[float]:
    """Seconds from SIGKILL of procServ's child until ``pv`` answers a new client."""
    out = []
    for _ in range(cycles):
        child = services.procserv_child(launched)
        os.kill(child, signal.SIGKILL)
        killed = time.monotonic()
        while not serving(net, pv) or services.procserv_child(launched) in (None, child):
            if time.monotonic() - killed > 60:
                raise RuntimeError(f"{launched.name} did not serve again within 60 s:\n"
                                   f"{launched.tail()}")
        out.append(time.monotonic() - killed)
        check()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10)
    args = parser.parse_args()
    work = user_dir("lockioc", "bench-procserv")
    net = CANetwork()
    lock_port, soft_port = services.free_port(), services.free_port()
    net.add(lock_port)
    net.add(soft_port)
    config = work / "lock.yaml"
    config.write_text(TEST_CONFIG.format(prefix=PREFIX, state=work / "state.sqlite3"))
    config.chmod(0o644)
    db = work / "ref.db"
    db.write_text(f'record(ao, "{PREFIX}ref") {{}}\n')
    db.chmod(0o644)
    stack = services.Stack(work)
    try:
        lock = stack.start(services.lock_ioc_procserv(
            config, lock_port, PREFIX + "Heartbeat", net.client_env, f"unix:{work}/lock.ctl"))
        soft = stack.start(services.Service(
            "softIoc (procServ)",
            ["procServ", "--foreground", "--quiet", "--holdoff", "1", "--logfile", "-",
             f"unix:{work}/soft.ctl", tool("softIoc"), "-d", str(db)],
            env=net.server_env(soft_port), user="lockioc", cwd=work,
            ready=services.ca_ready(PREFIX + "ref", net.client_env)))
        net.caput(PREFIX + "Acquire", '{"session": "bench", "lease": 3600}',
                  user="alice").check_returncode()
        token = net.caget(PREFIX + "Token")

        def same_lock() -> None:
            got = (net.caget(PREFIX + "Owner"), net.caget(PREFIX + "Token"))
            if got != (identity("alice"), token):
                raise RuntimeError(f"the lock came back as {got}, not alice's token {token}")

        lock_times = restarts(lock, net, PREFIX + "Heartbeat", args.cycles, same_lock)
        soft_times = restarts(soft, net, PREFIX + "ref", args.cycles)
    finally:
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"procServ restart benchmark on {HOST} ({os.cpu_count()} CPUs); procServ "
          f"--holdoff 1; kill -9 of the child until a new caget answers (~0.1 s polling)")
    print(fmt("lock IOC (held, same token)", lock_times, width=30, unit="ms"))
    print(fmt("softIoc (reference)", soft_times, width=30, unit="ms"))
    print(f"ratio lock IOC / softIoc (median)   "
          f"{statistics.median(lock_times) / statistics.median(soft_times):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
