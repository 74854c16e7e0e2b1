"""ophyd-websocket obeys the beamline lock and streams it, unmodified.

Real parts only: the lock IOC and the simulated beamline (EPICS base softIoc with the ACF
generated from the lock's config) as processes, the unmodified ``ophyd-websocket``
console script as a subprocess on the shared startup directory (``OAS_STARTUP_DIR``),
real ``caput`` as real OS users, and a real ``websockets`` client.

Identities. ophyd-websocket runs as the seat's service account (``ws_env.SEAT_USER``,
``oaswww``), so every CA put it makes, a web page's ``Acquire`` included, is
``oaswww@host``. The lock config puts that user in a ``web`` group of its own
(``web_seat_config``), so the device IOC's ACF gates the seat's direct PV writes on
``Gate:web``. Each seat has a ``LOCK_SESSION``: its gated devices write only while
``oaswww@host`` holds the lock under that session. The queue's
identity is ``bluesky@host`` with session ``queue`` (as the RE worker's lock guard
acquires it), driven here by ``caput`` as the OS user bluesky.
"""
from __future__ import annotations

import json
import time

import pytest

from beamline_env import SoftIoc
from epics_env import LockIOC, identity, wait_until
from ws_env import SEAT_USER, OphydWebsocket, Page, WsClient, web_seat_config
from ws_replay_proxy import ReplayProxy

P = "TST:LOCK:"
B = "TST:"
SEAT = identity(SEAT_USER)
QUEUE = identity("bluesky")
LOCK_PVS = [P + s for s in ("State", "Owner", "Session", "Note", "Token", "Message",
                            "Acquire", "Renew", "Release")]
FREE, HELD = 0, 1           # $(P)State enum indices; the names come in the meta message


@pytest.fixture
def web_lock(net, tmp_path):
    ioc = LockIOC(net, tmp_path, prefix=P,
                  config_text=web_seat_config(P, tmp_path / "lock-state.sqlite3"))
    ioc.start()
    yield ioc
    ioc.stop()


@pytest.fixture
def web_beamline(net, web_lock, tmp_path):
    ioc = SoftIoc(net, tmp_path, web_lock.config, prefix=B).start()
    yield ioc
    ioc.stop()


@pytest.fixture
def seats(net, web_lock, web_beamline, tmp_path):
    """Start ophyd-websocket seats: ``seats("web:alice")``; all killed at the end."""
    started: list[OphydWebsocket] = []

    def start(session: str | None, **kw) -> OphydWebsocket:
        ows = OphydWebsocket(net, tmp_path, lock_prefix=P, beamline_prefix=B,
                             session=session, name=f"ows-{len(started)}", **kw)
        started.append(ows)
        return ows.start()

    yield start
    for ows in started:
        ows.stop()


@pytest.fixture
def ws():
    """Open websocket clients: ``ws(url)``; all closed at the end."""
    opened: list[WsClient] = []

    def open_(url: str) -> WsClient:
        opened.append(WsClient(url))
        return opened[-1]

    yield open_
    for client in opened:
        client.close()


# ---- message matchers ------------------------------------------------------------------
def value(pv: str, want=None):
    """A PV socket value update of ``pv`` (equal to ``want`` if given)."""
    return lambda m: m.get("pv") == pv and "value" in m and (want is None or m["value"] == want)


def reply(action: str):
    return lambda m: m.get("action") == action


def error(m) -> bool:
    return "error" in m


def set_outcome(m) -> bool:
    return "error" in m or str(m.get("message", "")).startswith("Successfully set")


def subscribe_pvs(client: WsClient, pvs: list[str]) -> None:
    answer = client.request({"action": "subscribe", "pvs": pvs}, reply("subscribe"))
    assert answer["subscribed"] == pvs and not answer["failed"], answer


def subscribe_devices(client: WsClient, devices: list[str]) -> None:
    answer = client.request({"action": "subscribe", "devices": devices}, reply("subscribe"))
    assert answer["subscribed"] == devices and not answer["failed"], answer


def pv_put(client: WsClient, pv: str, text: str) -> int:
    """A web page's put through the PV socket; returns the message index before it."""
    return client.send(action="set", pv=pv, value=text, timeout=5)


