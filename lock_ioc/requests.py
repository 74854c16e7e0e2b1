"""Parse and validate the text written to the command PVs (pure, no I/O).

Everything a CA client can send arrives here as bytes; anything that is not a valid
request becomes a :class:`Refused` with a message a person at ``caput`` understands.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import unicodedata

from .contract import BY_SUFFIX

#: Sessions are short names: "scan42", "queue", "web:alice", "alice/align-mono".
SESSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/+-]*$")
SESSION_MAX = 64
NOTE_MAX = 256
REASON_MAX = 256
TASK_MAX = 128
#: A waiter named in a Handover: "user@host" or "user" (CA user and host names).
IDENTITY = re.compile(r"^[A-Za-z0-9_.@+$-]{1,64}(@[A-Za-z0-9_.-]{1,253})?$")


class Refused(Exception):
    """A command the lock will not carry out; the text says exactly why."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclasses.dataclass(frozen=True)
class SessionRequest:
    session: str
    lease: float | None = None  # None: the default (acquire) or the current lease (renew)
    note: str | None = None     # None: keep/empty
    auto: bool | None = None    # Request: take the lock when it is released (None: yes/keep)
    task: str | None = None     # Acquire/Renew: the holder's running task (None: keep/none)


@dataclasses.dataclass(frozen=True)
class HandoverRequest:
    session: str                # the holder's session
    to: str = ""                # "user@host" or "user" of a waiter ("": the first in line)
    to_session: str = ""        # the waiter's session, when ``to`` has several requests
    requeue: bool = False       # the holder waits for the lock again (a request of its own)
    lease: float | None = None  # requeue: the request's lease (None: the current lease)


def decode(raw: bytes | str, command: str) -> str:
    """Bytes from the wire to text: strict UTF-8, no control characters, trimmed."""
    if isinstance(raw, str):
        text = raw
    else:
        try:
            text = bytes(raw).rstrip(b"\x00").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Refused(f"{command}: text is not valid UTF-8 "
                          f"(byte 0x{raw[exc.start]:02x} at position {exc.start})") from None
    limit = BY_SUFFIX[command].max_length
    if len(text.encode("utf-8")) > limit:
        raise Refused(f"{command}: text too long (at most {limit} bytes)")
    if any(unicodedata.category(c) == "Cc" and c != "\t" for c in text):
        raise Refused(f"{command}: text contains control characters")
    return text.strip()


def _session(value: object, command: str) -> str:
    if not isinstance(value, str):
        raise Refused(f"{command}: session must be a string, got {json.dumps(value)}")
    value = value.strip()
    if not value:
        raise Refused(f"{command}: session name is empty")
    if len(value) > SESSION_MAX:
        raise Refused(f"{command}: session name too long ({len(value)} characters, "
                      f"at most {SESSION_MAX})")
    if not SESSION.match(value):
        raise Refused(f"{command}: invalid session name {value!r} (letters, digits and "
                      "_ . : @ / + -; starting with a letter or digit)")
    return value


def _lease(value: object, command: str, lease_max: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Refused(f"{command}: lease must be a number of seconds, got {json.dumps(value)}")
    try:
        seconds = float(value)  # a JSON integer may have any number of digits
    except OverflowError:
        raise Refused(f"{command}: lease of {len(str(abs(value)))} digits is over the maximum "
                      f"of {lease_max:g} s") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise Refused(f"{command}: lease must be a positive number of seconds, got {value!r}")
    if seconds > lease_max:
        raise Refused(f"{command}: lease {seconds:g} s is over the maximum of {lease_max:g} s")
    if seconds < 0.5:
        raise Refused(f"{command}: lease {seconds:g} s is too short (at least 0.5 s)")
    return seconds


def _text(value: object, key: str, command: str, limit: int) -> str:
    """A free-text field (note, task): a string of at most ``limit`` characters."""
    if not isinstance(value, str):
        raise Refused(f"{command}: {key} must be a string, got {json.dumps(value)}")
    value = value.strip()
    if len(value) > limit:
        raise Refused(f"{command}: {key} too long ({len(value)} characters, at most {limit})")
    return value


def _bool(value: object, key: str, command: str) -> bool:
    if not isinstance(value, bool):
        raise Refused(f"{command}: {key} must be true or false, got {json.dumps(value)}")
    return value




def _identity(value: object, command: str) -> str:
    if not isinstance(value, str) or not IDENTITY.match(value.strip()):
        raise Refused(f"{command}: \"to\" must name a waiter as user@host or user, got "
                      f"{json.dumps(value)}")
    return value.strip()


def _reject_constant(token: str):
    raise ValueError(f"{token} is not a number")


def _json_body(text: str, command: str, allowed: tuple[str, ...]) -> dict | None:
    """The JSON object of a command (None for a bare session name), keys checked."""
    if not text.startswith("{"):
        if text.startswith(("[", '"')):
            raise Refused(f"{command}: expected a session name or a JSON object")
        return None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise Refused(f"{command}: invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise Refused(f"{command}: JSON must be an object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise Refused(f"{command}: unknown key {unknown[0]!r} "
                      f"(allowed: {', '.join(allowed)})")
    if "session" not in body:
        raise Refused(f"{command}: JSON needs a \"session\"")
    return body


def parse_session_request(text: str, command: str, *, lease_max: float,
                          allowed: tuple[str, ...]) -> SessionRequest:
    """A bare session name, or a JSON object with the ``allowed`` keys."""
    body = _json_body(text, command, allowed)
    if body is None:
        return SessionRequest(session=_session(text, command))
    return SessionRequest(
        session=_session(body["session"], command),
        lease=_lease(body["lease"], command, lease_max) if "lease" in body else None,
        note=_text(body["note"], "note", command, NOTE_MAX) if "note" in body else None,
        auto=_bool(body["auto"], "auto", command) if "auto" in body else None,
        task=_text(body["task"], "task", command, TASK_MAX) if "task" in body else None,
    )


def parse_handover(text: str, *, lease_max: float) -> HandoverRequest:
    """``Handover``: the holder's session (to the first in line), or JSON
    ``{"session", "to", "to_session", "requeue", "lease"}``."""
    command = "Handover"
    body = _json_body(text, command, ("session", "to", "to_session", "requeue", "lease"))
    if body is None:
        return HandoverRequest(session=_session(text, command))
    to = _identity(body["to"], command) if body.get("to") not in (None, "") else ""
    to_session = body.get("to_session") or ""
    if to_session:
        if not to:
            raise Refused(f"{command}: \"to_session\" needs \"to\" (the waiter's user@host)")
        to_session = _session(to_session, command)
    return HandoverRequest(
        session=_session(body["session"], command), to=to, to_session=to_session,
        requeue=_bool(body["requeue"], "requeue", command) if "requeue" in body else False,
        lease=_lease(body["lease"], command, lease_max) if "lease" in body else None)


def parse_reason(text: str, command: str, *, required: bool) -> str:
    if required and not text:
        raise Refused(f"{command}: a reason is required")
    if len(text) > REASON_MAX:
        raise Refused(f"{command}: reason too long ({len(text)} characters, "
                      f"at most {REASON_MAX})")
    return text
