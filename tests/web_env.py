"""The web page (web/) in a real headless browser: build it, serve it, drive it.

* :func:`built_page` runs ``web/build`` (``npm ci`` + Vite when anything changed) and
  returns ``web/dist``, nginx's static root.
* :class:`StaticServer` serves a directory on a free loopback port (plus files of the
  test's own, e.g. ``config.json``) and records the requests it got.
* :func:`launch` starts Debian's Chromium through Playwright for Python
  (``executable_path``: Playwright's own browser download is not possible here).

Screenshots for the README: ``python tests/web_env.py shoot docs/web``.
"""
from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
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


def launch(playwright):
    """Headless Chromium. --no-sandbox: CI runs as root, where Chromium's sandbox cannot."""
    return playwright.chromium.launch(executable_path=chromium(), headless=True,
                                      args=["--no-sandbox"])


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


def shoot(out: Path) -> list[Path]:
    """The README's screenshots of what a static server can show: the login page at both
    screen sizes. (The full page needs the remote stack: phase 2.)"""
    from playwright.sync_api import sync_playwright
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    server = StaticServer(built_page()).start()
    try:
        with sync_playwright() as p:
            browser = launch(p)
            for name, viewport in (("login-laptop", LAPTOP), ("login-1080p", FULL_HD)):
                page = browser.new_page(viewport=viewport)
                page.goto(server.url)
                page.get_by_label("User name").wait_for()
                shots.append(out / f"{name}.png")
                page.screenshot(path=str(shots[-1]))
                page.close()
            browser.close()
    finally:
        server.stop()
    return shots


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "shoot":
        sys.exit("usage: python tests/web_env.py shoot OUT_DIR")
    for shot in shoot(Path(sys.argv[2])):
        print(shot)
