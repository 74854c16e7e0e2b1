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
    assert 'UAG(user2_alice) {"alice"}' in acf and 'UAG(user3_bob) {"bob"}' in acf
    assert 'INPA("BL:LOCK:HolderIndex")' in acf and 'INPB("BL:LOCK:UserMap")' in acf
    map_ = load().user_map
    assert f'UAG(user3_bob)\n        CALC("A=0||(A=3&&B={map_})")' in acf
    assert "Gate:" not in acf, "no group shares by default: no gate inputs"
    assert 'UAG(operator)\n        CALC("A=-1")' in acf
    assert "ASG(DEFAULT) {\n    RULE(1, READ)\n    RULE(1, WRITE)\n}" in acf


def test_boot_directory_config_acf_passes_ascheck(tmp_path):
    acf = render_acf(load(REPO / "iocBoot" / "iocLock" / "lock.yaml"), asg="BEAMLINE")
    assert "ASG(BEAMLINE) {" in acf
    assert ascheck(acf, tmp_path).returncode == 0


def test_host_groups_get_a_hag_in_their_rule(tmp_path):
    cfg = config({"queue": {"users": ["bluesky"], "hosts": ["srv1", "srv2.lab"]},
                  "staff": {"users": ["alice"]}})
    acf = render_acf(cfg)
    assert 'HAG(queue) {"srv1", "srv2.lab"}' in acf
    assert (f'UAG(user1_bluesky)\n        HAG(queue)\n        CALC("A=0||(A=1&&B='
            f'{cfg.user_map})")') in acf
    assert "HAG(staff)" not in acf
    assert ascheck(acf, tmp_path).returncode == 0


def test_a_user_in_several_groups_gets_each_groups_hosts(tmp_path):
    cfg = config({"beamhost": {"users": ["carol"], "hosts": ["ws1"]},
                  "remote": {"users": ["carol"], "hosts": ["vpn"]},
                  "staff": {"users": ["alice", "dave"]}, "any": {"users": ["dave"]}})
    acf = render_acf(cfg)
    rules = acf.split("ASG(GATED) {", 1)[1]
    assert rules.count("UAG(user1_carol)") == 2
    assert "UAG(user1_carol)\n        HAG(beamhost)" in rules
    assert "UAG(user1_carol)\n        HAG(remote)" in rules
    assert rules.count("UAG(user3_dave)") == 1, "any host: one rule"
    assert ascheck(acf, tmp_path).returncode == 0


def test_many_users_and_groups_fit_only_shared_groups_need_inputs(tmp_path):
    """Per-user rules scale: 40 groups of 5 users, ten of them shared (INPC..INPL)."""
    groups = {f"g{i}": {"users": [f"u{i}_{j}" for j in range(5)], "shared": i < 10}
              for i in range(40)}
    acf = render_acf(config(groups))
    assert 'INPL("BL:LOCK:Gate:g9")' in acf and "INPM" not in acf
    assert "UAG(user200_u39_4)" in acf and 'UAG(g9)\n        CALC("L=1")' in acf
    assert ascheck(acf, tmp_path).returncode == 0


def test_eleven_shared_groups_are_a_clear_error():
    with pytest.raises(AcfError, match=r"11 shared groups, but an ASG has only 10 inputs left "
                                       r"for their gates \(INPC..INPL\)"):
        render_acf(config({f"g{i}": {"users": [f"u{i}"], "shared": True} for i in range(11)}))


def test_user_names_become_valid_distinct_acf_names(tmp_path):
    acf = render_acf(config({"staff": {"users": ["j.doe", "j@doe", "a$b"]}}))
    assert 'UAG(user1_j.doe) {"j.doe"}' in acf and 'UAG(user2_j_doe) {"j@doe"}' in acf
    assert 'UAG(user3_a_b) {"a$b"}' in acf
    assert ascheck(acf, tmp_path).returncode == 0
    with pytest.raises(AcfError, match="group name 'user1_x' clashes"):
        render_acf(config({"user1_x": {"users": ["x"]}}))


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
    assert 'INPA("XF:31ID:LOCK:HolderIndex")' in acf and "BL:LOCK:" not in acf.split("ASG(", 1)[1]
    assert "served under prefix XF:31ID:LOCK: (the config says BL:LOCK:)" in acf
    assert ascheck(acf, tmp_path).returncode == 0
    with pytest.raises(AcfError, match="invalid lock prefix 'has space'"):
        render_acf(load(), prefix="has space")
