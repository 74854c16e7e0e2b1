"""Remote users through nginx, end to end, real parts only (docs/remote.md).

The stack (``remote_env.RemoteStack``): lock IOC, beamline softIoc with the ACF, Redis,
RE Manager (its worker runs as this test's account, in the lock's ``queue`` group),
bluesky-httpserver with passwords for alice and bob (staff), operator (operator) and
observer (no lock group), one ophyd-websocket seat per web user running as that user's
OS account with ``LOCK_SESSION=web:<user>``, and Debian's nginx as an unprivileged
process in front, with a certificate made at its first start. Clients: bluesky-queueserver-
api over HTTPS verifying the certificate against the local CA, WebSocket clients through
nginx, ``caput`` as OS users.
"""
from __future__ import annotations

import json
import pwd
import re
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from bluesky_queueserver_api import BPlan

from epics_env import HOST, ME, identity, installation, wait_until
from remote_env import RemoteStack
from test_websocket import (device_set, error, pv_put, reply, subscribe_devices,
                            subscribe_pvs, value, web_acquire)

QUEUE = f"{ME}@{HOST}"          # the RE worker's CA identity
HELD, FREE = 1, 0


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with RemoteStack(tmp_path_factory.mktemp("remote"),
                     manager_env={"QUEUE_LOCK_LINGER": "1"}) as st:
        yield st


@pytest.fixture
def sockets(stack):
    """``sockets(user, path)``: a WebSocket through nginx with ``user``'s API key in the
    query, as a page sends it; all closed at the end. The lock is Free again after."""
    opened = []
    keys: dict[str, str] = {}

    def open_(user: str, path: str):
        key = keys.setdefault(user, stack.api_key(user))
        opened.append(stack.socket(path, api_key=key))
        return opened[-1]

    yield open_
    for client in opened:
        client.close()
    P = stack.LOCK
    if stack.net.caget(P + "State") == "Held":
        stack.net.caput(P + "ForceRelease", "test cleanup", user="operator")


def lock_pvs(P: str) -> list[str]:
    return [P + s for s in ("State", "Owner", "Session", "Note", "Token", "Message",
                            "Acquire", "Renew", "Release")]


def message_after(page, start: int, prefix: str, P: str = RemoteStack.LOCK) -> str:
    """The lock's Message that starts with ``prefix``, from message ``start`` on."""
    return page.wait_for(lambda m: value(P + "Message")(m)
                         and str(m["value"]).startswith(prefix), 15, start, prefix)[1]["value"]


def get(url: str, context: ssl.SSLContext | None = None):
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as answer:
            return answer.status, dict(answer.headers), answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


# ---- the door ---------------------------------------------------------------------------
def accounts_of(stack, name: str) -> set[str]:
    """OS accounts of the processes of a service's process group (``runuser``, which
    starts it as its account, left out)."""
    pgid = stack.running[name].proc.pid
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        comm = stat[stat.index("(") + 1:stat.rfind(")")]
        if int(fields[2]) == pgid and comm != "runuser":
            uid = int(next(line for line in status.splitlines()
                           if line.startswith("Uid:")).split()[1])
            found.add(pwd.getpwuid(uid).pw_name)
    return found


def test_each_service_runs_as_its_own_unprivileged_account(stack):
    assert accounts_of(stack, "nginx") == {"www-data"}
    assert accounts_of(stack, "httpserver") == {"bluesky"}
    for user in ("alice", "bob", "operator", "observer"):
        assert accounts_of(stack, f"seat:{user}") == {user}


def test_http_redirects_to_https_and_the_static_root_serves_the_web_page(stack):
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as moved:
        opener.open(stack.http_url + "/ophyd/api/v1/devices?x=1", timeout=10)
    assert moved.value.code == 301
    assert moved.value.headers["Location"] == stack.url + "/ophyd/api/v1/devices?x=1"

    # The page web/build made, as installed for nginx's account ...
    status, headers, body = get(stack.url + "/", stack.ssl_context())
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert body == (installation().share / "web" / "dist" / "index.html").read_text()
    assert "<title>Beamline — remote access</title>" in body
    script = re.search(r'src="\./(assets/[^"]+\.js)"', body).group(1)
    status, headers, _ = get(f"{stack.url}/{script}", stack.ssl_context())
    assert status == 200 and "javascript" in headers["Content-Type"]
    # ... with the settings of this stack, written when it started.
    status, headers, body = get(stack.url + "/config.json", stack.ssl_context())
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    assert json.loads(body) == {"authProvider": "local", "lockPrefix": stack.LOCK,
                                "beamlinePrefix": stack.BEAMLINE}


