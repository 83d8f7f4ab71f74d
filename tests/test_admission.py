"""Station admission over a real loopback WebSocket (OCPP-J 1.6 §3; Security whitepaper profile 1).

Who may connect, under which id, with which subprotocol and credentials; what happens to the old
connection when a station connects again; and what is recorded about each connection.
"""
from __future__ import annotations

from collections import Counter

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from conftest import EventProbe, db_settled
from csms.passwords import hash_password
from csms.protocol import CLOSE_REPLACED
from csms.rpc import StationOffline
from csms.testing.station import StationRefused

WAIT = 5
BOOT = {"chargePointVendor": "V", "chargePointModel": "M"}


async def refused(d) -> StationRefused:
    """The StationRefused a connection attempt failed with (the test fails if it connected)."""
    try:
        station = await d
    except StationRefused as exc:
        return exc
    station.dropConnection(abort=True)
    raise AssertionError("the handshake was accepted")


async def events_of(csms, station_id: str) -> list[str]:
    """The station's connection events, oldest first, once every queued write has landed."""
    await db_settled(csms.app)
    rows = await csms.app.station_store.events(station_id)
    return [row["event"] for row in reversed(rows)]


# -- subprotocol ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_subprotocol_ocpp16_is_echoed(csms):
    station = await csms.connect("CP-1")
    assert station.subprotocol == "ocpp1.6"


@pytest_twisted.ensureDeferred
async def test_TC_088_handshake_offering_only_an_unsupported_subprotocol_is_refused(csms):
    exc = await refused(csms.connect("CP-1", protocols=("ocpp0.1",)))
    assert exc.status == 400
    assert not csms.app.is_connected("CP-1")


@pytest_twisted.ensureDeferred
async def test_TC_088_handshake_offering_several_subprotocols_gets_ocpp16(csms):
    station = await csms.connect("CP-1", protocols=("ocpp0.1", "ocpp1.6"))
    assert station.subprotocol == "ocpp1.6"
    assert (await station.call("BootNotification", BOOT, timeout=WAIT))["status"] == "Accepted"


@pytest_twisted.ensureDeferred
async def test_handshake_offering_no_subprotocol_is_refused(csms):
    exc = await refused(csms.connect("CP-1", protocols=()))
    assert exc.status == 400


# -- charge point id from the path -----------------------------------------------------------------


@pytest.mark.parametrize("station_id", ["CP 1", "Ladesäule-Ü7", "CP/1", "borne%20n°3"],
                         ids=["space", "unicode", "slash", "percent"])
@pytest_twisted.ensureDeferred
async def test_charge_point_id_is_the_percent_decoded_last_path_segment(csms, station_id):
    station = await csms.connect(station_id)  # connect_station percent-encodes it
    assert csms.app.is_connected(station_id)
    assert csms.app.sessions[station_id].station_id == station_id
    await station.call("BootNotification", BOOT, timeout=WAIT)
    record = await csms.app.station_store.get(station_id)
    assert record["id"] == station_id


@pytest_twisted.ensureDeferred
async def test_charge_point_id_is_taken_from_the_last_of_several_segments(csms):
    await csms.connect("CP-7", path_prefix="/ocpp/site-a/")
    assert list(csms.app.sessions) == ["CP-7"]


@pytest_twisted.ensureDeferred
async def test_empty_charge_point_id_is_refused(csms):
    exc = await refused(csms.connect(""))
    assert exc.status == 400
    assert csms.app.sessions == {}


@pytest_twisted.ensureDeferred
async def test_charge_point_id_longer_than_the_limit_is_refused(csms):
    limit = csms.app.config.ocpp.max_charge_point_id_length
    exc = await refused(csms.connect("C" * (limit + 1)))
    assert exc.status == 400
    station = await csms.connect("C" * limit)
    assert csms.app.is_connected("C" * limit)
    await station.close()


@pytest_twisted.ensureDeferred
async def test_wrong_path_prefix_is_refused(csms):
    exc = await refused(csms.connect("CP-1", path_prefix="/websocket/"))
    assert exc.status == 404
    assert csms.app.sessions == {}
    assert await csms.app.station_store.get("CP-1") is None


