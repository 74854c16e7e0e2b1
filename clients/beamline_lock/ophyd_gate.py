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

Stopping and making safe are never refused by the lock: ``stop()`` of every device in
the tree, and the writes a ``safe=`` rule names (e.g. a shutter's Close), go ahead
without asking the lock, also while the lock IOC is down; so do the writes they make
themselves (``PVPositioner.stop`` puts its stop signal). A positioner's stop signal
written with its stop value (``PVPositioner.stop_signal``/``stop_value``,
``EpicsMotor.motor_stop`` = 1) is a safe write too. The device IOC must agree (its
stop and close records in the ACF's ``ASG(SAFE)``, see docs/device-gating.md).

Whether writes are allowed while the lock is Free is the lock client's policy
(``BeamlineLock(allow_free_writes=...)``, default False).
"""
from __future__ import annotations

import contextvars
import functools
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar, Union

from ophyd import Device, EpicsMotor
from ophyd.signal import EpicsSignalBase, EpicsSignalRO

from .client import BeamlineLock, LockUnavailable

T = TypeVar("T")

#: Methods that write, by kind of object.
SIGNAL_WRITES = ("put", "set")
DEVICE_WRITES = ("set", "move")
#: Device methods that make safe: they (and every write they make) pass the gate.
SAFE_METHODS = ("stop",)
_MARK = "_beamline_lock_gate"
_SAFE_MARK = "_beamline_lock_safe"      # on a gated write method: its safe-value test

#: Safe values of a write: a predicate on the value, or the values themselves.
SafeValues = Union[Callable[[Any], bool], Iterable[Any]]

#: True while this thread (or task) runs a safe action: its writes skip the lock.
_IN_SAFE_ACTION: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "beamline_lock_safe_action", default=False)
_NO_VALUE = object()

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


def _matcher(values: SafeValues) -> Callable[[Any], bool]:
    """A predicate from a ``safe=`` entry: itself if callable, else equality with one
    of the values."""
    if callable(values):
        return values
    if isinstance(values, (str, bytes)):
        values = (values,)
    allowed = tuple(values)

    def matches(value: Any) -> bool:
        for item in allowed:
            try:
                if bool(value == item):
                    return True
            except (TypeError, ValueError):  # e.g. an array compared with a number
                continue
        return False
    return matches


def _written_value(args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    for key in ("value", "position"):
        if key in kwargs:
            return kwargs[key]
    return _NO_VALUE


def _safe_call(method: Callable, *args, **kwargs):
    """Run a safe action: writes made inside it skip the lock check."""
    token = _IN_SAFE_ACTION.set(True)
    try:
        return method(*args, **kwargs)
    finally:
        _IN_SAFE_ACTION.reset(token)


def _unwrapped(obj: object, method: str) -> Callable | None:
    current = getattr(obj, method, None)
    if not callable(current):
        return None
    return getattr(current, "__wrapped__", current) if getattr(current, _MARK, False) \
        else current


def _guard(obj: object, method: str, check: Callable[[], None],
           safe: Callable[[Any], bool] | None = None) -> None:
    """Replace ``obj.method`` (on the instance) by a version that checks first, unless
    it runs inside a safe action or writes a value ``safe`` accepts."""
    original = _unwrapped(obj, method)
    if original is None:
        return

    @functools.wraps(original)
    def gated(*args, **kwargs):
        if _IN_SAFE_ACTION.get():
            return original(*args, **kwargs)
        if safe is not None:
            value = _written_value(args, kwargs)
            if value is not _NO_VALUE and safe(value):
                return _safe_call(original, *args, **kwargs)
        check()
        return original(*args, **kwargs)

    setattr(gated, _MARK, True)
    setattr(gated, _SAFE_MARK, safe)
    setattr(obj, method, gated)


def _make_safe(obj: object, method: str) -> None:
    """Replace ``obj.method`` by a version whose writes all pass the gate."""
    original = _unwrapped(obj, method)
    if original is None:
        return

    @functools.wraps(original)
    def safe_action(*args, **kwargs):
        return _safe_call(original, *args, **kwargs)

    setattr(safe_action, _MARK, True)
    setattr(obj, method, safe_action)


def _walk(obj: object, dotted: str = "") -> Iterator[tuple[str, object]]:
    """``obj`` and every component below it (lazy components are instantiated)."""
    yield dotted, obj
    if isinstance(obj, Device):
        for attr in obj.component_names:
            child = getattr(obj, attr)
            yield from _walk(child, f"{dotted}.{attr}" if dotted else attr)


def writable_signal(obj: object) -> bool:
    return isinstance(obj, EpicsSignalBase) and not isinstance(obj, EpicsSignalRO)


def _stop_signals(item: object) -> Iterator[tuple[object, Callable[[Any], bool]]]:
    """The stop signal of a positioner with its stop value: always a safe write."""
    signal = getattr(item, "stop_signal", None)
    if isinstance(item, Device) and writable_signal(signal) and hasattr(item, "stop_value"):
        yield signal, _matcher((item.stop_value,))
    if isinstance(item, EpicsMotor):
        yield item.motor_stop, _matcher((1,))


def gate(obj: T, lock: BeamlineLock | None = None, *, exempt: Iterable[str] = (),
         safe: Mapping[str, SafeValues] | None = None) -> T:
    """Gate every write to ``obj`` and the components below it; returns ``obj``.

    ``lock``: the lock client to ask (None: the default lock, looked up at each write).
    ``exempt``: dotted component names to leave ungated. ``safe``: writes that make safe
    and therefore never ask the lock: dotted component name (``""`` for ``obj`` itself)
    to the values whose ``set``/``put``/``move`` is safe, or a predicate on the value;
    e.g. ``safe={"": ("Close",)}`` for a shutter whose ``set("Close")`` closes it. The
    writes a safe action makes itself pass too. ``stop()`` is always safe.
    Gating again replaces the previous gate.
    """
    skip = set(exempt)
    items = list(_walk(obj))
    by_name = dict(items)
    safe_for: dict[int, Callable[[Any], bool]] = {}
    for _, item in items:
        for signal, test in _stop_signals(item):
            safe_for[id(signal)] = test
    for dotted, values in (safe or {}).items():
        if dotted not in by_name:
            raise ValueError(f"gate(safe=...): {type(obj).__name__} has no component "
                             f"{dotted!r} (known: {', '.join(repr(n) for n in by_name)})")
        safe_for[id(by_name[dotted])] = _matcher(values)
    for dotted, item in items:
        if dotted in skip or any(dotted.startswith(e + ".") for e in skip):
            continue
        target = getattr(item, "name", "") or dotted or type(item).__name__
        check = _checker(lock, target)
        test = safe_for.get(id(item))
        if writable_signal(item):
            for method in SIGNAL_WRITES:
                _guard(item, method, check, test)
        elif isinstance(item, Device):
            for method in DEVICE_WRITES:
                _guard(item, method, check, test)
            for method in SAFE_METHODS:
                _make_safe(item, method)
    return obj


def is_gated(obj: object) -> bool:
    """Whether every write to ``obj`` and the components below it goes through a gate."""
    methods = []
    for _, item in _walk(obj):
        names = SIGNAL_WRITES if writable_signal(item) else \
            DEVICE_WRITES if isinstance(item, Device) else ()
        methods += [getattr(item, m) for m in names if callable(getattr(item, m, None))]
    return bool(methods) and all(getattr(m, _MARK, False) for m in methods)


def is_safe_write(obj: object, value: Any, method: str = "set") -> bool:
    """Whether ``obj.method(value)`` is a safe write of a gated object (it never asks the
    lock). The RunEngine guard lets such messages through its fence."""
    test = getattr(getattr(obj, method, None), _SAFE_MARK, None)
    if test is None:
        return False
    try:
        return bool(test(value))
    except Exception:  # a predicate that cannot judge this value: not safe
        return False


class GatedMixin:
    """Mixin for new classes: each instance gates itself (and its components) when built.

    ``class GatedEpicsSignal(GatedMixin, EpicsSignal)``; pass ``lock=`` or rely on
    :func:`set_default_lock`; ``gate_exempt=`` and ``gate_safe=`` as ``exempt`` and
    ``safe`` of :func:`gate`.
    """

    def __init__(self, *args, lock: BeamlineLock | None = None,
                 gate_exempt: Iterable[str] = (),
                 gate_safe: Mapping[str, SafeValues] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        gate(self, lock, exempt=gate_exempt, safe=gate_safe)
