"""bluesky-queueserver runs under the lock, unmodified: real Redis, real start-re-manager
with the shared startup directory, real lock IOC, real softIoc with the generated ACF,
real ``caput`` as real OS users, and bluesky-queueserver-api as the client.

The RE worker runs as this test's OS user (root in CI), so the lock config puts that
user in the ``queue`` group (``ME``); alice and bob are ``staff``, operator is operator.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from bluesky_queueserver_api import BFunc, BPlan

from beamline_env import SoftIoc
from epics_env import HOST, ME, TEST_CONFIG, CANetwork, LockIOC, identity, tool, wait_until
from qserver_env import STARTUP_DIR, REManager, Redis, stop_group

LINGER = 3.0
ALICE = identity("alice")
QUEUE = f"{ME}@{HOST}"


def _config(prefix: str, state: Path) -> str:
    return TEST_CONFIG.format(prefix=prefix, state=state).replace(
        "users: [bluesky]", f"users: [bluesky, {ME}]")


class Monitor:
    """``camonitor`` on some PVs: every update with the local time it arrived."""

    def __init__(self, net: CANetwork, *pvs: str):
        self.updates: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen([tool("camonitor"), "-S", *pvs], env=net.client_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, start_new_session=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        for pv in pvs:
            wait_until(lambda pv=pv: self.values(pv), 10, what=f"camonitor to show {pv}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) >= 4:
                with self._lock:
                    self.updates.append((time.time(), parts[0], parts[3]))

    def values(self, pv: str, since: float = 0.0) -> list[str]:
        with self._lock:
            return [v for t, name, v in self.updates if name == pv and t >= since]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    """Lock IOC + beamline softIoc (ACF) + Redis + start-re-manager, environment open."""
    work = tmp_path_factory.mktemp("qserver")
    net = CANetwork()
    lock = LockIOC(net, work, config_text=_config("TST:LOCK:", work / "lock-state.sqlite3"))
    started = []
    try:
        started.append(lock.start())
        beamline = SoftIoc(net, work, lock.config, prefix="TST:")
        started.append(beamline.start())
        redis = Redis(work / "redis")
        started.append(redis.start())
        manager = REManager(net, work / "manager", redis, env={
            "LOCK_PREFIX": "TST:LOCK:", "BEAMLINE_PREFIX": "TST:",
            "QUEUE_LOCK_LINGER": str(LINGER), "LOCK_CONNECT_TIMEOUT": "10"})
        started.append(manager.start())
        yield net, lock, beamline, manager
    finally:
        for part in reversed(started):
            part.stop()


@pytest.fixture
def qs(system):
    """The system with an empty queue and history, an idle RE and a Free lock."""
    net, lock, beamline, manager = system
    api = manager.api
    api.queue_clear()
    api.history_clear()
    wait_until(lambda: net.caget(lock.pv("State")) == "Free", LINGER + 20,
               what="the lock to be Free before the test")
    assert net.caput(beamline.pv("det:AcquireTime"), "0.2", text=False).returncode == 0
    assert net.caput(beamline.pv("m1"), "0", text=False).returncode == 0
    wait_until(lambda: net.caget(beamline.pv("m1:DMOV")) == "1", 20, what="m1 at 0")
    yield net, lock, beamline, manager, api
    if api.status()["manager_state"] != "idle":
        api.re_pause("immediate")
        api.wait_for_idle_or_paused(timeout=30)
        if api.status()["re_state"] == "paused":
            api.re_abort()
        api.wait_for_idle(timeout=60)
    if net.caget(lock.pv("State")) == "Held":
        net.caput(lock.pv("ForceRelease"), "test cleanup", user="operator")


def _run_queue(api, timeout: float = 120) -> None:
    assert api.queue_start()["success"]
    wait_until(lambda: api.status()["manager_state"] != "idle"
               or api.status()["items_in_queue"] == 0, 20, what="the queue to start")
    api.wait_for_idle(timeout=timeout)


def test_queue_holds_the_lock_across_items_and_releases_after_linger(qs):
    net, lock, beamline, manager, api = qs
    token = int(net.caget(lock.pv("Token")))
    watch = Monitor(net, lock.pv("State"))
    try:
        api.item_add(BPlan("scan", ["det"], "m1", 0, 3, 4))  # ~4 s: three 1 mm moves + counts
        api.item_add(BPlan("count", ["det"], num=3))
        assert api.queue_start()["success"]
        wait_until(lambda: net.caget(beamline.pv("m1:MOVN")) == "1", 30,
                   what="the scan to move m1")

        # Mid-scan: the device IOC refuses alice, the lock refuses her naming the queue.
        r = net.caput(beamline.pv("Shutter:Open"), "1", user="alice", text=False)
        assert r.returncode != 0 and "Write access denied" in r.stderr, r.stderr
        r = net.caput(lock.pv("Acquire"), '{"session": "manual", "note": "align"}',
                      user="alice")
        assert r.returncode != 0
        refusal = r.stdout + r.stderr
        assert f"held by {QUEUE} (session queue" in refusal, refusal
        assert "note 'bluesky queue: " in refusal, refusal  # the queue's note names its plan

        api.wait_for_idle(timeout=120)
        finished = time.time()
        history = api.history_get()["items"]
        assert [(i["name"], i["result"]["exit_status"]) for i in history] == [
            ("scan", "completed"), ("count", "completed")], history
        wait_until(lambda: watch.values(lock.pv("State"), since=finished) == ["Free"],
                   LINGER + 10, what="the lock to be released after the linger")
    finally:
        watch.stop()
    # Held once for the whole queue: never Free between the items, one grant only.
    states = watch.values(lock.pv("State"))
    changes = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    assert changes == ["Free", "Held", "Free"], states
    assert int(net.caget(lock.pv("Token"))) == token + 1
    assert float(net.caget(beamline.pv("m1"))) == 3.0


def test_plan_fails_before_touching_hardware_when_someone_else_holds_the_lock(qs):
    net, lock, beamline, manager, api = qs
    body = '{"session": "manual", "note": "aligning the mirror", "lease": 120}'
    assert net.caput(lock.pv("Acquire"), body, user="alice").returncode == 0
    setpoints = Monitor(net, beamline.pv("m1"), beamline.pv("m1:STOP"))
    try:
        api.item_add(BPlan("scan", ["det"], "m1", 1, 3, 3))
        api.item_add(BPlan("count", ["det"], num=1))
        _run_queue(api)
        item = api.history_get()["items"][-1]
        result = item["result"]
        assert item["name"] == "scan" and result["exit_status"] == "failed", result
        msg = result["msg"]
        assert ALICE in msg and "session manual" in msg, msg
        assert "aligning the mirror" in msg and " until " in msg, msg
        assert "not started, no hardware touched" in msg, msg
        status = api.status()
        assert status["items_in_queue"] == 2, status  # the queue stopped at the failed item
        assert len(api.history_get()["items"]) == 1
        time.sleep(1)  # any write would have shown by now
        # camonitor shows only the values it found on connecting: nothing was written.
        assert len(setpoints.values(beamline.pv("m1"))) == 1, setpoints.updates
        assert len(setpoints.values(beamline.pv("m1:STOP"))) == 1, setpoints.updates
        assert float(net.caget(beamline.pv("m1:RBV"))) == 0.0
        assert net.caget(lock.pv("Owner")) == ALICE  # alice keeps her lock
    finally:
        setpoints.stop()
        net.caput(lock.pv("Release"), "manual", user="alice")


def test_force_release_mid_scan_suspends_and_resumes_only_with_the_lock(qs):
    net, lock, beamline, manager, api = qs
    api.console_monitor.enable()
    api.console_monitor.clear()
    m1, stop = beamline.pv("m1"), beamline.pv("m1:STOP")
    writes = Monitor(net, m1, stop)
    try:
        api.item_add(BPlan("scan", ["det"], "m1", 0, 6, 7))
        assert api.queue_start()["success"]
        wait_until(lambda: float(net.caget(beamline.pv("m1:RBV"))) > 1.5, 60,
                   what="the scan to be under way")
        r = net.caput(lock.pv("ForceRelease"), "beam dump drill", user="operator")
        assert r.returncode == 0, r.stderr
        revoked = time.time()

        # The reason reaches the API: the worker console and the guard's status function.
        text = _console_until(api, "SUSPENDING", timeout=20)
        assert "force-released operator@" in text and "beam dump drill" in text, text
        # bluesky itself suspended the plan, with the guard's justification.
        text = _console_until(api, "Justification for this suspension", timeout=20)
        why = text.split("Justification for this suspension:", 1)[1]
        assert "the queue lost the beamline lock" in why, text
        res = _function(api, "lock_status")
        assert res["suspended"] is True and res["held_by_queue"] is False, res
        assert "beam dump drill" in res["reason"], res
        assert api.status()["manager_state"] == "executing_queue"

        # No device write once suspended (1 s for the monitor event to arrive): the
        # setpoint and STOP records see nothing while the lock is not the queue's.
        settled = revoked + 1.0
        time.sleep(max(0.0, settled - time.time()) + 4.0)
        assert writes.values(m1, since=settled) == [], writes.updates
        assert writes.values(stop, since=settled) == [], writes.updates
        assert net.caget(lock.pv("State")) == "Free"
        assert api.status()["items_in_queue"] == 0 and api.history_get()["items"] == []

        # Only the queue holding the lock again resumes the plan.
        res = _function(api, "lock_reacquire")
        assert res["held_by_queue"] is True, res
        assert net.caget(lock.pv("Owner")) == QUEUE
        api.wait_for_idle(timeout=120)
        item = api.history_get()["items"][-1]
        assert item["result"]["exit_status"] == "completed", item["result"]
        assert float(net.caget(beamline.pv("m1"))) == 6.0
        assert "resuming the plan" in api.console_monitor.text()
    finally:
        writes.stop()
        api.console_monitor.disable()
    wait_until(lambda: net.caget(lock.pv("State")) == "Free", LINGER + 10,
               what="the lock released after the linger")


def _console_until(api, needle: str, timeout: float) -> str:
    """The RE worker's console text (bluesky-queueserver-api console_monitor) once it
    contains ``needle``."""
    wait_until(lambda: needle in api.console_monitor.text(), timeout,
               what=f"{needle!r} in the RE worker console")
    time.sleep(0.3)  # the rest of what was printed with it
    return api.console_monitor.text()


def _function(api, name: str) -> dict:
    resp = api.function_execute(BFunc(name), run_in_background=True)
    assert resp["success"], resp
    uid = resp["task_uid"]
    api.wait_for_completed_task(uid, timeout=30)
    result = api.task_result(uid)
    assert result["success"], result
    ret = result["result"]
    assert ret["success"], ret
    return ret["return_value"]



# ---- the guard in a plain RunEngine process (no queue server): wait and lease loss ----------
GUARD_SCRIPT = """
import os, runpy, sys, time
ns = {}
for name in ("00-lock.py", "10-devices.py"):
    ns.update(runpy.run_path(os.path.join(sys.argv[1], name), init_globals=ns))
