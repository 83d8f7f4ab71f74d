"""The Core profile plugin beyond the OCTT cases: what it stores, how it authorizes, which events it fires.

Stations here are test stations over real loopback sockets; what the CSMS keeps is read back from its
tables (or its store) after each confirmation, which only comes once the data is committed.
"""
from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from conftest import TIMEOUT, as_stored, booted, clock_now, core_store, station_time, within
from sqlalchemy import func, select
from twisted.internet import defer, reactor
from zope.interface import implementer

from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from csms_plugins.core import tables

VALID = "CORE-VALID-01"
OCPP_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


# -- helpers ---------------------------------------------------------------------------------------------

def utc(*args) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def _utc_values(row: dict) -> dict:
    """SQLite hands datetimes back naive; they were stored as UTC."""
    return {key: value.replace(tzinfo=timezone.utc) if isinstance(value, datetime) and value.tzinfo is None
            else value for key, value in row.items()}


def table_rows(csms, table, **where) -> defer.Deferred:
    """Every row of one of the Core plugin's tables matching ``where``, in primary key order."""
    def thd(conn):
        query = select(table)
        for column, value in where.items():
            query = query.where(table.c[column] == value)
        rows = conn.execute(query.order_by(*table.primary_key.columns)).fetchall()
        return [_utc_values(dict(row._mapping)) for row in rows]
    return csms.app.db.run(thd, desc="test_table_rows")


async def put_tags(csms, *tags) -> None:
    """Store id tags: a bare id is Accepted; a tuple is put_id_tag's (id_tag, status, expiry_date, parent_id_tag)."""
    store = core_store(csms)
    for tag in tags:
        await within(store.put_id_tag(*tag) if isinstance(tag, tuple) else store.put_id_tag(tag))

def start_payload(csms, connector_id: int = 1, id_tag: str = VALID, meter_start: int = 1000,
                  timestamp: str | None = None, **extra) -> dict:
    return {"connectorId": connector_id, "idTag": id_tag, "meterStart": meter_start,
            "timestamp": timestamp or station_time(clock_now(csms)), **extra}


def stop_payload(csms, transaction_id: int, meter_stop: int = 2000, timestamp: str | None = None,
                 **extra) -> dict:
    return {"transactionId": transaction_id, "meterStop": meter_stop,
            "timestamp": timestamp or station_time(clock_now(csms)), **extra}


# -- StartTransaction / StopTransaction ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_start_transaction_retransmit_returns_same_id(csms):
    await put_tags(csms, VALID)
    station = await booted(csms, "CP-RETX")
    payload = start_payload(csms, timestamp="2024-05-01T10:00:00.000Z")
    first = await station.call("StartTransaction", payload)
    # The confirmation was lost; the station sends the very same request again.
    again = await station.call("StartTransaction", payload)
    assert again == first == {"transactionId": first["transactionId"], "idTagInfo": {"status": "Accepted"}}
    # The same instant written with an offset is the same start.
    shifted = dict(payload, timestamp="2024-05-01T12:00:00+02:00")
    assert (await station.call("StartTransaction", shifted))["transactionId"] == first["transactionId"]
    assert len(await table_rows(csms, tables.transactions, station_id="CP-RETX")) == 1
    # A different meterStart is a different transaction.
    other = await station.call("StartTransaction", dict(payload, meterStart=1001))
    assert other["transactionId"] != first["transactionId"]
    assert len(await table_rows(csms, tables.transactions, station_id="CP-RETX")) == 2


@pytest_twisted.ensureDeferred
async def test_start_transaction_stores_reservation_and_parent(csms):
    await put_tags(csms, (VALID, "Accepted", None, "GROUP-1"))
    station = await booted(csms, "CP-RES")
    response = await station.call("StartTransaction", start_payload(csms, reservationId=42))
    assert response["idTagInfo"] == {"status": "Accepted", "parentIdTag": "GROUP-1"}
    stored = await core_store(csms).get_transaction(response["transactionId"])
    assert (stored["reservation_id"], stored["parent_id_tag"], stored["id_tag_status"]) == (42, "GROUP-1", "Accepted")


@pytest_twisted.ensureDeferred
async def test_stop_transaction_for_unknown_transaction_is_answered_and_kept(csms):
    await put_tags(csms, VALID)
    station = await booted(csms, "CP-UNMATCHED")
    stopped_at = utc(2024, 5, 1, 11, 30)
    with_tag = stop_payload(csms, 987654, meter_stop=3210, timestamp=station_time(stopped_at), idTag=VALID,
                            reason="Local", transactionData=[{"timestamp": "2024-05-01T11:30:00Z", "sampledValue": [
                                {"value": "3210", "context": "Transaction.End"}]}])
    frame = await station.call_frame("StopTransaction", with_tag)
    assert frame[0] == 3, "never a CALLERROR"
    assert frame[2] == {"idTagInfo": {"status": "Accepted"}}
    assert await station.call("StopTransaction", stop_payload(csms, 987655, reason="PowerLoss")) == {}
    rows = await table_rows(csms, tables.unmatched_stops, station_id="CP-UNMATCHED")
    assert [(r["transaction_id"], r["id_tag"], r["meter_stop"], r["reason"]) for r in rows] == [
        (987654, VALID, 3210, "Local"), (987655, None, 2000, "PowerLoss")]
    assert rows[0]["timestamp"] == stopped_at
    assert rows[0]["received_at"] == clock_now(csms)
    # Its meter values are kept too, linked to no transaction the CSMS knows.
    samples = await table_rows(csms, tables.meter_values, station_id="CP-UNMATCHED")
    assert [(s["transaction_id"], s["value"], s["context"]) for s in samples] == [(None, "3210", "Transaction.End")]
    assert await table_rows(csms, tables.transactions, station_id="CP-UNMATCHED") == []


