"""nginx's runtime directory for beamline-lock: nginx.conf rendered from nginx.conf.in,
the auth check (auth.js), the web page's settings (config.json), and a TLS certificate
made at the first start (make-cert). See docs/remote.md.

Everything nginx writes, and everything it reads but the page itself, is under one state
directory, so nginx can run as an unprivileged account of its own that needs no access to
the checkout (which may live in a home directory other accounts cannot enter):

    <state>/nginx.conf  auth.js  config.json  tls/{ca,server}.{crt,key}  tmp/  access.log  nginx.pid

The page is served read-only from ``web_root``: ``web/dist`` as ``web/build`` makes it,
installed with the run-time files every account reads (``$PREFIX/share/web/dist``). The
TLS directory may live elsewhere (``tls_dir``), e.g. where it outlasts the state directory
so that clients trust its CA once.
"""
from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "nginx.conf.in"
AUTH_JS = HERE / "auth.js"
MAKE_CERT = HERE / "make-cert"
#: The web page as web/build makes it, in the checkout (the installed copy is
#: ``$PREFIX/share/web/dist``).
WEB_ROOT = HERE.parent.parent / "web" / "dist"
#: Debian's binary and the njs module the config loads (libnginx-mod-http-js).
NGINX = "/usr/sbin/nginx"
NJS_MODULE = Path("/usr/lib/nginx/modules/ngx_http_js_module.so")

_USER = re.compile(r"^[A-Za-z0-9_.@+-][A-Za-z0-9_.@+$-]{0,63}$")
_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")


def render(*, state_dir: Path, http_port: int, https_port: int, httpserver: str,
           seats: Mapping[str, int], device_scope: str, web_root: Path = WEB_ROOT,
           tls_dir: Path | None = None, listen: str = "127.0.0.1") -> str:
    """nginx.conf text. ``seats``: web user -> loopback port of their ophyd-websocket;
    ``tls_dir``: where make-cert keeps the certificates (default ``<state_dir>/tls``)."""
    for user, port in seats.items():
        if not _USER.match(user) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"bad seat {user!r} -> {port!r}: a user name and a TCP port")
    if not re.fullmatch(r"[a-z]+(:[a-z]+)+", device_scope):
        raise ValueError(f"bad scope {device_scope!r}")
    tls = tls_dir or state_dir / "tls"
    values = {
        "STATE_DIR": str(state_dir), "HTTP_PORT": str(http_port),
        "HTTPS_PORT": str(https_port), "HTTP_LISTEN": f"{listen}:{http_port}",
        "HTTPS_LISTEN": f"{listen}:{https_port}", "HTTPSERVER": httpserver,
        "CERT": str(tls / "server.crt"), "KEY": str(tls / "server.key"),
        "WEB_ROOT": str(web_root),
        "SEATS_JSON": json.dumps(dict(seats), sort_keys=True),
        "DEVICE_SCOPE": device_scope,
    }
    text = TEMPLATE.read_text()
    missing = set(_PLACEHOLDER.findall(text)) - set(values)
    if missing:
        raise ValueError(f"{TEMPLATE.name}: no value for {sorted(missing)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def prepare(state_dir: Path, *, cert_names: Sequence[str], web_root: Path = WEB_ROOT,
            web_config: Mapping | None = None, tls_dir: Path | None = None,
            owner: str | None = None, **render_args) -> Path:
    """Write the runtime directory (config, auth.js, the page's ``config.json``; the
    certificate only if there is none yet) and return the path of nginx.conf. ``owner``:
    the account nginx runs as, which then owns the directory and makes the certificate
    itself. ``web_config``: the page's settings (web/src/config.ts names the keys)."""
    if not (web_root / "index.html").is_file():
        raise RuntimeError(f"no web page in {web_root}: build it with web/build (make "
                           "install puts it in $PREFIX/share/web/dist)")
    tls_dir = tls_dir or state_dir / "tls"
    for path in (state_dir / "tmp", tls_dir):
        path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(AUTH_JS, state_dir / "auth.js")
    (state_dir / "config.json").write_text(json.dumps(dict(web_config or {}), indent=1) + "\n")
    conf = state_dir / "nginx.conf"
    conf.write_text(render(state_dir=state_dir, web_root=web_root, tls_dir=tls_dir,
                           **render_args))
    if owner is not None:
        subprocess.run(["chown", "-R", f"{owner}:", str(state_dir)], check=True)
    make_cert(tls_dir, cert_names, user=owner)
    return conf


def make_cert(tls_dir: Path, names: Sequence[str], user: str | None = None) -> None:
    """``make-cert``: a local CA and a server certificate, unless they exist already.
    The script is piped to ``sh`` so that ``user`` needs no access to the checkout."""
    argv = setpriv(user) + ["sh", "-s", "--", str(tls_dir), *names]
    tls_dir.mkdir(parents=True, exist_ok=True)
    if user is not None:        # make-cert writes there as ``user``
        entry = pwd.getpwnam(user)
        os.chown(tls_dir, entry.pw_uid, entry.pw_gid)
    # Two stacks sharing a TLS directory (a demo and a test's demo) make it once.
    with open(tls_dir / ".make-cert.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = subprocess.run(argv, input=MAKE_CERT.read_bytes(), capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"make-cert failed ({done.returncode}): "
                           f"{done.stderr.decode(errors='replace')}")


def check_config(conf: Path, user: str | None = None) -> subprocess.CompletedProcess:
    """``nginx -t`` on a rendered config (as ``user``, who will run it)."""
    argv = setpriv(user) + [NGINX, "-t", "-q", "-c", str(conf), "-e", "stderr"]
    return subprocess.run(argv, capture_output=True, text=True)


def setpriv(user: str | None) -> list[str]:
    """The command prefix that runs a program as OS account ``user`` (its uid, primary gid
    and groups, like systemd's ``User=``); empty for None (as the caller)."""
    if user is None:
        return []
    entry = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups"]
