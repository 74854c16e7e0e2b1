"""``lockctl`` end to end: a real subprocess against the real lock IOC, exit codes and output.

lockctl is the installed one (``$BEAMLINE_LOCK_PREFIX/venv/bin/lockctl``), run as real OS
users as at a beamline: alice and bob (staff), operator, mallory (in no group); other
identities act through ``caput`` as real OS users.
"""
from __future__ import annotations

import json
import re
import subprocess

from demo.install import as_user
from epics_env import REPO, TEST_CONFIG, identity, installation

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
    assert "ASG(GATED)" in r.stdout and 'INPA("BL:LOCK:HolderIndex")' in r.stdout
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


def test_acf_reads_the_gates_under_the_prefix_the_lock_is_served_under(net, public_tmp):
    """`lockctl acf` takes --prefix as lock-ioc does (it used to be ignored: every gated
    record read-only under a lock served with --prefix) and says when it differs."""
    tmp_path = public_tmp                      # alice reads the config file
    config = tmp_path / "lock.yaml"
    config.write_text(TEST_CONFIG.format(prefix="BL:LOCK:", state=tmp_path / "s.sqlite3"))
    for args in (("acf", "--config", str(config), "--prefix", "XF:31ID:LOCK:"),
                 ("--prefix", "XF:31ID:LOCK:", "acf", "--config", str(config))):
        r = lockctl(net, None, *args)
        assert r.returncode == 0, r.stderr
        assert 'INPA("XF:31ID:LOCK:HolderIndex")' in r.stdout and "BL:LOCK:" in r.stdout
        assert '("BL:LOCK:' not in r.stdout
        assert "the gates are read under --prefix XF:31ID:LOCK:, not under the config's " \
               f"prefix BL:LOCK:: serve the lock IOC with the same prefix (lock-ioc " \
               f"--config {config} --prefix XF:31ID:LOCK:)" in r.stderr
        # This shell's clients follow another lock ($LOCK_PREFIX): said too.
        assert "LOCK_PREFIX=NOWHERE:LOCK:" in r.stderr
    env = net.client_env()
    env["LOCK_PREFIX"] = "BL:LOCK:"
    r = subprocess.run(lockctl_cmd("acf", "--config", str(config), user="alice"), env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr   # all agree: nothing to say
    assert 'INPA("BL:LOCK:HolderIndex")' in r.stdout
    r = lockctl(net, None, "acf", "--config", str(config), "--prefix", "bad prefix")
    assert r.returncode == 2 and "invalid lock prefix 'bad prefix'" in r.stderr
    r = lockctl(net, None, "acf", "--safe-asg", "GATED")
    assert r.returncode == 2 and "the gated and the safe ASG must differ" in r.stderr


def test_status_does_not_show_another_users_refusal_as_yours(net, lock):
    body = '{"session": "align", "lease": 600, "note": "mirror"}'
    assert net.caput(lock.pv("Acquire"), body, user="alice").returncode == 0
    assert net.caput(lock.pv("Acquire"), "mine", user="bob").returncode != 0
    assert "refused" in net.caget(lock.pv("Message"))      # bob's refusal, for everyone
    r = lockctl(net, lock, "status")
    assert r.returncode == 0, r.stderr
    assert "refused" not in r.stdout and "message:" not in r.stdout, r.stdout
    last = r.stdout.splitlines()[-1]
    assert last.startswith("last event: ") and f" acquired {ALICE} session=align " in last


def test_history_is_read_with_lockctl_as_the_readme_says(net, lock):
    """caget -S prints $(P)History on one line with literal \\n; lockctl history prints one
    event per line. The README's walk-through reads it with lockctl and says which form is
    for scripts."""
    assert net.caput(lock.pv("Acquire"), "one", user="alice").returncode == 0
    assert net.caput(lock.pv("Release"), "one", user="alice").returncode == 0
    raw = net.caget(lock.pv("History"))
    assert len(raw.splitlines()) == 1 and "\\n" in raw
    lines = lockctl(net, lock, "history").stdout.splitlines()
    assert len(lines) == 2 and "acquired" in lines[0] and "released" in lines[1], lines
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    walk = readme.split("## A walk-through", 1)[1].split("\n## ", 1)[0]
    assert "lockctl history " in walk and "the form for scripts" in walk
    assert not re.search(r"^caget -S BL:LOCK:History", walk, re.MULTILINE), \
        "the walk-through reads History with caget -S (one line of \\n escapes)"


# ---- requests and hand-over (issue 18) --------------------------------------------------
def test_request_waiters_handover_and_history_by_token(net, lock_ioc):
    """alice holds; bob asks with lockctl and is told his place; everyone sees the line;
    alice hands over with lockctl; the grant is traced by its token."""
    lock = lock_ioc
    assert lockctl(net, lock, "acquire", "align", "--note", "DCM").returncode == 0
    r = lockctl(net, lock, "request", "edge", "--note", "Fe edge", "--lease", "300",
                user="bob")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"waiting: place 1 of 1; held by {ALICE} (session align), "
                               "who was told. The request lapses at "), r.stdout
    assert "run 'lockctl request edge' again" in r.stdout
    for user in ("alice", "mallory"):                  # everyone sees the line
        r = lockctl(net, lock, "waiters", user=user)
        assert r.returncode == 0, r.stderr
        assert re.match(rf"1\. {BOB} session=edge staff \(authority 20\), waiting \d+ s, "
                        r"takes it when released, request lapses in \d+ s, note 'Fe edge'$",
                        r.stdout.strip()), r.stdout
    (w,) = json.loads(lockctl(net, lock, "waiters", "--json").stdout)
    assert (w["who"], w["session"], w["lease"]) == (BOB, "edge", 300)
    st = lockctl(net, lock, "status").stdout
    assert f"waiting:   1 ({BOB} (" in st, st

    r = lockctl(net, lock, "handover", "edge", user="alice")
    assert r.returncode == 1 and "do not hold the lock" in r.stderr   # not her session
    r = lockctl(net, lock, "handover", "align", "--to", "mallory")
    assert r.returncode == 1 and "mallory is not waiting for the lock" in r.stderr
    r = lockctl(net, lock, "handover", "align", "--to", "bob")
    assert r.returncode == 0, r.stderr
    assert f"handed over: the lock is now held by {BOB} (session edge, note 'Fe edge'), " \
           "token 2" in r.stdout
    assert lockctl(net, lock, "waiters").stdout.strip() == "nobody is waiting for the lock"

    r = lockctl(net, lock, "history", "--token", "2", user="mallory")
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    assert f" acquired {BOB} session=edge token=2 " in line and "handed over by" in line
    one = lockctl(net, lock, "history", "--token", "1").stdout.splitlines()
    assert [ln.split()[1] for ln in one] == ["acquired", "requested", "handed-over"], one
    r = lockctl(net, lock, "history", "--token", "9")
    assert r.returncode == 1 and "no event of token 9" in r.stderr
    r = lockctl(net, lock, "history", "--token", "x")
    assert r.returncode == 2 and "expected a token number" in r.stderr


