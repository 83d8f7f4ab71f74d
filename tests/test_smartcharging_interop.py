"""Interop: the ``ocpp`` package's v16 ChargePoint receives SetChargingProfile, ClearChargingProfile and
GetCompositeSchedule from the operator API, and the CSMS's record follows its answers."""
from __future__ import annotations

import pytest_twisted
from ocpp.routing import on
from ocpp.v16 import ChargePoint, call_result
from ocpp.v16.enums import Action
from test_localauth_interop import AsyncioThread, close_charge_point, open_charge_point


class ProfileChargePoint(ChargePoint):
    """Holds the profiles it is sent; reports a fixed 16 A composite schedule."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.profiles: dict = {}

    @on(Action.set_charging_profile)
    def on_set(self, connector_id, cs_charging_profiles, **_):
        self.profiles[cs_charging_profiles["charging_profile_id"]] = (connector_id, cs_charging_profiles)
        return call_result.SetChargingProfile(status="Accepted")

    @on(Action.clear_charging_profile)
    def on_clear(self, id=None, **_):  # noqa: A002 - the OCPP field name
        if id in self.profiles:
            del self.profiles[id]
            return call_result.ClearChargingProfile(status="Accepted")
        return call_result.ClearChargingProfile(status="Unknown")

    @on(Action.get_composite_schedule)
    def on_composite(self, connector_id, duration, charging_rate_unit=None, **_):
        return call_result.GetCompositeSchedule(
            status="Accepted", connector_id=connector_id,
            charging_schedule={"duration": duration, "charging_rate_unit": "A",
                               "charging_schedule_period": [{"start_period": 0, "limit": 16.0}]})


@pytest_twisted.ensureDeferred
async def test_ocpp_charge_point_holds_clears_and_reports_profiles(csms):
    runner = AsyncioThread()
    try:
        charge_point, reader = await runner.run(open_charge_point(ProfileChargePoint, csms.port, "CP-INTEROP-SC"))
        profile = {"chargingProfileId": 8, "stackLevel": 0, "chargingProfilePurpose": "TxDefaultProfile",
                   "chargingProfileKind": "Relative",
                   "chargingSchedule": {"chargingRateUnit": "A",
                                        "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 16.0}]}}
        status, body, _ = await csms.api("POST", "/stations/CP-INTEROP-SC/charging-profiles",
                                         json={"connector_id": 0, "charging_profile": profile})
        assert (status, body["status"], body["profile"]["state"]) == (200, "Accepted", "installed")
        assert list(charge_point.profiles) == [8]
        assert charge_point.profiles[8][1]["charging_schedule"]["charging_schedule_period"] == \
            [{"start_period": 0, "limit": 16.0}]

        status, body, _ = await csms.api("POST", "/stations/CP-INTEROP-SC/composite-schedule",
                                         json={"connector_id": 1, "duration": 600, "charging_rate_unit": "A"})
        assert (status, body["status"], body["matches"], body["differences"]) == (200, "Accepted", True, [])

        status, body, _ = await csms.api("DELETE", "/stations/CP-INTEROP-SC/charging-profiles/8")
        assert (status, body["status"], len(body["cleared"])) == (200, "Accepted", 1)
        status, body, _ = await csms.api("DELETE", "/stations/CP-INTEROP-SC/charging-profiles/8")
        assert (status, body["status"], body["cleared"]) == (200, "Unknown", [])
        assert charge_point.profiles == {}
        await runner.run(close_charge_point(charge_point, reader))
    finally:
        runner.stop()
