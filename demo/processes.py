"""Child processes of the demo, each in its own process group, and stopping them all.

Every child starts in a new session, so a Ctrl-C at the terminal reaches only the demo,
which then stops the children itself, newest first: TERM to the whole group (the RE
Manager's worker processes included), KILL to whatever is left, then reap.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable


class Child:
    """One named server of the demo, its log file and readiness check."""

    def __init__(self, name: str, argv: list[str], *, env: dict, log: Path,
                 cwd: Path | None = None, stdin_pipe: bool = False):
        self.name, self.argv, self.env, self.log, self.cwd = name, argv, env, log, cwd
        self.stdin_pipe = stdin_pipe
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Child":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE if self.stdin_pipe else subprocess.DEVNULL,
                start_new_session=True)
        return self

    def wait_ready(self, ready: Callable[[], bool], timeout: float) -> None:
        """Call ``ready`` until true; fail with the log's tail if the child dies or lags."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; "
                                   f"end of {self.log}:\n{self.tail()}")
            try:
                if ready():
                    return
            except Exception:  # noqa: BLE001 - not answering yet
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not become ready within {timeout:g} s; end of "
                           f"{self.log}:\n{self.tail()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10) -> None:
        if self.proc is None:
            return
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        stop_group(self.proc, timeout)


def stop_group(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    """TERM the process group led by ``proc``, KILL what is left after ``timeout``, reap
    the leader. Also what the tests use to stop the servers they start."""
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_alive(proc.pid):
            proc.poll()  # reap the leader so it does not count as alive
            time.sleep(0.05)
        if not group_alive(proc.pid):
            break
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process of process group ``pgid`` exists."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def port_free(port: int) -> bool:
    """Whether 127.0.0.1:``port`` is free for TCP and UDP (CA uses both)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", port))
    except OSError:
        return False
    return udp_port_free(port)


def udp_port_free(port: int) -> bool:
    """Whether UDP 127.0.0.1:``port`` is free (the CA repeater's port is UDP only)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def free_port(taken: set[int]) -> int:
    """A port free for TCP and UDP on 127.0.0.1, not in ``taken`` (which it joins)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
        if port not in taken and port not in (5064, 5065) and port_free(port):
            taken.add(port)
            return port
    raise RuntimeError("no free port on 127.0.0.1")
