"""The Python client (BeamlineLock) against the real lock IOC.

Client code runs in its own Python process (libca reads the CA environment once per
process), as this OS user; other identities act through EPICS base tools run as real
OS users.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap


from epics_env import ME, HOST, identity, wait_until

ALICE = identity("alice")


def client_env(net, ioc, **extra) -> dict:
    env = net.client_env()
    env["LOCK_PREFIX"] = ioc.prefix
    env.update(extra)
    return env


def run_client(net, ioc, code: str, timeout: float = 90) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                       env=client_env(net, ioc), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"client failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


PRE = """
import os, sys, threading, time
from beamline_lock.client import *
lock = BeamlineLock(os.environ["LOCK_PREFIX"], timeout=10)
assert lock.connected, "lock client did not connect"
"""


def history(net, ioc) -> list[str]:
    """History lines (``caget -S`` prints the newlines as the two characters \\n)."""
    return net.caget(ioc.pv("History")).replace("\\n", "\n").splitlines()


def test_context_manager_keeps_a_2s_lease_alive_for_10s_then_releases(net, lock):
    r = run_client(net, lock, PRE + """
with lock.hold("keep", lease=2, note="ten seconds"):
    token = lock.token
    end = time.monotonic() + 10
    while time.monotonic() < end:
        lock.check_write_allowed("probe")   # raises if the lease lapsed
        assert lock.held_by_me
        time.sleep(0.2)
    st = lock.status()
    print("inside", st.state, st.owner, st.session, st.note, st.token == token)
st = lock.status()
print("after", st.state, repr(st.owner), lock.held_by_me, lock.token)
""")
    assert f"inside Held {ME}@{HOST} keep ten seconds True" in r.stdout
    assert "after Free '' False None" in r.stdout
    assert net.caget(lock.pv("State")) == "Free"
    events = history(net, lock)
    assert not any(" expired " in e for e in events), events
    renewals = [e for e in events if " renewed " in e and "session=keep" in e]
    assert len(renewals) >= 5, events   # about 15 (every lease/3) over 10 s
    assert " released " in events[-1] and "session=keep" in events[-1]


def test_context_manager_releases_when_the_body_raises(net, lock):
    r = run_client(net, lock, PRE + """
try:
    with lock.hold("boom", lease=30):
        print("holding", lock.held_by_me)
        raise RuntimeError("scan failed")
except RuntimeError as exc:
    print("raised", exc)
print("after", lock.status().state)
""")
    assert "holding True" in r.stdout and "raised scan failed" in r.stdout
    assert "after Free" in r.stdout
    assert net.caget(lock.pv("State")) == "Free"
    assert "released" in history(net, lock)[-1]


def test_lock_held_names_holder_and_wait_is_woken_when_free(net, lock):
    body = '{"session": "align", "lease": 3, "note": "mono scan"}'
    assert net.caput(lock.pv("Acquire"), body, user="alice").returncode == 0
    r = run_client(net, lock, PRE + """
try:
    lock.acquire("mine")
except LockHeld as exc:
    print("held-by", exc.owner, exc.session, exc.note, exc.expiry > 0)
    print("message", exc)
try:
    lock.check_write_allowed("m1")
except LockHeld as exc:
    print("gate", exc)
st = lock.acquire("mine", lease=30, wait=30)   # returns once alice's lease ran out
print("got", st.owner, st.session, st.held_by_me)
lock.release()
""")
    assert f"held-by {ALICE} align mono scan True" in r.stdout
    assert f"message Acquire: refused: lock is held by {ALICE} (session align" in r.stdout
    assert "until" in r.stdout
    assert f"gate m1: write refused: lock is held by {ALICE}" in r.stdout
    assert f"got {ME}@{HOST} mine True" in r.stdout


def test_renew_and_release_are_confirmed_and_refusals_classified(net, lock):
    r = run_client(net, lock, PRE + """
lock.acquire("r1", lease=2)
lock.renew(lease=60)
time.sleep(3)                       # past the first lease
print("still", lock.held_by_me, lock.status().state)
lock.release()
print("released", lock.status().state, lock.held_by_me)
for call in (lambda: lock.release("r1"), lambda: lock.renew(session="r1")):
    try:
        call()
    except LockNotHeld as exc:
        print("not-held", exc)
try:
    lock.acquire("bad session")
except LockRefused as exc:
    print("refused", type(exc).__name__, exc)
""")
    assert "still True Held" in r.stdout
    assert "released Free False" in r.stdout
    assert r.stdout.count("not-held") == 2 and "the lock is not held" in r.stdout
    assert "refused LockRefused Acquire: invalid session name" in r.stdout


def test_lost_lock_is_reported_to_callbacks_gate_and_exit(net, lock):
    code = textwrap.dedent(PRE + """