@pytest_twisted.ensureDeferred
async def test_stop_transaction_of_another_station_is_unmatched(csms):
    await put_tags(csms, VALID)
    owner = await booted(csms, "CP-OWNER")
    transaction_id = (await owner.call("StartTransaction", start_payload(csms)))["transactionId"]
    intruder = await booted(csms, "CP-INTRUDER")
    assert await intruder.call("StopTransaction", stop_payload(csms, transaction_id)) == {}
    assert (await core_store(csms).get_transaction(transaction_id))["active"] is True
    rows = await table_rows(csms, tables.unmatched_stops, station_id="CP-INTRUDER")
    assert [r["transaction_id"] for r in rows] == [transaction_id]


@pytest_twisted.ensureDeferred
async def test_stop_transaction_retransmit_keeps_first_stop(csms):
    await put_tags(csms, VALID)
    station = await booted(csms, "CP-STOPX")
    transaction_id = (await station.call("StartTransaction", start_payload(csms)))["transactionId"]
    payload = stop_payload(csms, transaction_id, meter_stop=2500, reason="EVDisconnected", idTag=VALID)
    assert await station.call("StopTransaction", payload) == {"idTagInfo": {"status": "Accepted"}}
    assert await station.call("StopTransaction", dict(payload, meterStop=9999)) == {"idTagInfo": {"status": "Accepted"}}
    stored = await core_store(csms).get_transaction(transaction_id)
    assert (stored["meter_stop"], stored["stop_reason"], stored["stop_id_tag"]) == (2500, "EVDisconnected", VALID)
    assert await table_rows(csms, tables.unmatched_stops) == []


@pytest_twisted.ensureDeferred
async def test_stop_transaction_without_reason_means_local(csms):
    await put_tags(csms, VALID)
    station = await booted(csms, "CP-LOCAL")
    transaction_id = (await station.call("StartTransaction", start_payload(csms)))["transactionId"]
    assert await station.call("StopTransaction", stop_payload(csms, transaction_id)) == {}
    assert (await core_store(csms).get_transaction(transaction_id))["stop_reason"] == "Local"


# -- MeterValues ------------------------------------------------------------------------------------------


FULL_SAMPLES = [
    {"value": "1234.5", "context": "Sample.Periodic", "format": "Raw", "measurand": "Energy.Active.Import.Register",
     "phase": "L1", "location": "Outlet", "unit": "kWh"},
    {"value": "230.1", "context": "Sample.Clock", "format": "Raw", "measurand": "Voltage", "phase": "L1-N",
     "location": "Inlet", "unit": "V"},
    {"value": "AQIDBA==", "context": "Trigger", "format": "SignedData", "measurand": "Current.Import",
     "phase": "L2", "location": "Cable", "unit": "A"},
]


@pytest_twisted.ensureDeferred
async def test_meter_values_keep_every_field_linked_to_their_transaction(csms):
    await put_tags(csms, VALID)
    station = await booted(csms, "CP-METER", connectors=2)
    transaction_id = (await station.call("StartTransaction", start_payload(csms, connector_id=2)))["transactionId"]
    assert await station.call("MeterValues", {"connectorId": 2, "transactionId": transaction_id, "meterValue": [
        {"timestamp": "2024-05-01T10:00:00.250Z", "sampledValue": FULL_SAMPLES},
        {"timestamp": "2024-05-01T12:01:00+02:00", "sampledValue": [{"value": "1300"}]},
    ]}) == {}
    # Outside a transaction (connector 0: the main meter).
    assert await station.call("MeterValues", {"connectorId": 0, "meterValue": [
        {"timestamp": "2024-05-01T10:02:00Z", "sampledValue": [{"value": "99999", "unit": "Wh"}]}]}) == {}
    rows = await table_rows(csms, tables.meter_values, station_id="CP-METER")
    fields = ("value", "context", "format", "measurand", "phase", "location", "unit")
    assert [{key: r[key] for key in fields} for r in rows[:3]] == FULL_SAMPLES
    assert all((r["transaction_id"], r["connector_id"], r["timestamp"]) ==
               (transaction_id, 2, utc(2024, 5, 1, 10, 0, 0, 250000)) for r in rows[:3])
    # Absent fields take the OCPP 1.6 defaults (§7.45 SampledValue).
    assert tuple(rows[3][key] for key in fields) == \
        ("1300", "Sample.Periodic", "Raw", "Energy.Active.Import.Register", None, "Outlet", "Wh")
    assert (rows[3]["transaction_id"], rows[3]["timestamp"]) == (transaction_id, utc(2024, 5, 1, 10, 1))
    assert (rows[4]["transaction_id"], rows[4]["connector_id"], rows[4]["value"]) == (None, 0, "99999")


@pytest_twisted.ensureDeferred
async def test_meter_values_for_another_stations_transaction_are_not_linked_to_it(csms):
    await put_tags(csms, VALID)
    owner = await booted(csms, "CP-MV-OWNER")
    transaction_id = (await owner.call("StartTransaction", start_payload(csms)))["transactionId"]
    other = await booted(csms, "CP-MV-OTHER")
    assert await other.call("MeterValues", {"connectorId": 1, "transactionId": transaction_id, "meterValue": [
        {"timestamp": "2024-05-01T10:00:00Z", "sampledValue": [{"value": "5"}]}]}) == {}
    assert await table_rows(csms, tables.meter_values, transaction_id=transaction_id) == []
    kept = await table_rows(csms, tables.meter_values, station_id="CP-MV-OTHER")
    assert [(r["transaction_id"], r["value"]) for r in kept] == [(None, "5")]