# -- unknown stations ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unknown_station_policy_accept_registers_it_and_boot_is_accepted(csms_factory):
    csms = await csms_factory(config_text="[ocpp]\nunknown_stations = accept\n")
    station = await csms.connect("CP-NEW")
    assert (await csms.app.station_store.get("CP-NEW"))["registration_status"] == "Accepted"
    response = await station.call("BootNotification", BOOT, timeout=WAIT)
    assert response["status"] == "Accepted"


@pytest_twisted.ensureDeferred
async def test_unknown_station_policy_pending_registers_it_and_boot_answers_pending(csms_factory):
    csms = await csms_factory(config_text="[ocpp]\nunknown_stations = pending\n")
    station = await csms.connect("CP-NEW")
    assert (await csms.app.station_store.get("CP-NEW"))["registration_status"] == "Pending"
    response = await station.call("BootNotification", BOOT, timeout=WAIT)
    assert response["status"] == "Pending"


@pytest_twisted.ensureDeferred
async def test_unknown_station_policy_reject_refuses_the_handshake_with_404(csms_factory):
    csms = await csms_factory(config_text="[ocpp]\nunknown_stations = reject\n")
    exc = await refused(csms.connect("CP-NEW"))
    assert exc.status == 404
    assert await csms.app.station_store.get("CP-NEW") is None
    assert await events_of(csms, "CP-NEW") == ["refused"]


@pytest_twisted.ensureDeferred
async def test_unknown_station_policy_reject_still_admits_a_registered_station(csms_factory):
    csms = await csms_factory(config_text="[ocpp]\nunknown_stations = reject\n")
    await csms.app.station_store.create("CP-KNOWN")
    station = await csms.connect("CP-KNOWN")
    assert (await station.call("BootNotification", BOOT, timeout=WAIT))["status"] == "Accepted"


# -- HTTP Basic auth (OCTT TC_085) ----------------------------------------------------------------


async def with_password(csms, station_id: str, password: str) -> None:
    created = await csms.app.station_store.create(station_id, password_hash=hash_password(password))
    if not created:
        await csms.app.station_store.update(station_id, password_hash=hash_password(password))


@pytest_twisted.ensureDeferred
async def test_TC_085_correct_basic_auth_password_is_accepted(csms):
    await with_password(csms, "CP-1", "s3cret-passw0rd!")
    station = await csms.connect("CP-1", password="s3cret-passw0rd!")
    assert station.subprotocol == "ocpp1.6"
    assert (await station.call("BootNotification", BOOT, timeout=WAIT))["status"] == "Accepted"


@pytest_twisted.ensureDeferred
async def test_TC_085_password_set_with_update_is_required_from_then_on(csms):
    station = await csms.connect("CP-1")
    await station.close()
    await csms.app.station_store.update("CP-1", password_hash=hash_password("new-password-16ch"))
    assert (await refused(csms.connect("CP-1"))).status == 401
    await csms.connect("CP-1", password="new-password-16ch")


@pytest.mark.parametrize("credentials", [
    {"password": "wrong-password-123"},
    {},
    {"password": "s3cret-passw0rd!", "username": "CP-2"},
    {"password": ""},
], ids=["wrong-password", "no-credentials", "wrong-username", "empty-password"])
@pytest_twisted.ensureDeferred
async def test_TC_085_bad_basic_auth_is_refused_with_401(csms, credentials):
    await with_password(csms, "CP-1", "s3cret-passw0rd!")
    exc = await refused(csms.connect("CP-1", **credentials))
    assert exc.status == 401
    assert not csms.app.is_connected("CP-1")
    assert await events_of(csms, "CP-1") == ["refused"]


@pytest_twisted.ensureDeferred
async def test_require_password_refuses_a_station_without_one(csms_factory):
    csms = await csms_factory(config_text="[ocpp]\nrequire_password = true\n")
    exc = await refused(csms.connect("CP-1"))
    assert exc.status == 401
    await csms.app.station_store.update("CP-1", password_hash=hash_password("finally-a-password"))
    await csms.connect("CP-1", password="finally-a-password")


