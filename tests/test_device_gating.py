"""Device IOCs obey the lock through real EPICS access security.

Real lock IOC + real EPICS base softIoc (db/, ACF from `render_acf`) + real `caput`/`cainfo`
run as real OS users: bob and alice are both in group staff, bluesky in queue, operator in
operator, mallory in no group. Gated records are exclusive to the holder (issue 18): while
alice holds the lock, bob (staff, like alice) is refused too, unless the config marks
staff as shared.
"""
from __future__ import annotations

import subprocess
import sys

from beamline_env import SoftIoc
from epics_env import REPO, TEST_CONFIG, LockIOC, Server, wait_until

SHUTTER = "Shutter:Open"


def can_write(net, beamline, user: str, pv: str = SHUTTER, value: str = "1") -> bool:
    r = net.caput(beamline.pv(pv), value, user=user, text=False)
    if r.returncode != 0:
        assert "Write access denied" in r.stderr, r.stderr
    return r.returncode == 0


def access(net, beamline, user: str, pv: str = SHUTTER) -> str:
    out = net.run("cainfo", beamline.pv(pv), user=user, check=True).stdout
    return [ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Access:" in ln][0]


def test_lock_free_group_members_write_others_refused(net, lock_ioc, beamline):
    wait_until(lambda: can_write(net, beamline, "alice"), 15, what="gates connected")
    for user in ("bob", "bluesky", "operator"):
        assert can_write(net, beamline, user), user
    assert not can_write(net, beamline, "mallory")
    assert access(net, beamline, "mallory") == "read, no write"
    # Readbacks are read-only for everyone; ungated records are unaffected by the lock.
    assert not can_write(net, beamline, "alice", "Shutter:Status", "0")
    assert not can_write(net, beamline, "alice", "RingCurrent", "1")


def test_only_the_holder_writes_not_the_rest_of_its_group(net, lock_ioc, beamline):
    """Two staff members: alice holds, bob's caput is refused by the device IOC (it used
    to be accepted: the gate was per group); his stop is not."""
    wait_until(lambda: can_write(net, beamline, "bob"), 15, what="gates connected")
    assert net.caput(lock_ioc.pv("Acquire"), "align", user="alice").returncode == 0
    wait_until(lambda: not can_write(net, beamline, "bob"), 5, what="bob refused")
    assert can_write(net, beamline, "alice")
    assert can_write(net, beamline, "alice", "m1", "1.5")
    for user in ("bob", "bluesky", "operator"):
        r = net.caput(beamline.pv("m1"), "3", user=user, text=False)
        assert r.returncode != 0 and "Write access denied" in r.stderr, (user, r.stderr)
        assert access(net, beamline, user) == "read, no write", user
    assert access(net, beamline, "alice") == "read, write"
    # Stopping and making safe stay open to every group member whatever the lock says.
    assert access(net, beamline, "bob", "m1:STOP") == "read, write"
    assert can_write(net, beamline, "bob", "Shutter:Close", "1")
    wait_until(lambda: net.caget(beamline.pv("m1:RBV")) == "1.5", 15, what="m1 at 1.5")


def test_a_shared_group_writes_while_a_member_holds(net, tmp_path):
    config = TEST_CONFIG.replace("users: [alice, bob],", "users: [alice, bob], shared: true,")
    assert "shared: true" in config
    lock = LockIOC(net, tmp_path, config_text=config.format(
        prefix="TST:LOCK:", state=tmp_path / "s.sqlite3")).start()
    beamline = SoftIoc(net, tmp_path, lock.config)
    try:
        beamline.start()
        assert 'INPC("TST:LOCK:Gate:staff")' in beamline.acf.read_text()
        wait_until(lambda: can_write(net, beamline, "bob"), 15, what="gates connected")
        assert net.caput(lock.pv("Acquire"), "align", user="alice").returncode == 0
        wait_until(lambda: not can_write(net, beamline, "bluesky"), 5,
                   what="queue refused")
        assert can_write(net, beamline, "alice") and can_write(net, beamline, "bob")
        assert not can_write(net, beamline, "operator")
        # bluesky (queue, not shared) holds: only bluesky.
        assert net.caput(lock.pv("Release"), "align", user="alice").returncode == 0
        assert net.caput(lock.pv("Acquire"), "queue", user="bluesky").returncode == 0
        wait_until(lambda: not can_write(net, beamline, "bob"), 5, what="staff refused")
        assert can_write(net, beamline, "bluesky") and not can_write(net, beamline, "alice")
    finally:
        beamline.stop()
        lock.stop()


def test_an_acf_made_from_another_user_list_admits_no_holder(net, tmp_path, lock_ioc):
    """The ACF compares HolderIndex only together with UserMap: an ACF generated before
    the config's users changed (here: bob listed first) never lets the wrong person write
    while the lock is held; a Free lock still opens to every group."""
    from beamline_lock.acf import render_acf
    from lock_ioc.config import load
    stale = lock_ioc.config.read_text().replace("users: [alice, bob]", "users: [bob, alice]")
    other = tmp_path / "other.yaml"
    other.write_text(stale)
    beamline = SoftIoc(net, tmp_path, lock_ioc.config, acf=render_acf(load(other)))
    try:
        beamline.start()
        wait_until(lambda: can_write(net, beamline, "bob"), 15, what="gates connected")
        assert can_write(net, beamline, "alice")
        assert net.caput(lock_ioc.pv("Acquire"), "align", user="alice").returncode == 0
        wait_until(lambda: not can_write(net, beamline, "alice"), 5, what="closed for all")
        for user in ("bob", "bluesky", "operator"):
            assert not can_write(net, beamline, user), user
    finally:
        beamline.stop()


def test_release_restores_every_group_without_reconnecting(net, lock_ioc, beamline):
    wait_until(lambda: can_write(net, beamline, "alice"), 15, what="gates connected")
    assert net.caput(lock_ioc.pv("Acquire"), "align", user="alice").returncode == 0
    wait_until(lambda: not can_write(net, beamline, "bluesky"), 5, what="queue gate closed")
    assert net.caput(lock_ioc.pv("Release"), "align", user="alice").returncode == 0
    # The softIoc is not restarted; its ACF inputs follow the gate monitors.
    wait_until(lambda: can_write(net, beamline, "bluesky"), 5, 0.1, what="queue gate open")
    assert can_write(net, beamline, "operator")


def test_disabled_lock_lets_only_operators_write(net, lock_ioc, beamline):
    wait_until(lambda: can_write(net, beamline, "alice"), 15, what="gates connected")
    assert net.caput(lock_ioc.pv("Disable"), "hutch search", user="operator").returncode == 0
    wait_until(lambda: not can_write(net, beamline, "alice"), 5, what="staff gate closed")
    assert not can_write(net, beamline, "bluesky")
    assert can_write(net, beamline, "operator")
    assert net.caget(lock_ioc.pv("HolderIndex")) == "-1"


def test_lock_ioc_down_fails_safe_and_recovers(net, tmp_path, lock_ioc, beamline):
    wait_until(lambda: can_write(net, beamline, "alice"), 15, what="gates connected")
    lock_ioc.kill9()
    wait_until(lambda: not can_write(net, beamline, "alice"), 30, 0.2, what="fail safe")
    for user in ("bob", "bluesky", "operator", "mallory"):
        assert not can_write(net, beamline, user), user
    assert access(net, beamline, "alice") == "read, no write"
    # Same port, same state file: the device IOC reconnects by itself.
    restarted = LockIOC(net, lock_ioc.workdir, port=lock_ioc.port).start()
    try:
        wait_until(lambda: can_write(net, beamline, "alice"), 60, 0.5, what="writes restored")
        assert can_write(net, beamline, "bluesky")
    finally:
        restarted.stop()


def test_lock_ioc_down_while_held_closes_even_the_holder(net, lock_ioc, beamline):
    """Exclusive ACF, lock IOC gone while alice holds: closed for everyone, alice too
    (HolderIndex and UserMap invalid); stopping still works. Restarted, the durable grant
    is alice's again: she writes, bob does not."""
    wait_until(lambda: can_write(net, beamline, "bob"), 15, what="gates connected")
    assert net.caput(lock_ioc.pv("Acquire"), '{"session": "align", "lease": 600}',
                     user="alice").returncode == 0
    wait_until(lambda: not can_write(net, beamline, "bob"), 5, what="bob refused")
    lock_ioc.kill9()
    wait_until(lambda: not can_write(net, beamline, "alice"), 30, 0.2, what="closed for all")
    for user in ("bob", "bluesky", "operator"):
        assert not can_write(net, beamline, user), user
    assert net.caput(beamline.pv("m1:STOP"), "1", user="bob", text=False).returncode == 0
    restarted = LockIOC(net, lock_ioc.workdir, port=lock_ioc.port).start()
    try:
        wait_until(lambda: can_write(net, beamline, "alice"), 60, 0.5, what="alice again")
        assert not can_write(net, beamline, "bob")
    finally:
        restarted.stop()


def test_lock_served_under_another_prefix_and_its_acf_agree(net, tmp_path):
    """`lock-ioc --config C --prefix P` and `lockctl acf --config C --prefix P` name the
    same gates (the ACF used to read the config's prefix: every gated record read-only);
    the IOC says in its log that device IOCs need an ACF for P."""
    config = tmp_path / "lock.yaml"
    config.write_text(TEST_CONFIG.format(prefix="TST:LOCK:", state=tmp_path / "s.sqlite3"))
    prefix = "XF:31ID:LOCK:"
    lock = Server(net, [sys.executable, "-m", "lock_ioc", "--config", str(config),
                        "--prefix", prefix], log=tmp_path / "lock-ioc.log",
                  ready_pv=prefix + "Heartbeat", cwd=REPO)
    acf = subprocess.run([sys.executable, "-m", "beamline_lock.cli", "acf", "--config",
                          str(config), "--prefix", prefix], env=net.client_env(),
                         capture_output=True, text=True, timeout=60)
    assert acf.returncode == 0, acf.stderr
    assert f"lock-ioc --config {config} --prefix {prefix}" in acf.stderr
    lock.start()
    beamline = SoftIoc(net, tmp_path, config, acf=acf.stdout)
    try:
        beamline.start()
        wait_until(lambda: can_write(net, beamline, "alice"), 15, what="gates connected")
        assert net.caput(prefix + "Acquire", "align", user="alice").returncode == 0
        wait_until(lambda: not can_write(net, beamline, "bob"), 5, what="bob refused")
        assert can_write(net, beamline, "alice")
    finally:
        beamline.stop()
        lock.stop()
    assert f"serving under --prefix {prefix}, not the config's prefix TST:LOCK:" in lock.log()
    assert f"lockctl acf --config {config} --prefix {prefix}" in lock.log()
