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
from conftest import booted, clock_now, core_store, station_time, within
from sqlalchemy import BigInteger, Integer, select
from sqlalchemy.dialects import postgresql
from test_core import Probe, put_tags, start_payload, stop_payload, table_rows
from twisted.internet import defer

from csms_plugins.core import tables as core_tables

INT32_END = 2 ** 31          # the first integer a PostgreSQL INTEGER cannot hold
BIG = 2 ** 40                # a meter register of about 1.1 TWh, in Wh
TRIES = 30                   # bounded tries of each race


def api(csms, method, path, json=None):
    return within(csms.api(method, path, json=json))


def one_sample(csms, value: str) -> list:
    """A MeterValues ``meterValue`` list: one Energy.Active.Import.Register reading, taken now."""
    return [{"timestamp": station_time(clock_now(csms)), "sampledValue": [{"value": value}]}]


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

    # The built-in plugins' tables: a vendor plugin installed beside them (examples/acme-plugin) has its own.
    plugins = [plugin.load()() for plugin in available_plugins().values()
               if plugin.dist is not None and plugin.dist.name == "csms"]
    metadatas = [framework] + [plugin.csms_tables() for plugin in plugins if hasattr(plugin, "csms_tables")]
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
        assert started["idTagInfo"]["status"] == "Accepted"
        assert await station.call("MeterValues", {"connectorId": connector_id, "transactionId": transaction_id,
                                                  "meterValue": one_sample(csms, str(meter_start))}) == {}
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
async def test_largest_connector_id_and_reservation_ids_past_int32(csms):
    """A connector id goes up to OCPP's largest integer, 2^31-1 (past it the schema check refuses it: see
    test_bad_input); a reservation id past 2^31 is stored."""
    await put_tags(csms, "BIG-IDS")
    station = await booted(csms, "CP-BIG-IDS")
    largest = INT32_END - 1
    assert await station.status(largest, "Available") == {}
    assert largest in await core_store(csms).connector_ids("CP-BIG-IDS")
    started = await station.call("StartTransaction", start_payload(csms, connector_id=largest, id_tag="BIG-IDS",
                                                                   reservationId=INT32_END))
    stored = await core_store(csms).get_transaction(started["transactionId"])
    assert (stored["connector_id"], stored["reservation_id"]) == (largest, INT32_END)
    # MeterValues naming a transaction id no transaction has: kept, linked to none.
    assert await station.call("MeterValues", {"connectorId": largest, "transactionId": BIG,
                                              "meterValue": one_sample(csms, "1")}) == {}
    samples = await table_rows(csms, core_tables.meter_values, station_id="CP-BIG-IDS")
    assert [(s["connector_id"], s["transaction_id"]) for s in samples] == [(largest, None)]


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
    assert await station.call("MeterValues", {"connectorId": 1, "transactionId": transaction_id,
                                              "meterValue": one_sample(csms, "5")}) == {}
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


# -- ConcurrentTx decided atomically; a resent start gets its transaction id -----------------------------


def statuses_of(answers) -> list[str]:
    return sorted(answer["idTagInfo"]["status"] for answer in answers)


@pytest_twisted.ensureDeferred
async def test_two_stations_starting_with_one_tag_at_once_get_one_accepted(csms):
    """Each try: a fresh Accepted tag, presented at two stations in the same instant."""
    tags = [f"RACE-{i:02}" for i in range(TRIES)]
    await put_tags(csms, *tags)
    stations = [await booted(csms, "CP-RACE-A"), await booted(csms, "CP-RACE-B")]
    lost = []
    for tag in tags:
        answers = await within(defer.gatherResults(
            [station.call("StartTransaction", start_payload(csms, id_tag=tag)) for station in stations]))
        if statuses_of(answers) != ["Accepted", "ConcurrentTx"]:
            lost.append((tag, statuses_of(answers)))
    assert lost == [], f"{len(lost)} of {TRIES} tries"


