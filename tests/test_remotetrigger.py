"""Remote Trigger profile: OCTT TC_054 / TC_055, every requested message, warnings and bad input.

TriggerMessage goes out through the operator API (POST /stations/{id}/trigger); the test station plays
the OCTT tool: it answers the trigger, then sends the triggered message, which its own profile handles.
"""
from __future__ import annotations

import pytest
import pytest_twisted
from conftest import core_store, within

from csms_plugins.remotetrigger.plugin import REQUESTED_MESSAGES


async def trigger(csms, station_id: str, requested_message: str, connector_id: int | None = None):
    body = {"requested_message": requested_message}
    if connector_id is not None:
        body["connector_id"] = connector_id
    return await within(csms.api("POST", f"/stations/{station_id}/trigger", json=body))


def calls(station, action="TriggerMessage") -> list:
    return [frame[3] for frame in station.received_calls if frame[2] == action]


def meter_values(connector_id: int) -> dict:
    return {"connectorId": connector_id, "meterValue": [{"timestamp": "2024-05-01T10:00:00.000Z",
                                                         "sampledValue": [{"value": "1234"}]}]}


@pytest_twisted.ensureDeferred
async def test_TC_054_trigger_message(csms):
    station = await csms.connect_booted("CP-54", connectors=1)
    connector = 1  # the configured ConnectorId

    status, body, _ = await trigger(csms, "CP-54", "MeterValues", connector)
    assert (status, body) == (200, {"station_id": "CP-54", "requested_message": "MeterValues",
                                    "connector_id": 1, "status": "Accepted", "warnings": []})
    assert await within(station.call("MeterValues", meter_values(connector))) == {}

    status, body, _ = await trigger(csms, "CP-54", "Heartbeat")
    assert (status, body["status"], body["connector_id"]) == (200, "Accepted", None)
    heartbeat = await within(station.call("Heartbeat", {}))
    assert heartbeat["currentTime"].endswith("Z")

    status, body, _ = await trigger(csms, "CP-54", "StatusNotification", connector)
    assert (status, body["status"]) == (200, "Accepted")
    assert await within(station.status(connector, "Available")) == {}

    status, body, _ = await trigger(csms, "CP-54", "DiagnosticsStatusNotification")
    assert (status, body["status"]) == (200, "Accepted")
    assert await within(station.call("DiagnosticsStatusNotification", {"status": "Idle"})) == {}

    station.responses["TriggerMessage"] = {"status": "NotImplemented"}
    status, body, _ = await trigger(csms, "CP-54", "FirmwareStatusNotification")
    assert (status, body["status"]) == (200, "NotImplemented")

    assert calls(station) == [
        {"requestedMessage": "MeterValues", "connectorId": 1},
        {"requestedMessage": "Heartbeat"},
        {"requestedMessage": "StatusNotification", "connectorId": 1},
        {"requestedMessage": "DiagnosticsStatusNotification"},
        {"requestedMessage": "FirmwareStatusNotification"},
    ]
    assert [frame[2] for frame in station.received_calls] == ["TriggerMessage"] * 5
    status, body, _ = await within(csms.api("GET", "/stations/CP-54/triggers"))
    assert status == 200
    assert [(t["requested_message"], t["connector_id"], t["status"]) for t in body["items"]] == [
        ("FirmwareStatusNotification", None, "NotImplemented"), ("DiagnosticsStatusNotification", None, "Accepted"),
        ("StatusNotification", 1, "Accepted"), ("Heartbeat", None, "Accepted"), ("MeterValues", 1, "Accepted")]


@pytest_twisted.ensureDeferred
async def test_TC_055_trigger_message_rejected(csms):
    station = await csms.connect_booted("CP-55", connectors=1)
    station.responses["TriggerMessage"] = {"status": "Rejected"}
    status, body, _ = await trigger(csms, "CP-55", "MeterValues", 2)  # NumberOfConnectors + 1
    assert status == 200
    assert body == {"station_id": "CP-55", "requested_message": "MeterValues", "connector_id": 2,
                    "status": "Rejected",
                    "warnings": ["Station 'CP-55' has no connector 2 (its connectors: 1)"]}
    assert calls(station) == [{"requestedMessage": "MeterValues", "connectorId": 2}]