def test_tls_is_real_a_client_without_the_local_ca_refuses_the_certificate(stack):
    with pytest.raises(urllib.error.URLError) as refused:
        urllib.request.urlopen(stack.url + "/", timeout=10,
                               context=ssl.create_default_context())
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)


def test_wrong_password_is_refused_with_httpservers_message(stack):
    api = stack.api()
    with pytest.raises(api.HTTPClientError, match="401: Incorrect username or password"):
        api.login("alice", password="not her password")
    api.close()


# ---- the queue from afar, under the lock -----------------------------------------------
def test_staff_queue_a_plan_through_https_it_runs_under_the_lock_and_nobody_else_writes(
        stack, sockets):
    net, P, B = stack.net, stack.LOCK, stack.BEAMLINE
    alice = stack.api("alice")
    assert alice.queue_clear()["success"]
    assert net.caput(B + "det:AcquireTime", "0.1", text=False).returncode == 0
    # Long enough never to end by itself; the operator stops it below.
    assert alice.item_add(BPlan("count", ["det"], num=1000, delay=0.1))["success"]
    assert alice.queue_start()["success"]
    wait_until(lambda: (net.caget(P + "State"), net.caget(P + "Session"))
               == ("Held", "queue"), 60, what="the queue to take the lock")
    assert net.caget(P + "Owner") == QUEUE          # exactly as with the ZMQ API
    assert net.caget(P + "Note") == "bluesky queue: count"

    # The observer reads the queue but may not change it (httpserver's own answer). The
    # RE Manager learns its worker's RE state by polling it every 0.5 s (and httpserver
    # keeps a status for 0.4 s): right after the plan took the lock the status still says
    # 'idle' for about 0.45 s, so wait for it as any client of the queue server must.
    observer = stack.api("observer")
    observer.wait_for_condition(lambda status: status["re_state"] == "running", timeout=10)
    assert observer.queue_get()["running_item"]["name"] == "count"
    with pytest.raises(observer.HTTPClientError) as denied:
        observer.item_add(BPlan("count", ["det"]))
    assert str(denied.value).startswith("401: Not enough permissions. Requires scopes "
                                        "['write:queue:edit']"), denied.value
    with pytest.raises(observer.HTTPClientError, match="Not enough permissions"):
        observer.re_pause("immediate")

    # bob's web session cannot take the lock ...
    page = sockets("bob", "pv-socket")
    subscribe_pvs(page, lock_pvs(P) + [B + "m1"])
    page.wait_for(value(P + "Owner", QUEUE), 10, what="bob's page to see the queue")
    why = message_after(page, web_acquire(page, "web:bob", note="mine now"), "Acquire: refused")
    assert f"lock is held by {QUEUE} (session queue, note 'bluesky queue: count')" in why
    # ... his devices refuse through the device socket (the seat's gate) ...
    devices = sockets("bob", "device-socket")
    subscribe_devices(devices, ["m1", "shutter"])
    refused = device_set(devices, "m1", 1.0)
    assert refused["error"].startswith(f"Could not set value of m1 to 1.0: m1: write refused: "
                                       f"lock is held by {QUEUE} (session queue"), refused
    # ... and the device IOC refuses his direct PV writes: the seat's CA identity is bob.
    page.wait_for(lambda m: m.get("pv") == B + "m1" and m.get("write_access") is False, 10,
                  what="m1 read-only for bob's seat")
    answer = page.request({"action": "set", "pv": B + "m1", "value": 2.0, "timeout": 5}, error)
    assert answer["error"] == f"Write access is not enabled for PV {B}m1. Cannot set value."
    r = net.caput(B + "Shutter:Open", "1", user="bob", text=False)      # as from his shell
    assert r.returncode != 0 and "Write access denied" in r.stderr, r.stderr

    # All of that happened while the plan ran.
    assert alice.status()["re_state"] == "running"
    assert float(net.caget(B + "m1")) == 0.0

    # The operator stops it from afar: pause, then abort.
    operator = stack.api("operator")
    with pytest.raises(operator.HTTPClientError, match="Not enough permissions"):
        operator.item_add(BPlan("count", ["det"]))          # operators do not edit the queue
    assert operator.re_pause("immediate")["success"]
    operator.wait_for_idle_or_paused(timeout=30)
    assert operator.re_abort()["success"]
    operator.wait_for_idle(timeout=60)
    item = alice.history_get()["items"][-1]
    assert (item["name"], item["user"], item["result"]["exit_status"]) == (
        "count", "alice", "aborted"), item
    wait_until(lambda: net.caget(P + "State") == "Free", 20,
               what="the queue to release the lock after its linger")
    for api in (alice, observer, operator):
        api.close()


