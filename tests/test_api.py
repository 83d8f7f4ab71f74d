"""The operator API framework over a real listening port (treq): auth, stations, the generic OCPP call
endpoint with every status code it answers, bad input, and the OpenAPI document against the routes served.
"""
from __future__ import annotations

import re

import pytest
import pytest_twisted
from conftest import EventProbe, db_settled, error_of, table_contents
from twisted.internet import defer, reactor, threads
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from csms.testing.station import StationRefused

WAIT = 10


async def refused_status(csms, station_id: str, password: str | None) -> int | None:
    """The HTTP status a handshake is refused with, or None when the station got in (then it closes)."""
    try:
        station = await csms.connect(station_id, password=password)
    except StationRefused as exc:
        return exc.status
    await station.close()
    return None


# -- authentication ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_missing_or_wrong_token_is_401_with_a_json_error(csms):
    for token, headers in ((None, None), ("not-a-token", None), (None, {"Authorization": "Basic dXNlcjpwYXNz"}),
                           (None, {"Authorization": "Bearer"})):
        status, body, response = await csms.api("GET", "/stations", token=token, headers=headers)
        assert (status, error_of(body)) == (401, "unauthorized")
        assert response.headers.getRawHeaders("www-authenticate") == ['Bearer realm="csms"']
    # The OpenAPI document is public.
    assert (await csms.api("GET", "/openapi.json", token=None))[0] == 200


@pytest_twisted.ensureDeferred
async def test_token_created_with_csms_admin_works_until_revoked(csms, database_url, capsys):
    from csms.admin import main
    from csms.api.tokens import create_token_thd, revoke_token_thd

    token_id, token = await csms.app.db.run(create_token_thd, "billing", desc="test_token")
    assert token.startswith("csms_")
    status, body, _ = await csms.api("GET", "/stations", token=token)
    assert (status, body["items"]) == (200, [])
    await csms.app.db.run(revoke_token_thd, token_id, desc="test_revoke")
    assert (await csms.api("GET", "/stations", token=token))[0] == 401

    # The command line an operator runs, against the same database (on a thread: it does blocking I/O).
    capsys.readouterr()
    assert await threads.deferToThread(main, ["-d", database_url, "token", "create", "--name", "cli"]) == 0
    printed = capsys.readouterr().out.strip()
    assert re.fullmatch(r"csms_[A-Za-z0-9_-]{43}", printed)
    status, _, _ = await csms.api("GET", "/stations", token=printed)
    assert status == 200


# -- stations ------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stations_create_list_filter_paginate_get_update(csms):
    status, body, response = await csms.api("POST", "/stations", json={
        "id": "CP-A", "description": "car park level 1", "registration_status": "Pending"})
    assert status == 201
    assert response.headers.getRawHeaders("location") == ["/api/v1/stations/CP-A"]
    assert (body["id"], body["registration_status"], body["description"], body["has_password"],
            body["online"]) == ("CP-A", "Pending", "car park level 1", False, False)
    for station_id in ("CP-B", "CP-C"):
        assert (await csms.api("POST", "/stations", json={"id": station_id}))[0] == 201
    status, body, _ = await csms.api("POST", "/stations", json={"id": "CP-B", "registration_status": "Rejected"})
    assert (status, error_of(body)) == (409, "station_exists")
    assert (await csms.api("GET", "/stations/CP-B"))[1]["registration_status"] == "Accepted"

    await csms.connect_booted("CP-C")
    status, body, _ = await csms.api("GET", "/stations")
    assert ([s["id"] for s in body["items"]], body["total"]) == (["CP-A", "CP-B", "CP-C"], 3)
    assert [s["online"] for s in body["items"]] == [False, False, True]
    status, body, _ = await csms.api("GET", "/stations?online=true")
    assert [s["id"] for s in body["items"]] == ["CP-C"]
    status, body, _ = await csms.api("GET", "/stations?online=false")
    assert [s["id"] for s in body["items"]] == ["CP-A", "CP-B"]
    status, body, _ = await csms.api("GET", "/stations?registration_status=Pending")
    assert [s["id"] for s in body["items"]] == ["CP-A"]
    status, body, _ = await csms.api("GET", "/stations?limit=2&offset=1")
    assert ([s["id"] for s in body["items"]], body["total"], body["limit"], body["offset"]) == (
        ["CP-B", "CP-C"], 3, 2, 1)
    for query in ("limit=0", "limit=1001", "offset=-1", "limit=ten", "online=perhaps", "registration_status=Gone"):
        status, body, _ = await csms.api("GET", "/stations?" + query)
        assert (status, error_of(body)) == (400, "invalid_query_parameter"), query

    status, body, _ = await csms.api("GET", "/stations/CP-C")
    assert (status, body["id"], body["online"]) == (200, "CP-C", True)
    status, body, _ = await csms.api("GET", "/stations/NOPE")
    assert (status, error_of(body)) == (404, "station_not_found")

    status, body, _ = await csms.api("PATCH", "/stations/CP-A", json={"registration_status": "Accepted",
                                                                      "description": None})
    assert (status, body["registration_status"], body["description"]) == (200, "Accepted", None)
    status, body, _ = await csms.api("PATCH", "/stations/NOPE", json={"description": "x"})
    assert (status, error_of(body)) == (404, "station_not_found")
    for bad in ({}, {"registration_status": "Maybe"}, {"id": "CP-Z"}, {"description": 5}):
        status, body, _ = await csms.api("PATCH", "/stations/CP-A", json=bad)
        assert (status, error_of(body)) == (422, "validation_failed"), bad


