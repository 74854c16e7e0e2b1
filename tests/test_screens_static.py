"""The screen files (clients/phoebus/*.bob, clients/pydm/*.ui): current, well-formed, and
naming only PVs the IOCs serve, with every button writing a command of the right type.

Phoebus cannot run here, so its files are checked as data: XML, PVs after macro
substitution, macros, rules, actions and the embedded scripts (parsed, not run).
The last test asks live IOCs (the lock IOC and the simulated beamline's softIoc) about
every PV every screen names, with ``cainfo``.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from epics_env import REPO
from lock_ioc import contract
from screens_env import (CLIENTS, PHOEBUS_BUILTIN, PHOEBUS_MACRO, PYDM_MACRO, bob_pvs,
                         bob_widgets, device_records, expand, ui_props, ui_pvs)

sys.path.insert(0, str(CLIENTS))
import screens_gen  # clients/ is not a package

LOCK_P, DEV_P = "TST:LOCK:", "TST:"
GROUPS = ("queue", "staff", "operator")
BOBS = sorted((CLIENTS / "phoebus").glob("*.bob"))
UIS = sorted((CLIENTS / "pydm").glob("*.ui"))
LOC_PV = re.compile(r'^loc://\w+\$\(DID\)<(VString|VDouble)>\((".*"|[0-9.]+)\)$')


def top_level_calls(script: str) -> set[str]:
    """Names of the functions an embedded script calls outside its own ``def``s."""
    calls = set()
    for stmt in ast.parse(script).body:     # Jython 2.7 code written to parse as Python 3
        if isinstance(stmt, ast.FunctionDef):
            continue
        calls |= {n.func.id for n in ast.walk(stmt)
                  if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    return calls


def constant(script: str, name: str):
    """The value of a top-level ``NAME = literal`` in an embedded script."""
    for stmt in ast.parse(script).body:
        if isinstance(stmt, ast.Assign) and [t.id for t in stmt.targets] == [name]:
            return ast.literal_eval(stmt.value)
    raise AssertionError(f"no {name} in the script")


def macros_for(group: str) -> dict[str, str]:
    return {"P": LOCK_P, "DEV": DEV_P, "GROUP": group}


def served_lock_pvs() -> dict[str, contract.PVSpec]:
    return contract.all_pvs(LOCK_P, GROUPS)


def classify(pv: str) -> tuple[str, object]:
    """('lock', spec) or ('device', record type) for an expanded PV name; fail otherwise."""
    lock = served_lock_pvs()
    if pv.startswith(LOCK_P):
        assert pv in lock, f"{pv} is not served by the lock IOC (not in lock_ioc/contract.py)"
        return "lock", lock[pv]
    records = device_records(DEV_P)
    assert pv in records, f"{pv} is not a record of the simulated beamline (db/)"
    return "device", records[pv]


NUMERIC_RECORDS = {"ao", "bo", "ai", "bi", "calc", "calcout", "longout", "mbbo"}


def expanded_pvs(path) -> list[tuple[str, str]]:
    """(widget, PV name) for every CA PV a .bob or .ui names, for every group's macros."""
    if path.suffix == ".bob":
        named, pattern = bob_pvs(path), PHOEBUS_MACRO
    else:
        named, pattern = ui_pvs(path), PYDM_MACRO
    out = []
    for widget, where, pv in named:
        if pv.startswith("loc://"):
            assert LOC_PV.match(pv), (widget, pv)
            continue
        if path.suffix == ".ui":
            assert pv.startswith("ca://"), (widget, pv)
            pv = pv[len("ca://"):]
        out += [(widget, expand(pv, macros_for(g), pattern)) for g in GROUPS]
    return out


def test_screens_are_generated_from_the_current_contract():
    assert {p.name for p in BOBS} == {"lock.bob", "devices.bob"}
    assert {p.name for p in UIS} == {"lock.ui", "devices.ui"}
    for path, text in screens_gen.outputs().items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(REPO)} is stale: run python clients/screens_gen.py")