# ---- device sockets: who is who ---------------------------------------------------------
def test_an_unauthenticated_socket_is_refused_by_nginx_before_the_seat(stack):
    from websockets.exceptions import InvalidStatus
    seat_log = stack.log("seat:alice")
    before = seat_log.read_text()
    for path in ("pv-socket", "device-socket"):
        with pytest.raises(InvalidStatus) as refused:
            stack.socket(path)
        response = refused.value.response
        assert response.status_code == 401
        assert json.loads(response.body)["detail"].startswith("not authenticated: log in")
    with pytest.raises(InvalidStatus) as refused:
        stack.socket("pv-socket", api_key="0123456789abcdef")
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body) == {"detail": "Invalid API key"}
    assert seat_log.read_text() == before          # nothing reached ophyd-websocket


def test_a_hundred_handshakes_in_a_row_are_all_answered(stack):
    """Each one through TLS, the auth check (two questions to httpserver over nginx's
    keep-alive connections) and the seat. (A threaded TLS client once lost its upgrade
    request now and then; the sockets here do all TLS I/O in one thread.)"""
    key = stack.api_key("alice")
    for n in range(100):
        headers = {"Cookie": f"bluesky_httpserver_api_key={key}"} if n % 2 else None
        stack.socket("pv-socket", api_key=None if n % 2 else key, headers=headers).close()


def test_a_message_claiming_another_users_session_acts_as_its_real_sender(stack, sockets):
    """ophyd-websocket cannot tell users apart, and the lock's session is a name the
    client chooses. What is enforced is the CA identity: each web user's messages reach
    only their own seat, which runs as their OS account. Documented in docs/remote.md."""
    net, P, B = stack.net, stack.LOCK, stack.BEAMLINE
    BOB, ALICE = identity("bob"), identity("alice")
    bob_page = sockets("bob", "pv-socket")
    subscribe_pvs(bob_page, lock_pvs(P))

    # bob claims alice's session: the lock grants it to bob, and says so.
    start = web_acquire(bob_page, "web:alice", note="pretending")
    bob_page.wait_for(value(P + "Owner", BOB), 10, start, "the lock to name bob")
    assert (net.caget(P + "Owner"), net.caget(P + "Session")) == (BOB, "web:alice")
    assert f"granted to {BOB} (session web:alice" in net.caget(P + "Message")
    # Neither alice's seat (her account) nor bob's (session web:bob) writes on that grant.
    alice_devices = sockets("alice", "device-socket")
    subscribe_devices(alice_devices, ["m1"])
    refused = device_set(alice_devices, "m1", 0.5)
    assert f"m1: write refused: lock is held by {BOB} (session web:alice, note 'pretending')" \
        in refused["error"], refused
    bob_devices = sockets("bob", "device-socket")
    subscribe_devices(bob_devices, ["m1"])
    refused = device_set(bob_devices, "m1", 0.5)
    assert "(that is you, under another session)" in refused["error"], refused
    assert float(net.caget(B + "m1")) == 0.0
    start = pv_put(bob_page, P + "Release", "web:alice")
    bob_page.wait_for(value(P + "State", FREE), 10, start, "bob to release his grant")

    # alice takes the lock; bob's page, claiming her session, can neither release it
    # nor renew it, and alice's seat writes.
    alice_page = sockets("alice", "pv-socket")
    subscribe_pvs(alice_page, lock_pvs(P))
    start = web_acquire(alice_page, "web:alice", note="aligning")
    alice_page.wait_for(value(P + "Owner", ALICE), 10, start, "alice's grant")
    token = net.caget(P + "Token")
    for command in ("Release", "Renew"):
        why = message_after(bob_page, pv_put(bob_page, P + command, "web:alice"),
                            f"{command}: refused")
        assert f"you ({BOB}, session web:alice) do not hold the lock; it is held by " \
               f"{ALICE} (session web:alice" in why
    assert (net.caget(P + "Owner"), net.caget(P + "Token")) == (ALICE, token)
    assert device_set(alice_devices, "m1", 0.5) == {"message": "Successfully set m1 to 0.5"}
    start = pv_put(alice_page, P + "Release", "web:alice")
    alice_page.wait_for(value(P + "State", FREE), 10, start, "alice's release")


