"""Bad credentials and faults at the door (docs/remote.md, "What happens when"), each on
the real stack of ``remote_env.RemoteStack``: expired and revoked credentials on HTTP and
on a WebSocket, users without a role or a seat, paths nginx does not offer, and each
service behind nginx going away (httpserver, a seat, the RE Manager).

Access tokens live 3 s here (``access_token_max_age``), so that one can expire.
"""
from __future__ import annotations

import json

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from epics_env import wait_until
from remote_env import PROVIDER, RemoteStack
from test_websocket import reply

TOKEN_AGE = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with RemoteStack(tmp_path_factory.mktemp("remote-faults"), web_users=("alice", "bob"),
                     access_token_max_age=TOKEN_AGE) as st:
        yield st


@pytest.fixture
def http(stack):
    """An HTTPS client through nginx, verifying the certificate against the local CA."""
    with httpx.Client(base_url=stack.url, verify=stack.ssl_context(), timeout=20) as client:
        yield client


def refused(stack, path: str, **kw) -> tuple[int, str]:
    """A WebSocket handshake through nginx that must fail: (status, detail)."""
    with pytest.raises(InvalidStatus) as failed:
        stack.socket(path, **kw).close()
    response = failed.value.response
    return response.status_code, json.loads(response.body)["detail"]


def token_of(http, user: str, password: str) -> str:
    answer = http.post(f"/api/auth/provider/{PROVIDER}/token",
                       data={"username": user, "password": password})
    assert answer.status_code == 200, answer.text
    return answer.json()["access_token"]


# ---- credentials ------------------------------------------------------------------------
def test_an_expired_access_token_is_refused_on_http_and_websocket_the_client_refreshes(
        stack, http):
    bearer = {"Authorization": "Bearer " + token_of(http, "alice", stack.passwords["alice"])}
    api = stack.api("alice")
    wait_until(lambda: http.get("/api/status", headers=bearer).status_code == 401,
               TOKEN_AGE + 15, 0.2, what="the access token to expire")
    answer = http.get("/api/status", headers=bearer)
    assert answer.json() == {"detail": "Access token has expired. Refresh token."}
    assert refused(stack, "pv-socket", headers=bearer) == (
        401, "Access token has expired. Refresh token.")
    # bluesky-queueserver-api refreshes its session by itself (its token expired too).
    assert api.status()["manager_state"] == "idle"
    api.close()


def test_revoked_and_expired_api_keys_are_refused_on_http_and_websocket(stack, http):
    api = stack.api("alice")
    key = api.apikey_new(expires_in=600)["secret"]
    assert http.get("/api/status", headers={"Authorization": "ApiKey " + key}).status_code \
        == 200
    open_socket = stack.socket("pv-socket", api_key=key)
    try:
        assert api.apikey_delete(first_eight=key[:8])["success"]
        answer = http.get("/api/status", headers={"Authorization": "ApiKey " + key})
        assert (answer.status_code, answer.json()) == (401, {"detail": "Invalid API key"})
        assert refused(stack, "pv-socket", api_key=key) == (401, "Invalid API key")
        # A socket opened before the revocation is not cut by it (nginx checks at the
        # handshake only); restarting the user's seat closes it, with the seat's reason.
        assert open_socket.request({"action": "subscribe", "pvs": [stack.LOCK + "State"]},
                                   reply("subscribe"))["subscribed"]
        stack.stop_service("seat:alice")
        assert open_socket.wait_closed()[0] == 1012     # "service restart"
    finally:
        open_socket.close()
        if "seat:alice" not in stack.running:
            stack.start_service("seat:alice")
    assert refused(stack, "pv-socket", api_key=key) == (401, "Invalid API key")

    short = api.apikey_new(expires_in=1)["secret"]
    wait_until(lambda: http.get("/api/status", headers={"Authorization": "ApiKey " + short})
               .status_code == 401, 15, 0.2, what="the API key to expire")
    assert refused(stack, "device-socket", api_key=short) == (401, "Invalid API key")
    api.close()


