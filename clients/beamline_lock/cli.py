"""``lockctl``: the beamline lock from a terminal or a shell script.

Exit codes: 0 done; 1 refused by the lock (the reason on stderr); 2 usage or config
error; 3 lock IOC unreachable (lock state unknown). The CA identity is the invoking
OS user at this host; the usual ``EPICS_CA_*`` variables select the servers.

A lease taken with ``lockctl acquire`` outlives the command: renew or release it with
later ``lockctl renew`` / ``lockctl release`` runs by the same user on the same host
under the same session name, or let it run out. A request (``lockctl request``) likewise:
run it again to renew it before it lapses, or ``--wait`` to stay and take the lock.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Callable, Sequence

from .client import (DISABLED, HELD, BeamlineLock, LockError, LockRefused, LockStatus,
                     LockUnavailable, Waiter, until_text)

OK, REFUSED, USAGE, UNREACHABLE = 0, 1, 2, 3
#: watch: seconds to let the burst of PV updates of one lock change arrive before drawing.
SETTLE = 0.05


def seconds_type(allow_zero: bool = False) -> Callable[[str], float]:
    """An argparse ``type`` for a finite number of seconds, more than zero (or zero or
    more): bad input is a usage error that names the value, never a traceback."""
    bound = "zero or more seconds" if allow_zero else "a positive number of seconds"

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") \
                from None
        if not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {bound}, got {text!r}")
        return value
    return seconds


_positive = seconds_type()


def whole_number(what: str = "a whole number") -> Callable[[str], int]:
    """An argparse ``type`` for a whole number of 1 or more (``what`` names it)."""
    def number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
        return value
    return number


_count = whole_number()
_token = whole_number("a token number")


DEFAULT_PREFIX = "BL:LOCK:"


def _common(p: argparse.ArgumentParser, prefix, timeout) -> None:
    p.add_argument("--prefix", default=prefix,
                   help="lock IOC PV prefix (default: $LOCK_PREFIX or BL:LOCK:; for acf, "
                        "as for lock-ioc: the config's prefix)")
    p.add_argument("--timeout", type=_positive, default=timeout,
                   help="seconds to wait for the lock IOC (default 5)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lockctl", description="Inspect and operate the beamline lock.",
        epilog="Exit codes: 0 ok, 1 refused (reason on stderr), 2 usage/config error, "
               "3 lock IOC unreachable. A lease taken with 'acquire' outlives this command: "
               "renew or release it later as the same user on the same host with the same "
               "session name.")
    _common(p, None, 5.0)
    common = argparse.ArgumentParser(add_help=False)  # the same options after the command
    _common(common, argparse.SUPPRESS, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    s = cmd("status", help="show the lock")
    s.add_argument("--json", action="store_true", help="print the status as JSON")

    s = cmd("acquire", help="acquire the lock (the lease outlives this command)")
    s.add_argument("session")
    s.add_argument("--lease", type=_positive, help="lease in seconds (default: the IOC's)")
    s.add_argument("--note", help="what the lock is for, shown to others")
    s.add_argument("--wait", type=_positive, metavar="S",
                   help="wait up to S seconds for a busy lock")

    s = cmd("renew", help="extend your lease")
    s.add_argument("session")
    s.add_argument("--lease", type=_positive, help="new lease in seconds from now")

    s = cmd("release", help="release your lock")
    s.add_argument("session")

    s = cmd("request", help="ask for the lock: granted at once if you may have it, else "
                            "wait in line (the request lapses unless renewed: run it again)")
    s.add_argument("session")
    s.add_argument("--lease", type=_positive,
                   help="seconds the request lives unrenewed, and the lease it becomes "
                        "(default: the IOC's)")
    s.add_argument("--note", help="what you want the lock for, shown to the holder")
    s.add_argument("--no-auto", dest="auto", action="store_false",
                   help="do not take the lock when it is released to you; Acquire it then")
    s.add_argument("--wait", type=_positive, metavar="S",
                   help="stay up to S seconds, renewing the request, until it is granted "
                        "(else withdraw it and exit 1)")

    s = cmd("withdraw", help="leave the line (your request under SESSION)")
    s.add_argument("session")

    s = cmd("handover", help="hand the lock to the first in line, or to --to WHO")
    s.add_argument("session", help="your session (the holder's)")
    s.add_argument("--to", metavar="WHO", help="a waiter, user@host or user")
    s.add_argument("--to-session", metavar="S", help="the waiter's session, if several")
    s.add_argument("--requeue", action="store_true",
                   help="wait in line for the lock again (renew with 'lockctl request')")

    s = cmd("waiters", help="who waits for the lock, first in line first")
    s.add_argument("--json", action="store_true", help="print the line as JSON")

    s = cmd("force-release", help="take the lock from its holder (operators)")
    s.add_argument("reason")
    s = cmd("disable", help="disable the lock (operators)")
    s.add_argument("reason")
    s = cmd("enable", help="end a disable (operators)")
    s.add_argument("reason", nargs="?", default="")

    s = cmd("watch", help="live one-line view with the lease countdown")
    s.add_argument("--count", type=_count, help="stop after N lines")
    s.add_argument("--duration", type=_positive, help="stop after S seconds")

    s = cmd("history", help="recent lock events, newest last")
    s.add_argument("--token", type=_token, metavar="N",
                   help="only the events of grant N (who held it, from when to when): "
                        "the token of a run's start document")

    s = cmd("acf", help="print the EPICS access security file for a lock config")
    s.add_argument("--config", help="lock YAML config file, as given to lock-ioc (default: "
                                    "lock-ioc's embedded default)")
    s.add_argument("--asg", default="GATED",
                   help="access security group of gated records (default GATED)")
    s.add_argument("--safe-asg", default="SAFE",
                   help="access security group of stop and make-safe records, writable "
                        "whatever the lock says (default SAFE)")
    return p


def lock_prefix(args: argparse.Namespace) -> str:
    """The lock the command talks to: --prefix, else $LOCK_PREFIX, else BL:LOCK:."""
    return args.prefix or os.environ.get("LOCK_PREFIX") or DEFAULT_PREFIX


def _status_lines(st: LockStatus, last_event: str = "") -> list[str]:
    """``lockctl status``. Not ``$(P)Message``: that is the outcome of the last command
    of *any* client (another user's refusal, say); the last event names who did what."""
    lines = [f"state:     {st.state}"]
    if st.state == HELD:
        lines += [f"owner:     {st.owner}", f"session:   {st.session}"]
        if st.note:
            lines.append(f"note:      {st.note}")
        lines += [f"until:     {until_text(st.expiry)} ({st.remaining:.0f} s left)"]
    if st.state == DISABLED:
        lines.append(f"reason:    {st.disabled_reason}")
    lines.append(f"token:     {st.token}")
    if st.waiters:
        lines.append(f"waiting:   {len(st.waiters)} ({_first_waiters(st.waiters)})")
    if st.yield_to:
        lines.append(f"yields to: {st.yield_to} at the end of its running task")
    if last_event:
        lines.append(f"last event: {last_event}")
    return lines


def _first_waiters(waiters: tuple[Waiter, ...], now: float | None = None) -> str:
    """``bob@ws2 (12 s), alice@ws1 (3 s)``: who waits, first in line first."""
    return ", ".join(f"{w.who} ({w.waiting(now):.0f} s)" for w in waiters)


def watch_line(st: LockStatus) -> str:
    """The one-line live view; who waits, and for how long, at the end."""
    stamp = time.strftime("%H:%M:%S")
    if not st.connected:
        return f"{stamp} UNKNOWN  lock state unknown: lock IOC unreachable or silent"
    waiting = f" | waiting: {_first_waiters(st.waiters)}" if st.waiters else ""
    if st.yield_to:
        waiting += f" (yields to {st.yield_to} at the end of its task)"
    if st.state == HELD:
        note = f" note={st.note!r}" if st.note else ""
        return (f"{stamp} Held     {st.owner} session={st.session} token={st.token} "
                f"{st.remaining:.0f} s left{note}{waiting}")
    if st.state == DISABLED:
        return f"{stamp} Disabled {st.disabled_reason} token={st.token}{waiting}"
    return f"{stamp} Free     token={st.token}{waiting}"


def token_of(event: str) -> int | None:
    """The token field of a History line (``... token=N ...``), None if it has none."""
    _, _, rest = event.partition(" token=")
    try:
        return int(rest.split()[0]) if rest else None
    except (ValueError, IndexError):
        return None


def _watch(lock: BeamlineLock, count: int | None, duration: float | None,
           out: Callable[[str], None]) -> int:
    """Print a line on every change of the view (driven by the lock's monitors).

    Exits 0 once the lock IOC answered at least once, else 3 (unreachable), so a script
    can tell "watched the lock" from "watched nothing"."""
    changed = threading.Event()
    lock.add_callback(lambda st: changed.set())
    deadline = None if duration is None else time.monotonic() + duration
    last, printed, reached = None, 0, False
    while True:
        status = lock.status()
        reached = reached or status.connected
        view = watch_line(status)
        key = view[9:]  # without the time stamp
        if key != last:
            out(view)
            last, printed = key, printed + 1
            if count is not None and printed >= count:
                return OK if reached else UNREACHABLE
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return OK if reached else UNREACHABLE
        # Wake on a monitor update; at least once a second so a silent IOC shows up.
        if changed.wait(1.0 if left is None else min(1.0, left)):
            time.sleep(SETTLE)  # one command updates several PVs: show the result once
        changed.clear()


def _acf(args: argparse.Namespace) -> int:
    """The ACF reads the gates under the prefix the lock IOC serves: given the same
    ``--config`` and ``--prefix``, ``lock-ioc`` and ``lockctl acf`` agree. Any other
    prefix in play ($LOCK_PREFIX, the config's own) that differs is said on stderr."""
    from lock_ioc.config import ConfigError, load
    try:
        from .acf import AcfError, render_acf
    except ImportError as exc:
        print(f"lockctl acf: the ACF generator is not available ({exc})", file=sys.stderr)
        return USAGE
    try:
        config = load(args.config)
        prefix = args.prefix or config.prefix
        text = render_acf(config, args.asg, safe_asg=args.safe_asg, prefix=prefix)
    except (ConfigError, AcfError) as exc:
        print(f"lockctl acf: {exc}", file=sys.stderr)
        return USAGE
    config_opt = f"--config {args.config} " if args.config else ""
    if prefix != config.prefix:
        print(f"lockctl acf: the gates are read under --prefix {prefix}, not under the "
              f"config's prefix {config.prefix}: serve the lock IOC with the same prefix "
              f"(lock-ioc {config_opt}--prefix {prefix}), or set prefix: in the config",
              file=sys.stderr)
    env = os.environ.get("LOCK_PREFIX")
    if env and env != prefix:
        print(f"lockctl acf: note: LOCK_PREFIX={env} (the lock this shell's clients use) "
              f"differs from the prefix the ACF reads ({prefix})", file=sys.stderr)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return OK


def _waiting_text(lock: BeamlineLock, st: LockStatus, session: str) -> str:
    """Where our request stands, and what to do to keep it."""
    line = st.waiters
    place = next((i for i, w in enumerate(line, 1)
                  if w.who == lock.identity and w.session == session), None)
    if place is None:
        return f"not waiting: the lock is {st.describe()}"
    mine = line[place - 1]
    ahead = f", after {', '.join(w.who for w in line[:place - 1])}" if place > 1 else ""
    held = f"; the lock is {st.describe()}" if st.state != HELD else \
        f"; held by {st.owner} (session {st.session}), who was told"
    return (f"waiting: place {place} of {len(line)}{ahead}{held}. The request lapses at "
            f"{until_text(mine.expiry)} unless renewed: run 'lockctl request {session}' "
            f"again (or use --wait)")


def run(args: argparse.Namespace) -> int:
    if args.command == "acf":
        return _acf(args)
    prefix = lock_prefix(args)
    lock = BeamlineLock(prefix, timeout=args.timeout, connect_timeout=args.timeout)
    try:
        if args.command == "watch":
            if not sys.stdout.isatty():  # a log or a pipe: one line per change
                return _watch(lock, args.count, args.duration, lambda s: print(s, flush=True))
            try:  # a terminal: one line, redrawn in place
                return _watch(lock, args.count, args.duration,
                              lambda s: print(f"\r\033[K{s}", end="", flush=True))
            finally:
                print()
        if not lock.connected:
            raise LockUnavailable(f"lock IOC {prefix} unreachable: no answer within "
                                  f"{args.timeout:g} s (EPICS_CA_ADDR_LIST="
                                  f"{os.environ.get('EPICS_CA_ADDR_LIST', '')!r}); "
                                  "lock state unknown")
        if args.command == "status":
            st = lock.status()
            if args.json:
                out = {k: v for k, v in st.__dict__.items()
                       if k not in ("event", "lost", "held_by_me")}
                out["waiters"] = [w.__dict__ for w in st.waiters]
                print(json.dumps(out))
            else:
                events = lock.history()
                print("\n".join(_status_lines(st, events[-1] if events else "")))
        elif args.command == "history":
            events = lock.history()
            if args.token is not None:
                kept = len(events)
                events = [e for e in events if token_of(e) == args.token]
                if not events:
                    print(f"lockctl: no event of token {args.token} in the last "
                          f"{kept} events the lock IOC keeps in History",
                          file=sys.stderr)
                    return REFUSED
            print("\n".join(events))
        elif args.command == "waiters":
            line = lock.waiters()
            if args.json:
                print(json.dumps([w.__dict__ for w in line]))
            elif not line:
                print("nobody is waiting for the lock")
            else:
                now = time.time()
                print("\n".join(w.line(i, now) for i, w in enumerate(line, 1)))
        elif args.command == "request":
            st = lock.request(args.session, lease=args.lease, note=args.note,
                              auto=args.auto, wait=args.wait)
            if st.held_by_me:
                print(f"granted: session {st.session}, token {st.token}, until "
                      f"{until_text(st.expiry)}; the lease runs on after lockctl exits: "
                      f"'lockctl renew {st.session}' / 'lockctl release {st.session}'")
            else:
                print(_waiting_text(lock, st, args.session))
        elif args.command == "withdraw":
            lock.withdraw(args.session)
            print(f"withdrawn: session {args.session} left the line")
        elif args.command == "handover":
            st = lock.handover(args.to, to_session=args.to_session, requeue=args.requeue,
                               session=args.session)
            print(f"handed over: the lock is now {st.describe()}")
            if args.requeue:
                print(f"you wait in line again: renew with 'lockctl request {args.session}' "
                      "before your request lapses")
        elif args.command == "acquire":
            st = lock.acquire(args.session, lease=args.lease, note=args.note, wait=args.wait)
            print(f"acquired: session {st.session}, token {st.token}, until "
                  f"{until_text(st.expiry)}; the lease runs on after lockctl exits: "
                  f"'lockctl renew {st.session}' / 'lockctl release {st.session}'")
        elif args.command == "renew":
            st = lock.renew(args.lease, session=args.session)
            print(f"renewed: session {st.session}, token {st.token}, until "
                  f"{until_text(st.expiry)}")
        elif args.command == "release":
            lock.release(args.session)
            print(f"released: session {args.session}")
        elif args.command == "force-release":
            print(lock.force_release(args.reason).message)
        elif args.command == "disable":
            print(lock.disable(args.reason).message)
        elif args.command == "enable":
            print(lock.enable(args.reason).message)
        return OK
    finally:
        lock.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except LockUnavailable as exc:
        print(f"lockctl: {exc}", file=sys.stderr)
        return UNREACHABLE
    except LockRefused as exc:
        print(f"lockctl: {exc}", file=sys.stderr)
        return REFUSED
    except LockError as exc:  # lost, or an outcome we could not confirm
        print(f"lockctl: {exc}", file=sys.stderr)
        return REFUSED
    except KeyboardInterrupt:
        return 130


def main_exit() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
