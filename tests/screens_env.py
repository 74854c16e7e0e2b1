"""Operator screens under test: a PyDM screen driven headless, and static screen checks.

:class:`PyDMScreen` runs the real ``PyDMApplication`` (as the ``pydm`` command does) in
a subprocess with ``QT_QPA_PLATFORM=offscreen`` and the test's CA environment (libca
reads it once per process), as an OS user (``operator`` unless told otherwise: its CA
identity) on the installation every account runs, and drives it over stdin/stdout, one
JSON request per line: read a widget's text, enabled state or property, type into an entry, click a
button (answering its confirmation dialog), save a screenshot.

    python tests/screens_env.py shoot docs/screens   # regenerate the README screenshots

The static half parses the generated ``.bob`` / ``.ui`` files and lists every PV,
macro, write and script they contain, for the tests to check against the contract
and against live IOCs.
"""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLIENTS = REPO / "clients"
SCREENS = {"lock": ("P",), "devices": ("P", "DEV", "GROUP")}


# ---- driving a PyDM screen ----------------------------------------------------------
class ScreenError(AssertionError):
    """The screen process failed or answered an error."""


class PyDMScreen:
    """A PyDM display in its own process, driven through Qt (not through CA)."""

    def __init__(self, net, screen: str, macros: dict[str, str], log: Path,
                 timeout: float = 60, user: str | None = "operator"):
        from demo.install import as_user
        from epics_env import installation, user_dir
        self.screen, self.macros, self.log_path, self.timeout = screen, macros, log, timeout
        self.user = user
        inst = installation()
        path = (inst.share / "clients" / "pydm"
                / ("lock.py" if screen == "lock" else f"{screen}.ui"))
        env = net.client_env()
        env.update(QT_QPA_PLATFORM="offscreen", XDG_RUNTIME_DIR=str(user_dir(user, "xdg")),
                   PYTHONUNBUFFERED="1")
        self._shots = user_dir(user, "shots")   # where the screen's account may write
        env.pop("DISPLAY", None)
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            as_user(user, [str(inst.python), str(_driver()), "drive", str(path),
                           json.dumps(macros)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env,
            text=True, start_new_session=True)
        self._replies: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_replies, daemon=True).start()
        try:
            self.request({"op": "ping"})
        except BaseException:
            self.close()
            raise

    def _read_replies(self) -> None:
        for line in self.proc.stdout:
            self._replies.put(line)
        self._replies.put(None)

    def request(self, req: dict):
        """Send one request and wait (at most ``timeout`` s) for its one-line answer."""
        if self.proc.poll() is not None:
            raise ScreenError(f"PyDM process exited ({self.proc.returncode}):\n{self.log()}")
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        try:
            line = self._replies.get(timeout=self.timeout)
        except queue.Empty:
            raise ScreenError(f"no answer to {req} within {self.timeout} s:\n"
                              f"{self.log()}") from None
        if line is None:
            self.proc.wait(10)
            raise ScreenError(f"PyDM process ended ({self.proc.returncode}) during {req}:\n"
                              f"{self.log()}")
        reply = json.loads(line)
        if "error" in reply:
            raise ScreenError(f"{req}: {reply['error']}")
        return reply.get("value")

    def text(self, widget: str) -> str:
        return self.request({"op": "text", "widget": widget})

    def enabled(self, widget: str) -> bool:
        return self.request({"op": "enabled", "widget": widget})

    def prop(self, widget: str, name: str):
        return self.request({"op": "property", "widget": widget, "name": name})

    def type(self, widget: str, value) -> None:
        self.request({"op": "type", "widget": widget, "value": value})

    def click(self, widget: str, confirm: bool | None = None) -> str | None:
        """Click like a user; ``confirm``: answer the Yes/No dialog the click opens (and
        return its text). Without ``confirm`` a dialog would block: the request times out."""
        return self.request({"op": "click", "widget": widget, "confirm": confirm})

    def visible_lines(self, widget: str) -> list[str]:
        """The lines of a word-wrapped label's text that Qt draws entirely inside it."""
        return self.request({"op": "visible_lines", "widget": widget})

    def grab(self, path: Path) -> Path:
        """A screenshot of the window, as a PNG at ``path``."""
        shot = self._shots / path.name
        self.request({"op": "grab", "path": str(shot)})
        shutil.copyfile(shot, path)
        return path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()           # the screen quits at end of input
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


