"""Stopping and making safe are never refused by the lock (issue 14, §1).

A motor of the simulated beamline (db/ on EPICS base softIoc, with the ACF generated from
the lock's config) is moving; the lock is held by someone else (alice, staff), or it is
and then the lock IOC is killed (kill -9: the lock state is unknown). Then the motor is
stopped by

(a) ``caput`` of STOP as a user of another group (the real OS user bluesky, queue),
(b) ophyd ``stop()`` of the gated device of the shared startup directory,
(c) bluesky's suspension path: a RunEngine with the lock guard whose plan moves the
    motor when the lock is lost; the suspension stops the motor,
(d) the Stop button of the PyDM device panel, driven headless through Qt,

and in each case the same user's move is still refused (by the device IOC's access
security and, for ophyd, by the gate). The shutter's Close is a safe action too.

The ophyd, RunEngine and PyDM clients run as this test's OS user (root in CI), whom the
``lock`` fixture's config puts in the queue and operator groups.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

from beamline_env import SoftIoc
from demo.processes import stop_group
from epics_env import REPO, wait_until
from screens_env import PyDMScreen

STARTUP = REPO / "clients" / "startup"
CONDITIONS = ("held", "down")        # held by someone else; held and the lock IOC killed
FAR = "100"                          # at VELO 0.5 units/s a move there takes 200 s


@pytest.fixture
def devices(net, lock, tmp_path):
    """The simulated beamline (prefix TST:) gated on the ``lock`` fixture's IOC."""
    ioc = SoftIoc(net, tmp_path, lock.config)
    ioc.start()
    yield ioc
    ioc.stop()


def access(net, devices, user: str | None, pv: str) -> str:
    out = net.run("cainfo", devices.pv(pv), user=user, check=True).stdout
    return [ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Access:" in ln][0]


def refused(net, devices, pv: str, value: str, user: str | None) -> bool:
    """A put by ``user`` (None: this test's user) is refused by access security."""
    r = net.caput(devices.pv(pv), value, user=user, text=False)
    return r.returncode != 0 and "Write access denied" in r.stderr


def alice_holds_and_moves(net, lock, devices) -> None:
    """alice (staff) takes the lock, opens the shutter and sends m1 far away, slowly."""
    wait_until(lambda: access(net, devices, "alice", "m1") == "read, write", 15,
               what="the device IOC's gates connected")
    body = '{"session": "align", "lease": 600, "note": "aligning"}'
    assert net.caput(lock.pv("Acquire"), body, user="alice").returncode == 0
    wait_until(lambda: access(net, devices, "bluesky", "m1") == "read, no write", 10, 0.1,
               what="the queue's gate closed")
    for pv, value in (("Shutter:Open", "1"), ("m1:VELO", "0.5"), ("m1", FAR)):
        r = net.caput(devices.pv(pv), value, user="alice", text=False)
        assert r.returncode == 0, r.stderr
    wait_until(lambda: net.caget(devices.pv("m1:MOVN")) == "1", 10, 0.1,
               what="m1 moving")
    wait_until(lambda: net.caget(devices.pv("Shutter:Status")) == "Open", 10, 0.1,
               what="the shutter open")


def kill_lock_ioc(net, lock, devices) -> None:
    """kill -9 of the lock IOC; wait until the device IOC fails safe (alice may not write)."""
    lock.kill9()
    wait_until(lambda: access(net, devices, "alice", "m1") == "read, no write", 30, 0.2,
               what="the device IOC to fail safe")


def lose_the_lock(net, lock, devices, condition: str) -> None:
    alice_holds_and_moves(net, lock, devices)
    if condition == "down":
        kill_lock_ioc(net, lock, devices)


def assert_stopped(net, devices) -> float:
    """m1 stopped short of its target: not moving, setpoint = readback, and it stays."""
    wait_until(lambda: net.caget(devices.pv("m1:MOVN")) == "0", 20, 0.1,
               what="m1 to stop (without a stop it moves for minutes)")
    where = float(net.caget(devices.pv("m1:RBV")))
    assert where < float(FAR) - 10, where
    assert abs(float(net.caget(devices.pv("m1"))) - where) < 0.001
    assert net.caget(devices.pv("m1:DMOV")) == "1"
    return where


# ---- (a) caput as a user of another group ------------------------------------------------
@pytest.mark.parametrize("condition", CONDITIONS)
def test_caput_stop_and_close_by_another_group(net, lock, devices, condition):
    lose_the_lock(net, lock, devices, condition)
    assert access(net, devices, "bluesky", "m1:STOP") == "read, write"
    r = net.caput(devices.pv("m1:STOP"), "1", user="bluesky", text=False)
    assert r.returncode == 0, r.stderr
    where = assert_stopped(net, devices)
    r = net.caput(devices.pv("Shutter:Close"), "1", user="bluesky", text=False)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: net.caget(devices.pv("Shutter:Status")) == "Closed", 10, 0.1,
               what="the shutter closed")
    # The same user may still not move anything.
    assert refused(net, devices, "m1", "3", "bluesky")
    assert refused(net, devices, "Shutter:Open", "1", "bluesky")
    assert refused(net, devices, "m1:VELO", "5", "bluesky")
    # The safe records take their value only (access security level 0): no rewiring.
    assert refused(net, devices, "m1:STOP.FLNK", "TST:m2", "bluesky")
    assert float(net.caget(devices.pv("m1"))) == pytest.approx(where, abs=0.001)


