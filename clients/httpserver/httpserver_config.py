"""bluesky-httpserver's configuration for beamline-lock, derived from the lock's config.

bluesky-httpserver is used unmodified: this module only writes the YAML file that
``QSERVER_HTTP_SERVER_CONFIG`` names (docs/remote.md). Who may do what with the queue
comes from one place, the lock's config (``lock.yaml``):

* every lock group becomes a role of httpserver's own ``DictionaryAPIAccessControl`` policy,
  with the group's name: an ``operator: true`` group gets :data:`OPERATOR_SCOPES` (watch
  everything, start/stop/pause the queue and the plans, open the environment, run the
  lock functions; no queue editing), every other group :data:`STAFF_SCOPES` (edit and
  control the queue: httpserver's default ``user`` role);
* service groups (default ``queue``: the RE worker's own account) get no web role;
* observers, who are in no lock group (a lock group may write while the lock is Free),
  get httpserver's built-in ``observer`` role (read only).

Authentication: PAM for production (the web user's name is then the OS account that the
lock and EPICS access security know), a dictionary of passwords for the demo and tests.

    python clients/httpserver/httpserver_config.py > clients/httpserver/config.yml
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from lock_ioc.config import Config, ConfigError, load

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
#: The checked-in production example, rendered from the boot directory's lock config.
CONFIG_YML = HERE / "config.yml"
DEFAULT_LOCK_CONFIG = REPO / "iocBoot" / "iocLock" / "lock.yaml"

_READ = ["read:status", "read:queue", "read:history", "read:resources", "read:config",
         "read:monitor", "read:console", "read:lock", "read:testing"]
#: Beamline staff: httpserver's default ``user`` role, spelled out so it cannot drift.
STAFF_SCOPES = _READ + ["write:queue:edit", "write:queue:control", "write:manager:control",
                        "write:plan:control", "write:execute", "write:history:edit",
                        "user:apikeys"]
#: Operators: watch everything, stop or pause what runs, open/close the environment and
#: run the lock guard's functions (lock_reacquire); they do not edit the queue.
OPERATOR_SCOPES = _READ + ["write:queue:control", "write:manager:control",
                           "write:plan:control", "write:execute", "user:apikeys"]
#: httpserver's built-in read-only role, for users in no lock group.
OBSERVER_ROLE = "observer"
SERVICE_GROUPS = ("queue",)
#: The scope nginx's auth check asks of a user before it opens their device seat.
DEVICE_SCOPE = "read:monitor"


def roles(config: Config, service_groups: Iterable[str] = SERVICE_GROUPS) -> dict:
    """``api_access.args.roles``: one role per non-service lock group, named after it."""
    skip = set(service_groups)
    return {g.name: {"scopes_set": list(OPERATOR_SCOPES if g.operator else STAFF_SCOPES)}
            for g in config.groups if g.name not in skip}


def users(config: Config, observers: Iterable[str] = (),
          service_groups: Iterable[str] = SERVICE_GROUPS) -> dict:
    """``api_access.args.users``: each user's roles (their lock groups), observers last."""
    skip = set(service_groups)
    out: dict[str, dict] = {}
    for g in config.groups:
        if g.name in skip:
            continue
        for user in g.users:
            out.setdefault(user, {"roles": []})["roles"].append(g.name)
    for user in observers:
        if user in out:
            raise ConfigError(f"observer {user!r} is already in lock group(s) "
                              f"{', '.join(out[user]['roles'])}: an observer is in no group")
        out[user] = {"roles": [OBSERVER_ROLE]}
    return out


def pam_provider(service: str = "login") -> dict:
    """Production: OS accounts through PAM (httpserver must be able to read /etc/shadow,
    e.g. its account in group ``shadow``)."""
    return {"provider": "pam",
            "authenticator": "bluesky_httpserver.authenticators:PAMAuthenticator",
            "args": {"service": service}}


def dictionary_provider(passwords: Mapping[str, str]) -> dict:
    """Demo and tests: fixed passwords, no OS involvement (provider name ``local``)."""
    return {"provider": "local",
            "authenticator": "bluesky_httpserver.authenticators:DictionaryAuthenticator",
            "args": {"users_to_passwords": dict(passwords)}}


def render(config: Config, *, provider: dict, observers: Iterable[str] = (),
           service_groups: Iterable[str] = SERVICE_GROUPS,
           database_uri: str = "sqlite:///${BLUESKY_HTTPSERVER_STATE}/auth.sqlite",
           access_token_max_age: float | None = None) -> dict:
    """The whole httpserver configuration (one file) as a dict.

    The RE Manager's ZMQ addresses and the token-signing secret stay in the environment
    (``QSERVER_ZMQ_CONTROL_ADDRESS``, ``QSERVER_ZMQ_INFO_ADDRESS``,
    ``QSERVER_HTTP_SERVER_SERVER_SECRET_KEYS``), as httpserver's docs say.
    """
    service_groups = tuple(service_groups)
    auth: dict = {"allow_anonymous_access": False, "providers": [provider]}
    if access_token_max_age is not None:
        auth["access_token_max_age"] = access_token_max_age
    return {
        "authentication": auth,
        "api_access": {
            "policy": "bluesky_httpserver.authorization:DictionaryAPIAccessControl",
            "args": {"roles": roles(config, service_groups),
                     "users": users(config, observers, service_groups)},
        },
        "resource_access": {
            # Every user queues into the RE Manager's 'primary' user group
            # (clients/qserver/user_group_permissions.yaml).
            "policy": "bluesky_httpserver.authorization:DefaultResourceAccessControl",
            "args": {"default_group": "primary"},
        },
        "database": {"uri": database_uri},
    }


def dump(settings: dict, source: str) -> str:
    head = ("# bluesky-httpserver configuration (QSERVER_HTTP_SERVER_CONFIG) for beamline-lock.\n"
            f"# Generated by clients/httpserver/httpserver_config.py from {source};\n"
            "# do not edit: change the lock's groups and regenerate (docs/remote.md).\n")
    return head + yaml.safe_dump(settings, sort_keys=False, width=96)


def generate(lock_config: Path = DEFAULT_LOCK_CONFIG, *, observers: Iterable[str] = (),
             service_groups: Iterable[str] = SERVICE_GROUPS, pam_service: str = "login") -> str:
    """The production file (PAM) for ``lock_config``; with the defaults, exactly what
    clients/httpserver/config.yml holds (a test keeps it current)."""
    config = load(lock_config)
    path = Path(lock_config).resolve()
    source = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(lock_config)
    return dump(render(config, provider=pam_provider(pam_service), observers=observers,
                       service_groups=service_groups), source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock-config", type=Path, default=DEFAULT_LOCK_CONFIG,
                        help="the lock's config (default: iocBoot/iocLock/lock.yaml)")
    parser.add_argument("--observer", action="append", default=[], metavar="USER",
                        help="a read-only web user (in no lock group); repeatable")
    parser.add_argument("--service-group", action="append", default=None, metavar="GROUP",
                        help="a lock group of service accounts, no web role (default: queue)")
    parser.add_argument("--pam-service", default="login", help="PAM service (default login)")
    args = parser.parse_args(argv)
    try:
        text = generate(args.lock_config, observers=args.observer,
                        service_groups=args.service_group or SERVICE_GROUPS,
                        pam_service=args.pam_service)
    except ConfigError as exc:
        print(f"httpserver_config: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
