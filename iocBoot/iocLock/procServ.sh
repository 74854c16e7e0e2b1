#!/bin/sh
# The lock IOC under procServ, as EPICS sites run soft IOCs: procServ keeps a console on a
# control endpoint (`telnet`/`socat`/`nc -U` to it: the IOC's output and log), writes a log,
# and restarts the IOC when it dies (kill -9 included; the lock's state is on disk, so it
# comes back with the same holder, session and token).
#
#   procServ.sh ENDPOINT [lock-ioc args]
#     ENDPOINT  unix:/run/lockioc/control (systemd's RuntimeDirectory), or 127.0.0.1:PORT
#   PROCSERV_LOG       log file (default '-': stdout, i.e. the journal under systemd)
#   PROCSERV_HOLDOFF   seconds between restarts (default 1)
#   PROCSERV_INFO      file procServ writes its PID and endpoint to (optional)
# plus st.sh's LOCK_CONFIG / LOCK_IOC and the CA server environment (EPICS_CAS_*).
# Ctrl-C/Ctrl-D typed on the console are ignored; ^X kills (and so restarts) the IOC,
# ^T toggles automatic restart.
set -e
[ $# -ge 1 ] || { echo "usage: $0 ENDPOINT [lock-ioc args]" >&2; exit 2; }
endpoint="$1"; shift
here="$(cd "$(dirname "$0")" && pwd)"
set -- --foreground --quiet --name lock-ioc --ignore '^D^C' --logoutcmd '^D' \
    --holdoff "${PROCSERV_HOLDOFF:-1}" --logfile "${PROCSERV_LOG:--}" --chdir "$here" \
    ${PROCSERV_INFO:+--info-file "$PROCSERV_INFO"} "$endpoint" "$here/st.sh" "$@"
exec procServ "$@"
