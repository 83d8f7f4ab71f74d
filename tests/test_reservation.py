"""The Reservation plugin beyond the OCTT cases: refusals, id allocation, the generic calls endpoint,
consumption rules, bad input from stations, expiry timers across a restart, and the `ocpp` package's
ChargePoint as a peer."""
from __future__ import annotations

import pytest
import pytest_twisted
from conftest import core_store, db_settled
from twisted.internet import defer

from test_reservation_octt import (GROUP, MEMBER_1, MEMBER_2, VALID, booted, calls_sent, clock_now, live, reservation,
                                   reserve, start_transaction, station_time, within)

STATION = "RSV-1"
OTHER = "OTHER-TAG-01"


@pytest.fixture
def csms(csms_factory):
    return pytest_twisted.blockon(defer.ensureDeferred(csms_factory(plugins=["core", "reservation"])))


@pytest.fixture
def id_tags(csms):
    store = core_store(csms)
    for args in ((VALID, "Accepted"), (GROUP, "Accepted"), (MEMBER_1, "Accepted", None, GROUP),
                 (MEMBER_2, "Accepted", None, GROUP), (OTHER, "Accepted")):
        assert pytest_twisted.blockon(store.put_id_tag(*args)) is True


async def api(csms, method, path, json=None):
    status, body, _ = await within(csms.api(method, path, json=json))
    return status, body


async def all_reservations(csms, query: str = "") -> dict:
    status, body = await api(csms, "GET", "/reservations" + query)
    assert status == 200
    return body


def future(csms, seconds: float = 3600) -> str:
    from datetime import timedelta
    return station_time(clock_now(csms) + timedelta(seconds=seconds))


# -- refused up front ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reserve_refuses_what_cannot_work_and_writes_nothing(csms, id_tags):
    station = await booted(csms, STATION, connectors=2)
    path = f"/stations/{STATION}/reservations"
    body = {"connector_id": 1, "expiry_date": future(csms), "id_tag": VALID}

    status, error = await api(csms, "POST", "/stations/NOPE/reservations", body)
    assert (status, error["error"]["code"]) == (404, "station_not_found")

    status, error = await api(csms, "POST", path, dict(body, expiry_date=station_time(clock_now(csms))))
    assert (status, error["error"]["code"]) == (422, "expiry_in_past")

    status, error = await api(csms, "POST", path, dict(body, expiry_date="tomorrow"))
    assert (status, error["error"]["code"]) == (422, "validation_failed")  # the body's date-time format

    status, error = await api(csms, "POST", path, dict(body, connector_id=3))
    assert (status, error["error"]["code"], error["error"]["details"]) == (422, "unknown_connector",
                                                                           {"connector_ids": [1, 2]})

    status, error = await api(csms, "POST", path, dict(body, connector_id=-1))
    assert status == 422

    status, error = await api(csms, "POST", path, dict(body, id_tag="X" * 21))
    assert status == 422

    started = await start_transaction(csms, station, 2, VALID)
    status, error = await api(csms, "POST", path, dict(body, connector_id=2))
    assert (status, error["error"]["code"]) == (409, "connector_in_transaction")
    assert error["error"]["details"] == {"transaction_id": started["transactionId"]}

    status, _ = await api(csms, "POST", "/stations", {"id": "OFFLINE-1"})
    assert status == 201
    status, error = await api(csms, "POST", "/stations/OFFLINE-1/reservations", body)
    assert (status, error["error"]["code"]) == (409, "station_offline")

    assert calls_sent(station) == []
    assert (await all_reservations(csms))["total"] == 0


@pytest_twisted.ensureDeferred
async def test_station_wide_reservation_is_allowed_while_a_connector_charges(csms, id_tags):
    station = await booted(csms, STATION, connectors=2)
    await start_transaction(csms, station, 1, OTHER)
    status, body, request, _ = await reserve(csms, station, connector_id=0, id_tag=VALID, station_id=STATION)
    assert (status, body["status"], request["connectorId"]) == (201, "Accepted", 0)


@pytest_twisted.ensureDeferred
async def test_station_errors_are_recorded_as_failed(csms, id_tags):
    station = await booted(csms, STATION)
    station.responses["ReserveNow"] = ("CALLERROR", "InternalError", "boom")
    status, error = await api(csms, "POST", f"/stations/{STATION}/reservations",
                              {"connector_id": 1, "expiry_date": future(csms), "id_tag": VALID})
    assert (status, error["error"]["code"]) == (502, "station_call_error")
    reservation_id = error["error"]["details"]["reservation_id"]
    row = await reservation(csms, STATION, reservation_id)
    assert (row["state"], row["status"], row["active"]) == ("failed", None, False)
    assert row["error"].startswith("station_call_error: ")


