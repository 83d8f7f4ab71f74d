"""Local Auth List Management profile: OCTT TC_042_x / TC_043_x, differentials, chunking, fallbacks.

CSMS-initiated steps go through the operator API (POST /stations/{id}/local-list/...); the test station
plays the OCTT tool and answers as each case's "Tool answers" column says.
"""
from __future__ import annotations

from datetime import datetime, timezone

import pytest_twisted
from conftest import within

VALID = "OCTT-VALID-01"
BLOCKED = "OCTT-BLOCKED-01"
EXPIRED_BY_DATE = "OCTT-EXPIRED-02"
CHILD = "OCTT-CHILD-01"
NEW = "OCTT-NEW-01"
PAST_EXPIRY = datetime(2020, 1, 1, 12, 0, tzinfo=timezone.utc)
FUTURE_EXPIRY = datetime(2999, 1, 1, 12, 0, tzinfo=timezone.utc)

def core(csms):
    return csms.app.pm.get_plugin("core")


def localauth(csms):
    return csms.app.pm.get_plugin("localauth")


async def put_tags(csms, *tags):
    """Create id tags through the Core plugin (which fires csms_on_id_tag_changed): (id, status, **values)."""
    for tag in tags:
        id_tag, status, *rest = tag
        values = rest[0] if rest else {}
        await core(csms).put_id_tag(id_tag, status=status, **values)


async def octt_tags(csms):
    await put_tags(csms, (VALID, "Accepted"), (BLOCKED, "Blocked"),
                   (EXPIRED_BY_DATE, "Accepted", {"expiry_date": PAST_EXPIRY}),
                   (CHILD, "Accepted", {"parent_id_tag": VALID, "expiry_date": FUTURE_EXPIRY}))


#: The Full list the four OCTT tags give, sorted by id tag, each with its idTagInfo (TC_043_4).
OCTT_FULL_LIST = [
    {"idTag": BLOCKED, "idTagInfo": {"status": "Blocked"}},
    {"idTag": CHILD, "idTagInfo": {"status": "Accepted", "expiryDate": "2999-01-01T12:00:00.000Z",
                                   "parentIdTag": VALID}},
    {"idTag": EXPIRED_BY_DATE, "idTagInfo": {"status": "Expired", "expiryDate": "2020-01-01T12:00:00.000Z"}},
    {"idTag": VALID, "idTagInfo": {"status": "Accepted"}},
]


def calls(station, action=None) -> list:
    return [frame[3] if action else frame[2] for frame in station.received_calls
            if action is None or frame[2] == action]


async def sync(csms, station_id: str, update_type: str):
    return await within(csms.api("POST", f"/stations/{station_id}/local-list/sync", json={"update_type": update_type}))


async def state(csms, station_id: str) -> dict:
    status, body, _ = await within(csms.api("GET", f"/stations/{station_id}/local-list"))
    assert status == 200
    return body


def remember_versions(station):
    """Script the station like a real one: it keeps the last accepted list version and answers it back."""
    kept = {"version": 0}

    def send_local_list(payload):
        kept["version"] = payload["listVersion"]
        return {"status": "Accepted"}
    station.responses["SendLocalList"] = send_local_list
    station.responses["GetLocalListVersion"] = lambda payload: {"listVersion": kept["version"]}
    return kept


# -- OCTT cases -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_042_1_get_local_list_version_not_supported(csms):
    station = await csms.connect_booted("CP-42-1")
    station.responses["GetLocalListVersion"] = {"listVersion": -1}
    status, body, _ = await within(csms.api("POST", "/stations/CP-42-1/local-list/version"))
    assert status == 200
    assert body == {"station_id": "CP-42-1", "list_version": -1, "acknowledged_version": None,
                    "sent_version": None, "version_matches": False}
    assert calls(station) == ["GetLocalListVersion"]
    view = await state(csms, "CP-42-1")
    assert (view["reported_version"], view["version_matches"]) == (-1, False)


@pytest_twisted.ensureDeferred
async def test_TC_042_2_get_local_list_version_empty(csms):
    station = await csms.connect_booted("CP-42-2")
    station.responses["GetLocalListVersion"] = {"listVersion": 0}
    status, body, _ = await within(csms.api("POST", "/stations/CP-42-2/local-list/version"))
    assert status == 200
    assert (body["list_version"], body["version_matches"]) == (0, True)
    assert calls(station) == ["GetLocalListVersion"]
    assert (await state(csms, "CP-42-2"))["reported_version"] == 0