@pytest_twisted.ensureDeferred
async def test_starts_queued_together_get_one_accepted_per_tag_whatever_commits_them(csms):
    """Forty starts of two tags, from forty stations, queued in one go: group commits on SQLite's single
    thread, and on PostgreSQL's several threads, whose batches take the two tags' locks in either order
    (a deadlock is rolled back and run again)."""
    await put_tags(csms, "GROUP-A", "GROUP-B")
    store = core_store(csms)
    info = {"status": "Accepted"}
    results = await within(defer.gatherResults([
        store.start_transaction(f"CP-GROUP-{i:02}", start_payload(csms, id_tag=("GROUP-A", "GROUP-B")[i % 2]), info)
        for i in range(40)]), 30)
    accepted = sorted(t["id_tag"] for t, created in results if created and t["id_tag_status"] == "Accepted")
    assert accepted == ["GROUP-A", "GROUP-B"]
    assert sorted({t["id_tag_status"] for t, _ in results}) == ["Accepted", "ConcurrentTx"]


@pytest.mark.parametrize("concurrent_tx_check", ["true", "false"])
@pytest_twisted.ensureDeferred
async def test_start_resent_on_a_new_connection_while_the_first_is_in_flight_gets_the_same_id(
        csms_factory, concurrent_tx_check):
    """Each try: a start sent on one connection, and resent at once on the connection that replaces it
    (the first answer is lost with its connection, or arrives: either way it names the same id). Without
    the ConcurrentTx check no tag is locked: the insert itself must give way."""
    csms = await csms_factory(config_text=f"[plugin:core]\nconcurrent_tx_check = {concurrent_tx_check}\n")
    station_id = "CP-RESEND"
    tags = [f"RESEND-{i:02}" for i in range(TRIES)]
    await put_tags(csms, *tags)
    await (await booted(csms, station_id)).close()
    lost = []
    for i, tag in enumerate(tags):
        payload = start_payload(csms, id_tag=tag, meter_start=i)
        old = await within(csms.connect(station_id))
        first_copy = old.call_frame("StartTransaction", payload).addErrback(lambda _: None)  # lost with `old`
        new = await within(csms.connect(station_id))
        frame = await new.call_frame("StartTransaction", payload)
        first = await within(first_copy)
        rows = await table_rows(csms, core_tables.transactions, station_id=station_id, id_tag=tag)
        ids = {frame[2].get("transactionId") if frame[0] == 3 else frame[2]} | (
            {first[2]["transactionId"]} if first is not None and first[0] == 3 else set())
        stored = [row["id"] for row in rows]
        if len(stored) != 1 or ids != set(stored):
            lost.append((tag, ids, stored))
        await new.close()
    assert lost == [], f"{len(lost)} of {TRIES} tries"


# -- a start that was not Accepted holds no tag; a later boot closes it ------------------------------------


@pytest.fixture
def probe():
    return Probe()


@pytest.fixture
def probed(csms_factory, probe):
    """A CSMS whose Core events a Probe records."""
    return pytest_twisted.blockon(defer.ensureDeferred(csms_factory(extra_plugins=[probe])))


async def tag_status_at(csms, station_id: str, id_tag: str) -> dict:
    """What a third station hears for ``id_tag``: Authorize, then a StartTransaction (connector 1)."""
    station = await booted(csms, station_id)
    authorized = (await station.call("Authorize", {"idTag": id_tag}))["idTagInfo"]["status"]
    started = (await station.call("StartTransaction", start_payload(csms, id_tag=id_tag)))["idTagInfo"]["status"]
    return {"Authorize": authorized, "StartTransaction": started}


@pytest_twisted.ensureDeferred
async def test_a_start_answered_concurrent_tx_and_never_stopped_does_not_hold_the_tag(csms):
    await put_tags(csms, "HELD")
    holder, refused = await booted(csms, "CP-HOLDER"), await booted(csms, "CP-REFUSED")
    held = await holder.call("StartTransaction", start_payload(csms, id_tag="HELD"))
    assert held["idTagInfo"]["status"] == "Accepted"
    assert (await refused.call("StartTransaction", start_payload(csms, id_tag="HELD")))["idTagInfo"]["status"] == \
        "ConcurrentTx"
    # The holder stops; the refused station never sends its StopTransaction.
    assert await holder.call("StopTransaction", stop_payload(csms, held["transactionId"])) == {}
    assert await tag_status_at(csms, "CP-THIRD", "HELD") == {"Authorize": "Accepted", "StartTransaction": "Accepted"}


