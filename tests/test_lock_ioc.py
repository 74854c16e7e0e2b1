"""The lock IOC end to end: real IOC process, EPICS base tools as real OS users."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from epics_env import REPO, LockIOC, identity, tool, wait_until

ALICE, BOB = identity("alice"), identity("bob")


def state(net, ioc) -> dict:
    names = ["State", "Owner", "Session", "Note", "Token"]
    out = {n: net.caget(ioc.pv(n)) for n in names}
    out["Expiry"] = expiry(net, ioc)
    return out


def expiry(net, ioc) -> str:
    """$(P)Expiry in full (plain caget prints %g: 1.79555e+09)."""
    return net.run("caget", "-t", "-f3", ioc.pv("Expiry"), check=True).stdout.strip()


def test_serves_contract_pvs_with_initial_values(net, lock_ioc):
    s = state(net, lock_ioc)
    assert s == {"State": "Free", "Owner": "", "Session": "", "Note": "", "Token": "0",
                 "Expiry": "0.000"}
    for group in ("queue", "staff", "operator"):
        assert net.caget(lock_ioc.pv(f"Gate:{group}")) == "1"
    assert net.caget(lock_ioc.pv("LeaseDefault")) == "60"
    info = net.run("cainfo", lock_ioc.pv("State"), check=True).stdout
    assert "DBF_ENUM" in info and "read, no write" in info
    info = net.run("cainfo", lock_ioc.pv("Acquire"), check=True).stdout
    assert "DBF_CHAR" in info and "read, write" in info


def test_acquire_release_walkthrough_with_long_text(net, lock_ioc):
    note = "aligning the DCM second crystal pitch before the overnight EXAFS queue"
    assert len(note) > 40
    req = json.dumps({"session": "alice-align", "lease": 120, "note": note})
    r = net.caput(lock_ioc.pv("Acquire"), req, user="alice")
    assert r.returncode == 0, r.stderr
    s = state(net, lock_ioc)
    assert (s["State"], s["Owner"], s["Session"], s["Note"], s["Token"]) == (
        "Held", ALICE, "alice-align", note, "1")
    assert abs(float(s["Expiry"]) - (time.time() + 120)) < 10
    assert net.caget(lock_ioc.pv("Gate:staff")) == "1"
    assert net.caget(lock_ioc.pv("Gate:queue")) == "0"
    assert f"granted to {ALICE} (session alice-align), token 1" in net.caget(lock_ioc.pv("Message"))
    remaining = float(net.caget(lock_ioc.pv("Remaining")))
    assert 100 < remaining <= 120

    r = net.caput(lock_ioc.pv("Release"), "alice-align", user="alice")
    assert r.returncode == 0, r.stderr
    assert net.caget(lock_ioc.pv("State")) == "Free"
    assert net.caget(lock_ioc.pv("Owner")) == ""
    assert net.caget(lock_ioc.pv("Token")) == "1"
    history = net.caget(lock_ioc.pv("History"))
    assert f"acquired {ALICE} session=alice-align token=1" in history
    assert f"released {ALICE} session=alice-align token=1" in history


def test_refused_put_fails_with_reason_and_changes_nothing(net, lock_ioc):
    assert net.caput(lock_ioc.pv("Acquire"), "scan1", user="alice").returncode == 0
    r = net.caput(lock_ioc.pv("Acquire"), "mine", user="bluesky")
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert f"refused: lock is held by {ALICE} (session scan1)" in out
    assert "New :" not in r.stdout
    assert net.caget(lock_ioc.pv("Owner")) == ALICE
    assert net.caget(lock_ioc.pv("Token")) == "1"
    assert "refused: lock is held by" in net.caget(lock_ioc.pv("Message"))

    r = net.caput(lock_ioc.pv("Release"), "scan1", user="bob")
    assert r.returncode != 0 and "do not hold the lock" in r.stderr
    r = net.caput(lock_ioc.pv("ForceRelease"), "please", user="alice")
    assert r.returncode != 0 and "only operators" in r.stderr
    assert net.caget(lock_ioc.pv("State")) == "Held"


def test_user_in_no_group_is_refused(net, lock_ioc):
    r = net.caput(lock_ioc.pv("Acquire"), "sneaky", user="mallory")
    assert r.returncode != 0
    assert f"{identity('mallory')} is in no access group" in r.stderr
    assert net.caget(lock_ioc.pv("State")) == "Free"


def test_same_holder_reacquire_renews_and_renew_extends(net, lock_ioc):
    assert net.caput(lock_ioc.pv("Acquire"), '{"session": "s", "lease": 30}',
                     user="alice").returncode == 0
    e1 = float(expiry(net, lock_ioc))
    time.sleep(1.1)
    assert net.caput(lock_ioc.pv("Acquire"), '{"session": "s", "lease": 30}',
                     user="alice").returncode == 0
    e2 = float(expiry(net, lock_ioc))
    assert e2 > e1 and net.caget(lock_ioc.pv("Token")) == "1"
    assert net.caput(lock_ioc.pv("Renew"), '{"session": "s", "lease": 300}',
                     user="alice").returncode == 0
    assert float(expiry(net, lock_ioc)) > e2 + 200
    r = net.caput(lock_ioc.pv("Renew"), "s", user="bob")
    assert r.returncode != 0 and "do not hold the lock" in r.stderr


def test_lease_over_max_is_refused_not_clamped(net, lock_ioc):
    r = net.caput(lock_ioc.pv("Acquire"), '{"session": "s", "lease": 3601}', user="alice")
    assert r.returncode != 0 and "over the maximum of 3600 s" in r.stderr
    assert net.caget(lock_ioc.pv("State")) == "Free"


def test_lease_expiry_frees_the_lock_within_half_a_second(net, lock_ioc):
    assert net.caput(lock_ioc.pv("Acquire"), '{"session": "short", "lease": 2}',
                     user="alice").returncode == 0
    end = float(expiry(net, lock_ioc))
    assert net.caget(lock_ioc.pv("Gate:queue")) == "0"
    wait_until(lambda: net.caget(lock_ioc.pv("State")) == "Free", 10, what="expiry")
    assert net.caget(lock_ioc.pv("Gate:queue")) == "1"
    assert net.caget(lock_ioc.pv("Owner")) == ""
    # The server stamps the "expired" event when it frees the lock.
    line = [ln for ln in net.caget(lock_ioc.pv("History")).split("\n") if " expired " in ln]
    assert line, net.caget(lock_ioc.pv("History"))
    assert "lease of" in net.caget(lock_ioc.pv("Message"))
    log = lock_ioc.log()
    stamp = [ln for ln in log.splitlines() if " expired " in ln][-1]
    # "2026-..,mmm lock-ioc <event line>": the log time is when the IOC freed it.
    t = time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:23]) / 1000
    assert 0 <= t - end < 0.5, (t, end)


def test_remaining_and_heartbeat_tick_every_second(net, lock_ioc):
    assert net.caput(lock_ioc.pv("Acquire"), "s", user="alice").returncode == 0
    mon = subprocess.Popen([tool("camonitor"), lock_ioc.pv("Remaining"),
                            lock_ioc.pv("Heartbeat")], env=net.client_env(),
                           stdout=subprocess.PIPE, text=True)
    time.sleep(3.5)
    mon.terminate()
    out = mon.communicate(timeout=10)[0].splitlines()
    assert sum("Remaining" in ln for ln in out) >= 3, out
    assert sum("Heartbeat" in ln for ln in out) >= 3, out


def test_operator_force_release_disable_enable(net, lock_ioc):
    assert net.caput(lock_ioc.pv("Acquire"), "scan", user="alice").returncode == 0
    r = net.caput(lock_ioc.pv("ForceRelease"), "beam dump, hutch search", user="operator")
    assert r.returncode == 0, r.stderr
    assert net.caget(lock_ioc.pv("State")) == "Free"
    hist = net.caget(lock_ioc.pv("History"))
    assert f"force-released {identity('operator')}" in hist and "beam dump" in hist
    assert f"holder={ALICE}" in hist

    assert net.caput(lock_ioc.pv("Disable"), "maintenance day", user="operator").returncode == 0
    assert net.caget(lock_ioc.pv("State")) == "Disabled"
    assert "maintenance day" in net.caget(lock_ioc.pv("DisabledReason"))
    assert [net.caget(lock_ioc.pv(f"Gate:{g}")) for g in ("queue", "staff", "operator")] == [
        "0", "0", "1"]
    r = net.caput(lock_ioc.pv("Acquire"), "scan", user="alice")
    assert r.returncode != 0 and "disabled" in r.stderr and "maintenance day" in r.stderr
    r = net.caput(lock_ioc.pv("Enable"), "", user="alice")
    assert r.returncode != 0 and "only operators" in r.stderr
    assert net.caput(lock_ioc.pv("Enable"), "done", user="operator").returncode == 0
    assert net.caget(lock_ioc.pv("State")) == "Free"
    assert net.caget(lock_ioc.pv("Gate:staff")) == "1"


def test_refusals_of_free_and_disabled_locks_read_plainly(net, lock_ioc):
    r = net.caput(lock_ioc.pv("Release"), "scan", user="alice")
    assert r.returncode != 0
    assert "Release: refused: the lock is not held (it is Free): nothing to release" \
        in r.stderr and "renew" not in r.stderr, r.stderr
    assert net.caput(lock_ioc.pv("Disable"), "maintenance", user="operator").returncode == 0
    r = net.caput(lock_ioc.pv("Disable"), "again", user="operator")
    assert r.returncode != 0
    assert "Disable: refused: the lock is already disabled (by " \
        f"{identity('operator')}: maintenance)" in r.stderr, r.stderr
    assert net.caget(lock_ioc.pv("DisabledReason")).endswith(": maintenance")


def test_two_users_race_fifty_times_exactly_one_winner(net, lock_ioc):
    acquire, release = lock_ioc.pv("Acquire"), lock_ioc.pv("Release")
    cmd = [tool("caput"), "-c", "-S", "-w", "5"]
    wins = {"alice": 0, "bob": 0}
    for i in range(50):
        session = f"race{i}"
        procs = {u: subprocess.Popen(["runuser", "-u", u, "--", *cmd, acquire, session],
                                     env=net.client_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
                 for u in ("alice", "bob")}
        results = {u: (p.wait(20), *p.communicate(timeout=20)) for u, p in procs.items()}
        winners = [u for u, (rc, _, _) in results.items() if rc == 0]
        assert len(winners) == 1, results
        winner = winners[0]
        loser = "bob" if winner == "alice" else "alice"
        rc, out, err = results[loser]
        assert f"held by {identity(winner)} (session {session})" in out + err, results[loser]
        assert net.caget(lock_ioc.pv("Owner")) == identity(winner)
        assert net.caget(lock_ioc.pv("Token")) == str(i + 1)
        wins[winner] += 1
        r = net.run("caput", "-c", "-S", release, session, user=winner)
        assert r.returncode == 0, r.stderr
    assert sum(wins.values()) == 50


@pytest.mark.parametrize("value,why", [
    ("{not json", "invalid JSON"),
    ('{"session": "s", "colour": "red"}', "unknown key"),
    ("", "session name is empty"),
    ("s" * 65, "session name too long"),
    ('{"session": "s", "lease": "long"}', "lease must be a number"),
    ('{"session": "s", "lease": -3}', "positive"),
    ('{"session": "s", "lease": 1e300}', "over the maximum"),
    ("\xff\xfe", "not valid UTF-8"),
    ("x" * 3000, "Invalid element count"),  # over 2048 bytes: libca refuses it itself
])
def test_bad_input_fails_clearly_and_changes_nothing(net, lock_ioc, value, why):
    beat = int(net.caget(lock_ioc.pv("Heartbeat")))
    arg = value.encode("latin-1") if value.startswith("\xff") else value
    r = subprocess.run(["runuser", "-u", "alice", "--", tool("caput"), "-c", "-S", "-w", "5",
                        lock_ioc.pv("Acquire"), arg], env=net.client_env(),
                       capture_output=True, timeout=20)
    out = (r.stdout + r.stderr).decode("utf-8", "replace")
    assert r.returncode != 0
    assert why in out, out
    assert "Traceback" not in lock_ioc.log()
    assert net.caget(lock_ioc.pv("State")) == "Free"
    assert net.caget(lock_ioc.pv("Token")) == "0"
    wait_until(lambda: int(net.caget(lock_ioc.pv("Heartbeat"))) > beat, 5, what="heartbeat")


def test_writes_to_read_only_pvs_are_denied(net, lock_ioc):
    for pv in ("State", "Owner", "Token", "Gate:staff", "History"):
        r = net.caput(lock_ioc.pv(pv), "1", user="operator")
        assert r.returncode != 0
        assert "Write access denied" in r.stderr + r.stdout, (pv, r.stderr)
    assert net.caget(lock_ioc.pv("State")) == "Free"


def test_kill9_keeps_lock_and_token_and_expiry_while_down_frees(net, tmp_path):
    ioc = LockIOC(net, tmp_path).start()
    try:
        assert net.caput(ioc.pv("Acquire"), '{"session": "long", "note": "survive"}',
                         user="alice").returncode == 0
        assert net.caput(ioc.pv("Release"), "long", user="alice").returncode == 0
        assert net.caput(ioc.pv("Acquire"), '{"session": "long", "lease": 600}',
                         user="alice").returncode == 0
        before = state(net, ioc)
        assert before["Token"] == "2"
        ioc.kill9()
        ioc.start()
        assert state(net, ioc) == before
        assert net.caget(ioc.pv("Gate:queue")) == "0"
        history = net.caget(ioc.pv("History"))
        assert history.count("acquired") == 2 and "released" in history

        # A lease that runs out while the IOC is down: Free with an "expired" event.
        assert net.caput(ioc.pv("Renew"), '{"session": "long", "lease": 1}',
                         user="alice").returncode == 0
        ioc.kill9()
        time.sleep(1.5)
        ioc.start()
        assert net.caget(ioc.pv("State")) == "Free"
        assert net.caget(ioc.pv("Token")) == "2"
        assert f"expired {ALICE} session=long token=2" in net.caget(ioc.pv("History"))
        # The token never goes backwards across restarts.
        assert net.caput(ioc.pv("Acquire"), "next", user="bob").returncode == 0
        assert net.caget(ioc.pv("Token")) == "3"
    finally:
        ioc.stop()


def test_kill9_at_any_moment_loses_no_confirmed_grant(net, tmp_path):
    """Hammer acquire/release, kill -9 mid-stream, restart: every confirmed grant stays."""
    ioc = LockIOC(net, tmp_path).start()
    try:
        for round_ in range(5):
            confirmed: list[tuple[str, int]] = []  # ("acquire"|"release", index)
            stop_at = 8 + 3 * round_
            for i in range(stop_at):
                session = f"r{round_}x{i}"
                if net.caput(ioc.pv("Acquire"), session, user="bob").returncode == 0:
                    confirmed.append(("acquire", i))
                if i == stop_at - 1:
                    # Kill while the next put is in flight.
                    proc = subprocess.Popen(
                        ["runuser", "-u", "bob", "--", tool("caput"), "-c", "-S",
                         ioc.pv("Release"), session], env=net.client_env(),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(0.01 * round_)
                    ioc.kill9()
                    rc = proc.wait(20)
                    if rc == 0:
                        confirmed.append(("release", i))
                    break
                if net.caput(ioc.pv("Release"), session, user="bob").returncode == 0:
                    confirmed.append(("release", i))
            ioc.start()
            token = int(net.caget(ioc.pv("Token")))
            grants = sum(1 for kind, _ in confirmed if kind == "acquire")
            assert token >= grants + 0, (token, confirmed)
            last_kind, last_i = confirmed[-1]
            st = net.caget(ioc.pv("State"))
            if last_kind == "release":
                assert st == "Free"
            else:
                # The in-flight release may or may not have committed before the kill.
                assert st in ("Held", "Free")
                if st == "Held":
                    assert net.caget(ioc.pv("Session")) == f"r{round_}x{last_i}"
            if st == "Held":
                assert net.caput(ioc.pv("Release"), net.caget(ioc.pv("Session")),
                                 user="bob").returncode == 0
    finally:
        ioc.stop()


def test_invalid_config_refuses_to_start_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prefix: 'X:'\ngroups:\n  staff: {users: [alice], hots: [a]}\n")
    r = subprocess.run([sys.executable, "-m", "lock_ioc", "--config", str(bad)],
                       capture_output=True, text=True, timeout=30, cwd=REPO)
    assert r.returncode == 2
    assert "groups.staff.hots: unknown key" in r.stderr
    assert "Traceback" not in r.stderr
    bad.write_text("lease: {default: 100, max: 50}\ngroups: {a: {users: [x]}}\n")
    r = subprocess.run([sys.executable, "-m", "lock_ioc", "--config", str(bad)],
                       capture_output=True, text=True, timeout=30, cwd=REPO)
    assert r.returncode == 2 and "lease.default" in r.stderr
    r = subprocess.run([sys.executable, "-m", "lock_ioc", "--config", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=30, cwd=REPO)
    assert r.returncode == 2 and "cannot read config" in r.stderr


def test_prefix_flag_overrides_config_and_list_pvs(net, tmp_path):
    ioc = LockIOC(net, tmp_path, prefix="CFG:")
    ioc.argv += ["--prefix", "OVR:", "--list-pvs"]
    ioc.prefix, ioc.ready_pv = "OVR:", "OVR:Heartbeat"
    ioc.start()
    try:
        assert net.caget("OVR:State") == "Free"
        assert "OVR:Gate:staff" in ioc.log()
        # Device IOCs must read the gates under OVR: too: the log says how.
        assert "serving under --prefix OVR:, not the config's prefix CFG:" in ioc.log()
        assert f"`lockctl acf --config {ioc.config} --prefix OVR:`" in ioc.log()
    finally:
        ioc.stop()


def test_python_clients_see_refusals(net, lock_ioc, monkeypatch):
    """pyepics and caproto's threading client against the same IOC."""
    for k, v in net.client_env().items():
        monkeypatch.setenv(k, v)
    code = f"""
import json, epics
from caproto.threading.client import Context
ctx = Context(client_name="alice")
acq, = ctx.get_pvs({lock_ioc.pv('Acquire')!r})
acq.write(b"py-alice", wait=True, timeout=5)
assert epics.caget({lock_ioc.pv('Owner')!r}, as_string=True).startswith("alice@"), "owner"
bob = Context(client_name="bob")
acq_b, = bob.get_pvs({lock_ioc.pv('Acquire')!r})
try:
    acq_b.write(b"py-bob", wait=True, timeout=3)
except Exception as exc:  # caproto's client ignores CA error replies: a timeout
    print("caproto refused:", type(exc).__name__)
print("after bob", epics.caget({lock_ioc.pv('Message')!r}, as_string=True))
epics.caput({lock_ioc.pv('Acquire')!r}, "py-root", wait=True)
print("owner", epics.caget({lock_ioc.pv('Owner')!r}, as_string=True))
print("message", epics.caget({lock_ioc.pv('Message')!r}, as_string=True))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, env=net.client_env())
    assert r.returncode == 0, r.stderr
    assert "caproto refused:" in r.stdout
    assert "after bob Acquire: refused: lock is held by alice@" in r.stdout
    assert "owner alice@" in r.stdout
    assert "message Acquire: refused: root@" in r.stdout and "is in no access group" in r.stdout
    assert "Traceback" not in lock_ioc.log()