@pytest_twisted.ensureDeferred
async def test_TC_043_1_send_local_list_not_supported(csms):
    await octt_tags(csms)
    station = await csms.connect_booted("CP-43-1")
    station.responses["SendLocalList"] = {"status": "NotSupported"}
    status, body, _ = await sync(csms, "CP-43-1", "Full")
    assert status == 200
    assert (body["status"], body["update_type"], body["list_version"]) == ("NotSupported", "Full", 1)
    assert body["requests"] == [{"list_version": 1, "update_type": "Full", "entries": 4, "status": "NotSupported"}]
    assert calls(station, "SendLocalList") == [{"listVersion": 1, "updateType": "Full",
                                                "localAuthorizationList": OCTT_FULL_LIST}]
    view = await state(csms, "CP-43-1")
    assert (view["not_supported"], view["last_status"], view["acknowledged_version"], view["entries"]) == \
        (True, "NotSupported", None, [])
    # Handled: no retry, however long the CSMS waits.
    csms.clock.advance(24 * 3600)
    await localauth(csms).idle()
    assert calls(station) == ["SendLocalList"]


@pytest_twisted.ensureDeferred
async def test_TC_043_3_send_local_list_failed(csms):
    await octt_tags(csms)
    station = await csms.connect_booted("CP-43-3")
    station.responses["SendLocalList"] = {"status": "Failed"}
    status, body, _ = await sync(csms, "CP-43-3", "Full")
    assert status == 200
    assert (body["status"], body["acknowledged_version"]) == ("Failed", None)
    assert calls(station, "SendLocalList")[0]["updateType"] == "Full"
    view = await state(csms, "CP-43-3")
    assert (view["last_status"], view["sent_version"], view["acknowledged_version"], view["not_supported"]) == \
        ("Failed", 1, None, False)
    # A retry the operator asks for uses a new, higher version.
    station.responses["SendLocalList"] = {"status": "Accepted"}
    status, body, _ = await sync(csms, "CP-43-3", "Full")
    assert (status, body["status"], body["list_version"], body["acknowledged_version"]) == (200, "Accepted", 2, 2)


@pytest_twisted.ensureDeferred
async def test_TC_043_4_send_local_list_full(csms):
    await octt_tags(csms)
    station = await csms.connect_booted("CP-43-4")
    status, body, _ = await sync(csms, "CP-43-4", "Full")
    assert status == 200
    assert (body["status"], body["update_type"], body["list_version"], body["acknowledged_version"],
            body["entries"]) == ("Accepted", "Full", 1, 1, 4)
    [sent] = calls(station, "SendLocalList")
    assert sent == {"listVersion": 1, "updateType": "Full", "localAuthorizationList": OCTT_FULL_LIST}
    assert all("idTagInfo" in entry for entry in sent["localAuthorizationList"])
    view = await state(csms, "CP-43-4")
    assert view["entries"] == OCTT_FULL_LIST
    assert (view["sent_version"], view["acknowledged_version"], view["last_status"]) == (1, 1, "Accepted")
    assert view["pending_changes"] == {"added": [], "changed": [], "removed": []}
    assert calls(station) == ["SendLocalList"]


@pytest_twisted.ensureDeferred
async def test_TC_043_5_send_local_list_differential(csms):
    """2025-11 edition: an initial Full list, then a Differential carrying only one new idToken."""
    await octt_tags(csms)
    station = await csms.connect_booted("CP-43-5")
    remember_versions(station)
    status, body, _ = await within(csms.api("POST", "/stations/CP-43-5/local-list/version"))
    assert (status, body["list_version"]) == (200, 0)
    status, body, _ = await sync(csms, "CP-43-5", "Full")
    assert (status, body["status"]) == (200, "Accepted")
    initial_version = body["list_version"]

    await put_tags(csms, (NEW, "Accepted"))
    status, body, _ = await sync(csms, "CP-43-5", "Differential")
    assert status == 200
    assert body["changes"] == {"added": [NEW], "changed": [], "removed": []}
    differential = calls(station, "SendLocalList")[-1]
    assert differential["updateType"] == "Differential"
    assert differential["localAuthorizationList"] == [{"idTag": NEW, "idTagInfo": {"status": "Accepted"}}]
    assert differential["listVersion"] > initial_version

    status, body, _ = await within(csms.api("POST", "/stations/CP-43-5/local-list/version"))
    assert (status, body["list_version"], body["acknowledged_version"], body["version_matches"]) == \
        (200, differential["listVersion"], differential["listVersion"], True)
    assert calls(station) == ["GetLocalListVersion", "SendLocalList", "SendLocalList", "GetLocalListVersion"]
    assert [e["idTag"] for e in (await state(csms, "CP-43-5"))["entries"]] == \
        sorted([VALID, BLOCKED, EXPIRED_BY_DATE, CHILD, NEW])


