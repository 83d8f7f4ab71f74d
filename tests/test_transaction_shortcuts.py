"""Transactions at stations with no reservation and no charging profile skip those profiles' database work.

Most starts and stops happen at such stations; the Reservation and Smart Charging plugins know it from
memory (live reservations have expiry timers; installed profiles were recorded by this process) and only
go to the database when there may be something to consume, bind or end.
"""
from __future__ import annotations

import pytest_twisted
from conftest import db_settled
from test_reservation_octt import id_tags  # noqa: F401  (the fixture)
from test_reservation_octt import STATION, VALID, booted, reserve, start_transaction, within

from csms_plugins.smartcharging.store import SmartChargingStore


def spy(monkeypatch, obj, name: str) -> list:
    """Record the calls of ``obj.name`` (which still runs)."""
    calls = []
    original = getattr(obj, name)

    def recorded(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)
    monkeypatch.setattr(obj, name, recorded)
    return calls


async def ready(csms):
    """Start-up reads done: reservation timers re-armed, stations with profiles known."""
    await within(csms.app.pm.get_plugin("reservation").timers.ready)
    await within(db_settled(csms.app))
    assert csms.app.pm.get_plugin("smartcharging").store._with_profiles is not None


@pytest_twisted.ensureDeferred
async def test_start_and_stop_at_a_plain_station_do_no_reservation_or_profile_work(csms, id_tags, monkeypatch):
    await ready(csms)
    consumed = spy(monkeypatch, csms.app.pm.get_plugin("reservation").store, "consume")
    smart = csms.app.pm.get_plugin("smartcharging").store
    bound, ended = spy(monkeypatch, smart, "bind_transaction"), spy(monkeypatch, smart, "end_transaction")
    station = await booted(csms)
    started = await within(start_transaction(csms, station))
    assert started["idTagInfo"]["status"] == "Accepted"
    stopped = await within(station.call("StopTransaction", {
        "transactionId": started["transactionId"], "meterStop": 10, "timestamp": "2030-01-01T00:00:00.000Z"}))
    assert "idTagInfo" in stopped or stopped == {}
    assert (consumed, bound, ended) == ([], [], [])


@pytest_twisted.ensureDeferred
async def test_a_live_reservation_makes_the_start_consume_it(csms, id_tags, monkeypatch):
    await ready(csms)
    timers = csms.app.pm.get_plugin("reservation").timers
    consumed = spy(monkeypatch, csms.app.pm.get_plugin("reservation").store, "consume")
    station = await booted(csms)
    assert timers.none_live_at(STATION)
    _, body, _, _ = await reserve(csms, station, connector_id=1, id_tag=VALID)
    await within(db_settled(csms.app))
    assert not timers.none_live_at(STATION)
    await within(start_transaction(csms, station))  # no reservationId: matched by its id tag
    assert len(consumed) == 1
    await within(db_settled(csms.app))
    status, row, _ = await within(csms.api("GET", f"/stations/{STATION}/reservations/{body['reservation_id']}"))
    assert (status, row["state"]) == (200, "consumed")
    assert timers.none_live_at(STATION)


@pytest_twisted.ensureDeferred
async def test_a_start_quoting_a_reservation_id_always_consults_the_store(csms, id_tags, monkeypatch):
    await ready(csms)
    consumed = spy(monkeypatch, csms.app.pm.get_plugin("reservation").store, "consume")
    station = await booted(csms)
    await within(start_transaction(csms, station, reservationId=4242))  # unknown: recorded as an event
    assert len(consumed) == 1


def test_reservation_timers_count_live_reservations_per_station():
    from datetime import datetime, timedelta, timezone

    from twisted.internet import task

    from csms_plugins.reservation.plugin import ExpiryTimers

    class App:
        clock = task.Clock()

        def now(self):
            return datetime.fromtimestamp(self.clock.seconds(), tz=timezone.utc)

    class Plugin:
        app = App()

    timers = ExpiryTimers(Plugin())
    assert not timers.none_live_at("A")  # nothing re-armed yet: unknown
    timers.rearmed = True
    expiry = Plugin.app.now() + timedelta(seconds=60)
    timers.arm({"record_id": 1, "station_id": "A", "expiry_date": expiry})
    timers.arm({"record_id": 2, "station_id": "A", "expiry_date": expiry})
    timers.arm({"record_id": 2, "station_id": "A", "expiry_date": expiry})  # re-armed: still one
    assert not timers.none_live_at("A") and timers.none_live_at("B")
    timers.disarm(1)
    assert not timers.none_live_at("A")
    timers.disarm(2)
    assert timers.none_live_at("A")
    assert timers.live == {} and timers.stations == {}


@pytest_twisted.ensureDeferred
async def test_stations_with_profiles_are_known_after_start_up_and_marked_when_installed(database_url):
    from twisted.internet import reactor, task

    from csms.db import Database
    from csms_plugins.smartcharging.tables import metadata

    from datetime import datetime, timezone

    now = datetime(2030, 1, 1, tzinfo=timezone.utc)
    db = Database(database_url, reactor)
    db.start()
    try:
        db.run_sync(lambda conn: metadata.create_all(conn))
        store = SmartChargingStore(db, task.Clock())
        assert store.may_have_profiles("CP-1")  # not read yet: ask the database
        profile = {"chargingProfileId": 1, "stackLevel": 0, "chargingProfilePurpose": "TxDefaultProfile",
                   "chargingProfileKind": "Absolute", "chargingSchedule": {
                       "chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 16}]}}
        await store.record_sent("CP-1", 1, profile, "SetChargingProfile", "Accepted", None, now).addTimeout(10, reactor)
        await store.record_sent("CP-2", 1, profile, "SetChargingProfile", "Rejected", None, now).addTimeout(10, reactor)
        fresh = SmartChargingStore(db, task.Clock())  # as after a restart
        assert await fresh.load_stations_with_profiles().addTimeout(10, reactor) == 1
        assert fresh.may_have_profiles("CP-1")
        assert not fresh.may_have_profiles("CP-2") and not fresh.may_have_profiles("CP-3")
        await fresh.record_sent("CP-3", 1, profile, "SetChargingProfile", "Accepted", None, now).addTimeout(10, reactor)
        assert fresh.may_have_profiles("CP-3")
    finally:
        db.stop()