# ---- (b) ophyd stop() --------------------------------------------------------------------
OPHYD_CLIENT = """
import faulthandler, os, runpy, sys, time
faulthandler.dump_traceback_later(150, exit=True)   # never hang the test run
ns = {}
for name in ("00-lock.py", "10-devices.py"):
    ns.update(runpy.run_path(os.path.join(os.environ["STARTUP"], name), init_globals=ns))
from beamline_lock.client import LockError
m1, shutter, lock = ns["m1"], ns["shutter"], ns["beamline_lock"]
m1.wait_for_connection(timeout=30)
shutter.wait_for_connection(timeout=30)
print("ready", lock.connected, flush=True)
sys.stdin.readline()                        # the lock is someone else's, or unknown
deadline = time.monotonic() + 30
while os.environ["CONDITION"] == "down" and lock.connected and time.monotonic() < deadline:
    time.sleep(0.05)
print("lock", lock.status().state, flush=True)
m1.stop()
print("stop returned", flush=True)
shutter.set("Close").wait(10)
print("closed", shutter.status.get(), flush=True)
for name, write in [("set", lambda: m1.set(3.0)), ("open", lambda: shutter.set("Open")),
                    ("velocity", lambda: m1.velocity.put(5.0))]:
    try:
        write()
        print(name, "WENT THROUGH", flush=True)
    except LockError as exc:
        print(name, "refused", type(exc).__name__, exc, flush=True)
"""


