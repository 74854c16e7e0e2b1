"""Requests, hand-over and authority (issue 18) end to end: a real lock IOC, the simulated
beamline on EPICS base's softIoc with the generated ACF, and the real ``caput``/``caget``
run as the OS users alice and bob (staff), bluesky (queue), operator and mallory (no
group). The config gives operator > staff > queue authority, as ``TEST_CONFIG``."""
from __future__ import annotations

import json
import subprocess
import time

from epics_env import LockIOC, identity, tool, wait_until
from test_device_gating import can_write

ALICE, BOB, QUEUE, OPER = (identity(u) for u in ("alice", "bob", "bluesky", "operator"))


def decoded(net, ioc, suffix: str, user: str | None = None) -> str:
    """A text PV as ``caget -S`` prints it, unescaped (caget writes ``"`` as ``\\"``)."""
    return net.caget(ioc.pv(suffix), user=user).encode().decode("unicode_escape")


def waiters(net, ioc, user: str | None = None) -> list[dict]:
    return json.loads(decoded(net, ioc, "Waiters", user))


def history(net, ioc) -> list[str]:
    return decoded(net, ioc, "History").splitlines()


def put(net, ioc, command: str, text: str, user: str) -> subprocess.CompletedProcess:
    return net.caput(ioc.pv(command), text, user=user)


def test_alice_hands_over_to_bob_and_the_device_ioc_follows(net, lock_ioc, beamline):
    """alice holds; bob asks and sees his place; alice hands over in one step; bob's
    device writes start working and alice's stop, at the device IOC; stop stays open."""
    wait_until(lambda: can_write(net, beamline, "bob"), 15, what="gates connected")
    assert put(net, lock_ioc, "Acquire", '{"session": "align", "note": "DCM"}',
               "alice").returncode == 0
    wait_until(lambda: not can_write(net, beamline, "bob"), 5, what="bob refused")

    r = put(net, lock_ioc, "Request", '{"session": "edge", "note": "Fe edge", "lease": 120}',
            "bob")
    assert r.returncode == 0, r.stderr
    message = decoded(net, lock_ioc, "Message", user="bob")
    assert message.startswith(f"Request: waiting for {BOB} (session edge), place 1 of 1; "
                              f"the lock is held by {ALICE} (session align, note 'DCM')"), message
    assert net.caget(lock_ioc.pv("WaiterCount"), user="alice") == "1"
    (bob,) = waiters(net, lock_ioc, user="alice")
    assert (bob["who"], bob["session"], bob["note"], bob["lease"], bob["auto"],
            bob["group"]) == (BOB, "edge", "Fe edge", 120, True, "staff")
    assert bob["since"] <= time.time() < bob["expiry"]
    assert not can_write(net, beamline, "bob") and can_write(net, beamline, "alice")

    r = put(net, lock_ioc, "Handover", "align", "alice")
    assert r.returncode == 0, r.stderr
    assert (net.caget(lock_ioc.pv("Owner")), net.caget(lock_ioc.pv("Session")),
            net.caget(lock_ioc.pv("Note")), net.caget(lock_ioc.pv("Token"))) == (
        BOB, "edge", "Fe edge", "2")
    assert net.caget(lock_ioc.pv("WaiterCount")) == "0" and waiters(net, lock_ioc) == []
    assert abs(float(net.run("caget", "-t", "-f3", lock_ioc.pv("AcquiredAt"),
                             check=True).stdout) - time.time()) < 30
    events = history(net, lock_ioc)[-2:]
    assert f"handed-over {ALICE} session=align token=1 to={BOB} to_session=edge token=2" \
        in events[0], events
    assert f"acquired {BOB} session=edge token=2 lease=120s note='Fe edge' handed over by " \
           f"{ALICE} (session align, token 1)" in events[1], events

    wait_until(lambda: can_write(net, beamline, "bob"), 5, what="bob's writes accepted")
    assert can_write(net, beamline, "bob", "m1", "0.5")
    assert not can_write(net, beamline, "alice")
    assert not can_write(net, beamline, "alice", "m1", "2")
    # Stopping is never refused by the lock.
    assert net.caput(beamline.pv("m1:STOP"), "1", user="alice", text=False).returncode == 0
    # alice's own lock commands now fail: she no longer holds it.
    r = put(net, lock_ioc, "Release", "align", "alice")
    assert r.returncode != 0 and f"it is held by {BOB} (session edge" in r.stdout + r.stderr


