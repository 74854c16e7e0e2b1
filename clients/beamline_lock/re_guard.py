"""Run a bluesky RunEngine under the beamline lock, through bluesky's own extension points.

``install_lock_guard(RE, lock)`` adds two things to an existing RunEngine and changes
nothing else (bluesky-queueserver stays unmodified; a profile collection adds two lines):

- a **preprocessor** (``RE.preprocessors``) that wraps every plan. Before the plan's
  first message it acquires the lock under the queue's session (one CA put, confirmed
  through the monitors; optionally waiting for a busy lock). If someone else holds the
  lock the plan fails at once, before any message reaches hardware, with a message
  naming holder, note and lease end (bluesky-queueserver puts it in the history item and
  stops the queue). Between two plans the lock stays held; it is released only after
  ``linger`` seconds with no plan running. While a plan runs, every message that may
  make hardware do something (all but the reads and bookkeeping of ``READ_COMMANDS``) is
  held back unless this process still holds the lock: a fence against the instant
  between losing the lock and the suspension. Stopping and making safe are never held
  back: ``stop`` messages and safe writes of gated devices (``ophyd_gate.gate(safe=)``,
  e.g. closing a shutter) pass the fence.
- a **suspender** (``RE.install_suspender``) on an ophyd soft ``Signal`` that is 1 while
  a plan runs and the lock is not (or no longer) held by us. The signal is driven by the
  lock client's monitor callbacks (no polling). When the lock is revoked mid-plan
  (``ForceRelease``, lease lost, lock IOC gone), bluesky suspends the plan within a
  CA round trip and prints why; the plan resumes only when the queue holds the lock
  again (:meth:`LockGuard.reacquire`, e.g. ``qserver function execute``). On
  suspending, bluesky stops every device the plan moved; the gate lets ``stop()``
  through whatever the lock says, so a motor moving when the lock is lost is stopped.

The lease is kept alive by the lock client's background renewal; the guard's CA traffic
is the client's monitors plus one Acquire per plan and one Release per queue run.

Sharing the beamline (issue 18):

- every plan's Acquire declares the plan as the holder's running **task** (the queue's
  group is ``unattended`` in the lock config), so a higher-authority request does not
  take the lock mid-plan: the lock IOC names the waiter in ``$(P)YieldTo``, and at the
  end of the plan (or at once, between plans) the guard **hands the lock over** to them
  and waits in line for it again (``Handover`` with ``requeue``, one step). The next
  plan waits in its preprocessor, before any hardware, until the lock is the queue's
  again; with no plan within ``linger``, the queue leaves the line;
- with anyone else waiting, the lock is released ``waiting_linger`` seconds after the
  last plan instead of ``linger`` (the lock then goes to the first in line);
- every run opened under the guard carries the lock in its start document
  (``lock``: owner, session, note, token, acquired_at), so data can be traced to its
  holder (``lockctl history --token N``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from typing import Any, Generator, Iterable

from bluesky.preprocessors import plan_mutator
from bluesky.suspenders import SuspendBoolHigh
from bluesky.utils import Msg, single_gen
from ophyd import Signal

from .client import (HELD, BeamlineLock, LockDisabled, LockError, LockHeld, LockRefused,
                     LockStatus, LockUnavailable, RequestLapsed, until_text)
from .ophyd_gate import is_safe_write

log = logging.getLogger("beamline_lock.re_guard")

DEFAULT_SESSION = "queue"
DEFAULT_LINGER = 5.0
DEFAULT_WAITING_LINGER = 1.0
DEFAULT_LEASE = 30.0
DEFAULT_RESUME_DELAY = 1.0
#: Plan messages that only read or keep books: they pass the fence while the lock is lost.
#: Every other message (``set``, ``trigger``, ``stage``, ``kickoff``, ``configure``, a
#: command a beamline registered, ...) may make a device do something, so it waits.
READ_COMMANDS = frozenset({
    "open_run", "close_run", "create", "save", "drop", "read", "locate", "describe",
    "declare_stream", "collect", "monitor", "unmonitor", "checkpoint", "clear_checkpoint",
    "rewindable", "sleep", "wait", "wait_for", "null", "pause", "input", "subscribe",
    "unsubscribe", "install_suspender", "remove_suspender"})
#: Plan messages that stop or make safe: they pass the fence whatever the lock says.
SAFE_COMMANDS = frozenset({"stop"})
#: How ``print`` lines of the guard start, so they are easy to find in console output.
TAG = "beamline-lock guard:"


class LockSuspender(SuspendBoolHigh):
    """Suspends while the guard's "lock lost" signal is high; justification says why."""

    def __init__(self, guard: "LockGuard", signal: Signal, sleep: float):
        super().__init__(signal, sleep=sleep)
        self._guard = guard

    def _get_justification(self) -> str:
        if not self.tripped:
            return ""
        return f"the queue lost the beamline lock: {self._guard.reason}"