# -- differentials -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_differential_carries_adds_changes_and_removals_entry_by_entry(csms):
    await put_tags(csms, ("TAG-A", "Accepted"), ("TAG-B", "Accepted"), ("TAG-C", "Accepted"), ("TAG-D", "Accepted"),
                   ("TAG-UNCHANGED", "Accepted"))
    station = await csms.connect_booted("CP-DIFF")
    assert (await sync(csms, "CP-DIFF", "Full"))[1]["list_version"] == 1

    await put_tags(csms, ("TAG-E", "Accepted"))                                   # added
    await core(csms).update_id_tag("TAG-B", status="Blocked")                      # changed status
    await core(csms).update_id_tag("TAG-C", parent_id_tag="TAG-A")                 # changed parent
    await core(csms).delete_id_tag("TAG-D")                                        # removed
    await core(csms).update_id_tag("TAG-UNCHANGED", description="same idTagInfo")  # not an idTagInfo change
    view = await state(csms, "CP-DIFF")
    assert view["pending_changes"] == {"added": ["TAG-E"], "changed": ["TAG-B", "TAG-C"], "removed": ["TAG-D"]}

    status, body, _ = await sync(csms, "CP-DIFF", "Differential")
    assert (status, body["status"], body["list_version"]) == (200, "Accepted", 2)
    sent = calls(station, "SendLocalList")[-1]
    assert sent == {"listVersion": 2, "updateType": "Differential", "localAuthorizationList": [
        {"idTag": "TAG-B", "idTagInfo": {"status": "Blocked"}},
        {"idTag": "TAG-C", "idTagInfo": {"status": "Accepted", "parentIdTag": "TAG-A"}},
        {"idTag": "TAG-D"},
        {"idTag": "TAG-E", "idTagInfo": {"status": "Accepted"}},
    ]}
    view = await state(csms, "CP-DIFF")
    assert view["entries"] == [
        {"idTag": "TAG-A", "idTagInfo": {"status": "Accepted"}},
        {"idTag": "TAG-B", "idTagInfo": {"status": "Blocked"}},
        {"idTag": "TAG-C", "idTagInfo": {"status": "Accepted", "parentIdTag": "TAG-A"}},
        {"idTag": "TAG-E", "idTagInfo": {"status": "Accepted"}},
        {"idTag": "TAG-UNCHANGED", "idTagInfo": {"status": "Accepted"}},
    ]
    assert view["acknowledged_version"] == 2

    # Nothing changed since version 2: a clear 409 and nothing sent.
    sent_before = len(station.received_calls)
    status, body, _ = await sync(csms, "CP-DIFF", "Differential")
    assert status == 409
    assert body["error"]["code"] == "local_list_up_to_date"
    assert body["error"]["details"] == {"acknowledged_version": 2}
    assert len(station.received_calls) == sent_before


@pytest_twisted.ensureDeferred
async def test_differential_answered_version_mismatch_falls_back_to_full(csms):
    await put_tags(csms, ("TAG-A", "Accepted"), ("TAG-B", "Accepted"))
    station = await csms.connect_booted("CP-VM")
    assert (await sync(csms, "CP-VM", "Full"))[1]["status"] == "Accepted"
    await put_tags(csms, ("TAG-C", "Accepted"))
    station.responses["SendLocalList"] = lambda p: {
        "status": "VersionMismatch" if p["updateType"] == "Differential" else "Accepted"}
    status, body, _ = await sync(csms, "CP-VM", "Differential")
    assert status == 200
    assert body["requests"] == [
        {"list_version": 2, "update_type": "Differential", "entries": 1, "status": "VersionMismatch"},
        {"list_version": 3, "update_type": "Full", "entries": 3, "status": "Accepted"},
    ]
    assert (body["status"], body["fallback_to_full"], body["update_type"], body["acknowledged_version"]) == \
        ("Accepted", True, "Full", 3)
    assert calls(station, "SendLocalList")[-1]["localAuthorizationList"] == [
        {"idTag": t, "idTagInfo": {"status": "Accepted"}} for t in ("TAG-A", "TAG-B", "TAG-C")]
    status, body, _ = await within(csms.api("GET", "/stations/CP-VM/local-list/updates"))
    assert [(u["list_version"], u["update_type"], u["status"]) for u in body["items"]] == \
        [(3, "Full", "Accepted"), (2, "Differential", "VersionMismatch"), (1, "Full", "Accepted")]