@pytest_twisted.ensureDeferred
async def test_deleting_a_connected_station_disconnects_it(csms):
    station = await csms.connect_booted("CP-DEL")
    status, body, _ = await csms.api("DELETE", "/stations/CP-DEL")
    assert (status, body) == (204, None)
    was_clean, code, reason = await station.closed.addTimeout(WAIT, reactor)
    assert code == 1000
    assert (await csms.api("GET", "/stations/CP-DEL"))[0] == 404
    assert (await csms.api("DELETE", "/stations/CP-DEL"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_password_set_rotate_clear_decide_who_connects(csms):
    await csms.api("POST", "/stations", json={"id": "CP-PW"})
    status, body, _ = await csms.api("PUT", "/stations/CP-PW/password", json={"password": "first-password-123"})
    assert (status, body) == (200, {"id": "CP-PW", "has_password": True})
    assert await refused_status(csms, "CP-PW", "wrong-password-1234") == 401
    assert await refused_status(csms, "CP-PW", None) == 401
    assert await refused_status(csms, "CP-PW", "first-password-123") is None

    status, body, _ = await csms.api("POST", "/stations/CP-PW/password/rotate")
    assert (status, body["id"], body["has_password"]) == (200, "CP-PW", True)
    rotated = body["password"]
    assert len(rotated) == 20
    assert await refused_status(csms, "CP-PW", "first-password-123") == 401
    assert await refused_status(csms, "CP-PW", rotated) is None

    status, body, _ = await csms.api("DELETE", "/stations/CP-PW/password")
    assert (status, body) == (200, {"id": "CP-PW", "has_password": False})
    assert await refused_status(csms, "CP-PW", None) is None

    status, body, _ = await csms.api("PUT", "/stations/CP-PW/password", json={"password": "short"})
    assert (status, error_of(body)) == (422, "validation_failed")
    for method, path, payload in (("PUT", "/stations/NOPE/password", {"password": "x" * 16}),
                                  ("POST", "/stations/NOPE/password/rotate", None),
                                  ("DELETE", "/stations/NOPE/password", None)):
        status, body, _ = await csms.api(method, path, json=payload)
        assert (status, error_of(body)) == (404, "station_not_found")


@pytest_twisted.ensureDeferred
async def test_connection_events_newest_first(csms_factory):
    probe = EventProbe()
    csms = await csms_factory(extra_plugins=[probe])
    station = await csms.connect("CP-EV")
    await probe.next("connected", "CP-EV")
    await station.close()
    await probe.next("disconnected", "CP-EV")
    await db_settled(csms.app)
    status, body, _ = await csms.api("GET", "/stations/CP-EV/events")
    assert status == 200
    assert [e["event"] for e in body["items"]] == ["disconnected", "connected"]
    assert all(e["station_id"] == "CP-EV" and e["remote_address"].startswith("tcp4:127.0.0.1:")
               for e in body["items"])
    status, body, _ = await csms.api("GET", "/stations/CP-EV/events?limit=1&offset=1")
    assert [e["event"] for e in body["items"]] == ["connected"]
    assert (await csms.api("GET", "/stations/NOPE/events"))[0] == 404


# -- POST /stations/{id}/calls/{action} -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_call_answers_with_the_stations_response(csms):
    station = await csms.connect_booted("CP-CALL")
    station.responses["GetConfiguration"] = {"configurationKey": [{"key": "HeartbeatInterval", "readonly": False,
                                                                   "value": "300"}]}
    status, body, _ = await csms.api("POST", "/stations/CP-CALL/calls/GetConfiguration",
                                     json={"key": ["HeartbeatInterval"]})
    assert (status, body) == (200, station.responses["GetConfiguration"])
    assert await station.wait_for_call("GetConfiguration") == {"key": ["HeartbeatInterval"]}
    status, body, _ = await csms.api("POST", "/stations/CP-CALL/calls/TriggerMessage",
                                     json={"requestedMessage": "Heartbeat"})
    assert (status, body) == (200, {"status": "Accepted"})


@pytest_twisted.ensureDeferred
async def test_call_unknown_station_action_or_disabled_profile_is_404(csms_factory):
    csms = await csms_factory(plugins=["core"])
    station = await csms.connect_booted("CP-404")
    status, body, _ = await csms.api("POST", "/stations/NOPE/calls/Reset", json={"type": "Soft"})
    assert (status, error_of(body)) == (404, "station_not_found")
    status, body, _ = await csms.api("POST", "/stations/CP-404/calls/MakeCoffee", json={})
    assert (status, error_of(body)) == (404, "action_unavailable")
    assert "not a Central System-initiated" in body["error"]["message"]
    status, body, _ = await csms.api("POST", "/stations/CP-404/calls/BootNotification", json={})
    assert (status, error_of(body)) == (404, "action_unavailable")
    status, body, _ = await csms.api("POST", "/stations/CP-404/calls/SetChargingProfile", json={
        "connectorId": 1, "csChargingProfiles": {}})
    assert (status, error_of(body)) == (404, "action_unavailable")
    assert body["error"]["message"] == ("SetChargingProfile belongs to the SmartCharging profile, which is not "
                                        "enabled on this Central System")
    assert station.received_calls == []


@pytest_twisted.ensureDeferred
async def test_call_to_a_station_not_connected_is_409(csms):
    await csms.api("POST", "/stations", json={"id": "CP-OFF"})
    status, body, _ = await csms.api("POST", "/stations/CP-OFF/calls/Reset", json={"type": "Soft"})
    assert (status, error_of(body)) == (409, "station_offline")


@pytest_twisted.ensureDeferred
async def test_call_with_an_invalid_payload_is_422_with_the_validation_message(csms):
    station = await csms.connect_booted("CP-422")
    status, body, _ = await csms.api("POST", "/stations/CP-422/calls/Reset", json={"type": "Warm"})
    assert (status, error_of(body)) == (422, "invalid_ocpp_payload")
    assert body["error"]["message"].startswith("Invalid Reset payload: ")
    assert "type must be one of" in body["error"]["message"]
    status, body, _ = await csms.api("POST", "/stations/CP-422/calls/UnlockConnector", json={})
    assert (status, error_of(body)) == (422, "invalid_ocpp_payload")
    assert "connectorId" in body["error"]["message"]
    status, body, _ = await csms.api("POST", "/stations/CP-422/calls/Reset", json=["Soft"])
    assert (status, error_of(body)) == (422, "validation_failed")
    assert station.received_calls == []


@pytest_twisted.ensureDeferred
async def test_call_answered_with_callerror_is_502(csms):
    station = await csms.connect_booted("CP-502")
    station.responses["Reset"] = ("CALLERROR", "InternalError", "boom")
    status, body, _ = await csms.api("POST", "/stations/CP-502/calls/Reset", json={"type": "Hard"})
    assert (status, error_of(body)) == (502, "station_call_error")
    assert body["error"]["details"] == {"code": "InternalError", "description": "boom", "details": {}}
    station.responses["Reset"] = {"status": "Maybe"}
    status, body, _ = await csms.api("POST", "/stations/CP-502/calls/Reset", json={"type": "Hard"})
    assert (status, error_of(body)) == (502, "station_invalid_response")


@pytest_twisted.ensureDeferred
async def test_call_without_an_answer_in_time_is_504(csms):
    station = await csms.connect_booted("CP-504")
    station.responses["Reset"] = None  # the station stays silent
    pending = defer.ensureDeferred(csms.api("POST", "/stations/CP-504/calls/Reset", json={"type": "Soft"}))
    assert await station.wait_for_call("Reset") == {"type": "Soft"}
    assert not pending.called
    csms.clock.advance(csms.app.config.ocpp.response_timeout + 1)
    status, body, _ = await pending.addTimeout(WAIT, reactor)
    assert (status, error_of(body)) == (504, "station_timeout")
    # The connection survives: the next call is answered.
    station.responses["Reset"] = {"status": "Accepted"}
    assert (await csms.api("POST", "/stations/CP-504/calls/Reset", json={"type": "Soft"}))[:2] == (
        200, {"status": "Accepted"})


# -- bad input -----------------------------------------------------------------------------------------


BAD_REQUESTS = [
    # (method, path, raw body, expected status, expected error code)
    ("POST", "/stations", b"{not json", 400, "invalid_json"),
    ("POST", "/stations", b"", 400, "missing_body"),
    ("POST", "/stations", b'{"id": 42}', 422, "validation_failed"),
    ("POST", "/stations", b'{"id": "CP-X", "colour": "red"}', 422, "validation_failed"),
    ("POST", "/stations", b'{"id": "CP-X", "password": "short"}', 422, "validation_failed"),
    ("POST", "/stations", b'["CP-X"]', 422, "validation_failed"),
    ("POST", "/stations", b"\xff\xfe", 400, "invalid_json"),
    ("POST", "/stations/CP-X/password/rotate", b'{"x": 1}', 400, "unexpected_body"),
    ("GET", "/stations?colour=red", b"", 400, "unknown_query_parameter"),
    ("GET", "/no-such-thing", b"", 404, "route_not_found"),
    ("GET", "/stations/CP-X/nothing/here", b"", 404, "route_not_found"),
    ("PUT", "/stations", b"{}", 405, "method_not_allowed"),
    ("DELETE", "/stations", b"", 405, "method_not_allowed"),
    ("POST", "/stations/CP-X", b"{}", 405, "method_not_allowed"),
    # A concrete segment wins over a template's parameter, as OpenAPI reads the paths (found by schemathesis).
    ("DELETE", "/stations/CP-X/charging-profiles/clear", b"", 405, "method_not_allowed"),
    ("PUT", "/stations/CP-X/configuration/fetch", b'{"value": "1"}', 405, "method_not_allowed"),
]


@pytest.mark.parametrize("method,path,raw,expected_status,expected_code", BAD_REQUESTS,
                         ids=[f"{m} {p} {s}" for m, p, _, s, _ in BAD_REQUESTS])
@pytest_twisted.ensureDeferred
async def test_bad_input_is_a_4xx_json_error_nothing_written_and_serving_goes_on(
        csms, method, path, raw, expected_status, expected_code):
    await csms.api("POST", "/stations", json={"id": "CP-X"})
    before = await table_contents(csms)
    status, body, response = await csms.api(method, path, data=raw, headers={"Content-Type": "application/json"})
    assert (status, error_of(body)) == (expected_status, expected_code), body
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    if expected_status == 405:
        allow = response.headers.getRawHeaders("allow")[0]
        assert allow == ", ".join(body["error"]["details"]["allowed"])
        assert method not in allow.split(", ")
    assert await table_contents(csms) == before
    status, body, _ = await csms.api("GET", "/stations")
    assert (status, [s["id"] for s in body["items"]]) == (200, ["CP-X"])


@pytest.mark.parametrize("path,body,message", [
    ("/stations/CP-X/data-transfer", {"vendor_id": "acme", "data": 5}, "Invalid request body: data must be string"),
    ("/stations/CP-X/certificates/delete", {"certificate_hash_data": {}},
     "Invalid request body: certificate_hash_data must contain "),
    ("/stations", {}, "Invalid request body: body must contain ['id'] properties"),
])
@pytest_twisted.ensureDeferred
async def test_a_validation_message_names_the_field_as_the_client_sent_it(csms, path, body, message):
    """The schema validator calls the body ``data``: only that leading name becomes "body"; a field whose
    name is or ends in "data" keeps its name (it read "body must be string", "certificate_hash_body")."""
    status, answer, _ = await csms.api("POST", path, json=body)
    assert (status, error_of(answer)) == (422, "validation_failed")
    assert answer["error"]["message"].startswith(message), answer


@implementer(IBodyProducer)
class ChunkedBody:
    """A request body of unknown length (sent chunked)."""

    length = UNKNOWN_LENGTH

    def __init__(self, parts):
        self.parts = parts

    def startProducing(self, consumer):
        for part in self.parts:
            consumer.write(part)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_413_and_nothing_written(csms_factory):
    csms = await csms_factory(config_text="[api]\nmax_body_size = 2048\n")
    big = {"id": "CP-BIG", "description": "x" * 3000}
    status, body, _ = await csms.api("POST", "/stations", json=big)
    assert (status, error_of(body)) == (413, "body_too_large")
    assert body["error"]["details"] == {"limit": 2048}
    # Chunked, with no Content-Length to refuse it by: counted as it arrives.
    status, body, _ = await csms.api("POST", "/stations", data=ChunkedBody([b'{"id": "CP-BIG", "description": "',
                                                                           b"y" * 1500, b"z" * 1500, b'"}']),
                                     headers={"Content-Type": "application/json"})
    assert (status, error_of(body)) == (413, "body_too_large")
    status, body, _ = await csms.api("GET", "/stations")
    assert (status, body["items"]) == (200, [])
    assert (await csms.api("POST", "/stations", json={"id": "CP-SMALL"}))[0] == 201


@pytest_twisted.ensureDeferred
async def test_api_outside_api_v1_is_a_json_404(csms):
    import treq

    response = await treq.get(f"http://127.0.0.1:{csms.api_port}/index.html", reactor=reactor)
    body = await treq.json_content(response)
    assert (response.code, error_of(body)) == (404, "route_not_found")


# -- the OpenAPI document -------------------------------------------------------------------------------


def placeholder_path(template: str) -> str:
    return re.sub(r"\{[a-z_]+\}", "placeholder", template)


@pytest_twisted.ensureDeferred
async def test_openapi_document_describes_every_route_served(csms):
    status, document, _ = await csms.api("GET", "/openapi.json", token=None)
    assert status == 200
    assert document["openapi"].startswith("3.")
    assert document["info"]["title"] and document["info"]["version"]
    assert document["servers"] == [{"url": "/api/v1"}]
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"

    documented = set()
    operation_ids = []
    for template, operations in document["paths"].items():
        assert template.startswith("/")
        params_in_template = set(re.findall(r"\{([a-z_]+)\}", template))
        for method, operation in operations.items():
            assert method in ("get", "post", "put", "patch", "delete")
            assert operation["summary"] and operation["responses"]
            assert all((code.isdigit() or code == "default") and "description" in r
                       for code, r in operation["responses"].items())
            path_params = {p["name"] for p in operation["parameters"] if p["in"] == "path"}
            assert path_params == params_in_template, (template, method)
            if "requestBody" in operation:
                content = operation["requestBody"]["content"]
                assert list(content) in (["application/json"], ["application/octet-stream"])
            documented.add((method.upper(), template))
            operation_ids.append(operation["operationId"])

            # Served: a request with placeholder parameters reaches the route (no router 404/405).
            status, body, _ = await csms.api(method.upper(), placeholder_path(template))
            if body is not None and "error" in body:
                assert body["error"]["code"] not in ("route_not_found", "method_not_allowed"), (method, template)
    assert len(operation_ids) == len(set(operation_ids)), "operationIds must be unique"

    served = {(route.method, route.template) for route in csms.app.api_router.routes}
    assert served == documented
    # The Core plugin's routes are among them.
    assert {("GET", "/id-tags"), ("POST", "/transactions/{transaction_id}/stop"),
            ("POST", "/stations/{station_id}/remote-start")} <= served


# -- the HTTP operator the OCTT tests run with ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_http_operator_raises_what_the_python_api_raises(csms):
    from conftest import HttpOperator, PythonOperator

    from csms.app import ActionUnavailable
    from csms.rpc import CallErrorReceived, RequestInvalid, StationOffline

    station = await csms.connect_booted("CP-OP")
    await csms.api("POST", "/stations", json={"id": "CP-GONE"})
    station.responses["Reset"] = ("CALLERROR", "InternalError", "boom")
    for operator in (PythonOperator(csms), HttpOperator(csms)):
        assert await operator.call("CP-OP", "ClearCache", {}) == {"status": "Accepted"}
        with pytest.raises(CallErrorReceived) as raised:
            await operator.call("CP-OP", "Reset", {"type": "Soft"})
        assert (raised.value.code, raised.value.description) == ("InternalError", "boom")
        with pytest.raises(RequestInvalid):
            await operator.call("CP-OP", "Reset", {"type": "Warm"})
        with pytest.raises(StationOffline):
            await operator.call("CP-GONE", "Reset", {"type": "Soft"})
        with pytest.raises(ActionUnavailable):
            await operator.call("CP-OP", "MakeCoffee", {})
