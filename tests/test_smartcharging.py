"""The Smart Charging profile end to end: the OCTT cases TC_056, TC_057, TC_059, TC_066 and TC_067
(2024-04 edition, and the 2025-11 / 2026-02 differences), driven through the operator API with a
test station playing the tool; the CSMS's record of profiles; bad input refused with nothing sent."""
from __future__ import annotations

from datetime import timedelta

import pytest
import pytest_twisted
from conftest import booted as booted_station, clock_now as clock_time, core_store, station_time

from csms.app import CallRefused

VALID = "SC-VALID-01"
BASE = "/stations/{}"


def clock_now(csms):
    """The CSMS's time in whole seconds (schedules here start on a second)."""
    return clock_time(csms).replace(microsecond=0)


async def booted(csms, station_id: str, connectors: int = 2):
    return await booted_station(csms, station_id, connectors)


async def charging(csms, station, connector_id: int = 1) -> int:
    """OCTT reusable state Charging: the CSMS generates the transactionId."""
    await core_store(csms).put_id_tag(VALID, "Accepted")
    assert await station.status(connector_id, "Preparing") == {}
    response = await station.call("StartTransaction", {"connectorId": connector_id, "idTag": VALID,
                                                       "meterStart": 0, "timestamp": station_time(clock_now(csms))})
    assert response["idTagInfo"] == {"status": "Accepted"}
    assert await station.status(connector_id, "Charging") == {}
    return response["transactionId"]


async def assert_only_calls(station, actions: list[str]):
    """The station received exactly these CSMS-initiated calls (a Heartbeat flushes anything queued)."""
    assert set(await station.call("Heartbeat", {})) == {"currentTime"}
    assert [frame[2] for frame in station.received_calls] == actions


def tx_default(profile_id=1, stack=0, limit=16.0, unit="A", periods=None, **extra):
    profile = {"chargingProfileId": profile_id, "stackLevel": stack, "chargingProfilePurpose": "TxDefaultProfile",
               "chargingProfileKind": "Relative",
               "chargingSchedule": {"chargingRateUnit": unit,
                                    "chargingSchedulePeriod": periods or [{"startPeriod": 0, "limit": limit}]}}
    profile.update(extra)
    return profile


async def set_profile(csms, station_id, connector_id, profile):
    return await csms.api("POST", BASE.format(station_id) + "/charging-profiles",
                          json={"connector_id": connector_id, "charging_profile": profile})


async def installed(csms, station_id, query=""):
    status, body, _ = await csms.api("GET", BASE.format(station_id) + "/charging-profiles" + query)
    assert status == 200
    return body["items"]


