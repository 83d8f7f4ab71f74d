"""The OpenAPI document: valid OpenAPI 3.1, every body typed, built once per app, and held to what the
routes answer (the contract the test fixtures check on every answer)."""
from __future__ import annotations

import json

import pytest
import pytest_twisted
from openapi_spec_validator import validate
from openapi_spec_validator.versions import consts as spec_versions
from openapi_spec_validator.versions.shortcuts import get_spec_version
from zope.interface import implementer

from csms.api import openapi
from csms.api.contract import untyped_operations
from csms.api.types import INTEGER, record
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from csms.testing.pytest_plugin import builtin_plugins


#: Documents already validated (the validator takes seconds; the document is the same on every backend).
_valid: set = set()


async def every_plugin(csms_factory):
    """Every built-in plugin and the example vendor plugin (acmehub) enabled: every route there is."""
    return await csms_factory(plugins=builtin_plugins() + ["acmehub"])


@pytest_twisted.ensureDeferred
async def test_the_served_document_is_valid_openapi_3_1(csms_factory):
    csms = await every_plugin(csms_factory)
    status, document, _ = await csms.api("GET", "/openapi.json", token=None)
    assert status == 200
    assert get_spec_version(document) == spec_versions.OPENAPIV31
    key = json.dumps(document, sort_keys=True)
    if key not in _valid:
        validate(document)
        _valid.add(key)