# -- one connection per station -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_second_connection_with_the_same_id_replaces_the_first(csms_factory):
    probe = EventProbe()
    csms = await csms_factory(extra_plugins=[probe])
    first = await csms.connect("CP-1")
    first_session = await probe.next("connected", "CP-1")

    second = await csms.connect("CP-1")
    assert await probe.next("disconnected", "CP-1") == "replaced"
    second_session = await probe.next("connected", "CP-1")

    was_clean, code, reason = await first.closed.addTimeout(WAIT, reactor)
    assert code == CLOSE_REPLACED
    assert second_session is not first_session
    assert csms.app.sessions["CP-1"] is second_session
    assert first_session.connected is False
    assert (await second.call("Heartbeat", {}, timeout=WAIT))["currentTime"].endswith("Z")
    assert not second.closed.called
    assert Counter(await events_of(csms, "CP-1")) == Counter(["connected", "replaced", "connected"])

    # The newer connection closing is a real disconnect.
    await second.close()
    assert await probe.next("disconnected", "CP-1") == "closed by the station: code=1000"
    assert not csms.app.is_connected("CP-1")
    assert (await events_of(csms, "CP-1"))[-1] == "disconnected"
    # The replaced connection closing was not reported as a second disconnect.
    assert probe.unclaimed("disconnected", "CP-1") == 0


@pytest_twisted.ensureDeferred
async def test_connected_and_disconnected_events_are_recorded(csms_factory):
    probe = EventProbe()
    csms = await csms_factory(extra_plugins=[probe])
    station = await csms.connect("CP-1")
    await probe.next("connected", "CP-1")
    assert await events_of(csms, "CP-1") == ["connected"]

    await station.close()
    assert await probe.next("disconnected", "CP-1") == "closed by the station: code=1000"
    assert not csms.app.is_connected("CP-1")
    assert await events_of(csms, "CP-1") == ["connected", "disconnected"]
    rows = await csms.app.station_store.events("CP-1")
    assert rows[0]["remote_address"].startswith("tcp4:127.0.0.1:")
    record = await csms.app.station_store.get("CP-1")
    assert record["last_connected_at"] is not None
    assert record["last_disconnected_at"] is not None


@pytest_twisted.ensureDeferred
async def test_disconnecting_station_fails_its_pending_csms_calls_with_station_offline(csms_factory):
    probe = EventProbe()
    csms = await csms_factory(extra_plugins=[probe])
    station = await csms.connect("CP-1")
    station.responses["Reset"] = None  # never answer
    in_flight = csms.app.call("CP-1", "Reset", {"type": "Soft"})
    queued = csms.app.call("CP-1", "ClearCache", {})
    await station.wait_for_call("Reset", timeout=WAIT)

    station.dropConnection(abort=True)
    await probe.next("disconnected", "CP-1")

    for d in (in_flight, queued):
        with pytest.raises(StationOffline):
            await d.addTimeout(WAIT, reactor)
    with pytest.raises(StationOffline):
        await csms.app.call("CP-1", "ClearCache", {})


@pytest_twisted.ensureDeferred
async def test_many_handshakes_of_one_new_station_register_it_once(csms):
    """Handshakes of an unknown id racing each other (a reconnect storm, or two cluster nodes) register
    it once: every one is admitted, none fails on the unique key (the pool runs them side by side on
    PostgreSQL)."""
    outcomes = await defer.gatherResults([csms.app.station_store.admit("CP-RACE", "Accepted") for _ in range(20)])
    assert [registered for _, _, registered in outcomes].count(True) == 1
    assert {status for status, _, _ in outcomes} == {"Accepted"}


@pytest_twisted.ensureDeferred
async def test_many_api_creations_of_one_station_create_it_once(csms):
    outcomes = await defer.gatherResults([csms.app.station_store.create("CP-RACE") for _ in range(20)])
    assert outcomes.count(True) == 1
    answers = await defer.gatherResults([defer.ensureDeferred(csms.api("POST", "/stations", {"id": "CP-RACE-2"}))
                                         for _ in range(8)])
    assert sorted(status for status, _, _ in answers) == [201] + [409] * 7


@pytest_twisted.ensureDeferred
async def test_many_api_creations_of_one_id_tag_create_it_once(csms):
    """The id tag's insert is the check: concurrent POSTs of one tag make one 201 and 409s, never a 500."""
    answers = await defer.gatherResults([defer.ensureDeferred(csms.api("POST", "/id-tags", {"id_tag": "RACE"}))
                                         for _ in range(8)])
    assert sorted(status for status, _, _ in answers) == [201] + [409] * 7
    status, tag, _ = await csms.api("GET", "/id-tags/RACE")
    assert (status, tag["status"]) == (200, "Accepted")
