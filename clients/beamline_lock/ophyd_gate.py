"""Gate ophyd devices on the beamline lock, with no change to ophyd or to device classes.

``gate(obj, lock)`` wraps, on the instances of an existing ``EpicsSignal``,
``EpicsMotor``, ``PVPositioner`` or whole ``Device`` tree, every method that writes:
``put``/``set`` of each writable EPICS signal, and ``set``/``move`` of each device
that has them (so a refused move fails before ophyd creates a status object). Each
write first calls ``lock.check_write_allowed()``, which reads only the lock client's
monitored state (no CA round trip per put) and raises :class:`LockHeld`,
:class:`LockNotHeld`, :class:`LockDisabled`, :class:`LockLost` (fencing token changed
or lease ran out) or :class:`LockUnavailable` (lock IOC unreachable: fail closed).
For new classes, ``class GatedEpicsSignal(GatedMixin, EpicsSignal)`` gates each
instance when it is built.

Whether writes are allowed while the lock is Free is the lock client's policy
(``BeamlineLock(allow_free_writes=...)``, default False).
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable, Iterator, TypeVar

from ophyd import Device
from ophyd.signal import EpicsSignalBase, EpicsSignalRO

from .client import BeamlineLock, LockUnavailable

T = TypeVar("T")

#: Methods that write, by kind of object.
SIGNAL_WRITES = ("put", "set")
DEVICE_WRITES = ("set", "move")
_MARK = "_beamline_lock_gate"

_default_lock: BeamlineLock | None = None


def set_default_lock(lock: BeamlineLock | None) -> None:
    """The lock used by objects gated with ``lock=None`` (e.g. GatedMixin components)."""
    global _default_lock
    _default_lock = lock


def default_lock() -> BeamlineLock | None:
    return _default_lock


def _checker(lock: BeamlineLock | None, target: str) -> Callable[[], None]:
    """A zero-argument check: the given lock's, or the default lock's at call time."""
    if lock is not None:
        return functools.partial(lock.check_write_allowed, target)

    def check_default() -> None:
        current = _default_lock
        if current is None:
            raise LockUnavailable(f"{target}: write refused: the lock state is unknown (no "
                                  "beamline lock configured; call "
                                  "beamline_lock.ophyd_gate.set_default_lock)")
        current.check_write_allowed(target)
    return check_default


def _guard(obj: object, method: str, check: Callable[[], None]) -> None:
    """Replace ``obj.method`` (on the instance) by a version that checks first."""
    current = getattr(obj, method, None)
    if not callable(current):
        return
    original = getattr(current, "__wrapped__", current) if getattr(current, _MARK, False) \
        else current

    @functools.wraps(original)
    def gated(*args, **kwargs):
        check()
        return original(*args, **kwargs)

    setattr(gated, _MARK, True)
    setattr(obj, method, gated)


def _walk(obj: object, dotted: str = "") -> Iterator[tuple[str, object]]:
    """``obj`` and every component below it (lazy components are instantiated)."""
    yield dotted, obj
    if isinstance(obj, Device):
        for attr in obj.component_names:
            child = getattr(obj, attr)
            yield from _walk(child, f"{dotted}.{attr}" if dotted else attr)


def writable_signal(obj: object) -> bool:
    return isinstance(obj, EpicsSignalBase) and not isinstance(obj, EpicsSignalRO)


def gate(obj: T, lock: BeamlineLock | None = None, *, exempt: Iterable[str] = ()) -> T:
    """Gate every write to ``obj`` and the components below it; returns ``obj``.

    ``lock``: the lock client to ask (None: the default lock, looked up at each write).
    ``exempt``: dotted component names to leave ungated (e.g. ``("stop_signal",)`` to
    let anyone stop a move). Gating again replaces the previous gate.
    """
    skip = set(exempt)
    for dotted, item in _walk(obj):
        if dotted in skip or any(dotted.startswith(e + ".") for e in skip):
            continue
        target = getattr(item, "name", "") or dotted or type(item).__name__
        check = _checker(lock, target)
        if writable_signal(item):
            for method in SIGNAL_WRITES:
                _guard(item, method, check)
        elif isinstance(item, Device):
            for method in DEVICE_WRITES:
                _guard(item, method, check)
    return obj


def is_gated(obj: object) -> bool:
    """Whether every write to ``obj`` and the components below it goes through a gate."""
    methods = []
    for _, item in _walk(obj):
        names = SIGNAL_WRITES if writable_signal(item) else \
            DEVICE_WRITES if isinstance(item, Device) else ()
        methods += [getattr(item, m) for m in names if callable(getattr(item, m, None))]
    return bool(methods) and all(getattr(m, _MARK, False) for m in methods)


class GatedMixin:
    """Mixin for new classes: each instance gates itself (and its components) when built.

    ``class GatedEpicsSignal(GatedMixin, EpicsSignal)``; pass ``lock=`` or rely on
    :func:`set_default_lock`; ``gate_exempt=`` as ``exempt`` of :func:`gate`.
    """

    def __init__(self, *args, lock: BeamlineLock | None = None,
                 gate_exempt: Iterable[str] = (), **kwargs):
        super().__init__(*args, **kwargs)
        gate(self, lock, exempt=gate_exempt)
