# The beamline lock client of this process: `beamline_lock`, which every gated device of
# this startup directory asks before it writes.
#
# One startup directory serves both bluesky-queueserver (`start-re-manager --startup-dir`,
# all files run in one namespace, in name order) and ophyd-websocket (`OAS_STARTUP_DIR`,
# each file run as its own module): so later files find the lock through
# `beamline_lock.ophyd_gate.default_lock()`, not through this file's names.
#
# Environment:
#   LOCK_PREFIX             lock IOC PV prefix (default BL:LOCK:)
#   LOCK_SESSION            this process's lock session: "queue" for the queue server's
#                           worker, "web:<user>" for a web seat (default: none; then this
#                           process writes only after it acquires under a session)
#   LOCK_ALLOW_FREE_WRITES  1 to let gated devices write while the lock is Free
#                           (default 0: a process must hold the lock to move hardware)
#   LOCK_CONNECT_TIMEOUT    seconds to wait for the lock IOC at startup (default 2; the
#                           devices fail closed until it answers)
import os

from beamline_lock.client import BeamlineLock
from beamline_lock.ophyd_gate import set_default_lock


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number of seconds") from None
    if not value >= 0:
        raise ValueError(f"{name}={raw!r}: expected zero or more seconds")
    return value


def _env_flag(name: str) -> bool:
    raw = os.environ.get(name, "0").strip().lower()
    if raw not in ("0", "1", "false", "true", "no", "yes", ""):
        raise ValueError(f"{name}={raw!r}: expected 0 or 1")
    return raw in ("1", "true", "yes")


beamline_lock = BeamlineLock(
    os.environ.get("LOCK_PREFIX") or "BL:LOCK:",
    session=os.environ.get("LOCK_SESSION") or None,
    allow_free_writes=_env_flag("LOCK_ALLOW_FREE_WRITES"),
    connect_timeout=_env_seconds("LOCK_CONNECT_TIMEOUT", 2.0),
)
set_default_lock(beamline_lock)
