"""Real CA clients for the lock IOC's client-isolation tests and benchmark.

* :class:`Camonitor`: EPICS base ``camonitor`` writing to a file; ``freeze()`` stops the
  whole process with SIGSTOP, as a suspended laptop or a frozen GUI keeps its TCP
  connection open and stops reading.
* :func:`drive`: one pyepics process that runs acquire/release cycles (History changes,
  up to 16 kB per update) and refused puts, as fast as the IOC answers.
* :func:`first_value_delay`: seconds from a new subscription to its first value.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from epics_env import ME, TEST_CONFIG, CANetwork, tool

#: The PVs a busy display watches (issue 13's reproduction).
DISPLAY_PVS = ("History", "Message", "State", "Token", "Owner", "Session", "Note", "Expiry",
               "Remaining", "DisabledReason", "Gate:staff")

#: A note long enough that 100 History lines fill the 16 kB History PV.
NOTE = "aligning the second crystal of the DCM before the overnight queue " * 3


def busy_config(prefix: str, state: Path) -> str:
    """Test config with 100 History lines, this process's user in queue and operator."""
    return ("history: 100\n" + TEST_CONFIG.format(prefix=prefix, state=state)
            .replace("users: [bluesky]", f"users: [bluesky, {ME}]")
            .replace("users: [operator]", f"users: [operator, {ME}]"))


class Camonitor:
    """``camonitor [flags] PV...`` with its output in a file."""

    def __init__(self, net: CANetwork, pvs: list[str], out: Path, *flags: str):
        self.out = out
        with open(out, "wb") as f:
            self.proc = subprocess.Popen([tool("camonitor"), *flags, *pvs],
                                         env=net.client_env(), stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def lines(self, pv: str) -> list[str]:
        """Output lines of ``pv`` (camonitor prints the PV name first)."""
        text = self.out.read_text(errors="replace")
        return [ln for ln in text.splitlines() if ln.split(" ", 1)[0] == pv]

    def values(self, pv: str) -> list[str]:
        """Values of a scalar PV in order (``NAME DATE TIME VALUE [STAT SEVR]``)."""
        return [ln.split()[3] for ln in self.lines(pv) if len(ln.split()) >= 4]

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)  # also ends a stopped process
            self.proc.wait(10)


DRIVER = r"""
import json, sys
import epics
prefix, cycles, refusals, note = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
acquire, release = epics.PV(prefix + "Acquire"), epics.PV(prefix + "Release")
for pv in (acquire, release):
    assert pv.wait_for_connection(10), pv.pvname
for i in range(cycles):
    acquire.put(json.dumps({"session": "s%d" % i, "note": note}), wait=True, timeout=10)
    release.put("s%d" % i, wait=True, timeout=10)
for i in range(refusals):
    release.put("nobody", wait=True, timeout=10)
print("driven")
"""


def drive(net: CANetwork, prefix: str, *, cycles: int, refusals: int,
          note: str = NOTE) -> None:
    """Run the cycles and refused puts with pyepics (as this process's OS user)."""
    r = subprocess.run([sys.executable, "-c", DRIVER, prefix, str(cycles), str(refusals),
                        note], env=net.client_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "driven" in r.stdout, r.stdout + r.stderr


def drive_until(net: CANetwork, prefix: str, done, *, chunk: int = 50,
                most: int = 1000) -> int:
    """Acquire/release cycles in chunks until ``done()`` (or ``most`` cycles, 16 MB of
    History updates); the number of cycles run. The caller checks ``done()`` itself.

    How much a stopped reader's socket absorbs depends on the kernel's TCP buffer
    settings (about 4.3 MB with Linux defaults), so the tests drive until the IOC
    reports what they wait for instead of a fixed amount.
    """
    cycles = 0
    while cycles < most and not done():
        drive(net, prefix, cycles=chunk, refusals=0)
        cycles += chunk
    return cycles


FIRST_VALUE = r"""
import sys, threading, time
import epics
from epics import ca
chid = ca.create_channel(sys.argv[1], connect=False, auto_cb=False)
assert ca.connect_channel(chid, timeout=10), "no connection"
got = threading.Event()
def first(**kw):
    got.set()
t0 = time.monotonic()
sub = ca.create_subscription(chid, callback=first)
ca.flush_io()
print(time.monotonic() - t0 if got.wait(30) else "none")
"""


def first_value_delay(net: CANetwork, pv: str) -> float | None:
    """Seconds from subscribing (channel already connected) to the first value; None if
    none came within 30 s. Connecting is not counted: it is the client's search."""
    r = subprocess.run([sys.executable, "-c", FIRST_VALUE, pv], env=net.client_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip().splitlines()[-1]
    return None if out == "none" else float(out)
