"""Security plugin, security events (whitepaper use case A04): SecurityEventNotification stored per
station, listed and filtered through the operator API, told to plugins (``csms_on_security_event``),
critical ones logged at warning."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest_twisted
from conftest import error_of, table_contents, within
from twisted.logger import LogLevel, capturedLogs
from zope.interface import implementer

from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from test_rpc import OVERFLOWING_TIMESTAMPS, bad_log_events
from test_webhooks import ALLOW_LOOPBACK, drain, receiver, subscribe  # noqa: F401  (receiver: a fixture)


@implementer(ICSMSPlugin)
class SecurityEventListener:
    name = "securitylistener"
    profile = None
    inbound_actions = ()
    outbound_actions = ()
    settings = ()

    def __init__(self):
        self.events: list = []

    @hookimpl
    def csms_on_security_event(self, station_id, event):
        self.events.append((station_id, event))


def notification(event_type: str, timestamp: str, tech_info: str | None = None) -> dict:
    payload = {"type": event_type, "timestamp": timestamp}
    if tech_info is not None:
        payload["techInfo"] = tech_info
    return payload


async def listed(csms, path: str):
    status, body, _ = await within(csms.api("GET", path))
    assert status == 200, body
    return body


@pytest_twisted.ensureDeferred
async def test_notifications_are_stored_announced_and_critical_ones_logged_at_warning(csms_factory):
    listener = SecurityEventListener()
    csms = await csms_factory(extra_plugins=[listener])
    station = await within(csms.connect_booted("CP-SEC"))
    with capturedLogs() as logged:
        assert await within(station.call("SecurityEventNotification", notification(
            "TamperDetectionActivated", "2026-03-01T10:00:00Z", "cover opened"))) == {}
        assert await within(station.call("SecurityEventNotification", notification(
            "InvalidMessages", "2026-03-01T10:05:00+01:00"))) == {}
        assert await within(station.call("SecurityEventNotification", notification(
            "AcmeVendorEvent", "2026-03-01T11:00:00Z", "x" * 255))) == {}

    assert [(station_id, e["type"], e["critical"], e["origin"], e["tech_info"])
            for station_id, e in listener.events] == [
        ("CP-SEC", "TamperDetectionActivated", True, "station", "cover opened"),
        ("CP-SEC", "InvalidMessages", False, "station", None),
        ("CP-SEC", "AcmeVendorEvent", False, "station", "x" * 255)]
    assert listener.events[1][1]["timestamp"] == datetime(2026, 3, 1, 9, 5, tzinfo=timezone.utc)
    levels = {event["type"]: event["log_level"] for event in logged if "type" in event and "station" in event}
    assert levels == {"TamperDetectionActivated": LogLevel.warn, "InvalidMessages": LogLevel.info,
                      "AcmeVendorEvent": LogLevel.info}
    assert bad_log_events(logged) == []

    body = await listed(csms, "/stations/CP-SEC/security-events")
    assert [e["type"] for e in body["items"]] == ["AcmeVendorEvent", "TamperDetectionActivated", "InvalidMessages"]
    assert body["items"][1]["timestamp"] == "2026-03-01T10:00:00.000Z"
    assert body["items"][0]["id"] == listener.events[2][1]["id"]


@pytest_twisted.ensureDeferred
async def test_events_are_filtered_by_station_type_time_criticality_and_paged(csms):
    one = await within(csms.connect_booted("CP-A"))
    two = await within(csms.connect_booted("CP-B"))
    for station, event_type, hour in ((one, "ResetOrReboot", 1), (one, "InvalidMessages", 2), (two, "ResetOrReboot", 3),
                                      (two, "SettingSystemTime", 4), (one, "ResetOrReboot", 5)):
        await within(station.call("SecurityEventNotification",
                                  notification(event_type, f"2026-03-01T0{hour}:00:00Z")))

    def summary(body):
        return [(e["station_id"], e["type"], e["timestamp"][11:13]) for e in body["items"]]
    assert body_total(await listed(csms, "/security-events")) == 5
    assert summary(await listed(csms, "/security-events?station_id=CP-A&type=ResetOrReboot")) == [
        ("CP-A", "ResetOrReboot", "05"), ("CP-A", "ResetOrReboot", "01")]
    assert summary(await listed(csms, "/security-events?since=2026-03-01T02:00:00Z&until=2026-03-01T04:00:00Z")) == [
        ("CP-B", "ResetOrReboot", "03"), ("CP-A", "InvalidMessages", "02")]
    assert summary(await listed(csms, "/security-events?critical=false")) == [("CP-A", "InvalidMessages", "02")]
    page = await listed(csms, "/security-events?limit=2&offset=1")
    assert (page["total"], summary(page)) == (5, [("CP-B", "SettingSystemTime", "04"), ("CP-B", "ResetOrReboot", "03")])
    assert body_total(await listed(csms, "/stations/CP-B/security-events?type=ResetOrReboot")) == 1
    assert body_total(await listed(csms, "/security-events?station_id=NOBODY")) == 0

    for path, status, code in (("/security-events?since=yesterday", 400, "invalid_query_parameter"),
                               ("/security-events?limit=0", 400, "invalid_query_parameter"),
                               ("/security-events?origin=elsewhere", 400, "invalid_query_parameter"),
                               ("/stations/NOBODY/security-events", 404, "station_not_found")):
        got, body, _ = await within(csms.api("GET", path))
        assert (got, error_of(body)) == (status, code), path


def body_total(body) -> int:
    return body["total"]


@pytest_twisted.ensureDeferred
async def test_bad_notifications_get_named_errors_store_nothing_and_disturb_no_one(csms):
    station = await within(csms.connect_booted("CP-BADSEC"))
    bystander = await within(csms.connect_booted("CP-OTHER"))
    before = await within(table_contents(csms))
    cases = [
        ({"type": "x" * 51, "timestamp": "2026-03-01T10:00:00Z"}, "PropertyConstraintViolation"),
        ({"type": "ResetOrReboot", "timestamp": "2026-03-01T10:00:00Z", "techInfo": "y" * 256},
         "PropertyConstraintViolation"),
        ({"type": "ResetOrReboot"}, "OccurenceConstraintViolation"),
        ({"type": "ResetOrReboot", "timestamp": "not a time"}, "PropertyConstraintViolation"),
        ({"type": 7, "timestamp": "2026-03-01T10:00:00Z"}, "TypeConstraintViolation"),
    ] + [({"type": "ResetOrReboot", "timestamp": t}, "PropertyConstraintViolation") for t in OVERFLOWING_TIMESTAMPS]
    with capturedLogs() as logged:
        for payload, code in cases:
            frame = await within(station.call_frame("SecurityEventNotification", payload))
            assert frame[:1] == [4] and frame[2] == code, (payload, frame)
        assert (await within(bystander.call("Heartbeat", {})))["currentTime"]
    assert bad_log_events(logged) == []
    assert await within(table_contents(csms)) == before


@pytest_twisted.ensureDeferred
async def test_deleting_a_station_removes_its_security_records(csms):
    station = await within(csms.connect_booted("CP-DEL"))
    await within(station.call("SecurityEventNotification", notification("ResetOrReboot", "2026-03-01T10:00:00Z")))
    await within(station.call("SignCertificate", {"csr": "not a csr"}))
    status, _, _ = await within(csms.api("DELETE", "/stations/CP-DEL"))
    assert status == 204
    contents = await within(table_contents(csms))
    assert [name for name, rows in contents.items() if name.startswith("security_") and rows] == []
    assert body_total(await listed(csms, "/security-events")) == 0


@pytest_twisted.ensureDeferred
async def test_stored_events_are_webhooks_and_refused_notifications_are_not(csms_factory, receiver):
    """Issue 17: each stored security event is a ``security.event`` webhook, written with its row."""
    csms = await csms_factory(ALLOW_LOOPBACK)
    await subscribe(csms, receiver.url, ["security.event"])
    station = await csms.connect_booted("CP-HOOK")
    assert await within(station.call("SecurityEventNotification", notification(
        "TamperDetectionActivated", "2026-12-01T10:00:00Z", "lid opened"))) == {}
    frame = await within(station.call_frame("SecurityEventNotification", {"type": "ResetOrReboot",
                                                                         "timestamp": "not a time"}))
    assert frame[2] == "PropertyConstraintViolation"  # refused: not stored, so never announced
    assert await within(station.call("SignCertificate", {"csr": "not a CSR"})) == {"status": "Rejected"}
    await drain(csms)

    stored = (await listed(csms, "/stations/CP-HOOK/security-events"))["items"]
    delivered = [event["data"] for event in receiver.events("security.event")]
    assert sorted(delivered, key=lambda e: e["id"]) == sorted(stored, key=lambda e: e["id"])
    assert {(e["origin"], e["type"], e["critical"]) for e in delivered} == {
        ("station", "TamperDetectionActivated", True), ("csms", "CertificateSigningRequestRejected", False)}


@pytest_twisted.ensureDeferred
async def test_deleting_a_station_that_just_connected_waits_until_its_connection_is_recorded(csms, monkeypatch):
    """The connection's listeners (here the security profile floor) may still be writing when an operator
    deletes the station: the deletion waits for them, so that nothing they write outlives it."""
    from twisted.internet import defer

    store = csms.app.pm.get_plugin("security").profiles.store
    gate = defer.Deferred()
    connected = store.connected
    monkeypatch.setattr(store, "connected", lambda *args, **kwargs: gate.addCallback(
        lambda _: connected(*args, **kwargs)))
    station = await within(csms.connect_booted("CP-NEW", settled=False))  # its listener waits for the gate
    protocol = csms.app.sessions["CP-NEW"].protocol
    announced = getattr(protocol, "announced", lambda: defer.succeed(None))

    def release(result=None):
        if not gate.called:
            gate.callback(None)
        return result

    def waiting():  # the deletion asks: the listener may now finish
        d = announced()
        release()
        return d
    monkeypatch.setattr(protocol, "announced", waiting, raising=False)
    status, _, _ = await within(defer.ensureDeferred(csms.api("DELETE", "/stations/CP-NEW")).addBoth(release))
    assert status == 204
    await within(gate)
    await within(csms.app.db.barrier())
    contents = await within(table_contents(csms))
    assert [name for name, rows in contents.items() if name.startswith("security_") and rows] == []
    del station
