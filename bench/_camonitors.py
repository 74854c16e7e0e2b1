"""Many EPICS base ``camonitor`` processes as the clients of a fan-out benchmark.

Each process is one CA client (its own circuit to each server) monitoring the given PVs
and stamping each update with its own receive time (``-t c``); a reader thread per
process keeps its lines. :meth:`Camonitors.delays` turns them into the time from each
change (its PV, the value it sets, when it started) to each client that saw it.
"""
from __future__ import annotations

import datetime as dt
import subprocess
import threading
from collections.abc import Mapping, Sequence

from epics_env import tool, wait_until


class Camonitors:
    def __init__(self, count: int, pvs: Sequence[str], env: Mapping[str, str]):
        self.pvs = list(pvs)
        self.procs = [subprocess.Popen([tool("camonitor"), "-t", "c", "-n", *self.pvs],
                                       env=dict(env), stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, text=True)
                      for _ in range(count)]
        self.lines: list[list[str]] = [[] for _ in self.procs]
        self.readers = [threading.Thread(target=self._read, args=(i,), daemon=True)
                        for i in range(count)]
        for reader in self.readers:
            reader.start()

    def _read(self, i: int) -> None:
        self.lines[i].extend(self.procs[i].stdout)

    def wait_connected(self, timeout: float = 180) -> None:
        """Until every process printed a first value of every PV."""
        def connected() -> bool:
            return all(len({line.split(" ", 1)[0] for line in out}) >= len(self.pvs)
                       for out in list(self.lines))
        wait_until(connected, timeout, 0.2, what=f"{len(self.procs)} camonitors connected")

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for r in self.readers:
            r.join(10)

    def delays(self, changes: Sequence[tuple[str, str, float]]
               ) -> list[tuple[list[float], float]]:
        """For each change ``(pv, value, t0)`` (t0 from ``time.time()``): the delay to
        each client (the first update of ``pv`` with ``value`` it stamped at or after
        t0 and before the next change of the same PV), and the delay to the last one.
        A client that missed a change is an error."""
        out = []
        for k, (pv, value, t0) in enumerate(changes):
            t_end = next((t for p, _, t in changes[k + 1:] if p == pv), float("inf"))
            got = []
            for lines in self.lines:
                first = None
                for line in lines:
                    parts = line.split()
                    if len(parts) < 4 or parts[0] != pv or parts[3] != value:
                        continue
                    stamp = f"{parts[1]} {parts[2]}".strip("()")  # "(date time)"
                    ts = dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()
                    if t0 <= ts < t_end:
                        first = ts
                        break
                if first is not None:
                    got.append(first - t0)
            if len(got) != len(self.lines):
                raise RuntimeError(f"change {k} of {pv} to {value}: {len(got)} of "
                                   f"{len(self.lines)} clients saw it")
            out.append((got, max(got)))
        return out