@pytest_twisted.ensureDeferred
async def test_stop_transaction_data_is_stored_with_the_transaction(csms):
    await put_tags(csms, VALID)
    station = await booted(csms, "CP-TXDATA")
    transaction_id = (await station.call("StartTransaction", start_payload(csms)))["transactionId"]
    transaction_data = [
        {"timestamp": "2024-05-01T10:00:00Z", "sampledValue": [
            {"value": "1000", "context": "Transaction.Begin", "measurand": "Energy.Active.Import.Register",
             "unit": "Wh", "location": "Outlet", "format": "Raw"}]},
        {"timestamp": "2024-05-01T11:00:00Z", "sampledValue": [
            {"value": "2000", "context": "Transaction.End", "measurand": "Energy.Active.Import.Register",
             "unit": "Wh", "location": "Outlet", "format": "Raw"},
            {"value": "32.5", "context": "Transaction.End", "measurand": "SoC", "unit": "Percent",
             "location": "EV", "format": "Raw"}]},
    ]
    assert await station.call("StopTransaction", stop_payload(
        csms, transaction_id, transactionData=transaction_data)) == {}
    rows = await table_rows(csms, tables.meter_values, transaction_id=transaction_id)
    assert [(r["timestamp"], r["value"], r["context"], r["measurand"], r["unit"], r["location"], r["connector_id"])
            for r in rows] == [
        (utc(2024, 5, 1, 10), "1000", "Transaction.Begin", "Energy.Active.Import.Register", "Wh", "Outlet", 1),
        (utc(2024, 5, 1, 11), "2000", "Transaction.End", "Energy.Active.Import.Register", "Wh", "Outlet", 1),
        (utc(2024, 5, 1, 11), "32.5", "Transaction.End", "SoC", "Percent", "EV", 1),
    ]


# -- StatusNotification -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_status_notification_keeps_current_status_and_history(csms):
    station = await csms.connect("CP-STATUS")
    assert await station.status(0, "Available") == {}
    assert await station.status(1, "Available", timestamp="2024-05-01T10:00:00Z") == {}
    assert await station.status(1, "Faulted", "GroundFailure", info="RCD tripped", vendorId="com.example",
                                vendorErrorCode="E-17", timestamp="2024-05-01T12:05:00+02:00") == {}
    assert await station.status(0, "Unavailable", "OtherError", info="maintenance") == {}

    current = {row["connector_id"]: row for row in await core_store(csms).connectors("CP-STATUS")}
    assert sorted(current) == [0, 1]
    assert (current[0]["status"], current[0]["error_code"], current[0]["info"]) == \
        ("Unavailable", "OtherError", "maintenance")
    assert current[0]["status_timestamp"] == clock_now(csms)  # no timestamp sent: time received
    assert (current[1]["status"], current[1]["error_code"], current[1]["info"], current[1]["vendor_id"],
            current[1]["vendor_error_code"], current[1]["status_timestamp"]) == \
        ("Faulted", "GroundFailure", "RCD tripped", "com.example", "E-17", utc(2024, 5, 1, 10, 5))

    history = await table_rows(csms, tables.status_history, station_id="CP-STATUS")
    assert [(h["connector_id"], h["status"], h["error_code"], h["info"], h["vendor_id"], h["vendor_error_code"],
             h["timestamp"]) for h in history] == [
        (0, "Available", "NoError", None, None, None, None),
        (1, "Available", "NoError", None, None, None, utc(2024, 5, 1, 10)),
        (1, "Faulted", "GroundFailure", "RCD tripped", "com.example", "E-17", utc(2024, 5, 1, 10, 5)),
        (0, "Unavailable", "OtherError", "maintenance", None, None, None),
    ]
    assert await core_store(csms).connector_ids("CP-STATUS") == [1]


# -- authorization ------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_concurrent_tx_when_the_tag_is_charging_elsewhere(csms):
    await put_tags(csms, VALID)
    station = await booted(csms, "CP-CONC", connectors=2)
    first = await station.call("StartTransaction", start_payload(csms, connector_id=1))
    assert first["idTagInfo"] == {"status": "Accepted"}
    assert await station.call("Authorize", {"idTag": VALID}) == {"idTagInfo": {"status": "ConcurrentTx"}}
    second = await station.call("StartTransaction", start_payload(csms, connector_id=2, meter_start=50))
    assert second["idTagInfo"] == {"status": "ConcurrentTx"}
    assert second["transactionId"] != first["transactionId"]
    assert (await core_store(csms).get_transaction(second["transactionId"]))["id_tag_status"] == "ConcurrentTx"
    # On another station too.
    elsewhere = await booted(csms, "CP-CONC-2")
    third = await elsewhere.call("StartTransaction", start_payload(csms, connector_id=1, meter_start=70))
    assert third["idTagInfo"] == {"status": "ConcurrentTx"}
    # Once every transaction of the tag has stopped, it is accepted again.
    for transaction_id, owner in ((first["transactionId"], station), (second["transactionId"], station),
                                  (third["transactionId"], elsewhere)):
        assert await owner.call("StopTransaction", stop_payload(csms, transaction_id)) == {}
    assert await station.call("Authorize", {"idTag": VALID}) == {"idTagInfo": {"status": "Accepted"}}


@pytest_twisted.ensureDeferred
async def test_new_start_on_the_same_connector_is_not_concurrent(csms):
    """A station that lost its StopTransaction starts again on the same connector: not ConcurrentTx."""
    await put_tags(csms, VALID)
    station = await booted(csms, "CP-STALE")
    await station.call("StartTransaction", start_payload(csms, meter_start=1))
    again = await station.call("StartTransaction", start_payload(csms, meter_start=2))
    assert again["idTagInfo"] == {"status": "Accepted"}


@pytest_twisted.ensureDeferred
async def test_concurrent_tx_check_can_be_disabled(csms_factory):
    csms = await csms_factory(config_text="[plugin:core]\nconcurrent_tx_check = false\n")
    await put_tags(csms, VALID)
    station = await booted(csms, "CP-NOCONC", connectors=2)
    assert (await station.call("StartTransaction", start_payload(csms, connector_id=1)))["idTagInfo"] == \
        {"status": "Accepted"}
    assert await station.call("Authorize", {"idTag": VALID}) == {"idTagInfo": {"status": "Accepted"}}
    assert (await station.call("StartTransaction", start_payload(csms, connector_id=2)))["idTagInfo"] == \
        {"status": "Accepted"}


