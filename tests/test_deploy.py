"""Services run the way EPICS sites run them (issue 14 §2): the lock IOC under procServ
from ``iocBoot/iocLock/``, and the systemd units of ``deploy/systemd/`` (lock IOC, beamline
IOC, ophyd-websocket seat), each under its own service account.

systemd is not PID 1 here, so the units are checked by ``systemd-analyze verify`` and their
command lines are run as systemd would run them: the unit's ``User=``, ``Environment=`` then
``EnvironmentFile=`` (the site's example files of ``deploy/etc/beamline-lock/``),
``RuntimeDirectory=``/``StateDirectory=``, ``WorkingDirectory=``, ``ExecStartPre=`` then
``ExecStart=``, from the installed copies (``$PREFIX/share/deploy/systemd``), with only the
site paths (/etc/beamline-lock, /run/<account>, /var/lib/<account>) and ports moved to this
test's own.
"""
from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from demo import services
from demo.install import with_prefix
from epics_env import REPO, CANetwork, free_port, identity, installation, user_dir, wait_until

UNITS = ("beamline-lock-ioc", "beamline-ioc", "beamline-ows")
#: The clean environment systemd starts services with (runuser adds HOME, USER ...).
SYSTEMD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG": "C.UTF-8"}


def unit_path(name: str) -> Path:
    return installation().share / "deploy" / "systemd" / f"{name}.service"


def test_units_pass_systemd_analyze_verify():
    paths = [str(unit_path(name)) for name in UNITS]
    r = subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "not executable" not in r.stderr and "Unknown" not in r.stderr, r.stderr
    for name in UNITS:       # every path is the installation's own (none of the default)
        text = unit_path(name).read_text()
        assert text == with_prefix((REPO / "deploy" / "systemd" / f"{name}.service")
                                   .read_text(), installation().prefix)
        assert re.findall(r"/opt/beamline-lock[\w.-]*", text) and all(
            path == str(installation().prefix)
            for path in re.findall(r"/opt/beamline-lock[\w.-]*", text)), text
        assert f"BEAMLINE_LOCK_PREFIX={installation().prefix}\n" in text or \
            "BEAMLINE_LOCK_PREFIX" not in text
    users = {name: _unit(unit_path(name), {})["User"][0] for name in UNITS}
    assert users == {"beamline-lock-ioc": "lockioc", "beamline-ioc": "beamioc",
                     "beamline-ows": "oaswww"}


def _unit(path: Path, moved: dict[str, str]) -> dict[str, list[str]]:
    """The [Service] settings of a unit (every value of repeated keys, in order), with the
    site paths in ``moved`` replaced."""
    text = path.read_text()
    for old, new in moved.items():
        text = text.replace(old, new)
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       dict_type=_MultiDict, empty_lines_in_values=False)
    parser.optionxform = str
    parser.read_string(text)
    return {k: v.split("\n") for k, v in parser["Service"].items()}


class _MultiDict(dict):
    """Keeps every value of a key that a unit repeats (EnvironmentFile=, Environment=):
    configparser then joins them with newlines."""

    def __setitem__(self, key, value):
        if isinstance(value, list) and key in self and isinstance(self[key], list):
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def _environment(settings: dict[str, list[str]]) -> dict[str, str]:
    env = dict(SYSTEMD_ENV)
    for line in settings.get("Environment", []):
        for word in shlex.split(line):
            key, _, value = word.partition("=")
            env[key] = value
    for name in settings.get("EnvironmentFile", []):       # later files win
        optional = name.startswith("-")
        path = Path(name.lstrip("-"))
        if not path.exists():
            assert optional, f"EnvironmentFile {path} is missing"
            continue
        env.update(services.read_env_file(path))
    return env


def _command(line: str, env: dict[str, str]) -> list[str]:
    """An Exec line as systemd splits and expands it (``${VAR}``, ``$VAR``, ``$$``)."""
    words = []
    for word in shlex.split(line.lstrip("-@+!")):
        word = re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word.replace("$$", "\0"))
        if re.fullmatch(r"\$(\w+)", word):
            word = env.get(word[1:], "")
        words.append(word.replace("\0", "$"))
    return words


