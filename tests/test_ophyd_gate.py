"""ophyd devices gated on the lock: real lock IOC, real device IOCs, real ophyd.

Device IOCs: caproto's motor-record example (an EpicsMotor needs a motor record) and the
simulated beamline of db/ on EPICS base softIoc (for the shared startup directory). The
ophyd client runs in its own process (libca reads the CA environment once per process)
as this OS user; other lock holders act through ``caput`` as real OS users.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from epics_env import REPO, Server, identity, tool, wait_until

ALICE = identity("alice")
MOTOR = "GT:mtr1"
STARTUP = REPO / "clients" / "startup"


@pytest.fixture
def motor_ioc(net, tmp_path):
    """caproto's fake motor record IOC: GT:mtr1, GT:mtr2, GT:mtr3 with all motor fields."""
    ioc = Server(net, [sys.executable, "-m", "caproto.ioc_examples.fake_motor_record",
                       "--prefix", "GT:"], log=tmp_path / "motor-ioc.log", ready_pv=MOTOR)
    ioc.start()
    yield ioc
    ioc.stop()


def env_for(net, lock_ioc, **extra) -> dict:
    env = net.client_env()
    env.update(LOCK_PREFIX=lock_ioc.prefix, MOTOR=MOTOR, **extra)
    return env


PRE = """
import os, sys, threading, time
from ophyd import EpicsMotor, EpicsSignal, Device, Component as Cpt
from beamline_lock.client import *
from beamline_lock.ophyd_gate import gate, is_gated, GatedMixin, set_default_lock
lock = BeamlineLock(os.environ["LOCK_PREFIX"], session=os.environ.get("LOCK_SESSION"),
                    timeout=10, allow_free_writes=os.environ.get("FREE") == "1")
assert lock.connected, "lock client did not connect"
motor = EpicsMotor(os.environ["MOTOR"], name="m1")
motor.wait_for_connection(timeout=30)
gate(motor, lock)
"""


