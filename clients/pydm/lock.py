"""PyDM display of the beamline lock: ``pydm -m "P=BL:LOCK:" clients/pydm/lock.py``.

The widgets and every PV name are in ``lock.ui``, generated from the PV contract by
``clients/screens_gen.py``. This file adds what a .ui cannot express:

* the command buttons write text built from the entries (Acquire sends
  ``{"session", "lease", "note"}`` as JSON; Renew and Release name the session shown),
  as UTF-8 bytes to the command's CHAR-array PV through the button's own channel, so
  PyDM still greys a button out when its PV is disconnected or not writable;
* the State label's colour (Free green, Held amber, Disabled red, grey when the IOC
  is unreachable, with PyDM's disconnected border);
* the History box: only the last ``lastLines`` events (a property in lock.ui), newest
  first, so the newest stays visible however long the events are (a QLabel whose text
  is too tall shows its top);
* the Waiters box: one line per request waiting for the lock (``$(P)Waiters`` is JSON),
  first in line first, with how long each has waited (redrawn on every Heartbeat);
  Request, Withdraw, and Hand over (one click: to the first in line, as the holder);
* confirmations that say what is sent: the operator commands show the reason; Renew
  and Release ask first when the session shown (which they act on) is not the one in
  this screen's Session field, e.g. the queue's session under the same ``user@host``;
* "you: user@host", the CA identity the lock sees for this screen.

A refused command changes nothing; the lock's reason appears in "Last message".
"""
from __future__ import annotations

import json
import os
import pwd
import socket
import time
from collections.abc import Callable

import numpy as np
from pydm import Display
from pydm.widgets.channel import PyDMChannel
from pydm.widgets.display_format import DisplayFormat, parse_value_for_display
from qtpy.QtWidgets import QMessageBox, QWidget


def identity() -> str:
    """The CA identity libca sends for this process (OS user of the uid, host name)."""
    return f"{pwd.getpwuid(os.getuid()).pw_name}@{socket.gethostname()}"


def encode(text: str) -> np.ndarray:
    """Text as a NUL-terminated UTF-8 CHAR array (what ``caput -S`` sends)."""
    return np.frombuffer(text.encode("utf-8") + b"\0", dtype=np.uint8)


def newest_first(history: str, count: int) -> str:
    """The last ``count`` non-empty lines of ``$(P)History`` (newest last), newest first."""
    lines = [line for line in history.splitlines() if line.strip()]
    return "\n".join(reversed(lines[-count:])) if count > 0 else ""


def waiters_text(waiters: str, count: int, now: float | None = None) -> str:
    """``$(P)Waiters`` (JSON, first in line first) as one line per waiter, with the time
    each has waited: ``1. bob@ws2 session edge, 12 s 'Fe edge'``; "nobody" when empty."""
    now = time.time() if now is None else now
    try:
        line = json.loads(waiters) if waiters.strip() else []
    except ValueError:
        return waiters
    out = []
    for i, w in enumerate(line[:count], 1):
        note = f" '{w.get('note')}'" if w.get("note") else ""
        out.append(f"{i}. {w.get('who')} session {w.get('session')}, "
                   f"{max(0, now - float(w.get('since', now))):.0f} s{note}")
    if len(line) > count:
        out[-1] += f" (+{len(line) - count} more)"
    return "\n".join(out) or "nobody"


def ask(parent: QWidget, question: str) -> bool:
    """Yes/No, No by default (as PyDM's own confirmation dialog)."""
    box = QMessageBox(QMessageBox.Question, "Beamline lock", question,
                      QMessageBox.Yes | QMessageBox.No, parent)
    box.setDefaultButton(QMessageBox.No)
    return box.exec_() == QMessageBox.Yes