@pytest_twisted.ensureDeferred
async def test_group_members_share_their_parent_id_tag(csms):
    await put_tags(csms, ("MEMBER-A", "Accepted", None, "FLEET-7"), ("MEMBER-B", "Accepted", None, "FLEET-7"))
    station = await booted(csms, "CP-GROUP")
    # OCTT TC_053: a second member of the group is accepted and told its parent.
    for member in ("MEMBER-A", "MEMBER-B"):
        assert await station.call("Authorize", {"idTag": member}) == {
            "idTagInfo": {"status": "Accepted", "parentIdTag": "FLEET-7"}}
    response = await station.call("StartTransaction", start_payload(csms, id_tag="MEMBER-B"))
    assert response["idTagInfo"] == {"status": "Accepted", "parentIdTag": "FLEET-7"}
    response = await station.call("StopTransaction", stop_payload(csms, response["transactionId"], idTag="MEMBER-A"))
    assert response == {"idTagInfo": {"status": "Accepted", "parentIdTag": "FLEET-7"}}


@pytest_twisted.ensureDeferred
async def test_tag_expires_by_its_expiry_date(csms):
    expiry = as_stored(clock_now(csms)) + timedelta(seconds=60)
    await put_tags(csms, ("EXPIRING", "Accepted", expiry), ("LONG-EXPIRED", "Accepted", utc(2021, 3, 4, 5, 6, 7)))
    station = await booted(csms, "CP-EXPIRY")
    assert await station.call("Authorize", {"idTag": "EXPIRING"}) == {
        "idTagInfo": {"status": "Accepted", "expiryDate": station_time(expiry)}}
    csms.clock.advance(61)
    assert await station.call("Authorize", {"idTag": "EXPIRING"}) == {
        "idTagInfo": {"status": "Expired", "expiryDate": station_time(expiry)}}
    assert await station.call("Authorize", {"idTag": "LONG-EXPIRED"}) == {
        "idTagInfo": {"status": "Expired", "expiryDate": "2021-03-04T05:06:07.000Z"}}
    response = await station.call("StartTransaction", start_payload(csms, id_tag="LONG-EXPIRED"))
    assert response["idTagInfo"]["status"] == "Expired"
    assert (await core_store(csms).get_transaction(response["transactionId"]))["id_tag_status"] == "Expired"


@pytest_twisted.ensureDeferred
async def test_stored_statuses_are_returned(csms):
    await put_tags(csms, ("T-BLOCKED", "Blocked"), ("T-EXPIRED", "Expired"), ("T-INVALID", "Invalid"))
    station = await booted(csms, "CP-STATUSES")
    for tag, status in (("T-BLOCKED", "Blocked"), ("T-EXPIRED", "Expired"), ("T-INVALID", "Invalid"),
                        ("T-UNKNOWN", "Invalid")):
        assert await station.call("Authorize", {"idTag": tag}) == {"idTagInfo": {"status": status}}


@pytest_twisted.ensureDeferred
async def test_id_tags_match_case_insensitively(csms):
    """IdToken is a CiString20Type (OCPP 1.6 §7.28): readers that send 04a1b2 and 04A1B2 mean the same card."""
    await put_tags(csms, ("04A1B2C3D4", "Accepted", None, "FLEET-1"))
    station = await booted(csms, "CP-CASE", connectors=2)
    assert await station.call("Authorize", {"idTag": "04a1b2c3d4"}) == {
        "idTagInfo": {"status": "Accepted", "parentIdTag": "FLEET-1"}}
    response = await station.call("StartTransaction", start_payload(csms, connector_id=1, id_tag="04a1b2c3d4"))
    assert response["idTagInfo"] == {"status": "Accepted", "parentIdTag": "FLEET-1"}
    assert await station.call("Authorize", {"idTag": "04A1B2C3D4"}) == {
        "idTagInfo": {"status": "ConcurrentTx", "parentIdTag": "FLEET-1"}}


# -- BootNotification ---------------------------------------------------------------------------------------


BOOT_REQUEST = {
    "chargePointVendor": "VendorX", "chargePointModel": "ModelY-22kW", "chargePointSerialNumber": "CPSN-0001",
    "chargeBoxSerialNumber": "CBSN-0002", "firmwareVersion": "1.2.3-rc4", "iccid": "89310410106543789301",
    "imsi": "204043728381234", "meterType": "ACME DZ-3", "meterSerialNumber": "MSN-42",
}


@pytest_twisted.ensureDeferred
async def test_boot_notification_stores_station_details(csms_factory):
    csms = await csms_factory(config_text="[plugin:core]\nheartbeat_interval = 120\n")
    station = await csms.connect("CP-BOOT")
    response = await station.call("BootNotification", BOOT_REQUEST)
    assert response == {"status": "Accepted", "interval": 120, "currentTime": station_time(clock_now(csms))}
    info = await core_store(csms).boot_info("CP-BOOT")
    assert {key: info[key] for key in (
        "charge_point_vendor", "charge_point_model", "charge_point_serial_number", "charge_box_serial_number",
        "firmware_version", "iccid", "imsi", "meter_type", "meter_serial_number")} == dict(zip(
            ("charge_point_vendor", "charge_point_model", "charge_point_serial_number", "charge_box_serial_number",
             "firmware_version", "iccid", "imsi", "meter_type", "meter_serial_number"), BOOT_REQUEST.values()))
    assert (info["last_boot_status"], info["last_boot_at"], info["boot_count"]) == \
        ("Accepted", clock_now(csms), 1)
    # A reboot with fewer details replaces them.
    csms.clock.advance(10)
    await station.call("BootNotification", {"chargePointVendor": "VendorX", "chargePointModel": "ModelY-22kW",
                                            "firmwareVersion": "1.2.4"})
    info = await core_store(csms).boot_info("CP-BOOT")
    assert (info["firmware_version"], info["iccid"], info["boot_count"], info["last_boot_at"]) == \
        ("1.2.4", None, 2, clock_now(csms))