@pytest.mark.parametrize("path", BOBS, ids=lambda p: p.name)
def test_bob_is_well_formed_and_names_only_served_pvs(path):
    root = ET.parse(path).getroot()
    assert root.tag == "display" and root.get("version") == "2.0.0"
    names = [w.findtext("name") for w in bob_widgets(path)]
    assert len(names) == len(set(names)), f"duplicate widget names in {path.name}"

    used = set(PHOEBUS_MACRO.findall(path.read_text(encoding="utf-8")))
    required = set(screens_gen.MACROS[path.name])
    assert used - PHOEBUS_BUILTIN == required, (path.name, used)
    docs = (REPO / "docs" / "screens.md").read_text(encoding="utf-8")
    for macro in required:
        assert f"$({macro})" in docs, f"docs/screens.md does not document $({macro})"

    pvs = expanded_pvs(path)
    assert pvs
    for widget, pv in pvs:
        kind, _ = classify(pv)
        if path.name == "lock.bob":
            assert kind == "lock", (widget, pv)


@pytest.mark.parametrize("path", BOBS, ids=lambda p: p.name)
def test_bob_text_pvs_are_shown_as_strings(path):
    lock = served_lock_pvs()
    for w in bob_widgets(path):
        pv = w.findtext("pv_name") or ""
        spec = lock.get(expand(pv, macros_for("staff"), PHOEBUS_MACRO))
        if w.get("type") == "textupdate" and spec is not None and spec.kind == "text":
            assert w.findtext("format") == "6", f"{w.findtext('name')}: format must be string"


@pytest.mark.parametrize("path", BOBS, ids=lambda p: p.name)
def test_bob_buttons_write_commands_of_the_right_type(path):
    names = {w.findtext("name") for w in bob_widgets(path)}
    buttons = [w for w in bob_widgets(path) if w.get("type") == "action_button"]
    assert buttons
    scripts: dict[str, str] = {}
    for w in buttons:
        name = w.findtext("name")
        actions = w.findall("actions/action")
        assert len(actions) == 1, f"{name}: one action per button"
        action = actions[0]
        target = expand(w.findtext("pv_name") or "", macros_for("staff"), PHOEBUS_MACRO)
        kind, what = classify(target)
        if action.get("type") == "execute":
            # A lock command: the script writes text (UTF-8 bytes) to the button's own PV.
            assert kind == "lock" and what.command and what.kind == "text", (name, target)
            script = action.findtext("script/text")
            assert action.find("script").get("file") == "EmbeddedPy"
            assert script.count(".write(") == 1
            assert 'PVUtil.createPV(widget.getPropertyValue("pv_name"), 5000)' in script
            assert 'pv.write(array(data, "b"))' in script
            scripts[name] = script
            assert "send" in top_level_calls(script), f"{name}: script sends nothing"
            for ref in re.findall(r'value_of\("(\w+)"', script):
                assert ref in names, f"{name}: script reads missing widget {ref}"
            if what.suffix == "Acquire":
                assert 'json.dumps(request)' in script and '"session"' in script
        elif action.get("type") == "write_pv":
            # A device command: a fixed number to a numeric record.
            assert action.findtext("pv_name") == "$(pv_name)"
            assert kind == "device" and what in NUMERIC_RECORDS, (name, target, what)
            float(action.findtext("value"))
        else:
            pytest.fail(f"{name}: unexpected action {action.get('type')}")
        if w.findtext("confirm_dialog") == "true":
            assert w.findtext("confirm_message"), name
    if path.name == "lock.bob":
        commands = {expand(w.findtext("pv_name"), macros_for("staff"), PHOEBUS_MACRO)
                    for w in buttons}
        expected = {LOCK_P + c for c in contract.COMMANDS if c != "Ping"}
        assert commands == expected
        check_lock_button_dialogs(buttons, scripts)


def check_lock_button_dialogs(buttons: list[ET.Element], scripts: dict[str, str]) -> None:
    """Phoebus lock buttons: dialogs that show what is sent, never a fixed text.

    A button's confirm_dialog text is fixed, and a text entry keeps typed text only on
    Enter, so the scripts ask: the operator commands show the reason (and refuse an
    empty one where the lock requires it); Renew and Release ask when the session shown
    is not the one in the viewer's Session field; Acquire refuses an empty session.
    """
    assert not [w.findtext("name") for w in buttons if w.findtext("confirm_dialog")]
    confirmed = {n for n, s in scripts.items() if "ask" in top_level_calls(s)}
    assert confirmed == {"force_release", "disable", "enable"}
    for name in confirmed:
        assert constant(scripts[name], "QUESTION"), name
        assert '"\\n\\nReason: "' in scripts[name], f"{name}: the question shows the reason"
    required = {n for n, s in scripts.items() if "refuse" in top_level_calls(s)}
    assert required == {"acquire", "request", "withdraw", "force_release", "disable"}
    assert all("Enter" in scripts[n] for n in required), "say how to apply a typed value"
    for name in ("renew", "release", "handover"):
        assert "check_session" in top_level_calls(scripts[name]), name
    body = scripts["release"]
    assert 'shown = value_of("session")' in body and 'mine = value_of("acquire_session")' in body
    assert "if not shown or shown == mine:" in body and "if ask(" in body


