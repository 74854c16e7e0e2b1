"""The PV contract in lock_ioc/contract.py is what the IOC serves and what the docs say."""
from __future__ import annotations

import re

from epics_env import REPO
from lock_ioc import contract


def test_docs_pv_interface_is_rendered_from_the_contract():
    doc = (REPO / "docs" / "pv-interface.md").read_text()
    assert doc == contract.render_markdown(), (
        "docs/pv-interface.md is stale: run `make docs` (python -m lock_ioc.contract)")


def test_ioc_serves_exactly_the_contract(net, tmp_path):
    from epics_env import LockIOC
    ioc = LockIOC(net, tmp_path)
    ioc.argv.append("--list-pvs")
    ioc.start()
    try:
        log = ioc.log()
        served = set(re.findall(r"^\s*(TST:LOCK:\S+)$", log, re.M))
        expected = contract.all_pvs("TST:LOCK:", ["queue", "staff", "operator"])
        assert served == set(expected)
        kinds = {"enum": "DBF_ENUM", "long": "DBF_LONG", "double": "DBF_DOUBLE",
                 "text": "DBF_CHAR"}
        for name, spec in expected.items():
            info = net.run("cainfo", name, check=True).stdout
            assert kinds[spec.kind] in info, (name, info)
            access = "read, write" if spec.command else "read, no write"
            assert access in info, (name, info)
    finally:
        ioc.stop()


# ---- every lock PV named anywhere in the repository is in the contract ---------------
LOCK_REF = re.compile(r"(?:\bBL:LOCK:|\bTST:LOCK:|\bBENCH:LOCK:|\$\(LOCK\)|\$\{LOCK\})"
                      r"([A-Za-z][A-Za-z0-9_]*(?::[A-Za-z0-9_<>{}$()]+)?)")
SCANNED = ("clients", "db", "iocBoot", "docs", "bench", "README.md")
SUFFIXES = {spec.suffix for spec in contract.PVS}


def lock_pv_references():
    for top in SCANNED:
        path = REPO / top
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            if f.suffix in (".png", ".pyc", ".sqlite3") or "__pycache__" in f.parts:
                continue
            for m in LOCK_REF.finditer(f.read_text(errors="replace")):
                yield f.relative_to(REPO), m.group(1)


def test_every_named_lock_pv_is_in_the_contract():
    refs = list(lock_pv_references())
    assert refs, "the scan found no lock PV references at all"
    bad = sorted({(str(f), name) for f, name in refs
                  if name not in SUFFIXES and not name.startswith(contract.GATE_PREFIX)})
    assert not bad, f"lock PVs outside the contract: {bad}"


def test_acf_inputs_are_contract_gates():
    from beamline_lock.acf import render_acf
    from lock_ioc.config import load
    config = load()
    served = contract.all_pvs(config.prefix, config.group_names)
    inputs = re.findall(r'INP[A-L]\("([^"]+)"\)', render_acf(config))
    assert inputs and all(pv in served for pv in inputs), inputs


def test_scan_catches_a_renamed_pv(tmp_path):
    text = "caput -c -S BL:LOCK:Aquire scan1\ncaget BL:LOCK:State\n"
    names = [m.group(1) for m in LOCK_REF.finditer(text)]
    assert names == ["Aquire", "State"]
    assert "Aquire" not in SUFFIXES