@pytest.mark.parametrize("condition", CONDITIONS)
def test_ophyd_stop_and_close_pass_the_gate(net, lock, devices, condition):
    env = net.client_env()
    env.update(STARTUP=str(STARTUP), LOCK_PREFIX=lock.prefix, BEAMLINE_PREFIX=devices.prefix,
               LOCK_SESSION="scan", LOCK_CONNECT_TIMEOUT="10", CONDITION=condition)
    proc = subprocess.Popen([sys.executable, "-c", OPHYD_CLIENT], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(REPO))
    try:
        first = proc.stdout.readline()
        assert first.strip() == "ready True", first + proc.stderr.read()
        lose_the_lock(net, lock, devices, condition)
        out, err = proc.communicate("\n", timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, out + err
    assert "stop returned" in out and "closed 0" in out, out + err
    assert_stopped(net, devices)
    assert "WENT THROUGH" not in out, out
    why = {"held": "LockHeld m1: write refused: lock is held by alice@",
           "down": "LockUnavailable m1: write refused: the lock state is unknown"}[condition]
    assert f"set refused {why}" in out, out
    assert "open refused" in out and "velocity refused" in out, out
    assert refused(net, devices, "m1", "3", None)          # the IOC agrees
    assert net.caget(devices.pv("Shutter:Status")) == "Closed"


# ---- (c) bluesky's suspension path ------------------------------------------------------
GUARDED_RE = """
import faulthandler, os, runpy, sys, threading
faulthandler.dump_traceback_later(170, exit=True)   # never hang the test run
ns = {}
for name in ("00-lock.py", "10-devices.py"):
    ns.update(runpy.run_path(os.path.join(os.environ["STARTUP"], name), init_globals=ns))
from bluesky import RunEngine
from bluesky import plan_stubs as bps
from beamline_lock.client import LockError
from beamline_lock.re_guard import install_lock_guard
m1, lock = ns["m1"], ns["beamline_lock"]
m1.wait_for_connection(timeout=30)
RE = RunEngine({}, context_managers=[])     # run from a thread: no SIGINT handler
install_lock_guard(RE, lock, session="queue", linger=60, lease=60)

def far_away():
    yield from bps.checkpoint()
    yield from bps.mv(m1, float(os.environ["FAR"]))

threading.Thread(target=RE, args=(far_away(),), daemon=True).start()
sys.stdin.readline()                        # the plan was suspended and m1 stopped
try:
    m1.set(3.0)
    print("set WENT THROUGH", flush=True)
except LockError as exc:
    print("set refused", type(exc).__name__, exc, flush=True)
"""


@pytest.mark.parametrize("condition", CONDITIONS)
def test_suspension_stops_the_motor_the_plan_was_moving(net, lock, devices, condition):
    wait_until(lambda: access(net, devices, None, "m1") == "read, write", 15,
               what="the device IOC's gates connected")
    assert net.caput(devices.pv("m1:VELO"), "0.5", text=False).returncode == 0
    env = net.client_env()
    env.update(STARTUP=str(STARTUP), LOCK_PREFIX=lock.prefix, BEAMLINE_PREFIX=devices.prefix,
               LOCK_SESSION="queue", LOCK_CONNECT_TIMEOUT="10", FAR=FAR,
               PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", GUARDED_RE], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=str(REPO),
                            start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                     daemon=True).start()

    def printed(needle: str) -> bool:
        if proc.poll() is not None and not any(needle in ln for ln in lines):
            raise AssertionError("the RunEngine process exited:\n" + "".join(lines))
        return any(needle in ln for ln in lines)
    try:
        wait_until(lambda: net.caget(devices.pv("m1:MOVN")) == "1", 60, 0.1,
                   what="the plan to move m1")
        assert net.caget(lock.pv("Session")) == "queue"
        if condition == "held":          # an operator takes the lock away, alice takes it
            r = net.caput(lock.pv("ForceRelease"), "beam dump drill", user="operator")
            assert r.returncode == 0, r.stderr
            assert net.caput(lock.pv("Acquire"), "align", user="alice").returncode == 0
        else:
            kill_lock_ioc(net, lock, devices)
        wait_until(lambda: printed("SUSPENDING"), 30, 0.1, what="the guard to suspend")
        assert_stopped(net, devices)
        proc.stdin.write("\n")
        proc.stdin.flush()
        wait_until(lambda: printed("set "), 30, 0.1, what="the move attempt")
    finally:
        stop_group(proc)
    out = "".join(lines)
    assert "Failed to stop" not in out, out
    assert "set WENT THROUGH" not in out and "set refused Lock" in out, out
    assert refused(net, devices, "m1", "3", None)          # the IOC agrees


# ---- (d) the PyDM Stop button ---------------------------------------------------------------
@pytest.mark.parametrize("condition", CONDITIONS)
def test_pydm_stop_and_close_buttons_stay_enabled(net, lock, devices, condition, tmp_path):
    panel = PyDMScreen(net, "devices", {"P": lock.prefix, "DEV": devices.prefix,
                                        "GROUP": "queue"}, tmp_path / "pydm-devices.log")
    try:
        wait_until(lambda: panel.enabled("m1_setpoint"), 20, 0.1,
                   what="the panel's controls enabled while the lock is Free")
        lose_the_lock(net, lock, devices, condition)
        wait_until(lambda: not panel.enabled("m1_setpoint"), 20, 0.1,
                   what="the gated controls disabled")
        assert not panel.enabled("shutter_open")
        for button in ("m1_stop", "m2_stop", "shutter_close"):
            assert panel.enabled(button), button
        panel.click("m1_stop")
        assert_stopped(net, devices)
        panel.click("shutter_close")
        wait_until(lambda: net.caget(devices.pv("Shutter:Status")) == "Closed", 10, 0.1,
                   what="the shutter closed")
        assert not panel.enabled("m1_setpoint")
        assert refused(net, devices, "m1", "3", None)      # the panel's user may not move
    finally:
        panel.close()


# ---- the guard's fence and the gate's safe writes, with the lock state unknown ------------
FENCE = """
import os, runpy, sys
ns = {}
for name in ("00-lock.py", "10-devices.py"):
    ns.update(runpy.run_path(os.path.join(os.environ["STARTUP"], name), init_globals=ns))
from bluesky import RunEngine
from bluesky.utils import Msg
from beamline_lock.ophyd_gate import gate, is_safe_write
from beamline_lock.re_guard import install_lock_guard
m1, shutter, lock = ns["m1"], ns["shutter"], ns["beamline_lock"]
guard = install_lock_guard(RunEngine({}), lock, session="queue")
guard._re_running = lambda: True   # the fence holds writes back only while a plan runs
print("connected", lock.connected)
for msg in (Msg("stop", m1), Msg("set", shutter, "Close"), Msg("set", shutter, 0),
            Msg("set", shutter, "Open"), Msg("set", m1, 1.0), Msg("trigger", ns["det"]),
            Msg("read", m1)):
    passes = guard._fence(msg) == (None, None)
    print("fence", msg.command, msg.args, "passes" if passes else "held back")
print("safe", is_safe_write(shutter, "close"), is_safe_write(shutter.close_command, 1, "put"),
      is_safe_write(m1.stop_signal, 1, "put"), is_safe_write(m1, 1.0),
      is_safe_write(m1.stop_signal, 0, "put"))
try:
    gate(shutter, safe={"clse": (1,)})
except ValueError as exc:
    print("bad safe:", exc)
"""


def test_guard_fence_passes_stops_and_safe_writes_only(net):
    """The guard holds back a plan's device writes while the lock is not the queue's
    (here: no lock IOC at all), but never a stop or a safe write such as closing the
    shutter. No IOC is needed: the fence decides before anything reaches CA."""
    env = net.client_env()
    env.update(STARTUP=str(STARTUP), LOCK_PREFIX="NOWHERE:LOCK:", BEAMLINE_PREFIX="NOWHERE:",
               LOCK_CONNECT_TIMEOUT="0.5")
    r = subprocess.run([sys.executable, "-c", FENCE], env=env, capture_output=True,
                       text=True, timeout=120, cwd=str(REPO))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "connected False" in out
    for line in ("fence stop () passes", "fence set ('Close',) passes",
                 "fence set (0,) passes", "fence set ('Open',) held back",
                 "fence set (1.0,) held back", "fence trigger () held back",
                 "fence read () passes", "safe True True True False False"):
        assert line in out, out
    assert "bad safe: gate(safe=...): Shutter has no component 'clse'" in out, out