@pytest.mark.parametrize("refused_as", ["Blocked", "Invalid", "Expired"])
@pytest_twisted.ensureDeferred
async def test_a_start_refused_for_its_tag_and_never_stopped_does_not_hold_the_tag(csms, refused_as):
    expiry = clock_now(csms) - timedelta(days=1) if refused_as == "Expired" else None
    if refused_as != "Invalid":  # Invalid: the CSMS does not know the tag yet
        await put_tags(csms, ("LATER-OK", "Accepted" if refused_as == "Expired" else refused_as, expiry))
    station = await booted(csms, "CP-REFUSED")
    answer = await station.call("StartTransaction", start_payload(csms, id_tag="LATER-OK"))
    assert answer["idTagInfo"]["status"] == refused_as
    await put_tags(csms, "LATER-OK")  # an operator accepts the tag; the station never stops the refused start
    assert await tag_status_at(csms, "CP-THIRD", "LATER-OK") == {
        "Authorize": "Accepted", "StartTransaction": "Accepted"}


@pytest_twisted.ensureDeferred
async def test_a_refused_start_does_not_mark_its_tag_charging_in_the_id_tag_cache(csms):
    """The cache's notion of an open transaction follows the same rule: a start another plugin refused at
    one station leaves a tag the Core plugin accepts free."""
    await put_tags(csms, "CACHED")
    store = core_store(csms)
    assert await within(store.id_tag_info("CACHED", check_concurrent=True)) == {"status": "Accepted"}  # cached
    await within(store.start_transaction("CP-ROAMING", start_payload(csms, id_tag="CACHED"), {"status": "Invalid"}))
    assert await within(store.id_tag_info("CACHED", check_concurrent=True)) == {"status": "Accepted"}


@pytest_twisted.ensureDeferred
async def test_a_boot_closes_the_refused_starts_of_that_station_and_fires_their_stop(probed, probe):
    csms = probed
    await put_tags(csms, "HELD", "OWN", ("BLOCKED", "Blocked"))
    holder = await booted(csms, "CP-HOLDER")
    await holder.call("StartTransaction", start_payload(csms, id_tag="HELD"))
    station = await booted(csms, "CP-REBOOT", connectors=3)
    concurrent = await station.call("StartTransaction", start_payload(csms, connector_id=1, id_tag="HELD"))
    blocked = await station.call("StartTransaction", start_payload(csms, connector_id=2, id_tag="BLOCKED"))
    accepted = await station.call("StartTransaction", start_payload(csms, connector_id=3, id_tag="OWN"))
    csms.clock.advance(60)
    boot = await station.call("BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"})
    assert boot["status"] == "Accepted"

    store = core_store(csms)
    closed = [await store.get_transaction(answer["transactionId"]) for answer in (concurrent, blocked)]
    assert [(t["active"], t["stopped_by"], t["stop_reason"], t["stopped_at"], t["meter_stop"]) for t in closed] == [
        (False, "boot", "Reboot", clock_now(csms), None)] * 2
    assert (await store.get_transaction(accepted["transactionId"]))["active"] is True  # its station will stop it
    assert [(e["station_id"], e["transaction"]["transaction_id"], e["request"]) for e in probe.of("stopped")] == [
        ("CP-REBOOT", t["transaction_id"], {"transactionId": t["transaction_id"], "meterStop": t["meter_start"],
                                            "timestamp": station_time(clock_now(csms)), "reason": "Reboot"})
        for t in closed]

    # The station's own StopTransaction comes after all: its values replace the boot's; no second event.
    late = stop_payload(csms, concurrent["transactionId"], meter_stop=1234, reason="DeAuthorized")
    assert await station.call("StopTransaction", late) == {}
    stopped = await store.get_transaction(concurrent["transactionId"])
    assert (stopped["stopped_by"], stopped["stop_reason"], stopped["meter_stop"]) == ("station", "DeAuthorized", 1234)
    assert len(probe.of("stopped")) == 2
    # A second boot closes nothing more.
    await station.call("BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"})
    assert len(probe.of("stopped")) == 2


# -- MeterValues are stored once ------------------------------------------------------------------------------


def sample_rows(csms, station_id: str):
    return table_rows(csms, core_tables.meter_values, station_id=station_id)