def _driver() -> Path:
    """This file, where the screen's account can read it (the checkout may be private)."""
    from epics_env import public_dir
    copy = public_dir() / "screens_env.py"
    if not copy.exists():
        shutil.copyfile(__file__, copy)
        copy.chmod(0o644)
    return copy


def _drive(path: str, macros_json: str) -> int:
    """The screen process: PyDMApplication + a JSON-lines request loop on stdin.

    Answers go to a private copy of stdout; fd 1 itself is pointed at stderr (the log),
    so nothing else printed (by Python or by libca) can interleave with them.
    """
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    from pydm import PyDMApplication
    from qtpy import QtCore, QtWidgets

    app = PyDMApplication(ui_file=path, macros=json.loads(macros_json), hide_nav_bar=True,
                          hide_menu_bar=True, hide_status_bar=True)
    display = app.main_window.display_widget()
    raised: list[str] = []

    def excepthook(kind, exc, tb) -> None:
        """An exception in a Qt slot only prints; make the next request fail with it."""
        import traceback
        raised.append("".join(traceback.format_exception(kind, exc, tb)))
        sys.__excepthook__(kind, exc, tb)

    sys.excepthook = excepthook

    def find(name: str) -> QtWidgets.QWidget:
        widget = display.findChild(QtWidgets.QWidget, name)
        if widget is None:
            raise KeyError(f"no widget named {name!r} in {path}")
        return widget

    dialogs: list[str] = []     # the text of the dialog answered during a click
    answer: list[bool] = []     # the answer still to give (one dialog per click)

    def answer_dialog() -> None:
        if not answer:
            return
        box = app.activeModalWidget()
        if isinstance(box, QtWidgets.QMessageBox):
            dialogs.append(box.text())
            yes = answer.pop()
            box.button(QtWidgets.QMessageBox.Yes if yes else QtWidgets.QMessageBox.No).click()
        else:
            QtCore.QTimer.singleShot(20, answer_dialog)

    def visible_lines(label: QtWidgets.QLabel) -> list[str]:
        """Lines of the text that fit, from the top: a QLabel whose (wrapped) text is
        taller than the label draws its top part (whatever its vertical alignment)."""
        area = label.contentsRect().adjusted(label.margin(), label.margin(),
                                             -label.margin(), -label.margin())
        flags = int(QtCore.Qt.AlignLeft | QtCore.Qt.AlignTop)
        if label.wordWrap():
            flags |= int(QtCore.Qt.TextWordWrap)
        lines = label.text().split("\n")
        for n in range(len(lines), 0, -1):
            box = label.fontMetrics().boundingRect(
                QtCore.QRect(0, 0, area.width(), 1_000_000), flags, "\n".join(lines[:n]))
            if box.height() <= area.height():
                return lines[:n]
        return []

    def handle(req: dict):
        if raised:
            raise RuntimeError("the screen raised:\n" + "\n".join(raised))
        op = req["op"]
        if op == "ping":
            return True
        if op == "grab":
            app.processEvents()
            if not app.main_window.grab().save(req["path"], "PNG"):
                raise OSError(f"could not write {req['path']}")
            return req["path"]
        widget = find(req["widget"])
        if op == "text":
            return widget.text()
        if op == "enabled":
            return widget.isEnabled()
        if op == "property":
            value = widget.property(req["name"])
            return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if op == "type":
            if isinstance(widget, QtWidgets.QDoubleSpinBox):
                widget.setValue(float(req["value"]))
            else:
                widget.clear()
                widget.insert(str(req["value"]))
            return True
        if op == "visible_lines":
            return visible_lines(widget)
        if op == "click":
            if not widget.isEnabled():
                raise RuntimeError(f"{req['widget']} is disabled")
            dialogs.clear()
            answer.clear()
            if req.get("confirm") is not None:
                answer.append(bool(req["confirm"]))
                QtCore.QTimer.singleShot(20, answer_dialog)
            widget.click()
            answer.clear()
            if req.get("confirm") is not None and not dialogs:
                raise RuntimeError(f"clicking {req['widget']} asked nothing")
            return dialogs[-1] if dialogs else None
        raise ValueError(f"unknown op {op!r}")

    class Bridge(QtCore.QObject):
        request = QtCore.Signal(str)

        @QtCore.Slot(str)
        def run(self, line: str) -> None:
            try:
                reply = {"value": handle(json.loads(line))}
            except Exception as exc:  # noqa: BLE001 - reported to the test, which fails
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            out.write(json.dumps(reply) + "\n")
            out.flush()

    bridge = Bridge()
    bridge.request.connect(bridge.run, QtCore.Qt.QueuedConnection)

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip():
                bridge.request.emit(line)
        QtCore.QMetaObject.invokeMethod(app, "quit", QtCore.Qt.QueuedConnection)

    threading.Thread(target=read_stdin, daemon=True).start()
    app.main_window.resize(display.sizeHint().expandedTo(display.size()))
    return app.exec_()


