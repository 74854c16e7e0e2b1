"""The web page on the real stack, in a real headless browser (issue 16).

Debian's Chromium, driven by Playwright for Python, opens the page from nginx over HTTPS
(nginx's own certificate pinned by its key: no certificate error is ignored), and the page
talks to the real bluesky-httpserver, RE Manager, one ophyd-websocket seat per user (each
as that user's OS account), the lock IOC and the beamline softIoc with its ACF
(``remote_env.RemoteStack``, one for the module). Each user is a browser context of their
own (``web_env.Tab``); every test starts with the lock Free and the queue idle.

Everything waits on what the page shows (Playwright's ``expect``), never on a sleep; the
one wait for time is the lease test's, which waits for time to pass, since that is what
it tests. Screenshots of the whole page go to each test's tmp dir.
"""
from __future__ import annotations

import datetime as dt
import re
import subprocess
import time

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from epics_env import ME, identity, tool, wait_until
from remote_env import PROVIDER, RemoteStack
from web_env import FULL_HD, LAPTOP, Tab, launch, spki_pin, start_count_paused

#: Whose seats the stack runs: two staff users and an operator.
USERS = ("alice", "bob", "operator")
#: How long an expect waits before it fails (a bound for a loaded machine, not a timing
#: requirement: nothing here asserts how fast anything is).
EXPECT_TIMEOUT = 30_000
#: The page's reconnect back-off reaches 10 s: a seat that comes back is seen by then.
RECONNECT_TIMEOUT = 60_000
#: The queue guard's linger (clients/startup/50-run-engine.py, QUEUE_LOCK_LINGER default).
LINGER = 5.0
#: The lease alice's tab keeps alive for three periods (renewed every LEASE/3 s).
LEASE = 12


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with RemoteStack(tmp_path_factory.mktemp("web-stack"), web_users=USERS) as st:
        yield st


@pytest.fixture(scope="module")
def browser(stack):
    expect.set_options(timeout=EXPECT_TIMEOUT)
    # Trust nginx's certificate, and only it: Chromium checks the key it presents.
    pin = spki_pin(stack.ca_file.with_name("server.crt"))
    with sync_playwright() as p:
        b = launch(p, pins=[pin])
        yield b
        b.close()
    expect.set_options(timeout=5_000)


@pytest.fixture
def tabs(stack, browser, tmp_path):
    """``tabs("alice", LAPTOP)``: a new tab (context) for a user; closed at the end, and
    the page must have raised no script error."""
    opened: list[Tab] = []

    def open_(name: str, viewport: dict = LAPTOP) -> Tab:
        opened.append(Tab(browser, stack.url, viewport, tmp_path, name))
        return opened[-1]

    yield open_
    for tab in opened:
        tab.close()
    assert [e for tab in opened for e in tab.errors] == []


@pytest.fixture(autouse=True)
def lock_free_queue_idle(stack):
    """Every test starts with the lock Free (a tab closed while holding it leaves a live
    grant: the operator force-releases it) and the RE Manager idle."""
    state = stack.net.caget(stack.LOCK + "State")
    if state == "Disabled":
        stack.net.caput(stack.LOCK + "Enable", "test reset", user="operator")
    elif state == "Held":
        stack.net.caput(stack.LOCK + "ForceRelease", "test reset", user="operator")
    wait_until(lambda: stack.net.caget(stack.LOCK + "State") == "Free", 20,
               what="the lock to be Free")
    api = stack.api("operator")
    try:
        wait_until(lambda: api.status()["manager_state"] == "idle", 60,
                   what="the RE Manager to be idle")
    finally:
        api.close()
    yield


def ioc(stack, suffix: str) -> str:
    return stack.net.caget(stack.LOCK + suffix)


def history_lines(tab: Tab) -> list[str]:
    """The lock's History as the page lists it (newest first)."""
    return tab("#lock-history li").all_inner_texts()


def line_time(line: str) -> float:
    """POSIX time of a History line (``2026-11-27T15:14:08Z released ...``)."""
    stamp = line.split(" ", 1)[0]
    return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=dt.timezone.utc).timestamp()