# -- OCTT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit,limit", [("A", 6.0), ("W", 6000.0)])
@pytest_twisted.ensureDeferred
async def test_TC_056_central_smart_charging_tx_default_profile(csms, unit, limit):
    station = await booted(csms, "CP-TC056", connectors=1)
    now = clock_now(csms)
    profile = {
        "chargingProfileId": 56, "stackLevel": 1, "chargingProfilePurpose": "TxDefaultProfile",
        "chargingProfileKind": "Absolute", "validFrom": station_time(now), "validTo": station_time(now + timedelta(days=1)),
        "chargingSchedule": {"duration": 304, "startSchedule": station_time(now), "chargingRateUnit": unit,
                             "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit, "numberPhases": 1}]},
    }
    status, body, _ = await set_profile(csms, "CP-TC056", 1, profile)
    assert status == 200
    assert body["status"] == "Accepted"
    assert (body["profile"]["state"], body["profile"]["charging_profile_id"], body["profile"]["purpose"]) == \
        ("installed", 56, "TxDefaultProfile")
    sent = await station.wait_for_call("SetChargingProfile")
    # OCTT's checks (2024-04), plus 2025-11's: transactionId and recurrencyKind omitted.
    assert sent == {"connectorId": 1, "csChargingProfiles": profile}
    assert "transactionId" not in sent["csChargingProfiles"] and "recurrencyKind" not in sent["csChargingProfiles"]
    assert [(p["charging_profile_id"], p["connector_id"], p["state"]) for p in await installed(csms, "CP-TC056")] == \
        [(56, 1, "installed")]
    await assert_only_calls(station, ["SetChargingProfile"])


@pytest.mark.parametrize("kind", ["Absolute", "Relative"])
@pytest_twisted.ensureDeferred
async def test_TC_057_central_smart_charging_tx_profile(csms, kind):
    station = await booted(csms, "CP-TC057", connectors=1)
    transaction_id = await charging(csms, station, 1)
    now = clock_now(csms)
    schedule = {"chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 10.0}],
                "duration": 3600}
    profile = {"chargingProfileId": 57, "transactionId": transaction_id, "stackLevel": 0,
               "chargingProfilePurpose": "TxProfile", "chargingProfileKind": kind, "chargingSchedule": schedule}
    if kind == "Absolute":  # 2025-11: validFrom, validTo, startSchedule and duration present
        profile.update(validFrom=station_time(now), validTo=station_time(now + timedelta(hours=2)))
        schedule["startSchedule"] = station_time(now)
    status, body, _ = await set_profile(csms, "CP-TC057", 1, profile)
    assert (status, body["status"]) == (200, "Accepted")
    sent = await station.wait_for_call("SetChargingProfile")
    assert sent == {"connectorId": 1, "csChargingProfiles": profile}
    assert sent["csChargingProfiles"]["transactionId"] == transaction_id
    assert "recurrencyKind" not in sent["csChargingProfiles"]
    assert ("startSchedule" in sent["csChargingProfiles"]["chargingSchedule"]) is (kind == "Absolute")
    [record] = await installed(csms, "CP-TC057")
    assert (record["purpose"], record["transaction_id"], record["state"]) == ("TxProfile", transaction_id, "installed")
    await assert_only_calls(station, ["SetChargingProfile"])

    # The TxProfile ends with its transaction.
    await station.call("StopTransaction", {"transactionId": transaction_id, "meterStop": 10,
                                           "timestamp": station_time(clock_now(csms)), "reason": "Local"})
    assert await installed(csms, "CP-TC057") == []
    [ended] = await installed(csms, "CP-TC057", "?state=ended")
    assert (ended["charging_profile_id"], ended["transaction_id"]) == (57, transaction_id)


@pytest.mark.parametrize("kind", ["Relative", "Absolute"])
@pytest_twisted.ensureDeferred
async def test_TC_059_remote_start_transaction_with_charging_profile(csms, kind):
    station = await booted(csms, "CP-TC059", connectors=1)
    await core_store(csms).put_id_tag(VALID, "Accepted")
    now = clock_now(csms)
    schedule = {"chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 12.0}]}
    profile = {"chargingProfileId": 59, "stackLevel": 0, "chargingProfilePurpose": "TxProfile",
               "chargingProfileKind": kind, "chargingSchedule": schedule}
    if kind == "Absolute":  # allowed by 2025-11 with TC_057's conditions
        profile.update(validFrom=station_time(now), validTo=station_time(now + timedelta(hours=2)))
        schedule.update(startSchedule=station_time(now), duration=3600)
    payload = {"idTag": VALID, "connectorId": 1, "chargingProfile": profile}
    status, body, _ = await csms.api("POST", BASE.format("CP-TC059") + "/calls/RemoteStartTransaction", json=payload)
    assert (status, body) == (200, {"status": "Accepted"})
    sent = await station.wait_for_call("RemoteStartTransaction")
    assert sent == payload
    assert "transactionId" not in sent["chargingProfile"]
    assert sent["chargingProfile"]["chargingSchedule"]["chargingSchedulePeriod"][0]["startPeriod"] == 0
    assert await station.call("Authorize", {"idTag": VALID}) == {"idTagInfo": {"status": "Accepted"}}
    assert await station.status(1, "Preparing") == {}
    response = await station.call("StartTransaction", {"connectorId": 1, "idTag": VALID, "meterStart": 0,
                                                       "timestamp": station_time(clock_now(csms))})
    assert response["idTagInfo"] == {"status": "Accepted"}
    assert await station.status(1, "Charging") == {}
    [record] = await installed(csms, "CP-TC059")
    assert (record["source"], record["connector_id"], record["transaction_id"], record["state"]) == \
        ("RemoteStartTransaction", 1, response["transactionId"], "installed")
    # The preview now shows the TxProfile's 12 A on connector 1.
    status, preview, _ = await csms.api("GET", BASE.format("CP-TC059") + "/composite-schedule/preview"
                                        "?connector_id=1&duration=600")
    assert status == 200
    assert preview["chargingSchedule"]["chargingSchedulePeriod"] == [{"startPeriod": 0, "limit": 12.0}]
    await assert_only_calls(station, ["RemoteStartTransaction"])


@pytest_twisted.ensureDeferred
async def test_TC_066_get_composite_schedule(csms):
    station = await booted(csms, "CP-TC066", connectors=1)
    start = clock_now(csms)
    # The tool returns a hard-coded composite schedule.
    hard_coded = {"status": "Accepted", "connectorId": 1, "scheduleStart": station_time(start),
                  "chargingSchedule": {"duration": 300, "startSchedule": station_time(start), "chargingRateUnit": "A",
                                       "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 6.0}]}}
    station.responses["GetCompositeSchedule"] = hard_coded
    status, body, _ = await csms.api("POST", BASE.format("CP-TC066") + "/composite-schedule",
                                     json={"connector_id": 1, "duration": 300, "charging_rate_unit": "A"})
    assert status == 200
    assert await station.wait_for_call("GetCompositeSchedule") == \
        {"connectorId": 1, "duration": 300, "chargingRateUnit": "A"}
    assert body["status"] == "Accepted"
    assert body["station"] == hard_coded
    # The CSMS holds no profile for this station, so it reports the difference.
    assert body["csms"]["chargingSchedule"] is None
    assert body["matches"] is False
    assert body["differences"] == [{"from": station_time(start), "to": station_time(start + timedelta(seconds=300)),
                                    "station_limit": 6.0, "csms_limit": None}]
    await assert_only_calls(station, ["GetCompositeSchedule"])


@pytest_twisted.ensureDeferred
async def test_composite_window_ending_after_the_year_9999_is_refused_by_name_and_the_station_moves_on(csms):
    """Found by schemathesis: a window past 9999-12-31 was a 500 (a datetime cannot hold its end). (The
    preview's start and duration are bounded already: see test_hardening_http.)"""
    station = await booted(csms, "CP-Y10K", connectors=1)
    path = BASE.format("CP-Y10K") + "/composite-schedule"
    # The operator's duration is bounded as the preview's (31 days): nothing is sent.
    status, body, _ = await csms.api("POST", path, json={"connector_id": 1, "duration": 253000000000})
    assert (status, body["error"]["code"]) == (422, "validation_failed")
    status, body, _ = await csms.api("POST", path, json={"connector_id": 1, "duration": 31 * 86400 + 1})
    assert (status, body["error"]["code"]) == (422, "validation_failed")
    # A station whose schedule starts at the end of time: its answer cannot be compared, a named 502.
    station.responses["GetCompositeSchedule"] = {
        "status": "Accepted", "connectorId": 1, "scheduleStart": "9999-12-30T00:00:00Z",
        "chargingSchedule": {"duration": 259200, "chargingRateUnit": "A",
                             "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 6.0}]}}
    status, body, _ = await csms.api("POST", path, json={"connector_id": 1, "duration": 259200})
    assert (status, body["error"]["code"]) == (502, "station_invalid_response")
    assert body["error"]["details"]["response"]["scheduleStart"] == "9999-12-30T00:00:00Z"
    await assert_only_calls(station, ["GetCompositeSchedule"])


@pytest_twisted.ensureDeferred
async def test_TC_067_clear_charging_profile_2024_04_edition(csms):
    station = await booted(csms, "CP-TC067", connectors=1)
    level = 2
    for offset in range(3):
        status, body, _ = await set_profile(csms, "CP-TC067", 1, tx_default(670 + offset, level + offset,
                                                                             limit=10.0 + offset))
        assert (status, body["status"]) == (200, "Accepted")
    assert sorted(p["charging_profile_id"] for p in await installed(csms, "CP-TC067")) == [670, 671, 672]

    status, body, _ = await csms.api("DELETE", BASE.format("CP-TC067") + "/charging-profiles/670")
    assert (status, body["status"]) == (200, "Accepted")
    status, body2, _ = await csms.api("POST", BASE.format("CP-TC067") + "/charging-profiles/clear",
                                      json={"connector_id": 1, "purpose": "TxDefaultProfile", "stack_level": level + 1})
    assert (status, body2["status"]) == (200, "Accepted")
    status, body3, _ = await csms.api("POST", BASE.format("CP-TC067") + "/charging-profiles/clear")
    assert (status, body3["status"]) == (200, "Accepted")

    clears = [frame[3] for frame in station.received_calls if frame[2] == "ClearChargingProfile"]
    assert clears == [{"id": 670},
                      {"connectorId": 1, "chargingProfilePurpose": "TxDefaultProfile", "stackLevel": level + 1},
                      {}]
    cleared = {p["charging_profile_id"]: p["id"] for p in await installed(csms, "CP-TC067", "?state=cleared")}
    assert sorted(cleared) == [670, 671, 672]
    assert (body["cleared"], body2["cleared"], body3["cleared"]) == \
        ([cleared[670]], [cleared[671]], [cleared[672]])
    assert await installed(csms, "CP-TC067") == []
    await assert_only_calls(station, ["SetChargingProfile"] * 3 + ["ClearChargingProfile"] * 3)


@pytest_twisted.ensureDeferred
async def test_TC_067_clear_charging_profile_2025_11_edition(csms):
    station = await booted(csms, "CP-TC067B", connectors=1)
    transaction_id = await charging(csms, station, 1)
    level = 3
    profiles = [
        (0, dict(tx_default(1, level, limit=32.0), chargingProfilePurpose="ChargePointMaxProfile")),
        (1, tx_default(2, level, limit=16.0)),
        (1, dict(tx_default(3, level, limit=10.0), chargingProfilePurpose="TxProfile", transactionId=transaction_id)),
    ]
    for connector_id, profile in profiles:
        status, body, _ = await set_profile(csms, "CP-TC067B", connector_id, profile)
        assert (status, body["status"]) == (200, "Accepted"), body
    assert sorted((p["charging_profile_id"], p["connector_id"], p["purpose"])
                  for p in await installed(csms, "CP-TC067B")) == \
        [(1, 0, "ChargePointMaxProfile"), (2, 1, "TxDefaultProfile"), (3, 1, "TxProfile")]

    status, body, _ = await csms.api("DELETE", BASE.format("CP-TC067B") + "/charging-profiles/1")
    assert (status, body["status"]) == (200, "Accepted")
    assert sorted(p["charging_profile_id"] for p in await installed(csms, "CP-TC067B")) == [2, 3]
    status, body, _ = await csms.api("POST", BASE.format("CP-TC067B") + "/charging-profiles/clear",
                                     json={"connector_id": 1, "purpose": "TxDefaultProfile", "stack_level": level})
    assert (status, body["status"]) == (200, "Accepted")
    assert [p["charging_profile_id"] for p in await installed(csms, "CP-TC067B")] == [3]
    status, body, _ = await csms.api("POST", BASE.format("CP-TC067B") + "/charging-profiles/clear", json={})
    assert (status, body["status"]) == (200, "Accepted")
    assert await installed(csms, "CP-TC067B") == []
    clears = [frame[3] for frame in station.received_calls if frame[2] == "ClearChargingProfile"]
    assert clears == [{"id": 1}, {"connectorId": 1, "chargingProfilePurpose": "TxDefaultProfile",
                                  "stackLevel": level}, {}]
    await assert_only_calls(station, ["SetChargingProfile"] * 3 + ["ClearChargingProfile"] * 3)


# -- the CSMS's record ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_replacement_rule_same_id_or_same_purpose_stack_level_and_connector(csms):
    await booted(csms, "CP-REPL", connectors=2)
    for connector_id, profile in [(1, tx_default(1, 0, limit=10.0)), (1, tx_default(1, 5, limit=11.0)),
                                  (1, tx_default(2, 5, limit=12.0)), (2, tx_default(3, 5, limit=13.0))]:
        status, body, _ = await set_profile(csms, "CP-REPL", connector_id, profile)
        assert (status, body["status"]) == (200, "Accepted")
    now = [(p["charging_profile_id"], p["connector_id"], p["stack_level"]) for p in await installed(csms, "CP-REPL")]
    assert sorted(now) == [(2, 1, 5), (3, 2, 5)]
    replaced = await installed(csms, "CP-REPL", "?state=replaced")
    assert sorted((p["charging_profile_id"], p["stack_level"]) for p in replaced) == [(1, 0), (1, 5)]
    only_two = await installed(csms, "CP-REPL", "?connector_id=2")
    assert [p["charging_profile_id"] for p in only_two] == [3]


@pytest_twisted.ensureDeferred
async def test_rejected_profile_is_recorded_as_rejected_not_installed(csms):
    station = await booted(csms, "CP-REJ", connectors=1)
    station.responses["SetChargingProfile"] = {"status": "Rejected"}
    status, body, _ = await set_profile(csms, "CP-REJ", 1, tx_default(9))
    assert (status, body["status"], body["profile"]["state"], body["profile"]["station_status"]) == \
        (200, "Rejected", "rejected", "Rejected")
    assert await installed(csms, "CP-REJ") == []
    assert [p["charging_profile_id"] for p in await installed(csms, "CP-REJ", "?state=rejected")] == [9]


@pytest_twisted.ensureDeferred
async def test_generic_calls_are_tracked_and_unknown_clear_changes_nothing(csms):
    station = await booted(csms, "CP-GEN", connectors=1)
    status, body, _ = await csms.api("POST", BASE.format("CP-GEN") + "/calls/SetChargingProfile",
                                     json={"connectorId": 0, "csChargingProfiles": tx_default(4, 1)})
    assert (status, body) == (200, {"status": "Accepted"})
    assert [(p["charging_profile_id"], p["connector_id"]) for p in await installed(csms, "CP-GEN")] == [(4, 0)]
    station.responses["ClearChargingProfile"] = {"status": "Unknown"}
    status, body, _ = await csms.api("POST", BASE.format("CP-GEN") + "/calls/ClearChargingProfile", json={})
    assert (status, body) == (200, {"status": "Unknown"})
    assert [p["charging_profile_id"] for p in await installed(csms, "CP-GEN")] == [4]


@pytest_twisted.ensureDeferred
async def test_preview_before_and_after_a_session_and_compare_with_the_station(csms):
    """The issue's "done when": a cap and a default, a session with a TxProfile, previews and a check."""
    station = await booted(csms, "CP-FLOW", connectors=1)
    cap = dict(tx_default(1, 0, limit=32.0), chargingProfilePurpose="ChargePointMaxProfile")
    assert (await set_profile(csms, "CP-FLOW", 0, cap))[1]["status"] == "Accepted"
    assert (await set_profile(csms, "CP-FLOW", 0, tx_default(2, 0, limit=16.0)))[1]["status"] == "Accepted"
    preview_path = BASE.format("CP-FLOW") + "/composite-schedule/preview?connector_id=1&duration=3600"
    status, before, _ = await csms.api("GET", preview_path)
    assert status == 200
    assert before["chargingSchedule"]["chargingSchedulePeriod"] == [{"startPeriod": 0, "limit": 16.0}]
    status, in_w, _ = await csms.api("GET", preview_path + "&charging_rate_unit=W")
    assert in_w["chargingSchedule"]["chargingSchedulePeriod"] == [{"startPeriod": 0, "limit": 11040.0}]

    transaction_id = await charging(csms, station, 1)
    tx = {"chargingProfileId": 3, "stackLevel": 0, "chargingProfilePurpose": "TxProfile",
          "chargingProfileKind": "Relative",
          "chargingSchedule": {"chargingRateUnit": "A", "duration": 1800,
                               "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 40.0},
                                                          {"startPeriod": 600, "limit": 8.0}]}}
    assert (await set_profile(csms, "CP-FLOW", 1, tx))[1]["status"] == "Accepted"
    [tx_record] = await installed(csms, "CP-FLOW", "?connector_id=1")
    assert tx_record["transaction_id"] == transaction_id  # bound without transactionId in the profile
    status, during, _ = await csms.api("GET", preview_path)
    assert during["chargingSchedule"]["chargingSchedulePeriod"] == [
        {"startPeriod": 0, "limit": 32.0}, {"startPeriod": 600, "limit": 8.0}, {"startPeriod": 1800, "limit": 16.0}]

    start = clock_now(csms)
    station.responses["GetCompositeSchedule"] = {
        "status": "Accepted", "connectorId": 1, "scheduleStart": station_time(start),
        "chargingSchedule": {"startSchedule": station_time(start), "duration": 3600, "chargingRateUnit": "A",
                             "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 32.0},
                                                        {"startPeriod": 600, "limit": 8.0},
                                                        {"startPeriod": 1800, "limit": 16.0}]}}
    status, body, _ = await csms.api("POST", BASE.format("CP-FLOW") + "/composite-schedule",
                                     json={"connector_id": 1, "duration": 3600})
    assert (status, body["matches"], body["differences"]) == (200, True, [])
    station.responses["GetCompositeSchedule"]["chargingSchedule"]["chargingSchedulePeriod"][1]["limit"] = 6.0
    status, body, _ = await csms.api("POST", BASE.format("CP-FLOW") + "/composite-schedule",
                                     json={"connector_id": 1, "duration": 3600})
    assert (status, body["matches"]) == (200, False)
    assert body["differences"] == [{"from": station_time(start + timedelta(seconds=600)),
                                    "to": station_time(start + timedelta(seconds=1800)),
                                    "station_limit": 6.0, "csms_limit": 8.0}]

    await station.call("StopTransaction", {"transactionId": transaction_id, "meterStop": 10,
                                           "timestamp": station_time(clock_now(csms)), "reason": "Local"})
    status, after, _ = await csms.api("GET", preview_path)
    assert after["chargingSchedule"]["chargingSchedulePeriod"] == [{"startPeriod": 0, "limit": 16.0}]


@pytest_twisted.ensureDeferred
async def test_unknown_station_is_404(csms):
    for method, path, body in [("GET", "/charging-profiles", None), ("POST", "/charging-profiles/clear", {}),
                               ("GET", "/composite-schedule/preview", None),
                               ("POST", "/charging-profiles", {"connector_id": 0,
                                                               "charging_profile": tx_default()})]:
        status, answer, _ = await csms.api(method, BASE.format("CP-NOBODY") + path, json=body)
        assert (status, answer["error"]["code"]) == (404, "station_not_found")


# -- bad input: a 422 and nothing sent ------------------------------------------------------------


def _periods(*pairs):
    return [{"startPeriod": s, "limit": limit} for s, limit in pairs]


BAD_PROFILES = [
    ("ChargePointMaxProfile on a connector", 1,
     dict(tx_default(), chargingProfilePurpose="ChargePointMaxProfile"), "connectorId"),
    ("TxProfile on a connector without a transaction", 2,
     dict(tx_default(), chargingProfilePurpose="TxProfile"), "connectorId"),
    ("TxProfile for another transaction", 1,
     dict(tx_default(), chargingProfilePurpose="TxProfile", transactionId=999999), "csChargingProfiles.transactionId"),
    ("TxProfile on connector 0", 0, dict(tx_default(), chargingProfilePurpose="TxProfile"), "connectorId"),
    ("Recurring without recurrencyKind", 0,
     dict(tx_default(), chargingProfileKind="Recurring",
          chargingSchedule={"chargingRateUnit": "A", "startSchedule": "2024-01-01T00:00:00Z",
                            "chargingSchedulePeriod": _periods((0, 6))}), "csChargingProfiles.recurrencyKind"),
    ("Recurring without startSchedule", 0,
     dict(tx_default(), chargingProfileKind="Recurring", recurrencyKind="Daily"),
     "csChargingProfiles.chargingSchedule.startSchedule"),
    ("unordered periods", 0, tx_default(periods=_periods((0, 6), (600, 8), (300, 10))),
     "csChargingProfiles.chargingSchedule.chargingSchedulePeriod[2].startPeriod"),
    ("overlapping (duplicate) periods", 0, tx_default(periods=_periods((0, 6), (0, 8))),
     "csChargingProfiles.chargingSchedule.chargingSchedulePeriod[1].startPeriod"),
    ("first period not at 0", 0, tx_default(periods=_periods((60, 6))),
     "csChargingProfiles.chargingSchedule.chargingSchedulePeriod[0].startPeriod"),
    ("negative limit", 0, tx_default(limit=-6.0), "csChargingProfiles.chargingSchedule.chargingSchedulePeriod[0].limit"),
    ("four phases", 0, tx_default(periods=[{"startPeriod": 0, "limit": 6.0, "numberPhases": 4}]),
     "csChargingProfiles.chargingSchedule.chargingSchedulePeriod[0].numberPhases"),
    ("validTo before validFrom", 0,
     tx_default(validFrom="2024-01-02T00:00:00Z", validTo="2024-01-01T00:00:00Z"), "csChargingProfiles.validTo"),
    ("transactionId on a TxDefaultProfile", 1, tx_default(transactionId=1), "csChargingProfiles.transactionId"),
    ("stack level above ChargeProfileMaxStackLevel", 0, tx_default(stack=11), "csChargingProfiles.stackLevel"),
]
SCHEMA_BAD = [
    ("unknown purpose", dict(tx_default(), chargingProfilePurpose="SiteProfile")),
    ("rate unit kW", tx_default(unit="kW")),
]


@pytest_twisted.ensureDeferred
async def test_bad_profiles_are_refused_with_422_and_nothing_sent(csms):
    station = await booted(csms, "CP-BAD", connectors=2)
    await charging(csms, station, 1)
    # The station's configuration, as the CSMS read it back (ChargeProfileMaxStackLevel = 10).
    station.responses["GetConfiguration"] = {"configurationKey": [
        {"key": "ChargeProfileMaxStackLevel", "readonly": True, "value": "10"}]}
    status, _, _ = await csms.api("POST", BASE.format("CP-BAD") + "/calls/GetConfiguration", json={})
    assert status == 200
    sent_before = list(station.received_calls)
    for name, connector_id, profile, field in BAD_PROFILES:
        for via in ("friendly", "generic"):
            if via == "friendly":
                status, body, _ = await set_profile(csms, "CP-BAD", connector_id, profile)
            else:
                status, body, _ = await csms.api("POST", BASE.format("CP-BAD") + "/calls/SetChargingProfile",
                                                 json={"connectorId": connector_id, "csChargingProfiles": profile})
            assert status == 422, (name, via, body)
            assert body["error"]["code"] == "invalid_charging_profile", (name, via)
            assert field in [p["field"] for p in body["error"]["details"]["problems"]], (name, via, body)
    for name, profile in SCHEMA_BAD:
        # The friendly route's body is typed as OCPP's ChargingProfile; the generic route checks the payload.
        status, body, _ = await set_profile(csms, "CP-BAD", 0, profile)
        assert (status, body["error"]["code"]) == (422, "validation_failed"), name
        status, body, _ = await csms.api("POST", BASE.format("CP-BAD") + "/calls/SetChargingProfile",
                                         json={"connectorId": 0, "csChargingProfiles": profile})
        assert (status, body["error"]["code"]) == (422, "invalid_ocpp_payload"), name
    assert station.received_calls == sent_before
    assert await installed(csms, "CP-BAD", "?state=all") == []
    # The Python API refuses in the same way.
    with pytest.raises(CallRefused) as refused:
        await csms.app.call("CP-BAD", "SetChargingProfile",
                            {"connectorId": 1, "csChargingProfiles": tx_default(limit=-1.0)})
    assert refused.value.code == "invalid_charging_profile"
    await assert_only_calls(station, ["GetConfiguration"])


@pytest_twisted.ensureDeferred
async def test_remote_start_with_a_bad_charging_profile_is_refused(csms):
    station = await booted(csms, "CP-RSBAD", connectors=1)
    cases = [
        ("not a TxProfile", tx_default(), "chargingProfile.chargingProfilePurpose"),
        ("with a transactionId", dict(tx_default(), chargingProfilePurpose="TxProfile", transactionId=5),
         "chargingProfile.transactionId"),
        ("first period not at 0", dict(tx_default(periods=_periods((30, 6))), chargingProfilePurpose="TxProfile"),
         "chargingProfile.chargingSchedule.chargingSchedulePeriod[0].startPeriod"),
        ("Relative with a startSchedule",
         dict(tx_default(), chargingProfilePurpose="TxProfile",
              chargingSchedule={"chargingRateUnit": "A", "startSchedule": "2024-01-01T00:00:00Z",
                                "chargingSchedulePeriod": _periods((0, 6))}),
         "chargingProfile.chargingSchedule.startSchedule"),
    ]
    for name, profile, field in cases:
        status, body, _ = await csms.api("POST", BASE.format("CP-RSBAD") + "/calls/RemoteStartTransaction",
                                         json={"idTag": VALID, "connectorId": 1, "chargingProfile": profile})
        assert status == 422, name
        assert field in [p["field"] for p in body["error"]["details"]["problems"]], (name, body)
    await assert_only_calls(station, [])


@pytest_twisted.ensureDeferred
async def test_remote_start_profile_validation_is_a_plain_function():
    """Core's friendly remote-start endpoint can call the same check."""
    from csms_plugins.smartcharging.validation import ProfileInvalid, check_remote_start_profile

    check_remote_start_profile({"idTag": "X"})  # no profile: nothing to check
    check_remote_start_profile({"idTag": "X", "connectorId": 1, "chargingProfile": dict(
        tx_default(), chargingProfilePurpose="TxProfile")})
    with pytest.raises(ProfileInvalid) as invalid:
        check_remote_start_profile({"idTag": "X", "chargingProfile": dict(tx_default(limit=-2.0))})
    assert [p["field"] for p in invalid.value.problems] == [
        "chargingProfile.chargingSchedule.chargingSchedulePeriod[0].limit", "chargingProfile.chargingProfilePurpose"]


@pytest_twisted.ensureDeferred
async def test_core_remote_start_endpoint_checks_the_charging_profile_and_binds_it(csms):
    """Core's friendly remote start goes through the same checks; a profile sent without connectorId
    is bound to the connector where the transaction starts."""
    station = await booted(csms, "CP-RSCORE", connectors=2)
    await core_store(csms).put_id_tag(VALID, "Accepted")
    bad = dict(tx_default(), chargingProfilePurpose="TxDefaultProfile")
    status, body, _ = await csms.api("POST", BASE.format("CP-RSCORE") + "/remote-start",
                                     json={"id_tag": VALID, "charging_profile": bad})
    assert (status, body["error"]["code"]) == (422, "invalid_charging_profile")
    assert station.received_calls == []
    good = dict(tx_default(590), chargingProfilePurpose="TxProfile")
    status, body, _ = await csms.api("POST", BASE.format("CP-RSCORE") + "/remote-start",
                                     json={"id_tag": VALID, "charging_profile": good})
    assert (status, body) == (200, {"status": "Accepted"})
    assert await station.wait_for_call("RemoteStartTransaction") == {"idTag": VALID, "chargingProfile": good}
    [pending] = await installed(csms, "CP-RSCORE")
    assert (pending["connector_id"], pending["transaction_id"]) == (None, None)
    response = await station.call("StartTransaction", {"connectorId": 2, "idTag": VALID, "meterStart": 0,
                                                       "timestamp": station_time(clock_now(csms))})
    [bound] = await installed(csms, "CP-RSCORE")
    assert (bound["charging_profile_id"], bound["connector_id"], bound["transaction_id"]) == \
        (590, 2, response["transactionId"])
    await assert_only_calls(station, ["RemoteStartTransaction"])