def run_client(env: dict, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(PRE + code)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"client failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


def start_client(env: dict, code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(PRE + code)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def motor_record(net) -> dict[str, str]:
    return {f: net.caget(f"{MOTOR}.{f}") for f in ("VAL", "RBV", "DMOV")}


def test_gated_motor_set_by_non_holder_raises_lock_held_and_writes_nothing(
        net, lock, motor_ioc):
    body = '{"session": "align", "lease": 600, "note": "beam alignment"}'
    assert net.caput(lock.pv("Acquire"), body, user="alice").returncode == 0
    before = motor_record(net)
    r = run_client(env_for(net, lock), """
print("gated", is_gated(motor), is_gated(motor.user_setpoint), is_gated(motor.motor_stop))
for name, write in [("set", lambda: motor.set(3.0)), ("move", lambda: motor.move(3.0)),
                    ("put", lambda: motor.user_setpoint.put(3.0)),
                    ("signal set", lambda: motor.velocity.set(9.0))]:
    try:
        write()
        print(name, "WENT THROUGH")
    except LockHeld as exc:
        print(name, "LockHeld", exc.owner, exc.session, exc.note, exc.expiry > 0)
        print("message", exc)
""")
    assert "gated True True True" in r.stdout
    for name in ("set", "move", "put", "signal set"):
        assert f"{name} LockHeld {ALICE} align beam alignment True" in r.stdout, r.stdout
    assert "WENT THROUGH" not in r.stdout
    assert f"m1: write refused: lock is held by {ALICE} (session align, note " \
           "'beam alignment')" in r.stdout
    assert "until" in r.stdout
    assert motor_record(net) == before
    assert net.caget(f"{MOTOR}.VELO") != "9"


def test_holder_moves_the_motor(net, lock, motor_ioc):
    r = run_client(env_for(net, lock), """
with lock.hold("scan", lease=10):
    motor.set(2.5).wait(30)
    print("moved", motor.position)
try:
    motor.set(1.0)
except LockNotHeld as exc:
    print("after release", exc)
""")
    assert "moved 2.5" in r.stdout
    assert "after release m1: write refused: the lock is Free" in r.stdout
    assert float(net.caget(f"{MOTOR}.RBV")) == 2.5


def test_frozen_holder_is_fenced_by_the_token_and_reports_lock_lost(net, lock, motor_ioc):
    proc = start_client(env_for(net, lock), """
lost = threading.Event()
lock.add_callback(lambda st: lost.set() if st.event == "lost" else None)
try:
    with lock.hold("frozen", lease=2):
        mine = lock.token
        print("held", mine, flush=True)
        sys.stdin.readline()     # SIGSTOPped here past the lease; alice takes the lock
        try:
            motor.user_setpoint.put(4.0)
            print("put WENT THROUGH")
        except LockLost as exc:
            print("put LockLost", exc)
        try:
            motor.set(4.0)
            print("set WENT THROUGH")
        except LockLost as exc:
            print("set LockLost")
        print("callback", lost.wait(10), "lost:", lock.lost)
        deadline = time.monotonic() + 10   # the monitors catch up after SIGCONT
        while lock.status().token == mine and time.monotonic() < deadline:
            time.sleep(0.05)
        print("now", lock.status().owner, lock.status().token)
except LockLost as exc:
    print("exit LockLost", exc)
""")
    try:
        first = proc.stdout.readline().split()
        assert first[:1] == ["held"], first + [proc.stderr.read()]
        token = int(first[1])
        before = motor_record(net)
        os.kill(proc.pid, signal.SIGSTOP)
        wait_until(lambda: net.caget(lock.pv("State")) == "Free", 20,
                   what="the frozen holder's lease to run out")
        assert net.caput(lock.pv("Acquire"), "takeover", user="alice").returncode == 0
        assert net.caget(lock.pv("Token")) == str(token + 1)
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate("\n", timeout=60)
    finally:
        os.kill(proc.pid, signal.SIGCONT) if proc.poll() is None else None
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, out + err
    assert "put LockLost m1_user_setpoint: write refused: this process lost the lock" in out
    assert "set LockLost" in out and "WENT THROUGH" not in out
    assert f"token {token}" in out
    assert "callback True lost:" in out
    assert f"now {ALICE} {token + 1}" in out
    assert "exit LockLost" in out
    assert motor_record(net) == before
    assert net.caget(lock.pv("Owner")) == ALICE


def test_lock_ioc_stopped_gated_puts_fail_closed(net, lock, motor_ioc):
    proc = start_client(env_for(net, lock), """
lock.acquire("down", lease=600)
print("held", flush=True)
sys.stdin.readline()             # the lock IOC is stopped meanwhile
deadline = time.monotonic() + 30
while lock.connected and time.monotonic() < deadline:
    time.sleep(0.05)
for name, write in [("set", lambda: motor.set(5.0)),
                    ("put", lambda: motor.user_setpoint.put(5.0))]:
    try:
        write()
        print(name, "WENT THROUGH")
    except LockUnavailable as exc:
        print(name, "LockUnavailable", exc)
""")
    try:
        assert proc.stdout.readline().strip() == "held"
        before = motor_record(net)
        lock.stop()
        out, err = proc.communicate("\n", timeout=90)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, out + err
    assert "set LockUnavailable m1: write refused: the lock state is unknown" in out
    assert "put LockUnavailable m1_user_setpoint: write refused: the lock state is unknown" \
        in out
    assert "WENT THROUGH" not in out
    assert motor_record(net) == before


def test_free_lock_policy_and_lock_held_elsewhere_by_this_identity(net, lock, motor_ioc):
    # allow_free_writes=True: a Free lock lets the write through.
    r = run_client(env_for(net, lock, FREE="1"), """
motor.set(1.5).wait(30)
print("free write", motor.position)
""")
    assert "free write 1.5" in r.stdout
    # Held by this user@host under session "cli" (as `lockctl acquire cli` leaves it):
    # a client with that session may write, one with another session may not.
    r = subprocess.run([sys.executable, "-m", "beamline_lock.cli", "--prefix", lock.prefix,
                        "acquire", "cli", "--lease", "600"], env=net.client_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = run_client(env_for(net, lock, LOCK_SESSION="cli"), """
motor.set(0.5).wait(30)
print("same session", motor.position, lock.held_by_me)
""")
    assert "same session 0.5 True" in r.stdout
    r = run_client(env_for(net, lock, LOCK_SESSION="other"), """
try:
    motor.set(3.0)
except LockHeld as exc:
    print("other session", exc)
""")
    assert "that is you, under another session" in r.stdout
    assert float(net.caget(f"{MOTOR}.VAL")) == 0.5


def test_gated_mixin_and_default_lock(net, lock, motor_ioc):
    r = run_client(env_for(net, lock), """
class GatedEpicsSignal(GatedMixin, EpicsSignal):
    pass
class Stage(Device):
    x = Cpt(GatedEpicsSignal, "mtr2")
    y = Cpt(EpicsSignal, "mtr3")
stage = Stage("GT:", name="stage")
plain = GatedEpicsSignal("GT:mtr2.VELO", name="velo")
stage.wait_for_connection(timeout=30)
print("gated", is_gated(stage.x), is_gated(stage.y), is_gated(plain))
try:
    plain.put(3.0)
except LockUnavailable as exc:
    print("no default", exc)
set_default_lock(lock)
try:
    stage.x.put(1.0)
except LockNotHeld as exc:
    print("free", exc)
stage.y.put(1.0)                 # not gated: goes through
with lock.hold("mixin", lease=10):
    stage.x.put(2.0)
    plain.put(4.0)
print("done")
""")
    assert "gated True False True" in r.stdout
    assert "no default velo: write refused: the lock state is unknown (no beamline lock " \
           "configured" in r.stdout
    assert "free stage_x: write refused: the lock is Free" in r.stdout
    assert "done" in r.stdout
    wait_until(lambda: float(net.caget("GT:mtr2.VAL")) == 2.0, what="stage.x written")
    assert float(net.caget("GT:mtr2.VELO")) == 4.0
    assert float(net.caget("GT:mtr3.VAL")) == 1.0


LOADERS = {
    # bluesky-queueserver: every file in one namespace, in name order.
    "queueserver": """
from bluesky_queueserver.manager.profile_ops import load_profile_collection
ns = load_profile_collection(os.environ["STARTUP"])
devices = {n: ns[n] for n in ("m1", "m2", "shutter", "det", "beam")}
lock = ns["beamline_lock"]
""",
    # ophyd-websocket: OAS_STARTUP_DIR, each file as its own module.
    "ophyd-websocket": """
from ophyd_websocket.device_registry import device_registry
devices = {n: device_registry.get_device(n) for n in device_registry.list_devices()}
from beamline_lock.ophyd_gate import default_lock
lock = default_lock()
""",
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_startup_dir_builds_gated_devices_for_both_services(net, lock, loader):
    """The shared startup directory under each service's own loader (no device IOC
    needed: a refused write never reaches CA)."""
    body = '{"session": "beamtime", "lease": 600, "note": "XAS"}'
    assert net.caput(lock.pv("Acquire"), body, user="alice").returncode == 0
    env = net.client_env()
    env.update(STARTUP=str(STARTUP), OAS_STARTUP_DIR=str(STARTUP), LOCK_PREFIX=lock.prefix,
               BEAMLINE_PREFIX="SIM:", LOCK_SESSION="web:bob", LOCK_CONNECT_TIMEOUT="10")
    code = """
import os
from beamline_lock.client import LockHeld, LockUnavailable
from beamline_lock.ophyd_gate import is_gated
""" + LOADERS[loader] + """
print("devices", sorted(devices))
print("lock", type(lock).__name__, lock.prefix, lock.session, lock.connected)
print("pvs", devices["m1"].setpoint.pvname, devices["m1"].readback.pvname,
      devices["shutter"].command.pvname, devices["det"].acquire.pvname,
      devices["beam"].ring_current.pvname)
print("gated", [n for n in sorted(devices) if is_gated(devices[n])])
for name, write in [("m1", lambda: devices["m1"].set(1.0)),
                    ("shutter", lambda: devices["shutter"].set("Open")),
                    ("det", lambda: devices["det"].trigger()),
                    ("m2 velocity", lambda: devices["m2"].velocity.put(2.0))]:
    try:
        write()
        print(name, "WENT THROUGH")
    except LockHeld as exc:
        print(name, "refused:", exc)
"""
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=120, cwd=str(REPO))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "devices ['beam', 'det', 'm1', 'm2', 'shutter']" in out, out + r.stderr
    assert "lock BeamlineLock TST:LOCK: web:bob True" in out
    assert "pvs SIM:m1 SIM:m1:RBV SIM:Shutter:Open SIM:det:Acquire SIM:RingCurrent" in out
    assert "gated ['det', 'm1', 'm2', 'shutter']" in out
    assert "WENT THROUGH" not in out
    for name in ("m1", "shutter", "det_acquire", "m2_velocity"):
        assert f"{name}: write refused: lock is held by {ALICE} (session beamtime, " \
               "note 'XAS')" in out, out


@pytest.fixture
def beamline_ioc(net, tmp_path):
    """The simulated beamline of db/ on EPICS base softIoc (prefix SIMT:, no ACF loaded:
    here only the client-side gate decides)."""
    db = REPO / "db"
    argv = [tool("softIoc"), "-S"]
    for macros, name in [("P=SIMT:", "shutter.db"), ("P=SIMT:,M=m1,EGU=mm", "softMotor.db"),
                         ("P=SIMT:,M=m2,EGU=deg", "softMotor.db"), ("P=SIMT:", "detector.db"),
                         ("P=SIMT:", "beamline.db")]:
        argv += ["-m", macros, "-d", str(db / name)]
    ioc = Server(net, argv, log=tmp_path / "beamline-ioc.log", ready_pv="SIMT:m1:RBV")
    ioc.start()
    yield ioc
    ioc.stop()


def test_startup_dir_drives_the_simulated_beamline_only_for_the_holder(
        net, lock, beamline_ioc):
    env = net.client_env()
    env.update(STARTUP=str(STARTUP), LOCK_PREFIX=lock.prefix, BEAMLINE_PREFIX="SIMT:",
               LOCK_SESSION="queue", LOCK_CONNECT_TIMEOUT="10")
    code = """
import faulthandler, os, sys
faulthandler.dump_traceback_later(150, exit=True)   # never hang the test run
from bluesky import RunEngine
from bluesky.plans import scan
from bluesky_queueserver.manager.profile_ops import load_profile_collection
from beamline_lock.client import LockHeld
ns = load_profile_collection(os.environ["STARTUP"])
m1, shutter, det, beam, lock = (ns[n] for n in ("m1", "shutter", "det", "beam",
                                                 "beamline_lock"))
for dev in (m1, shutter, det, beam):
    dev.wait_for_connection(timeout=30)
print("beam", beam.energy.get(), beam.hutch_searched.get())
with lock.hold(lease=30, note="startup test"):
    det.acquire_time.put(0.2)
    shutter.set("Open").wait(10)
    print("shutter", shutter.status.get())
    m1.set(0.3).wait(30)
    m1.set(0.3).wait(5)                 # already there: done at once
    print("m1", round(m1.position, 3))
    docs = []
    RunEngine({})(scan([det], m1, 0, 0.2, 3), lambda name, doc: docs.append(name))
    print("scan", docs.count("event"), round(m1.position, 3))
    shutter.set("Close").wait(10)
print("done", flush=True)
sys.stdin.readline()                    # alice holds the lock now
try:
    m1.set(5.0)
except LockHeld as exc:
    print("refused", exc)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(REPO))
    try:
        lines = []
        while not lines or lines[-1] != "done":
            line = proc.stdout.readline()
            assert line, "".join(lines) + proc.stderr.read()
            lines.append(line.strip())
        assert net.caput(lock.pv("Acquire"), "after", user="alice").returncode == 0
        out, err = proc.communicate("\n", timeout=60)
    finally:
        proc.kill()
        proc.wait()
    out = "\n".join(lines) + "\n" + out
    assert proc.returncode == 0, out + err
    assert "beam 12.0 1" in out
    assert "shutter 1" in out and "m1 0.3" in out
    assert "scan 3 0.2" in out
    assert f"refused m1: write refused: lock is held by {ALICE} (session after)" in out
    assert float(net.caget("SIMT:m1")) == 0.2
    assert net.caget("SIMT:Shutter:Status") == "Closed"