def pv_time(stack, pv: str) -> float:
    """POSIX time of a PV's value, as its IOC stamped it (``caget -a``, in UTC)."""
    run = subprocess.run([tool("caget"), "-a", pv], env=dict(stack.net.client_env(), TZ="UTC"),
                         capture_output=True, text=True, timeout=20, check=True)
    _, day, clock, _ = run.stdout.split(maxsplit=3)
    return dt.datetime.strptime(f"{day} {clock}", "%Y-%m-%d %H:%M:%S.%f").replace(
        tzinfo=dt.timezone.utc).timestamp()


def expect_writes_disabled(tab: Tab) -> None:
    """Move and Open are disabled (with a valid target typed, so only the lock can be
    why); Stop and Close stay enabled: making safe is never refused by the lock."""
    tab.label("Target").first.fill("5")
    for gated in ("Move Motor m1", "Move Motor m2", "Open Photon shutter"):
        expect(tab.button(gated)).to_be_disabled()
    for safe in ("Stop Motor m1", "Stop Motor m2", "Close Photon shutter"):
        expect(tab.button(safe)).to_be_enabled()


def expect_direct_m1_write_refused(stack, tab: Tab, stays_at: float) -> None:
    """``tab``'s user, not holding the lock, writes m1 straight through the PV socket
    (past the page and the seat's gate): the device IOC refuses it, and m1 stays at
    ``stays_at``, where the holder put it."""
    m1 = stack.BEAMLINE + "m1"
    direct = tab.socket_request("pv-socket", {"action": "subscribe", "pvs": [m1]},
                                {"action": "set", "pv": m1, "value": 7, "timeout": 5})
    assert direct == {"error": f"Write access is not enabled for PV {m1}. "
                               "Cannot set value."}, direct
    assert float(stack.net.caget(m1)) == pytest.approx(stays_at, abs=1e-3)


