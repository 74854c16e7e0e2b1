"""The queue shares the beamline (issue 18): a higher-authority request made while a plan
runs is granted at the end of that plan (the guard finishes the plan, hands the lock
over, and the queue waits in line to get it back); someone waiting shortens the linger;
every run carries the lock in its start document.

Real lock IOC, real softIoc with the generated ACF, ``caput`` as real OS users; the
queue scenario with the real RE Manager (``start-re-manager``, Redis) from
``test_queue_guard``'s ``system``; the rest with a RunEngine in its own process
(``GuardProcess``), as in ``test_queue_guard``. The RE worker runs as this test's OS
user (``ME``, in the queue group: authority 10 < staff 20).
"""
from __future__ import annotations

import json

from bluesky_queueserver_api import BPlan

from epics_env import ME, wait_until
from test_cli import lockctl
from test_device_gating import can_write
from test_handover import decoded, history, waiters
from test_queue_guard import (ALICE, LINGER, QUEUE, GuardProcess, _console_until,  # noqa: F401
                              plain, qs, system)

PLANS = """
import json, os, runpy, sys, time
ns = {}
for name in ("00-lock.py", "10-devices.py"):
    ns.update(runpy.run_path(os.path.join(sys.argv[1], name), init_globals=ns))
from bluesky import RunEngine
from bluesky.plans import scan
from beamline_lock.re_guard import install_lock_guard
RE = RunEngine({})
RE.subscribe(lambda name, doc: print("START", json.dumps(doc.get("lock")), flush=True)
             if name == "start" else None)
guard = install_lock_guard(RE, ns["beamline_lock"], session="queue", lease=30,
                           linger=float(os.environ["LINGER"]), waiting_linger=1)
for stop in os.environ["STOPS"].split():
    RE(scan([ns["det"]], ns["m1"], 0, float(stop), int(float(stop)) + 1))
    print("DONE", stop, flush=True)
time.sleep(float(os.environ.get("STAY", "0")))
"""


def test_every_run_carries_the_lock_in_its_start_document(plain):
    net, lock, beamline = plain
    proc = GuardProcess(net, lock, beamline, script=PLANS, LINGER="1", STOPS="1 1")
    try:
        first = json.loads(proc.wait_for("START ")[len("START "):])
        proc.wait_for("DONE 1")
        token = int(net.caget(lock.pv("Token")))
        acquired_at = float(net.run("caget", "-t", "-f6", lock.pv("AcquiredAt"),
                                    check=True).stdout)
        assert abs(first.pop("acquired_at") - acquired_at) < 1e-5, first
        assert first == {"owner": QUEUE, "session": "queue", "note": "bluesky queue: scan",
                         "token": token}, first
        assert proc.proc.wait(60) == 0, proc.output()
        starts = [json.loads(line[len("START "):]) for line in proc.lines
                  if line.startswith("START ")]
        assert len(starts) == 2 and starts[1]["token"] == token, starts  # one grant
    finally:
        proc.stop()
    # The run traced to its holder by the token in its start document.
    r = lockctl(net, lock, "history", "--token", str(token), user=ME)
    assert r.returncode == 0, r.stderr
    assert f" acquired {QUEUE} session=queue token={token} " in r.stdout.splitlines()[0]


def test_a_higher_authority_request_waits_for_the_end_of_the_plan(plain):
    """alice (staff) asks while the queue's scan runs: the scan goes on to its end, then
    alice has the lock and the next plan waits in line; when she releases, it runs."""
    net, lock, beamline = plain
    proc = GuardProcess(net, lock, beamline, script=PLANS, LINGER="5", STOPS="4 1")
    try:
        wait_until(lambda: net.caget(beamline.pv("m1:MOVN")) == "1", 60,
                   what="the scan to move m1")
        r = net.caput(lock.pv("Request"), '{"session": "manual", "note": "align"}',
                      user="alice")
        assert r.returncode == 0, r.stderr
        message = decoded(net, lock, "Message")
        assert "running task 'scan': it hands over to you at its end" in message, message
        assert net.caget(lock.pv("YieldTo")) == ALICE
        assert net.caget(lock.pv("Owner")) == QUEUE           # not mid-plan
        assert not can_write(net, beamline, "alice")
        proc.wait_for("DONE 4")
        wait_until(lambda: net.caget(lock.pv("Owner")) == ALICE, 20,
                   what="alice to have the lock after the plan")
        proc.wait_for("handed the beamline lock to " + ALICE)
        proc.wait_for("plan 'scan' waits for the beamline lock")
        assert [(w["who"], w["session"]) for w in waiters(net, lock)] == [(QUEUE, "queue")]
        assert float(net.caget(beamline.pv("m1"))) == 4.0      # the whole scan ran
        wait_until(lambda: can_write(net, beamline, "alice", "m1", "2"), 10,
                   what="alice's writes accepted")
        assert "DONE 1" not in proc.output()
        assert net.caput(lock.pv("Release"), "manual", user="alice").returncode == 0
        proc.wait_for("the queue has the beamline lock again")
        proc.wait_for("DONE 1")
        assert proc.proc.wait(60) == 0, proc.output()
    finally:
        proc.stop()
    events = [line.split()[1:3] for line in history(net, lock)]
    assert ["handed-over", QUEUE] in events and ["released", ALICE] in events