@pytest.mark.parametrize("requested_message", REQUESTED_MESSAGES)
@pytest_twisted.ensureDeferred
async def test_every_requested_message_with_and_without_connector(csms, requested_message):
    station = await csms.connect_booted("CP-ALL", connectors=2)
    status, body, _ = await trigger(csms, "CP-ALL", requested_message)
    assert (status, body["status"], body["warnings"]) == (200, "Accepted", [])
    status, body, _ = await trigger(csms, "CP-ALL", requested_message, 2)
    assert (status, body["status"]) == (200, "Accepted")
    expected_warnings = [] if requested_message in ("MeterValues", "StatusNotification") else [
        f"connectorId has no meaning for {requested_message}; the station may ignore or reject it"]
    assert body["warnings"] == expected_warnings
    assert calls(station) == [{"requestedMessage": requested_message},
                              {"requestedMessage": requested_message, "connectorId": 2}]


@pytest_twisted.ensureDeferred
async def test_triggered_status_notification_updates_the_connector_through_core(csms):
    station = await csms.connect_booted("CP-STATUS", connectors=1)
    station.responses["TriggerMessage"] = lambda payload: {"status": "Accepted"}
    status, body, _ = await trigger(csms, "CP-STATUS", "StatusNotification", 1)
    assert body["status"] == "Accepted"
    assert await within(station.status(1, "Unavailable")) == {}
    connectors = await core_store(csms).connectors("CP-STATUS")
    assert {c["connector_id"]: c["status"] for c in connectors} == {0: "Available", 1: "Unavailable"}


@pytest_twisted.ensureDeferred
async def test_unknown_requested_message_is_refused_and_nothing_sent(csms):
    station = await csms.connect_booted("CP-BAD")
    for body in ({"requested_message": "StartTransaction"}, {"requested_message": "Heartbeat", "connector_id": -1},
                 {"requested_message": "Heartbeat", "extra": 1}, {}):
        status, answer, _ = await within(csms.api("POST", "/stations/CP-BAD/trigger", json=body))
        assert (status, answer["error"]["code"]) == (422, "validation_failed"), body
    status, answer, _ = await within(csms.api("POST", "/stations/CP-BAD/calls/TriggerMessage",
                                              json={"requestedMessage": "StartTransaction"}))
    assert (status, answer["error"]["code"]) == (422, "invalid_ocpp_payload")
    assert station.received_calls == []


@pytest_twisted.ensureDeferred
async def test_unknown_and_offline_stations(csms):
    status, answer, _ = await trigger(csms, "NOPE", "Heartbeat")
    assert (status, answer["error"]["code"]) == (404, "station_not_found")
    status, answer, _ = await within(csms.api("GET", "/stations/NOPE/triggers"))
    assert (status, answer["error"]["code"]) == (404, "station_not_found")
    station = await csms.connect_booted("CP-OFF")
    await station.close()
    status, answer, _ = await trigger(csms, "CP-OFF", "Heartbeat")
    assert (status, answer["error"]["code"]) == (409, "station_offline")


@pytest_twisted.ensureDeferred
async def test_trigger_through_the_generic_calls_endpoint_is_recorded(csms):
    station = await csms.connect_booted("CP-GEN")
    station.responses["TriggerMessage"] = {"status": "Rejected"}
    status, body, _ = await within(csms.api("POST", "/stations/CP-GEN/calls/TriggerMessage",
                                            json={"requestedMessage": "BootNotification"}))
    assert (status, body) == (200, {"status": "Rejected"})
    status, body, _ = await within(csms.api("GET", "/stations/CP-GEN/triggers"))
    assert [(t["requested_message"], t["connector_id"], t["status"]) for t in body["items"]] == \
        [("BootNotification", None, "Rejected")]
    assert body["total"] == 1
    assert calls(station) == [{"requestedMessage": "BootNotification"}]
