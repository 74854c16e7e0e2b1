"""The web page (web/), built from a clean checkout, in a real headless browser.

The page's own unit tests (Vitest: the lock keep-alive under adversarial orderings, the
httpserver client, the plan form, the console stream) and a browser smoke test against a
static server of the test's own: the login page renders, is labelled and usable by
keyboard at a laptop's and a 1080p screen's size, takes its settings from
``config.json``, and says so when the queue server does not answer. The page on the real
stack (nginx, httpserver, ophyd-websocket, lock IOC) is ``test_web_stack.py``.
"""
from __future__ import annotations

import subprocess

import pytest
from playwright.sync_api import expect, sync_playwright

from web_env import FULL_HD, LAPTOP, WEB, StaticServer, built_page, config_json, launch


@pytest.fixture(scope="module")
def dist():
    return built_page()


@pytest.fixture(scope="module")
def browser(dist):
    with sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


@pytest.fixture
def served(dist):
    server = StaticServer(dist, config_json(authProvider="local")).start()
    yield server
    server.stop()


def test_vitest_unit_tests_of_the_page_pass(dist):
    run = subprocess.run(["npx", "vitest", "run"], cwd=WEB, capture_output=True, text=True)
    assert run.returncode == 0, f"Vitest failed:\n{run.stdout}\n{run.stderr}"
    print(run.stdout.strip().splitlines()[-4:])


@pytest.mark.parametrize("viewport", [LAPTOP, FULL_HD], ids=["laptop", "1080p"])
def test_login_page_renders_and_is_keyboard_usable(browser, served, viewport, tmp_path):
    page = browser.new_page(viewport=viewport)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(served.url)

    expect(page.get_by_role("heading", name="Beamline — remote access")).to_be_visible()
    # Focus starts in the first field; Tab walks the labelled fields to the button.
    expect(page.get_by_label("User name")).to_be_focused()
    page.keyboard.type("alice")
    page.keyboard.press("Tab")
    expect(page.get_by_label("Password")).to_be_focused()
    page.keyboard.type("not-checked-here")
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Log in")).to_be_focused()
    page.screenshot(path=str(tmp_path / f"login-{viewport['width']}.png"))
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), \
        "the login page scrolls sideways"

    # Enter logs in: the provider named in config.json; a server that is no httpserver
    # is reported as the queue server being unreachable, and the password is cleared.
    page.keyboard.press("Enter")
    expect(page.get_by_role("alert")).to_have_text("queue server unreachable (HTTP 501)")
    assert ("POST", "/api/auth/provider/local/token") in served.requests, served.requests
    expect(page.get_by_label("Password")).to_have_value("")
    expect(page.get_by_label("User name")).to_have_value("alice")
    page.screenshot(path=str(tmp_path / f"login-error-{viewport['width']}.png"))
    # Enter in a field submits too.
    page.get_by_label("Password").fill("again")
    page.get_by_label("Password").press("Enter")
    expect(page.get_by_label("Password")).to_have_value("")
    assert served.requests.count(("POST", "/api/auth/provider/local/token")) == 2
    assert errors == [], errors
    page.close()


def test_a_broken_config_json_is_reported_not_ignored(dist, browser, tmp_path):
    server = StaticServer(dist, config_json(defaultLease="300")).start()
    try:
        page = browser.new_page(viewport=LAPTOP)
        page.goto(server.url)
        expect(page.get_by_role("alert")).to_contain_text(
            'config.json: "defaultLease" must be a number')
        page.close()
    finally:
        server.stop()