def test_someone_waiting_shortens_the_linger(plain):
    """After the last plan the queue keeps the lock for its linger (30 s here); a
    request of the same authority (bluesky, the queue's group) makes it hand over after
    the short linger (1 s) instead."""
    net, lock, beamline = plain
    proc = GuardProcess(net, lock, beamline, script=PLANS, LINGER="30", STOPS="1",
                        STAY="60")
    try:
        proc.wait_for("DONE 1")
        assert net.caget(lock.pv("Owner")) == QUEUE
        assert net.caput(lock.pv("Request"), "other", user="bluesky").returncode == 0
        assert net.caget(lock.pv("YieldTo")) == ""               # not a higher authority
        proc.wait_for("someone waits for the beamline lock: handing it over in 1 s")
        line = proc.wait_for("handed the beamline lock to bluesky@")
        assert "1 s without a plan" in line, line
        assert net.caget(lock.pv("Owner")).startswith("bluesky@")
    finally:
        proc.stop()


def test_the_queue_yields_at_the_end_of_a_plan_and_gets_the_lock_back(qs):
    """The real RE Manager: a scan and a count queued; alice (staff) requests during the
    scan; the scan completes, alice gets the lock, the count waits in line; alice
    releases and the count runs; the queue ends Free after its linger."""
    net, lock, beamline, manager, api = qs
    api.console_monitor.enable()
    api.console_monitor.clear()
    try:
        api.item_add(BPlan("scan", ["det"], "m1", 0, 4, 5))
        api.item_add(BPlan("count", ["det"], num=2))
        assert api.queue_start()["success"]
        wait_until(lambda: net.caget(beamline.pv("m1:MOVN")) == "1", 60,
                   what="the scan to move m1")
        r = net.caput(lock.pv("Request"), '{"session": "manual", "note": "check mirror"}',
                      user="alice")
        assert r.returncode == 0, r.stderr
        assert net.caget(lock.pv("YieldTo")) == ALICE
        assert net.caget(lock.pv("Owner")) == QUEUE

        wait_until(lambda: net.caget(lock.pv("Owner")) == ALICE, 60,
                   what="alice to have the lock at the end of the scan")
        text = _console_until(api, "plan 'count' waits for the beamline lock", 30)
        assert f"handed the beamline lock to {ALICE}" in text, text
        items = api.history_get()["items"]
        assert [(i["name"], i["result"]["exit_status"]) for i in items] == [
            ("scan", "completed")], items
        assert float(net.caget(beamline.pv("m1"))) == 4.0
        status = api.status()
        assert status["manager_state"] == "executing_queue", status
        assert [(w["who"], w["session"]) for w in waiters(net, lock)] == [(QUEUE, "queue")]
        wait_until(lambda: can_write(net, beamline, "alice", "m1", "1"), 10,
                   what="alice's device writes accepted")

        assert net.caput(lock.pv("Release"), "manual", user="alice").returncode == 0
        api.wait_for_idle(timeout=120)
        items = api.history_get()["items"]
        assert [(i["name"], i["result"]["exit_status"]) for i in items] == [
            ("scan", "completed"), ("count", "completed")], items
        assert "the queue has the beamline lock again" in api.console_monitor.text()
    finally:
        api.console_monitor.disable()
    wait_until(lambda: net.caget(lock.pv("State")) == "Free", LINGER + 10,
               what="the lock released after the linger")
    assert net.caget(lock.pv("WaiterCount")) == "0"