def device_set(client: WsClient, device: str, target, timeout: float = 20) -> dict:
    return client.request({"action": "set", "device": device, "value": target,
                           "timeout": timeout}, set_outcome, wait=timeout + 10)


def web_acquire(client: WsClient, session: str, *, lease: float = 120,
                note: str = "") -> int:
    return pv_put(client, P + "Acquire",
                  json.dumps({"session": session, "lease": lease, "note": note}))


# ---- the behaviour ---------------------------------------------------------------------
def test_lock_pvs_stream_free_held_free_with_owner_within_1s(net, seats, ws):
    seat = seats("web:alice")
    client = ws(seat.pv_socket)
    subscribe_pvs(client, LOCK_PVS)
    client.wait_for(value(P + "State", FREE), what="initial State Free")
    meta = client.wait_for(lambda m: m.get("pv") == P + "State" and "enum_strs" in m)[1]
    assert meta["enum_strs"][:3] == ["Free", "Held", "Disabled"]   # how a page names it

    start = client.mark()
    body = '{"session": "align", "lease": 600, "note": "mirror alignment"}'
    assert net.caput(P + "Acquire", body, user="alice").returncode == 0
    returned = time.monotonic()
    held_at, _ = client.wait_for(value(P + "State", HELD), 5, start, "State Held")
    owner_at, _ = client.wait_for(value(P + "Owner", identity("alice")), 5, start, "Owner")
    session_at, _ = client.wait_for(value(P + "Session", "align"), 5, start, "Session")
    client.wait_for(value(P + "Note", "mirror alignment"), 5, start, "Note")

    start = client.mark()
    assert net.caput(P + "Release", "align", user="alice").returncode == 0
    released = time.monotonic()
    free_at, _ = client.wait_for(value(P + "State", FREE), 5, start, "State Free")
    why_at, why = client.wait_for(lambda m: value(P + "Message")(m) and
                                  str(m["value"]).startswith("released"), 5, start)
    assert f"released by {identity('alice')} (session align" in why["value"]

    delays = {"Held": held_at - returned, "Owner": owner_at - returned,
              "Session": session_at - returned, "Free": free_at - released,
              "released Message": why_at - released}
    print("update arrived after the put returned (s):",
          {k: round(v, 4) for k, v in delays.items()})
    assert all(d < 1.0 for d in delays.values()), delays


def test_queue_holds_the_lock_web_sets_are_refused_naming_the_holder(
        net, web_beamline, seats, ws):
    # A seat whose policy lets it write while the lock is Free.
    seat = seats("web:alice", allow_free_writes=True)
    devices = ws(seat.device_socket)
    subscribe_devices(devices, ["m1", "m2"])
    assert device_set(devices, "m1", 0.1) == {"message": "Successfully set m1 to 0.1"}
    pvs = ws(seat.pv_socket)
    subscribe_pvs(pvs, [B + "m1", B + "Shutter:Open"] + LOCK_PVS)

    # The queue's session takes the lock (bluesky@host, session queue, as the RE
    # worker's lock guard does); the seat learns it from its lock monitors, not per set.
    start = pvs.mark()
    body = '{"session": "queue", "lease": 600, "note": "plan scan"}'
    assert net.caput(P + "Acquire", body, user="bluesky").returncode == 0
    pvs.wait_for(value(P + "Owner", QUEUE), 10, start, "the page to see the queue holding")
    pvs.wait_for(value(P + "Note", "plan scan"), 10, start, "the page to see the queue's note")
    before = {pv: net.caget(B + pv) for pv in ("m1", "m2:VELO", "Shutter:Open")}
    assert float(before["m1"]) == 0.1
    refused = device_set(devices, "m1", 1.5)
    assert refused["error"].startswith("Could not set value of m1 to 1.5: m1: write refused: "
                                       f"lock is held by {QUEUE} (session queue, note "
                                       "'plan scan')"), refused

    # The PV socket bypasses the ophyd gate: there the device IOC's ACF refuses
    # (Gate:web is 0 while the queue group holds the lock); the page sees the access
    # rights change as metadata.
    for pv, target in ((B + "m1", 2.0), (B + "Shutter:Open", 1)):
        pvs.wait_for(lambda m, pv=pv: m.get("pv") == pv and m.get("write_access") is False,
                     10, start, f"{pv} to become read-only for the seat")
        answer = pvs.request({"action": "set", "pv": pv, "value": target, "timeout": 5}, error)
        assert answer["error"] == f"Write access is not enabled for PV {pv}. " \
                                  "Cannot set value.", answer

    # Taking the lock from a web page is refused too; the page reads why in Message.
    start = web_acquire(pvs, "web:alice", note="take over")
    _, why = pvs.wait_for(lambda m: value(P + "Message")(m) and
                          str(m["value"]).startswith("Acquire: refused"), 10, start)
    assert f"lock is held by {QUEUE} (session queue, note 'plan scan')" in why["value"]

    time.sleep(0.5)   # let any write that slipped through reach the IOC
    assert {pv: net.caget(B + pv) for pv in before} == before
    assert net.caget(P + "Owner") == QUEUE and net.caget(P + "Session") == "queue"


