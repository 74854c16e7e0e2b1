# The simulated beamline's devices (db/*.db on softIoc), gated on the beamline lock.
#
# Every write (put/set of each writable EPICS signal, set/move of each device) first asks
# the process's lock client (00-lock.py) and raises LockHeld & co. when the lock does not
# allow it; reads are never gated. Stopping and making safe never ask the lock: `stop()`
# of every device (bluesky stops what it moved when a plan is suspended, paused or
# aborted) and the shutter's Close pass the gate whatever the lock says, also while the
# lock IOC is down; the device IOC lets them through too (ASG(SAFE), docs/device-gating.md).
# The classes are plain ophyd: the gate is added to the instances by `gate()`, so a
# beamline's own device classes work the same way.
#
# Environment: BEAMLINE_PREFIX (default BL:) for the device PVs.
import os

from ophyd import Component as Cpt
from ophyd import Device, EpicsSignal, EpicsSignalRO, PVPositioner
from ophyd.status import SubscriptionStatus

from beamline_lock.ophyd_gate import gate

_P = os.environ.get("BEAMLINE_PREFIX") or "BL:"


class SimMotor(PVPositioner):
    """A soft motor (no motor record): ao setpoint, RBV, DMOV, MOVN, STOP, VELO."""

    setpoint = Cpt(EpicsSignal, "", kind="normal")
    readback = Cpt(EpicsSignalRO, ":RBV", kind="hinted")
    done = Cpt(EpicsSignalRO, ":DMOV", kind="omitted")
    done_value = 1
    moving = Cpt(EpicsSignalRO, ":MOVN", kind="omitted")
    stop_signal = Cpt(EpicsSignal, ":STOP", kind="omitted")
    stop_value = 1
    velocity = Cpt(EpicsSignal, ":VELO", kind="config")

    #: db/softMotor.db: DMOV is 1 while |setpoint - readback| < 0.0005.
    atol = 0.0005

    def __init__(self, *args, **kwargs):
        self._target: float | None = None
        super().__init__(*args, **kwargs)
        self.readback.subscribe(self._arrived, run=False)
        self.done.subscribe(self._arrived, run=False)

    def _setup_move(self, position):
        # DMOV is recomputed only with the readback (every 0.1 s), so a move to where
        # the motor already is, or one short enough to end within one readback update,
        # never shows DMOV=0, and ophyd would wait for that edge forever. Such moves
        # finish when the readback is at the target while DMOV is 1 (a later DMOV edge
        # finds no waiting status).
        self._target = float(position)
        super()._setup_move(position)
        self._arrived()

    def _arrived(self, **_):
        target = self._target
        if target is None or self.done.get() != self.done_value:
            return
        if abs(float(self.readback.get()) - target) < self.atol:
            self._target = None
            self._done_moving(success=True)

    def stop(self, *, success=False):
        self._target = None
        super().stop(success=success)


class Shutter(Device):
    """Photon shutter: ``set("Open")`` / ``set("Close")`` (or 1 / 0) finish at the readback.

    Open writes the gated command (``Shutter:Open`` = 1); Close writes the never-gated
    ``Shutter:Close`` = 1, which the IOC forwards to the command (see db/shutter.db).
    """

    command = Cpt(EpicsSignal, "Shutter:Open", kind="omitted")
    close_command = Cpt(EpicsSignal, "Shutter:Close", kind="omitted")
    status = Cpt(EpicsSignalRO, "Shutter:Status", kind="hinted")

    _VALUES = {"open": 1, "opened": 1, "1": 1, "close": 0, "closed": 0, "0": 0}

    @classmethod
    def wanted(cls, value) -> int | None:
        """1 (open), 0 (close) or None (not a shutter command) for a set value."""
        return cls._VALUES.get(str(value).strip().lower())

    @classmethod
    def closes(cls, value) -> bool:
        """Whether ``set(value)`` closes the shutter: a safe action (see gate(safe=))."""
        return cls.wanted(value) == 0

    #: ophyd-websocket's device socket reads these before a numeric set: no limits here.
    low_limit = high_limit = None

    def put(self, value, wait: bool = True, timeout: float = 10.0, **_):
        """What ophyd-websocket's device socket calls for a text value ("Open"/"Close"):
        the same as ``set``, which the lock gate guards."""
        status = self.set(value, timeout=timeout)
        if wait:
            status.wait(timeout)
        return status

    def set(self, value, *, timeout: float = 10.0):
        want = self.wanted(value)
        if want is None:
            raise ValueError(f"{self.name}: expected 'Open' or 'Close' (1 or 0), got {value!r}")
        if want:
            self.command.put(1)
        else:
            self.close_command.put(1)
        return SubscriptionStatus(self.status, lambda value, **_: int(value) == want,
                                  timeout=timeout)


class SimDetector(Device):
    """Counter: ``trigger()`` puts Acquire=1 with completion, which the IOC reports when
    the count (AcquireTime) is done and Counts updated."""

    acquire = Cpt(EpicsSignal, "det:Acquire", kind="omitted", put_complete=True)
    acquire_time = Cpt(EpicsSignal, "det:AcquireTime", kind="config")
    counts = Cpt(EpicsSignalRO, "det:Counts", kind="hinted")

    def trigger(self):
        return self.acquire.set(1)


class BeamStatus(Device):
    """Read-only machine and hutch state."""

    ring_current = Cpt(EpicsSignalRO, "RingCurrent", kind="hinted")
    energy = Cpt(EpicsSignalRO, "Energy", kind="hinted")
    hutch_searched = Cpt(EpicsSignalRO, "HutchSearched", kind="normal")


m1 = gate(SimMotor(_P + "m1", name="m1"))
m2 = gate(SimMotor(_P + "m2", name="m2"))
# Closing the shutter is safe: set("Close") and Shutter:Close = 1 never ask the lock.
shutter = gate(Shutter(_P, name="shutter"), safe={"": Shutter.closes, "close_command": (1,)})
det = gate(SimDetector(_P, name="det"))
beam = BeamStatus(_P, name="beam")  # read-only: nothing to gate