# ---- the story: a queue run, then the lock by hand, two users and an operator ----------
def test_queue_then_lock_two_users_and_an_operator(stack, tabs):
    alice = tabs("alice", FULL_HD)
    bob = tabs("bob", LAPTOP)
    operator = tabs("operator", LAPTOP)
    alice.log_in("alice", stack.passwords["alice"])
    bob.log_in("bob", stack.passwords["bob"])
    operator.log_in("operator", stack.passwords["operator"])
    expect(alice("#role")).to_have_text("staff")
    expect(operator("#role")).to_have_text("operator")
    for tab in (alice, bob):     # operators only see the operator commands
        expect(tab.page.get_by_role("group", name="Operator commands")).to_have_count(0)
    expect(operator.button("Force release")).to_be_disabled()      # nothing to release

    # alice queues a count and starts the queue. The test pauses the plan as soon as it
    # runs (as alice, through httpserver), so that what follows happens while the queue
    # holds the lock however slow this machine is; it resumes it below.
    api = stack.api("alice")
    start_count_paused(alice, api, detectors='["det"]', num="10", delay="1")
    for tab in (alice, bob):
        expect(tab("#lock-state")).to_have_text("Held")
        expect(tab("#lock-queue")).to_have_text(
            'The bluesky queue holds the lock: running count(detectors=["det"], num=10, '
            'delay=1).')
        expect(tab("#queue-status")).to_contain_text("Manager paused")
        expect(tab("#queue-running")).to_have_text('count(detectors=["det"], num=10, delay=1)')
        expect(tab("#devices-gate")).to_have_text(re.compile(
            r"^Moves disabled: held by bluesky queue: count, \d+ s left$"))
        expect(tab("#lock-note")).to_have_text("bluesky queue: count")
        expect(tab("#lock-session")).to_have_text("queue")
        expect_writes_disabled(tab)
    alice.shot("queue-holds")
    bob.shot("queue-holds")

    # bob forces a write past the page: straight to the device IOC through his seat's
    # PV socket. The IOC's access security refuses it; the motor does not move.
    m1 = stack.net.caget(stack.BEAMLINE + "m1")
    direct = bob.socket_request("pv-socket", {"action": "subscribe", "pvs": [stack.BEAMLINE + "m1"]},
                                {"action": "set", "pv": stack.BEAMLINE + "m1", "value": 7,
                                 "timeout": 5})
    assert direct == {"error": f"Write access is not enabled for PV {stack.BEAMLINE}m1. "
                               "Cannot set value."}, direct
    # Through the device socket, the seat's gate refuses first, naming the holder.
    gated = bob.socket_request("device-socket", {"action": "subscribe", "devices": ["m1"]},
                               {"action": "set", "device": "m1", "value": 7, "timeout": 1})
    assert "m1: write refused: lock is held by" in gated["error"], gated
    assert "(session queue, note 'bluesky queue: count')" in gated["error"], gated
    assert stack.net.caget(stack.BEAMLINE + "m1") == m1
    # bob's Take is refused with the holder and note, verbatim from the lock.
    bob.take("my turn")
    expect(bob("#lock-outcome")).to_contain_text(
        f"Take refused: Acquire: refused: lock is held by {identity(ME)} "
        "(session queue, note 'bluesky queue: count')")

    # The plan resumes and completes; the queue keeps the lock for the linger, then lets go.
    api.re_resume()
    expect(alice("#queue-history")).to_contain_text(
        'count(detectors=["det"], num=10, delay=1) — alice completed')
    for tab in (alice, bob):
        expect(tab("#lock-state")).to_have_text("Free")
    expect(alice("#queue-console")).to_contain_text(
        f"beamline-lock guard: released the beamline lock ({LINGER:g} s without a plan)")
    api.close()
    released = [ln for ln in history_lines(alice) if " released " in ln and "session=queue" in ln]
    assert released, history_lines(alice)
    # The linger: the release came at least LINGER after the plan's last count (the plan
    # ended after it). History stamps whole seconds, so its second ends at +1.
    last_count = pv_time(stack, stack.BEAMLINE + "det:Counts")
    assert line_time(released[0]) + 1 > last_count + LINGER, (released[0], last_count)

    # alice takes the lock with a note, moves m1 and opens the shutter.
    alice.take("aligning m1", LEASE)
    expect(alice("#lock-holder")).to_contain_text("Held by you")
    expect(alice("#devices-gate")).to_have_text("You may move devices.")
    alice.record_lock_states()
    granted = time.monotonic()
    token = ioc(stack, "Token")
    assert ioc(stack, "Session") == "web:alice"
    alice.label("Target").first.fill("2")
    alice.button("Move Motor m1").click()
    expect(alice("#m1-readback")).to_have_text("2.000")
    expect(alice("#m1-moving")).to_have_count(0)
    alice.button("Open Photon shutter").click()
    for tab in (alice, bob):
        expect(tab("#shutter-status")).to_have_text("Open")
    assert float(stack.net.caget(stack.BEAMLINE + "m1:RBV")) == pytest.approx(2.0, abs=1e-3)

    # bob sees who holds it and why, and is refused: Take, and a write past the page.
    expect(bob("#devices-gate")).to_have_text(re.compile(
        r"^Moves disabled: held by alice \(web\): aligning m1, \d+ s left$"))
    expect(bob("#lock-note")).to_have_text("aligning m1")
    expect(bob("#lock-owner")).to_have_text(identity("alice"))
    expect_writes_disabled(bob)
    bob.take("my turn")
    expect(bob("#lock-outcome")).to_contain_text(
        f"Take refused: Acquire: refused: lock is held by {identity('alice')} "
        "(session web:alice, note 'aligning m1')")
    gated = bob.socket_request("device-socket", {"action": "subscribe", "devices": ["m1"]},
                               {"action": "set", "device": "m1", "value": 7, "timeout": 1})
    assert f"m1: write refused: lock is held by {identity('alice')} (session web:alice, " \
           "note 'aligning m1')" in gated["error"], gated
    # Past the page and the seat: the device IOC admits only the holder (issue 18), so
    # bob, in alice's own group, is refused there too, and m1 stays where alice put it.
    expect_direct_m1_write_refused(stack, bob, stays_at=2.0)
    bob.shot("refused")

    # Stop and Close are never refused by the lock: bob stops alice's move and closes
    # her shutter.
    alice.label("Target").first.fill("60")
    alice.button("Move Motor m1").click()
    expect(alice("#m1-moving")).to_be_visible()
    bob.button("Stop Motor m1").click()
    for tab in (alice, bob):
        expect(tab("#m1-moving")).to_have_count(0)
    assert float(stack.net.caget(stack.BEAMLINE + "m1")) < 60
    bob.button("Close Photon shutter").click()
    for tab in (alice, bob):
        expect(tab("#shutter-status")).to_have_text("Closed")
    alice.shot("holding")

    # alice's tab keeps her lease alive: three lease periods later it is the same grant.
    alice.page.wait_for_timeout(max(0.0, granted + 3 * LEASE + 1 - time.monotonic()) * 1000)
    assert (ioc(stack, "State"), ioc(stack, "Session"), ioc(stack, "Token")) == \
        ("Held", "web:alice", token)
    assert set(alice.lock_states()) == {"Held"}, alice.lock_states()
    renewals = [ln for ln in history_lines(alice)
                if " renewed " in ln and f"session=web:alice token={token}" in ln]
    assert len(renewals) >= 3, history_lines(alice)
    expect(alice("#lock-holder")).to_contain_text("Held by you")

    # alice logs out: her lock is released, and bob sees it.
    alice.log_out()
    expect(alice("#login-notice")).to_have_text("You have logged out.")
    expect(bob("#lock-state")).to_have_text("Free")
    assert ioc(stack, "State") == "Free"
    expect(bob("#lock-message")).to_have_text(
        f"released by {identity('alice')} (session web:alice, token {token})")

    # alice again; the operator force-releases her lock, by keyboard, with a reason
    # that both staff pages show.
    alice.log_in("alice", stack.passwords["alice"])
    alice.take("second shift")
    expect(alice("#lock-holder")).to_contain_text("Held by you")
    expect(bob("#lock-holder")).to_contain_text("held by alice (web): second shift")
    expect(operator.button("Force release")).to_be_enabled()     # its page sees the grant
    operator.button("Force release").focus()
    operator.page.keyboard.press("Enter")
    expect(operator.label("Reason")).to_be_focused()
    operator.page.keyboard.type("beam study")
    operator.shot("force-release")
    operator.page.keyboard.press("Tab")
    expect(operator.page.locator("dialog").get_by_role("button", name="Force release")) \
        .to_be_focused()
    operator.page.keyboard.press("Enter")
    reason = (f"force-released by {identity('operator')}: took the lock from "
              f"{identity('alice')} (session web:alice, token {int(token) + 1}); "
              "reason: beam study")
    for tab in (alice, bob, operator):
        expect(tab("#lock-state")).to_have_text("Free")
        expect(tab("#lock-message")).to_have_text(reason)
    expect(alice("#lock-outcome")).to_have_text(
        "Your lock ended: see the last lock message above.")
    alice.shot("force-released")
    bob.shot("force-released")


