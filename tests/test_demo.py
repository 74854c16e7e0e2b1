"""The one-command demo (``python -m demo``, ``make demo``) starts the whole system and a
Ctrl-C or SIGTERM stops every process it started: nothing is left running."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from epics_env import REPO, free_port, wait_until


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
        def seen():
            if any(needle in line for line in self.lines):
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"demo exited ({self.proc.returncode}):\n{self.output()}")
            return False
        wait_until(seen, timeout, 0.1, what=f"{needle!r} from the demo")

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


def test_demo_starts_everything_and_ctrl_c_stops_everything(tmp_path):
    demo = DemoRun(tmp_path)
    try:
        demo.wait_for("demo: ready", 180)
        out = demo.output()
        for hint in ("lockctl acquire", "qserver queue add plan", "caput", "env.sh",
                     "lock_reacquire"):
            assert hint in out, out
        running = " | ".join(demo_processes(tmp_path).values())
        for part in ("caRepeater", "lock_ioc", "softIoc", "redis-server", "start-re-manager"):
            assert part in running, running
        # The cheat sheet's environment reaches the system: the RE worker's lock is there.
        env_sh = (tmp_path / "env.sh").read_text()
        assert "EPICS_CA_ADDR_LIST" in env_sh and "QSERVER_ZMQ_CONTROL_ADDRESS" in env_sh
        r = subprocess.run(["bash", "-c", f"source {tmp_path / 'env.sh'} && lockctl status "
                            "&& qserver status"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Free" in r.stdout and "'worker_environment_exists': True" in r.stdout, r.stdout

        demo.ctrl_c()
        assert demo.proc.wait(60) == 0, demo.output()
        assert "nothing left running" in demo.output()
        assert demo_processes(tmp_path) == {}
    finally:
        demo.kill()


def test_sigterm_during_startup_stops_what_was_started(tmp_path):
    demo = DemoRun(tmp_path)
    try:
        demo.wait_for("starting Redis", 120)
        assert demo_processes(tmp_path), "the IOCs should be running by now"
        os.kill(demo.proc.pid, signal.SIGTERM)
        assert demo.proc.wait(60) == 0, demo.output()
        assert demo_processes(tmp_path) == {}
    finally:
        demo.kill()
