"""The PyDM screens, headless (QT_QPA_PLATFORM=offscreen), against a live lock IOC and the
simulated beamline's softIoc, driven through Qt like a person would.

The screen runs as the OS user operator (its CA identity ``operator@host``, an operator
member in the ``lock`` fixture's config) on the installation every account runs; the
installed ``lockctl`` runs as operator too. alice acts through the real ``caput`` run as
the OS user alice; that is where the screen is shown to display another user's identity.
"""
from __future__ import annotations

import re
import subprocess

import pytest

from demo.install import as_user
from epics_env import LockIOC, admitting_me, identity, installation, wait_until
from screens_env import PyDMScreen

#: The screen's OS user and CA identity.
VIEWER = "operator"
MYSELF = identity(VIEWER)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def lock_screen(net, lock, tmp_path):
    screen = PyDMScreen(net, "lock", {"P": lock.prefix}, tmp_path / "pydm-lock.log")
    yield screen
    screen.close()


def lockctl(net, lock, *args: str) -> subprocess.CompletedProcess:
    env = net.client_env()
    env["LOCK_PREFIX"] = lock.prefix
    return subprocess.run(as_user(VIEWER, [str(installation().script("lockctl")), *args]),
                          env=env, capture_output=True, text=True, timeout=60)


def history(net, lock) -> list[str]:
    """``$(P)History`` as read by the real ``caget -S``, one event per item (newest last).

    caget prints a newline as ``\\n`` and a quote as ``\\'``; the tests' events are ASCII.
    """
    return net.caget(lock.pv("History")).encode().decode("unicode_escape").splitlines()


def shows(screen: PyDMScreen, widget: str, text: str, timeout: float = 20) -> str:
    return wait_until(lambda: screen.text(widget) == text, timeout, 0.1,
                      what=f"{widget} to show {text!r}")


def test_lockctl_acquire_as_this_user_shows_its_identity_and_release_button_frees(
        net, lock, lock_screen, tmp_path):
    """lockctl runs as the screen's OS user (operator), so the owner shown is that
    identity, the same as the screen's own. The session
    (``beamtime``) is not the one in the screen's empty Session field, so Release asks."""
    shows(lock_screen, "state", "Free")
    assert lock_screen.prop("state", "lockState") == "Free"
    assert lock_screen.text("you") == f"you: {MYSELF}"

    r = lockctl(net, lock, "acquire", "beamtime", "--lease", "300", "--note", "Fe edge scan")
    assert r.returncode == 0, r.stderr
    shows(lock_screen, "owner", MYSELF)          # the identity of whoever ran lockctl
    shows(lock_screen, "state", "Held")
    wait_until(lambda: lock_screen.prop("state", "lockState") == "Held", 10, 0.1)
    assert lock_screen.text("session") == "beamtime"
    assert lock_screen.text("note") == "Fe edge scan"
    assert lock_screen.text("token") == "1"
    wait_until(lambda: lock_screen.text("remaining").endswith(" s")
               and 0 < float(lock_screen.text("remaining")[:-2]) <= 300, 10, 0.1)
    assert "acquired " + MYSELF in lock_screen.text("history")

    shot = lock_screen.grab(tmp_path / "pydm-lock.png")     # the test's artifact
    data = shot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    print(f"screenshot: {shot}")

    question = lock_screen.click("release", confirm=True)
    assert "Release session 'beamtime' of " + MYSELF in question
    shows(lock_screen, "state", "Free")
    assert net.caget(lock.pv("State")) == "Free"
    assert lock_screen.text("owner") == ""
    assert "released " + MYSELF in lock_screen.text("history").splitlines()[0]   # newest


def test_acquire_renew_release_from_the_screen_with_utf8_note(net, lock, lock_screen):
    """The session shown is the one in the Session field: Renew and Release ask nothing
    (a dialog would block the click until the driver's timeout)."""
    shows(lock_screen, "state", "Free")
    note = "Fe K-edge – Probe ü"
    lock_screen.type("acquire_session", "align")
    lock_screen.type("acquire_note", note)
    lock_screen.type("acquire_lease", 30)
    lock_screen.click("acquire")
    shows(lock_screen, "owner", MYSELF)
    shows(lock_screen, "note", note)           # UTF-8 through JSON, back through CA
    assert lock_screen.text("session") == "align"
    assert 0 < float(lock_screen.text("remaining")[:-2]) <= 30
    assert net.caget(lock.pv("Session")) == "align"

    lock_screen.type("acquire_lease", 900)
    lock_screen.click("renew")
    wait_until(lambda: float(lock_screen.text("remaining")[:-2]) > 800, 10, 0.1)
    assert "renewed" in lock_screen.text("message")

    lock_screen.click("release")
    shows(lock_screen, "state", "Free")

    lock_screen.type("acquire_session", "")      # bad input: the lock's reason is shown
    lock_screen.click("acquire")
    wait_until(lambda: "session name is empty" in lock_screen.text("message"), 10, 0.1)
    assert net.caget(lock.pv("State")) == "Free"


