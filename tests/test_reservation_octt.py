"""The Reservation-profile cases of the OCA Compliance Test Tool (OCTT) for OCPP 1.6J, CSMS as system under test.

The test station plays the OCTT tool (answers ReserveNow/CancelReservation as the case's "Tool answers"
column says); every CSMS-initiated step goes through the operator HTTP API. Case IDs and titles follow
the 2024-04 edition (§3.17); the reusable states Booted, Authorized and Charging are its §3.22.
They run with every built-in plugin enabled (the shipped configuration), so that no other profile's
hooks change these answers.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
import pytest_twisted
from conftest import booted as booted_station, clock_now, core_store, db_settled, station_time, within

VALID = "OCTT-VALID-01"
GROUP = "OCTT-GROUP-01"          # the parent (group) tag of the next two
MEMBER_1 = "OCTT-MEMBER-01"      # reserved with parentIdTag GROUP
MEMBER_2 = "OCTT-MEMBER-02"      # a new idTag with the same parentIdTag (TC_053)
STATION = "OCTT-CP-RSV"


@pytest.fixture
def id_tags(csms):
    store = core_store(csms)
    for args in ((VALID, "Accepted"), (GROUP, "Accepted"), (MEMBER_1, "Accepted", None, GROUP),
                 (MEMBER_2, "Accepted", None, GROUP)):
        assert pytest_twisted.blockon(store.put_id_tag(*args)) is True

async def booted(csms, station_id: str = STATION, connectors: int = 1):
    return await booted_station(csms, station_id, connectors)


async def reserve(csms, station, connector_id: int = 1, id_tag: str = VALID, offset: float = 3600,
                  station_id: str = STATION, **extra):
    """The operator reserves through the API; fires (HTTP status, body, the ReserveNow the station got)."""
    expiry = clock_now(csms) + timedelta(seconds=offset)
    status, body, _ = await within(csms.api("POST", f"/stations/{station_id}/reservations", json={
        "connector_id": connector_id, "expiry_date": station_time(expiry), "id_tag": id_tag, **extra}))
    request = await within(station.wait_for_call("ReserveNow"))
    return status, body, request, station_time(expiry)


async def reservation(csms, station_id: str, reservation_id: int) -> dict:
    status, body, _ = await within(csms.api("GET", f"/stations/{station_id}/reservations/{reservation_id}"))
    assert status == 200
    return body


async def live(csms, station_id: str = STATION) -> list[int]:
    status, body, _ = await within(csms.api("GET", f"/stations/{station_id}/reservations?active=true"))
    assert status == 200
    return [item["reservation_id"] for item in body["items"]]


async def start_transaction(csms, station, connector_id: int = 1, id_tag: str = VALID, **extra) -> dict:
    return await station.call("StartTransaction", {"connectorId": connector_id, "idTag": id_tag, "meterStart": 0,
                                                   "timestamp": station_time(clock_now(csms)), **extra})


def calls_sent(station) -> list[str]:
    return [frame[2] for frame in station.received_calls]


# -- §3.17.1 Reservation of a Connector --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_046_reservation_of_a_connector_transaction(csms, id_tags):
    station = await booted(csms)
    status, body, request, expiry = await reserve(csms, station, connector_id=1, id_tag=VALID)
    reservation_id = body["reservation_id"]
    assert request == {"connectorId": 1, "expiryDate": expiry, "idTag": VALID, "reservationId": reservation_id}
    assert status == 201
    assert (body["status"], body["state"], body["active"], body["source"]) == ("Accepted", "active", True, "api")
    assert await station.status(1, "Reserved") == {}
    assert (await reservation(csms, STATION, reservation_id))["connector_status"] == "Reserved"
    assert await live(csms) == [reservation_id]

    # Reusable state Charging, with the reservation id from step 1.
    assert await station.call("Authorize", {"idTag": VALID}) == {"idTagInfo": {"status": "Accepted"}}
    assert await station.status(1, "Preparing") == {}
    started = await start_transaction(csms, station, 1, VALID, reservationId=reservation_id)
    assert started["idTagInfo"] == {"status": "Accepted"}
    assert await station.status(1, "Charging") == {}

    after = await reservation(csms, STATION, reservation_id)
    assert (after["state"], after["active"], after["transaction_id"]) == ("consumed", False, started["transactionId"])
    assert await live(csms) == []
    assert calls_sent(station) == ["ReserveNow"]


@pytest_twisted.ensureDeferred
async def test_TC_047_reservation_of_a_connector_expire(csms, id_tags):
    station = await booted(csms)
    expiry_offset = 60  # the case's "Expiry Date Offset"
    status, body, request, expiry = await reserve(csms, station, connector_id=1, id_tag=VALID, offset=expiry_offset)
    assert status == 201 and body["status"] == "Accepted"
    assert request["expiryDate"] == expiry and body["expiry_date"] == expiry
    assert await station.status(1, "Reserved") == {}

    csms.clock.advance(expiry_offset - 1)
    await within(db_settled(csms.app))
    assert (await reservation(csms, STATION, body["reservation_id"]))["state"] == "active"

    csms.clock.advance(1)
    await within(db_settled(csms.app))
    after = await reservation(csms, STATION, body["reservation_id"])
    assert (after["state"], after["active"], after["closed_at"]) == ("expired", False, expiry)
    assert await station.status(1, "Available") == {}
    assert await live(csms) == []
    assert calls_sent(station) == ["ReserveNow"]


async def _not_accepted(csms, station, answer: str):
    station.responses["ReserveNow"] = {"status": answer}
    status, body, request, expiry = await reserve(csms, station, connector_id=1, id_tag=VALID)
    assert request == {"connectorId": 1, "expiryDate": expiry, "idTag": VALID,
                       "reservationId": body["reservation_id"]}
    # The CSMS accepts the answer: recorded, not live.
    assert status == 201
    assert (body["status"], body["state"], body["active"]) == (answer, "refused", False)
    assert await live(csms) == []
    assert (await reservation(csms, STATION, body["reservation_id"]))["status"] == answer


@pytest_twisted.ensureDeferred
async def test_TC_048_1_reservation_of_a_connector_faulted(csms, id_tags):
    station = await booted(csms)
    await _not_accepted(csms, station, "Faulted")
    assert calls_sent(station) == ["ReserveNow"]


@pytest_twisted.ensureDeferred
async def test_TC_048_2_reservation_of_a_connector_occupied(csms, id_tags):
    station = await booted(csms)
    assert await station.status(1, "Preparing") == {}
    await _not_accepted(csms, station, "Occupied")
    assert calls_sent(station) == ["ReserveNow"]


@pytest_twisted.ensureDeferred
async def test_TC_048_3_reservation_of_a_connector_unavailable(csms, id_tags):
    station = await booted(csms)
    status, body, _ = await within(csms.api("POST", f"/stations/{STATION}/calls/ChangeAvailability",
                                            json={"connectorId": 1, "type": "Inoperative"}))
    assert (status, body) == (200, {"status": "Accepted"})
    assert await within(station.wait_for_call("ChangeAvailability")) == {"connectorId": 1, "type": "Inoperative"}
    assert await station.status(1, "Unavailable") == {}
    await _not_accepted(csms, station, "Unavailable")
    assert calls_sent(station) == ["ChangeAvailability", "ReserveNow"]


@pytest_twisted.ensureDeferred
async def test_TC_048_4_reservation_of_a_connector_rejected(csms, id_tags):
    station = await booted(csms)
    await _not_accepted(csms, station, "Rejected")
    assert calls_sent(station) == ["ReserveNow"]


# -- §3.17.2 Reservation of a Charge Point -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_049_reservation_of_a_charge_point_transaction(csms, id_tags):
    station = await booted(csms)
    status, body, request, expiry = await reserve(csms, station, connector_id=0, id_tag=VALID)
    assert request == {"connectorId": 0, "expiryDate": expiry, "idTag": VALID,
                       "reservationId": body["reservation_id"]}
    assert status == 201
    assert (body["connector_id"], body["status"], body["active"]) == (0, "Accepted", True)
    assert await station.status(1, "Reserved") == {}
    after = await reservation(csms, STATION, body["reservation_id"])
    assert (after["id_tag"], after["connector_status"], after["state"]) == (VALID, "Reserved", "active")
    assert await live(csms) == [body["reservation_id"]]
    assert calls_sent(station) == ["ReserveNow"]


# -- §3.17.3 Cancel Reservation ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_051_cancel_reservation(csms, id_tags):
    station = await booted(csms)
    status, body, _, _ = await reserve(csms, station, connector_id=1, id_tag=VALID)
    reservation_id = body["reservation_id"]
    assert status == 201 and body["status"] == "Accepted"
    assert await station.status(1, "Reserved") == {}

    status, cancelled, _ = await within(csms.api("POST", f"/stations/{STATION}/reservations/{reservation_id}/cancel"))
    assert await within(station.wait_for_call("CancelReservation")) == {"reservationId": reservation_id}
    assert status == 200
    assert (cancelled["reservation_id"], cancelled["status"], cancelled["known"]) == (reservation_id, "Accepted", True)
    assert (cancelled["reservation"]["state"], cancelled["reservation"]["cancel_status"]) == ("cancelled", "Accepted")
    assert await station.status(1, "Available") == {}
    assert await live(csms) == []

    # Its expiry timer went with it.
    csms.clock.advance(3600)
    await within(db_settled(csms.app))
    assert (await reservation(csms, STATION, reservation_id))["state"] == "cancelled"
    assert calls_sent(station) == ["ReserveNow", "CancelReservation"]


@pytest_twisted.ensureDeferred
async def test_TC_052_cancel_reservation_rejected(csms, id_tags):
    station = await booted(csms)
    status, body, _, _ = await reserve(csms, station, connector_id=1, id_tag=VALID)
    reservation_id = body["reservation_id"]
    assert status == 201 and body["status"] == "Accepted"
    assert await station.status(1, "Reserved") == {}

    unknown = reservation_id + 1000
    station.responses["CancelReservation"] = {"status": "Rejected"}
    status, cancelled, _ = await within(csms.api("DELETE", f"/stations/{STATION}/reservations/{unknown}"))
    assert await within(station.wait_for_call("CancelReservation")) == {"reservationId": unknown}
    assert (status, cancelled) == (200, {"reservation_id": unknown, "status": "Rejected", "known": False,
                                         "reservation": None})
    # The real reservation is untouched; the rejected cancel is recorded.
    assert await live(csms) == [reservation_id]
    status, events, _ = await within(csms.api("GET", f"/reservation-events?station_id={STATION}"))
    assert status == 200
    assert [(e["reservation_id"], e["event"]) for e in events["items"]] == [(unknown, "cancel_unknown")]
    assert "Rejected" in events["items"][0]["detail"]
    assert calls_sent(station) == ["ReserveNow", "CancelReservation"]


# -- §3.17.4 Use a reserved Connector with parentIdTag ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_053_use_a_reserved_connector_with_parent_id_tag(csms, id_tags):
    station = await booted(csms)
    status, body, request, expiry = await reserve(csms, station, connector_id=1, id_tag=MEMBER_1,
                                                  parent_id_tag=GROUP)
    reservation_id = body["reservation_id"]
    assert request == {"connectorId": 1, "expiryDate": expiry, "idTag": MEMBER_1, "parentIdTag": GROUP,
                       "reservationId": reservation_id}
    assert status == 201 and body["status"] == "Accepted"
    assert await station.status(1, "Reserved") == {}

    # A new idTag with the same parentIdTag: Accepted, with that parentIdTag.
    expected = {"idTagInfo": {"status": "Accepted", "parentIdTag": GROUP}}
    assert await station.call("Authorize", {"idTag": MEMBER_2}) == expected
    assert await station.status(1, "Preparing") == {}
    started = await start_transaction(csms, station, 1, MEMBER_2)
    assert started["idTagInfo"] == {"status": "Accepted", "parentIdTag": GROUP}
    assert await station.status(1, "Charging") == {}
    after = await reservation(csms, STATION, reservation_id)
    assert (after["state"], after["transaction_id"]) == ("consumed", started["transactionId"])

    stopped = await station.call("StopTransaction", {"transactionId": started["transactionId"], "idTag": MEMBER_2,
                                                     "meterStop": 1000, "timestamp": station_time(clock_now(csms))})
    assert stopped == expected
    assert await station.status(1, "Finishing") == {}
    assert calls_sent(station) == ["ReserveNow"]


@pytest_twisted.ensureDeferred
async def test_TC_053_parent_id_tag_defaults_to_the_tags_group(csms, id_tags):
    """An operator who reserves for MEMBER_1 without naming the group still sends its parentIdTag."""
    station = await booted(csms)
    status, body, request, expiry = await reserve(csms, station, connector_id=1, id_tag=MEMBER_1)
    assert status == 201
    assert request == {"connectorId": 1, "expiryDate": expiry, "idTag": MEMBER_1, "parentIdTag": GROUP,
                       "reservationId": body["reservation_id"]}
    assert body["parent_id_tag"] == GROUP