# -- size limits -------------------------------------------------------------------------------------


async def configure_limits(csms, station, station_id: str, send_max: str, list_max: str):
    """The station reports its limits through GetConfiguration (the Core plugin records them)."""
    station.responses["GetConfiguration"] = {"configurationKey": [
        {"key": "SendLocalListMaxLength", "readonly": True, "value": send_max},
        {"key": "LocalAuthListMaxLength", "readonly": True, "value": list_max}]}
    status, _, _ = await within(csms.api("POST", f"/stations/{station_id}/calls/GetConfiguration", json={}))
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_full_list_longer_than_send_max_length_goes_in_chunks(csms):
    tags = [f"TAG-{i}" for i in range(5)]
    await put_tags(csms, *[(t, "Accepted") for t in tags])
    station = await csms.connect_booted("CP-CHUNK")
    await configure_limits(csms, station, "CP-CHUNK", "2", "10")
    status, body, _ = await sync(csms, "CP-CHUNK", "Full")
    assert status == 200
    entry = lambda t: {"idTag": t, "idTagInfo": {"status": "Accepted"}}  # noqa: E731
    assert calls(station, "SendLocalList") == [
        {"listVersion": 1, "updateType": "Full", "localAuthorizationList": [entry("TAG-0"), entry("TAG-1")]},
        {"listVersion": 2, "updateType": "Differential", "localAuthorizationList": [entry("TAG-2"), entry("TAG-3")]},
        {"listVersion": 3, "updateType": "Differential", "localAuthorizationList": [entry("TAG-4")]},
    ]
    assert (body["status"], body["list_version"], body["acknowledged_version"], len(body["requests"])) == \
        ("Accepted", 3, 3, 3)
    view = await state(csms, "CP-CHUNK")
    assert view["limits"] == {"LocalAuthListMaxLength": 10, "SendLocalListMaxLength": 2}
    assert [e["idTag"] for e in view["entries"]] == tags


@pytest_twisted.ensureDeferred
async def test_chunked_full_list_stops_at_the_first_refused_chunk(csms):
    await put_tags(csms, *[(f"TAG-{i}", "Accepted") for i in range(4)])
    station = await csms.connect_booted("CP-CHUNK-F")
    await configure_limits(csms, station, "CP-CHUNK-F", "2", "10")
    station.responses["SendLocalList"] = lambda p: {"status": "Accepted" if p["updateType"] == "Full" else "Failed"}
    status, body, _ = await sync(csms, "CP-CHUNK-F", "Full")
    assert (status, body["status"], body["acknowledged_version"]) == (200, "Failed", 1)
    assert [r["status"] for r in body["requests"]] == ["Accepted", "Failed"]
    assert [e["idTag"] for e in (await state(csms, "CP-CHUNK-F"))["entries"]] == ["TAG-0", "TAG-1"]


@pytest_twisted.ensureDeferred
async def test_list_longer_than_local_auth_list_max_length_is_refused(csms):
    await put_tags(csms, *[(f"TAG-{i}", "Accepted") for i in range(4)])
    station = await csms.connect_booted("CP-TOO-LONG")
    await configure_limits(csms, station, "CP-TOO-LONG", "2", "3")
    for update_type in ("Full", "Differential"):
        status, body, _ = await sync(csms, "CP-TOO-LONG", update_type)
        assert status == 422
        assert body["error"]["code"] == "local_list_too_long"
        assert body["error"]["details"] == {"entries": 4, "max_length": 3}
    assert calls(station) == ["GetConfiguration"]