def test_bob_entries_say_that_enter_applies_them():
    """A Phoebus text entry restores its old value on focus loss: the screen says so."""
    widgets = bob_widgets(CLIENTS / "phoebus" / "lock.bob")
    hints = [w for w in widgets if w.get("type") == "label"
             and "press Enter" in (w.findtext("text") or "")]
    entries = [w for w in widgets if w.get("type") == "textentry"]
    assert entries and len(hints) == 2
    for entry in entries:        # a hint above each block of entries, within 70 px
        y = int(entry.findtext("y"))
        assert any(0 < y - int(h.findtext("y")) <= 70 for h in hints), entry.findtext("name")
    assert "press Enter" not in (CLIENTS / "pydm" / "lock.ui").read_text(encoding="utf-8")


def test_bob_history_shows_the_last_events_newest_first():
    """A text update shows all of $(P)History (newest last) and cuts what does not fit at
    the end: the newest would be cut. A script puts the last few lines, newest first,
    into a label instead, and shows the PV name while it is disconnected."""
    (w,) = [w for w in bob_widgets(CLIENTS / "phoebus" / "lock.bob")
            if w.findtext("name") == "history"]
    assert w.get("type") == "label" and w.find("pv_name") is None
    assert w.findtext("vertical_alignment") == "0" and w.findtext("wrap_words") == "true"
    (script,) = w.findall("scripts/script")
    assert script.get("file") == "EmbeddedPy"
    assert script.get("check_connections") == "false", "run on disconnect too"
    assert [p.text for p in script.findall("pv_name")] == ["$(P)History"]
    body = script.findtext("text")
    assert constant(body, "LAST") == screens_gen.HISTORY_SHOWN
    assert "value = pvs[0].read()" in body and "if PV.isDisconnected(value):" in body
    assert 'text = "\\n".join(reversed(lines[-LAST:]))' in body
    assert top_level_calls(body) >= {"reversed"} and 'widget.setPropertyValue("text", text)' \
        in body
    ui = ET.parse(CLIENTS / "pydm" / "lock.ui").getroot()
    (label,) = [x for x in ui.iter("widget") if x.get("name") == "history"]
    props = ui_props(label)
    assert props["lastLines"] == str(screens_gen.HISTORY_SHOWN)
    assert props["displayLabelText"] == "true" and "AlignTop" in props["alignment"]


def test_waiters_box_lists_who_waits_with_the_time_waited():
    """$(P)Waiters is JSON: both screens turn it into one line per waiter, first in line
    first, and redraw it every second (Phoebus: the script also runs on $(P)Heartbeat)."""
    (w,) = [w for w in bob_widgets(CLIENTS / "phoebus" / "lock.bob")
            if w.findtext("name") == "waiters"]
    assert w.get("type") == "label" and w.find("pv_name") is None
    (script,) = w.findall("scripts/script")
    assert script.get("check_connections") == "false", "run on disconnect too"
    assert [p.text for p in script.findall("pv_name")] == ["$(P)Waiters", "$(P)Heartbeat"]
    body = script.findtext("text")
    assert constant(body, "SHOWN") == screens_gen.WAITERS_SHOWN
    assert "json.loads(ValueUtil.getString(value, True)" in body and 'w["since"]' in body
    ast.parse(body)
    ui = ET.parse(CLIENTS / "pydm" / "lock.ui").getroot()
    (label,) = [x for x in ui.iter("widget") if x.get("name") == "waiters"]
    props = ui_props(label)
    assert props["waitersShown"] == str(screens_gen.WAITERS_SHOWN)
    assert props["displayLabelText"] == "true" and props["channel"] == "ca://${P}Waiters"
    sys.path.insert(0, str(CLIENTS / "pydm"))
    from lock import waiters_text
    line = ('[{"who": "bob@ws2", "session": "edge", "note": "Fe", "since": 100},'
            ' {"who": "q@srv", "session": "queue", "note": "", "since": 110}]')
    assert waiters_text(line, 4, now=130) == ("1. bob@ws2 session edge, 30 s 'Fe'\n"
                                              "2. q@srv session queue, 20 s")
    assert waiters_text(line, 1, now=130) == "1. bob@ws2 session edge, 30 s 'Fe' (+1 more)"
    assert waiters_text("[]", 4) == "nobody"