def test_release_with_a_waiter_hands_over_and_history_says_who_waited(net, lock_ioc):
    assert put(net, lock_ioc, "Acquire", "align", "alice").returncode == 0
    assert put(net, lock_ioc, "Request", "edge", "bob").returncode == 0
    assert put(net, lock_ioc, "Release", "align", "alice").returncode == 0
    assert net.caget(lock_ioc.pv("Owner")) == BOB
    released, acquired = history(net, lock_ioc)[-2:]
    assert f"released {ALICE} session=align token=1 waiting={BOB}/edge" in released
    assert f"acquired {BOB} session=edge token=2" in acquired
    assert "(first in line, the lock was free)" in acquired
    # A waiter who asked not to be given it: Free, reserved, until they Acquire.
    assert put(net, lock_ioc, "Request", '{"session": "later", "auto": false}',
               "alice").returncode == 0
    assert put(net, lock_ioc, "Release", "edge", "bob").returncode == 0
    assert net.caget(lock_ioc.pv("State")) == "Free"
    r = put(net, lock_ioc, "Acquire", "sneak", "bluesky")
    assert r.returncode != 0
    assert f"the lock is Free but reserved for {ALICE} (session later)" in r.stdout + r.stderr
    assert put(net, lock_ioc, "Acquire", "later", "alice").returncode == 0
    assert net.caget(lock_ioc.pv("Token")) == "3"


