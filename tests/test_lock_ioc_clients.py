"""A CA client that stops reading hurts only itself (issue 13 §1).

The frozen client is EPICS base ``camonitor`` stopped with SIGSTOP while it watches what a
busy display watches; pyepics drives acquire/release cycles with long notes (16 kB History
updates, more than the kernel buffers of a stopped reader hold) and thousands of refused
puts; healthy ``camonitor``s, a fresh pyepics subscription and a device softIoc's access
security must not notice the frozen client.
"""
from __future__ import annotations

import signal

import pytest

from beamline_env import SoftIoc
from ca_clients import (DISPLAY_PVS, Camonitor, busy_config, drive, drive_until,
                        first_value_delay)
from epics_env import LockIOC, wait_until

STALLED = "is not reading"
DROPPED = "dropped CA client"


def lock_with(net, tmp_path, *args: str) -> LockIOC:
    ioc = LockIOC(net, tmp_path, config_text=busy_config("TST:LOCK:",
                                                         tmp_path / "lock-state.sqlite3"))
    ioc.argv += list(args)
    return ioc


@pytest.fixture
def busy_lock(net, tmp_path):
    """Lock IOC that keeps a stopped client connected for the whole test (bound 600 s)."""
    ioc = lock_with(net, tmp_path, "--client-stall-timeout", "600").start()
    yield ioc
    ioc.stop()


@pytest.fixture
def monitors():
    started: list[Camonitor] = []
    yield started
    for mon in started:
        mon.stop()


def frozen_display(net, ioc, tmp_path, monitors) -> Camonitor:
    """A camonitor on the display PVs, frozen once it has every first value."""
    mon = Camonitor(net, [ioc.pv(p) for p in DISPLAY_PVS], tmp_path / "frozen.out", "-S")
    monitors.append(mon)
    wait_until(lambda: all(mon.lines(ioc.pv(p)) for p in DISPLAY_PVS), 15,
               what="frozen client's first values")
    mon.freeze()
    return mon


def test_frozen_client_does_not_stop_updates_for_others(net, busy_lock, tmp_path, monitors):
    ioc = busy_lock
    frozen = frozen_display(net, ioc, tmp_path, monitors)
    healthy = Camonitor(net, [ioc.pv("State"), ioc.pv("Token")], tmp_path / "healthy.out")
    monitors.append(healthy)
    wait_until(lambda: healthy.values(ioc.pv("Token")) == ["0"], 15, what="healthy monitor")

    # 16 kB History updates until the frozen client's socket is full and the IOC holds
    # its backlog; then more, and 3000 refused puts.
    cycles = drive_until(net, ioc.prefix, lambda: STALLED in ioc.log())
    drive(net, ioc.prefix, cycles=50, refusals=3000)
    cycles += 50

    assert net.caput(ioc.pv("Acquire"), "probe", user="alice").returncode == 0
    final = str(cycles + 1)
    wait_until(lambda: healthy.values(ioc.pv("Token"))[-1:] == [final]
               and healthy.values(ioc.pv("State"))[-1:] == ["Held"], 15,
               what="healthy monitor shows the probe's grant")
    # A healthy client is never coalesced: it saw every grant and every state change.
    assert healthy.values(ioc.pv("Token")) == [str(t) for t in range(cycles + 2)]
    assert healthy.values(ioc.pv("State")) == ["Free"] + ["Held", "Free"] * cycles + ["Held"]

    # The bound: a new monitor gets its first value within 1 s (here it is a few
    # ms; 1 s is the requirement, not a timing of this machine).
    delay = first_value_delay(net, ioc.pv("State"))
    assert delay is not None and delay < 1.0, delay

    # The frozen client was connected throughout; thawed, its last values are the truth.
    assert STALLED in ioc.log(), "the frozen client never backed up: the test proves nothing"
    assert DROPPED not in ioc.log()
    frozen.thaw()
    wait_until(lambda: frozen.values(ioc.pv("Token"))[-1:] == [final]
               and frozen.values(ioc.pv("State"))[-1:] == ["Held"], 30,
               what="thawed client catches up with the latest values")
    assert "Traceback" not in ioc.log()


