"""Hand-over and request latency on this machine, in one run, as ratios to a plain CA put.

A real lock IOC and the simulated beamline on EPICS base softIoc with the generated ACF
(exclusive to the holder). alice and bob take turns: per cycle the one not holding
Requests the lock and the holder Hands it over. Timed, per cycle:

* request -> holder notified: from the start of the Request put until the holder's
  monitor on $(P)WaiterCount shows it (the request is durable on disk before the IOC
  sends it);
* hand-over -> gate at the device IOC: from the start of the Handover put until the
  softIoc has given the new holder write access to $(P)Shutter:Open (its access-rights
  event at the new holder's client: HolderIndex reached the ACF and was applied);
* reference: a plain CA put with callback to $(P)Ping (a trivial PV of the same IOC),
  from the same client, interleaved with the above.

The clients are caproto's threading client, one context per identity (CA identity is
what the client asserts). Prints median and p99 of each and the ratios of the medians
and p99s to the reference.

Run: .venv/bin/python bench/bench_handover.py [--cycles N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import fmt, pct  # noqa: E402
from beamline_env import SoftIoc  # noqa: E402
from epics_env import HOST, CANetwork, LockIOC, wait_until  # noqa: E402


class Party:
    """One identity: its command PVs at the lock, its view of its own device write access,
    and a monitor of $(P)WaiterCount."""

    def __init__(self, user: str, lock: LockIOC, beamline: SoftIoc):
        from caproto.threading.client import Context
        self.user = user
        self.ctx = Context(client_name=user, host_name=HOST)
        names = ("Request", "Handover", "Acquire", "Ping", "WaiterCount")
        pvs = self.ctx.get_pvs(*[lock.pv(n) for n in names], beamline.pv("Shutter:Open"),
                               timeout=10)
        for pv in pvs:
            pv.wait_for_connection(timeout=10)
        self.pv = dict(zip(names + ("shutter",), pvs))
        self.cond = threading.Condition()
        self.rights, self.rights_t = None, 0.0
        self.waiters, self.waiters_t = None, 0.0
        self.pv["shutter"].access_rights_callback.add_callback(self._on_rights, run=True)
        self.sub = self.pv["WaiterCount"].subscribe(data_type="native")
        self.sub.add_callback(self._on_waiters)

    def _on_rights(self, pv, rights):
        with self.cond:
            self.rights, self.rights_t = rights, time.perf_counter()
            self.cond.notify_all()

    def _on_waiters(self, sub, response):
        with self.cond:
            self.waiters, self.waiters_t = int(response.data[0]), time.perf_counter()
            self.cond.notify_all()

    def until(self, predicate, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, 10):
                raise RuntimeError(f"{self.user}: {what} never happened")

    def writable(self) -> bool:
        from caproto import AccessRights
        return self.rights is not None and AccessRights.WRITE in self.rights

    def put(self, name: str, text: str, wait: bool = True):
        return self.pv[name].write(text.encode(), wait=wait, timeout=10)


def run(lock: LockIOC, beamline: SoftIoc, cycles: int) -> dict[str, list[float]]:
    alice, bob = Party("alice", lock, beamline), Party("bob", lock, beamline)
    out: dict[str, list[float]] = {"ping": [], "notify": [], "gate": []}
    holder, other = alice, bob
    holder.put("Acquire", '{"session": "bench", "lease": 3600}')
    holder.until(lambda: holder.writable() and holder.waiters == 0, "holding")
    for i in range(cycles + 5):          # the first 5 are warm-up
        t0 = time.perf_counter()
        holder.pv["Ping"].write([i], wait=True, timeout=10)
        ping = time.perf_counter() - t0

        t0 = time.perf_counter()
        other.put("Request", '{"session": "bench", "lease": 3600}', wait=False)
        holder.until(lambda: holder.waiters == 1, "the request shown")
        notify = holder.waiters_t - t0
        other.until(lambda: other.waiters == 1, "its own request shown")

        t0 = time.perf_counter()
        holder.put("Handover", "bench")
        other.until(other.writable, "write access at the device IOC")
        gate = other.rights_t - t0
        holder.until(lambda: not holder.writable() and holder.waiters == 0,
                     "the old holder refused")
        if i >= 5:
            out["ping"].append(ping)
            out["notify"].append(notify)
            out["gate"].append(gate)
        holder, other = other, holder
    for party in (alice, bob):
        party.ctx.disconnect()
    return out


CONFIG = """\
prefix: "BENCH:LOCK:"
lease: {{default: 60, max: 3600}}
state: {state}
groups:
  staff: {{users: [alice, bob], authority: 20}}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200)
    args = parser.parse_args()
    net = CANetwork()
    with tempfile.TemporaryDirectory(prefix="bench-handover-") as tmp:
        work = Path(tmp)
        lock = LockIOC(net, work, prefix="BENCH:LOCK:",
                       config_text=CONFIG.format(state=work / "lock-state.sqlite3")).start()
        beamline = SoftIoc(net, work, lock.config)
        try:
            beamline.start()
            os.environ.update(net.client_env())
            wait_until(lambda: net.caput(beamline.pv("Shutter:Open"), "0", user="alice",
                                         text=False).returncode == 0, 20,
                       what="gates connected")
            times = run(lock, beamline, args.cycles)
        finally:
            beamline.stop()
            lock.stop()
    ping, notify, gate = times["ping"], times["notify"], times["gate"]
    print(f"hand-over benchmark on {HOST} ({os.cpu_count()} CPUs), lock IOC + softIoc + ACF")
    print(fmt("plain CA put (Ping), reference", ping, width=46))
    print(fmt("request -> holder notified", notify, width=46))
    print(fmt("hand-over -> new holder's gate at device IOC", gate, width=46))
    for name, values in (("request -> notified", notify), ("hand-over -> gate", gate)):
        median = statistics.median(values) / statistics.median(ping)
        p99 = pct(values, 99) / pct(ping, 99)
        print(f"{name + ' / CA put':<46} median {median:6.2f}x     p99 {p99:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