def refusal(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    return r.stdout + r.stderr


def test_bad_requests_and_hand_overs_are_refused_clearly_and_change_nothing(net, lock_ioc):
    assert put(net, lock_ioc, "Acquire", "align", "alice").returncode == 0
    assert put(net, lock_ioc, "Request", "edge", "bob").returncode == 0
    before = (decoded(net, lock_ioc, "Waiters"), net.caget(lock_ioc.pv("Token")),
              net.caget(lock_ioc.pv("Owner")))
    cases = [
        ("Request", "m", "mallory", f"{identity('mallory')} is in no access group"),
        ("Request", "again", "alice", f"you ({ALICE}) hold the lock"),
        ("Handover", '{"session": "align", "to": "bluesky"}', "alice",
         f"bluesky is not waiting for the lock (waiting: {BOB} (session edge))"),
        ("Handover", '{"session": "align", "to": "alice"}', "alice",
         f"you ({ALICE}) hold the lock already"),
        ("Handover", "align", "bob", f"you ({BOB}, session align) do not hold the lock"),
        ("Handover", '{"session": "align", "to": 7}', "alice", '"to" must name a waiter'),
        ("Withdraw", "edge", "alice", f"you ({ALICE}, session edge) have no request waiting"),
    ]
    for command, text, user, why in cases:
        out = refusal(put(net, lock_ioc, command, text, user))
        assert why in out, (command, text, out)
        assert decoded(net, lock_ioc, "Message").startswith(f"{command}: "), command
    assert (decoded(net, lock_ioc, "Waiters"), net.caget(lock_ioc.pv("Token")),
            net.caget(lock_ioc.pv("Owner"))) == before
    assert "Traceback" not in lock_ioc.log()


def test_a_request_that_is_not_renewed_lapses(net, lock_ioc):
    assert put(net, lock_ioc, "Acquire", '{"session": "align", "lease": 600}',
               "alice").returncode == 0
    assert put(net, lock_ioc, "Request", '{"session": "edge", "lease": 1}',
               "bob").returncode == 0
    assert net.caget(lock_ioc.pv("WaiterCount")) == "1"
    wait_until(lambda: net.caget(lock_ioc.pv("WaiterCount")) == "0", 5,
               what="bob's request to lapse")
    assert any(f"request-lapsed {BOB} session=edge token=1" in line
               for line in history(net, lock_ioc))
    out = refusal(put(net, lock_ioc, "Handover", '{"session": "align", "to": "bob"}',
                      "alice"))
    assert "bob is not waiting for the lock (waiting: nobody); a request lapses unless " \
           "renewed" in out
    assert net.caget(lock_ioc.pv("Owner")) == ALICE
    # Renewing in time keeps the place (Request again, same session).
    assert put(net, lock_ioc, "Request", '{"session": "edge", "lease": 2}',
               "bob").returncode == 0
    for _ in range(3):
        time.sleep(1)
        assert put(net, lock_ioc, "Request", "edge", "bob").returncode == 0
    assert waiters(net, lock_ioc)[0]["who"] == BOB


def test_kill9_with_waiters_keeps_them_in_order(net, tmp_path):
    ioc = LockIOC(net, tmp_path).start()
    try:
        assert put(net, ioc, "Acquire", '{"session": "align", "lease": 600}',
                   "alice").returncode == 0
        for user, session in (("bluesky", "queue"), ("bob", "b2"), ("bob", "b1")):
            body = json.dumps({"session": session, "lease": 600})
            assert put(net, ioc, "Request", body, user).returncode == 0
        before = decoded(net, ioc, "Waiters")
        assert [(w["who"], w["session"]) for w in json.loads(before)] == [
            (BOB, "b2"), (BOB, "b1"), (QUEUE, "queue")]   # staff first, then FIFO
        ioc.kill9()
        ioc.start()
        assert decoded(net, ioc, "Waiters") == before
        assert net.caget(ioc.pv("WaiterCount")) == "3"
        assert (net.caget(ioc.pv("Owner")), net.caget(ioc.pv("Token"))) == (ALICE, "1")
        assert put(net, ioc, "Release", "align", "alice").returncode == 0
        assert (net.caget(ioc.pv("Owner")), net.caget(ioc.pv("Session"))) == (BOB, "b2")
        # A grant takes the grantee's other requests out of line (the holder never waits).
        assert [w["session"] for w in waiters(net, ioc)] == ["queue"]
    finally:
        ioc.stop()


def test_a_higher_authority_request_takes_the_lock_at_once(net, lock_ioc):
    assert put(net, lock_ioc, "Acquire", "align", "alice").returncode == 0
    assert put(net, lock_ioc, "Request", "queue", "bluesky").returncode == 0
    assert net.caget(lock_ioc.pv("Owner")) == ALICE        # lower: waits
    assert put(net, lock_ioc, "Request", '{"session": "op", "note": "beam dump"}',
               "operator").returncode == 0
    assert (net.caget(lock_ioc.pv("Owner")), net.caget(lock_ioc.pv("Token"))) == (OPER, "2")
    events = history(net, lock_ioc)
    assert any(f"preempted {OPER} session=op token=1 holder={ALICE} session=align "
               "operator (authority 30) over staff (authority 20)" in e for e in events)


def test_hand_over_racing_a_force_release(net, lock_ioc):
    """alice's Handover and operator's ForceRelease sent at the same moment, twenty
    times: the IOC applies them one after the other, in either order; there is never a
    second holder, and the token goes up by exactly one grant each round."""
    caput = [tool("caput"), "-c", "-S", "-w", "5"]
    orders = set()
    for i in range(20):
        assert put(net, lock_ioc, "Acquire", f"a{i}", "alice").returncode == 0
        token = int(net.caget(lock_ioc.pv("Token")))
        assert put(net, lock_ioc, "Request", f"b{i}", "bob").returncode == 0
        procs = {
            "handover": subprocess.Popen(["runuser", "-u", "alice", "--", *caput,
                                          lock_ioc.pv("Handover"), f"a{i}"],
                                         env=net.client_env(), stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True),
            "force": subprocess.Popen(["runuser", "-u", "operator", "--", *caput,
                                       lock_ioc.pv("ForceRelease"), "race drill"],
                                      env=net.client_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)}
        rc = {k: (p.wait(30), *p.communicate(timeout=30)) for k, p in procs.items()}
        events = [line.split()[1:3] for line in history(net, lock_ioc)[-3:]]
        state = net.caget(lock_ioc.pv("State"))
        assert int(net.caget(lock_ioc.pv("Token"))) == token + 1, rc
        assert rc["force"][0] == 0, rc
        if rc["handover"][0] == 0:
            # Hand-over first: bob held token n+1, then the operator took it from him.
            orders.add("handover first")
            assert events == [["handed-over", ALICE], ["acquired", BOB],
                              ["force-released", OPER]], events
            assert state == "Free"
        else:
            # Force-release first: bob, waiting with auto, got it; alice no longer held it.
            orders.add("force-release first")
            assert "do not hold the lock" in rc["handover"][1] + rc["handover"][2], rc
            assert events[-2:] == [["force-released", OPER], ["acquired", BOB]], events
            assert (state, net.caget(lock_ioc.pv("Owner"))) == ("Held", BOB)
            assert put(net, lock_ioc, "Release", f"b{i}", "bob").returncode == 0
        assert net.caget(lock_ioc.pv("WaiterCount")) == "0"
    print("orders seen:", orders)
    assert "Traceback" not in lock_ioc.log()


def test_a_hand_over_announces_the_new_grant_with_state_first(net, lock_ioc, tmp_path):
    """Clients tell holding periods apart by State's update, which the IOC writes first
    for every grant (the web page hides Owner/Session/Note older than State: an empty
    Note is never forwarded by ophyd-websocket). A hand-over goes Held -> Held: State
    must be written again all the same, before the new Owner, Session and Token."""
    from ca_clients import Camonitor
    assert put(net, lock_ioc, "Acquire", '{"session": "align", "note": "DCM"}',
               "alice").returncode == 0
    assert put(net, lock_ioc, "Request", "edge", "bob").returncode == 0
    names = [lock_ioc.pv(s) for s in ("State", "Owner", "Token")]
    mon = Camonitor(net, names, tmp_path / "camonitor.txt", "-S", "-t", "s")
    try:
        wait_until(lambda: all(mon.lines(n) for n in names), 10, what="camonitor connected")
        assert put(net, lock_ioc, "Handover", "align", "alice").returncode == 0
        wait_until(lambda: len(mon.lines(lock_ioc.pv("Token"))) == 2, 10, what="the new token")
    finally:
        mon.stop()
    states = mon.lines(lock_ioc.pv("State"))
    assert len(states) == 2 and states[1].split()[-1] == "Held", states
    def stamp(line: str) -> str:
        return " ".join(line.split()[1:3])   # `-t s`: the IOC's time stamp, sortable text
    new_state, new_owner, new_token = (stamp(mon.lines(n)[-1]) for n in names)
    assert new_state <= new_owner <= new_token, (new_state, new_owner, new_token)