def sample_keys(rows) -> list[tuple]:
    return sorted((r["transaction_id"] or 0, r["timestamp"], r["measurand"], r["phase"] or "", r["context"], r["value"])
                  for r in rows)


def meter_values_payload(connector_id: int, transaction_id, at) -> dict:
    """Two timestamps; per timestamp a register with no phase, a per-phase current and a clock-aligned copy."""
    return {"connectorId": connector_id, **({"transactionId": transaction_id} if transaction_id else {}),
            "meterValue": [{"timestamp": station_time(at + timedelta(minutes=minute)), "sampledValue": [
                {"value": f"{1000 + minute}"},
                {"value": f"{1000 + minute}", "context": "Sample.Clock"},
                {"value": "16.0", "measurand": "Current.Import", "phase": "L1", "unit": "A"},
                {"value": "15.5", "measurand": "Current.Import", "phase": "L2", "unit": "A"}]}
                for minute in (0, 1)]}


@pytest.mark.parametrize("in_transaction", [True, False], ids=["transaction", "no-transaction"])
@pytest_twisted.ensureDeferred
async def test_meter_values_resent_are_stored_once_and_their_event_fires_again(probed, probe, in_transaction):
    csms = probed
    await put_tags(csms, "METERED")
    station = await booted(csms, "CP-METER")
    transaction_id = None
    if in_transaction:
        started = await station.call("StartTransaction", start_payload(csms, id_tag="METERED"))
        transaction_id = started["transactionId"]
    payload = meter_values_payload(1, transaction_id, clock_now(csms))
    assert await station.call("MeterValues", payload) == {}
    once = sample_keys(await sample_rows(csms, "CP-METER"))
    assert len(once) == 8
    # The answer was lost: the same request again, on the same connection, then after a reconnect.
    assert await station.call("MeterValues", payload) == {}
    await station.close()
    station = await csms.connect("CP-METER")
    assert await station.call("MeterValues", payload) == {}
    assert sample_keys(await sample_rows(csms, "CP-METER")) == once
    # Each copy was answered after its (nothing new) commit, and told to listeners: at least once.
    assert [e["transaction_id"] for e in probe.of("meter_values")] == [transaction_id] * 3


@pytest_twisted.ensureDeferred
async def test_copies_of_meter_values_in_one_group_commit_are_stored_once(csms):
    """Copies in flight at the same moment (a new connection's resend and the old one's) share a commit."""
    stations = [await booted(csms, "CP-COPY"), await booted(csms, "CP-OTHER")]
    payload = meter_values_payload(1, None, clock_now(csms))
    answers = await within(defer.gatherResults(
        [stations[0].call("MeterValues", payload) for _ in range(3)] + [stations[1].call("MeterValues", payload)]))
    assert answers == [{}] * 4
    assert len(await sample_rows(csms, "CP-COPY")) == 8
    assert len(await sample_rows(csms, "CP-OTHER")) == 8  # another station's identical samples are its own


@pytest_twisted.ensureDeferred
async def test_stop_transaction_data_repeating_samples_is_stored_once(csms):
    await put_tags(csms, "STOPDATA")
    station = await booted(csms, "CP-STOPDATA")
    transaction_id = (await station.call("StartTransaction", start_payload(csms, id_tag="STOPDATA")))["transactionId"]
    at = clock_now(csms)
    sent = meter_values_payload(1, transaction_id, at)
    assert await station.call("MeterValues", sent) == {}
    end = {"timestamp": station_time(at + timedelta(minutes=2)),
           "sampledValue": [{"value": "1002", "context": "Transaction.End"}]}
    stop = stop_payload(csms, transaction_id, meter_stop=1002, transactionData=sent["meterValue"] + [end])
    assert await station.call("StopTransaction", stop) == {}
    assert await station.call("StopTransaction", stop) == {}  # retransmitted
    rows = await sample_rows(csms, "CP-STOPDATA")
    assert len(rows) == 9
    assert [r["value"] for r in rows if r["context"] == "Transaction.End"] == ["1002"]
    # A stop for a transaction the CSMS does not know, resent: kept once, its samples once.
    unknown = stop_payload(csms, BIG, transactionData=[end])
    for _ in range(2):
        assert await station.call("StopTransaction", unknown) == {}
    assert len(await table_rows(csms, core_tables.unmatched_stops, station_id="CP-STOPDATA")) == 1
    assert len(await sample_rows(csms, "CP-STOPDATA")) == 10