def test_web_session_acquires_through_the_websocket_and_other_identities_are_refused(
        net, web_beamline, seats, ws):
    alice_seat = seats("web:alice")
    page = ws(alice_seat.pv_socket)
    subscribe_pvs(page, LOCK_PVS)
    devices = ws(alice_seat.device_socket)
    subscribe_devices(devices, ["m1", "m2", "shutter"])

    # Before the web user takes the lock (Free, LOCK_ALLOW_FREE_WRITES=0): refused.
    refused = device_set(devices, "m1", 0.25)
    assert "m1: write refused: the lock is Free and this process does not hold it" \
        in refused["error"], refused

    start = web_acquire(page, "web:alice", note="web: align")
    page.wait_for(value(P + "State", HELD), 10, start)
    page.wait_for(value(P + "Owner", SEAT), 10, start)
    page.wait_for(value(P + "Session", "web:alice"), 10, start)
    token = int(net.caget(P + "Token"))

    assert device_set(devices, "m1", 0.25) == {"message": "Successfully set m1 to 0.25"}
    assert device_set(devices, "m2", -0.3) == {"message": "Successfully set m2 to -0.3"}
    assert float(net.caget(B + "m1")) == 0.25 and float(net.caget(B + "m2")) == -0.3
    wait_until(lambda: float(net.caget(B + "m1:RBV")) == 0.25, what="m1 to arrive")
    # The shutter, by name or number (a text value is a device put, a number a set).
    assert device_set(devices, "shutter", "Open") == {
        "message": "Successfully set shutter to Open"}
    assert net.caget(B + "Shutter:Status") == "Open"
    assert device_set(devices, "shutter", 0) == {"message": "Successfully set shutter to 0"}
    assert net.caget(B + "Shutter:Status") == "Closed"

    # The page renews its lease through the same socket.
    pv_put(page, P + "Renew", json.dumps({"session": "web:alice", "lease": 600}))
    wait_until(lambda: float(net.caget(P + "Remaining")) > 300, 10, what="the renewal")

    # A second seat: another ophyd-websocket, its own session web:bob.
    bob_seat = seats("web:bob")
    bob_devices = ws(bob_seat.device_socket)
    subscribe_devices(bob_devices, ["m1"])
    refused = device_set(bob_devices, "m1", 0.9)
    assert refused["error"].startswith(
        f"Could not set value of m1 to 0.9: m1: write refused: lock is held by {SEAT} "
        "(session web:alice, note 'web: align')"), refused
    assert "(that is you, under another session)" in refused["error"]
    bob_page = ws(bob_seat.pv_socket)
    subscribe_pvs(bob_page, LOCK_PVS)
    start = web_acquire(bob_page, "web:bob")
    _, why = bob_page.wait_for(lambda m: value(P + "Message")(m) and
                               str(m["value"]).startswith("Acquire: refused"), 10, start)
    assert f"lock is held by {SEAT} (session web:alice" in why["value"]

    # The queue service (another OS user) cannot take it either.
    r = net.caput(P + "Acquire", "queue", user="bluesky")
    assert r.returncode != 0
    assert f"lock is held by {SEAT} (session web:alice" in r.stdout + r.stderr

    assert float(net.caget(B + "m1")) == 0.25
    assert (net.caget(P + "Owner"), net.caget(P + "Session"), int(net.caget(P + "Token"))) \
        == (SEAT, "web:alice", token)

    # The web user releases; the seat is refused again.
    start = pv_put(page, P + "Release", "web:alice")
    page.wait_for(value(P + "State", FREE), 10, start)
    refused = device_set(devices, "m1", 0.5)
    assert "the lock is Free" in refused["error"], refused
    refused = device_set(devices, "shutter", "Open")
    assert "shutter: write refused: the lock is Free" in refused["error"], refused
    assert float(net.caget(B + "m1")) == 0.25
    assert net.caget(B + "Shutter:Open") == "Close"


