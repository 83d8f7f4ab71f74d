"""Storage hardening (issue 12): what a station may legally send is stored, once, and decided atomically.

* Integers: every column that stores an integer an OCPP payload can carry is BIGINT, so schema-valid
  values past 2**31 are stored on PostgreSQL as on SQLite (values past 2**63 - 1 are refused by validation).
* ConcurrentTx is decided atomically: two stations starting with one id tag at the same moment get one
  Accepted; only Accepted starts count, and a station's later boot closes the starts it was refused.
* Retransmissions: a StartTransaction resent on a new connection while the first copy is in flight gets
  the same transaction id; a resent MeterValues (or the same samples in a StopTransaction) is stored once.

Race tests make many bounded tries over real connections: each try is a fresh id tag or payload, so a
try that loses the race is seen, and the test fails, without depending on one lucky interleaving.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
import pytest_twisted
from conftest import EventProbe, booted, clock_now, core_store, db_settled, station_time, within
from sqlalchemy import BigInteger, Integer, func, select
from sqlalchemy.dialects import postgresql
from test_core import put_tags, start_payload, stop_payload, table_rows
from twisted.internet import defer
from zope.interface import implementer

from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from csms_plugins.core import tables as core_tables

INT32_END = 2 ** 31          # the first integer a PostgreSQL INTEGER cannot hold
BIG = 2 ** 40                # a meter register of about 1.1 TWh, in Wh
TRIES = 30                   # bounded tries of each race


def api(csms, method, path, json=None):
    return within(csms.api(method, path, json=json))


async def generic_call(csms, station_id: str, action: str, payload: dict):
    """The operator sends ``action`` through the generic calls endpoint; returns the station's answer."""
    status, body, _ = await api(csms, "POST", f"/stations/{station_id}/calls/{action}", payload)
    assert status == 200, body
    return body


# -- integers past 2**31 ---------------------------------------------------------------------------------


def test_every_integer_column_is_bigint_on_postgresql():
    """A sweep of every table the CSMS creates: no 32-bit integer column is left for a payload to overflow
    (the operator API's token ids are no payload's)."""
    from csms.plugins import available_plugins
    from csms.stations import metadata as framework

    metadatas = [framework] + [plugin.load()().csms_tables() for plugin in available_plugins().values()]
    dialect = postgresql.dialect()
    narrow = [f"{table.name}.{column.name}" for metadata in metadatas if metadata is not None
              for table in metadata.sorted_tables for column in table.columns
              if isinstance(column.type, Integer) and column.type.compile(dialect=dialect) != "BIGINT"
              and table.name != "csms_api_tokens"]
    assert narrow == []


def test_autoincrement_keys_stay_sqlite_rowid_aliases():
    """SQLite autoincrements only an ``INTEGER PRIMARY KEY``: the BIGINT keys are INTEGER there."""
    from sqlalchemy.dialects import sqlite
    from sqlalchemy.schema import CreateTable

    ddl = str(CreateTable(core_tables.transactions).compile(dialect=sqlite.dialect()))
    assert "id INTEGER NOT NULL" in ddl and "PRIMARY KEY (id)" in ddl
    assert isinstance(core_tables.transactions.c.id.type, BigInteger)


@pytest_twisted.ensureDeferred
async def test_start_and_stop_transaction_with_meter_registers_past_int32(csms):
    await put_tags(csms, "BIG-METER")
    station = await booted(csms, "CP-BIG-METER", connectors=2)
    for connector_id, meter_start in ((1, INT32_END + 5), (2, BIG)):
        started = await station.call("StartTransaction",
                                     start_payload(csms, connector_id=connector_id, id_tag="BIG-METER",
                                                   meter_start=meter_start))
        transaction_id = started["transactionId"]
        assert started["idTagInfo"]["status"] in ("Accepted", "ConcurrentTx")
        assert await station.call("MeterValues", {"connectorId": connector_id, "transactionId": transaction_id,
                                                  "meterValue": [{"timestamp": station_time(clock_now(csms)),
                                                                  "sampledValue": [{"value": str(meter_start)}]}]}) == {}
        assert await station.call("StopTransaction",
                                  stop_payload(csms, transaction_id, meter_stop=meter_start + BIG)) == {}
        stored = await core_store(csms).get_transaction(transaction_id)
        assert (stored["meter_start"], stored["meter_stop"]) == (meter_start, meter_start + BIG)


