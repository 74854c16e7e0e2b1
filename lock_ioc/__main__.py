"""``lock-ioc`` / ``python -m lock_ioc``: run the lock IOC.

caproto's standard IOC flags (``--prefix``, ``--list-pvs``, ``--interfaces``, ``-v``,
``-q``) plus ``--config FILE``. The prefix comes from ``--prefix``, else the config;
device IOCs' ACF must read the gates under the same prefix (``lockctl acf`` takes the
same ``--config`` and ``--prefix``), and a ``--prefix`` other than the config's is
logged as a warning that says so.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from caproto.server import template_arg_parser

from .config import ConfigError, load
from .ioc import build_ioc, serve
from .store import StoreError

DESC = "beamline-lock: the beamline lock as EPICS Channel Access PVs"


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s lock-ioc %(message)s"))
    logger = logging.getLogger("lock_ioc")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def prefix_warning(prefix: str, config_prefix: str, config_file: str | None) -> str:
    """Device IOCs read the gates under the prefix their ACF names: say which one."""
    config_opt = f"--config {config_file} " if config_file else ""
    return (f"serving under --prefix {prefix}, not the config's prefix {config_prefix}: "
            f"device IOCs must read the gates there, with an ACF from "
            f"`lockctl acf {config_opt}--prefix {prefix}`")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    try:
        config = load(known.config)
    except ConfigError as exc:
        print(f"lock-ioc: invalid config: {exc}", file=sys.stderr)
        return 2

    parser, split_args = template_arg_parser(desc=DESC, default_prefix=config.prefix,
                                             argv=argv, supported_async_libs=["asyncio"])
    parser.add_argument("--config", metavar="FILE",
                        help="YAML config (default: the embedded default, prefix BL:LOCK:)")
    args = parser.parse_args(argv)
    ioc_options, run_options = split_args(args)
    _setup_logging(quiet=args.quiet)
    # EPICS servers take their port from EPICS_CAS_SERVER_PORT when it is set (as
    # EPICS base's RSRV does); caproto reads only EPICS_CA_SERVER_PORT.
    if os.environ.get("EPICS_CAS_SERVER_PORT"):
        os.environ["EPICS_CA_SERVER_PORT"] = os.environ["EPICS_CAS_SERVER_PORT"]
    try:
        ioc = build_ioc(config, prefix=ioc_options["prefix"])
    except StoreError as exc:
        print(f"lock-ioc: {exc}", file=sys.stderr)
        return 2
    log = logging.getLogger("lock_ioc")
    log.info("serving %s* from %s; state in %s; groups: %s", ioc.prefix, config.source,
             config.state, ", ".join(config.group_names))
    if ioc.prefix != config.prefix:
        log.warning("%s", prefix_warning(ioc.prefix, config.prefix, known.config))
    serve(ioc, interfaces=run_options["interfaces"], log_pv_names=run_options["log_pv_names"])
    return 0


def main_exit() -> None:
    """Console-script entry point (``lock-ioc``): exit with main's status."""
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