def test_bob_asks_alice_hands_over_with_one_click_and_the_device_ioc_follows(stack, tabs):
    """Issue 18 on the page: bob asks for the lock alice holds and sees his place; alice
    sees him waiting and hands over with one click; bob may move, alice may not, at the
    page and at the device IOC (exclusive to the holder)."""
    alice = tabs("alice")
    bob = tabs("bob")
    alice.log_in("alice", stack.passwords["alice"])
    bob.log_in("bob", stack.passwords["bob"])
    alice.take("scanning the edge", LEASE)
    expect(alice("#lock-holder")).to_contain_text("Held by you")
    token = int(ioc(stack, "Token"))

    bob.label("Note").fill("my turn after alice")
    bob.button("Request").click()
    expect(bob("#lock-line-help")).to_contain_text("You wait in line: place 1 of 1")
    expect(alice("#lock-waiters")).to_contain_text(
        f"{identity('bob')} (web:bob), waiting")
    expect(alice("#lock-waiters")).to_contain_text("my turn after alice")
    assert ioc(stack, "WaiterCount") == "1"
    alice.shot("someone-waits")

    alice.button(f"Hand over to {identity('bob')}").click()
    expect(bob("#lock-holder")).to_contain_text("Held by you")
    expect(bob("#devices-gate")).to_have_text("You may move devices.")
    expect(alice("#lock-owner")).to_have_text(identity("bob"))
    expect(alice("#lock-waiters")).to_have_count(0)
    assert (ioc(stack, "Session"), int(ioc(stack, "Token"))) == ("web:bob", token + 1)

    bob.label("Target").first.fill("1.5")
    bob.button("Move Motor m1").click()
    expect(bob("#m1-readback")).to_have_text("1.500")
    expect_writes_disabled(alice)
    expect_direct_m1_write_refused(stack, alice, stays_at=1.5)
    bob.shot("handed-over")
    bob.button("Release").click()
    expect(bob("#lock-state")).to_have_text("Free")


