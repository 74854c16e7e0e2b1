"""The simulated beamline (db/) on the real EPICS base softIoc, with the lock's ACF."""
from __future__ import annotations

from pathlib import Path

from epics_env import REPO, CANetwork, Server, tool  # first: puts the repository on sys.path

from demo import services  # noqa: E402 - the launcher, found through epics_env

DB = REPO / "db"


class SoftIoc(Server):
    """softIoc serving db/ under prefix ``prefix`` with an ACF generated from ``lock_config``
    (or the given ``acf`` text, e.g. the output of ``lockctl acf``), through
    ``demo.services.beamline_ioc``; the ACF and ``st.cmd`` are written into ``workdir``
    at once, and again at each start.

    stdin is a pipe kept open and ``-S`` starts no interactive shell, so the IOC runs
    until stop(), which signals its process group.
    """

    def __init__(self, net: CANetwork, workdir: Path, lock_config: Path, *,
                 prefix: str = "TST:", port: int | None = None, user: str | None = None,
                 acf: str | None = None):
        self.prefix, self.workdir, self.lock_config = prefix, workdir, lock_config
        self.acf_text = acf
        self.acf = workdir / "beamline.acf"
        self.st_cmd = workdir / "st.cmd"
        super().__init__(net, [tool("softIoc"), "-S", str(self.st_cmd)],
                         log=workdir / "softIoc.log", ready_pv=prefix + "RingCurrent",
                         cwd=workdir, port=port, user=user)
        for item in self.describe().files:
            item.make(user)

    def describe(self) -> services.Service:
        return services.beamline_ioc(self.workdir, self.lock_config, self.prefix, self.port,
                                     self.net.client_env, user=self.user,
                                     acf_text=self.acf_text)

    def pv(self, suffix: str) -> str:
        return self.prefix + suffix