from bluesky import RunEngine
from bluesky.plans import scan
from beamline_lock.client import LockError
from beamline_lock.re_guard import install_lock_guard
RE = RunEngine({})
guard = install_lock_guard(RE, ns["beamline_lock"], session="queue", linger=1,
                           lease=float(os.environ["LEASE"]), wait=float(os.environ["WAIT"]))
for stop in os.environ["STOPS"].split():
    print("PLAN", stop, flush=True)
    try:
        RE(scan([ns["det"]], ns["m1"], 0, float(stop), int(float(stop)) + 1))
        print("DONE", stop, flush=True)
    except LockError as exc:
        print("FAILED", stop, exc, flush=True)
    guard.wait = float(os.environ["WAIT2"])
"""


class GuardProcess:
    """A RunEngine with the guard in its own process (libca reads the CA env per process)."""

    def __init__(self, net, lock, beamline, script: str = GUARD_SCRIPT, **env):
        e = net.client_env()
        e.update(LOCK_PREFIX=lock.prefix, BEAMLINE_PREFIX=beamline.prefix,
                 LOCK_SESSION="queue", PYTHONUNBUFFERED="1", **env)
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-c", script, str(STARTUP_DIR)],
                                     env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, needle: str, timeout: float = 60) -> str:
        def found():
            hits = [line for line in self.lines if needle in line]
            if not hits and self.proc.poll() is not None:
                raise AssertionError("guard process exited:\n" + "\n".join(self.lines))
            return hits[0] if hits else ""
        return wait_until(found, timeout, 0.1, what=f"{needle!r} from the guard process")

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> None:
        stop_group(self.proc)


@pytest.fixture
def plain(tmp_path):
    """Lock IOC + beamline softIoc for a RunEngine outside the queue server."""
    net = CANetwork()
    lock = LockIOC(net, tmp_path, config_text=_config("TST:LOCK:", tmp_path / "state.sqlite3"))
    lock.start()
    beamline = SoftIoc(net, tmp_path, lock.config, prefix="TST:")
    try:
        beamline.start()
        assert net.caput(beamline.pv("det:AcquireTime"), "0.2", text=False).returncode == 0
        yield net, lock, beamline
    finally:
        beamline.stop()
        lock.stop()


def test_configured_wait_for_a_busy_lock(plain):
    net, lock, beamline = plain
    body = '{"session": "manual", "note": "quick check", "lease": 120}'
    assert net.caput(lock.pv("Acquire"), body, user="alice").returncode == 0
    proc = GuardProcess(net, lock, beamline, LEASE="30", WAIT="1", WAIT2="60", STOPS="1 2")
    try:
        # wait=1: alice keeps the lock, the first plan gives up after a second.
        failed = proc.wait_for("FAILED 1")
        assert ALICE in failed and "quick check" in failed, failed
        assert float(net.caget(beamline.pv("m1"))) == 0.0
        # wait=60: the second plan waits (event-driven) and runs once alice releases.
        proc.wait_for("PLAN 2")
        time.sleep(2)
        assert "DONE 2" not in proc.output()
        assert net.caput(lock.pv("Release"), "manual", user="alice").returncode == 0
        proc.wait_for("DONE 2")
        assert float(net.caget(beamline.pv("m1"))) == 2.0
        assert proc.proc.wait(30) == 0, proc.output()
    finally:
        proc.stop()


def test_lease_lost_while_frozen_suspends_without_writes_until_the_queue_holds_it(plain):
    net, lock, beamline = plain
    m1, stop = beamline.pv("m1"), beamline.pv("m1:STOP")
    writes = Monitor(net, m1, stop)
    proc = GuardProcess(net, lock, beamline, LEASE="2", WAIT="0", WAIT2="0", STOPS="6")
    try:
        wait_until(lambda: float(net.caget(beamline.pv("m1:RBV"))) > 1.5, 60,
                   what="the scan to be under way")
        os.killpg(proc.proc.pid, signal.SIGSTOP)  # frozen past its 2 s lease
        wait_until(lambda: net.caget(lock.pv("State")) == "Free", 15,
                   what="the frozen process's lease to run out")
        os.killpg(proc.proc.pid, signal.SIGCONT)
        resumed = time.time()
        line = proc.wait_for("SUSPENDING", 20)
        assert "expired" in line, proc.output()
        settled = resumed + 1.0
        time.sleep(max(0.0, settled - time.time()) + 3.0)
        assert writes.values(m1, since=settled) == [], writes.updates
        assert writes.values(stop, since=settled) == [], writes.updates
        assert "DONE" not in proc.output()

        # `lockctl acquire queue` as the queue's own account: the guard takes the grant
        # over and the plan resumes from its last checkpoint.
        env = net.client_env()
        env["LOCK_PREFIX"] = lock.prefix
        r = subprocess.run([str(Path(sys.executable).with_name("lockctl")), "acquire", "queue",
                            "--lease", "30"], env=env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        proc.wait_for("holds the beamline lock again", 20)
        proc.wait_for("DONE 6", 120)
        assert proc.proc.wait(30) == 0, proc.output()
        assert float(net.caget(m1)) == 6.0
        # The process exited right after the plan: its 2 s lease simply runs out.
        wait_until(lambda: net.caget(lock.pv("State")) == "Free", 15, what="the lease to end")
    finally:
        writes.stop()
        proc.stop()


def test_lock_ioc_down_mid_plan_suspends_and_the_durable_grant_resumes_it(plain):
    """kill -9 of the lock IOC mid-scan: lock state unknown, the plan suspends with no
    device writes; the restarted IOC still has the queue's grant, and the plan resumes."""
    net, lock, beamline = plain
    m1, stop = beamline.pv("m1"), beamline.pv("m1:STOP")
    writes = Monitor(net, m1, stop)
    proc = GuardProcess(net, lock, beamline, LEASE="60", WAIT="0", WAIT2="0", STOPS="6")
    restarted = None
    try:
        wait_until(lambda: float(net.caget(beamline.pv("m1:RBV"))) > 1.5, 60,
                   what="the scan to be under way")
        token = net.caget(lock.pv("Token"))
        lock.kill9()
        line = proc.wait_for("SUSPENDING", 20)
        assert "lock state unknown" in line, line
        # Suspending, bluesky stops m1 (never refused, see test_safety.py); then nothing.
        settled = time.time() + 1.0
        time.sleep(max(0.0, settled - time.time()) + 3.0)
        assert "Failed to stop" not in proc.output()
        assert writes.values(m1, since=settled) == [], writes.updates
        assert writes.values(stop, since=settled) == [], writes.updates
        assert "DONE" not in proc.output()

        # Same port, same state file: the grant survived, the queue holds it again.
        restarted = LockIOC(net, lock.workdir, prefix=lock.prefix, port=lock.port).start()
        assert (net.caget(lock.pv("State")), net.caget(lock.pv("Token"))) == ("Held", token)
        proc.wait_for("holds the beamline lock again", 30)
        proc.wait_for("DONE 6", 120)
        assert proc.proc.wait(30) == 0, proc.output()
        assert float(net.caget(m1)) == 6.0
    finally:
        writes.stop()
        proc.stop()
        if restarted is not None:
            restarted.stop()
