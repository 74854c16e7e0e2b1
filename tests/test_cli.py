"""``lockctl`` end to end: a real subprocess against the real lock IOC, exit codes and output.

lockctl is the installed one (``$BEAMLINE_LOCK_PREFIX/venv/bin/lockctl``), run as real OS
users as at a beamline: alice and bob (staff), operator, mallory (in no group); other
identities act through ``caput`` as real OS users.
"""
from __future__ import annotations

import json
import subprocess

from demo.install import as_user
from epics_env import TEST_CONFIG, identity, installation

ALICE = identity("alice")
BOB = identity("bob")
OPERATOR = identity("operator")


def lockctl_cmd(*args: str, user: str) -> list[str]:
    return as_user(user, [str(installation().script("lockctl")), *args])


def lockctl(net, ioc, *args: str, user: str = "alice",
            timeout: float = 60) -> subprocess.CompletedProcess:
    """Run lockctl as ``user`` with the prefix from $LOCK_PREFIX (as a beamline shell
    would set it)."""
    env = net.client_env()
    env["LOCK_PREFIX"] = ioc.prefix if ioc is not None else "NOWHERE:LOCK:"
    return subprocess.run(lockctl_cmd(*args, user=user), env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_every_account_runs_the_installed_lockctl(net):
    """The install is usable by every account (issue 14 §2): a person and a service
    account run lockctl and the EPICS tools; none of it lives in a private home."""
    inst = installation()
    for user in ("alice", "mallory", "oaswww"):
        r = lockctl(net, None, "--help", user=user)
        assert r.returncode == 0 and "acquire" in r.stdout, (user, r.stderr)
        r = net.run("caget", "-h", user=user)
        assert "Usage: caget" in r.stdout + r.stderr, (user, r.stdout, r.stderr)
    for path in (inst.interpreter, inst.python, inst.script("lockctl"), inst.epics_bin()):
        assert not str(path.resolve()).startswith(("/root/", "/home/")), path


def test_acquire_renew_release_status_and_history(net, lock_ioc):
    lock = lock_ioc
    r = lockctl(net, lock, "status")
    assert r.returncode == 0, r.stderr
    assert "state:     Free" in r.stdout

    r = lockctl(net, lock, "acquire", "beamtime", "--lease", "30", "--note", "Fe edge scan")
    assert r.returncode == 0, r.stderr
    assert "acquired: session beamtime, token 1" in r.stdout
    assert "lockctl release beamtime" in r.stdout       # the lease outlives lockctl
    assert net.caget(lock.pv("Owner")) == ALICE         # ... and it did
    assert net.caget(lock.pv("Note")) == "Fe edge scan"

    r = lockctl(net, lock, "status")
    assert r.returncode == 0
    for text in ("state:     Held", f"owner:     {ALICE}", "session:   beamtime",
                 "note:      Fe edge scan", "token:     1", "s left)"):
        assert text in r.stdout, r.stdout
    st = json.loads(lockctl(net, lock, "status", "--json").stdout)
    assert (st["state"], st["owner"], st["session"], st["token"]) == \
        ("Held", ALICE, "beamtime", 1)
    assert 0 < st["remaining"] <= 30

    r = lockctl(net, lock, "renew", "beamtime", "--lease", "600")
    assert r.returncode == 0, r.stderr
    assert "renewed: session beamtime, token 1" in r.stdout
    assert 590 < json.loads(lockctl(net, lock, "status", "--json").stdout)["remaining"] <= 600
    r = lockctl(net, lock, "renew", "beamtime")          # keeps the lease length
    assert r.returncode == 0, r.stderr
    assert 590 < json.loads(lockctl(net, lock, "status", "--json").stdout)["remaining"] <= 600

    r = lockctl(net, lock, "release", "beamtime")
    assert r.returncode == 0, r.stderr
    assert net.caget(lock.pv("State")) == "Free"

    r = lockctl(net, lock, "release", "beamtime")
    assert r.returncode == 1
    assert "Release: refused: the lock is not held" in r.stderr

    r = lockctl(net, lock, "history")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert f"acquired {ALICE} session=beamtime token=1" in lines[-4]
    assert "renewed" in lines[-2] and "lease=600s" in lines[-2]
    assert "renewed" in lines[-3] and "lease=600s" in lines[-3]
    assert f"released {ALICE} session=beamtime token=1" in lines[-1]


def test_refused_exits_1_with_reason_and_wait_gets_the_lock_when_free(net, lock_ioc):
    lock = lock_ioc
    body = '{"session": "alignment", "lease": 3, "note": "mirror"}'
    assert net.caput(lock.pv("Acquire"), body, user="alice").returncode == 0
    r = lockctl(net, lock, "acquire", "mine", user="bob")
    assert r.returncode == 1
    assert r.stdout == ""
    assert f"lockctl: Acquire: refused: lock is held by {ALICE} (session alignment, " \
           "note 'mirror')" in r.stderr
    assert "until" in r.stderr
    r = lockctl(net, lock, "release", "alignment", user="bob")   # not bob's
    assert r.returncode == 1 and "do not hold the lock" in r.stderr
    r = lockctl(net, lock, "acquire", "mine", "--wait", "30", user="bob")  # alice's runs out
    assert r.returncode == 0, r.stderr
    assert net.caget(lock.pv("Owner")) == BOB


def test_operator_commands(net, lock_ioc):
    lock = lock_ioc
    r = lockctl(net, lock, "disable", "vacuum work", user="operator")
    assert r.returncode == 0, r.stderr
    assert f"disabled by {OPERATOR}: vacuum work" in r.stdout
    r = lockctl(net, lock, "status", user="bob")
    assert "state:     Disabled" in r.stdout and "vacuum work" in r.stdout
    r = lockctl(net, lock, "acquire", "s", user="bob")
    assert r.returncode == 1 and "lock is disabled" in r.stderr
    r = lockctl(net, lock, "enable", user="operator")
    assert r.returncode == 0, r.stderr
    assert net.caget(lock.pv("State")) == "Free"
    assert net.caput(lock.pv("Acquire"), "stuck", user="alice").returncode == 0
    r = lockctl(net, lock, "force-release", "user went home", user="operator")
    assert r.returncode == 0, r.stderr
    assert f"took the lock from {ALICE}" in r.stdout
    assert net.caget(lock.pv("State")) == "Free"
    r = lockctl(net, lock, "enable", "again", user="operator")
    assert r.returncode == 1 and "the lock is not disabled" in r.stderr


def test_non_operator_is_refused(net, lock_ioc):
    """alice is staff, not an operator; mallory is in no group."""
    r = lockctl(net, lock_ioc, "force-release", "because", user="alice")
    assert r.returncode == 1
    assert "ForceRelease: refused: only operators may do this" in r.stderr
    r = lockctl(net, lock_ioc, "acquire", "s", user="mallory")
    assert r.returncode == 1 and "is in no access group" in r.stderr


def test_unreachable_exits_3_and_usage_errors_exit_2(net, lock_ioc):
    lock = lock_ioc
    r = lockctl(net, None, "status", "--timeout", "1")
    assert r.returncode == 3
    assert "lockctl: lock IOC NOWHERE:LOCK: unreachable" in r.stderr
    assert "lock state unknown" in r.stderr
    r = lockctl(net, None, "acquire", "s", "--timeout", "1")
    assert r.returncode == 3
    for args, why in [(("acquire", "s", "--lease", "-1"), "positive number of seconds"),
                      (("acquire", "s", "--wait", "soon"), "expected a number of seconds"),
                      (("acquire",), "required: session"),
                      (("frobnicate",), "invalid choice"),
                      (("watch", "--count", "0"), "at least 1")]:
        r = lockctl(net, lock, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert why in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    r = lockctl(net, lock, "acquire", "two words")   # the IOC validates session names
    assert r.returncode == 1 and "invalid session name" in r.stderr


def test_watch_shows_changes_and_the_lease_countdown(net, lock_ioc):
    lock = lock_ioc
    env = net.client_env()
    proc = subprocess.Popen(lockctl_cmd("--prefix", lock.prefix, "watch", "--count", "5",
                                        "--duration", "60", user="bob"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert " Free " in first and "token=0" in first, first
        body = '{"session": "watched", "lease": 4, "note": "demo"}'
        assert net.caput(lock.pv("Acquire"), body, user="alice").returncode == 0
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 4, out
    held = [ln for ln in lines if f" Held     {ALICE} session=watched token=1 " in ln]
    assert len(held) >= 3, out
    assert all(ln.endswith("note='demo'") for ln in held)
    left = [int(ln.split(" s left")[0].rsplit(" ", 1)[1]) for ln in held]
    assert left == sorted(left, reverse=True) and len(set(left)) == len(left), out


def test_watch_unreachable_shows_state_unknown(net):
    r = lockctl(net, None, "watch", "--duration", "2", "--timeout", "1", user="mallory")
    assert r.returncode == 3, r.stderr  # it never saw the lock: unreachable, not "ok"
    assert "UNKNOWN  lock state unknown" in r.stdout


def test_acf_renders_the_access_security_file(net, public_tmp):
    tmp_path = public_tmp                      # alice reads the config files
    config = tmp_path / "lock.yaml"
    config.write_text(TEST_CONFIG.format(prefix="BL:LOCK:", state=tmp_path / "s.sqlite3"))
    r = lockctl(net, None, "acf", "--config", str(config))
    assert r.returncode == 0, r.stderr
    assert "ASG(GATED)" in r.stdout and "BL:LOCK:Gate:staff" in r.stdout
    r = lockctl(net, None, "acf", "--config", str(config), "--asg", "MOTORS")
    assert r.returncode == 0, r.stderr
    assert "ASG(MOTORS)" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups: {staff: {users: [alice], colour: blue}}\n")
    r = lockctl(net, None, "acf", "--config", str(bad))
    assert r.returncode == 2
    assert "groups.staff.colour: unknown key" in r.stderr and "Traceback" not in r.stderr
    r = lockctl(net, None, "acf", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "cannot read config" in r.stderr