@pytest_twisted.ensureDeferred
async def test_pending_station_gets_boot_retry_interval(csms_factory):
    csms = await csms_factory(config_text="[plugin:core]\nboot_retry_interval = 45\n")
    assert await within(csms.app.station_store.create("CP-PENDING", "Pending")) is True
    station = await csms.connect("CP-PENDING")
    response = await station.call("BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"})
    assert response == {"status": "Pending", "interval": 45, "currentTime": station_time(clock_now(csms))}
    assert (await core_store(csms).boot_info("CP-PENDING"))["last_boot_status"] == "Pending"
    # Accepted by the operator: the next boot gets the heartbeat interval.
    assert await within(csms.app.station_store.update("CP-PENDING", registration_status="Accepted")) is True
    response = await station.call("BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"})
    assert (response["status"], response["interval"]) == ("Accepted", 300)


@pytest_twisted.ensureDeferred
async def test_pending_station_default_boot_retry_interval(csms):
    assert await within(csms.app.station_store.create("CP-PENDING-2", "Pending")) is True
    station = await csms.connect("CP-PENDING-2")
    response = await station.call("BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"})
    assert (response["status"], response["interval"]) == ("Pending", 60)


@pytest_twisted.ensureDeferred
async def test_rejected_station_gets_rejected(csms):
    assert await within(csms.app.station_store.create("CP-REJECTED", "Rejected")) is True
    station = await csms.connect("CP-REJECTED")
    response = await station.call("BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"})
    assert (response["status"], response["interval"]) == ("Rejected", 60)


# -- time -----------------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_timestamps_with_offsets_are_stored_as_utc(csms):
    await put_tags(csms, VALID)
    station = await booted(csms, "CP-TZ")
    start = await station.call("StartTransaction", start_payload(csms, timestamp="2024-05-01T12:00:00.5+02:00"))
    await station.status(1, "Charging", timestamp="2024-05-01T05:01:00-05:00")
    await station.call("StopTransaction", stop_payload(csms, start["transactionId"],
                                                       timestamp="2024-05-01T11:30:00+01:30"))
    stored = await core_store(csms).get_transaction(start["transactionId"])
    assert stored["started_at"] == utc(2024, 5, 1, 10, 0, 0, 500000)
    assert stored["stopped_at"] == utc(2024, 5, 1, 10, 0)
    assert stored["started_at"].utcoffset() == timedelta(0)
    connectors = {row["connector_id"]: row for row in await core_store(csms).connectors("CP-TZ")}
    assert connectors[1]["status_timestamp"] == utc(2024, 5, 1, 10, 1)


@pytest_twisted.ensureDeferred
async def test_a_leap_second_is_accepted_and_a_stop_in_it_stays_after_its_start(csms):
    """RFC 3339 §5.7 allows second 60: read as the last microsecond of its minute, it keeps its day and
    its order, so a station whose clock stamps one can stop its transaction."""
    await put_tags(csms, VALID)
    station = await booted(csms, "CP-LEAP", connectors=2)
    start = await station.call("StartTransaction", start_payload(csms, timestamp="2016-12-31T23:59:59.5Z"))
    await station.call("MeterValues", {"connectorId": 1, "transactionId": start["transactionId"], "meterValue": [
        {"timestamp": "2016-12-31T23:59:60.25Z", "sampledValue": [{"value": "1500", "unit": "Wh"}]}]})
    await station.status(1, "Finishing", timestamp="2016-12-31T23:59:60Z")
    assert await station.call("StopTransaction", stop_payload(csms, start["transactionId"],
                                                              timestamp="2016-12-31T23:59:60Z")) == {}
    stored = await core_store(csms).get_transaction(start["transactionId"])
    assert stored["started_at"] == utc(2016, 12, 31, 23, 59, 59, 500000)
    assert stored["stopped_at"] == utc(2016, 12, 31, 23, 59, 59, 999999) > stored["started_at"]
    [sample] = await table_rows(csms, tables.meter_values, transaction_id=start["transactionId"])
    assert sample["timestamp"] == utc(2016, 12, 31, 23, 59, 59, 999999)
    connectors = {row["connector_id"]: row for row in await core_store(csms).connectors("CP-LEAP")}
    assert connectors[1]["status_timestamp"] == utc(2016, 12, 31, 23, 59, 59, 999999)

    # Started in the leap second (stamped in local time: 00:59:60 at +01:00 is 23:59:60 UTC), stopped just
    # after it: the start keeps its day and stays before the stop. Its retransmission is the same start.
    payload = start_payload(csms, connector_id=2, timestamp="2017-01-01T00:59:60.5+01:00")
    second = await station.call("StartTransaction", payload)
    assert (await station.call("StartTransaction", payload))["transactionId"] == second["transactionId"]
    await station.call("StopTransaction", stop_payload(csms, second["transactionId"],
                                                       timestamp="2017-01-01T00:00:00.2Z"))
    stored = await core_store(csms).get_transaction(second["transactionId"])
    assert stored["started_at"] == utc(2016, 12, 31, 23, 59, 59, 999999)
    assert stored["stopped_at"] == utc(2017, 1, 1, 0, 0, 0, 200000) > stored["started_at"]

    # Second 61 is no time: refused, and nothing stored.
    answer = await station.call_frame("StopTransaction", stop_payload(csms, 424242, timestamp="2016-12-31T23:59:61Z"))
    assert answer[:3] == [4, answer[1], "PropertyConstraintViolation"]
    assert await table_rows(csms, tables.unmatched_stops) == []