class LockDisplay(Display):
    """The lock screen; see the module docstring."""

    def __init__(self, parent=None, args=None, macros=None):
        super().__init__(parent=parent, args=args, macros=macros, ui_filename="lock.ui")
        ui = self.ui
        ui.you.setText(f"you: {identity()}")
        builds: dict[str, Callable[[], str]] = {
            "acquire": self._acquire_text,
            "renew": self._renew_text,
            "release": self._shown_session,
            "request": self._acquire_text,
            "withdraw": self._session_entry,
            "handover": self._shown_session,
            "force_release": self._reason_text,
            "disable": self._reason_text,
            "enable": self._reason_text,
        }
        for name, build in builds.items():
            button = getattr(ui, name)
            button.clicked.disconnect()          # not PyDMPushButton's fixed pressValue
            button.clicked.connect(
                lambda _=False, n=name, b=button, f=build: self.send(n, b, f()))
        self._enum: tuple[str, ...] = ()
        self._state_channel = PyDMChannel(
            address=ui.state.channel, value_slot=self._state_value,
            enum_strings_slot=self._state_enums, connection_slot=self._state_connection)
        self._state_channel.connect()
        ui.history.setText(ui.history.channel)      # until the first value arrives
        self._history_channel = PyDMChannel(
            address=ui.history.channel, value_slot=self._history_value,
            connection_slot=self._history_connection)
        self._history_channel.connect()
        self._waiters = ""
        ui.waiters.setText(ui.waiters.channel)
        self._waiters_channel = PyDMChannel(
            address=ui.waiters.channel, value_slot=self._waiters_value,
            connection_slot=self._waiters_connection)
        self._waiters_channel.connect()
        self._tick_channel = PyDMChannel(          # redraw the waiting times every second
            address=ui.waiters.channel.replace("Waiters", "Heartbeat"),
            value_slot=self._tick_value)
        self._tick_channel.connect()

    # ---- what each command writes ---------------------------------------------------
    # (PyDM also sets each widget of the .ui as an attribute of the display: no method
    # may be named like a widget.)
    def _acquire_text(self) -> str:
        request: dict = {"session": self._session_entry()}
        if self.ui.acquire_lease.value() > 0:
            request["lease"] = self.ui.acquire_lease.value()
        if self.ui.acquire_note.text().strip():
            request["note"] = self.ui.acquire_note.text().strip()
        return json.dumps(request)

    def _renew_text(self) -> str:
        request: dict = {"session": self._shown_session()}
        if self.ui.acquire_lease.value() > 0:
            request["lease"] = self.ui.acquire_lease.value()
        return json.dumps(request)

    def _shown_session(self) -> str:
        return self.ui.session.text().strip()

    def _session_entry(self) -> str:
        return self.ui.acquire_session.text().strip()

    def _reason_text(self) -> str:
        return self.ui.reason.text().strip()

    def _question(self, name: str, button, text: str) -> str:
        """What to ask before writing ``text`` ("" = write at once)."""
        if name in ("renew", "release", "handover"):
            shown, mine = self._shown_session(), self._session_entry()
            if not shown or shown == mine:
                return ""
            return (f"{button.text()} session '{shown}' of {self.ui.owner.text()}?\n"
                    f"Your Session field says '{mine}'.")
        if button.showConfirmDialog:
            return f"{button.confirmMessage}\n\nReason: {text or '(none)'}"
        return ""

    def send(self, name: str, button, text: str) -> None:
        """Ask if needed, then write through the button's channel."""
        question = self._question(name, button, text)
        if question and not ask(self, question):
            return
        button.send_value_signal[np.ndarray].emit(encode(text))

    # ---- history: the last events, newest first ----------------------------------------
    def _history_value(self, value) -> None:
        text = parse_value_for_display(value, 0, DisplayFormat.String, "utf_8", self.ui.history)
        self.ui.history.setText(newest_first(str(text), int(self.ui.history.property("lastLines"))))

    def _history_connection(self, connected: bool) -> None:
        if not connected:            # as every other readback: show the PV it waits for
            self.ui.history.setText(self.ui.history.channel)

    # ---- waiters: one line each, with the time waited ------------------------------------
    def _waiters_value(self, value) -> None:
        self._waiters = str(parse_value_for_display(value, 0, DisplayFormat.String, "utf_8",
                                                    self.ui.waiters))
        self._draw_waiters()

    def _tick_value(self, _value) -> None:
        if self._waiters:
            self._draw_waiters()

    def _draw_waiters(self) -> None:
        shown = int(self.ui.waiters.property("waitersShown"))
        self.ui.waiters.setText(waiters_text(self._waiters, shown))

    def _waiters_connection(self, connected: bool) -> None:
        if not connected:
            self._waiters = ""
            self.ui.waiters.setText(self.ui.waiters.channel)

    # ---- state colour -----------------------------------------------------------------
    def _state_enums(self, names) -> None:
        self._enum = tuple(names)

    def _state_value(self, value) -> None:
        try:
            name = self._enum[int(value)]
        except (IndexError, TypeError, ValueError):
            name = ""
        self._set_state_property(name)

    def _state_connection(self, connected: bool) -> None:
        if not connected:
            self._set_state_property("")

    def _set_state_property(self, name: str) -> None:
        label = self.ui.state
        label.setProperty("lockState", name)
        label.style().unpolish(label)
        label.style().polish(label)