# -- the other profiles' stores ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reservations_made_at_the_same_moment_get_distinct_ids(csms):
    """Each try: two operators reserve at once (at two stations); the allocator hands out two ids."""
    await put_tags(csms, "RSV-RACE")
    await booted(csms, "CP-RSV-A")
    await booted(csms, "CP-RSV-B")
    expiry = station_time(clock_now(csms) + timedelta(hours=1))
    body = {"connector_id": 1, "expiry_date": expiry, "id_tag": "RSV-RACE"}
    clashes = []
    for _ in range(TRIES):
        answers = await within(defer.gatherResults(
            [defer.ensureDeferred(csms.api("POST", f"/stations/{station_id}/reservations", json=body))
             for station_id in ("CP-RSV-A", "CP-RSV-B")]))
        assert [status for status, _, _ in answers] == [201, 201]
        ids = [answer["reservation_id"] for _, answer, _ in answers]
        if ids[0] == ids[1]:
            clashes.append(ids)
    assert clashes == [], f"{len(clashes)} of {TRIES} tries"


@pytest_twisted.ensureDeferred
async def test_local_lists_answered_back_to_back_are_all_recorded(csms):
    """Each try: three SendLocalList naming the same id tags go to one station at once; the station
    answers each as it comes, so the CSMS records an answer while it records the one before."""
    await booted(csms, "CP-LL")
    entries = [{"idTag": f"LL-{i:02}", "idTagInfo": {"status": "Accepted"}} for i in range(10)]
    failed = []
    for version in range(1, TRIES + 1):
        payload = {"listVersion": version, "updateType": "Differential", "localAuthorizationList": entries}
        answers = await within(defer.gatherResults(
            [defer.ensureDeferred(csms.api("POST", "/stations/CP-LL/calls/SendLocalList", json=payload))
             for _ in range(3)]))
        if [status for status, _, _ in answers] != [200] * 3:
            failed.append([body for _, body, _ in answers])
    assert failed == [], f"{len(failed)} of {TRIES} tries"
    # A listener's failure is logged, not answered: what was recorded tells.
    _, updates, _ = await api(csms, "GET", "/stations/CP-LL/local-list/updates?limit=1")
    assert updates["total"] == 3 * TRIES
    _, state, _ = await api(csms, "GET", "/stations/CP-LL/local-list")
    assert (state["acknowledged_version"], state["last_status"]) == (TRIES, "Accepted")


@pytest_twisted.ensureDeferred
async def test_charging_profiles_answered_back_to_back_leave_one_installed_per_slot(csms):
    """Each try: three SetChargingProfile for the same connector, purpose and stack level go to one station
    at once; each replaces the one before (OCPP 1.6 §5.15), so the record holds the one answered last alone."""
    station = await booted(csms, "CP-SC-RACE", connectors=1)
    wrong = []
    for attempt in range(TRIES):
        ids = [attempt * 3 + n + 1 for n in range(3)]
        profiles = [{"chargingProfileId": profile_id, "stackLevel": 1, "chargingProfilePurpose": "TxDefaultProfile",
                     "chargingProfileKind": "Relative", "chargingSchedule": {
                         "chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 16.0}]}}
                    for profile_id in ids]
        answers = await within(defer.gatherResults(
            [defer.ensureDeferred(csms.api("POST", "/stations/CP-SC-RACE/calls/SetChargingProfile",
                                           json={"connectorId": 1, "csChargingProfiles": profile}))
             for profile in profiles]))
        assert [status for status, _, _ in answers] == [200] * 3
        _, body, _ = await api(csms, "GET", "/stations/CP-SC-RACE/charging-profiles?state=installed")
        installed = [p["charging_profile_id"] for p in body["items"]]
        answered_last = station.received_calls[-1][3]["csChargingProfiles"]["chargingProfileId"]
        if installed != [answered_last]:
            wrong.append(installed)
    assert wrong == [], f"{len(wrong)} of {TRIES} tries"