def test_operator_disables_and_enables_with_reasons_stop_and_close_stay_enabled(stack, tabs):
    operator = tabs("operator")
    alice = tabs("alice")
    operator.log_in("operator", stack.passwords["operator"])
    alice.log_in("alice", stack.passwords["alice"])
    operator.button("Disable the lock").click()
    # A reason is required, and must be words (ophyd-websocket sends digits as a number).
    dialog = operator.page.locator("dialog")
    dialog.get_by_role("button", name="Disable the lock").click()
    expect(dialog.get_by_role("alert")).to_have_text("a reason is required")
    operator.label("Reason").fill("vacuum work in the hutch")
    dialog.get_by_role("button", name="Disable the lock").click()
    why = f"by {identity('operator')}: vacuum work in the hutch"
    for tab in (operator, alice):
        expect(tab("#lock-state")).to_have_text("Disabled")
        expect(tab("#lock-disabled")).to_have_text(f"Disabled: {why}")
    expect(alice("#devices-gate")).to_have_text(f"Moves disabled: lock disabled: {why}")
    expect(alice("#lock-take")).to_be_enabled()     # a Take is answered with the reason
    expect_writes_disabled(alice)
    alice.shot("disabled")
    operator.button("Enable the lock").click()
    operator.label("Reason (optional)").fill("vacuum done")
    dialog.get_by_role("button", name="Enable the lock").click()
    for tab in (operator, alice):
        expect(tab("#lock-state")).to_have_text("Free")
        expect(tab("#lock-message")).to_have_text(f"enabled by {identity('operator')}: vacuum done")


# ---- bad input ----------------------------------------------------------------------------
def test_wrong_password_shows_httpserver_reason_and_nothing_else_happens(stack, tabs):
    tab = tabs("alice")
    tab.open()
    tab.type_login("alice", "not-" + stack.passwords["alice"])
    # httpserver's own reason for the refusal, as it answers a direct request.
    with httpx.Client(base_url=stack.url, verify=stack.ssl_context(), timeout=20) as http:
        answer = http.post(f"/api/auth/provider/{PROVIDER}/token",
                           data={"username": "alice", "password": "wrong"})
    assert answer.status_code == 401
    expect(tab.page.get_by_role("alert")).to_have_text(f"Login failed: {answer.json()['detail']}")
    expect(tab.label("Password")).to_have_value("")
    expect(tab.label("User name")).to_have_value("alice")
    expect(tab("#whoami")).to_have_count(0)
    assert tab.api_key() is None
    tab.shot("wrong-password")
    # The right one then works, by keyboard from the password field.
    tab.label("Password").fill(stack.passwords["alice"])
    tab.label("Password").press("Enter")
    expect(tab("#whoami")).to_contain_text("Signed in as alice")


def test_invalid_plan_parameters_show_httpserver_reason_verbatim(stack, tabs):
    alice = tabs("alice", FULL_HD)
    alice.log_in("alice", stack.passwords["alice"])
    with alice.page.expect_request(lambda r: r.url.endswith("/api/queue/item/add")) as sent:
        alice.add_plan("count", detectors='["det"]', num="three")
    expect(alice("#plan-result")).to_be_visible()
    # The same request straight to httpserver (through nginx) answers the same reason.
    with httpx.Client(base_url=stack.url, verify=stack.ssl_context(), timeout=20) as http:
        answer = http.post("/api/queue/item/add", content=sent.value.post_data,
                           headers={"Authorization": "ApiKey " + alice.api_key(),
                                    "Content-Type": "application/json"})
    reason = answer.json()
    assert reason["success"] is False and "num" in reason["msg"], reason
    expect(alice("#plan-result")).to_have_text(reason["msg"])
    expect(alice("#plan-result")).to_have_attribute("role", "alert")
    expect(alice("#queue-items")).to_have_text("The queue is empty.")
    alice.shot("invalid-plan")