def test_request_wait_withdraw_requeue_and_refusals(net, lock_ioc):
    lock = lock_ioc
    r = lockctl(net, lock, "request", "free")          # Free: granted at once
    assert r.returncode == 0 and r.stdout.startswith("granted: session free, token 1"), r.stdout
    r = lockctl(net, lock, "request", "again")
    assert r.returncode == 1 and f"you ({ALICE}) hold the lock" in r.stderr
    r = lockctl(net, lock, "request", "m", user="mallory")
    assert r.returncode == 1 and "is in no access group" in r.stderr
    r = lockctl(net, lock, "handover", "free")
    assert r.returncode == 1 and "nobody is waiting for the lock" in r.stderr
    # --wait: bob is not granted within 2 s: his request is withdrawn, exit 1.
    r = lockctl(net, lock, "request", "edge", "--wait", "2", user="bob")
    assert r.returncode == 1 and "not granted within 2 s (request withdrawn)" in r.stderr
    assert net.caget(lock.pv("WaiterCount")) == "0"
    r = lockctl(net, lock, "withdraw", "edge", user="bob")
    assert r.returncode == 1 and "have no request waiting" in r.stderr
    # --wait while alice hands over (with requeue): bob's lockctl gets the lock.
    proc = subprocess.Popen(lockctl_cmd("--prefix", lock.prefix, "request", "edge", "--wait",
                                        "60", "--lease", "30", user="bob"),
                            env=net.client_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        from epics_env import wait_until
        wait_until(lambda: net.caget(lock.pv("WaiterCount")) == "1", 30, what="bob waits")
        r = lockctl(net, lock, "handover", "free", "--requeue")
        assert r.returncode == 0, r.stderr
        assert "you wait in line again" in r.stdout
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert out.startswith("granted: session edge, token 2"), out
    (w,) = json.loads(lockctl(net, lock, "waiters", "--json").stdout)
    assert (w["who"], w["session"]) == (ALICE, "free")
    assert lockctl(net, lock, "withdraw", "free").returncode == 0
    assert net.caget(lock.pv("WaiterCount")) == "0"


def test_watch_shows_who_waits(net, lock_ioc):
    lock = lock_ioc
    assert net.caput(lock.pv("Acquire"), '{"session": "align", "lease": 600}',
                     user="alice").returncode == 0
    proc = subprocess.Popen(lockctl_cmd("--prefix", lock.prefix, "watch", "--duration", "60",
                                        user="alice"),
                            env=net.client_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert f" Held     {ALICE} session=align " in first and "waiting" not in first
        assert net.caput(lock.pv("Request"), "edge", user="bob").returncode == 0
        while True:
            line = proc.stdout.readline()
            assert line, "watch ended"
            if "waiting" in line:
                break
    finally:
        proc.kill()
        proc.wait()
    assert line.rstrip().endswith(f"| waiting: {BOB} (0 s)") or \
        re.search(rf"\| waiting: {BOB} \(\d+ s\)$", line.rstrip()), line
