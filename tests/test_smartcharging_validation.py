"""The Smart Charging checks as plain functions (no reactor): what each rule refuses and what it lets pass."""
from __future__ import annotations

import pytest

from csms_plugins.smartcharging.validation import (ProfileInvalid, check_set_charging_profile,
                                                   station_limit_problems)

TX = [{"transaction_id": 7, "connector_id": 1}]


def payload(connector_id=1, **changes):
    profile = {"chargingProfileId": 1, "stackLevel": 0, "chargingProfilePurpose": "TxDefaultProfile",
               "chargingProfileKind": "Absolute",
               "chargingSchedule": {"chargingRateUnit": "A", "startSchedule": "2024-01-01T00:00:00Z",
                                    "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 6.0}]}}
    profile.update(changes)
    return {"connectorId": connector_id, "csChargingProfiles": profile}


def fields(call) -> list[str]:
    with pytest.raises(ProfileInvalid) as invalid:
        call()
    return [problem["field"] for problem in invalid.value.problems]


@pytest.mark.parametrize("good", [
    payload(0),
    payload(1, chargingProfilePurpose="TxProfile"),
    payload(1, chargingProfilePurpose="TxProfile", transactionId=7),
    payload(0, chargingProfilePurpose="ChargePointMaxProfile"),
    payload(0, chargingProfileKind="Recurring", recurrencyKind="Weekly"),
    payload(2, validFrom="2024-01-01T00:00:00Z", validTo="2024-01-02T00:00:00Z"),
], ids=["tx-default-0", "tx-profile", "tx-profile-with-id", "cp-max", "recurring", "validity"])
def test_valid_profiles_pass(good):
    assert check_set_charging_profile(good, TX, {"ChargeProfileMaxStackLevel": "3"}) is None


def test_several_problems_are_reported_together():
    bad = payload(1, chargingProfilePurpose="ChargePointMaxProfile", stackLevel=9,
                  chargingSchedule={"chargingRateUnit": "W", "duration": 0,
                                    "chargingSchedulePeriod": [{"startPeriod": 0, "limit": -1.0},
                                                               {"startPeriod": 0, "limit": 5.0, "numberPhases": 0}]})
    assert fields(lambda: check_set_charging_profile(bad, TX, {"ChargeProfileMaxStackLevel": "3",
                                                               "ChargingScheduleAllowedChargingRateUnit": "Current"})) \
        == ["csChargingProfiles.chargingSchedule.duration",
            "csChargingProfiles.chargingSchedule.chargingSchedulePeriod[0].limit",
            "csChargingProfiles.chargingSchedule.chargingSchedulePeriod[1].startPeriod",
            "csChargingProfiles.chargingSchedule.chargingSchedulePeriod[1].numberPhases",
            "csChargingProfiles.stackLevel",
            "csChargingProfiles.chargingSchedule.chargingRateUnit",
            "connectorId"]


def test_recurrency_kind_without_recurring_and_an_empty_schedule():
    bad = payload(0, recurrencyKind="Daily",
                  chargingSchedule={"chargingRateUnit": "A", "chargingSchedulePeriod": []})
    assert fields(lambda: check_set_charging_profile(bad, [], None)) == [
        "csChargingProfiles.recurrencyKind", "csChargingProfiles.chargingSchedule.chargingSchedulePeriod"]


def test_unknown_station_limits_are_not_enforced():
    profile = payload(0, stackLevel=99)["csChargingProfiles"]
    assert station_limit_problems(profile, {}) == []
    assert station_limit_problems(profile, {"ChargeProfileMaxStackLevel": "not a number"}) == []
    assert station_limit_problems(profile, {"ChargingScheduleAllowedChargingRateUnit": "Current,Power"}) == []