@pytest_twisted.ensureDeferred
async def test_every_timestamp_the_csms_sends_is_utc_with_milliseconds(csms):
    # Half a millisecond past a whole second (clear of float rounding): the milliseconds are still written.
    csms.clock.advance(math.ceil(csms.clock.seconds()) + 0.0005 - csms.clock.seconds())
    await put_tags(csms, (VALID, "Accepted", utc(2099, 1, 2, 3, 4, 5)))
    station = await csms.connect("CP-TIME")
    sent = [(await station.call("BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"}))
            ["currentTime"]]
    assert sent[0].endswith(".000Z")
    csms.clock.advance(0.123)
    sent.append((await station.call("Heartbeat", {}))["currentTime"])
    assert sent[1].endswith(".123Z")
    sent.append((await station.call("Authorize", {"idTag": VALID}))["idTagInfo"]["expiryDate"])
    sent.append((await station.call("StartTransaction", start_payload(csms)))["idTagInfo"]["expiryDate"])
    assert sent[2] == sent[3] == "2099-01-02T03:04:05.000Z"
    assert all(OCPP_TIME.match(text) for text in sent), sent


@pytest_twisted.ensureDeferred
async def test_confirmations_are_sent_after_commit(csms):
    await put_tags(csms, VALID)
    station = await booted(csms, "CP-COMMIT")

    def read_now(query):
        # A separate connection on this thread sees only committed data.
        return csms.app.db.run_sync(lambda conn: conn.execute(query).scalar())

    response = await station.call("StartTransaction", start_payload(csms))
    transaction_id = response["transactionId"]
    assert read_now(select(tables.transactions.c.id_tag).where(tables.transactions.c.id == transaction_id)) == VALID
    await station.call("MeterValues", {"connectorId": 1, "transactionId": transaction_id, "meterValue": [
        {"timestamp": station_time(clock_now(csms)), "sampledValue": [{"value": "1"}]}]})
    assert read_now(select(func.count()).select_from(tables.meter_values)
                    .where(tables.meter_values.c.transaction_id == transaction_id)) == 1
    await station.status(1, "SuspendedEV")
    assert read_now(select(tables.connectors.c.status).where(tables.connectors.c.station_id == "CP-COMMIT",
                                                             tables.connectors.c.connector_id == 1)) == "SuspendedEV"
    await station.call("StopTransaction", stop_payload(csms, transaction_id, reason="Remote"))
    assert read_now(select(tables.transactions.c.stop_reason)
                    .where(tables.transactions.c.id == transaction_id)) == "Remote"
    await station.call("BootNotification", {"chargePointVendor": "V", "chargePointModel": "Committed"})
    assert read_now(select(tables.boot_info.c.charge_point_model)
                    .where(tables.boot_info.c.station_id == "CP-COMMIT")) == "Committed"


# -- results of CSMS-initiated calls ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_change_availability_keeps_the_requested_availability(csms, operator):
    station = await booted(csms, "CP-AVAIL", connectors=2)

    async def requested():
        return {row["connector_id"]: row["requested_availability"]
                for row in await core_store(csms).connectors("CP-AVAIL")}

    station.responses["ChangeAvailability"] = {"status": "Accepted"}
    assert await within(operator.call("CP-AVAIL", "ChangeAvailability", {"connectorId": 1, "type": "Inoperative"})) \
        == {"status": "Accepted"}
    assert await requested() == {0: None, 1: "Inoperative", 2: None}
    station.responses["ChangeAvailability"] = {"status": "Rejected"}
    assert await within(operator.call("CP-AVAIL", "ChangeAvailability", {"connectorId": 2, "type": "Inoperative"})) \
        == {"status": "Rejected"}
    assert await requested() == {0: None, 1: "Inoperative", 2: None}
    station.responses["ChangeAvailability"] = {"status": "Scheduled"}
    assert await within(operator.call("CP-AVAIL", "ChangeAvailability", {"connectorId": 0, "type": "Operative"})) \
        == {"status": "Scheduled"}
    assert await requested() == {0: "Operative", 1: "Operative", 2: "Operative"}


@pytest_twisted.ensureDeferred
async def test_configuration_keeps_unknown_keys_and_changes(csms, operator):
    station = await booted(csms, "CP-CONFIG")
    station.responses["GetConfiguration"] = {
        "configurationKey": [{"key": "HeartbeatInterval", "readonly": False, "value": "300"},
                             {"key": "NumberOfConnectors", "readonly": True, "value": "1"}],
        "unknownKey": ["NoSuchKey"]}
    await within(operator.call("CP-CONFIG", "GetConfiguration",
                               {"key": ["HeartbeatInterval", "NumberOfConnectors", "NoSuchKey"]}))
    station.responses["ChangeConfiguration"] = {"status": "RebootRequired"}
    assert await within(operator.call("CP-CONFIG", "ChangeConfiguration",
                                      {"key": "HeartbeatInterval", "value": "600"})) == {"status": "RebootRequired"}
    rows = {row["key"]: (row["value"], row["readonly"], row["known"])
            for row in await core_store(csms).configuration("CP-CONFIG")}
    assert rows == {"HeartbeatInterval": ("600", False, True), "NumberOfConnectors": ("1", True, True),
                    "NoSuchKey": (None, None, False)}


# -- event hooks ----------------------------------------------------------------------------------------------


