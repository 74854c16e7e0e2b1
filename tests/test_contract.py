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