def test_the_observer_reads_devices_and_the_lock_but_writes_nothing(stack, sockets):
    net, P, B = stack.net, stack.LOCK, stack.BEAMLINE
    page = sockets("observer", "pv-socket")
    subscribe_pvs(page, lock_pvs(P) + [B + "m1", B + "RingCurrent"])
    page.wait_for(value(B + "RingCurrent"), 10, what="a device reading")
    page.wait_for(value(P + "State", FREE), 10, what="the lock Free")
    before = net.caget(B + "m1")
    # The lock is Free and still nothing: the observer's account is in no lock group.
    why = message_after(page, web_acquire(page, "web:observer"), "Acquire: refused")
    assert f"{identity('observer')} is in no access group of this lock" in why
    answer = page.request({"action": "set", "pv": B + "m1", "value": 1.0, "timeout": 5}, error)
    assert answer["error"] == f"Write access is not enabled for PV {B}m1. Cannot set value."
    devices = sockets("observer", "device-socket")
    subscribe_devices(devices, ["m1"])
    refused = device_set(devices, "m1", 1.0)
    assert "m1: write refused: the lock is Free and this process does not hold it" \
        in refused["error"], refused
    assert net.caget(B + "m1") == before and net.caget(P + "State") == "Free"


def test_a_browser_sends_its_key_as_a_cookie_and_other_sites_pages_are_refused(stack):
    """A browser cannot set headers on a WebSocket: it sends the cookie (or ?api_key=).
    A page of another site would send the cookie too: nginx refuses a foreign Origin."""
    from websockets.exceptions import InvalidStatus
    key = stack.api_key("alice")
    cookie = {"Cookie": f"bluesky_httpserver_api_key={key}"}
    assert stack.subscribes(headers={**cookie, "Origin": stack.url})
    # A client that can set headers sends the key (or a bearer token) in Authorization.
    page = stack.socket("device-socket", headers={"Authorization": f"ApiKey {key}"})
    try:
        assert page.request({"action": "subscribe", "devices": ["m1"]},
                            reply("subscribe"))["subscribed"] == ["m1"]
    finally:
        page.close()
    with pytest.raises(InvalidStatus) as refused:
        stack.socket("pv-socket", headers={**cookie, "Origin": "https://evil.example"})
    assert refused.value.response.status_code == 403
    assert json.loads(refused.value.response.body)["detail"] == (
        "cross-origin request refused: Origin https://evil.example is not this site "
        f"({stack.url})")


def test_the_console_stream_comes_through_nginx_as_it_is_written(stack):
    """The page reads httpserver's console with a streaming GET (its key in the header).
    nginx must pass each message on as it comes: buffered, not even the headers arrived."""
    import queue
    import threading

    import httpx
    key = stack.api_key("alice")
    arrived: queue.Queue = queue.Queue()

    def read() -> None:
        try:
            with httpx.Client(base_url=stack.url, verify=stack.ssl_context(),
                              timeout=httpx.Timeout(10, read=60)) as client, \
                    client.stream("GET", "/api/stream_console_output",
                                  headers={"Authorization": f"ApiKey {key}"}) as answer:
                arrived.put(("status", answer.status_code))
                for chunk in answer.iter_text():    # JSON objects back to back, no newlines
                    arrived.put(("text", chunk))
        except httpx.HTTPError as exc:
            arrived.put(("error", repr(exc)))

    threading.Thread(target=read, daemon=True).start()
    assert arrived.get(timeout=15) == ("status", 200)
    alice = stack.api("alice")
    try:
        assert alice.queue_clear()["success"]     # the RE Manager logs it to the console
        kind, text = arrived.get(timeout=15)
        assert kind == "text" and text.startswith('{"time": '), text
        assert "bluesky_queueserver.manager" in text, text
    finally:
        alice.close()