@implementer(ICSMSPlugin)
class Probe:
    """A plugin that records every Core event it is told about."""

    name = "probe"
    profile = None
    inbound_actions = ()
    outbound_actions = ()

    def __init__(self):
        self.events: list[tuple[str, dict]] = []
        self._waiters: list[tuple[str, int, defer.Deferred]] = []
        #: hook name -> Deferred the hook returns (to hold the confirmation back)
        self.hold: dict[str, defer.Deferred] = {}

    def _record(self, hook: str, **kwargs):
        self.events.append((hook, kwargs))
        for waiter in list(self._waiters):
            name, count, d = waiter
            if name == hook and len(self.of(hook)) >= count:
                self._waiters.remove(waiter)
                d.callback(self.of(hook)[count - 1])
        return self.hold.pop(hook, None)

    def of(self, hook: str) -> list[dict]:
        return [kwargs for name, kwargs in self.events if name == hook]

    def wait(self, hook: str, count: int = 1) -> defer.Deferred:
        """Fires with the arguments of the ``count``-th call of ``hook``."""
        seen = self.of(hook)
        if len(seen) >= count:
            return defer.succeed(seen[count - 1])
        d = defer.Deferred()
        self._waiters.append((hook, count, d))
        return d.addTimeout(TIMEOUT, reactor)

    @hookimpl
    def csms_on_station_connected(self, station):
        return self._record("connected", station_id=station.station_id)

    @hookimpl
    def csms_on_station_disconnected(self, station_id, reason):
        return self._record("disconnected", station_id=station_id, reason=reason)

    @hookimpl
    def csms_on_boot(self, station_id, request, status):
        return self._record("boot", station_id=station_id, request=request, status=status)

    @hookimpl
    def csms_on_status_changed(self, station_id, connector_id, status, error_code, previous_status, request):
        return self._record("status", station_id=station_id, connector_id=connector_id, status=status,
                            error_code=error_code, previous_status=previous_status, request=request)

    @hookimpl
    def csms_on_transaction_started(self, station_id, transaction, request):
        return self._record("started", station_id=station_id, transaction=transaction, request=request)

    @hookimpl
    def csms_on_transaction_stopped(self, station_id, transaction, request):
        return self._record("stopped", station_id=station_id, transaction=transaction, request=request)

    @hookimpl
    def csms_on_meter_values(self, station_id, connector_id, transaction_id, meter_values):
        return self._record("meter_values", station_id=station_id, connector_id=connector_id,
                            transaction_id=transaction_id, meter_values=meter_values)

    @hookimpl
    def csms_on_call_completed(self, station_id, action, request, response):
        return self._record("call_completed", station_id=station_id, action=action, request=request,
                            response=response)


class TestEventHooks:
    """Each event hook is called with the right arguments; here ``csms`` (and so ``operator``) carries a Probe."""

    @pytest.fixture
    def probe(self):
        return Probe()

    @pytest.fixture
    def csms(self, csms_factory, probe):
        return pytest_twisted.blockon(defer.ensureDeferred(csms_factory(extra_plugins=[probe])))

    @pytest_twisted.ensureDeferred
    async def test_connection_and_boot_events(self, csms, probe):
        station = await csms.connect("CP-EVENTS")
        assert await probe.wait("connected") == {"station_id": "CP-EVENTS"}
        request = {"chargePointVendor": "V", "chargePointModel": "M"}
        await station.call("BootNotification", request)
        assert probe.of("boot") == [{"station_id": "CP-EVENTS", "request": request, "status": "Accepted"}]
        await within(station.close())
        disconnected = await probe.wait("disconnected")
        assert disconnected["station_id"] == "CP-EVENTS"
        assert isinstance(disconnected["reason"], str) and disconnected["reason"]

    @pytest_twisted.ensureDeferred
    async def test_status_changed_event_carries_previous_status(self, csms, probe):
        station = await csms.connect("CP-EVSTATUS")
        await station.status(1, "Available")
        request = {"connectorId": 1, "status": "Faulted", "errorCode": "HighTemperature", "info": "hot"}
        await station.call("StatusNotification", request)
        await station.status(0, "Available")
        assert probe.of("status") == [
            {"station_id": "CP-EVSTATUS", "connector_id": 1, "status": "Available", "error_code": "NoError",
             "previous_status": None, "request": {"connectorId": 1, "status": "Available", "errorCode": "NoError"}},
            {"station_id": "CP-EVSTATUS", "connector_id": 1, "status": "Faulted", "error_code": "HighTemperature",
             "previous_status": "Available", "request": request},
            {"station_id": "CP-EVSTATUS", "connector_id": 0, "status": "Available", "error_code": "NoError",
             "previous_status": None, "request": {"connectorId": 0, "status": "Available", "errorCode": "NoError"}},
        ]

    @pytest_twisted.ensureDeferred
    async def test_transaction_and_meter_value_events(self, csms, probe):
        await put_tags(csms, VALID)
        station = await booted(csms, "CP-EVTX")
        started_at = utc(2024, 5, 1, 10)
        start = start_payload(csms, timestamp=station_time(started_at), reservationId=7, meterStart=111)
        transaction_id = (await station.call("StartTransaction", start))["transactionId"]
        [started] = probe.of("started")
        assert (started["station_id"], started["request"]) == ("CP-EVTX", start)
        assert {key: started["transaction"][key] for key in (
            "transaction_id", "connector_id", "id_tag", "id_tag_status", "reservation_id", "meter_start",
            "started_at", "active")} == {
            "transaction_id": transaction_id, "connector_id": 1, "id_tag": VALID, "id_tag_status": "Accepted",
            "reservation_id": 7, "meter_start": 111, "started_at": started_at, "active": True}
        # A retransmission is not a new transaction.
        await station.call("StartTransaction", start)
        assert len(probe.of("started")) == 1

        meter_value = [{"timestamp": "2024-05-01T10:05:00Z", "sampledValue": [{"value": "150"}]}]
        await station.call("MeterValues", {"connectorId": 1, "transactionId": transaction_id,
                                           "meterValue": meter_value})
        assert probe.of("meter_values") == [{"station_id": "CP-EVTX", "connector_id": 1,
                                             "transaction_id": transaction_id, "meter_values": meter_value}]

        stop = stop_payload(csms, transaction_id, meter_stop=999, timestamp="2024-05-01T11:00:00Z", reason="Remote")
        await station.call("StopTransaction", stop)
        await station.call("StopTransaction", stop)  # retransmitted: no second event
        [stopped] = probe.of("stopped")
        assert (stopped["station_id"], stopped["request"]) == ("CP-EVTX", stop)
        assert {key: stopped["transaction"][key] for key in (
            "transaction_id", "meter_stop", "stop_reason", "stopped_at", "active")} == {
            "transaction_id": transaction_id, "meter_stop": 999, "stop_reason": "Remote",
            "stopped_at": utc(2024, 5, 1, 11), "active": False}
        # An unknown transaction's stop is no transaction event.
        await station.call("StopTransaction", stop_payload(csms, transaction_id + 100))
        assert len(probe.of("stopped")) == 1

    @pytest_twisted.ensureDeferred
    async def test_call_completed_event(self, csms, operator, probe):
        station = await booted(csms, "CP-EVCALL")
        station.responses["Reset"] = {"status": "Rejected"}
        assert await within(operator.call("CP-EVCALL", "Reset", {"type": "Soft"})) == {"status": "Rejected"}
        assert probe.of("call_completed") == [{"station_id": "CP-EVCALL", "action": "Reset",
                                               "request": {"type": "Soft"}, "response": {"status": "Rejected"}}]

    @pytest_twisted.ensureDeferred
    async def test_confirmation_waits_for_event_listeners(self, csms, operator, probe):
        await put_tags(csms, VALID)
        station = await booted(csms, "CP-HOLD")
        release = probe.hold["started"] = defer.Deferred()
        answer = station.call("StartTransaction", start_payload(csms))
        await probe.wait("started")
        # A full round trip on the same connection: the confirmation is still held back.
        assert await within(operator.call("CP-HOLD", "ClearCache", {})) == {"status": "Accepted"}
        assert not answer.called
        release.callback(None)
        assert (await answer)["idTagInfo"] == {"status": "Accepted"}