class Site:
    """/etc/beamline-lock, /run/<account>, /var/lib/<account> of this test, filled from
    deploy/etc/beamline-lock/ with this test's ports; the units run from them."""

    def __init__(self) -> None:
        self.root = user_dir(None, "site")
        self.root.chmod(0o755)
        self.etc = self.root / "etc"
        self.ports = {"lock": free_port(), "beamline": free_port(), "ows": free_port()}
        example = installation().share / "deploy" / "etc" / "beamline-lock"
        shutil.copytree(example, self.etc)
        self.moved = {"/etc/beamline-lock": str(self.etc)}
        for account in ("lockioc", "beamioc", "oaswww"):
            for kind in ("run", "var/lib"):
                self.moved[f"/{kind}/{account}"] = str(self.root / kind / account)
        for path in self.etc.iterdir():
            text = path.read_text()
            for old, new in self.moved.items():
                text = text.replace(old, new)
            text = (text.replace("5074", str(self.ports["lock"]))
                    .replace("5076", str(self.ports["beamline"]))
                    .replace("OAS_PORT=8001", f"OAS_PORT={self.ports['ows']}"))
            path.write_text(text)
        self.net = CANetwork()
        self.net.add(self.ports["lock"])
        self.net.add(self.ports["beamline"])
        self.stack = services.Stack(self.root)

    def start(self, name: str, ready: services.Ready) -> services.Launched:
        """Run the unit ``name`` as systemd would: pre-commands, then its service."""
        settings = _unit(unit_path(name), self.moved)
        user = settings["User"][0]
        for kind, key in (("run", "RuntimeDirectory"), ("var/lib", "StateDirectory")):
            for sub in settings.get(key, []):
                services.owned_dir(self.root / kind / sub, user, 0o755)
        env = _environment(settings)
        cwd = Path(settings["WorkingDirectory"][0]) if "WorkingDirectory" in settings else None
        for pre in settings.get("ExecStartPre", []):
            r = subprocess.run(services.as_user(user, _command(pre, env)), env=env, cwd=cwd,
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, (name, pre, r.stdout, r.stderr)
        service = services.Service(name, _command(settings["ExecStart"][0], env), env=env,
                                   user=user, cwd=cwd, ready=ready, ready_timeout=90)
        return self.stack.start(service)


@pytest.fixture
def site():
    site = Site()
    yield site
    site.stack.stop()


def _serves(launched: services.Launched) -> list[str]:
    """The accounts of the processes the unit started (runuser itself aside)."""
    pids = services.group_pids(launched.proc.pid)
    pids += [kid for pid in pids for kid in services.children(pid)]
    return sorted({services.process_owner(pid) for pid in pids if pid != launched.proc.pid})


def test_units_run_as_their_accounts_and_procserv_restarts_a_killed_lock_ioc(site):
    net = site.net
    lock = site.start("beamline-lock-ioc", services.ca_ready("BL:LOCK:Heartbeat",
                                                              net.client_env))
    beamline = site.start("beamline-ioc", services.ca_ready("BL:RingCurrent", net.client_env))
    ows_url = f"http://127.0.0.1:{site.ports['ows']}/api/v1/devices"
    seat = site.start("beamline-ows", services.http_ready(ows_url))
    assert _serves(lock) == ["lockioc"] and _serves(beamline) == ["beamioc"]
    assert _serves(seat) == ["oaswww"]
    ioc = services.procserv_child(lock)
    assert services.process_owner(ioc) == "lockioc"
    assert "lock-ioc" in Path(f"/proc/{ioc}/cmdline").read_text()

    # The ACF the unit's ExecStartPre generated is the one the beamline IOC enforces.
    body = '{"session": "align", "lease": 600, "note": "under procServ"}'
    net.caput("BL:LOCK:Acquire", body, user="alice").check_returncode()
    assert net.caput("BL:Shutter:Open", "1", user="bluesky", text=False).returncode != 0
    token = net.caget("BL:LOCK:Token")

    killed = time.monotonic()
    subprocess.run(["kill", "-9", str(ioc)], check=True)
    wait_until(lambda: services.procserv_child(lock) not in (None, ioc), 30, 0.05,
               what="procServ to start the lock IOC again")
    wait_until(lambda: net.run("caget", "-w", "0.5", "BL:LOCK:Heartbeat").returncode == 0,
               30, 0.05, what="the restarted lock IOC to serve")
    print(f"lock IOC killed with -9 under procServ: serving again after "
          f"{time.monotonic() - killed:.2f} s (bench/bench_procserv.py measures it)")
    assert (net.caget("BL:LOCK:State"), net.caget("BL:LOCK:Owner"),
            net.caget("BL:LOCK:Session"), net.caget("BL:LOCK:Token")) == \
        ("Held", identity("alice"), "align", token)
    wait_until(lambda: net.caput("BL:Shutter:Open", "1", user="alice", text=False)
               .returncode == 0, 20, 0.2, what="alice's write through the ACF again")
    assert lock.running() and seat.running() and beamline.running()