def test_other_holder_is_shown_and_only_an_operator_confirmed_force_release_frees(
        net, lock, lock_screen):
    shows(lock_screen, "state", "Free")
    body = '{"session": "align", "lease": 600, "note": "aligning the DCM"}'
    assert net.caput(lock.pv("Acquire"), body, user="alice").returncode == 0
    shows(lock_screen, "owner", identity("alice"))
    shows(lock_screen, "state", "Held")

    lock_screen.click("release", confirm=True)   # not the holder: refused, nothing changes
    wait_until(lambda: "do not hold the lock" in lock_screen.text("message"), 10, 0.1)
    assert net.caget(lock.pv("Owner")) == identity("alice")

    lock_screen.type("reason", "beam dump recovery")
    question = lock_screen.click("force_release", confirm=False)   # "No": no write
    assert "Force-release" in question and "Reason: beam dump recovery" in question
    lock_screen.click("renew", confirm=True)             # a later command, so the
    wait_until(lambda: "Renew: refused" in lock_screen.text("message"), 10, 0.1)
    assert net.caget(lock.pv("Owner")) == identity("alice")   # "No" wrote nothing

    lock_screen.click("force_release", confirm=True)
    shows(lock_screen, "state", "Free")
    assert f"force-released {MYSELF}" in lock_screen.text("history")

    lock_screen.type("reason", "vacuum work")
    assert "Reason: vacuum work" in lock_screen.click("disable", confirm=True)
    shows(lock_screen, "state", "Disabled")
    wait_until(lambda: lock_screen.prop("state", "lockState") == "Disabled", 10, 0.1)
    assert "vacuum work" in lock_screen.text("disabled_reason")
    lock_screen.type("reason", "")
    assert "Reason: (none)" in lock_screen.click("enable", confirm=True)
    shows(lock_screen, "state", "Free")


def test_release_of_another_session_under_the_same_identity_asks_first(
        net, lock, lock_screen):
    """Another program of the same user@host holds session ``queue``: it is shown, the
    screen's Session field says ``scan42``; one click must not release that lock."""
    shows(lock_screen, "state", "Free")
    assert net.caput(lock.pv("Acquire"), '{"session": "queue", "lease": 600}',
                     user=VIEWER).returncode == 0
    shows(lock_screen, "session", "queue")
    lock_screen.type("acquire_session", "scan42")

    question = lock_screen.click("release", confirm=False)     # "No": nothing written
    assert question.startswith(f"Release session 'queue' of {MYSELF}?")
    assert "Your Session field says 'scan42'" in question
    lock_screen.type("acquire_lease", 900)
    assert "Renew session 'queue'" in lock_screen.click("renew", confirm=True)
    wait_until(lambda: float(lock_screen.text("remaining")[:-2]) > 800, 10, 0.1)
    assert net.caget(lock.pv("Session")) == "queue"           # still held: "No" sent nothing
    assert not any("released" in event for event in history(net, lock))

    lock_screen.click("release", confirm=True)
    shows(lock_screen, "state", "Free")
    assert "released " + MYSELF in history(net, lock)[-1]


def test_waiters_are_shown_and_the_holder_hands_over_with_one_click(net, lock, lock_screen):
    """The viewer (operator) holds; bluesky (the queue's group, a lower authority) asks:
    the screen lists who waits and for how long; one click on Hand over gives it to them.
    Request from the screen: the operator's higher authority takes it back at once."""
    queue = identity("bluesky")
    shows(lock_screen, "state", "Free")
    lock_screen.type("acquire_session", "align")
    lock_screen.click("acquire")
    shows(lock_screen, "owner", MYSELF)
    shows(lock_screen, "waiters", "nobody")
    shows(lock_screen, "waiter_count", "0")
    body = '{"session": "queue", "note": "scan 18", "lease": 600}'
    assert net.caput(lock.pv("Request"), body, user="bluesky").returncode == 0
    shows(lock_screen, "waiter_count", "1")
    wait_until(lambda: re.fullmatch(rf"1\. {queue} session queue, ([2-9]|\d\d+) s 'scan 18'",
                                    lock_screen.text("waiters")), 20, 0.1,
               what="the waiter, and the time waited going up")

    lock_screen.click("handover")                 # the viewer's own session: no dialog
    shows(lock_screen, "owner", queue)
    assert lock_screen.text("token") == "2" and lock_screen.text("session") == "queue"
    shows(lock_screen, "waiters", "nobody")
    assert f"handed-over {MYSELF} session=align token=1 to={queue}" in \
        "\n".join(history(net, lock))

    lock_screen.click("request")                  # operator > queue: granted at once
    shows(lock_screen, "owner", MYSELF)
    assert "higher authority than the holder" in lock_screen.text("message")
    lock_screen.click("withdraw")                 # nothing waiting: the reason is shown
    wait_until(lambda: "have no request waiting" in lock_screen.text("message"), 10, 0.1)