# -- choosing tags per station -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_chosen_tags_per_station(csms):
    await octt_tags(csms)
    station = await csms.connect_booted("CP-CHOSEN")
    status, body, _ = await within(csms.api("PUT", "/stations/CP-CHOSEN/local-list/tags",
                                            json={"id_tags": [VALID, "NOBODY"]}))
    assert (status, body["error"]["code"], body["error"]["details"]) == \
        (422, "unknown_id_tags", {"id_tags": ["NOBODY"]})
    status, body, _ = await within(csms.api("PUT", "/stations/CP-CHOSEN/local-list/tags",
                                            json={"id_tags": [VALID, BLOCKED]}))
    assert (status, body["selection"], body["id_tags"]) == (200, "chosen", [BLOCKED, VALID])
    await sync(csms, "CP-CHOSEN", "Full")
    assert calls(station, "SendLocalList")[-1]["localAuthorizationList"] == [
        {"idTag": BLOCKED, "idTagInfo": {"status": "Blocked"}}, {"idTag": VALID, "idTagInfo": {"status": "Accepted"}}]
    # Back to every tag: the differential adds the two others.
    status, body, _ = await within(csms.api("PUT", "/stations/CP-CHOSEN/local-list/tags", json={"id_tags": None}))
    assert (status, body["selection"], body["id_tags"]) == (200, "all", None)
    assert body["pending_changes"] == {"added": [CHILD, EXPIRED_BY_DATE], "changed": [], "removed": []}
    # Dropping a tag from the chosen set removes it from the station's list.
    await within(csms.api("PUT", "/stations/CP-CHOSEN/local-list/tags", json={"id_tags": [VALID]}))
    await sync(csms, "CP-CHOSEN", "Differential")
    assert calls(station, "SendLocalList")[-1] == {"listVersion": 2, "updateType": "Differential",
                                                   "localAuthorizationList": [{"idTag": BLOCKED}]}


# -- automatic syncs (off by default) ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_no_automatic_sync_by_default(csms):
    station = await csms.connect_booted("CP-QUIET")
    await put_tags(csms, (NEW, "Accepted"))
    csms.clock.advance(3600)
    await localauth(csms).idle()
    assert calls(station) == []


@pytest_twisted.ensureDeferred
async def test_auto_sync_on_change_sends_a_differential(csms_factory):
    csms = await csms_factory(config_text="[plugin:localauth]\nauto_sync_on_change = true\n")
    await put_tags(csms, (VALID, "Accepted"))
    station = await csms.connect_booted("CP-AUTO")
    await put_tags(csms, (NEW, "Accepted"))  # no list acknowledged yet: a Full list first
    assert await within(station.wait_for_call("SendLocalList")) == {
        "listVersion": 1, "updateType": "Full", "localAuthorizationList": [
            {"idTag": NEW, "idTagInfo": {"status": "Accepted"}}, {"idTag": VALID, "idTagInfo": {"status": "Accepted"}}]}
    await localauth(csms).idle()
    await core(csms).update_id_tag(NEW, status="Blocked")
    assert await within(station.wait_for_call("SendLocalList")) == {
        "listVersion": 2, "updateType": "Differential",
        "localAuthorizationList": [{"idTag": NEW, "idTagInfo": {"status": "Blocked"}}]}
    await localauth(csms).idle()
    assert (await state(csms, "CP-AUTO"))["acknowledged_version"] == 2


@pytest_twisted.ensureDeferred
async def test_auto_sync_does_not_retry_a_station_that_answered_not_supported(csms_factory):
    csms = await csms_factory(config_text="[plugin:localauth]\nauto_sync_on_change = true\n")
    station = await csms.connect_booted("CP-NS")
    station.responses["SendLocalList"] = {"status": "NotSupported"}
    await put_tags(csms, ("TAG-1", "Accepted"))
    await within(station.wait_for_call("SendLocalList"))
    await localauth(csms).idle()
    await put_tags(csms, ("TAG-2", "Accepted"))
    await core(csms).delete_id_tag("TAG-1")
    await localauth(csms).idle()
    assert calls(station) == ["SendLocalList"]
    assert (await state(csms, "CP-NS"))["not_supported"] is True


