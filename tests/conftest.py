"""Shared fixtures: a CA network per test and a real lock IOC on a free port."""
from __future__ import annotations

import pytest

from epics_env import CANetwork, LockIOC, admitting_me, epics_bin, user_dir


@pytest.fixture(scope="session", autouse=True)
def _epics_tools():
    """Fail loudly (never skip) when EPICS tools or test users are missing; bring the
    installation other accounts run up to date with this checkout first."""
    return epics_bin()


@pytest.fixture
def public_tmp():
    """A directory of this test that every account may read (``tmp_path`` is private)."""
    path = user_dir(None, "public")
    path.chmod(0o755)
    return path


@pytest.fixture
def net() -> CANetwork:
    return CANetwork()


@pytest.fixture
def lock_ioc(net, tmp_path):
    ioc = LockIOC(net, tmp_path).start()
    yield ioc
    ioc.stop()


@pytest.fixture
def beamline(net, lock_ioc, tmp_path):
    """The simulated beamline softIoc (prefix TST:) gated on ``lock_ioc``."""
    from beamline_env import SoftIoc
    ioc = SoftIoc(net, tmp_path, lock_ioc.config).start()
    yield ioc
    ioc.stop()


@pytest.fixture
def lock(net, tmp_path):
    """A lock IOC that also admits this test process's user (root in CI) as queue/operator."""
    ioc = LockIOC(net, tmp_path, config_text=admitting_me("TST:LOCK:",
                                                          tmp_path / "lock-state.sqlite3"))
    ioc.start()
    yield ioc
    ioc.stop()
