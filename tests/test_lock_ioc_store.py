"""The lock IOC with its state file on a full disk (issue 13 §3, §4).

A real, small tmpfs (mounted as root, as CI runs the tests) holds the state file and is
filled up with a file; deleting that file makes the store writable again.
"""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from epics_env import TEST_CONFIG, LockIOC, identity, wait_until
from test_lock_ioc import alarms

GATES = ("Gate:queue", "Gate:staff", "Gate:operator")
NOT_DURABLE = "WRITE INVALID"


@pytest.fixture
def disk(tmp_path):
    """A 2 MB tmpfs for the state file; unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mnt)],
                   check=True)
    yield mnt
    subprocess.run(["umount", "--lazy", str(mnt)], check=True)


def fill(mnt: Path) -> Path:
    """Fill the file system up to the last page (tmpfs allocates whole pages)."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def lock_on_disk(net, tmp_path, disk):
    ioc = LockIOC(net, tmp_path, config_text=TEST_CONFIG.format(
        prefix="TST:LOCK:", state=disk / "lock-state.sqlite3"))
    ioc.start()
    yield ioc
    ioc.stop()


def test_full_disk_refuses_a_command_saying_so_and_changes_nothing(net, lock_on_disk, disk):
    ioc = lock_on_disk
    filler = fill(disk)
    r = net.caput(ioc.pv("Acquire"), "align", user="alice")
    assert r.returncode != 0
    assert "Acquire: refused: the lock's store cannot be written" in r.stderr, r.stderr
    assert "nothing changed" in r.stderr
    # (caget -S prints the apostrophe escaped)
    assert "store cannot be written" in net.caget(ioc.pv("Message"))
    assert net.caget(ioc.pv("State")) == "Free" and net.caget(ioc.pv("Token")) == "0"
    # Nothing was in doubt: the stored state is what the PVs show.
    assert set(alarms(net, ioc, "State", *GATES).values()) == {""}
    filler.unlink()
    assert net.caput(ioc.pv("Acquire"), "align", user="alice").returncode == 0
    assert net.caget(ioc.pv("Token")) == "1"
    assert "Traceback" not in ioc.log()


def test_lease_ending_on_a_full_disk_keeps_serving_fails_closed_and_settles(net, tmp_path,
                                                                          lock_on_disk,
                                                                          disk):
    ioc = lock_on_disk
    assert net.caput(ioc.pv("Acquire"), '{"session": "scan", "lease": 2}',
                     user="alice").returncode == 0
    filler = fill(disk)
    # The lease ends; the store cannot record it: the IOC serves on and says so.
    wait_until(lambda: alarms(net, ioc, "State")["State"] == NOT_DURABLE, 15,
               what="State flagged as not durable")
    assert ioc.proc.poll() is None
    assert net.caget(ioc.pv("State")) == "Free"
    assert set(alarms(net, ioc, "State", "Owner", "Token", *GATES).values()) == {NOT_DURABLE}
    assert [net.caget(ioc.pv(g)) for g in GATES] == ["0", "0", "0"]  # fail closed
    message = net.caget(ioc.pv("Message"))
    assert "expired" in message and "store cannot be written" in message, message
    r = net.caput(ioc.pv("Acquire"), "next", user="bob")
    assert r.returncode != 0 and "the lock's store cannot be written" in r.stderr
    beat = int(net.caget(ioc.pv("Heartbeat")))
    wait_until(lambda: int(net.caget(ioc.pv("Heartbeat"))) > beat, 5, what="heartbeat")

    # Room again: the expiry is recorded, the alarm clears, the gates open.
    filler.unlink()
    wait_until(lambda: alarms(net, ioc, "State")["State"] == "", 15, what="expiry recorded")
    assert [net.caget(ioc.pv(g)) for g in GATES] == ["1", "1", "1"]
    assert f"expired {identity('alice')} session=scan token=1" in net.caget(ioc.pv("History"))
    assert "Traceback" not in ioc.log()
    ioc.kill9()
    ioc.start()
    assert (net.caget(ioc.pv("State")), net.caget(ioc.pv("Token"))) == ("Free", "1")
    assert net.caget(ioc.pv("History")).count(" expired ") == 1
