"""Generate the operator screens (Phoebus ``.bob``, PyDM ``.ui``) from the PV contract.

One layout, two renderers: the lock screen and the example device panel are described
once here, with every lock PV taken from ``lock_ioc/contract.py``, and written as
Phoebus and PyDM files. The output is committed; ``--check`` (and a test) fails when it
is stale, as for ``docs/pv-interface.md``.

    python clients/screens_gen.py           # write clients/phoebus/*.bob, clients/pydm/*.ui
    python clients/screens_gen.py --check   # exit 1 if a committed screen is stale

Macros: ``P`` (lock prefix, e.g. ``BL:LOCK:``); the device panel also ``DEV`` (device
prefix, e.g. ``BL:``) and ``GROUP`` (the viewer's lock group, e.g. ``staff``). Phoebus
spells them ``$(P)``, PyDM ``${P}``.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from xml.sax.saxutils import escape

from lock_ioc import contract

CLIENTS = Path(__file__).resolve().parent
#: Macros a screen may use; all must be given when it is opened (see docs/screens.md).
MACROS = {"lock.bob": ("P",), "devices.bob": ("P", "DEV", "GROUP"),
          "lock.ui": ("P",), "devices.ui": ("P", "DEV", "GROUP")}
#: State colours: Free green, Held amber, Disabled red (RGB).
STATE_COLOURS = {"Free": (60, 200, 60), "Held": (255, 176, 0), "Disabled": (220, 40, 40)}
GREY = (200, 200, 200)


# ---- the layout ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class W:
    """One widget of a screen, in toolkit-neutral terms.

    kind: ``title``/``label`` (static text), ``readback`` (a PV's value), ``state``
    (the coloured lock state), ``entry`` (local input, no PV), ``command`` (a button
    writing a lock command PV, value built from entries), ``write`` (a button writing a
    fixed number to a device PV), ``setpoint`` (numeric entry writing a device PV).
    pv: a lock contract suffix (``lock=True``) or a device suffix under ``$(DEV)``.
    A device panel control is either ``gated`` (usable only while the viewer's gate is
    1) or not: stop and make-safe buttons are never gated, whatever the lock says.
    """

    kind: str
    name: str
    x: int
    y: int
    w: int
    h: int = 24
    text: str = ""
    pv: str = ""
    lock: bool = True
    value: str = ""          # write: the number written; entry: the default
    numeric: bool = False    # entry: a number (lease seconds)
    build: str = ""          # command: how the written text is built (see COMMAND_BUILDS)
    confirm: str = ""        # command: confirmation question ("" = none)
    lines: int = 1           # readback: multi-line, top-aligned
    mono: bool = False       # readback: fixed-width small font (history lines)
    last: int = 0            # readback: show only the last N lines, newest first
    waiters: bool = False    # readback: $(P)Waiters (JSON) as one line per waiter, with
                             # the time each has waited (redrawn on every Heartbeat)
    only: str = ""           # "bob" / "ui": a widget of one toolkit only ("" = both)
    gated: bool = False      # device panel: enabled only while the viewer's gate is 1
    units: str = ""
    disconnected: str = ""   # readback: text while its PV is disconnected (PyDM; "" =
                             # the channel address, which a narrow box would clip)


#: What each command button writes, built from the screen's entries and readbacks.
COMMAND_BUILDS = {
    "acquire": 'JSON {"session": <session entry>, "lease": <lease entry, if > 0>, '
               '"note": <note entry, if any>}',
    "renew": 'JSON {"session": <the session shown>, "lease": <lease entry, if > 0>}',
    "release": "the session shown (the holder's own session)",
    "request": 'JSON {"session": <session entry>, "lease": <lease entry, if > 0>, '
               '"note": <note entry, if any>}: granted if the lock is yours to take, '
               "else you wait in line",
    "withdraw": "the session entry (the session of your request)",
    "handover": "the session shown (the holder's own session): to the first in line",
    "reason": "the reason entry (required)",
    "reason_optional": "the reason entry (may be empty)",
}


LABEL_W, VALUE_X, VALUE_W = 130, 140, 470
#: History events shown on the lock screen, newest first: ``$(P)History`` holds 20..100
#: events (newest last), more than any box shows; newest first keeps the newest visible
#: even when long events overflow the box (both toolkits cut text at the bottom).
HISTORY_SHOWN = 5
#: Phoebus text entries take typed text only on Enter (focus loss restores the old value).
ENTER_HINT = "(press Enter in a field to apply what you typed)"
#: What a disconnected State box says (PyDM), as lockctl does: the state is unknown.
STATE_UNKNOWN = "Unknown"
#: Waiters shown on the lock screen (``$(P)Waiters`` holds at most 8).
WAITERS_SHOWN = 4


def _row(y: int, label: str, name: str, pv: str, *, lines: int = 1, units: str = "",
         mono: bool = False, last: int = 0, w: int = VALUE_W) -> list[W]:
    h = 24 if lines == 1 else (14 if mono else 16) * lines + 8
    return [W("label", name + "_label", 10, y, LABEL_W, 24, text=label),
            W("readback", name, VALUE_X, y, w, h, pv=pv, lines=lines, units=units, mono=mono,
              last=last)]


def lock_screen() -> list[W]:
    """The lock: who holds it, why, for how long; take, renew, release; operator actions."""
    ws = [W("title", "title", 10, 8, 600, 28, text="Beamline lock  $(P)"),
          W("label", "state_label", 10, 48, LABEL_W, 32, text="State"),
          W("state", "state", VALUE_X, 48, 170, 32, pv="State", disconnected=STATE_UNKNOWN),
          W("label", "you", 330, 54, 280, 24, text="")]   # PyDM fills in "you: user@host"
    y = 90
    for label, name, pv, units in (("Owner", "owner", "Owner", ""),
                                   ("Session", "session", "Session", ""),
                                   ("Note", "note", "Note", ""),
                                   ("Token", "token", "Token", ""),
                                   ("Lease left", "remaining", "Remaining", "s"),
                                   ("Why disabled", "disabled_reason", "DisabledReason", "")):
        ws += _row(y, label, name, pv, units=units)
        y += 28
    ws += _row(y, "Last message", "message", "Message", lines=3)
    y += 60
    ws += [W("label", "waiting_label", 10, y, LABEL_W, 24, text="Waiting"),
           W("readback", "waiter_count", VALUE_X, y, 50, pv="WaiterCount", disconnected="?"),
           W("label", "yield_label", VALUE_X + 60, y, 80, 24, text="Yields to"),
           W("readback", "yield_to", VALUE_X + 140, y, VALUE_W - 140, pv="YieldTo")]
    y += 28
    ws += [W("readback", "waiters", VALUE_X, y, VALUE_W, 16 * WAITERS_SHOWN + 8, pv="Waiters",
             lines=WAITERS_SHOWN, waiters=True),
           W("label", "waiters_order", 10, y, LABEL_W, 20, text="first in line first")]
    y += 16 * WAITERS_SHOWN + 12
    ws += _row(y, "History", "history", "History", lines=10, mono=True, last=HISTORY_SHOWN)
    ws.append(W("label", "history_order", 10, y + 24, LABEL_W, 20, text="newest first"))
    y += 158
    ws += [W("title", "take_title", 10, y, 180, 24, text="Take the lock"),
           W("label", "take_hint", 200, y, 410, 24, text=ENTER_HINT, only="bob")]
    y += 30
    ws += [W("label", "acquire_session_label", 10, y, LABEL_W, text="Session"),
           W("entry", "acquire_session", VALUE_X, y, 180),
           W("label", "acquire_lease_label", 335, y, 85, text="Lease (s)"),
           W("entry", "acquire_lease", 420, y, 90, value="600", numeric=True)]
    y += 28
    ws += [W("label", "acquire_note_label", 10, y, LABEL_W, text="Note"),
           W("entry", "acquire_note", VALUE_X, y, VALUE_W)]
    y += 32
    ws += [W("command", "acquire", VALUE_X, y, 145, 30, text="Acquire", pv="Acquire",
             build="acquire"),
           W("command", "renew", VALUE_X + 162, y, 145, 30, text="Renew", pv="Renew",
             build="renew"),
           W("command", "release", VALUE_X + 325, y, 145, 30, text="Release", pv="Release",
             build="release")]
    y += 36
    ws += [W("command", "request", VALUE_X, y, 145, 30, text="Request", pv="Request",
             build="request"),
           W("command", "withdraw", VALUE_X + 162, y, 145, 30, text="Withdraw", pv="Withdraw",
             build="withdraw"),
           W("command", "handover", VALUE_X + 325, y, 145, 30, text="Hand over",
             pv="Handover", build="handover")]
    y += 44
    ws += [W("title", "operator_title", 10, y, 180, 24, text="Operators"),
           W("label", "operator_hint", 200, y, 410, 24, text=ENTER_HINT, only="bob")]
    y += 30
    ws += [W("label", "reason_label", 10, y, LABEL_W, text="Reason"),
           W("entry", "reason", VALUE_X, y, VALUE_W)]
    y += 32
    ws += [W("command", "force_release", VALUE_X, y, 145, 30, text="Force release",
             pv="ForceRelease", build="reason",
             confirm="Force-release the lock from its holder?"),
           W("command", "disable", VALUE_X + 162, y, 145, 30, text="Disable", pv="Disable",
             build="reason", confirm="Disable the lock? Only operators may then write."),
           W("command", "enable", VALUE_X + 325, y, 145, 30, text="Enable", pv="Enable",
             build="reason_optional", confirm="Enable the lock again?")]
    return ws


def device_panel() -> list[W]:
    """The simulated beamline (db/): who holds the lock; controls usable only while the
    viewer's gate is 1, except Stop and Close, which the lock never refuses."""
    ws = [W("title", "title", 10, 8, 560, 28, text="Beamline devices  $(DEV)"),
          W("label", "gate_label", 10, 44, 130, 24, text="Gate $(GROUP)"),
          W("readback", "gate", 145, 44, 50, 24, pv=contract.gate_suffix("$(GROUP)"),
            disconnected="?"),
          W("label", "lock_state_label", 265, 44, 70, 24, text="Lock"),
          W("readback", "lock_state", 345, 44, 110, 24, pv="State",
            disconnected=STATE_UNKNOWN),
          W("label", "lock_owner_label", 10, 72, 130, 24, text="Held by"),
          W("readback", "lock_owner", 145, 72, 425, 24, pv="Owner"),
          W("label", "command_heading", 110, 104, 110, 20, text="gated"),
          W("label", "safe_heading", 226, 104, 115, 20, text="never gated"),
          W("label", "readback_heading", 345, 104, 110, 20, text="readback"),
          W("label", "moving_heading", 470, 104, 80, 20, text="moving"),
          W("label", "shutter_label", 10, 130, 100, text="Shutter"),
          W("write", "shutter_open", 120, 128, 90, 28, text="Open", pv="Shutter:Open",
            lock=False, value="1", gated=True),
          W("write", "shutter_close", 226, 128, 84, 28, text="Close", pv="Shutter:Close",
            lock=False, value="1"),
          W("readback", "shutter_status", 345, 130, 110, pv="Shutter:Status", lock=False)]
    y = 168
    for m in ("m1", "m2"):
        ws += [W("label", f"{m}_label", 10, y + 2, 100, text=f"Motor {m}"),
               W("setpoint", f"{m}_setpoint", 110, y, 110, 28, pv=m, lock=False, gated=True),
               W("write", f"{m}_stop", 226, y, 84, 28, text="Stop", pv=f"{m}:STOP",
                 lock=False, value="1"),
               W("readback", f"{m}_rbv", 345, y + 2, 110, pv=f"{m}:RBV", lock=False),
               W("readback", f"{m}_movn", 470, y + 2, 60, pv=f"{m}:MOVN", lock=False)]
        y += 40
    return ws


SCREENS: dict[str, tuple[str, Callable[[], list[W]], tuple[int, int]]] = {
    "lock": ("Beamline lock", lock_screen, (620, 880)),
    "devices": ("Beamline devices", device_panel, (580, 258)),
}


def pv_of(w: W) -> str:
    """The widget's PV with Phoebus macros (``$(P)State``, ``$(DEV)m1``)."""
    if not w.pv:
        return ""
    if w.lock:
        suffix = w.pv
        if not suffix.startswith(contract.GATE_PREFIX):
            assert suffix in contract.BY_SUFFIX, f"{suffix} is not in the contract"
        return "$(P)" + suffix
    return "$(DEV)" + w.pv


def is_text(w: W) -> bool:
    return w.lock and contract.BY_SUFFIX.get(w.pv, contract.GATE).kind == "text"


# ---- Phoebus (.bob) --------------------------------------------------------------
def _color(tag: str, rgb: tuple[int, int, int]) -> str:
    r, g, b = rgb
    return f'<{tag}><color red="{r}" green="{g}" blue="{b}"/></{tag}>'


#: The embedded Jython shared by every command button. It reads the entries (local
#: PVs) and readbacks through their widgets' primary PVs, and writes UTF-8 bytes to the
#: button's own pv_name (a CHAR array), so any text arrives intact (JCA would cut a
#: java String's characters to one byte each). The button's pv_name already connects a
#: primary PV (for its alarm border and ``$(pv_name)``); the script takes a second,
#: pooled handle on the same name with PVUtil.createPV, which fails within 5 s with a
#: logged error if the lock IOC is unreachable, and releases it after the write.
#: Dialogs come from the script, not the button's confirm_dialog, because that text is
#: fixed: the script shows what it will send (the reason, the session) and refuses an
#: empty reason or session with a message instead of sending it.
BOB_SEND = """\
from org.csstudio.display.builder.runtime.script import PVUtil, ScriptUtil
from jarray import array
import json

def value_of(name, text=True):
    pv = ScriptUtil.getPrimaryPV(ScriptUtil.findWidgetByName(widget, name))
    if text:
        return PVUtil.getString(pv, True).strip()
    return PVUtil.getDouble(pv)

def ask(question):
    return ScriptUtil.showConfirmationDialog(widget, question)

def refuse(message):
    ScriptUtil.showErrorDialog(widget, message)

def send(text):
    data = [(b + 128) % 256 - 128 for b in bytearray(text.encode("utf-8"))] + [0]
    pv = PVUtil.createPV(widget.getPropertyValue("pv_name"), 5000)
    try:
        pv.write(array(data, "b"))
    finally:
        PVUtil.releasePV(pv)

def lease(request):
    if value_of("acquire_lease", False) > 0:
        request["lease"] = value_of("acquire_lease", False)
    return request

def check_session(what):
    shown = value_of("session")
    mine = value_of("acquire_session")
    if not shown or shown == mine:
        return shown
    if ask(what + " session '" + shown + "' of " + value_of("owner") + "?\\n"
           "Your Session field says '" + mine + "' (press Enter there to apply it)."):
        return shown
    return None
"""

def _bob_take(button: str) -> str:
    """Acquire and Request: JSON from the Session, Lease and Note entries."""
    return f"""
session = value_of("acquire_session")
if session:
    request = lease({{"session": session}})
    if value_of("acquire_note"):
        request["note"] = value_of("acquire_note")
    send(json.dumps(request))
else:
    refuse("Type a session name in Session and press Enter, then {button}.")
"""


#: What each command button's script does after BOB_SEND (``QUESTION``: the W.confirm).
BOB_BUILD = {
    "acquire": _bob_take("Acquire"),
    "renew": """
session = check_session("Renew")
if session is not None:
    send(json.dumps(lease({"session": session})))
""",
    "release": """
session = check_session("Release")
if session is not None:
    send(session)
""",
    "request": _bob_take("Request"),
    "withdraw": """
session = value_of("acquire_session")
if session:
    send(session)
else:
    refuse("Type the session of your request in Session and press Enter, then Withdraw.")
""",
    "handover": """
session = check_session("Hand over")
if session is not None:
    send(session)
""",
    "reason": """
reason = value_of("reason")
if not reason:
    refuse("Type a reason in Reason and press Enter first.")
elif ask(QUESTION + "\\n\\nReason: " + reason):
    send(reason)
""",
    "reason_optional": """
reason = value_of("reason")
if ask(QUESTION + "\\n\\nReason: " + (reason or "(none)")):
    send(reason)
""",
}

#: The History box (a label widget): the last HISTORY_SHOWN events of $(P)History,
#: newest first, so the newest is visible however long the events are (a JavaFX label
#: cuts overflow at its end). Runs also on disconnect (check_connections="false") and
#: then shows "<PV name>" as a disconnected Phoebus text update does.
BOB_HISTORY = """\
from org.csstudio.display.builder.runtime.script import ValueUtil
from org.phoebus.pv import PV

value = pvs[0].read()
if PV.isDisconnected(value):
    text = "<" + pvs[0].getName() + ">"
else:
    lines = [l for l in ValueUtil.getString(value, True).splitlines() if l.strip()]
    text = "\\n".join(reversed(lines[-LAST:]))
widget.setPropertyValue("text", text)
"""


#: The Waiters box (a label widget): one line per waiter, first in line first, with how
#: long each has waited; run on every Waiters update and every Heartbeat (each second).
BOB_WAITERS = """\
from org.csstudio.display.builder.runtime.script import ValueUtil
from org.phoebus.pv import PV
import json
import time

value = pvs[0].read()
if PV.isDisconnected(value):
    text = "<" + pvs[0].getName() + ">"
else:
    lines = []
    now = time.time()
    for i, w in enumerate(json.loads(ValueUtil.getString(value, True) or "[]")[:SHOWN]):
        note = (" '" + w["note"] + "'") if w["note"] else ""
        lines.append("%d. %s session %s, %d s%s" % (i + 1, w["who"], w["session"],
                                                    max(0, now - w["since"]), note))
    text = "\\n".join(lines) or "nobody"
widget.setPropertyValue("text", text)
"""


def _bob_script(body: str, **constants: object) -> str:
    """Embedded Jython with ASCII constants first (Jython 2 reads "\\u" literally)."""
    head = "".join(f"{k} = {json.dumps(v)}\n" for k, v in constants.items())
    assert head.isascii(), head
    return head + body


def _bob_gate_rule() -> str:
    return ('<rules><rule name="gate" prop_id="enabled" out_exp="false">'
            '<exp bool_exp="pv0==1"><value>true</value></exp>'
            '<pv_name>$(P)Gate:$(GROUP)</pv_name></rule></rules>')


def _bob_state_rule(pv: str) -> str:
    """Colour by the enum index (``pv0``, PVUtil.getDouble): NaN when disconnected, so
    no expression matches and the rule's else branch restores the initial grey.
    (``pvStr0`` would raise on a disconnected PV and leave the last colour.)"""
    exps = "".join(f'<exp bool_exp="pv0=={contract.STATES.index(s)}">{_color("value", c)}</exp>'
                   for s, c in STATE_COLOURS.items())
    return (f'<rules><rule name="state colour" prop_id="background_color" out_exp="false">'
            f'{exps}<pv_name>{pv}</pv_name></rule></rules>')


def _bob_widget(w: W) -> str:
    geo = f"<x>{w.x}</x><y>{w.y}</y><width>{w.w}</width><height>{w.h}</height>"
    name = f"<name>{escape(w.name)}</name>"
    pv = escape(pv_of(w))
    if w.only == "ui":
        return ""
    if w.kind in ("title", "label"):
        if not w.text:
            return ""   # "you: user@host" has no Phoebus equivalent
        font = ('<font><font family="Liberation Sans" style="BOLD" size="16.0"/></font>'
                if w.kind == "title" else "")
        return (f'<widget type="label" version="2.0.0">{name}<text>{escape(w.text)}</text>'
                f"{geo}{font}</widget>")
    if w.kind in ("readback", "state"):
        extra = ""
        if is_text(w) and not w.last and not w.waiters:
            extra += "<format>6</format>"
        if w.lines > 1:
            extra += "<vertical_alignment>0</vertical_alignment><wrap_words>true</wrap_words>"
            family = "Liberation Mono" if w.mono else "Liberation Sans"
            extra += f'<font><font family="{family}" style="REGULAR" size="11.0"/></font>'
        if w.waiters:
            # A label whose text a script sets (see BOB_WAITERS); no primary PV.
            script = escape(_bob_script(BOB_WAITERS, SHOWN=w.lines))
            return (f'<widget type="label" version="2.0.0">{name}<text>&lt;{pv}&gt;</text>'
                    f"{geo}{extra}<tooltip>{pv}: who waits, first in line first, and for "
                    f'how long</tooltip><scripts><script file="EmbeddedPy" '
                    f'check_connections="false"><text>{script}</text><pv_name>{pv}</pv_name>'
                    f"<pv_name>$(P)Heartbeat</pv_name></script></scripts></widget>")
        if w.last:
            # A label whose text a script sets (see BOB_HISTORY); no primary PV.
            script = escape(_bob_script(BOB_HISTORY, LAST=w.last))
            return (f'<widget type="label" version="2.0.0">{name}<text>&lt;{pv}&gt;</text>'
                    f"{geo}{extra}<tooltip>{pv}: the last {w.last} events, newest first"
                    f'</tooltip><scripts><script file="EmbeddedPy" check_connections="false">'
                    f"<text>{script}</text><pv_name>{pv}</pv_name></script></scripts></widget>")
        if w.units:
            extra += "<format>1</format><precision>0</precision><show_units>true</show_units>"
        if w.kind == "state":
            extra += ('<horizontal_alignment>1</horizontal_alignment>'
                      '<font><font family="Liberation Sans" style="BOLD" size="16.0"/></font>'
                      f'{_color("background_color", GREY)}<transparent>false</transparent>'
                      + _bob_state_rule(pv))
        return (f'<widget type="textupdate" version="2.0.0">{name}<pv_name>{pv}</pv_name>'
                f"{geo}{extra}</widget>")
    if w.kind == "entry":
        if w.numeric:
            loc = f'loc://lock_{w.name}$(DID)&lt;VDouble&gt;({w.value or 0})'
            fmt = "<format>1</format><precision>0</precision>"
        else:
            loc = f'loc://lock_{w.name}$(DID)&lt;VString&gt;("{escape(w.value)}")'
            fmt = "<format>6</format>"
        return (f'<widget type="textentry" version="3.0.0">{name}<pv_name>{loc}</pv_name>'
                f"{geo}{fmt}</widget>")
    if w.kind == "command":
        question = {"QUESTION": w.confirm} if w.confirm else {}
        script = _bob_script(BOB_SEND + BOB_BUILD[w.build], **question)
        return (f'<widget type="action_button" version="3.0.0">{name}'
                f"<pv_name>{pv}</pv_name><text>{escape(w.text)}</text>{geo}"
                f'<actions><action type="execute"><script file="EmbeddedPy">'
                f"<text>{escape(script)}</text></script>"
                f"<description>{escape(w.text)}</description></action></actions></widget>")
    gate = "<enabled>false</enabled>" + _bob_gate_rule() if w.gated else ""
    if w.kind == "write":
        return (f'<widget type="action_button" version="3.0.0">{name}'
                f"<pv_name>{pv}</pv_name><text>{escape(w.text)}</text>{geo}"
                f'<actions><action type="write_pv"><pv_name>$(pv_name)</pv_name>'
                f"<value>{w.value}</value><description>{escape(w.text)}</description>"
                f"</action></actions>{gate}</widget>")
    if w.kind == "setpoint":
        return (f'<widget type="textentry" version="3.0.0">{name}<pv_name>{pv}</pv_name>'
                f"{geo}<format>1</format><show_units>true</show_units>{gate}</widget>")
    raise ValueError(f"unknown widget kind {w.kind!r}")


def render_bob(screen: str) -> str:
    title, build, (width, height) = SCREENS[screen]
    body = "".join(map(_bob_widget, build()))
    needs = ", ".join(f"$({m})" for m in MACROS[screen + ".bob"])
    return _pretty(f'<display version="2.0.0">{_header(needs)}<name>{escape(title)}</name>'
                   f"<width>{width}</width><height>{height}</height>{body}</display>")


# ---- PyDM (.ui) ------------------------------------------------------------------
def _pydm_macros(text: str) -> str:
    """PyDM substitutes ``${NAME}`` (Python's string.Template), Phoebus ``$(NAME)``."""
    return re.sub(r"\$\((\w+)\)", r"${\1}", text)


def _pydm_pv(w: W) -> str:
    return "ca://" + _pydm_macros(pv_of(w))


def _prop(name: str, inner: str, stdset: bool = True) -> str:
    flag = "" if stdset else ' stdset="0"'
    return f'<property name="{name}"{flag}>{inner}</property>'


def _string(name: str, value: str, stdset: bool = True) -> str:
    return _prop(name, f"<string>{escape(value)}</string>", stdset)


def _geometry(x: int, y: int, w: int, h: int) -> str:
    return _prop("geometry", f"<rect><x>{x}</x><y>{y}</y><width>{w}</width>"
                             f"<height>{h}</height></rect>")


def _css_rgb(rgb: tuple[int, int, int]) -> str:
    return "rgb({}, {}, {})".format(*rgb)


def _pydm_state_style(name: str) -> str:
    """Colour by the ``lockState`` property that lock.py sets from the State PV."""
    rules = [f'PyDMLabel#{name} {{ background-color: {_css_rgb(GREY)}; border-radius: 4px; }}']
    rules += [f'PyDMLabel#{name}[lockState="{s}"] {{ background-color: {_css_rgb(c)}; }}'
              for s, c in STATE_COLOURS.items()]
    rules.append(f'PyDMLabel#{name}[alarmSeverity="4"] {{ background-color: {_css_rgb(GREY)}; '
                 "border: 3px dashed rgb(235, 0, 235); }")
    return "\n".join(rules)


def _pydm_widget(w: W, dx: int = 0, dy: int = 0) -> str:
    geo = _geometry(w.x - dx, w.y - dy, w.w, w.h)
    text = _pydm_macros(w.text)
    if w.kind in ("title", "label"):
        font = _prop("font", "<font><pointsize>13</pointsize><weight>75</weight>"
                             "<bold>true</bold></font>") if w.kind == "title" else ""
        return (f'<widget class="QLabel" name="{w.name}">{geo}{font}'
                f"{_string('text', text)}</widget>")
    if w.kind in ("readback", "state"):
        props = _string("channel", _pydm_pv(w), False)
        tip = f": the last {w.last} events, newest first" if w.last else \
            ": who waits, first in line first, and for how long" if w.waiters else ""
        props += _string("toolTip", _pydm_macros(pv_of(w)) + tip)
        if is_text(w):
            props += _prop("displayFormat", "<enum>PyDMLabel::String</enum>", False)
        if w.units:
            props += _prop("showUnits", "<bool>true</bool>", False)
            props += _prop("precisionFromPV", "<bool>false</bool>", False)
            props += _prop("precision", "<number>0</number>", False)
        if w.last:
            # lock.py sets the text: the last ``lastLines`` lines, newest first; the
            # label keeps it (displayLabelText) but still shows the PV's alarm border.
            props += _prop("displayLabelText", "<bool>true</bool>", False)
            props += _prop("lastLines", f"<number>{w.last}</number>", False)
        if w.waiters:
            # lock.py sets the text: one line per waiter with the time waited.
            props += _prop("displayLabelText", "<bool>true</bool>", False)
            props += _prop("waitersShown", f"<number>{w.lines}</number>", False)
        if w.lines > 1:
            props += _prop("wordWrap", "<bool>true</bool>")
            props += _prop("alignment", "<set>Qt::AlignLeft|Qt::AlignTop</set>")
            family = "<family>Monospace</family>" if w.mono else ""
            props += _prop("font", f"<font>{family}<pointsize>{8 if w.mono else 9}</pointsize>"
                                   "</font>")
        props += _prop("alarmSensitiveBorder", "<bool>true</bool>", False)
        if w.disconnected:
            props += _string("disconnectedText", w.disconnected, False)
        if w.kind == "state":
            props += _prop("alignment", "<set>Qt::AlignCenter</set>")
            props += _prop("font", "<font><pointsize>14</pointsize><weight>75</weight>"
                                   "<bold>true</bold></font>")
            props += _string("styleSheet", _pydm_state_style(w.name))
        return f'<widget class="PyDMLabel" name="{w.name}">{geo}{props}</widget>'
    if w.kind == "entry":
        if w.numeric:
            return (f'<widget class="QDoubleSpinBox" name="{w.name}">{geo}'
                    f'{_prop("decimals", "<number>0</number>")}'
                    f'{_prop("maximum", "<double>604800</double>")}'
                    f'{_prop("value", f"<double>{float(w.value or 0)}</double>")}</widget>')
        return (f'<widget class="QLineEdit" name="{w.name}">{geo}'
                f"{_string('text', w.value)}</widget>")
    if w.kind == "command":
        props = _string("text", w.text) + _string("channel", _pydm_pv(w), False)
        props += _string("toolTip", _pydm_macros(f"writes {pv_of(w)}: {COMMAND_BUILDS[w.build]}"))
        if w.confirm:
            props += _prop("showConfirmDialog", "<bool>true</bool>", False)
            props += _string("confirmMessage", w.confirm, False)
        return f'<widget class="PyDMPushButton" name="{w.name}">{geo}{props}</widget>'
    if w.kind == "write":
        props = _string("text", w.text) + _string("channel", _pydm_pv(w), False)
        props += _string("pressValue", w.value, False) + _string("toolTip", _pydm_macros(pv_of(w)))
        return f'<widget class="PyDMPushButton" name="{w.name}">{geo}{props}</widget>'
    if w.kind == "setpoint":
        props = _string("channel", _pydm_pv(w), False) + _string("toolTip", _pydm_macros(pv_of(w)))
        props += _prop("showUnits", "<bool>true</bool>", False)
        return f'<widget class="PyDMLineEdit" name="{w.name}">{geo}{props}</widget>'
    raise ValueError(f"unknown widget kind {w.kind!r}")


def _pydm_gated_frame(ws: list[W]) -> str:
    """PyDM: one frame around the gated controls, enabled by a rule on the viewer's gate.

    Children of a disabled frame are disabled whatever their own state, so a control is
    usable only when the gate is 1 *and* its IOC grants this client write access (PyDM
    disables a widget without write access by itself). Disconnected gate: disabled.
    """
    x0, y0 = min(w.x for w in ws) - 4, min(w.y for w in ws) - 4
    x1, y1 = max(w.x + w.w for w in ws) + 4, max(w.y + w.h for w in ws) + 4
    rule = [{"name": "gate", "property": "Enable", "initial_value": "False",
             "expression": "ch[0] == 1",
             "channels": [{"channel": "ca://${P}Gate:${GROUP}", "trigger": True,
                           "use_enum": False}]}]
    inner = "".join(_pydm_widget(w, x0, y0) for w in ws)
    return (f'<widget class="PyDMFrame" name="gated">{_geometry(x0, y0, x1 - x0, y1 - y0)}'
            f'{_string("channel", "ca://${P}Gate:${GROUP}", False)}'
            f'{_prop("disableOnDisconnect", "<bool>true</bool>", False)}'
            f'{_string("rules", json.dumps(rule), False)}'
            f'{_string("toolTip", "enabled while ${P}Gate:${GROUP} is 1")}'
            f"{inner}</widget>")


CUSTOM = {"PyDMLabel": ("QLabel", "pydm.widgets.label"),
          "PyDMPushButton": ("QPushButton", "pydm.widgets.pushbutton"),
          "PyDMLineEdit": ("QLineEdit", "pydm.widgets.line_edit"),
          "PyDMFrame": ("QFrame", "pydm.widgets.frame")}


def render_ui(screen: str) -> str:
    title, build, (width, height) = SCREENS[screen]
    ws = [w for w in build() if w.only != "bob"]
    gated = [w for w in ws if w.gated]
    body = "".join(_pydm_widget(w) for w in ws if not w.gated)
    if gated:
        body += _pydm_gated_frame(gated)
    used = [c for c in CUSTOM if f'class="{c}"' in body]
    custom = "".join(f"<customwidget><class>{c}</class><extends>{CUSTOM[c][0]}</extends>"
                     f"<header>{CUSTOM[c][1]}</header>"
                     + ("<container>1</container>" if c == "PyDMFrame" else "")
                     + "</customwidget>" for c in used)
    needs = ", ".join("${" + m + "}" for m in MACROS[screen + ".ui"])
    return _pretty(f'<ui version="4.0">{_header(needs)}<class>Form</class>'
                   f'<widget class="QWidget" name="Form">'
                   f"{_geometry(0, 0, width, height)}{_string('windowTitle', title)}{body}"
                   f"</widget><customwidgets>{custom}</customwidgets></ui>")


def _header(macros: str) -> str:
    return (" <!-- Generated by clients/screens_gen.py from lock_ioc/contract.py: do not "
            f"edit. Macros (required): {macros} --> ")


def _pretty(compact: str) -> str:
    """Indented XML, comments kept, so diffs of the committed screens stay readable."""
    parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))
    root = ET.fromstring(compact, parser=parser)
    ET.indent(root, "  ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"


# ---- files -----------------------------------------------------------------------
def outputs() -> dict[Path, str]:
    """Every generated file and its content."""
    out = {}
    for screen in SCREENS:
        out[CLIENTS / "phoebus" / f"{screen}.bob"] = render_bob(screen)
        out[CLIENTS / "pydm" / f"{screen}.ui"] = render_ui(screen)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--check"]):
        print("usage: python clients/screens_gen.py [--check]", file=sys.stderr)
        return 2
    stale = []
    for path, text in outputs().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args:
            stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(CLIENTS.parent)}")
    if stale:
        names = ", ".join(str(p.relative_to(CLIENTS.parent)) for p in stale)
        print(f"stale: {names}; run python clients/screens_gen.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
