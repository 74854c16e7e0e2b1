"""What nginx in front costs remote users, in one run on this machine (docs/remote.md).

The real stack of ``tests/remote_env.py`` on free loopback ports: lock IOC, beamline
softIoc, Redis, RE Manager, bluesky-httpserver, alice's ophyd-websocket seat (as OS user
alice) and nginx (TLS, the njs auth check).

* queue status: ``GET /api/status`` with alice's API key, through nginx over HTTPS against
  the same request straight to bluesky-httpserver (the reference, same run); one
  keep-alive connection each, requests interleaved. Ratio of medians, medians and p99.
* lock change to a web page: a CA put to ``$(P)Acquire`` / ``$(P)Release`` until the
  ``State`` update arrives at a WebSocket client subscribed through nginx (wss, after the
  auth check); for reference the same update at a client of the seat itself (no nginx)
  and at a CA monitor in this process. Median and p99; goal: p99 through nginx < 50 ms.

Run: .venv/bin/python bench/bench_remote.py [--requests N] [--changes N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import fmt, pct  # noqa: E402
from epics_env import HOST  # noqa: E402
from remote_env import RemoteStack  # noqa: E402
from ws_env import WsClient  # noqa: E402

GOAL_P99 = 0.050


def status_requests(stack: RemoteStack, key: str, n: int) -> dict[str, list[float]]:
    import httpx
    headers = {"Authorization": f"ApiKey {key}"}
    out: dict[str, list[float]] = {"nginx": [], "direct": []}
    with httpx.Client(base_url=stack.url, verify=stack.ssl_context(), headers=headers) as via, \
            httpx.Client(base_url=stack.direct_url, headers=headers) as direct:
        clients = {"nginx": via, "direct": direct}
        for i in range(n + 20):            # the first 20 of each warm up
            for name, client in clients.items():
                t0 = time.perf_counter()
                answer = client.get("/api/status")
                elapsed = time.perf_counter() - t0
                if answer.status_code != 200:
                    raise RuntimeError(f"{name}: /api/status answered {answer.status_code}: "
                                       f"{answer.text}")
                if i >= 20:
                    out[name].append(elapsed)
    return out


class CAState:
    """A pyepics monitor of $(P)State: arrival time of each value."""

    def __init__(self, pvname: str) -> None:
        import epics
        self.cond = threading.Condition()
        self.seen: list[tuple[float, int]] = []
        self.pv = epics.PV(pvname, callback=self._cb, auto_monitor=True)
        if not self.pv.wait_for_connection(10):
            raise RuntimeError(f"{pvname} does not connect")

    def _cb(self, value=None, **_) -> None:
        with self.cond:
            self.seen.append((time.monotonic(), int(value)))
            self.cond.notify_all()

    def wait(self, want: int, since: float) -> float:
        with self.cond:
            def found():
                return next((t for t, v in self.seen if t >= since and v == want), None)
            if not self.cond.wait_for(lambda: found() is not None, 10):
                raise RuntimeError(f"CA monitor never saw State {want}")
            return found()


def lock_changes(stack: RemoteStack, key: str, n: int) -> dict[str, list[float]]:
    import epics
    P = stack.LOCK
    os.environ.update(stack.net.client_env())
    seat_port = stack.services["seat:alice"].ports["http"]
    pages = {"nginx": stack.socket("pv-socket", api_key=key),
             "seat": WsClient(f"ws://127.0.0.1:{seat_port}/api/v1/pv-socket")}
    ca = CAState(P + "State")
    acquire, release = epics.PV(P + "Acquire"), epics.PV(P + "Release")
    for pv in (acquire, release):
        pv.wait_for_connection(10)
    out: dict[str, list[float]] = {"nginx": [], "seat": [], "ca": []}
    try:
        for page in pages.values():
            page.request({"action": "subscribe", "pvs": [P + "State"]},
                         lambda m: m.get("action") == "subscribe")
            page.wait_for(lambda m: m.get("pv") == P + "State" and m.get("value") == 0)
        for i in range(n + 10):
            want = 1 if i % 2 == 0 else 0
            marks = {name: page.mark() for name, page in pages.items()}
            t0 = time.monotonic()
            (acquire if want else release).put("bench", wait=True, timeout=10)
            arrived = {name: page.wait_for(
                lambda m: m.get("pv") == P + "State" and m.get("value") == want, 10,
                marks[name], f"State {want}")[0] for name, page in pages.items()}
            arrived["ca"] = ca.wait(want, t0)
            if i >= 10:
                for name, t in arrived.items():
                    out[name].append(t - t0)
    finally:
        for page in pages.values():
            page.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--changes", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        stack = RemoteStack(Path(tmp), web_users=("alice",), open_environment=False)
        stack.start()
        try:
            key = stack.api_key("alice")
            status = status_requests(stack, key, args.requests)
            changes = lock_changes(stack, key, args.changes)
        finally:
            stack.stop()
    print(f"remote access benchmark on {HOST} ({os.cpu_count()} CPUs): nginx "
          f"{stack.url} (TLS, keep-alive), bluesky-httpserver, ophyd-websocket seat of alice")
    print(fmt("status direct (reference)", status["direct"], width=34))
    print(fmt("status through nginx", status["nginx"], width=34))
    print(f"{'ratio nginx/direct':<34} median "
          f"{statistics.median(status['nginx']) / statistics.median(status['direct']):6.2f}"
          f"        p99 {pct(status['nginx'], 99) / pct(status['direct'], 99):6.2f}")
    print(fmt("lock change -> CA monitor", changes["ca"], width=34))
    print(fmt("lock change -> seat WebSocket", changes["seat"], width=34))
    print(fmt("lock change -> WebSocket via nginx", changes["nginx"], width=34))
    p99 = pct(changes["nginx"], 99)
    print(f"{'goal p99 via nginx < 50 ms':<34} {'met' if p99 < GOAL_P99 else 'NOT MET'} "
          f"({p99 * 1e3:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
