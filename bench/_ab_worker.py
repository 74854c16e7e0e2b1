"""One side of ``bench_ab.py``: the lock's Python client of one checkout (on PYTHONPATH),
timing what the driver asks on stdin, one JSON line of seconds per request on stdout.

Requests: ``cycle K`` (a plain put with callback to $(P)Ping, and an acquire then a release
through ``BeamlineLock``, which of the two first alternating with K), ``quit``.
"""
from __future__ import annotations

import ctypes
import json
import sys
import threading
import time


def main() -> int:
    prefix = sys.argv[1]
    import epics
    from beamline_lock.client import BeamlineLock
    from epics import ca, dbr

    lock = BeamlineLock(prefix, session="bench", lease=600, timeout=10)
    ping = epics.PV(prefix + "Ping", auto_monitor=False)
    ping.wait_for_connection(10)
    done = threading.Event()
    status: list[int] = []

    def on_put(args) -> None:
        status.append(int(args.status))
        done.set()

    callback = dbr.make_callback(on_put, dbr.event_handler_args)
    usr = ctypes.py_object(None)

    def put_ping() -> None:
        # libca's put with callback, waited for as the lock's client waits for its puts
        done.clear()
        status.clear()
        ca.use_initial_context()
        ca.libca.ca_array_put_callback(dbr.LONG, 1, ping.chid, (ctypes.c_int32 * 1)(1),
                                       callback, usr)
        ca.flush_io()
        if not done.wait(10) or status != [dbr.ECA_NORMAL]:
            raise RuntimeError(f"put to {prefix}Ping failed ({status})")

    steps = {"ping": put_ping, "acquire": lambda: lock.acquire(),
             "release": lambda: lock.release()}
    groups = [("ping",), ("acquire", "release")]
    print("ready", flush=True)
    clock = time.perf_counter
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        k = int(words[1]) % len(groups)
        out = {}
        for group in groups[k:] + groups[:k]:   # no step always follows the same one
            for name in group:
                t0 = clock()
                steps[name]()
                out[name] = clock() - t0
        print(json.dumps(out), flush=True)
    lock.close()
    ca.finalize_libca()
    return 0


if __name__ == "__main__":
    sys.exit(main())
