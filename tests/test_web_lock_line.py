"""The web page's lock client waits in line and hands over (issue 18): the page's own code
(web/src/lock/client.ts with line.ts, run by node through web/src/lock/shim.ts) against a
real ophyd-websocket seat, a real lock IOC and ``caput`` as the OS user bob.

The seat runs as its service account (``ws_env.SEAT_USER``) in a ``web`` group with the
staff's authority, so that bob (staff) and the page wait for each other in line rather
than one taking the lock from the other at once.
"""
from __future__ import annotations

import json

import pytest

from epics_env import LockIOC, identity, wait_until
from ws_env import SEAT_USER, OphydWebsocket, Page, web_seat_config

P, B = "TST:LOCK:", "TST:"
SEAT, BOB = identity(SEAT_USER), identity("bob")


@pytest.fixture
def page(net, tmp_path):
    config = web_seat_config(P, tmp_path / "lock-state.sqlite3").replace(
        f"users: [{SEAT_USER}]", f"users: [{SEAT_USER}], authority: 20")
    assert "authority: 20}" in config.splitlines()[-1]
    lock = LockIOC(net, tmp_path, prefix=P, config_text=config).start()
    seat = OphydWebsocket(net, tmp_path, lock_prefix=P, beamline_prefix=B,
                          session="web:alice")
    page = None
    try:
        seat.start()
        page = Page(seat.pv_socket, P, "web:alice")
        page.wait_for(lambda v: v["state"] == "Free", 30, "the lock Free")
        yield page
    finally:
        if page is not None:
            page.close()
        seat.stop()
        lock.stop()


def test_the_page_waits_in_line_is_handed_the_lock_and_hands_it_on(net, page):
    assert net.caput(P + "Acquire", '{"session": "edge", "lease": 600}', user="bob") \
        .returncode == 0
    page.wait_for(lambda v: v["state"] == "Held" and v["owner"] == BOB, 10, "bob holding")

    page.do("request 4 from the page")               # a 4 s request: renewed by the page
    view = page.wait_for(lambda v: v["place"] == 1, 10, "the page in line")
    assert view["requesting"] and view["waiters"] == [f"{SEAT} web:alice"], view
    waiters = json.loads(net.caget(P + "Waiters").encode().decode("unicode_escape"))
    assert [(w["who"], w["session"], w["note"]) for w in waiters] == [
        (SEAT, "web:alice", "from the page")]
    before = int(net.caget(P + "History").count("request-renewed"))
    wait_until(lambda: net.caget(P + "History").count("request-renewed") >= before + 3, 20,
               what="the page renewing its request")        # 3 renewals of a 4 s request
    assert net.caget(P + "WaiterCount") == "1"

    assert net.caput(P + "Handover", "edge", user="bob").returncode == 0
    view = page.wait_for(lambda v: v["owner"] == SEAT and v["renewing"] and v["token"] == 2
                         and v["hold"] == {"token": 2} and v["place"] is None, 10,
                         "the page holding and keeping the grant alive")
    assert (view["session"], view["requesting"]) == ("web:alice", False), view
    wait_until(lambda: net.caget(P + "History").count(
        f"renewed {SEAT} session=web:alice token=2") >= 1, 10, what="the grant renewed")

    assert net.caput(P + "Request", '{"session": "edge", "lease": 600}', user="bob") \
        .returncode == 0
    page.wait_for(lambda v: v["waiters"] == [f"{BOB} edge"], 10, "bob in line")
    page.do("handover")                               # one click: to the first in line
    view = page.wait_for(lambda v: v["owner"] == BOB and not v["renewing"]
                         and v["token"] == 3 and v["waiters"] == [], 10,
                         "bob holding, the page no longer renewing")
    # bob asked with no note: the page's note is not shown as his (State announced the
    # new holding period, so older Owner/Session/Note values are not taken for it).
    assert view["note"] is None and view["holder"].startswith("held by bob@"), view
    events = net.caget(P + "History").encode().decode("unicode_escape").splitlines()
    assert any(f"handed-over {SEAT} session=web:alice token=2 to={BOB}" in e for e in events)


def test_the_page_withdraws_and_a_request_on_a_free_lock_is_a_grant(net, page):
    assert net.caput(P + "Acquire", '{"session": "edge", "lease": 600}', user="bob") \
        .returncode == 0
    page.wait_for(lambda v: v["owner"] == BOB, 10, "bob holding")
    page.do("request 60 please")
    page.wait_for(lambda v: v["place"] == 1, 10, "the page in line")
    page.do("withdraw")
    page.wait_for(lambda v: v["place"] is None and not v["requesting"], 10, "out of line")
    assert net.caget(P + "WaiterCount") == "0"
    assert net.caput(P + "Release", "edge", user="bob").returncode == 0
    page.wait_for(lambda v: v["state"] == "Free", 10, "Free")
    page.do("request 60 now")
    view = page.wait_for(lambda v: v["owner"] == SEAT and v["renewing"]
                         and not v["requesting"], 10, "granted at once")
    assert view["note"] == "now" and view["token"] == 2, view
