"""The architecture documents are valid, consistent with each other and with the code."""
from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from architecture import SCHEMA, check_graph, load_specs, nginx_locations
from epics_env import REPO
from lock_ioc import contract

SERVICES = {"queue-server", "device-monitoring", "coordination", "beamline-iocs",
            "web-gateway"}
NGINX_CONF = REPO / "clients" / "nginx" / "nginx.conf.in"


def test_every_service_spec_matches_the_schema():
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    specs = load_specs()
    assert set(specs) == SERVICES
    for name, spec in specs.items():
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(spec),
                        key=lambda e: list(e.path))
        assert not errors, f"{name}: " + "; ".join(
            f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_system_graph_is_consistent():
    assert check_graph(load_specs()) == []


def _spec_with(mutate):
    specs = copy.deepcopy(load_specs())
    mutate(specs)
    return check_graph(specs)


def test_graph_check_finds_a_required_interface_nobody_provides():
    def drop(specs):
        specs["coordination"]["provided_interfaces"] = [
            i for i in specs["coordination"]["provided_interfaces"] if i["id"] != "lock-gates"]
    assert any("requires lock-gates: no service provides it" in e for e in _spec_with(drop))


def test_graph_check_finds_a_message_format_mismatch():
    def change(specs):
        for req in specs["queue-server"]["required_interfaces"]:
            if req["id"] == "lock-pvs":
                req["format"] = "lock-pv-contract/v2"
    errors = _spec_with(change)
    assert any("queue-server requires lock-pvs: format" in e for e in errors), errors


def test_graph_check_forbids_device_monitoring_through_the_re_worker():
    def reroute(specs):
        specs["device-monitoring"]["required_interfaces"].append(
            {"id": "qserver-zmq-info", "provider": "queue-server", "protocol": "zmq",
             "format": "bluesky-queueserver-console/v1", "via": "ophyd-websocket",
             "carries": ["queue-monitoring"], "purpose": "fine: console only"})
        specs["queue-server"]["required_interfaces"][-1]["carries"].append(
            "device-monitoring")
    errors = _spec_with(reroute)
    assert any("device monitoring routed through queue-server/re-worker" in e
               for e in errors), errors


def test_every_nginx_location_is_a_route_of_the_spec_and_back():
    routes = {r["location"] for r in load_specs()["web-gateway"]["routes"]}
    assert nginx_locations(NGINX_CONF.read_text()) == routes


def test_graph_check_finds_an_nginx_route_without_a_provider():
    def drop(specs):
        specs["device-monitoring"]["provided_interfaces"] = [
            i for i in specs["device-monitoring"]["provided_interfaces"]
            if i["id"] != "ows-device-socket"]
    errors = _spec_with(drop)
    assert "web-gateway route /ophyd/ (wss ows-device-socket): no service provides it" \
        in errors, errors


def test_graph_check_finds_a_route_to_an_interface_the_proxy_does_not_require():
    def add(specs):
        specs["web-gateway"]["routes"].append(
            {"location": "/zmq/", "protocol": "https", "serves": "qserver-zmq-control",
             "admission": "public", "description": "wrong"})
    errors = _spec_with(add)
    assert any("route /zmq/ (https qserver-zmq-control): provided by queue-server, but "
               "web-gateway does not require it" in e for e in errors), errors
    assert any("route /zmq/ (https qserver-zmq-control): cannot carry queue-server's zmq"
               in e for e in errors), errors


def test_graph_check_forbids_an_nginx_route_to_device_monitoring_through_the_re_worker():
    def reroute(specs):
        specs["queue-server"]["provided_interfaces"].append(
            {"id": "worker-devices", "protocol": "websocket", "endpoint": "ws://worker",
             "format": "ophyd-websocket-pv/v1", "direction": "both", "component": "re-worker",
             "carries": ["device-monitoring"], "description": "not allowed"})
        specs["web-gateway"]["required_interfaces"].append(
            {"id": "worker-devices", "provider": "queue-server", "protocol": "websocket",
             "format": "ophyd-websocket-pv/v1", "via": "nginx", "carries": ["coordination"],
             "purpose": "not allowed"})
        specs["web-gateway"]["routes"].append(
            {"location": "/worker/", "protocol": "wss", "serves": "worker-devices",
             "admission": "auth-check", "description": "not allowed"})
    errors = _spec_with(reroute)
    assert "web-gateway route /worker/ (wss worker-devices): routes device monitoring " \
           "through queue-server/re-worker" in errors, errors


def test_lock_interface_refers_to_the_contract_in_code():
    specs = load_specs()
    lock = [i for i in specs["coordination"]["provided_interfaces"] if i["id"] == "lock-pvs"]
    assert lock[0]["format"] == contract.FORMAT
    icd = REPO / "docs" / "pv-interface.json"
    assert icd.read_text() == contract.render_json(), (
        "docs/pv-interface.json is stale: run `make docs`")
    assert json.loads(icd.read_text())["format"] == contract.FORMAT


@pytest.mark.parametrize("record", sorted((REPO / "docs" / "decisions").glob("*.md")),
                         ids=lambda p: p.name)
def test_decision_records_name_the_seed_question_and_alternatives(record):
    text = record.read_text()
    assert "Seed question:" in text
    assert "## Alternatives considered" in text


def test_there_are_decision_records():
    names = {p.name for p in (REPO / "docs" / "decisions").glob("*.md")}
    assert len(names) >= 3, names
