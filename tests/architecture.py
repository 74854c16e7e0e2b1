"""Checks of the system graph formed by docs/architecture/*/service_architecture.json."""
from __future__ import annotations

import json
import re
from pathlib import Path

ARCH = Path(__file__).resolve().parent.parent / "docs" / "architecture"
SCHEMA = ARCH / "service_architecture.schema.json"
#: What a route's outside protocol may carry inside (TLS ends at the proxy).
ROUTE_CARRIES = {"https": {"http", "https"}, "wss": {"websocket", "wss"}, "http": {"http"}}
#: The seed's critical constraint: device monitoring never runs through the RE worker.
FORBIDDEN_FOR_MONITORING = {("queue-server", "re-worker")}


def load_specs() -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())
            for p in sorted(ARCH.glob("*/service_architecture.json"))}


def check_graph(specs: dict[str, dict]) -> list[str]:
    """Every problem of the graph, as readable sentences (empty: consistent)."""
    errors: list[str] = []
    provided: dict[str, tuple[str, dict]] = {}
    for name, spec in specs.items():
        if spec["service"] != name:
            errors.append(f"{name}: 'service' is {spec['service']!r}, not its directory name")
        components = {c["name"] for c in spec["components"]}
        for iface in spec["provided_interfaces"]:
            if iface["id"] in provided:
                errors.append(f"{name}: interface {iface['id']} also provided by "
                              f"{provided[iface['id']][0]}")
            provided[iface["id"]] = (name, iface)
            if iface["component"] not in components:
                errors.append(f"{name}: {iface['id']} served by unknown component "
                              f"{iface['component']!r}")
            if "device-monitoring" in iface["carries"] and \
                    (name, iface["component"]) in FORBIDDEN_FOR_MONITORING:
                errors.append(f"{name}: {iface['id']} routes device monitoring through "
                              f"{iface['component']}")
    for name, spec in specs.items():
        components = {c["name"] for c in spec["components"]}
        for req in spec["required_interfaces"]:
            where = f"{name} requires {req['id']}"
            if req["via"] not in components:
                errors.append(f"{where} via unknown component {req['via']!r}")
            if req["id"] not in provided:
                errors.append(f"{where}: no service provides it")
                continue
            provider, iface = provided[req["id"]]
            if provider != req["provider"]:
                errors.append(f"{where} from {req['provider']}, but {provider} provides it")
            for key in ("protocol", "format"):
                if req[key] != iface[key]:
                    errors.append(f"{where}: {key} {req[key]!r} differs from provider's "
                                  f"{iface[key]!r}")
            extra = set(req["carries"]) - set(iface["carries"])
            if extra:
                errors.append(f"{where}: carries {sorted(extra)} that {provider} does not offer")
            if "device-monitoring" in req["carries"]:
                hops = {(name, req["via"]), (provider, iface["component"])}
                bad = hops & FORBIDDEN_FOR_MONITORING
                if bad:
                    errors.append(f"{where}: device monitoring routed through "
                                  f"{'/'.join(sorted(bad)[0])}")
    errors += check_routes(specs, provided)
    return errors


def check_routes(specs: dict[str, dict], provided: dict[str, tuple[str, dict]]) -> list[str]:
    """Every route of a proxy has a provider that this service requires (or is its own),
    with a matching protocol, and none routes device monitoring through the RE worker."""
    errors: list[str] = []
    for name, spec in specs.items():
        required = {r["id"] for r in spec["required_interfaces"]}
        for route in spec.get("routes", []):
            where = f"{name} route {route['location']} ({route['protocol']} {route['serves']})"
            if route["serves"] not in provided:
                errors.append(f"{where}: no service provides it")
                continue
            provider, iface = provided[route["serves"]]
            if provider != name and route["serves"] not in required:
                errors.append(f"{where}: provided by {provider}, but {name} does not "
                              "require it")
            if iface["protocol"] not in ROUTE_CARRIES.get(route["protocol"], set()):
                errors.append(f"{where}: cannot carry {provider}'s {iface['protocol']}")
            if "device-monitoring" in iface["carries"] and \
                    (provider, iface["component"]) in FORBIDDEN_FOR_MONITORING:
                errors.append(f"{where}: routes device monitoring through "
                              f"{provider}/{iface['component']}")
    return errors


_LOCATION = re.compile(r"^\s*location\s+(.+?)\s*\{", re.MULTILINE)


def nginx_locations(conf_text: str) -> set[str]:
    """The locations an nginx configuration serves (named @error handlers left out)."""
    return {loc for loc in _LOCATION.findall(conf_text) if not loc.startswith("@")}
