"""The one-command demo (``python -m demo``, ``make demo``) starts the whole system (the
remote half too: httpserver, a seat per web user, nginx with the web page over HTTPS) and
a Ctrl-C or SIGTERM stops every process it started: nothing is left running."""
from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from demo import services
from epics_env import REPO, free_port, installation, user_dir


@pytest.fixture
def workdir() -> Path:
    """The demo's work dir: its services' accounts must reach it (tmp_path is private)."""
    path = user_dir(None, "demo")
    path.chmod(0o711)
    return path


def demo_processes(workdir: Path) -> dict[int, str]:
    """Live processes started by the demo in ``workdir``: marked in their environment, or
    in a process group the demo listed in ``processes.txt`` (redis rewrites its environ)."""
    marker = f"BEAMLINE_LOCK_DEMO={workdir}".encode()
    listed = workdir / "processes.txt"
    groups = {int(line.split()[0]) for line in listed.read_text().splitlines()} \
        if listed.exists() else set()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            marked = marker in (entry / "environ").read_bytes().split(b"\0")
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fields[0] != "Z" and (marked or int(fields[2]) in groups):
            found[int(entry.name)] = cmd
    return found


class DemoRun:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.lines: list[str] = []
        # A CA repeater port of its own: on a fresh machine no repeater runs yet, and the
        # demo must not leave the one its clients need behind.
        env = dict(os.environ, EPICS_CA_REPEATER_PORT=str(free_port()))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "demo", "--free-ports", "--workdir", str(workdir),
             "--linger", "1"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)  # like a terminal: its own foreground process group
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(needle in line for line in self.lines):
            if self.proc.poll() is not None:
                time.sleep(0.2)  # the reader thread's last lines
                raise AssertionError(f"demo exited ({self.proc.returncode}) before "
                                     f"{needle!r}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} from the demo within {timeout} s:\n"
                                     f"{self.output()}")
            time.sleep(0.1)

    def ctrl_c(self) -> None:
        """What a terminal does on Ctrl-C: SIGINT to the foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for pid in demo_processes(self.workdir):
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_demo_starts_everything_and_ctrl_c_stops_everything(workdir):
    tmp_path = workdir
    demo = DemoRun(tmp_path)
    try:
        # Eleven services, four of them ophyd-websocket seats loading the startup directory.
        demo.wait_for("demo: ready", 300)
        out = demo.output()
        for hint in ("lockctl acquire", "qserver queue add plan", "caput", "env.sh",
                     "lock_reacquire", "REManagerAPI(http_server_uri=", "SSL_CERT_FILE"):
            assert hint in out, out
        running = " | ".join(demo_processes(tmp_path).values())
        for part in ("caRepeater", "lock_ioc", "softIoc", "redis-server", "start-re-manager",
                     "bluesky_httpserver.server:app", "ophyd-websocket", "nginx: master",
                     "nginx: worker"):
            assert part in running, running
        for part, accounts in (("lock_ioc", {"lockioc"}), ("softIoc", {"beamioc"}),
                               ("start-re-manager", {"bluesky"}),
                               ("bluesky_httpserver.server:app", {"bluesky"}),
                               ("nginx", {"www-data"}),        # master and worker
                               # a seat per web user, each as that user
                               ("ophyd-websocket", {"alice", "bob", "operator", "observer"})):
            owners = {services.process_owner(pid)
                      for pid, cmd in demo_processes(tmp_path).items()
                      if part in cmd and not cmd.split()[0].endswith("runuser")}
            assert owners == accounts, (part, owners)

        # The cheat sheet's environment reaches the system: the RE worker's lock is there.
        env_sh = (tmp_path / "env.sh").read_text()
        assert "EPICS_CA_ADDR_LIST" in env_sh and "QSERVER_ZMQ_CONTROL_ADDRESS" in env_sh
        r = subprocess.run(["bash", "-c", f"source {tmp_path / 'env.sh'} && lockctl status "
                            "&& qserver status"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Free" in r.stdout and "'worker_environment_exists': True" in r.stdout, r.stdout
        # The cheat sheet's operator command, run as printed: a refusal (nothing to
        # force-release) exits non-zero with the reason (caput -c), never 0.
        line = next(ln for ln in out.splitlines() if "runuser -u operator" in ln).strip()
        r = subprocess.run(["bash", "-c", f"source {tmp_path / 'env.sh'} && {line}"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "ForceRelease: refused: the lock is not held" in \
            r.stdout + r.stderr, (line, r.stdout, r.stderr)

        # The web page answers at the printed URL, over TLS verified against the printed CA,
        # with this demo's settings; the accounts and the HTTP queue API work as printed
        # (it queues a count and starts it: Ctrl-C comes while it runs).
        url = re.search(r"the web page at\s+(https://localhost:\d+)/", out).group(1)
        ca = Path(re.search(r"made once and kept: (\S+)", out).group(1))
        assert not ca.is_relative_to(tmp_path)          # outlives the demo's work dir
        tls = ssl.create_default_context(cafile=str(ca))
        with urllib.request.urlopen(url + "/", context=tls, timeout=30) as page:
            assert page.read().decode() == (
                installation().share / "web" / "dist" / "index.html").read_text()
        with urllib.request.urlopen(url + "/config.json", context=tls, timeout=30) as conf:
            assert json.loads(conf.read()) == {"authProvider": "local",
                                               "lockPrefix": "BL:LOCK:", "beamlinePrefix": "BL:"}
        for user, role in (("alice", "staff"), ("bob", "staff"), ("operator", "operator"),
                           ("observer", "observer")):
            assert re.search(rf"^  {user} +[A-Za-z0-9]{{12}}  {role}: ", out, re.M), (user, out)
        shell = out[out.index("e.g. in a Python shell:"):].splitlines()[1:]
        snippet = "\n".join(line.strip() for line in shell if line.startswith("  "))
        snippet += "\nprint(RM.status()['worker_environment_exists'])"
        r = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and r.stdout.splitlines()[-1] == "True", \
            (snippet, r.stdout, r.stderr)

        demo.ctrl_c()
        assert demo.proc.wait(60) == 0, demo.output()
        assert "nothing left running" in demo.output()
        assert demo_processes(tmp_path) == {}
        assert ca.is_file()                             # trusted once, kept
    finally:
        demo.kill()


def test_the_logs_removed_at_ctrl_c_and_how_to_keep_them_are_said():
    """Ctrl-C removes the temporary work dir: the cheat sheet and the README say so and
    name --keep / --workdir."""
    from demo.__main__ import Demo, parse_args

    def note(*argv: str) -> str:
        return Demo.logs_note(SimpleNamespace(args=parse_args(list(argv)), work=Path("/w")))
    assert "removed at Ctrl-C" in note() and "--keep" in note() and "--workdir" in note()
    assert note("--keep") == note("--workdir", "/w") == "Logs: /w"
    readme = (REPO / "README.md").read_text()
    demo = readme[readme.index("**The whole system in one command:**"):]
    demo = demo[:demo.index("\n## ")]
    assert "--keep" in demo and "--workdir" in demo, demo


def test_sigterm_during_startup_stops_what_was_started(workdir):
    tmp_path = workdir
    demo = DemoRun(tmp_path)
    try:
        demo.wait_for("starting Redis", 120)
        assert demo_processes(tmp_path), "the IOCs should be running by now"
        os.kill(demo.proc.pid, signal.SIGTERM)
        assert demo.proc.wait(60) == 0, demo.output()
        assert demo_processes(tmp_path) == {}
    finally:
        demo.kill()