def test_bob_rules_use_contract_states_and_gates():
    state_rule_states = set()
    for path in BOBS:
        for w in bob_widgets(path):
            for rule in w.iter("rule"):
                pvs = [p.text for p in rule.iter("pv_name")]
                if rule.get("prop_id") == "enabled":
                    assert pvs == ["$(P)Gate:$(GROUP)"]
                    assert w.findtext("enabled") == "false", "gated widgets start disabled"
                    assert [e.get("bool_exp") for e in rule.iter("exp")] == ["pv0==1"]
                if rule.get("name") == "state colour":
                    # Numeric: PVUtil.getDouble is NaN on disconnect, so no expression
                    # matches and the rule's else branch restores the initial grey.
                    # (pvStr0 raises on a disconnected PV: the last colour would stay.)
                    exps = [e.get("bool_exp") for e in rule.iter("exp")]
                    assert all(re.fullmatch(r"pv0==\d", e) for e in exps), exps
                    state_rule_states.update(contract.STATES[int(e[-1])] for e in exps)
                    assert rule.get("out_exp") == "false"
                    grey = w.find("background_color/color")
                    assert (int(grey.get("red")), int(grey.get("green")), int(grey.get("blue"))
                            ) == screens_gen.GREY
        assert "pvStr" not in path.read_text(encoding="utf-8")
    assert state_rule_states == set(contract.STATES)
    gated = [w.findtext("name") for w in bob_widgets(CLIENTS / "phoebus" / "devices.bob")
             if w.find("rules/rule[@prop_id='enabled']") is not None]
    # Stop and Close are never gated: they stay enabled whatever the lock says.
    assert set(gated) == {"shutter_open", "m1_setpoint", "m2_setpoint"}


@pytest.mark.parametrize("path", UIS, ids=lambda p: p.name)
def test_pydm_ui_is_well_formed_and_names_only_served_pvs(path):
    root = ET.parse(path).getroot()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used_classes = {w.get("class") for w in root.iter("widget")}
    assert {c for c in used_classes if c.startswith("PyDM")} <= declared

    used = set(PYDM_MACRO.findall(path.read_text(encoding="utf-8")))
    assert used == set(screens_gen.MACROS[path.name]), (path.name, used)
    assert not PHOEBUS_MACRO.search(path.read_text(encoding="utf-8")), \
        "PyDM substitutes ${NAME}, not $(NAME)"

    for widget, pv in expanded_pvs(path):
        classify(pv)

    lock = served_lock_pvs()
    for w in root.iter("widget"):
        props = ui_props(w)
        pv = expand(props.get("channel", "").replace("ca://", ""), macros_for("staff"),
                    PYDM_MACRO)
        if w.get("class") == "PyDMLabel" and pv in lock and lock[pv].kind == "text":
            assert props.get("displayFormat") == "PyDMLabel::String", w.get("name")
        if w.get("class") == "PyDMPushButton":
            kind, what = classify(pv)
            if path.name == "lock.ui":
                # lock.py writes the built text as UTF-8 bytes through this channel.
                assert kind == "lock" and what.command and what.kind == "text", pv
                assert not props.get("pressValue")
            else:
                assert kind == "device" and what in NUMERIC_RECORDS, pv
                float(props["pressValue"])
        if w.get("class") == "PyDMLineEdit":
            kind, what = classify(pv)
            assert kind == "device" and what == "ao", pv


def test_pydm_lock_display_code_uses_only_widgets_of_the_ui():
    code = (CLIENTS / "pydm" / "lock.py").read_text(encoding="utf-8")
    names = {w.get("name") for w in ET.parse(CLIENTS / "pydm" / "lock.ui").getroot()
             .iter("widget")}
    refs = set(re.findall(r"\bui\.(\w+)", code))
    table = set(re.findall(r'^\s+"(\w+)": self\.\w+,$', code, re.MULTILINE))  # buttons' builds
    assert refs and refs | table <= names, (refs | table) - names
    # PyDM sets every widget of the .ui as an attribute of the display object.
    assert not set(re.findall(r"def (\w+)\(", code)) & names
    buttons = {w.get("name") for w in ET.parse(CLIENTS / "pydm" / "lock.ui").getroot()
               .iter("widget") if w.get("class") == "PyDMPushButton"}
    assert buttons == table