def resolved(schema, components: dict):
    """``schema`` with every reference to a component replaced by the component (itself resolved)."""
    if isinstance(schema, list):
        return [resolved(item, components) for item in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        return resolved(components[ref.rsplit("/", 1)[1]], components)
    return {key: value if key in ("enum", "const", "default", "examples", "required") else resolved(value, components)
            for key, value in schema.items()}


@pytest_twisted.ensureDeferred
async def test_every_route_of_every_plugin_has_typed_bodies_and_error_answers(csms_factory):
    csms = await every_plugin(csms_factory)
    document = csms.app.api_router.openapi_document()
    assert untyped_operations(document) == []
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert document["security"] == [{"bearerAuth": []}]
    station = document["paths"]["/stations/{station_id}"]
    assert station["get"]["responses"]["200"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/Station"}
    assert set(station["get"]["responses"]) == {"200", "400", "401", "403", "404", "413", "default"}
    # Request bodies are the very schemas the router validates with.
    remote_start = document["paths"]["/stations/{station_id}/remote-start"]["post"]
    assert remote_start["requestBody"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/RemoteStartBody"}
    route = next(r for r in csms.app.api_router.routes if r.template == "/stations/{station_id}/remote-start")
    components = document["components"]["schemas"]
    assert resolved(components["RemoteStartBody"], components) == route.body
    # Down to the OCPP parts it holds, typed as the OCPP 1.6 schema types them.
    charging_profile = route.body["properties"]["charging_profile"]
    assert charging_profile["title"] == "ChargingProfile"
    assert charging_profile["properties"]["chargingSchedule"]["required"] == ["chargingRateUnit",
                                                                              "chargingSchedulePeriod"]
    assert set(remote_start["responses"]) >= {"200", "404", "409", "422", "502", "504"}
    assert document["paths"]["/openapi.json"]["get"]["security"] == []
    # What plugins add to the station views is typed too (Router.extend_schema).
    station_fields = document["components"]["schemas"]["Station"]["properties"]
    assert {"boot", "connectors", "active_transaction_ids", "firmware_status"} <= set(station_fields)
    assert station_fields["connectors"] == {"type": "array", "items": {"$ref": "#/components/schemas/ConnectorState"}}


@pytest_twisted.ensureDeferred
async def test_the_document_is_built_once_per_app(csms, monkeypatch):
    built = []
    build = openapi.build_openapi
    monkeypatch.setattr(openapi, "build_openapi", lambda *args: built.append(1) or build(*args))
    first = await csms.api("GET", "/openapi.json", token=None)
    second = await csms.api("GET", "/openapi.json", token=None)
    assert first[1] == second[1] and first[1]["openapi"] == "3.1.0"
    assert csms.app.api_router.openapi_document() is csms.app.api_router.openapi_document()
    assert len(built) == 1


@implementer(ICSMSPlugin)
class Drifting:
    """Routes that answer other than they declare, and one that declares nothing."""

    name = "drifting"
    profile = None
    inbound_actions = ()
    outbound_actions = ()

    @hookimpl
    def csms_api_routes(self, app, router):
        counter = record({"count": INTEGER})
        router.add("GET", "/drifting/extra-field", lambda request: {"count": 1, "added_later": True},
                   "Answers a field its schema does not list", response=counter, operation_id="extra_field")
        router.add("GET", "/drifting/wrong-type", lambda request: {"count": "one"},
                   "Answers a string for an integer", response=counter, operation_id="wrong_type")
        router.add("GET", "/drifting/undeclared-status", self.conflict,
                   "Answers 409, which it does not list", response=counter, operation_id="undeclared_status")
        router.add("GET", "/drifting/untyped", lambda request: {"count": 1},
                   "Declares no response schema", operation_id="untyped")
        router.add("GET", "/drifting/faithful", lambda request: {"count": 1},
                   "Answers what it declares", response=counter, operation_id="faithful")

    def conflict(self, request):
        from csms.api.errors import conflict

        raise conflict("no")


@pytest_twisted.ensureDeferred
async def test_answers_that_drift_from_the_document_are_caught(csms_factory):
    csms = await csms_factory(plugins=[], extra_plugins=[Drifting()])
    contract = csms.app.api_resource.response_check
    for path in ("extra-field", "wrong-type", "undeclared-status", "untyped", "faithful"):
        await csms.api("GET", "/drifting/" + path)
    problems = list(contract.problems)
    contract.problems.clear()  # seen here: the fixture would otherwise fail the test for them
    assert len(problems) == 4, problems
    assert "GET /drifting/extra-field answered 200 with a body that breaks its schema" in problems[0]
    assert "added_later" in problems[0]
    assert "at count: 'one' is not of type 'integer'" in problems[1]
    assert "GET /drifting/undeclared-status answered 409, a status its OpenAPI operation does not list" \
        in problems[2]
    assert "declares no JSON schema for 200" in problems[3]
    assert untyped_operations(csms.app.api_router.openapi_document()) == [
        "GET /drifting/untyped: 200 answer without a schema (declare the route's response=)"]


def test_two_different_schemas_under_one_title_are_refused():
    from csms.api.router import RouteError, Router

    router = Router()
    router.add("GET", "/a", lambda request: {}, "A", response=record({"a": INTEGER}, title="Thing"))
    router.add("GET", "/b", lambda request: {}, "B", response=record({"b": INTEGER}, title="Thing"))
    with pytest.raises(RouteError, match="schema 'Thing' differs from the one operator API route GET '/a'"):
        openapi.build_openapi(router)


def test_plugins_extending_a_shared_schema_may_not_clash():
    from csms.api.router import RouteError, Router

    router = Router()
    router.add("GET", "/things/{thing_id}", lambda request: {}, "A thing",
               response=record({"id": INTEGER}, title="Thing", open_ended=True))
    router.extend_schema("Thing", {"colour": {"type": "string"}}, "painter")
    assert openapi.build_openapi(router)["components"]["schemas"]["Thing"]["properties"]["colour"] == \
        {"type": "string"}
    with pytest.raises(RouteError, match="dyer and painter both add 'colour' to the Thing schema"):
        router.extend_schema("Thing", {"colour": {"type": "integer"}}, "dyer")
    router.extend_schema("Thing", {"id": {"type": "string"}}, "renamer")
    with pytest.raises(RouteError, match="renamer adds 'id' to the Thing schema, which has it already"):
        openapi.build_openapi(router)
    router = Router()
    router.extend_schema("Gadget", {"size": INTEGER}, "painter")
    with pytest.raises(RouteError, match="painter extends the Gadget schema, which no route answers with"):
        openapi.build_openapi(router)


def connector_id_schemas(schema, where: str = "body"):
    """(where, schema) of every ``connector_id`` property anywhere in a body schema."""
    if isinstance(schema, list):
        for index, item in enumerate(schema):
            yield from connector_id_schemas(item, f"{where}[{index}]")
    elif isinstance(schema, dict):
        for key, value in schema.items():
            if key == "connector_id" and isinstance(value, dict) and "type" in value:
                yield f"{where}.{key}", value
            yield from connector_id_schemas(value, f"{where}.{key}")


@pytest_twisted.ensureDeferred
async def test_every_connector_id_an_operator_gives_is_bounded_as_a_station_s_is(csms_factory):
    """From 0 (or 1 where OCPP 1.6 says > 0) to OCPP 1.6's largest integer, 2^31-1, as csms.schemas bounds the
    connectorId of a station's messages: an id beyond that names no connector a station can have."""
    csms = await every_plugin(csms_factory)
    found = []
    for route in csms.app.api_router.routes:
        for param in route.query + route.path_params:
            if param.name == "connector_id":
                found.append((f"{route.method} {route.template} ?{param.name}", param.minimum, param.maximum))
        for where, schema in connector_id_schemas(route.body):
            found.append((f"{route.method} {route.template} {where}", schema.get("minimum"), schema.get("maximum")))
    assert len(found) >= 10, found
    assert [entry for entry in found if entry[1] not in (0, 1) or entry[2] != 2 ** 31 - 1] == []