def test_no_role_no_seat_and_other_paths_are_forbidden(stack, http):
    # mallory has a password but no role: httpserver does not let her in at all.
    answer = http.post(f"/api/auth/provider/{PROVIDER}/token",
                       data={"username": "mallory", "password": stack.passwords["mallory"]})
    assert (answer.status_code, answer.json()) == (
        401, {"detail": "User is not authorized to access the server"})
    # A key alice made for reading the queue status only does not open her seat.
    status_only = stack.api_key("alice", scopes=["read:status"])
    assert refused(stack, "pv-socket", api_key=status_only) == (
        403, "user alice may not use the devices: these credentials lack the scope "
             "read:monitor")
    # The operator has a role but no seat in this stack.
    assert refused(stack, "pv-socket", api_key=stack.api_key("operator")) == (
        403, "no device seat is configured for user operator")

    key = stack.api_key("alice")
    for method, path in (("POST", "/ophyd/api/v1/load-devices"),
                         ("GET", "/ophyd/api/v1/queue-server/status"),
                         ("GET", "/ophyd/api/v1/devices/%2e%2e/load-devices"),
                         ("GET", "/ophyd/")):
        answer = http.request(method, path, params={"api_key": key})
        assert answer.status_code == 404, (path, answer.text)
        assert answer.json()["detail"].startswith("not offered through this gateway")
    # The key stays with nginx: the seat is asked without it, httpserver gets it in a
    # header, and no log has it (a page's WebSocket URL carries it).
    answer = http.get("/ophyd/api/v1/devices", params={"api_key": key, "x": "1"})
    assert answer.status_code == 200 and sorted(answer.json()["devices"])[0] == "beam"
    stack.socket("pv-socket", api_key=key).close()
    seat_log = stack.log("seat:alice").read_text()
    assert '"GET /api/v1/devices?x=1 HTTP/1.1" 200' in seat_log
    access_log = (stack.state["nginx"] / "access.log").read_text()
    assert '"GET /ophyd/api/v1/pv-socket HTTP/1.1" 101' in access_log
    for log in (seat_log, access_log, stack.log("httpserver").read_text()):
        assert key not in log


# ---- faults behind nginx ------------------------------------------------------------------
def test_httpserver_down_nginx_answers_502_and_device_sockets_fail_closed(stack, http):
    api = stack.api("alice")
    key = api.apikey_new(expires_in=600)["secret"]
    stack.stop_service("httpserver")
    try:
        with pytest.raises(api.HTTPServerError) as failed:
            api.status()
        answer = failed.value.response
        assert answer.status_code == 502
        assert answer.json() == {"detail": "queue server unreachable: bluesky-httpserver "
                                           "does not answer behind nginx"}
        assert refused(stack, "pv-socket", api_key=key) == (
            503, "device access refused: the credentials cannot be checked: "
                 "bluesky-httpserver unreachable")
    finally:
        stack.start_service("httpserver")
    # Sessions and API keys are in httpserver's database: the same key works again.
    assert stack.subscribes(api_key=key)
    assert api.status()["manager_state"] == "idle"
    api.close()


def test_a_seat_down_is_502_for_its_user_only(stack):
    alice, bob = stack.api_key("alice"), stack.api_key("bob")
    stack.stop_service("seat:alice")
    try:
        assert refused(stack, "device-socket", api_key=alice) == (
            502, "the device server (ophyd-websocket seat) of alice does not answer")
        assert stack.subscribes(api_key=bob)
    finally:
        stack.start_service("seat:alice")
    assert stack.subscribes(api_key=alice)


def test_re_manager_down_the_queue_says_so_and_devices_keep_working(stack):
    api = stack.api("alice")
    key = api.apikey_new(expires_in=600)["secret"]
    stack.manager.stop()
    try:
        with pytest.raises(api.HTTPClientError) as failed:
            api.status()
        assert str(failed.value).startswith(
            "408: Request timeout: ZMQ communication error: timeout occurred"), failed.value
        # The auth check asks httpserver only about credentials, never the RE Manager.
        assert stack.subscribes(api_key=key)
    finally:
        stack.manager.start(open_environment=False)
    assert api.status()["manager_state"] == "idle"
    api.close()
