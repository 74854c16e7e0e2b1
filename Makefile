# beamline-lock: `make run` serves the lock IOC, `make test` runs the tests.
# Both set up what they need (a Python 3.12 venv in .venv; for tests also Redis and
# the test OS users), so they work on a fresh clone.
VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
PYTEST_ARGS ?=
ARGS      ?=

.PHONY: run test venv system bench demo docs screens clean

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || "$$(.ci/find-python)" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

system:
	.ci/setup-system

run: $(STAMP)
	$(VENV)/bin/lock-ioc $(ARGS)

test: $(STAMP) system
	$(PY) -m pytest $(PYTEST_ARGS)

# The whole system on loopback (lock IOC, beamline softIoc + ACF, Redis, RE Manager);
# Ctrl-C stops it all. If redis-server is missing, runs `make system` first (needs root:
# Redis and the test OS users the cheat sheet's runuser lines use).
demo: $(STAMP)
	@command -v redis-server >/dev/null 2>&1 || $(MAKE) system
	$(PY) -m demo $(ARGS)

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

docs: $(STAMP)
	$(PY) -m lock_ioc.contract > docs/pv-interface.md
	$(PY) -m lock_ioc.contract --json > docs/pv-interface.json

# Regenerate the Phoebus/PyDM screens from the PV contract and the PyDM screenshots.
screens: $(STAMP)
	$(PY) clients/screens_gen.py
	$(PY) tests/screens_env.py shoot docs/screens

clean:
	rm -rf $(VENV) var .pytest_cache
