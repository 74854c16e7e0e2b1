"""The simulated beamline (db/) on the real EPICS base softIoc, with the lock's ACF."""
from __future__ import annotations

import subprocess
from pathlib import Path

from beamline_lock.acf import render_acf
from epics_env import REPO, CANetwork, Server, tool
from lock_ioc.config import load

DB = REPO / "db"


class SoftIoc(Server):
    """softIoc serving db/ under prefix ``prefix`` with an ACF generated from ``lock_config``
    (or the given ``acf`` text, e.g. the output of ``lockctl acf``).

    stdin is a pipe kept open and ``-S`` starts no interactive shell, so the IOC runs
    until stop(), which signals its process group.
    """

    def __init__(self, net: CANetwork, workdir: Path, lock_config: Path, *,
                 prefix: str = "TST:", port: int | None = None, acf: str | None = None):
        self.prefix = prefix
        self.acf = workdir / "beamline.acf"
        self.acf.write_text(render_acf(load(lock_config)) if acf is None else acf)
        check = subprocess.run([tool("ascheck"), str(self.acf)], capture_output=True, text=True)
        assert check.returncode == 0, f"ascheck rejected the generated ACF:\n{check.stderr}"
        self.st_cmd = workdir / "st.cmd"
        loads = [("shutter.db", ""), ("softMotor.db", ",M=m1,EGU=mm"),
                 ("softMotor.db", ",M=m2,EGU=deg"), ("detector.db", ""), ("beamline.db", "")]
        self.st_cmd.write_text(
            f'asSetFilename("{self.acf}")\n'
            + "".join(f'dbLoadRecords("{DB / f}", "P={prefix}{m}")\n' for f, m in loads)
            + "iocInit()\n")
        super().__init__(net, [tool("softIoc"), "-S", str(self.st_cmd)],
                         log=workdir / "softIoc.log", ready_pv=prefix + "RingCurrent",
                         cwd=workdir, port=port, stdin=subprocess.PIPE)

    def pv(self, suffix: str) -> str:
        return self.prefix + suffix