@pytest_twisted.ensureDeferred
async def test_stop_of_an_unknown_transaction_id_past_int32_is_kept(csms):
    station = await booted(csms, "CP-BIG-STOP")
    assert await station.call("StopTransaction", stop_payload(csms, BIG, meter_stop=BIG + 1)) == {}
    rows = await table_rows(csms, core_tables.unmatched_stops, station_id="CP-BIG-STOP")
    assert [(row["transaction_id"], row["meter_stop"]) for row in rows] == [(BIG, BIG + 1)]


@pytest_twisted.ensureDeferred
async def test_connector_transaction_and_reservation_ids_past_int32(csms):
    await put_tags(csms, "BIG-IDS")
    station = await booted(csms, "CP-BIG-IDS")
    assert await station.status(INT32_END, "Available") == {}
    assert INT32_END in await core_store(csms).connector_ids("CP-BIG-IDS")
    started = await station.call("StartTransaction", start_payload(csms, connector_id=INT32_END, id_tag="BIG-IDS",
                                                                   reservationId=INT32_END))
    stored = await core_store(csms).get_transaction(started["transactionId"])
    assert (stored["connector_id"], stored["reservation_id"]) == (INT32_END, INT32_END)
    # MeterValues naming a transaction id no transaction has: kept, linked to none.
    assert await station.call("MeterValues", {"connectorId": INT32_END, "transactionId": BIG, "meterValue": [
        {"timestamp": station_time(clock_now(csms)), "sampledValue": [{"value": "1"}]}]}) == {}
    samples = await table_rows(csms, core_tables.meter_values, station_id="CP-BIG-IDS")
    assert [(s["connector_id"], s["transaction_id"]) for s in samples] == [(INT32_END, None)]


@pytest_twisted.ensureDeferred
async def test_transaction_ids_past_int32_are_handed_out_and_used(csms):
    """Transaction ids come from the key of core_transactions: it goes past 2**31 on both databases."""
    def move_key(conn):
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"ALTER SEQUENCE core_transactions_id_seq RESTART WITH {INT32_END}")
        else:  # SQLite's rowid continues after the largest key
            conn.execute(core_tables.transactions.insert().values(
                id=INT32_END - 1, station_id="-", connector_id=0, id_tag="-", id_tag_status="Invalid", meter_start=0,
                started_at=clock_now(csms), received_at=clock_now(csms), stopped_at=clock_now(csms)))
    await within(csms.app.db.run(move_key))
    await put_tags(csms, "BIG-TX")
    station = await booted(csms, "CP-BIG-TX")
    started = await station.call("StartTransaction", start_payload(csms, id_tag="BIG-TX"))
    transaction_id = started["transactionId"]
    assert transaction_id == INT32_END
    assert await station.call("MeterValues", {"connectorId": 1, "transactionId": transaction_id, "meterValue": [
        {"timestamp": station_time(clock_now(csms)), "sampledValue": [{"value": "5"}]}]}) == {}
    assert await station.call("StopTransaction", stop_payload(csms, transaction_id)) == {}
    stored = await core_store(csms).transaction_with_meter_values(transaction_id)
    assert stored["active"] is False
    assert [s["value"] for s in stored["meter_values"]] == ["5"]