def test_an_ended_session_returns_to_login_with_a_message_and_releases_the_lock(stack, tabs):
    alice = tabs("alice")
    alice.log_in("alice", stack.passwords["alice"])
    alice.take("overnight")
    expect(alice("#lock-holder")).to_contain_text("Held by you")
    # The session's API key ends (revoked here; an expired key answers the same 401).
    key = alice.api_key()
    with httpx.Client(base_url=stack.url, verify=stack.ssl_context(), timeout=20) as http:
        answer = http.delete("/api/auth/apikey", params={"first_eight": key[:8]},
                             headers={"Authorization": "ApiKey " + key})
        assert answer.status_code == 200, answer.text
    expect(alice("#login-notice")).to_have_text(
        "Your session has ended (Invalid API key). Please log in again.")
    expect(alice.label("User name")).to_be_visible()
    assert alice.api_key() is None
    # The page released the lock before it left (it waits for that, up to 3 s).
    wait_until(lambda: ioc(stack, "State") == "Free", 20, what="the lock to be released")
    assert ioc(stack, "Message").startswith(f"released by {identity('alice')} (session web:alice")
    alice.shot("session-ended")


# ---- faults ------------------------------------------------------------------------------
def test_httpserver_down_queue_unreachable_lock_and_devices_live(stack, tabs):
    alice = tabs("alice")
    bob = tabs("bob")
    alice.log_in("alice", stack.passwords["alice"])
    bob.log_in("bob", stack.passwords["bob"])
    stack.stop_service("httpserver")
    try:
        for tab in (alice, bob):
            expect(tab("#queue-problem")).to_have_text(
                "queue server unreachable: bluesky-httpserver does not answer behind nginx")
            expect(tab("#queue-panel")).to_have_class(re.compile(r"\bgreyed\b"))
        # The lock and the devices stay live through ophyd-websocket.
        alice.take("while the queue server is away")
        expect(alice("#lock-holder")).to_contain_text("Held by you")
        expect(bob("#lock-holder")).to_contain_text(
            "held by alice (web): while the queue server is away")
        alice.label("Target").first.fill("1.5")
        alice.button("Move Motor m1").click()
        for tab in (alice, bob):
            expect(tab("#m1-readback")).to_have_text("1.500")
            expect(tab("#lock-panel")).not_to_have_class(re.compile(r"\bgreyed\b"))
        alice.shot("httpserver-down")
    finally:
        stack.start_service("httpserver")
    for tab in (alice, bob):
        expect(tab("#queue-problem")).to_have_count(0)
        expect(tab("#queue-status")).to_contain_text("Manager idle")
    alice.button("Release").click()
    expect(bob("#lock-state")).to_have_text("Free")


def test_seat_down_lock_and_device_panels_grey_and_writes_disabled(stack, tabs):
    alice = tabs("alice")
    alice.log_in("alice", stack.passwords["alice"])
    alice.record_lock_states()
    stack.stop_service("seat:alice")
    try:
        expect(alice("#lock-state")).to_have_text("Lock state unknown")
        expect(alice("#lock-unknown")).to_have_text(
            "no connection to the device server (ophyd-websocket). Writes are disabled.")
        expect(alice("#devices-gate")).to_have_text(
            "Moves disabled: device server unreachable (ophyd-websocket)")
        for panel in ("#lock-panel", "#devices-panel"):
            expect(alice(panel)).to_have_class(re.compile(r"\bgreyed\b"))
        expect(alice("#lock-take")).to_be_disabled()
        alice.label("Target").first.fill("5")
        for gated in ("Move Motor m1", "Open Photon shutter"):
            expect(alice.button(gated)).to_be_disabled()
        # A value that is not there has no units ("disconnected", not "disconnected mm").
        expect(alice("#m1-readback").locator("xpath=..")).to_have_text(
            "disconnected (setpoint disconnected)")
        expect(alice("#det_acquire_time")).to_have_text("disconnected")
        expect(alice("#beam_energy")).to_have_text("disconnected")
        # The queue does not need the seat.
        expect(alice("#queue-problem")).to_have_count(0)
        alice.shot("seat-down")
    finally:
        stack.start_service("seat:alice")
    # The page reconnects by itself.
    expect(alice("#lock-state")).to_have_text("Free", timeout=RECONNECT_TIMEOUT)
    expect(alice("#lock-take")).to_be_enabled()
    assert "Free" not in alice.lock_states()[1:-1], alice.lock_states()


