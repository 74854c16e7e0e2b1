# The RunEngine of bluesky-queueserver's RE Worker, run under the beamline lock.
#
# Loaded by `start-re-manager --startup-dir clients/startup` after the lock client (00-lock.py)
# and the gated devices (10-devices.py). ophyd-websocket loads the same
# directory: there `is_re_worker_active()` is False and this file defines nothing, so
# only the queue server has a RunEngine.
#
# Settings (environment of start-re-manager): QUEUE_LOCK_SESSION (default "queue"),
# QUEUE_LOCK_LINGER seconds (default 5), QUEUE_LOCK_WAIT seconds or "none" (default
# none: a plan fails at once when someone else holds the lock), QUEUE_LOCK_LEASE
# seconds (default 30), QUEUE_LOCK_WAITING_LINGER seconds (default 1: the linger while
# someone waits for the lock). See docs/queueserver.md.
import os

from bluesky_queueserver import is_re_worker_active

if is_re_worker_active():
    from bluesky import RunEngine
    from bluesky.plan_stubs import mv, mvr  # noqa: F401 - plans offered by the queue
    from bluesky.plans import count, grid_scan, list_scan, rel_scan, scan  # noqa: F401

    from beamline_lock.ophyd_gate import default_lock
    from beamline_lock.re_guard import install_lock_guard, seconds_from_env

    RE = RunEngine({})

    # The two lines a profile collection adds (see docs/queueserver.md); default_lock()
    # is the lock client of 00-lock.py, which the gated devices of 10-devices.py ask.
    lock_guard = install_lock_guard(
        RE, default_lock(),
        session=os.environ.get("QUEUE_LOCK_SESSION") or "queue",
        linger=seconds_from_env(os.environ, "QUEUE_LOCK_LINGER", 5.0),
        wait=seconds_from_env(os.environ, "QUEUE_LOCK_WAIT", None),
        lease=seconds_from_env(os.environ, "QUEUE_LOCK_LEASE", 30.0),
        waiting_linger=seconds_from_env(os.environ, "QUEUE_LOCK_WAITING_LINGER", 1.0))

    def lock_reacquire():
        """Take the lock for the queue again; a plan the guard suspended then resumes.

        qserver function execute '{"name": "lock_reacquire"}' background
        """
        return lock_guard.reacquire()

    def lock_status():
        """The lock guard's view: held by the queue?, suspended and why, settings."""
        return lock_guard.status()