@pytest_twisted.ensureDeferred
async def test_reservation_ids_past_int32_from_the_station_and_the_allocator(csms):
    await put_tags(csms, "BIG-RSV")
    station = await booted(csms, "CP-BIG-RSV", connectors=1)
    expiry = station_time(clock_now(csms) + timedelta(hours=1))
    assert await generic_call(csms, "CP-BIG-RSV", "ReserveNow", {
        "connectorId": 1, "expiryDate": expiry, "idTag": "BIG-RSV", "reservationId": INT32_END}) == \
        {"status": "Accepted"}
    assert await generic_call(csms, "CP-BIG-RSV", "CancelReservation", {"reservationId": INT32_END}) == \
        {"status": "Accepted"}
    # The next id the CSMS allocates is above every id it knows.
    status, body, _ = await api(csms, "POST", "/stations/CP-BIG-RSV/reservations",
                                {"connector_id": 1, "expiry_date": expiry, "id_tag": "BIG-RSV"})
    assert (status, body["reservation_id"]) == (201, INT32_END + 1)
    assert [frame[3]["reservationId"] for frame in station.received_calls if frame[2] == "ReserveNow"] == [
        INT32_END, INT32_END + 1]
    # A start carrying an id no reservation has is recorded.
    await station.call("StartTransaction", start_payload(csms, id_tag="BIG-RSV", reservationId=BIG))
    status, body, _ = await api(csms, "GET", "/reservation-events")
    assert status == 200
    assert [(e["event"], e["reservation_id"]) for e in body["items"]][:1] == [("unknown_reservation_id", BIG)]


@pytest_twisted.ensureDeferred
async def test_charging_profile_ids_and_stack_levels_past_int32(csms):
    await booted(csms, "CP-BIG-SC", connectors=1)
    profile = {"chargingProfileId": INT32_END, "stackLevel": INT32_END, "chargingProfilePurpose": "TxDefaultProfile",
               "chargingProfileKind": "Relative",
               "chargingSchedule": {"chargingRateUnit": "A", "duration": INT32_END,
                                    "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 16.0}]}}
    assert await generic_call(csms, "CP-BIG-SC", "SetChargingProfile",
                              {"connectorId": 0, "csChargingProfiles": profile}) == {"status": "Accepted"}
    status, body, _ = await api(csms, "GET", "/stations/CP-BIG-SC/charging-profiles")
    assert status == 200
    assert [(p["charging_profile_id"], p["stack_level"]) for p in body["items"]] == [(INT32_END, INT32_END)]


@pytest_twisted.ensureDeferred
async def test_local_list_versions_past_int32(csms):
    station = await booted(csms, "CP-BIG-LL")
    assert await generic_call(csms, "CP-BIG-LL", "SendLocalList", {
        "listVersion": INT32_END, "updateType": "Full",
        "localAuthorizationList": [{"idTag": "LL-1", "idTagInfo": {"status": "Accepted"}}]}) == {"status": "Accepted"}
    station.responses["GetLocalListVersion"] = {"listVersion": BIG}
    assert await generic_call(csms, "CP-BIG-LL", "GetLocalListVersion", {}) == {"listVersion": BIG}
    status, body, _ = await api(csms, "GET", "/stations/CP-BIG-LL/local-list")
    assert status == 200
    assert (body["acknowledged_version"], body["reported_version"]) == (INT32_END, BIG)


@pytest_twisted.ensureDeferred
async def test_trigger_and_firmware_integers_past_int32(csms):
    await booted(csms, "CP-BIG-FW")
    assert await generic_call(csms, "CP-BIG-FW", "TriggerMessage", {
        "requestedMessage": "StatusNotification", "connectorId": INT32_END}) == {"status": "Accepted"}
    assert await generic_call(csms, "CP-BIG-FW", "UpdateFirmware", {
        "location": "http://fw.example.com/fw.bin", "retrieveDate": station_time(clock_now(csms)),
        "retries": INT32_END, "retryInterval": INT32_END}) == {}
    assert await generic_call(csms, "CP-BIG-FW", "GetDiagnostics", {
        "location": "ftp://logs.example.com/", "retries": INT32_END, "retryInterval": INT32_END}) == {}

    def stored(conn):
        from csms_plugins.firmware.tables import diagnostics_requests, updates
        from csms_plugins.remotetrigger.tables import requests
        return (conn.execute(select(requests.c.connector_id)).scalars().all(),
                conn.execute(select(updates.c.retries, updates.c.retry_interval)).all(),
                conn.execute(select(diagnostics_requests.c.retries, diagnostics_requests.c.retry_interval)).all())
    triggers, firmware, diagnostics = await within(csms.app.db.run(stored))
    assert (triggers, [tuple(r) for r in firmware], [tuple(r) for r in diagnostics]) == (
        [INT32_END], [(INT32_END, INT32_END)], [(INT32_END, INT32_END)])