class LockGuard:
    """Holds the beamline lock for a RunEngine while it runs plans (see module doc).

    ``lock``: the process's :class:`BeamlineLock` (the same object the gated devices
    check, so a grant here opens their gate). ``session``: the queue's lock session.
    ``linger``: seconds without a running plan before the lock is released. ``wait``:
    seconds a plan start waits for a busy lock (None: fail at once). ``lease``: the lease
    the client keeps alive in the background. ``resume_delay``: seconds between the
    queue holding the lock again and the plan resuming. ``note``: the lock note, to which
    the running plan's name is added. ``waiting_linger``: the linger while someone waits
    for the lock (at most ``linger``).
    """

    def __init__(self, lock: BeamlineLock, *, session: str | None = None,
                 linger: float = DEFAULT_LINGER, wait: float | None = None,
                 lease: float = DEFAULT_LEASE, resume_delay: float = DEFAULT_RESUME_DELAY,
                 note: str = "bluesky queue",
                 waiting_linger: float = DEFAULT_WAITING_LINGER):
        _check_seconds("linger", linger, allow_zero=True)
        _check_seconds("waiting_linger", waiting_linger, allow_zero=True)
        _check_seconds("lease", lease)
        _check_seconds("resume_delay", resume_delay, allow_zero=True)
        if wait is not None:
            _check_seconds("wait", wait, allow_zero=True)
        if not isinstance(lock, BeamlineLock):
            raise TypeError(f"lock guard: expected the process's BeamlineLock client, got "
                            f"{lock!r} (is the lock client created before the RunEngine?)")
        self.lock = lock
        self.session = session or lock.session or DEFAULT_SESSION
        self.linger, self.wait, self.lease = float(linger), wait, float(lease)
        self.waiting_linger = min(float(waiting_linger), self.linger)
        self.note = note
        self.declare_task = True         # off when the lock config does not allow it
        self.RE: Any = None
        self.reason = ""                 # why the guard is (or last was) tripped
        self.signal = Signal(name="beamline_lock_lost", value=0)
        self.suspender = LockSuspender(self, self.signal, resume_delay)
        self._mutex = threading.RLock()  # plan bookkeeping, acquire and release
        self._active = 0                 # plans started and not yet ended
        self._attempts = itertools.count(1)
        self._current_attempt = 0
        self._armed = False              # a plan runs and we acquired the lock for it
        self._plan_name = ""
        self._linger_timer: threading.Timer | None = None
        self._linger_until = 0.0         # time.monotonic() the linger timer fires
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._waiters_lock = threading.Lock()
        self._wake: queue.SimpleQueue = queue.SimpleQueue()
        self._callback_id: int | None = None
        self._thread: threading.Thread | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # plan acquires
        self._session_before: str | None = None
        self._installed = False

    # ---- installation --------------------------------------------------------------
    def install(self, RE: Any) -> "LockGuard":
        """Add the preprocessor and the suspender to ``RE`` (bluesky's public API)."""
        if self._installed:
            raise RuntimeError("this lock guard is already installed")
        if any(isinstance(getattr(p, "__self__", None), LockGuard) for p in RE.preprocessors):
            raise RuntimeError("this RunEngine already has a beamline lock guard: install "
                               "one guard per RunEngine")
        self.RE = RE
        self._installed = True
        # This process's gated devices write under the queue's session only.
        self._session_before, self.lock.session = self.lock.session, self.session
        self._wake = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(self._wake,), daemon=True,
                                        name=f"beamline-lock guard {self.lock.prefix}")
        self._thread.start()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="beamline-lock guard acquire")
        RE.preprocessors.append(self.preprocessor)
        RE.install_suspender(self.suspender)
        self._callback_id = self.lock.add_callback(self._on_lock_event)
        self._wake.put("install")
        self._adopt_leftover()
        return self

    def uninstall(self) -> None:
        """Remove what :meth:`install` added and release the lock if we hold it."""
        if not self._installed:
            return
        if self._active:
            raise RuntimeError("lock guard: a plan is running under it; uninstall after the "
                               "plan ends (or abort it)")
        if self.preprocessor in self.RE.preprocessors:
            self.RE.preprocessors.remove(self.preprocessor)
        self.RE.remove_suspender(self.suspender)
        if self._callback_id is not None:
            self.lock.remove_callback(self._callback_id)
        self._cancel_linger()
        self._release_if_idle(force=True)
        self._wake.put(None)
        self._pool.shutdown(wait=False)
        self.lock.session = self._session_before
        self._installed = False

    def _adopt_leftover(self) -> None:
        """A hold of ours left by a previous worker: keep it for ``linger``, then release."""
        if self.lock.held_by_me:
            print(f"{TAG} the lock is still held by this queue ({self.lock.identity}, "
                  f"session {self.session}); releasing it in {self.linger:g} s unless a plan "
                  "starts", flush=True)
            with self._mutex:
                self._schedule_linger()

    # ---- the preprocessor ------------------------------------------------------------
    def preprocessor(self, plan: Iterable[Msg]) -> Generator[Msg, Any, Any]:
        """``RE.preprocessors`` entry: the plan, run under the lock."""
        return self._guarded(plan)

    def _guarded(self, plan: Iterable[Msg]) -> Generator[Msg, Any, Any]:
        name = getattr(plan, "__name__", "") or type(plan).__name__
        attempt = self._begin_plan(name)
        try:
            yield from self._acquire_for_plan(attempt, name)
            self._arm(attempt)
            return (yield from plan_mutator(plan, self._fence))
        finally:
            self._end_plan(attempt)

    def _begin_plan(self, name: str) -> int:
        with self._mutex:
            self._cancel_linger()
            self._active += 1
            self._current_attempt = attempt = next(self._attempts)
            self._plan_name = name
            return attempt

    def _acquire_for_plan(self, attempt: int, name: str) -> Generator[Msg, Any, None]:
        """Acquire (or renew, adding the plan's name to the note) off the RE's loop.

        bluesky may cancel this message (an immediate pause, another suspender) and then
        replay it or send None back: every replay waits on the same acquire, which runs
        once per plan start."""
        job: list[concurrent.futures.Future] = []

        def factory():
            if not job or job[0].cancelled():
                job[:] = [self._pool.submit(self._acquire_blocking, attempt, name)]
            return asyncio.wrap_future(job[0])
        while not (job and job[0].done() and not job[0].cancelled()):
            yield Msg("wait_for", None, [factory])
        exc = job[0].exception()
        if exc is not None:
            raise plan_refusal(name, exc) from None

    def _acquire_blocking(self, attempt: int, name: str) -> LockStatus:
        note = f"{self.note}: {name}" if name else self.note
        if self.lock.requesting == self.session and not self.lock.held_by_me:
            if not self._wait_in_line(attempt, name):
                raise LockError("the plan ended while it waited in line for the lock")
        status = self._acquire_with_task(note, name)
        with self._mutex:
            if attempt != self._current_attempt or self._active == 0:
                # The plan was abandoned (aborted) while we waited: no plan needs it, and
                # whoever waited for the holder we waited for may take it now.
                print(f"{TAG} the plan that asked for the lock ended before it was granted; "
                      "releasing it", flush=True)
                self._release_if_idle()
        return status

    def _acquire_with_task(self, note: str, name: str) -> LockStatus:
        """Acquire (or renew) declaring the plan as the queue's running task; without the
        task if the lock config does not mark the queue's group unattended (said once)."""
        task = (name or "plan") if self.declare_task else None
        try:
            return self.lock.acquire(self.session, lease=self.lease, note=note,
                                     wait=self.wait, keep_alive=True, task=task)
        except LockRefused as exc:
            if task is None or "may declare a task" not in str(exc):
                raise
            self.declare_task = False
            print(f"{TAG} the lock config does not mark the queue's group unattended: "
                  f"plans run without declaring a task, so a higher-authority request "
                  f"takes the lock mid-plan (the plan is suspended) instead of at its end "
                  f"[{exc}]", flush=True)
            return self.lock.acquire(self.session, lease=self.lease, note=note,
                                     wait=self.wait, keep_alive=True)

    def _wait_in_line(self, attempt: int, name: str) -> bool:
        """The queue handed the lock over and waits in line: the plan waits (before any
        hardware) until the lock is the queue's again. True when granted, or when the
        request left the line (the Acquire that follows then says why); False when the
        plan was abandoned meanwhile."""
        status = self.lock.status()
        place = next((i for i, w in enumerate(status.waiters, 1)
                      if w.who == self.lock.identity and w.session == self.session), "?")
        print(f"{TAG} plan {name!r} waits for the beamline lock: the queue handed it to "
              f"{status.owner or 'the first in line'} and waits in line (place {place}); "
              "it starts when the lock is the queue's again", flush=True)
        while True:
            try:
                if self.lock.await_grant(1.0):
                    print(f"{TAG} the queue has the beamline lock again (token "
                          f"{self.lock.token}); plan {name!r} starts", flush=True)
                    return True
            except RequestLapsed:
                return True
            with self._mutex:
                if attempt != self._current_attempt or self._active == 0:
                    return False

    def _arm(self, attempt: int) -> None:
        with self._mutex:
            if attempt == self._current_attempt:
                self._armed = True
                self.reason = ""
        self._wake.put("armed")

    def _end_plan(self, attempt: int) -> None:
        with self._mutex:
            self._active = max(0, self._active - 1)
            if self._active == 0:
                self._armed = False
                self._current_attempt = 0
                self._schedule_linger()
        # At the end of the plan: a higher-authority waiter gets the lock. On the pool,
        # before the next plan's Acquire (one worker: in order).
        if self._pool is not None:
            self._pool.submit(self._yield_if_asked, "at the end of the plan")
        self._wake.put("ended")

    # ---- the fence -------------------------------------------------------------------
    def _fence(self, msg: Msg):
        """plan_mutator hook: a write goes out only while we hold the lock; reads,
        stops and safe writes always. A run opened here carries the lock in its start
        document."""
        if msg.command == "open_run" and "lock" not in msg.kwargs:
            return single_gen(msg._replace(kwargs=dict(msg.kwargs,
                                                       lock=self.provenance()))), None
        if msg.command in READ_COMMANDS or is_safe_message(msg):
            return None, None
        return self._permitted(msg), None

    def provenance(self) -> dict:
        """The ``lock`` entry of a start document: who held the beamline for this run."""
        s = self.lock.status()
        held = s.state == HELD
        return {"owner": s.owner if held else "", "session": s.session if held else "",
                "note": s.note if held else "", "token": s.token,
                "acquired_at": s.acquired_at if held else 0.0}

    def _permitted(self, msg: Msg) -> Generator[Msg, Any, Any]:
        while not self.lock.held_by_me and self._re_running():
            # The monitors say we lost the lock; the suspender trips from the guard's
            # thread within moments. Hold this write back until the lock is ours again
            # (after the suspension, bluesky replays from the last checkpoint).
            self._wake.put("fence")
            yield Msg("wait_for", None, [self._until_held])
        return (yield msg)

    def _re_running(self) -> bool:
        """False while the RE tears a plan down (abort/stop/halt): let cleanup through
        (the gated devices refuse its writes) rather than block it forever."""
        state = getattr(self.RE, "state", "running")
        return str(state) in ("running", "suspending", "pausing")

    async def _until_held(self) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._waiters_lock:
            self._waiters.append((loop, fut))
        if self.lock.held_by_me:
            return
        await fut

    def _wake_waiters(self) -> None:
        with self._waiters_lock:
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_set_done, fut)
            except RuntimeError:  # loop closed
                pass

    # ---- lock events -> suspender signal (one thread, in order) -------------------------
    def _on_lock_event(self, status: LockStatus) -> None:
        self._wake.put(status.event or "change")

    def _run(self, wake: queue.SimpleQueue) -> None:
        while True:
            item = wake.get()
            if item is None:
                return
            try:
                self._sync()
            except Exception:  # the guard thread must survive anything
                log.exception("%s could not update the suspender", TAG)

    def _sync(self) -> None:
        """Make the suspender signal match the lock: 1 iff armed and not held by us."""
        held = self.lock.held_by_me
        if held:
            self._wake_waiters()
        with self._mutex:
            armed = self._armed
        tripped = bool(self.signal.get())
        if armed and not held and not tripped:
            # Suspend first, on monitored state alone: a CA read could wait seconds for a
            # lock IOC that is gone. The IOC's record of who took the lock follows.
            status = self.lock.status()
            self.reason = status.lost or state_text(status)
            self.signal.put(1)
            self.reason = self._lost_reason(status)
            msg = (f"{TAG} SUSPENDING the plan: the queue lost the beamline lock: "
                   f"{self.reason}. No device writes until the queue holds the lock again "
                   f"(qserver function execute '{{\"name\": \"lock_reacquire\"}}' background), "
                   f"or pause and abort the plan (qserver re pause immediate; "
                   f"qserver re abort).")
            print(msg, flush=True)  # the RE worker's console: qserver console_monitor
            log.debug(msg)
        elif tripped and (held or not armed):
            if held:
                token = self.lock.token
                print(f"{TAG} the queue holds the beamline lock again (token {token}); "
                      f"resuming the plan", flush=True)
            self.signal.put(0)
        if armed and not held:
            self._maybe_adopt()
        if not armed and held:
            status = self.lock.status()
            if status.yield_to and self._pool is not None:
                self._pool.submit(self._yield_if_asked, "between plans")
            elif status.waiters:
                self._shorten_linger()

    def _yield_if_asked(self, when: str) -> None:
        """No plan runs and a higher-authority request waits for the queue's task to
        end (``$(P)YieldTo``): hand the lock over and wait in line for it again."""
        with self._mutex:
            status = self.lock.status()
            if self._armed or not self.lock.held_by_me or not status.yield_to:
                if not self._armed and self.lock.held_by_me and status.waiters:
                    self._shorten_linger()
                return
            try:
                after = self.lock.handover(session=self.session, requeue=True,
                                           lease=self.lease)
            except LockError as exc:
                log.warning("%s could not hand the lock over: %s", TAG, exc)
                return
            print(f"{TAG} handed the beamline lock to {after.owner} (higher authority, "
                  f"waiting) {when}; the queue waits in line for it again", flush=True)
            if not self._active:
                self._schedule_linger(self.linger)   # leave the line if no plan comes

    def _shorten_linger(self) -> None:
        """Someone waits: release after ``waiting_linger`` rather than ``linger``."""
        with self._mutex:
            if self._active or self._linger_timer is None:
                return
            if self._linger_until - time.monotonic() > self.waiting_linger:
                self._schedule_linger(self.waiting_linger)
                print(f"{TAG} someone waits for the beamline lock: handing it over in "
                      f"{self.waiting_linger:g} s unless a plan starts", flush=True)

    def _lost_reason(self, status: LockStatus) -> str:
        """Why the lock is not ours, with the lock IOC's last event when it answers."""
        if status.connected:
            try:
                history = self.lock.history()
            except LockError:
                history = []
            if history:  # who took it and why, from the lock IOC's own record
                return f"{state_text(status)}; last lock event: {history[-1]}"
        return status.lost or state_text(status)

    def _maybe_adopt(self) -> None:
        """The queue's own identity and session hold the lock again (e.g. ``lockctl
        acquire queue`` run as the queue's account): take that grant as ours."""
        status = self.lock.status()
        if not (status.connected and status.state == "Held"
                and status.owner == self.lock.identity and status.session == self.session):
            return
        try:
            self.reacquire()
        except LockError as exc:
            log.warning("%s could not take over the queue's grant: %s", TAG, exc)

    # ---- linger and release -------------------------------------------------------------
    def _schedule_linger(self, delay: float | None = None) -> None:
        """Caller holds the mutex (or nothing runs concurrently). ``delay``: default
        ``linger``, or ``waiting_linger`` when someone waits for the lock."""
        self._cancel_linger()
        if delay is None:
            delay = self.waiting_linger if self.lock.waiters() else self.linger
        timer = threading.Timer(delay, self._release_if_idle)
        timer.daemon = True
        timer.name = "beamline-lock guard linger"
        self._linger_timer = timer
        self._linger_until = time.monotonic() + delay
        timer.start()

    def _cancel_linger(self) -> None:
        timer, self._linger_timer = self._linger_timer, None
        if timer is not None:
            timer.cancel()

    def _release_if_idle(self, force: bool = False) -> None:
        with self._mutex:
            if self._active and not force:
                return
            if threading.current_thread() is self._linger_timer:
                self._linger_timer = None
            if not self.lock.held_by_me:
                if self.lock.requesting == self.session:
                    try:   # no plan waits for the lock we handed over: leave the line
                        self.lock.withdraw(self.session)
                        print(f"{TAG} left the line for the beamline lock "
                              f"({self.linger:g} s without a plan)", flush=True)
                    except LockError as exc:
                        log.warning("%s could not withdraw the queue's request: %s", TAG,
                                    exc)
                return
            waiters = self.lock.waiters()
            try:
                if waiters and not force:
                    # Someone waits: theirs now; a plan that starts within the linger
                    # waits in line for the lock instead of failing.
                    after = self.lock.handover(session=self.session, requeue=True,
                                               lease=self.lease)
                    print(f"{TAG} handed the beamline lock to {after.owner} (waiting), "
                          f"{self.waiting_linger:g} s without a plan; the queue waits in "
                          f"line for {self.linger:g} s in case a plan starts", flush=True)
                    self._schedule_linger(self.linger)
                    return
                self.lock.release(self.session)
                why = "the guard was uninstalled" if force else \
                    f"{self.linger:g} s without a plan"
                print(f"{TAG} released the beamline lock ({why})", flush=True)
            except LockError as exc:
                log.warning("%s release after the queue stopped failed: %s", TAG, exc)

    # ---- for the queue server API (functions in the startup namespace) ----------------------
    def reacquire(self) -> dict:
        """Acquire the lock for the queue again (resumes a plan suspended by the guard)."""
        name = self._plan_name if self._active else ""
        note = f"{self.note}: {name}" if name else self.note
        with self._mutex:
            self.lock.acquire(self.session, lease=self.lease, note=note, wait=None,
                              keep_alive=True)
            if not self._active:
                self._schedule_linger()
        self._wake.put("reacquired")
        return self.status()

    def status(self) -> dict:
        """The guard as plain data (JSON-friendly)."""
        s = self.lock.status()
        return {"session": self.session, "held_by_queue": s.held_by_me,
                "plan_running": bool(self._active), "suspended": bool(self.signal.get()),
                "reason": self.reason if self.signal.get() else "",
                "lock": state_text(s), "linger": self.linger, "wait": self.wait,
                "lease": self.lease, "waiting_linger": self.waiting_linger,
                "waiting_in_line": self.lock.requesting == self.session,
                "waiters": [w.who for w in s.waiters], "yield_to": s.yield_to}