def test_history_shows_the_newest_events_first_and_they_are_visible(net, lock, lock_screen):
    """$(P)History holds more events than the box fits: the box keeps the last few,
    newest first, and the newest is among the lines Qt actually draws in the label."""
    shows(lock_screen, "state", "Free")
    for n in range(1, 7):                                # 12 events
        for pv, value in (("Acquire", f'{{"session": "s{n:02}", "note": "run {n}"}}'),
                          ("Release", f"s{n:02}")):
            assert net.caput(lock.pv(pv), value).returncode == 0
    events = history(net, lock)
    assert len(events) > 10 and "released" in events[-1] and "session=s06" in events[-1]

    wait_until(lambda: lock_screen.visible_lines("history")[:1] == [events[-1]], 20, 0.1,
               what="the newest event drawn on top of the history box")
    assert lock_screen.prop("history", "lastLines") == 5
    assert lock_screen.text("history").splitlines() == events[::-1][:5]
    assert "session=s01" not in lock_screen.text("history")


def test_ioc_down_greys_state_and_buttons(net, lock, lock_screen):
    shows(lock_screen, "state", "Free")
    wait_until(lambda: lock_screen.enabled("acquire"), 10, 0.1)
    lock.stop()
    wait_until(lambda: lock_screen.prop("state", "alarmSeverity") == 4, 20, 0.1,
               what="the disconnected border")
    assert lock_screen.prop("state", "lockState") == ""
    shows(lock_screen, "state", "Unknown")     # fits the box: not a clipped channel name
    shows(lock_screen, "history", f"ca://{lock.prefix}History")    # like every readback
    wait_until(lambda: not lock_screen.enabled("acquire"), 10, 0.1)
    assert not lock_screen.enabled("force_release")


@pytest.fixture
def gated_beamline(net, tmp_path):
    """Lock IOC (operator: the viewer) + the softIoc gated on it."""
    from beamline_env import SoftIoc
    work = tmp_path / "ioc"
    work.mkdir()
    lock = LockIOC(net, work, config_text=admitting_me("TST:LOCK:",
                                                       work / "lock-state.sqlite3"))
    lock.start()
    devices = SoftIoc(net, work, lock.config)
    try:
        devices.start()
        yield lock, devices
    finally:
        devices.stop()
        lock.stop()


GATED = ("shutter_open", "m1_setpoint", "m2_setpoint")
SAFE = ("shutter_close", "m1_stop", "m2_stop")     # never gated (see test_safety.py)


def test_device_panel_controls_follow_the_viewers_gate(net, gated_beamline, tmp_path):
    lock, devices = gated_beamline
    panel = PyDMScreen(net, "devices", {"P": lock.prefix, "DEV": devices.prefix,
                                        "GROUP": "operator"}, tmp_path / "pydm-devices.log")
    try:
        shows(panel, "gate", "1")
        wait_until(lambda: all(panel.enabled(w) for w in GATED), 20, 0.1,
                   what="controls enabled while the gate is 1")
        panel.click("shutter_open")                       # a real gated write, through Qt
        wait_until(lambda: net.caget(devices.pv("Shutter:Status")) == "Open", 10, 0.1)

        body = '{"session": "align", "lease": 600}'
        assert net.caput(lock.pv("Acquire"), body, user="alice").returncode == 0
        shows(panel, "gate", "0")
        shows(panel, "lock_state", "Held")
        shows(panel, "lock_owner", identity("alice"))    # held, and by whom
        wait_until(lambda: not any(panel.enabled(w) for w in GATED), 20, 0.1,
                   what="controls disabled while staff holds the lock")
        assert net.caput(devices.pv("Shutter:Open"), "0", text=False).returncode != 0
        assert all(panel.enabled(w) for w in SAFE)

        assert net.caput(lock.pv("Release"), "align", user="alice").returncode == 0
        wait_until(lambda: all(panel.enabled(w) for w in GATED), 20, 0.1,
                   what="controls enabled again after release")
        panel.click("shutter_close")
        wait_until(lambda: net.caget(devices.pv("Shutter:Status")) == "Closed", 10, 0.1)

        lock.stop()                                       # fail safe: lock IOC gone
        wait_until(lambda: not any(panel.enabled(w) for w in GATED), 20, 0.1,
                   what="controls disabled while the lock IOC is down")
        shows(panel, "lock_state", "Unknown")             # not a clipped channel name
    finally:
        panel.close()
