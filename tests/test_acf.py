"""The ACF generator: structure, limits, and EPICS base's ascheck on every output."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from beamline_lock.acf import AcfError, render_acf
from epics_env import REPO, tool
from lock_ioc.config import load, parse


def ascheck(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    f = tmp_path / "check.acf"
    f.write_text(text)
    return subprocess.run([tool("ascheck"), str(f)], capture_output=True, text=True)


def config(groups: dict, prefix: str = "BL:LOCK:"):
    return parse({"prefix": prefix, "groups": groups}, base_dir=Path("/tmp"), source="t.yaml")


def test_default_config_acf_passes_ascheck(tmp_path):
    acf = render_acf(load())
    assert ascheck(acf, tmp_path).returncode == 0
    assert 'UAG(staff) {"alice", "bob"}' in acf
    assert 'INPB("BL:LOCK:Gate:staff")' in acf
    assert "UAG(staff)\n        CALC(\"B=1\")" in acf
    assert "ASG(DEFAULT) {\n    RULE(1, READ)\n    RULE(1, WRITE)\n}" in acf


def test_boot_directory_config_acf_passes_ascheck(tmp_path):
    acf = render_acf(load(REPO / "iocBoot" / "iocLock" / "lock.yaml"), asg="BEAMLINE")
    assert "ASG(BEAMLINE) {" in acf
    assert ascheck(acf, tmp_path).returncode == 0


def test_host_groups_get_a_hag_in_their_rule(tmp_path):
    acf = render_acf(config({"queue": {"users": ["bluesky"], "hosts": ["srv1", "srv2.lab"]},
                             "staff": {"users": ["alice"]}}))
    assert 'HAG(queue) {"srv1", "srv2.lab"}' in acf
    assert "UAG(queue)\n        HAG(queue)\n        CALC(\"A=1\")" in acf
    assert "HAG(staff)" not in acf
    assert ascheck(acf, tmp_path).returncode == 0


def test_twelve_groups_fit_and_pass_ascheck(tmp_path):
    acf = render_acf(config({f"g{i}": {"users": [f"u{i}"]} for i in range(12)}))
    assert 'INPL("BL:LOCK:Gate:g11")' in acf
    assert ascheck(acf, tmp_path).returncode == 0


def test_thirteen_groups_are_a_clear_error():
    with pytest.raises(AcfError, match=r"13 groups, but an ASG has only 12 inputs \(INPA..INPL\)"):
        render_acf(config({f"g{i}": {"users": [f"u{i}"]} for i in range(13)}))


@pytest.mark.parametrize("asg", ["", "1X", "has space", "DEFAULT", "READONLY", "a" * 41])
def test_bad_asg_name_is_a_clear_error(asg):
    with pytest.raises(AcfError, match="invalid ASG name"):
        render_acf(load(), asg=asg)


def test_ascheck_really_rejects_broken_files(tmp_path):
    """Guard against a checker that accepts anything."""
    assert ascheck(render_acf(load()).replace("RULE(1, READ)\n}", "RULE(1, READ"),
                   tmp_path).returncode != 0


def test_safe_asg_lets_every_group_write_whatever_the_lock_says(tmp_path):
    """Stop and make-safe records (ASG(SAFE)): no gate inputs, a level-0 WRITE rule per
    group (its UAG, and its HAG if it has one): the value only, never links."""
    acf = render_acf(config({"queue": {"users": ["bluesky"], "hosts": ["srv1"]},
                             "staff": {"users": ["alice"]}}))
    safe = acf.split("ASG(SAFE) {\n", 1)[1].split("\n}\n", 1)[0]
    assert "INP" not in safe and "CALC" not in safe and "RULE(1, WRITE)" not in safe
    assert safe.startswith("    RULE(1, READ)\n")
    assert "    RULE(0, WRITE) {\n        UAG(queue)\n        HAG(queue)\n    }" in safe
    assert "    RULE(0, WRITE) {\n        UAG(staff)\n    }" in safe
    assert ascheck(acf, tmp_path).returncode == 0
    named = render_acf(load(), "MOTORS", safe_asg="STOPS")
    assert "ASG(STOPS) {" in named and "ASG(SAFE)" not in named
    assert ascheck(named, tmp_path).returncode == 0


@pytest.mark.parametrize("asg, safe, error", [
    ("GATED", "GATED", "the gated and the safe ASG must differ"),
    ("GATED", "DEFAULT", "invalid safe ASG name 'DEFAULT'"),
    ("GATED", "1X", "invalid safe ASG name '1X'"),
])
def test_bad_safe_asg_is_a_clear_error(asg, safe, error):
    with pytest.raises(AcfError, match=error):
        render_acf(load(), asg, safe_asg=safe)


def test_prefix_given_is_the_prefix_the_gates_are_read_from(tmp_path):
    acf = render_acf(load(), prefix="XF:31ID:LOCK:")
    assert 'INPB("XF:31ID:LOCK:Gate:staff")' in acf and "BL:LOCK:Gate" not in acf
    assert "served under prefix XF:31ID:LOCK: (the config says BL:LOCK:)" in acf
    assert ascheck(acf, tmp_path).returncode == 0
    with pytest.raises(AcfError, match="invalid lock prefix 'has space'"):
        render_acf(load(), prefix="has space")