def is_safe_message(msg: Msg) -> bool:
    """A ``stop``, or a ``set`` the device's gate counts as safe (e.g. closing a shutter)."""
    if msg.command in SAFE_COMMANDS:
        return True
    return msg.command == "set" and bool(msg.args) and is_safe_write(msg.obj, msg.args[0])


def state_text(status: LockStatus) -> str:
    """``lock is Free, token 7`` or ``lock state unknown (...)``."""
    text = status.describe()
    return text if not status.connected else f"lock is {text}"


def plan_refusal(name: str, exc: BaseException) -> BaseException:
    """The error a plan fails with when the queue cannot get the lock: who, note, until."""
    what = f"beamline lock: plan {name!r} not started, no hardware touched"
    if isinstance(exc, LockHeld):
        note = f", note {exc.note!r}" if exc.note else ""
        until = until_text(exc.expiry) if exc.expiry else "unknown"
        return LockHeld(f"{what}: the lock is held by {exc.owner} (session {exc.session}"
                        f"{note}) until {until}. Ask the holder to release it "
                        f"(lockctl release) or an operator to force-release it, then start "
                        f"the queue again. [{exc}]", owner=exc.owner, session=exc.session,
                        note=exc.note, expiry=exc.expiry, token=exc.token)
    if isinstance(exc, LockDisabled):
        return LockDisabled(f"{what}: {exc}")
    if isinstance(exc, LockUnavailable):
        return LockUnavailable(f"{what}: the lock state is unknown: {exc}")
    if isinstance(exc, LockError):
        return type(exc)(f"{what}: {exc}")
    return LockError(f"{what}: {type(exc).__name__}: {exc}")