@pytest.mark.parametrize("text, expected", [
    ("2024-05-01T10:00:00Z", utc(2024, 5, 1, 10)),
    ("2024-05-01T10:00:00.123456789+02:00", utc(2024, 5, 1, 8, 0, 0, 123456)),
    ("2024-05-01t10:00:00z", utc(2024, 5, 1, 10)),
    ("2024-05-01T10:00:00", utc(2024, 5, 1, 10)),  # no offset: UTC, as OCPP asks
    ("2024-05-01T10:00:00,5Z", utc(2024, 5, 1, 10, 0, 0, 500000)),  # ISO 8601's own decimal mark
    ("2024-05-01T10:00:00+0100", utc(2024, 5, 1, 9)),  # strftime's %z
    ("2024-05-01T10:00:00-05", utc(2024, 5, 1, 15)),
    ("2024-05-01T10:00Z", utc(2024, 5, 1, 10)),
    ("2016-12-31T23:59:60Z", utc(2016, 12, 31, 23, 59, 59, 999999)),
    ("2016-12-31T23:59:60.999Z", utc(2016, 12, 31, 23, 59, 59, 999999)),
    ("2017-01-01T00:59:60+01:00", utc(2016, 12, 31, 23, 59, 59, 999999)),
    ("2016-12-31T18:59:60-05:00", utc(2016, 12, 31, 23, 59, 59, 999999)),
    ("9999-12-31T23:59:60Z", utc(9999, 12, 31, 23, 59, 59, 999999)),
])
def test_date_times_are_read_as_iso_8601_extended_with_leap_seconds(text, expected):
    from csms.ocpp16 import parse_datetime

    assert parse_datetime(text) == expected


@pytest.mark.parametrize("text", [
    "2016-12-31T23:59:61Z", "2016-12-31T23:60:00Z", "2024-05-01T24:00:00Z", " 2024-05-01T10:00:00Z",
    "2024-05-01T10:00:00Z\n", "2024-W18-3T10:00:00Z", "2024-122T10:00:00Z", "20240501T100000Z",
    "2024-05-01T100000Z", "2024-05-01T10:00:00.Z", "2024-05-01T10:00:00+01:00:30", "2024-05-01T10:00:00+01:75",
    "2024-05-01T10Z", "2024-05-01", "2024-05-01 10:00:00Z", "0001-01-01T00:00:00+01:00", "",
])
def test_date_times_outside_iso_8601_extended_form_are_refused(text):
    from csms.ocpp16 import parse_datetime

    with pytest.raises(ValueError):
        parse_datetime(text)


def test_a_leap_second_keeps_the_order_of_the_instants_around_it():
    from csms.ocpp16 import parse_datetime

    texts = ["2016-12-31T23:59:59Z", "2016-12-31T23:59:59.999998Z", "2016-12-31T23:59:60Z",
             "2016-12-31T23:59:60.7Z", "2017-01-01T00:00:00Z", "2017-01-01T00:00:00.000001Z"]
    values = [parse_datetime(text) for text in texts]
    assert values == sorted(values)
    assert values[2] > values[1] and values[4] > values[3]
    assert {value.date() for value in values[:4]} == {utc(2016, 12, 31).date()}


def test_timestamps_are_formatted_as_utc_iso_8601_with_milliseconds():
    from datetime import datetime, timedelta, timezone

    from csms.ocpp16 import format_datetime

    utc = timezone.utc
    assert format_datetime(datetime(2026, 12, 2, 6, 5, 4, 321987, tzinfo=utc)) == "2026-12-02T06:05:04.321Z"
    assert format_datetime(datetime(2026, 12, 2, 6, 5, 4)) == "2026-12-02T06:05:04.000Z"  # naive: UTC
    assert format_datetime(datetime(2026, 12, 2, 1, 0, 0, 999999, tzinfo=timezone(timedelta(hours=-5, minutes=-30)))) \
        == "2026-12-02T06:30:00.999Z"
    assert format_datetime(datetime(999, 1, 1, tzinfo=utc)) == "0999-01-01T00:00:00.000Z"  # four digits, as ISO 8601
    with pytest.raises(OverflowError):
        format_datetime(datetime(9999, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-2))))
