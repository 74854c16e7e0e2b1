#!/bin/sh
# Start the lock IOC of this boot directory (what procServ.sh and systemd run).
#   LOCK_CONFIG  the config (default: lock.yaml here; its state: var/ next to it)
#   LOCK_IOC     the lock-ioc to run (default: the installation every account runs,
#                ${BEAMLINE_LOCK_PREFIX:-/opt/beamline-lock}/venv/bin/lock-ioc, else this
#                checkout's .venv)
# Extra arguments go to lock-ioc: --list-pvs, --interfaces 127.0.0.1, -v, --prefix ...
# The CA port and interfaces follow EPICS_CAS_SERVER_PORT / EPICS_CAS_INTF_ADDR_LIST.
cd "$(dirname "$0")" || exit 1
ioc="${LOCK_IOC:-${BEAMLINE_LOCK_PREFIX:-/opt/beamline-lock}/venv/bin/lock-ioc}"
if [ ! -x "$ioc" ]; then
    if [ ! -x ../../.venv/bin/lock-ioc ]; then
        echo "st.sh: no lock-ioc at $ioc nor in this checkout's .venv (make install;" \
             "BEAMLINE_LOCK_PREFIX or LOCK_IOC name another)" >&2
        exit 1
    fi
    ioc=../../.venv/bin/lock-ioc
fi
exec "$ioc" --config "${LOCK_CONFIG:-lock.yaml}" "$@"