@pytest_twisted.ensureDeferred
async def test_auto_sync_on_boot_reads_the_version_then_sends_a_full_list(csms_factory):
    csms = await csms_factory(config_text="[plugin:localauth]\nauto_sync_on_boot = true\nboot_sync_delay = 5\n")
    await put_tags(csms, (VALID, "Accepted"))
    station = await csms.connect_booted("CP-BOOT")
    kept = remember_versions(station)
    assert calls(station) == []  # nothing before the BootNotification.conf has gone out
    csms.clock.advance(5)
    await within(station.wait_for_call("SendLocalList"))
    await localauth(csms).idle()
    assert calls(station) == ["GetLocalListVersion", "SendLocalList"]
    assert kept["version"] == 1
    # Booting again with the list in step: the version is read back and nothing else is sent.
    await station.call("BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"})
    csms.clock.advance(5)
    await within(station.wait_for_call("GetLocalListVersion"))
    await localauth(csms).idle()
    assert calls(station) == ["GetLocalListVersion", "SendLocalList", "GetLocalListVersion"]


# -- bad input and the generic calls endpoint ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unknown_station_offline_station_and_bad_bodies(csms):
    for method, path, body in (("GET", "/stations/NOPE/local-list", None),
                               ("POST", "/stations/NOPE/local-list/sync", {"update_type": "Full"}),
                               ("POST", "/stations/NOPE/local-list/version", None),
                               ("PUT", "/stations/NOPE/local-list/tags", {"id_tags": None}),
                               ("GET", "/stations/NOPE/local-list/updates", None)):
        status, answer, _ = await within(csms.api(method, path, json=body))
        assert (status, answer["error"]["code"]) == (404, "station_not_found"), path
    station = await csms.connect_booted("CP-BAD")
    status, answer, _ = await sync(csms, "CP-BAD", "Partial")
    assert (status, answer["error"]["code"]) == (422, "validation_failed")
    await station.close()
    status, answer, _ = await sync(csms, "CP-BAD", "Full")
    assert (status, answer["error"]["code"]) == (409, "station_offline")
    view = await state(csms, "CP-BAD")
    assert (view["sent_version"], view["last_status"]) == (None, None)


@pytest_twisted.ensureDeferred
async def test_send_local_list_through_the_generic_calls_endpoint_is_recorded(csms):
    await put_tags(csms, (VALID, "Accepted"), (NEW, "Accepted"))
    station = await csms.connect_booted("CP-GENERIC")
    payload = {"listVersion": 7, "updateType": "Full",
               "localAuthorizationList": [{"idTag": VALID, "idTagInfo": {"status": "Accepted"}}]}
    status, body, _ = await within(csms.api("POST", "/stations/CP-GENERIC/calls/SendLocalList", json=payload))
    assert (status, body) == (200, {"status": "Accepted"})
    view = await state(csms, "CP-GENERIC")
    assert (view["sent_version"], view["acknowledged_version"]) == (7, 7)
    assert view["entries"] == [{"idTag": VALID, "idTagInfo": {"status": "Accepted"}}]
    assert view["pending_changes"] == {"added": [NEW], "changed": [], "removed": []}
    station.responses["GetLocalListVersion"] = {"listVersion": 7}
    status, body, _ = await within(csms.api("POST", "/stations/CP-GENERIC/calls/GetLocalListVersion", json={}))
    assert (status, body) == (200, {"listVersion": 7})
    assert (await state(csms, "CP-GENERIC"))["version_matches"] is True
    # The next sync continues above the version sent by hand.
    status, body, _ = await sync(csms, "CP-GENERIC", "Differential")
    assert (status, body["list_version"]) == (200, 8)
    assert calls(station, "SendLocalList")[-1]["localAuthorizationList"] == [
        {"idTag": NEW, "idTagInfo": {"status": "Accepted"}}]


@pytest_twisted.ensureDeferred
async def test_station_error_is_recorded_and_nothing_acknowledged(csms):
    await put_tags(csms, (VALID, "Accepted"))
    station = await csms.connect_booted("CP-ERR")
    station.responses["SendLocalList"] = ("CALLERROR", "InternalError", "disk full")
    status, body, _ = await sync(csms, "CP-ERR", "Full")
    assert (status, body["error"]["code"]) == (502, "station_call_error")
    view = await state(csms, "CP-ERR")
    assert (view["last_status"], view["sent_version"], view["acknowledged_version"]) == ("Error", 1, None)
    assert "InternalError" in view["last_error"]