def test_lock_ioc_down_lock_unknown_writes_disabled_never_free(stack, tabs):
    alice = tabs("alice", FULL_HD)
    bob = tabs("bob")
    alice.log_in("alice", stack.passwords["alice"])
    bob.log_in("bob", stack.passwords["bob"])
    alice.take("through an IOC restart")
    expect(alice("#lock-holder")).to_contain_text("Held by you")
    token = ioc(stack, "Token")
    for tab in (alice, bob):
        expect(tab("#lock-state")).to_have_text("Held")
        tab.record_lock_states()
    stack.lock.kill9()
    try:
        for tab in (alice, bob):
            expect(tab("#lock-state")).to_have_text("Lock state unknown")
            expect(tab("#lock-unknown")).to_have_text(
                "lock IOC not connected. Writes are disabled.")
            expect(tab("#devices-gate")).to_have_text(
                "Moves disabled: lock state unknown: lock IOC not connected")
            expect(tab("#lock-panel")).to_have_class(re.compile(r"\bgreyed\b"))
            expect(tab("#lock-take")).to_be_disabled()
            expect_writes_disabled(tab)
        # Devices are still read.
        expect(alice("#m1-readback")).not_to_have_text("disconnected")
        alice.shot("lock-ioc-down")
    finally:
        stack.lock.start()
    # The grant is durable: alice's tab finds it and keeps it alive.
    expect(alice("#lock-holder")).to_contain_text("Held by you")
    expect(bob("#lock-holder")).to_contain_text("held by alice (web): through an IOC restart")
    assert ioc(stack, "Token") == token
    for tab in (alice, bob):
        assert "Free" not in tab.lock_states(), tab.lock_states()
        assert tab.lock_states()[-1] == "Held"


# ---- keyboard, labels, screen sizes ------------------------------------------------------
#: Enabled controls without an accessible name (label, aria-label(ledby) or text).
UNNAMED = """() => [...document.querySelectorAll('input, select, textarea, button')]
  .filter((e) => !e.disabled && !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                 && !e.getAttribute('aria-labelledby') && !(e.textContent || '').trim())
  .map((e) => e.outerHTML.slice(0, 100))"""
#: Enabled controls a Tab walk must reach, by a key of their own.
CONTROLS = """() => [...document.querySelectorAll('input, select, textarea, button')]
  .filter((e) => !e.disabled && e.offsetParent !== null)
  .map((e) => e.id || e.getAttribute('aria-label') || e.textContent.trim())"""
FOCUSED = """() => { const e = document.activeElement;
  return e === document.body ? null : (e.id || e.getAttribute('aria-label') || e.textContent.trim()); }"""


@pytest.mark.parametrize("viewport", [LAPTOP, FULL_HD], ids=["laptop", "1080p"])
def test_the_page_by_keyboard_with_labelled_controls_at_laptop_and_1080p(stack, tabs, viewport):
    op = tabs(f"operator-{viewport['width']}", viewport)
    op.log_in("operator", stack.passwords["operator"])
    expect(op("#queue-status")).to_contain_text("Manager idle")
    expect(op.label("Plan")).to_be_enabled()
    assert op.page.evaluate(UNNAMED) == []
    assert not op.scrolls_sideways()
    # Tab walks every enabled control, in reading order, then comes round again.
    wanted = op.page.evaluate(CONTROLS)
    walked: list[str] = []
    for _ in range(3 * len(wanted)):
        op.page.keyboard.press("Tab")
        here = op.page.evaluate(FOCUSED)
        if here is not None and walked.count(here) and here == walked[0]:
            break
        walked.append(here)
    missing = [c for c in wanted if c not in walked]
    assert missing == [], (missing, walked)
    assert walked.index("Log out") < walked.index("take-note") < walked.index("m1-target") \
        < walked.index("plan-name"), walked
    # An operator command by keyboard: its dialog takes focus; Escape cancels it.
    for _ in walked:
        if op.page.evaluate(FOCUSED) == "Disable the lock":
            break
        op.page.keyboard.press("Tab")
    expect(op.button("Disable the lock")).to_be_focused()
    op.page.keyboard.press("Enter")
    expect(op.label("Reason")).to_be_focused()
    op.shot("dialog")
    op.page.keyboard.press("Escape")
    expect(op.page.locator("dialog")).to_have_count(0)
    expect(op("#lock-state")).to_have_text("Free")
    expect_writes_disabled(op)      # Free, not taken: Move and Open wait for a Take
    op.shot("page")
