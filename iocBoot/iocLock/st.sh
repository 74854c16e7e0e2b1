#!/bin/sh
# Start the lock IOC for this beamline (state in ./var/ next to lock.yaml).
# Extra arguments go to lock-ioc: --list-pvs, --interfaces 127.0.0.1, -v, --prefix ...
cd "$(dirname "$0")" || exit 1
exec ../../.venv/bin/lock-ioc --config lock.yaml "$@"
