"""The remote half's configuration, checked against the real packages without the stack:
httpserver's roles derived from the lock's groups (read back by httpserver's own policy
classes), nginx's rendered config (``nginx -t`` with the njs module), and the local CA
that ``make-cert`` makes at the first start (``openssl verify``)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from bluesky_httpserver.authorization import DictionaryAPIAccessControl
from bluesky_httpserver.config import parse_configs

from epics_env import REPO, TEST_CONFIG, installation, user_dir
from lock_ioc.config import ConfigError, parse
from remote_env import NGINX_USER, httpserver_config, nginx_config


def lock_config(text: str = TEST_CONFIG):
    return parse(yaml.safe_load(text.format(prefix="TST:LOCK:", state="/tmp/x")),
                 base_dir=Path("/tmp"), source="test")


def policy(settings: dict) -> DictionaryAPIAccessControl:
    return DictionaryAPIAccessControl(**settings["api_access"]["args"])


def test_checked_in_config_is_current_and_httpserver_accepts_it():
    path = REPO / "clients" / "httpserver" / "config.yml"
    assert path.read_text() == httpserver_config.generate(), (
        "clients/httpserver/config.yml is stale: run "
        "python clients/httpserver/httpserver_config.py > clients/httpserver/config.yml")
    parsed = parse_configs(path)     # httpserver's own loader and schema
    assert parsed["authentication"]["providers"][0]["authenticator"].endswith(
        ":PAMAuthenticator")
    assert parsed["authentication"]["allow_anonymous_access"] is False


def test_roles_are_the_lock_groups_and_mean_what_the_issue_asks():
    settings = httpserver_config.render(
        lock_config(), provider=httpserver_config.dictionary_provider({"alice": "pw"}),
        observers=["observer"])
    access = policy(settings)
    staff, operator, observer = (access.get_user_scopes(u)
                                 for u in ("alice", "operator", "observer"))
    assert access.get_user_roles("alice") == access.get_user_roles("bob") == {"staff"}
    assert access.get_user_roles("operator") == {"operator"}
    assert access.get_user_roles("observer") == {"observer"}
    # Staff edit and control the queue.
    assert {"write:queue:edit", "write:queue:control", "write:plan:control"} <= staff
    # Operators stop, pause and start what runs, and resume a suspended plan
    # (lock_reacquire), but do not edit the queue.
    assert {"write:queue:control", "write:plan:control", "write:manager:control",
            "write:execute"} <= operator
    assert "write:queue:edit" not in operator
    # Observers only read.
    assert observer and all(s.startswith("read:") or s == "user:apikeys" for s in observer)
    # Every role may open a device seat; the queue's service account has no web role.
    for scopes in (staff, operator, observer):
        assert httpserver_config.DEVICE_SCOPE in scopes
    assert not access.is_user_known("bluesky")
    assert access.get_user_scopes("mallory") == set()


def test_a_user_in_two_groups_gets_both_roles():
    text = TEST_CONFIG.replace("users: [operator]", "users: [operator, alice]")
    access = policy(httpserver_config.render(
        lock_config(text), provider=httpserver_config.pam_provider()))
    assert access.get_user_roles("alice") == {"staff", "operator"}


def test_an_observer_in_a_lock_group_is_refused_with_a_clear_error():
    with pytest.raises(ConfigError, match="observer 'alice' is already in lock group"):
        httpserver_config.render(lock_config(), provider=httpserver_config.pam_provider(),
                                 observers=["alice"])
    done = subprocess.run(
        [sys.executable, str(REPO / "clients/httpserver/httpserver_config.py"), "--lock-config",
         str(REPO / "iocBoot/iocLock/lock.yaml"), "--observer", "bob"],
        capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "observer 'bob' is already in lock group(s) staff" in done.stderr


@pytest.fixture
def runtime():
    """nginx's runtime directory, owned by the account nginx runs as."""
    path = user_dir(NGINX_USER, "nginx")
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=True)


def test_rendered_nginx_config_passes_nginx_t_as_the_unprivileged_account(runtime):
    web_root = installation().share / "web" / "dist"     # the installed page
    conf = nginx_config.prepare(runtime, cert_names=["localhost", "127.0.0.1"],
                                owner=NGINX_USER, web_root=web_root,
                                web_config={"authProvider": "local", "lockPrefix": "BL:LOCK:"},
                                http_port=8080, https_port=8443,
                                httpserver="127.0.0.1:60610",
                                seats={"alice": 41001, "bob": 41002},
                                device_scope=httpserver_config.DEVICE_SCOPE)
    checked = nginx_config.check_config(conf, NGINX_USER)
    assert checked.returncode == 0, checked.stderr
    text = conf.read_text()
    assert "{{" not in text
    assert """js_var $bl_seats '{"alice": 41001, "bob": 41002}';""" in text
    assert f"root {web_root};" in text and (web_root / "index.html").is_file()
    assert f"alias {runtime / 'config.json'};" in text
    assert json.loads((runtime / "config.json").read_text()) == {
        "authProvider": "local", "lockPrefix": "BL:LOCK:"}
    assert (runtime / "auth.js").exists()
    # The console stream is passed on as it comes (a long-lived streaming GET).
    stream = text[text.index("location = /api/stream_console_output {"):]
    stream = stream[:stream.index("}")]
    assert "proxy_buffering off;" in stream and "proxy_read_timeout 1h;" in stream


def test_nginx_without_a_built_page_says_how_to_build_it(runtime, tmp_path):
    with pytest.raises(RuntimeError, match="no web page in .*: build it with web/build"):
        nginx_config.prepare(runtime, cert_names=["localhost"], web_root=tmp_path,
                             http_port=1, https_port=2, httpserver="127.0.0.1:3", seats={},
                             device_scope="read:monitor")


@pytest.mark.parametrize("seats", [{"al'ice": 1}, {"alice": 0}, {"alice": "41001"}])
def test_nginx_render_refuses_seats_that_would_break_the_config(seats, tmp_path):
    with pytest.raises(ValueError, match="bad seat"):
        nginx_config.render(state_dir=tmp_path, http_port=1, https_port=2,
                            httpserver="127.0.0.1:3", seats=seats, device_scope="read:monitor")


def test_make_cert_makes_a_local_ca_once_and_keeps_it(runtime):
    tls = runtime / "tls"
    nginx_config.make_cert(tls, ["localhost", "127.0.0.1"])
    first = {p.name: p.read_bytes() for p in tls.iterdir()}
    assert set(first) >= {"ca.crt", "ca.key", "server.crt", "server.key"}
    assert oct(tls.joinpath("server.key").stat().st_mode & 0o777) == "0o600"
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(tls / "ca.crt"),
                               str(tls / "server.crt")], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    text = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in",
                           str(tls / "server.crt")], capture_output=True, text=True).stdout
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text
    nginx_config.make_cert(tls, ["localhost", "127.0.0.1"])    # a restart: kept as it was
    assert {p.name: p.read_bytes() for p in tls.iterdir()} == first


def test_make_cert_without_names_says_how_to_call_it(runtime):
    done = subprocess.run(["sh", str(nginx_config.MAKE_CERT), str(runtime)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "usage: make-cert DIR NAME..." in done.stderr