def test_client_stuck_beyond_the_bound_is_dropped_and_reconnects(net, tmp_path, monitors):
    ioc = lock_with(net, tmp_path, "--client-stall-timeout", "2").start()
    try:
        frozen = frozen_display(net, ioc, tmp_path, monitors)
        cycles = drive_until(net, ioc.prefix, lambda: STALLED in ioc.log())
        wait_until(lambda: DROPPED in ioc.log(), 30, 0.2, what="the stuck client dropped")
        line = [ln for ln in ioc.log().splitlines() if DROPPED in ln][0]
        assert "not read its updates for 2 s" in line, line
        # libca reconnects by itself once the client runs again, and shows the truth.
        frozen.thaw()
        assert net.caput(ioc.pv("Acquire"), "after", user="alice").returncode == 0
        final = str(cycles + 1)
        wait_until(lambda: frozen.values(ioc.pv("Token"))[-1:] == [final], 30,
                   what="reconnected client shows the new grant")
        assert "Traceback" not in ioc.log()
    finally:
        ioc.stop()


def test_backlogged_client_leaving_while_others_subscribe_is_no_crash(net, busy_lock,
                                                                       tmp_path, monitors):
    ioc = busy_lock
    frozen = frozen_display(net, ioc, tmp_path, monitors)
    cycles = drive_until(net, ioc.prefix, lambda: STALLED in ioc.log())
    drive(net, ioc.prefix, cycles=0, refusals=3000)
    # Another display subscribes to the same PVs (the same caproto subscription lists)
    # while the frozen one is backlogged; then the frozen one runs again and leaves.
    other = Camonitor(net, [ioc.pv(p) for p in DISPLAY_PVS], tmp_path / "other.out", "-S")
    monitors.append(other)
    wait_until(lambda: all(other.lines(ioc.pv(p)) for p in DISPLAY_PVS), 15,
               what="second display's first values")
    frozen.thaw()
    drive(net, ioc.prefix, cycles=2, refusals=10)
    frozen.proc.send_signal(signal.SIGKILL)
    frozen.proc.wait(10)
    drive(net, ioc.prefix, cycles=2, refusals=10)
    assert ioc.proc.poll() is None, ioc.log()[-3000:]
    delay = first_value_delay(net, ioc.pv("State"))
    assert delay is not None and delay < 1.0, delay
    final = str(cycles + 4)
    wait_until(lambda: other.values(ioc.pv("Token"))[-1:] == [final], 15,
               what="second display follows")
    assert "Traceback" not in ioc.log() and "RuntimeError" not in ioc.log()
    assert STALLED in ioc.log(), "the frozen client never backed up: the test proves nothing"


def test_device_gate_follows_the_lock_while_a_frozen_client_is_connected(net, busy_lock,
                                                                         tmp_path,
                                                                         monitors):
    ioc = busy_lock
    beamline = SoftIoc(net, tmp_path, ioc.config).start()
    try:
        def bluesky_can_write() -> bool:
            r = net.caput(beamline.pv("Shutter:Open"), "1", user="bluesky", text=False)
            assert r.returncode == 0 or "Write access denied" in r.stderr, r.stderr
            return r.returncode == 0

        wait_until(bluesky_can_write, 15, what="queue gate connected")
        frozen_display(net, ioc, tmp_path, monitors)
        drive_until(net, ioc.prefix, lambda: STALLED in ioc.log())
        drive(net, ioc.prefix, cycles=0, refusals=3000)
        assert net.caput(ioc.pv("Acquire"), "align", user="alice").returncode == 0
        wait_until(lambda: not bluesky_can_write(), 15, 0.1, what="queue gate closed")
        assert net.caput(ioc.pv("Release"), "align", user="alice").returncode == 0
        wait_until(bluesky_can_write, 15, 0.1, what="queue gate open again")
        assert STALLED in ioc.log(), "the frozen client never backed up: the test proves nothing"
        assert DROPPED not in ioc.log()
    finally:
        beamline.stop()