def install_lock_guard(RE: Any, lock: BeamlineLock, *, session: str | None = None,
                       linger: float = DEFAULT_LINGER, wait: float | None = None,
                       lease: float = DEFAULT_LEASE,
                       resume_delay: float = DEFAULT_RESUME_DELAY,
                       note: str = "bluesky queue",
                       waiting_linger: float = DEFAULT_WAITING_LINGER) -> LockGuard:
    """Run every plan of ``RE`` under ``lock`` (see :class:`LockGuard`); returns the guard."""
    return LockGuard(lock, session=session, linger=linger, wait=wait, lease=lease,
                     resume_delay=resume_delay, note=note,
                     waiting_linger=waiting_linger).install(RE)


def _set_done(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _check_seconds(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and value != float("inf") and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = "zero or more" if allow_zero else "more than zero"
        raise ValueError(f"lock guard: {name} must be a number of seconds, {bound}; "
                         f"got {value!r}")


def seconds_from_env(environ: dict, name: str, default: float | None) -> float | None:
    """A number of seconds from an environment variable ("" or "none": None)."""
    raw = environ.get(name)
    if raw is None:
        return default
    if raw.strip().lower() in ("", "none", "off"):
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number of seconds (or 'none')") \
            from None


__all__ = ["LockGuard", "LockSuspender", "install_lock_guard", "plan_refusal",
           "seconds_from_env", "state_text", "is_safe_message", "READ_COMMANDS",
           "SAFE_COMMANDS", "DEFAULT_LINGER", "DEFAULT_LEASE"]