lost = threading.Event()
lock.add_callback(lambda st: lost.set() if st.event == "lost" else None)
try:
    with lock.hold("taken", lease=60):
        print("held", flush=True)
        sys.stdin.readline()          # an operator force-releases meanwhile
        print("callback", lost.wait(10), bool(lock.lost), lock.held_by_me)
        try:
            lock.check_write_allowed("m1")
        except LockLost as exc:
            print("gate", exc)
except LockLost as exc:
    print("exit", exc)
""")
    proc = subprocess.Popen([sys.executable, "-c", code], env=client_env(net, lock),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        r = net.caput(lock.pv("ForceRelease"), "beam dump", user="operator")
        assert r.returncode == 0, r.stderr
        out, err = proc.communicate("\n", timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, out + err
    assert "callback True True False" in out
    assert "gate m1: write refused: this process lost the lock" in out
    assert "exit this process had already lost the lock" in out


def test_refused_when_not_in_any_group(net, lock_ioc):
    """The shared fixture's config does not admit this test process's user."""
    r = run_client(net, lock_ioc, PRE + """
try:
    lock.acquire("nobody")
except LockRefused as exc:
    print("refused", type(exc).__name__, exc)
print("state", lock.status().state)
""")
    assert "refused LockRefused Acquire: refused:" in r.stdout
    assert "is in no access group" in r.stdout
    assert "state Free" in r.stdout


def test_unreachable_lock_ioc_means_state_unknown(net, lock, tmp_path):
    lock.stop()
    r = run_client(net, lock, """
import os
from beamline_lock.client import *
lock = BeamlineLock(os.environ["LOCK_PREFIX"], session="s", timeout=1)
print("connected", lock.connected, lock.status().state)
for call in (lock.acquire, lambda: lock.check_write_allowed("m1")):
    try:
        call()
    except LockUnavailable as exc:
        print("unavailable", exc)
""")
    assert "connected False unknown" in r.stdout
    assert r.stdout.count("unavailable") == 2
    assert "m1: write refused: the lock state is unknown" in r.stdout


def test_callbacks_follow_every_change_from_other_clients(net, lock):
    code = textwrap.dedent(PRE + """
seen = []
done = threading.Event()
def cb(st):
    seen.append((st.event, st.state, st.owner))
    if st.state == "Free" and any(s[1] == "Held" for s in seen):
        done.set()
lock.add_callback(cb)
print("ready", flush=True)
print("done", done.wait(30))
print("events", sorted({e for e, _, _ in seen}))
print("owners", sorted({o for _, _, o in seen if o}))
""")
    proc = subprocess.Popen([sys.executable, "-c", code], env=client_env(net, lock),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert net.caput(lock.pv("Acquire"), "cb", user="alice").returncode == 0
        wait_until(lambda: net.caget(lock.pv("Owner")) == ALICE, what="alice holds")
        assert net.caput(lock.pv("Release"), "cb", user="alice").returncode == 0
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert "done True" in out, out + err
    assert "'State'" in out and "'Owner'" in out and "'Token'" in out
    assert ALICE in out


def test_connects_when_the_ioc_starts_late_and_keeps_the_grant_across_a_restart(net, lock):
    lock.stop()
    code = textwrap.dedent("""
import os, sys, time
from beamline_lock.client import *
lock = BeamlineLock(os.environ["LOCK_PREFIX"], session="restart", timeout=10,
                    connect_timeout=0.5)
print("connected", lock.connected, flush=True)
sys.stdin.readline()                       # the IOC is started meanwhile
print("connected", lock.wait_connected(30), lock.status().state, flush=True)
lock.acquire(lease=600)
print("held", lock.token, flush=True)
sys.stdin.readline()                       # the IOC is killed (-9) and restarted
deadline = time.monotonic() + 30
while lock.connected and time.monotonic() < deadline:
    time.sleep(0.02)
print("reconnected", lock.wait_connected(30), lock.held_by_me, lock.token, flush=True)
lock.check_write_allowed("m1")
lock.release()
print("released", lock.status().state)
""")
    proc = subprocess.Popen([sys.executable, "-c", code], env=client_env(net, lock),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "connected False"
        lock.start()
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "connected True Free"
        assert proc.stdout.readline().strip() == "held 1"
        lock.kill9()
        lock.start()
        out, err = proc.communicate("\n", timeout=90)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, out + err
    assert "reconnected True True 1" in out
    assert "released Free" in out
