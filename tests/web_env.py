"""The web page (web/) in a real headless browser: build it, serve it, drive it.

* :func:`built_page` runs ``web/build`` (``npm ci`` + Vite when anything changed) and
  returns ``web/dist``, nginx's static root.
* :class:`StaticServer` serves a directory on a free loopback port (plus files of the
  test's own, e.g. ``config.json``) and records the requests it got.
* :func:`launch` starts Debian's Chromium through Playwright for Python
  (``executable_path``: Playwright's own browser download is not possible here), trusting
  the certificates it is given by their key (:func:`spki_pin`), never every certificate.
* :class:`Tab` is one user's tab on the real stack (``remote_env.RemoteStack``): a
  browser context of its own, login by keyboard, the page's controls by their labels and
  ids, full-page screenshots, a record of every lock state the page showed.

Screenshots for the README: ``python tests/web_env.py shoot docs/web`` (``make
web-screens``): the login page, and the whole page on the real stack at a laptop's and
a 1080p screen's size.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WEB = REPO / "web"
DIST = WEB / "dist"
#: Viewports the page must be readable at: a laptop and a 1080p control-room screen.
LAPTOP = {"width": 1366, "height": 768}
FULL_HD = {"width": 1920, "height": 1080}


def built_page() -> Path:
    """web/dist, built from the current sources (fails loudly, never skips)."""
    run = subprocess.run([str(WEB / "build")], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"web/build failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
    if not (DIST / "index.html").exists():
        raise RuntimeError("web/build left no web/dist/index.html")
    return DIST


def chromium() -> str:
    """Debian's Chromium (``.ci/setup-system`` installs it)."""
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        raise RuntimeError("chromium is missing: apt-get install chromium "
                           "(make test installs it through .ci/setup-system)")
    return path


def launch(playwright, pins: Iterable[str] = ()):
    """Headless Chromium. --no-sandbox: CI runs as root, where Chromium's sandbox cannot.
    ``pins``: SPKI hashes (:func:`spki_pin`) of the certificates to accept although no CA
    the browser knows signed them; every other certificate error still fails."""
    args = ["--no-sandbox"]
    pins = list(pins)
    if pins:
        args.append("--ignore-certificate-errors-spki-list=" + ",".join(pins))
    return playwright.chromium.launch(executable_path=chromium(), headless=True, args=args)