# ---- static checks of the screen files -------------------------------------------------
PHOEBUS_MACRO = re.compile(r"\$\((\w+)\)")
PYDM_MACRO = re.compile(r"\$\{(\w+)\}")
#: Macros Phoebus itself defines for every display and widget.
PHOEBUS_BUILTIN = {"DID", "DNAME", "pv_name", "pv_value", "actions"}


def bob_widgets(path: Path) -> list[ET.Element]:
    return list(ET.parse(path).getroot().iter("widget"))


def bob_pvs(path: Path) -> list[tuple[str, str, str]]:
    """(widget name, where, PV name as written) for every PV a .bob names."""
    found = []
    for w in bob_widgets(path):
        name = w.findtext("name", "")
        pv = w.findtext("pv_name")
        if pv:
            found.append((name, "pv_name", pv))
        for rule in w.iter("rule"):
            for rpv in rule.iter("pv_name"):
                found.append((name, f"rule {rule.get('name')}", rpv.text or ""))
        for script in w.findall("scripts/script"):
            for spv in script.findall("pv_name"):
                found.append((name, "script", spv.text or ""))
        for action in w.iter("action"):
            apv = action.findtext("pv_name")
            if apv:
                found.append((name, f"action {action.get('type')}",
                              pv if apv == "$(pv_name)" else apv))
    return found


def ui_pvs(path: Path) -> list[tuple[str, str, str]]:
    """(widget name, where, PV name with ``${}`` macros) for every channel a .ui names."""
    found = []
    for w in ET.parse(path).getroot().iter("widget"):
        name = w.get("name")
        for prop in w.findall("property"):
            value = prop.findtext("string") or ""
            if prop.get("name") == "channel" and value:
                found.append((name, "channel", value))
            if prop.get("name") == "rules" and value:
                for rule in json.loads(value):
                    for ch in rule["channels"]:
                        found.append((name, f"rule {rule['name']}", ch["channel"]))
    return found


def ui_props(widget: ET.Element) -> dict[str, str]:
    out = {}
    for prop in widget.findall("property"):
        child = next(iter(prop), None)
        out[prop.get("name")] = "" if child is None else (child.text or "").strip()
    return out


def expand(text: str, macros: dict[str, str], pattern: re.Pattern) -> str:
    return pattern.sub(lambda m: macros.get(m.group(1), m.group(0)), text)


#: The templates the simulated beamline loads (as beamline_env.SoftIoc and st.cmd do).
DB_LOADS = (("shutter.db", {}), ("softMotor.db", {"M": "m1", "EGU": "mm"}),
            ("softMotor.db", {"M": "m2", "EGU": "deg"}), ("detector.db", {}),
            ("beamline.db", {}))