def test_lock_ioc_down_web_sets_refused_lock_state_unknown(net, web_lock, web_beamline,
                                                          seats, ws):
    seat = seats("web:alice")
    page = ws(seat.pv_socket)
    subscribe_pvs(page, LOCK_PVS)
    devices = ws(seat.device_socket)
    subscribe_devices(devices, ["m1", "m2"])
    start = web_acquire(page, "web:alice", lease=600)
    page.wait_for(value(P + "Session", "web:alice"), 10, start)
    assert device_set(devices, "m1", 0.2) == {"message": "Successfully set m1 to 0.2"}

    start = page.mark()
    web_lock.kill9()
    for pv in (P + "State", P + "Owner", P + "Session"):
        page.wait_for(lambda m, pv=pv: m.get("pv") == pv and m.get("connected") is False,
                      10, start, f"the page to see {pv} disconnected")
    before = {pv: net.caget(B + pv) for pv in ("m1", "m2", "m2:VELO")}
    # Sets on both sides of the 3 s heartbeat limit: all refused, none reaches the IOC.
    deadline = time.monotonic() + 4.0
    tries = 0
    while tries < 3 or time.monotonic() < deadline:
        for device, target in (("m1", 0.7), ("m2", 0.4)):
            refused = device_set(devices, device, target)
            assert "write refused: the lock state is unknown" in refused.get("error", ""), \
                refused
        tries += 1
        time.sleep(0.5)
    assert {pv: net.caget(B + pv) for pv in before} == before

    # The lock IOC comes back with the durable grant: the web session writes again.
    web_lock.start()
    wait_until(lambda: "Successfully" in str(device_set(devices, "m1", 0.3).get("message")),
               30, 0.5, what="the seat to write again once the lock IOC is back")
    assert float(net.caget(B + "m1")) == 0.3


def test_seat_started_while_the_lock_ioc_is_down_refuses_sets(net, web_lock, web_beamline,
                                                               seats, ws):
    web_lock.stop()
    seat = seats("web:alice", allow_free_writes=True, env={"LOCK_CONNECT_TIMEOUT": "1"})
    devices = ws(seat.device_socket)
    subscribe_devices(devices, ["m1"])
    refused = device_set(devices, "m1", 0.6)
    assert refused["error"] == "Could not set value of m1 to 0.6: m1: write refused: the " \
                               f"lock state is unknown: lock IOC {P} is not connected", refused
    assert float(net.caget(B + "m1")) == 0.0


def test_web_page_keeps_its_lease_alive_until_released_or_taken_away(net, seats):
    """The web page's lock client (web/src/lock/client.ts, the page's own code run by
    node against a real seat): Take keeps renewing a 4 s lease; a force-release or
    Release ends the renewing."""
    seat = seats("web:alice")
    page = Page(f"ws://127.0.0.1:{seat.port}/api/v1/pv-socket", P, "web:alice")
    try:
        page.wait_for(lambda v: v["state"] == "Free" and v["take_enabled"], 20,
                      "the lock Free and Take enabled")
        page.do("take 4 from the page")
        view = page.wait_for(lambda v: v["state"] == "Held" and v["release_enabled"]
                             and v["hold"] is not None, 10, "the page's grant")
        assert view["renewing"] and (view["owner"], view["session"], view["note"]) \
            == (SEAT, "web:alice", "from the page"), view
        token = view["hold"]["token"]
        time.sleep(10)  # 2.5 leases: only the page's renewals keep it
        assert (net.caget(P + "State"), net.caget(P + "Session"), int(net.caget(P + "Token"))) \
            == ("Held", "web:alice", token)

        assert net.caput(P + "ForceRelease", "drill", user="operator").returncode == 0
        page.wait_for(lambda v: v["state"] == "Free", 10, "Free after the drill")
        view = page.wait_for(lambda v: not v["renewing"] and v["hold"] is None, 10,
                             "the page to stop renewing")
        assert view["outcome"] == "ended", view
        page.wait_for(lambda v: v["message"].startswith("force-released"), 10,
                      "the page to show why")

        page.do("take 4 from the page")
        page.wait_for(lambda v: v["hold"] and v["hold"]["token"] == token + 1, 10,
                      "the page's second grant")
        page.do("release")
        page.wait_for(lambda v: v["state"] == "Free" and not v["renewing"]
                      and v["message"].startswith("released by"), 10, "Free after Release")
    finally:
        page.close()


