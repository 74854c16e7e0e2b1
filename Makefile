# beamline-lock: `make run` serves the lock IOC, `make test` runs the tests.
# Both set up what they need (a Python 3.12 venv in .venv; for tests also the Debian
# packages, the test OS users and service accounts, and the installation every account
# runs in $(PREFIX)), so they work on a fresh clone.
VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
PYTEST_ARGS ?=
ARGS      ?=
# The installation every account runs (interpreter, venv with this checkout, run-time
# files); several checkouts testing on one machine need a prefix each.
PREFIX    ?= $(or $(BEAMLINE_LOCK_PREFIX),/opt/beamline-lock)
INSTALL_EXTRAS ?= screens
export BEAMLINE_LOCK_PREFIX := $(PREFIX)
export BEAMLINE_LOCK_EXTRAS := $(INSTALL_EXTRAS)

.PHONY: run test venv system web install bench demo docs screens web-screens clean

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || "$$(.ci/find-python)" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

# Root: Debian packages, OS users and service accounts, Python 3.12 in $(PREFIX).
system:
	.ci/setup-system $(PREFIX)

# The web page: npm ci + tsc + vite into web/dist when anything changed (node >= 20, npm).
web:
	web/build

# Root: $(PREFIX)/venv with this checkout installed (not editable) and $(PREFIX)/share
# (web/dist included: nginx's static root); does nothing when they already match.
install: $(STAMP) system web
	$(PY) -m demo.install --prefix $(PREFIX) --extras '$(INSTALL_EXTRAS)'

run: $(STAMP)
	$(VENV)/bin/lock-ioc $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The whole system on loopback (lock IOC, beamline softIoc + ACF, Redis, RE Manager,
# bluesky-httpserver, a seat per web user, nginx serving the web page over HTTPS);
# Ctrl-C stops it all. Needs root (the installation, the accounts the services run as).
demo: install
	$(PY) -m demo $(ARGS)

bench: install
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

docs: $(STAMP)
	$(PY) -m lock_ioc.contract > docs/pv-interface.md
	$(PY) -m lock_ioc.contract --json > docs/pv-interface.json

# Regenerate the Phoebus/PyDM screens from the PV contract and the PyDM screenshots.
screens: install
	$(PY) clients/screens_gen.py
	$(PY) tests/screens_env.py shoot docs/screens

# The README's screenshots of the web page (Debian's Chromium, headless), the whole page
# on the real stack (tests/remote_env.py), as the browser tests run it.
web-screens: install
	$(PY) tests/web_env.py shoot docs/web

clean:
	rm -rf $(VENV) var .pytest_cache