# -- ids ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reservation_ids_are_allocated_increasing_and_skip_operator_chosen_ones(csms, id_tags):
    station = await booted(csms, STATION, connectors=2)
    _, first, _, _ = await reserve(csms, station, 1, VALID, station_id=STATION)
    _, second, _, _ = await reserve(csms, station, 2, VALID, station_id=STATION)
    assert second["reservation_id"] == first["reservation_id"] + 1

    status, answer = await api(csms, "POST", f"/stations/{STATION}/calls/ReserveNow", {
        "connectorId": 0, "expiryDate": future(csms), "idTag": OTHER, "reservationId": 500})
    assert (status, answer) == (200, {"status": "Accepted"})
    _, third, _, _ = await reserve(csms, station, 1, OTHER, station_id=STATION)
    assert third["reservation_id"] == 501


# -- the generic calls endpoint is tracked too --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_generic_calls_are_recorded_and_a_duplicate_id_replaces_the_live_one(csms, id_tags):
    await booted(csms, STATION, connectors=2)
    expiry = future(csms)
    status, answer = await api(csms, "POST", f"/stations/{STATION}/calls/ReserveNow", {
        "connectorId": 1, "expiryDate": expiry, "idTag": VALID, "reservationId": 77})
    assert (status, answer) == (200, {"status": "Accepted"})
    row = await reservation(csms, STATION, 77)
    assert (row["source"], row["status"], row["state"], row["connector_id"], row["id_tag"], row["expiry_date"]) == \
        ("call", "Accepted", "active", 1, VALID, expiry)

    # The same id again, for another connector: the station replaces its reservation (OCPP 1.6 §5.13).
    status, answer = await api(csms, "POST", f"/stations/{STATION}/calls/ReserveNow", {
        "connectorId": 2, "expiryDate": expiry, "idTag": OTHER, "reservationId": 77})
    assert (status, answer) == (200, {"status": "Accepted"})
    listing = await all_reservations(csms, f"?station_id={STATION}")
    assert [(r["reservation_id"], r["connector_id"], r["state"]) for r in listing["items"]] == \
        [(77, 2, "active"), (77, 1, "replaced")]
    status, events = await api(csms, "GET", "/reservation-events")
    assert [(e["reservation_id"], e["event"]) for e in events["items"]] == [(77, "replaced")]

    status, answer = await api(csms, "POST", f"/stations/{STATION}/calls/CancelReservation", {"reservationId": 77})
    assert (status, answer) == (200, {"status": "Accepted"})
    row = await reservation(csms, STATION, 77)
    assert (row["connector_id"], row["state"], row["cancel_status"]) == (2, "cancelled", "Accepted")
    assert await live(csms, STATION) == []


# -- consumption ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_start_without_reservation_id_consumes_by_id_tag_on_that_connector(csms, id_tags):
    station = await booted(csms, STATION, connectors=2)
    _, on_one, _, _ = await reserve(csms, station, 1, VALID, station_id=STATION)
    _, on_two, _, _ = await reserve(csms, station, 2, VALID, station_id=STATION)
    started = await start_transaction(csms, station, 2, VALID)
    assert (await reservation(csms, STATION, on_two["reservation_id"]))["transaction_id"] == started["transactionId"]
    assert await live(csms, STATION) == [on_one["reservation_id"]]


@pytest_twisted.ensureDeferred
async def test_a_station_wide_reservation_is_consumed_on_any_connector_by_the_group(csms, id_tags):
    station = await booted(csms, STATION, connectors=2)
    _, whole, _, _ = await reserve(csms, station, 0, MEMBER_1, station_id=STATION)
    assert whole["parent_id_tag"] == GROUP
    unrelated = await start_transaction(csms, station, 1, OTHER)
    assert unrelated["idTagInfo"] == {"status": "Accepted"}
    assert await live(csms, STATION) == [whole["reservation_id"]]
    started = await start_transaction(csms, station, 2, MEMBER_2)
    row = await reservation(csms, STATION, whole["reservation_id"])
    assert (row["state"], row["transaction_id"]) == ("consumed", started["transactionId"])


@pytest_twisted.ensureDeferred
async def test_a_start_with_an_invalid_tag_consumes_nothing(csms, id_tags):
    station = await booted(csms, STATION)
    _, body, _, _ = await reserve(csms, station, 1, VALID, station_id=STATION)
    started = await start_transaction(csms, station, 1, "NOT-KNOWN", reservationId=body["reservation_id"])
    assert started["idTagInfo"] == {"status": "Invalid"}
    assert await live(csms, STATION) == [body["reservation_id"]]
    _, events = await api(csms, "GET", "/reservation-events")
    assert [(e["reservation_id"], e["event"]) for e in events["items"]] == \
        [(body["reservation_id"], "start_not_accepted")]


@pytest_twisted.ensureDeferred
async def test_reused_and_unknown_reservation_ids_at_start_are_recorded(csms, id_tags):
    station = await booted(csms, STATION, connectors=2)
    _, body, _, _ = await reserve(csms, station, 1, VALID, station_id=STATION)
    reservation_id = body["reservation_id"]
    first = await start_transaction(csms, station, 1, VALID, reservationId=reservation_id)
    # The same reservation id again: the transaction is answered as usual and the reuse is recorded.
    second = await start_transaction(csms, station, 2, OTHER, reservationId=reservation_id)
    assert second["idTagInfo"] == {"status": "Accepted"}
    third = await start_transaction(csms, station, 2, MEMBER_1, reservationId=9999, meterStart=5)
    assert third["idTagInfo"] == {"status": "Accepted", "parentIdTag": GROUP}
    row = await reservation(csms, STATION, reservation_id)
    assert (row["state"], row["transaction_id"]) == ("consumed", first["transactionId"])
    _, events = await api(csms, "GET", f"/reservation-events?station_id={STATION}")
    assert [(e["reservation_id"], e["event"]) for e in events["items"]] == \
        [(9999, "unknown_reservation_id"), (reservation_id, "reservation_not_live")]
    assert f"consumed reservation (transaction {first['transactionId']})" in events["items"][1]["detail"]