def device_records(prefix: str) -> dict[str, str]:
    """Record name -> record type of the simulated beamline (db/) under ``prefix``."""
    records = {}
    for name, macros in DB_LOADS:
        values = {"P": prefix, **macros}
        text = (REPO / "db" / name).read_text()
        for rtype, rname in re.findall(r'record\((\w+),\s*"([^"]+)"\)', text):
            full = re.sub(r"\$\((\w+)(?:=([^)]*))?\)",
                          lambda m, v=values: v.get(m.group(1), m.group(2) or ""), rname)
            records[full] = rtype
    return records


# ---- README screenshots --------------------------------------------------------------
def shoot(dest: Path) -> int:
    """Render the PyDM screens against real IOCs in a typical state, as PNGs in ``dest``.

    alice holds the lock (after three short queue sessions by bluesky: more History
    than the box shows, newest first) and bob waits for it; the lock screen is seen by
    the OS user operator;
    the device panel as an ``operator`` member, once while alice holds the lock (greyed
    out) and once after she released it; last, the lock screen with the lock IOC stopped.
    """
    import tempfile

    from beamline_env import SoftIoc
    from epics_env import CANetwork, LockIOC, admitting_me, wait_until

    dest.mkdir(parents=True, exist_ok=True)
    net = CANetwork()
    work = Path(tempfile.mkdtemp(prefix="screens-"))
    lock = LockIOC(net, work, prefix="BL:LOCK:",
                   config_text=admitting_me("BL:LOCK:", work / "lock-state.sqlite3"))
    devices = SoftIoc(net, work, lock.config, prefix="BL:")
    screens: list[PyDMScreen] = []
    try:
        lock.start()
        devices.start()
        for pv, value in (("Shutter:Open", "0"), ("m1", "1.5"), ("m2", "10")):
            net.caput(devices.pv(pv), value, user="bluesky", text=False).check_returncode()
        queue = [(user, pv, value) for scan in (15, 16, 17) for user, pv, value in (
            ("bluesky", "Acquire", f'{{"session": "queue", "lease": 60, "note": "scan {scan}"}}'),
            ("bluesky", "Release", "queue"))]
        for user, pv, value in queue + [
                ("alice", "Acquire",
                 '{"session": "align", "lease": 1800, "note": "aligning the DCM"}'),
                ("bob", "Request", '{"session": "edge", "lease": 1800, "note": "Fe edge"}')]:
            net.caput(lock.pv(pv), value, user=user).check_returncode()
        screen = PyDMScreen(net, "lock", {"P": "BL:LOCK:"}, work / "pydm-lock.log")
        screens.append(screen)
        wait_until(lambda: screen.prop("state", "lockState") == "Held"
                   and screen.text("waiter_count") == "1", 30, 0.2)
        screen.type("acquire_session", "scan42")
        screen.type("acquire_note", "Fe K-edge XANES")
        screen.grab(dest / "pydm-lock.png")
        panel = PyDMScreen(net, "devices", {"P": "BL:LOCK:", "DEV": "BL:", "GROUP": "operator"},
                           work / "pydm-devices.log")
        screens.append(panel)
        wait_until(lambda: panel.text("gate") == "0" and panel.text("m1_rbv"), 30, 0.2)
        panel.grab(dest / "pydm-devices-locked.png")
        net.caput(lock.pv("Withdraw"), "edge", user="bob").check_returncode()
        net.caput(lock.pv("Release"), "align", user="alice").check_returncode()
        wait_until(lambda: panel.enabled("shutter_open"), 30, 0.2)
        panel.grab(dest / "pydm-devices.png")
        lock.stop()
        wait_until(lambda: screen.prop("state", "alarmSeverity") == 4, 30, 0.2)
        screen.grab(dest / "pydm-lock-disconnected.png")
        print("\n".join(str(p) for p in sorted(dest.glob("pydm-*.png"))))
        return 0
    finally:
        for screen in screens:
            screen.close()
        devices.stop()
        lock.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "drive":
        sys.exit(_drive(sys.argv[2], sys.argv[3]))
    if len(sys.argv) == 3 and sys.argv[1] == "shoot":
        sys.exit(shoot(Path(sys.argv[2])))
    print("usage: python tests/screens_env.py shoot DIR   (regenerate README screenshots)",
          file=sys.stderr)
    sys.exit(2)
