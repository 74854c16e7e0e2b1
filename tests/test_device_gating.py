"""Device IOCs obey the lock through real EPICS access security.

Real lock IOC + real EPICS base softIoc (db/, ACF from `render_acf`) + real `caput`/`cainfo`
run as real OS users: bob and alice are both in group staff, bluesky in queue, operator in
operator, mallory in no group.
"""
from __future__ import annotations

from epics_env import LockIOC, wait_until

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


def test_holder_group_writes_other_groups_refused(net, lock_ioc, beamline):
    wait_until(lambda: can_write(net, beamline, "alice"), 15, what="gates connected")
    assert net.caput(lock_ioc.pv("Acquire"), "align", user="alice").returncode == 0
    # The gate is per group: bob (staff, like alice) may write too.
    wait_until(lambda: not can_write(net, beamline, "bluesky"), 5, what="queue gate closed")
    assert can_write(net, beamline, "alice")
    assert can_write(net, beamline, "bob")
    assert can_write(net, beamline, "alice", "m1", "1.5")
    r = net.caput(beamline.pv("m1"), "3", user="bluesky", text=False)
    assert r.returncode != 0 and "Write access denied" in r.stderr
    assert access(net, beamline, "bluesky") == "read, no write"
    assert access(net, beamline, "alice") == "read, write"
    assert not can_write(net, beamline, "operator")
    wait_until(lambda: net.caget(beamline.pv("m1:RBV")) == "1.5", 15, what="m1 at 1.5")


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