# -- cancel -----------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cancel_of_a_known_reservation_the_station_rejects_keeps_it_live(csms, id_tags):
    station = await booted(csms, STATION)
    _, body, _, _ = await reserve(csms, station, 1, VALID, station_id=STATION)
    station.responses["CancelReservation"] = {"status": "Rejected"}
    status, answer = await api(csms, "POST", f"/stations/{STATION}/reservations/{body['reservation_id']}/cancel")
    assert (status, answer["status"], answer["known"]) == (200, "Rejected", True)
    assert (answer["reservation"]["state"], answer["reservation"]["cancel_status"]) == ("active", "Rejected")


@pytest_twisted.ensureDeferred
async def test_cancel_path_errors(csms, id_tags):
    await booted(csms, STATION)
    status, error = await api(csms, "POST", "/stations/NOPE/reservations/1/cancel")
    assert (status, error["error"]["code"]) == (404, "station_not_found")
    status, error = await api(csms, "POST", f"/stations/{STATION}/reservations/abc/cancel")
    assert (status, error["error"]["code"]) == (404, "reservation_not_found")
    status, error = await api(csms, "GET", f"/stations/{STATION}/reservations/5")
    assert (status, error["error"]["code"]) == (404, "reservation_not_found")


# -- listing ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_live_reservations_listed_per_station_and_globally(csms, id_tags):
    one = await booted(csms, "RSV-A")
    two = await booted(csms, "RSV-B")
    _, a, _, _ = await reserve(csms, one, 1, VALID, station_id="RSV-A")
    two.responses["ReserveNow"] = {"status": "Occupied"}
    _, b, _, _ = await reserve(csms, two, 1, VALID, station_id="RSV-B")
    two.responses["ReserveNow"] = {"status": "Accepted"}
    _, c, _, _ = await reserve(csms, two, 0, OTHER, station_id="RSV-B")

    everything = await all_reservations(csms)
    assert [r["reservation_id"] for r in everything["items"]] == [c["reservation_id"], b["reservation_id"],
                                                                 a["reservation_id"]]
    active = await all_reservations(csms, "?active=true")
    assert [r["reservation_id"] for r in active["items"]] == [c["reservation_id"], a["reservation_id"]]
    only_b = await all_reservations(csms, "?station_id=RSV-B&active=true")
    assert (only_b["total"], only_b["items"][0]["reservation_id"]) == (1, c["reservation_id"])
    refused = await all_reservations(csms, "?state=refused")
    assert [r["reservation_id"] for r in refused["items"]] == [b["reservation_id"]]
    assert await live(csms, "RSV-B") == [c["reservation_id"]]
    status, _ = await api(csms, "GET", "/stations/NOPE/reservations")
    assert status == 404


# -- expiry timers -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_expiry_timers_are_rearmed_after_a_restart(csms_factory):
    from twisted.internet import task

    clock = task.Clock()
    clock.advance(1_700_000_000)
    first = await csms_factory(plugins=["core", "reservation"], clock=clock)
    station = await booted(first, STATION)
    _, soon, _, _ = await reserve(first, station, 1, VALID, offset=100, station_id=STATION)
    _, later, _, _ = await reserve(first, station, 0, VALID, offset=500, station_id=STATION)
    await first.stop()

    clock.advance(200)  # the first expired while the CSMS was down
    second = await csms_factory(plugins=["core", "reservation"], clock=clock)
    await within(second.app.pm.get_plugin("reservation").timers.ready)
    clock.advance(0)
    await within(db_settled(second.app))
    assert (await reservation(second, STATION, soon["reservation_id"]))["state"] == "expired"
    assert await live(second, STATION) == [later["reservation_id"]]
    clock.advance(300)
    await within(db_settled(second.app))
    assert await live(second, STATION) == []
    assert (await reservation(second, STATION, later["reservation_id"]))["state"] == "expired"


@pytest_twisted.ensureDeferred
async def test_deleting_a_station_removes_its_reservations_and_timers(csms, id_tags):
    station = await booted(csms, STATION)
    _, body, _, _ = await reserve(csms, station, 1, VALID, offset=60, station_id=STATION)
    timers = csms.app.pm.get_plugin("reservation").timers
    assert list(timers.calls) == [body["record_id"]]
    status, _ = await api(csms, "DELETE", f"/stations/{STATION}")
    assert status == 204
    assert timers.calls == {}
    assert (await all_reservations(csms))["total"] == 0