def test_web_page_keeps_its_grant_when_an_old_token_value_arrives_late(net, seats):
    """The race of a fresh clone's failed run (issue 12), made certain. ophyd-websocket
    delivers a PV's first value twice (ophyd's monitor and its connection-time replay, two
    threads); under load the replay of ``Token = 0`` reached the page after the grant's
    ``Token = 1``. The old example page took that old value for the lock changing hands,
    stopped renewing, and its lease ran out while it still showed Held. The proxy
    replays that copy after the grant's Token; the page must ignore a value older than
    the one it has (web/src/lock/pvstore.ts orders values by the IOC's timestamp)."""
    seat = seats("web:alice")
    token_pv = P + "Token"
    proxy = ReplayProxy(
        f"ws://127.0.0.1:{seat.port}",
        hold=lambda m: m.get("pv") == token_pv and m.get("value") == 0,
        release_after=lambda m: m.get("pv") == token_pv and m.get("value") == 1).start()
    page = Page(f"ws://127.0.0.1:{proxy.port}/api/v1/pv-socket", P, "web:alice")
    try:
        page.wait_for(lambda v: v["state"] == "Free" and v["take_enabled"], 20,
                      "the lock Free and Take enabled")
        page.do("take 4")
        page.wait_for(lambda v: v["hold"] and v["hold"]["token"] == 1 and v["renewing"], 10,
                      "the page's grant")
        assert proxy.replayed.wait(10), "the old Token value was never replayed"
        time.sleep(10)  # 2.5 leases: only the page's renewals keep it
        assert (net.caget(P + "State"), net.caget(P + "Session"), int(net.caget(P + "Token"))) \
            == ("Held", "web:alice", 1)
        view = page.views[-1]
        assert view["renewing"] and view["hold"]["token"] == 1 and view["token"] == 1, view
    finally:
        page.close()
        proxy.stop()


def test_bad_input_from_a_page_gets_a_clear_answer(net, seats, ws):
    seat = seats("web:alice")
    page = ws(seat.pv_socket)
    subscribe_pvs(page, LOCK_PVS)
    # ophyd-websocket reports no error for a refused put: the page reads Message.
    for body, reason in (
            ("not a session!", "Acquire: invalid session name 'not a session!'"),
            ('{"session": "web:alice", "lease": 1e9}',
             "Acquire: lease 1e+09 s is over the maximum of 3600 s"),
            ('{"session": "web:alice", "colour": 1}', "Acquire: unknown key 'colour'"),
            ("{not json", "Acquire: invalid JSON: ")):
        start = pv_put(page, P + "Acquire", body)
        page.wait_for(lambda m, reason=reason: value(P + "Message")(m)
                      and str(m["value"]).startswith(reason), 10, start, f"Message {reason!r}")
    devices = ws(seat.device_socket)
    answer = devices.request({"action": "set", "device": "m1", "value": 1.0}, error)
    assert "not subscribed" in answer["error"]
    answer = devices.request({"action": "subscribe", "devices": ["nope"]}, reply("subscribe"))
    assert answer["failed"] == [{"device": "nope", "error": "not found in device registry"}]
    assert net.caget(P + "State") == "Free"
    assert seat.proc.poll() is None, "ophyd-websocket died on bad input"