@pytest.mark.parametrize("name, good, bad, error", [
    ("phoebus/lock.bob", "$(P)Owner", "$(P)Onwer", "TST:LOCK:Onwer is not served"),
    ("pydm/lock.ui", "${P}Release", "${P}Relase", "TST:LOCK:Relase is not served"),
    ("phoebus/devices.bob", "$(DEV)Shutter:Open", "$(DEV)Shutter:Opn",
     "TST:Shutter:Opn is not a record"),
    ("pydm/devices.ui", "Gate:${GROUP}", "Gates:${GROUP}", "TST:LOCK:Gates:queue is not"),
])
def test_a_screen_naming_an_unserved_pv_fails_the_check(tmp_path, name, good, bad, error):
    text = (CLIENTS / name).read_text(encoding="utf-8")
    assert good in text
    tampered = tmp_path / name.split("/")[1]
    tampered.write_text(text.replace(good, bad, 1), encoding="utf-8")
    with pytest.raises(AssertionError, match=error):
        for _, pv in expanded_pvs(tampered):
            classify(pv)


def test_generator_refuses_a_pv_outside_the_contract():
    bad = screens_gen.W("readback", "x", 0, 0, 10, pv="Aquire")
    with pytest.raises(AssertionError, match="not in the contract"):
        screens_gen.pv_of(bad)
    assert screens_gen.main(["--bogus"]) == 2
    assert screens_gen.main(["--check"]) == 0


def test_every_screen_pv_is_served_by_the_live_iocs(net, lock_ioc, beamline):
    """cainfo, a real CA client, on every PV of every screen: connected, right type/access."""
    wanted: dict[str, set[str]] = {}
    for path in BOBS + UIS:
        for widget, pv in expanded_pvs(path):
            wanted.setdefault(pv, set()).add(f"{path.name}:{widget}")
    names = sorted(wanted)
    r = net.run("cainfo", "-w", "3", *names)
    if r.returncode != 0:
        missing = [n for n in names if net.run("cainfo", "-w", "2", n).returncode != 0]
        pytest.fail(f"PVs named by screens but not served: "
                    f"{[(n, sorted(wanted[n])) for n in missing]}")
    blocks = dict(re.findall(r"^(\S+)\n((?:    .*\n?)+)", r.stdout, re.MULTILINE))
    assert set(blocks) == set(names)
    lock = served_lock_pvs()
    for name, info in blocks.items():
        assert "State:            connected" in info, (name, info)
        spec = lock.get(name)
        if spec is not None:
            kinds = {"enum": "DBF_ENUM", "long": "DBF_LONG", "double": "DBF_DOUBLE",
                     "text": "DBF_CHAR"}
            assert f"Native data type: {kinds[spec.kind]}" in info, (name, info)
            if spec.command:
                assert "Access:           read, write" in info, (name, info)
        else:
            assert re.search(r"Native data type: DBF_(ENUM|DOUBLE|LONG|STRING)", info), name


def test_make_screens_can_import_the_test_helpers_as_a_script():
    """`make screens` runs tests/screens_env.py as a script (no pytest pythonpath): its
    helpers must find the launcher (demo/) themselves. beamline_env imported demo before
    epics_env put the repository on sys.path: ModuleNotFoundError: No module named 'demo'."""
    r = subprocess.run([sys.executable, "-c", "import beamline_env"], cwd=REPO / "tests",
                       capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr


def test_docs_say_that_make_screens_rewrites_the_tracked_screenshots():
    """`make screens` overwrites the committed PNGs in docs/screens/ (intended: they are
    the README's pictures); the README and docs/screens.md say so."""
    assert "tests/screens_env.py shoot docs/screens" in (REPO / "Makefile").read_text()
    assert sorted(p.name for p in (REPO / "docs" / "screens").glob("pydm-*.png"))
    for doc in ("README.md", "docs/screens.md"):
        text = " ".join((REPO / doc).read_text(encoding="utf-8").split())
        assert "`make screens`" in text and "in place, on purpose" in text, doc
        assert "git checkout docs/screens" in text, doc