def spki_pin(cert: Path) -> str:
    """Chromium's pin of a certificate (PEM; the first of a chain, nginx's own): the
    base64 SHA-256 of its SubjectPublicKeyInfo, as --ignore-certificate-errors-spki-list
    takes it. Pinning it trusts that one key, not a CA and not every certificate."""
    def openssl(*args: str, data: bytes) -> bytes:
        run = subprocess.run(["openssl", *args], input=data, capture_output=True)
        if run.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(args)}: {run.stderr.decode(errors='replace')}")
        return run.stdout
    public_key = openssl("x509", "-pubkey", "-noout", data=cert.read_bytes())
    der = openssl("pkey", "-pubin", "-outform", "DER", data=public_key)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class StaticServer:
    """``root`` on http://127.0.0.1:<free port>/, with ``extra`` files (name -> bytes) on
    top, e.g. a ``config.json``. ``requests`` lists (method, path) of what it was asked."""

    def __init__(self, root: Path, extra: dict[str, bytes] | None = None) -> None:
        self.requests: list[tuple[str, str]] = []
        extra = dict(extra or {})
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:       # quiet; requests are recorded
                pass

            def _record(self) -> None:
                server.requests.append((self.command, self.path))

            def do_GET(self) -> None:
                self._record()
                name = self.path.split("?")[0].lstrip("/")
                if name in extra:
                    body = extra[name]
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                super().do_GET()

            def do_POST(self) -> None:
                self._record()
                self.send_error(501, "a static server: no API here")

        handler = functools.partial(Handler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/"

    def start(self) -> StaticServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def config_json(**values) -> dict[str, bytes]:
    """A ``config.json`` for :class:`StaticServer` (web/src/config.ts names the keys)."""
    return {"config.json": json.dumps(values).encode()}


#: The lock states the page can show (#lock-state): known ones, then the grey one.
KNOWN_STATES = re.compile(r"^(Free|Held|Disabled)$")

#: Installs a record of every text #lock-state shows, however briefly (a MutationObserver
#: sees each DOM change; polling could miss a flash of "Free").
_RECORD_STATES = """() => {
  const seen = window.__lockStates = [];
  const look = () => {
    const el = document.getElementById('lock-state');
    const text = el ? el.textContent : null;
    if (seen.length === 0 || seen[seen.length - 1] !== text) seen.push(text);
  };
  new MutationObserver(look).observe(document.body,
    {subtree: true, childList: true, characterData: true});
  look();
}"""

#: A WebSocket of the page's own origin to ophyd-websocket (``path``, the cookie the page
#: set carries the user's key): subscribe, then send ``request``, answer the reply to it.
_SOCKET_REQUEST = """async ([path, subscribe, request]) => {
  const url = new URL(path, location.href);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(url);
  const got = [];
  return await new Promise((resolve, reject) => {
    const fail = (why) => { ws.close(); reject(new Error(why + ': ' + JSON.stringify(got))); };
    const timer = setTimeout(() => fail('no answer in 30 s'), 30000);
    ws.onerror = () => fail('WebSocket error');
    ws.onopen = () => ws.send(JSON.stringify(subscribe));
    ws.onmessage = (event) => {
      const msg = JSON.parse(event.data);
      got.push(msg);
      if (msg.action === 'subscribe') ws.send(JSON.stringify(request));
      else if (msg.pv === undefined && msg.signal === undefined &&
               ('error' in msg || 'message' in msg)) {
        clearTimeout(timer);
        ws.close();
        resolve(msg);
      }
    };
  });
}"""


class Tab:
    """One user's tab on the real stack, in a browser context of its own (cookies and
    sessionStorage apart, like two people's browsers). Screenshots are full pages in
    ``shots``, named ``<name>-<what>.png``."""

    def __init__(self, browser, url: str, viewport: dict, shots: Path, name: str) -> None:
        self.url, self.shots, self.name = url.rstrip("/") + "/", shots, name
        self.context = browser.new_context(viewport=viewport)
        self.page = self.context.new_page()
        #: Uncaught errors of the page's scripts (a test expects none).
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def __call__(self, selector: str):
        """A locator of the page (``tab("#lock-state")``)."""
        return self.page.locator(selector)

    def label(self, text: str):
        return self.page.get_by_label(text, exact=True)

    def button(self, name: str):
        return self.page.get_by_role("button", name=name, exact=True)

    # -- login
    def open(self) -> None:
        """The login page, once it can take keys: the user name field has focus when the
        page has loaded (typing earlier loses the first keys)."""
        from playwright.sync_api import expect
        self.page.goto(self.url)
        expect(self.label("User name")).to_be_focused()

    def type_login(self, user: str, password: str) -> None:
        """Log in by keyboard, as a user would: name, Tab, password, Enter."""
        from playwright.sync_api import expect
        keyboard = self.page.keyboard
        expect(self.label("User name")).to_be_focused()
        keyboard.type(user)
        keyboard.press("Tab")
        expect(self.label("Password")).to_be_focused()
        keyboard.type(password)
        keyboard.press("Enter")

    def log_in(self, user: str, password: str) -> None:
        """Open the page, log in by keyboard, and wait until the lock shows a known state."""
        from playwright.sync_api import expect
        if not self.label("User name").is_visible():
            self.open()
        self.type_login(user, password)
        expect(self("#whoami")).to_contain_text(f"Signed in as {user}")
        expect(self("#lock-state")).to_have_text(KNOWN_STATES)

    def log_out(self) -> None:
        from playwright.sync_api import expect
        self.button("Log out").click()
        expect(self.label("User name")).to_be_focused()

    # -- the lock and the queue, through the page's controls
    def take(self, note: str, lease: int | None = None) -> None:
        self.label("Note").fill(note)
        if lease is not None:
            self.label("Lease (s)").fill(str(lease))
        self("#lock-take").click()

    def add_plan(self, plan: str, **params: str) -> None:
        """Choose ``plan`` in the plan form, type each parameter's text, Add to queue."""
        self.label("Plan").select_option(plan)
        for name, text in params.items():
            self(f"#param-{name}").fill(text)
        self("#plan-add").click()

    def record_lock_states(self) -> None:
        """From now on, remember every text #lock-state shows (:meth:`lock_states`)."""
        self.page.evaluate(_RECORD_STATES)

    def lock_states(self) -> list[str | None]:
        return self.page.evaluate("() => window.__lockStates.slice()")

    def socket_request(self, socket: str, subscribe: dict, request: dict) -> dict:
        """Bypass the page's controls: from the page's origin, with its credentials, open
        ophyd-websocket's ``socket`` ("pv-socket", "device-socket"), subscribe, send
        ``request``; the reply to it."""
        return self.page.evaluate(_SOCKET_REQUEST, [f"ophyd/api/v1/{socket}", subscribe, request])

    def api_key(self) -> str:
        """The page's API key (sessionStorage of this tab)."""
        return self.page.evaluate("() => sessionStorage.getItem('beamline-lock.apiKey')")

    # -- looks
    def shot(self, what: str) -> Path:
        """A screenshot of the whole page (not only the window)."""
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{self.name}-{what}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def scrolls_sideways(self) -> bool:
        return self.page.evaluate(
            "() => document.documentElement.scrollWidth > window.innerWidth")

    def close(self) -> None:
        self.context.close()


def start_count_paused(tab: Tab, api, **params: str) -> None:
    """From ``tab``'s plan form, queue a count with ``params`` and start the queue; pause
    the plan as soon as it runs (through httpserver, as ``api``'s user: a
    bluesky-queueserver-api ``REManagerAPI``). The queue then holds the lock for as long
    as the caller needs, however slow the machine; ``api.re_resume()`` lets it finish."""
    from playwright.sync_api import expect
    from epics_env import wait_until
    tab.add_plan("count", **params)
    expect(tab("#plan-result")).to_have_text(re.compile(r"^Added count\("))
    tab.button("Start queue").click()
    wait_until(lambda: api.status(reload=True)["re_state"] == "running", 30, 0.02,
               what="the count to start")
    api.re_pause("immediate")
    expect(tab("#queue-status")).to_contain_text("Manager paused")


def shoot(out: Path) -> list[Path]:
    """The README's screenshots, on the real stack (``remote_env.RemoteStack``): the login
    page and the whole page (the queue holding the lock; alice holding it as bob sees it;
    the operator's Force release), at a laptop's and a 1080p screen's size."""
    from playwright.sync_api import expect, sync_playwright
    from epics_env import public_dir
    from remote_env import RemoteStack
    out.mkdir(parents=True, exist_ok=True)
    shots: list[Path] = []
    work = public_dir() / "web-screens"
    work.mkdir()
    with RemoteStack(work, web_users=("alice", "bob", "operator")) as stack, \
            sync_playwright() as p:
        expect.set_options(timeout=60_000)
        browser = launch(p, pins=[spki_pin(stack.ca_file.with_name("server.crt"))])
        for size, viewport in (("laptop", LAPTOP), ("1080p", FULL_HD)):
            tab = Tab(browser, stack.url, viewport, out, "login")
            tab.open()
            shots.append(tab.shot(size))
            tab.close()
        alice = Tab(browser, stack.url, FULL_HD, out, "page")
        bob = Tab(browser, stack.url, LAPTOP, out, "page")
        operator = Tab(browser, stack.url, LAPTOP, out, "operator")
        for tab, user in ((alice, "alice"), (bob, "bob"), (operator, "operator")):
            tab.log_in(user, stack.passwords[user])
        api = stack.api("alice")
        start_count_paused(alice, api, detectors='["det"]', num="5", delay="1")
        expect(bob("#lock-queue")).to_contain_text("running count")
        shots.append(alice.shot("queue-1080p"))
        api.re_resume()
        expect(alice("#queue-history")).to_contain_text("completed")
        expect(alice("#lock-state")).to_have_text("Free")
        api.close()
        alice.take("aligning m1", 600)
        expect(alice("#devices-gate")).to_have_text("You may move devices.")
        alice.label("Target").first.fill("2")
        alice.button("Move Motor m1").click()
        expect(alice("#m1-readback")).to_have_text("2.000")
        bob.take("my turn")
        expect(bob("#lock-outcome")).to_contain_text("Take refused")
        shots.append(bob.shot("held-laptop"))
        operator.button("Force release").click()
        operator.label("Reason").fill("beam study")
        shots.append(operator.shot("force-release-laptop"))
        operator.page.keyboard.press("Escape")
        for tab in (alice, bob, operator):
            tab.close()
        browser.close()
    return shots


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "shoot":
        sys.exit("usage: python tests/web_env.py shoot OUT_DIR")
    for shot in shoot(Path(sys.argv[2])):
        print(shot)
