"""``lockctl`` end to end: a real subprocess against the real lock IOC, exit codes and output.

lockctl runs as this OS user (the venv is not readable by the other test users); other
identities act through ``caput`` as real OS users.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys


from epics_env import HOST, ME, REPO, TEST_CONFIG, identity

MYSELF = f"{ME}@{HOST}"
ALICE = identity("alice")


def lockctl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "beamline_lock.cli", *args]


def lockctl(net, ioc, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run lockctl with the prefix from $LOCK_PREFIX (as a beamline shell would set it)."""
    env = net.client_env()
    env["LOCK_PREFIX"] = ioc.prefix if ioc is not None else "NOWHERE:LOCK:"
    return subprocess.run(lockctl_cmd(*args), env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_acquire_renew_release_status_and_history(net, lock):
    r = lockctl(net, lock, "status")
    assert r.returncode == 0, r.stderr
    assert "state:     Free" in r.stdout

    r = lockctl(net, lock, "acquire", "beamtime", "--lease", "30", "--note", "Fe edge scan")
    assert r.returncode == 0, r.stderr
    assert "acquired: session beamtime, token 1" in r.stdout
    assert "lockctl release beamtime" in r.stdout       # the lease outlives lockctl
    assert net.caget(lock.pv("Owner")) == MYSELF        # ... and it did
    assert net.caget(lock.pv("Note")) == "Fe edge scan"

    r = lockctl(net, lock, "status")
    assert r.returncode == 0
    for text in ("state:     Held", f"owner:     {MYSELF}", "session:   beamtime",
                 "note:      Fe edge scan", "token:     1", "s left)"):
        assert text in r.stdout, r.stdout
    st = json.loads(lockctl(net, lock, "status", "--json").stdout)
    assert (st["state"], st["owner"], st["session"], st["token"]) == \
        ("Held", MYSELF, "beamtime", 1)
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
    assert f"acquired {MYSELF} session=beamtime token=1" in lines[-4]
    assert "renewed" in lines[-2] and "lease=600s" in lines[-2]
    assert "renewed" in lines[-3] and "lease=600s" in lines[-3]
    assert f"released {MYSELF} session=beamtime token=1" in lines[-1]


def test_refused_exits_1_with_reason_and_wait_gets_the_lock_when_free(net, lock):
    body = '{"session": "alignment", "lease": 3, "note": "mirror"}'
    assert net.caput(lock.pv("Acquire"), body, user="alice").returncode == 0
    r = lockctl(net, lock, "acquire", "mine")
    assert r.returncode == 1
    assert r.stdout == ""
    assert f"lockctl: Acquire: refused: lock is held by {ALICE} (session alignment, " \
           "note 'mirror')" in r.stderr
    assert "until" in r.stderr
    r = lockctl(net, lock, "release", "alignment")   # not ours
    assert r.returncode == 1 and "do not hold the lock" in r.stderr
    r = lockctl(net, lock, "acquire", "mine", "--wait", "30")  # alice's lease runs out
    assert r.returncode == 0, r.stderr
    assert net.caget(lock.pv("Owner")) == MYSELF


def test_operator_commands(net, lock):
    r = lockctl(net, lock, "disable", "vacuum work")
    assert r.returncode == 0, r.stderr
    assert f"disabled by {MYSELF}: vacuum work" in r.stdout
    r = lockctl(net, lock, "status")
    assert "state:     Disabled" in r.stdout and "vacuum work" in r.stdout
    r = lockctl(net, lock, "acquire", "s")
    assert r.returncode == 1 and "lock is disabled" in r.stderr
    r = lockctl(net, lock, "enable")
    assert r.returncode == 0, r.stderr
    assert net.caget(lock.pv("State")) == "Free"
    assert net.caput(lock.pv("Acquire"), "stuck", user="alice").returncode == 0
    r = lockctl(net, lock, "force-release", "user went home")
    assert r.returncode == 0, r.stderr
    assert f"took the lock from {ALICE}" in r.stdout
    assert net.caget(lock.pv("State")) == "Free"
    r = lockctl(net, lock, "enable", "again")
    assert r.returncode == 1 and "the lock is not disabled" in r.stderr


def test_non_operator_is_refused(net, lock_ioc):
    """The shared fixture's config does not admit this test process's user."""
    r = lockctl(net, lock_ioc, "force-release", "because")
    assert r.returncode == 1
    assert "ForceRelease: refused: only operators may do this" in r.stderr
    r = lockctl(net, lock_ioc, "acquire", "s")
    assert r.returncode == 1 and "is in no access group" in r.stderr


def test_unreachable_exits_3_and_usage_errors_exit_2(net, lock):
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


def test_watch_shows_changes_and_the_lease_countdown(net, lock):
    env = net.client_env()
    proc = subprocess.Popen(lockctl_cmd("--prefix", lock.prefix, "watch", "--count", "5",
                                        "--duration", "60"),
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
    r = lockctl(net, None, "watch", "--duration", "2", "--timeout", "1")
    assert r.returncode == 3, r.stderr  # it never saw the lock: unreachable, not "ok"
    assert "UNKNOWN  lock state unknown" in r.stdout


def test_acf_renders_the_access_security_file(net, tmp_path):
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


def test_acf_reads_the_gates_under_the_prefix_the_lock_is_served_under(net, tmp_path):
    """`lockctl acf` takes --prefix as lock-ioc does (it used to be ignored: every gated
    record read-only under a lock served with --prefix) and says when it differs."""
    config = tmp_path / "lock.yaml"
    config.write_text(TEST_CONFIG.format(prefix="BL:LOCK:", state=tmp_path / "s.sqlite3"))
    for args in (("acf", "--config", str(config), "--prefix", "XF:31ID:LOCK:"),
                 ("--prefix", "XF:31ID:LOCK:", "acf", "--config", str(config))):
        r = lockctl(net, None, *args)
        assert r.returncode == 0, r.stderr
        assert 'INPB("XF:31ID:LOCK:Gate:staff")' in r.stdout and "BL:LOCK:" in r.stdout
        assert '("BL:LOCK:Gate' not in r.stdout
        assert "the gates are read under --prefix XF:31ID:LOCK:, not under the config's " \
               f"prefix BL:LOCK:: serve the lock IOC with the same prefix (lock-ioc " \
               f"--config {config} --prefix XF:31ID:LOCK:)" in r.stderr
        # This shell's clients follow another lock ($LOCK_PREFIX): said too.
        assert "LOCK_PREFIX=NOWHERE:LOCK:" in r.stderr
    env = net.client_env()
    env["LOCK_PREFIX"] = "BL:LOCK:"
    r = subprocess.run(lockctl_cmd("acf", "--config", str(config)), env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr   # all agree: nothing to say
    assert 'INPB("BL:LOCK:Gate:staff")' in r.stdout
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
