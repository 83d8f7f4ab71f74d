"""The 34 Core-profile cases of the OCA Compliance Test Tool (OCTT) for OCPP 1.6J, CSMS as system under test.

The test station plays the OCTT tool: it sends what the case's message flow lists, and answers the
CSMS's calls as the case's "Tool answers" column says. CSMS-initiated steps go through the
``operator`` fixture only. Each test asserts the case's "CSMS-side validation" column, what the CSMS
keeps for the operator, and that the CSMS sent the station nothing but the calls the case drives
(OCTT does not expect any others; see SteVe's octt-quirks).

Case IDs and titles follow the 2024-04 edition of the OCTT test case document (§3.1-§3.13, §3.20);
the reusable states Booted, Authorized and Charging are its §3.22.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from conftest import as_stored, booted, clock_now, core_store, db_settled, station_time, within
from twisted.internet import defer

VALID = "OCTT-VALID-01"
EXPIRED = "OCTT-EXPIRED-01"           # stored with status Expired
EXPIRED_BY_DATE = "OCTT-EXPIRED-02"   # stored Accepted, with an expiry date in the past
BLOCKED = "OCTT-BLOCKED-01"
UNKNOWN = "OCTT-UNKNOWN-01"           # never stored
PAST_EXPIRY = datetime(2020, 1, 1, 12, 0, tzinfo=timezone.utc)
PAST_EXPIRY_TEXT = "2020-01-01T12:00:00.000Z"


#: What the tool returns for TC_019_1: every required Core, LocalAuthListManagement and SmartCharging key
#: (OCPP 1.6 §9.1, §9.2, §9.4), with its accessibility.
OCTT_CONFIGURATION = [
    {"key": "AuthorizeRemoteTxRequests", "readonly": False, "value": "true"},
    {"key": "ClockAlignedDataInterval", "readonly": False, "value": "0"},
    {"key": "ConnectionTimeOut", "readonly": False, "value": "60"},
    {"key": "ConnectorPhaseRotation", "readonly": False, "value": "0.RST,1.RST"},
    {"key": "GetConfigurationMaxKeys", "readonly": True, "value": "50"},
    {"key": "HeartbeatInterval", "readonly": False, "value": "300"},
    {"key": "LocalAuthorizeOffline", "readonly": False, "value": "true"},
    {"key": "LocalPreAuthorize", "readonly": False, "value": "false"},
    {"key": "MeterValuesAlignedData", "readonly": False, "value": "Energy.Active.Import.Register"},
    {"key": "MeterValuesSampledData", "readonly": False, "value": "Energy.Active.Import.Register,Power.Active.Import"},
    {"key": "MeterValueSampleInterval", "readonly": False, "value": "30"},
    {"key": "NumberOfConnectors", "readonly": True, "value": "1"},
    {"key": "ResetRetries", "readonly": False, "value": "3"},
    {"key": "StopTransactionOnEVSideDisconnect", "readonly": False, "value": "true"},
    {"key": "StopTransactionOnInvalidId", "readonly": False, "value": "true"},
    {"key": "StopTxnAlignedData", "readonly": False, "value": ""},
    {"key": "StopTxnSampledData", "readonly": False, "value": "Energy.Active.Import.Register"},
    {"key": "SupportedFeatureProfiles", "readonly": True,
     "value": "Core,FirmwareManagement,LocalAuthListManagement,Reservation,SmartCharging,RemoteTrigger"},
    {"key": "TransactionMessageAttempts", "readonly": False, "value": "3"},
    {"key": "TransactionMessageRetryInterval", "readonly": False, "value": "60"},
    {"key": "UnlockConnectorOnEVSideDisconnect", "readonly": False, "value": "true"},
    {"key": "LocalAuthListEnabled", "readonly": False, "value": "true"},
    {"key": "LocalAuthListMaxLength", "readonly": True, "value": "100"},
    {"key": "SendLocalListMaxLength", "readonly": True, "value": "20"},
    {"key": "ChargeProfileMaxStackLevel", "readonly": True, "value": "10"},
    {"key": "ChargingScheduleAllowedChargingRateUnit", "readonly": True, "value": "Current,Power"},
    {"key": "ChargingScheduleMaxPeriods", "readonly": True, "value": "24"},
    {"key": "MaxChargingProfilesInstalled", "readonly": True, "value": "10"},
]


# -- helpers: the tool's side of the reusable states (OCTT §3.22) -------------------------------------


@pytest.fixture
def id_tags(csms):
    """The id tags OCTT is configured with, known to the CSMS (TC_023_x prerequisites)."""
    store = core_store(csms)
    for args in ((VALID, "Accepted"), (EXPIRED, "Expired"), (BLOCKED, "Blocked"),
                 (EXPIRED_BY_DATE, "Accepted", PAST_EXPIRY)):
        assert pytest_twisted.blockon(store.put_id_tag(*args)) is True

def operate(operator, station_id: str, action: str, payload: dict) -> defer.Deferred:
    return within(operator.call(station_id, action, payload))

async def authorized(station, id_tag: str = VALID):
    """Reusable state Authorized."""
    assert await station.call("Authorize", {"idTag": id_tag}) == {"idTagInfo": {"status": "Accepted"}}


async def start_transaction(csms, station, connector_id: int = 1, id_tag: str = VALID, meter_start: int = 1000,
                            moment: datetime | None = None) -> dict:
    return await station.call("StartTransaction", {
        "connectorId": connector_id, "idTag": id_tag, "meterStart": meter_start,
        "timestamp": station_time(moment or clock_now(csms))})


async def charging(csms, station, connector_id: int = 1, id_tag: str = VALID) -> int:
    """Reusable state Charging (after Authorized): Preparing, StartTransaction (Accepted), Charging."""
    assert await station.status(connector_id, "Preparing") == {}
    response = await start_transaction(csms, station, connector_id, id_tag)
    assert response["idTagInfo"] == {"status": "Accepted"}
    assert isinstance(response["transactionId"], int)
    assert await station.status(connector_id, "Charging") == {}
    return response["transactionId"]


async def stop_transaction(csms, station, transaction_id: int, reason: str, meter_stop: int = 5000,
                           id_tag: str | None = VALID, moment: datetime | None = None) -> dict:
    payload = {"transactionId": transaction_id, "meterStop": meter_stop,
               "timestamp": station_time(moment or clock_now(csms)), "reason": reason}
    if id_tag is not None:
        payload["idTag"] = id_tag
    return await station.call("StopTransaction", payload)


async def assert_only_calls(csms, station, actions: list[str]):
    """The station received exactly the CSMS-initiated calls the case drives, in order.

    An hour passes first (so any timer a plugin set would have fired), the database work queued by
    then finishes, and a Heartbeat round trip follows: a call the CSMS had sent arrives before its answer.
    """
    csms.clock.advance(3600)
    await within(db_settled(csms.app))
    assert set(await station.call("Heartbeat", {})) == {"currentTime"}
    assert [frame[2] for frame in station.received_calls] == actions


async def transaction(csms, transaction_id: int) -> dict:
    return await core_store(csms).get_transaction(transaction_id)


async def connector_statuses(csms, station_id: str) -> dict:
    return {row["connector_id"]: (row["status"], row["error_code"])
            for row in await core_store(csms).connectors(station_id)}


async def configuration(csms, station_id: str) -> dict:
    return {row["key"]: (row["value"], row["readonly"], row["known"])
            for row in await core_store(csms).configuration(station_id)}


# -- 3.1 Cold boot -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_001_cold_boot(csms):
    station = await csms.connect("CP-TC001")
    response = await station.call("BootNotification", {"chargePointVendor": "OCTT", "chargePointModel": "OCTT-CP"})
    assert response["status"] == "Accepted"
    assert response["interval"] == 300
    assert response["currentTime"] == station_time(clock_now(csms))
    for connector_id in (0, 1, 2):
        assert await station.status(connector_id, "Available") == {}
    # The tool heartbeats every `interval` seconds; the CSMS answers with its own time each time.
    for _ in range(2):
        csms.clock.advance(response["interval"])
        assert await station.call("Heartbeat", {}) == {"currentTime": station_time(clock_now(csms))}
    assert await connector_statuses(csms, "CP-TC001") == {
        0: ("Available", "NoError"), 1: ("Available", "NoError"), 2: ("Available", "NoError")}
    info = await core_store(csms).boot_info("CP-TC001")
    assert (info["charge_point_vendor"], info["charge_point_model"], info["last_boot_status"]) == \
        ("OCTT", "OCTT-CP", "Accepted")
    await assert_only_calls(csms, station, [])


# -- 3.2 Regular charging session ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_003_regular_charging_session_plugin_first(csms, id_tags):
    station = await booted(csms, "CP-TC003")
    assert await station.status(1, "Preparing") == {}
    assert await station.call("Authorize", {"idTag": VALID}) == {"idTagInfo": {"status": "Accepted"}}
    started_at = as_stored(clock_now(csms))
    response = await start_transaction(csms, station, 1, VALID, meter_start=1234, moment=started_at)
    assert response["idTagInfo"] == {"status": "Accepted"}
    assert await station.status(1, "Charging") == {}
    stored = await transaction(csms, response["transactionId"])
    assert (stored["station_id"], stored["connector_id"], stored["id_tag"], stored["id_tag_status"],
            stored["meter_start"], stored["started_at"], stored["active"]) == \
        ("CP-TC003", 1, VALID, "Accepted", 1234, started_at, True)
    assert await connector_statuses(csms, "CP-TC003") == {0: ("Available", "NoError"), 1: ("Charging", "NoError")}
    await assert_only_calls(csms, station, [])


@pytest_twisted.ensureDeferred
async def test_TC_004_1_regular_charging_session_identification_first(csms, id_tags):
    station = await booted(csms, "CP-TC0041")
    await authorized(station)
    transaction_id = await charging(csms, station)
    active = await core_store(csms).active_transactions("CP-TC0041")
    assert [(t["transaction_id"], t["connector_id"], t["id_tag"]) for t in active] == [(transaction_id, 1, VALID)]
    await assert_only_calls(csms, station, [])


@pytest_twisted.ensureDeferred
async def test_TC_004_2_identification_first_connection_timeout(csms, id_tags):
    station = await booted(csms, "CP-TC0042")
    await authorized(station)
    assert await station.status(1, "Preparing") == {}
    # ConnectionTimeOut expires before a cable is plugged in.
    assert await station.status(1, "Available") == {}
    assert await core_store(csms).active_transactions("CP-TC0042") == []
    assert await connector_statuses(csms, "CP-TC0042") == {0: ("Available", "NoError"), 1: ("Available", "NoError")}
    await assert_only_calls(csms, station, [])


@pytest_twisted.ensureDeferred
async def test_TC_005_1_ev_side_disconnected(csms, id_tags):
    station = await booted(csms, "CP-TC0051")
    await authorized(station)
    transaction_id = await charging(csms, station)
    assert await station.status(1, "SuspendedEV") == {}
    response = await stop_transaction(csms, station, transaction_id, "EVDisconnected", meter_stop=4321)
    assert response == {"idTagInfo": {"status": "Accepted"}}
    assert await station.status(1, "Finishing") == {}
    assert await station.status(1, "Available") == {}
    stored = await transaction(csms, transaction_id)
    assert (stored["active"], stored["stop_reason"], stored["meter_stop"], stored["stop_id_tag"]) == \
        (False, "EVDisconnected", 4321, VALID)
    await assert_only_calls(csms, station, [])


# -- 3.3 Cached id, authorization cache ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_007_regular_start_charging_session_cached_id(csms, id_tags):
    station = await booted(csms, "CP-TC007")
    assert await station.status(1, "Preparing") == {}
    # The tool starts from its authorization cache: no Authorize.req first.
    response = await start_transaction(csms, station, 1, VALID)
    assert response["idTagInfo"] == {"status": "Accepted"}
    assert await station.status(1, "Charging") == {}
    assert (await transaction(csms, response["transactionId"]))["id_tag_status"] == "Accepted"
    await assert_only_calls(csms, station, [])


@pytest_twisted.ensureDeferred
async def test_TC_061_clear_authorization_data_in_authorization_cache(csms, operator):
    station = await booted(csms, "CP-TC061")
    station.responses["ClearCache"] = {"status": "Accepted"}
    assert await operate(operator, "CP-TC061", "ClearCache", {}) == {"status": "Accepted"}
    assert await station.wait_for_call("ClearCache") == {}
    await assert_only_calls(csms, station, ["ClearCache"])


# -- 3.4 Remote start / stop ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_010_remote_start_cable_plugged_in_first(csms, operator, id_tags):
    station = await booted(csms, "CP-TC010")
    assert await station.status(1, "Preparing") == {}
    station.responses["RemoteStartTransaction"] = {"status": "Accepted"}
    response = await operate(operator, "CP-TC010", "RemoteStartTransaction", {"idTag": VALID, "connectorId": 1})
    assert response == {"status": "Accepted"}
    assert await station.wait_for_call("RemoteStartTransaction") == {"idTag": VALID, "connectorId": 1}
    assert await station.call("Authorize", {"idTag": VALID}) == {"idTagInfo": {"status": "Accepted"}}
    response = await start_transaction(csms, station, 1, VALID)
    assert response["idTagInfo"] == {"status": "Accepted"}
    assert await station.status(1, "Charging") == {}
    await assert_only_calls(csms, station, ["RemoteStartTransaction"])


@pytest_twisted.ensureDeferred
async def test_TC_011_1_remote_start_remote_start_first(csms, operator, id_tags):
    station = await booted(csms, "CP-TC0111")
    response = await operate(operator, "CP-TC0111", "RemoteStartTransaction", {"idTag": VALID, "connectorId": 1})
    assert response == {"status": "Accepted"}
    assert await station.wait_for_call("RemoteStartTransaction") == {"idTag": VALID, "connectorId": 1}
    assert await station.call("Authorize", {"idTag": VALID}) == {"idTagInfo": {"status": "Accepted"}}
    assert await station.status(1, "Preparing") == {}
    response = await start_transaction(csms, station, 1, VALID)
    assert response["idTagInfo"] == {"status": "Accepted"}
    assert await station.status(1, "Charging") == {}
    active = await core_store(csms).active_transactions("CP-TC0111")
    assert [t["transaction_id"] for t in active] == [response["transactionId"]]
    await assert_only_calls(csms, station, ["RemoteStartTransaction"])


@pytest_twisted.ensureDeferred
async def test_TC_011_2_remote_start_time_out(csms, operator, id_tags):
    station = await booted(csms, "CP-TC0112")
    response = await operate(operator, "CP-TC0112", "RemoteStartTransaction", {"idTag": VALID, "connectorId": 1})
    assert response == {"status": "Accepted"}
    assert await station.call("Authorize", {"idTag": VALID}) == {"idTagInfo": {"status": "Accepted"}}
    assert await station.status(1, "Preparing") == {}
    # ConnectionTimeOut: nobody plugs in.
    assert await station.status(1, "Available") == {}
    assert await core_store(csms).active_transactions("CP-TC0112") == []
    await assert_only_calls(csms, station, ["RemoteStartTransaction"])


@pytest_twisted.ensureDeferred
async def test_TC_012_remote_stop_charging_session(csms, operator, id_tags):
    station = await booted(csms, "CP-TC012")
    await authorized(station)
    transaction_id = await charging(csms, station)
    # The operator finds the running transaction where the CSMS keeps it.
    active = await core_store(csms).active_transactions("CP-TC012")
    assert [t["transaction_id"] for t in active] == [transaction_id]
    station.responses["RemoteStopTransaction"] = {"status": "Accepted"}
    response = await operate(operator, "CP-TC012", "RemoteStopTransaction",
                             {"transactionId": active[0]["transaction_id"]})
    assert response == {"status": "Accepted"}
    assert await station.wait_for_call("RemoteStopTransaction") == {"transactionId": transaction_id}
    response = await stop_transaction(csms, station, transaction_id, "Remote")
    assert response == {"idTagInfo": {"status": "Accepted"}}
    assert await station.status(1, "Finishing") == {}
    assert await station.status(1, "Available") == {}
    stored = await transaction(csms, transaction_id)
    assert (stored["active"], stored["stop_reason"]) == (False, "Remote")
    assert await core_store(csms).active_transactions("CP-TC012") == []
    await assert_only_calls(csms, station, ["RemoteStopTransaction"])


# -- 3.5 Reset -----------------------------------------------------------------------------------------


async def reset_and_reboot(csms, operator, station_id: str, reset_type: str):
    station = await booted(csms, station_id, connectors=2)
    station.responses["Reset"] = {"status": "Accepted"}
    assert await operate(operator, station_id, "Reset", {"type": reset_type}) == {"status": "Accepted"}
    assert await station.wait_for_call("Reset") == {"type": reset_type}
    await assert_only_calls(csms, station, ["Reset"])
    await within(station.close())
    rebooted = await csms.connect(station_id)
    response = await rebooted.call("BootNotification", {"chargePointVendor": "OCTT", "chargePointModel": "OCTT-CP"})
    assert response["status"] == "Accepted"
    assert response["interval"] == 300
    for connector_id in (0, 1, 2):
        assert await rebooted.status(connector_id, "Available") == {}
    assert (await core_store(csms).boot_info(station_id))["boot_count"] == 2
    await assert_only_calls(csms, rebooted, [])


@pytest_twisted.ensureDeferred
async def test_TC_013_hard_reset(csms, operator):
    await reset_and_reboot(csms, operator, "CP-TC013", "Hard")


@pytest_twisted.ensureDeferred
async def test_TC_014_soft_reset(csms, operator):
    await reset_and_reboot(csms, operator, "CP-TC014", "Soft")


# -- 3.6 Unlock connector ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_017_1_unlock_connector_no_session_not_fixed_cable(csms, operator):
    station = await booted(csms, "CP-TC0171")
    station.responses["UnlockConnector"] = {"status": "Unlocked"}
    assert await operate(operator, "CP-TC0171", "UnlockConnector", {"connectorId": 1}) == {"status": "Unlocked"}
    assert await station.wait_for_call("UnlockConnector") == {"connectorId": 1}
    await assert_only_calls(csms, station, ["UnlockConnector"])


@pytest_twisted.ensureDeferred
async def test_TC_017_2_unlock_connector_no_session_fixed_cable(csms, operator):
    station = await booted(csms, "CP-TC0172")
    station.responses["UnlockConnector"] = {"status": "NotSupported"}
    response = await operate(operator, "CP-TC0172", "UnlockConnector", {"connectorId": 1})
    assert response == {"status": "NotSupported"}
    assert await station.wait_for_call("UnlockConnector") == {"connectorId": 1}
    await assert_only_calls(csms, station, ["UnlockConnector"])


@pytest_twisted.ensureDeferred
async def test_TC_018_1_unlock_connector_with_charging_session(csms, operator, id_tags):
    station = await booted(csms, "CP-TC0181")
    await authorized(station)
    transaction_id = await charging(csms, station)
    station.responses["UnlockConnector"] = {"status": "Unlocked"}
    assert await operate(operator, "CP-TC0181", "UnlockConnector", {"connectorId": 1}) == {"status": "Unlocked"}
    assert await station.wait_for_call("UnlockConnector") == {"connectorId": 1}
    assert await station.status(1, "Finishing") == {}
    response = await stop_transaction(csms, station, transaction_id, "UnlockCommand", id_tag=None)
    assert response == {}
    assert await station.status(1, "Available") == {}
    stored = await transaction(csms, transaction_id)
    assert (stored["active"], stored["stop_reason"], stored["stop_id_tag"]) == (False, "UnlockCommand", None)
    await assert_only_calls(csms, station, ["UnlockConnector"])


# -- 3.7 Configuration ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_019_1_retrieve_all_configuration_keys(csms, operator):
    station = await booted(csms, "CP-TC0191")
    station.responses["GetConfiguration"] = {"configurationKey": OCTT_CONFIGURATION, "unknownKey": []}
    response = await operate(operator, "CP-TC0191", "GetConfiguration", {})
    assert response == {"configurationKey": OCTT_CONFIGURATION, "unknownKey": []}
    request = await station.wait_for_call("GetConfiguration")
    assert request.get("key", []) == []
    # The Central System keeps the values of every key it retrieved.
    assert await configuration(csms, "CP-TC0191") == {
        entry["key"]: (entry["value"], entry["readonly"], True) for entry in OCTT_CONFIGURATION}
    await assert_only_calls(csms, station, ["GetConfiguration"])


@pytest_twisted.ensureDeferred
async def test_TC_019_2_retrieve_specific_configuration_key(csms, operator):
    station = await booted(csms, "CP-TC0192")
    profiles = "Core,FirmwareManagement,LocalAuthListManagement,Reservation,SmartCharging,RemoteTrigger"
    station.responses["GetConfiguration"] = {
        "configurationKey": [{"key": "SupportedFeatureProfiles", "readonly": True, "value": profiles}],
        "unknownKey": []}
    response = await operate(operator, "CP-TC0192", "GetConfiguration", {"key": ["SupportedFeatureProfiles"]})
    assert response["configurationKey"] == [{"key": "SupportedFeatureProfiles", "readonly": True, "value": profiles}]
    assert response["unknownKey"] == []
    assert await station.wait_for_call("GetConfiguration") == {"key": ["SupportedFeatureProfiles"]}
    assert await configuration(csms, "CP-TC0192") == {"SupportedFeatureProfiles": (profiles, True, True)}
    await assert_only_calls(csms, station, ["GetConfiguration"])


@pytest_twisted.ensureDeferred
async def test_TC_021_change_set_configuration(csms, operator):
    station = await booted(csms, "CP-TC021")
    station.responses["ChangeConfiguration"] = {"status": "Accepted"}
    response = await operate(operator, "CP-TC021", "ChangeConfiguration",
                             {"key": "MeterValueSampleInterval", "value": "60"})
    assert response == {"status": "Accepted"}
    assert await station.wait_for_call("ChangeConfiguration") == {"key": "MeterValueSampleInterval", "value": "60"}
    assert await configuration(csms, "CP-TC021") == {"MeterValueSampleInterval": ("60", None, True)}
    # No GetConfiguration after a successful change: it throws OCTT off.
    await assert_only_calls(csms, station, ["ChangeConfiguration"])


# -- 3.8 Authorization outcomes ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_023_1_start_charging_session_authorize_invalid(csms, id_tags):
    station = await booted(csms, "CP-TC0231")
    assert await station.call("Authorize", {"idTag": UNKNOWN}) == {"idTagInfo": {"status": "Invalid"}}
    await assert_only_calls(csms, station, [])


@pytest_twisted.ensureDeferred
async def test_TC_023_2_start_charging_session_authorize_expired(csms, id_tags):
    station = await booted(csms, "CP-TC0232")
    assert await station.call("Authorize", {"idTag": EXPIRED}) == {"idTagInfo": {"status": "Expired"}}
    # A tag still marked Accepted whose expiry date has passed is Expired too.
    assert await station.call("Authorize", {"idTag": EXPIRED_BY_DATE}) == {
        "idTagInfo": {"status": "Expired", "expiryDate": PAST_EXPIRY_TEXT}}
    await assert_only_calls(csms, station, [])


@pytest_twisted.ensureDeferred
async def test_TC_023_3_start_charging_session_authorize_blocked(csms, id_tags):
    station = await booted(csms, "CP-TC0233")
    assert await station.call("Authorize", {"idTag": BLOCKED}) == {"idTagInfo": {"status": "Blocked"}}
    await assert_only_calls(csms, station, [])


@pytest_twisted.ensureDeferred
async def test_TC_024_start_charging_session_lock_failure(csms, id_tags):
    station = await booted(csms, "CP-TC024")
    await authorized(station)
    assert await station.status(1, "Preparing") == {}
    assert await station.status(1, "Faulted", "ConnectorLockFailure") == {}
    assert await connector_statuses(csms, "CP-TC024") == {
        0: ("Available", "NoError"), 1: ("Faulted", "ConnectorLockFailure")}
    assert await core_store(csms).active_transactions("CP-TC024") == []
    await assert_only_calls(csms, station, [])


# -- 3.9 Remote start / stop rejected ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_026_remote_start_rejected(csms, operator, id_tags):
    station = await booted(csms, "CP-TC026")
    station.responses["RemoteStartTransaction"] = {"status": "Rejected"}
    response = await operate(operator, "CP-TC026", "RemoteStartTransaction", {"idTag": VALID, "connectorId": 1})
    assert response == {"status": "Rejected"}
    assert await station.wait_for_call("RemoteStartTransaction") == {"idTag": VALID, "connectorId": 1}
    assert await core_store(csms).active_transactions("CP-TC026") == []
    await assert_only_calls(csms, station, ["RemoteStartTransaction"])


@pytest_twisted.ensureDeferred
async def test_TC_028_remote_stop_transaction_rejected(csms, operator, id_tags):
    station = await booted(csms, "CP-TC028")
    await authorized(station)
    transaction_id = await charging(csms, station)
    station.responses["RemoteStopTransaction"] = {"status": "Rejected"}
    unknown_id = transaction_id + 1000
    response = await operate(operator, "CP-TC028", "RemoteStopTransaction", {"transactionId": unknown_id})
    assert response == {"status": "Rejected"}
    assert await station.wait_for_call("RemoteStopTransaction") == {"transactionId": unknown_id}
    # The running transaction is untouched.
    assert [t["transaction_id"] for t in await core_store(csms).active_transactions("CP-TC028")] == [transaction_id]
    await assert_only_calls(csms, station, ["RemoteStopTransaction"])


# -- 3.10 Unlock failures ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_030_unlock_connector_unlock_failure(csms, operator):
    station = await booted(csms, "CP-TC030")
    station.responses["UnlockConnector"] = {"status": "UnlockFailed"}
    response = await operate(operator, "CP-TC030", "UnlockConnector", {"connectorId": 1})
    assert response == {"status": "UnlockFailed"}
    assert await station.wait_for_call("UnlockConnector") == {"connectorId": 1}
    await assert_only_calls(csms, station, ["UnlockConnector"])


@pytest_twisted.ensureDeferred
async def test_TC_031_unlock_connector_unknown_connector(csms, operator):
    station = await booted(csms, "CP-TC031")
    station.responses["UnlockConnector"] = {"status": "NotSupported"}
    # Connector 2 does not exist on this one-connector station.
    response = await operate(operator, "CP-TC031", "UnlockConnector", {"connectorId": 2})
    assert response == {"status": "NotSupported"}
    assert await station.wait_for_call("UnlockConnector") == {"connectorId": 2}
    await assert_only_calls(csms, station, ["UnlockConnector"])


# -- 3.11 Power failure --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_032_1_power_failure_boot_stop_transactions(csms, id_tags):
    station = await booted(csms, "CP-TC0321", connectors=2)
    await authorized(station)
    transaction_id = await charging(csms, station, connector_id=1)
    lost_at = as_stored(clock_now(csms))
    station.dropConnection(abort=True)
    await within(station.closed)
    csms.clock.advance(120)  # the power comes back two minutes later

    rebooted = await csms.connect("CP-TC0321")
    response = await rebooted.call("BootNotification", {"chargePointVendor": "OCTT", "chargePointModel": "OCTT-CP"})
    assert response["status"] == "Accepted"
    assert await rebooted.status(0, "Available") == {}
    assert await rebooted.status(1, "Finishing") == {}
    assert await rebooted.status(2, "Available") == {}
    response = await stop_transaction(csms, rebooted, transaction_id, "PowerLoss", meter_stop=2500, id_tag=None,
                                      moment=lost_at)
    assert response == {}
    stored = await transaction(csms, transaction_id)
    assert (stored["active"], stored["stop_reason"], stored["meter_stop"], stored["stopped_at"]) == \
        (False, "PowerLoss", 2500, lost_at)
    assert await core_store(csms).active_transactions("CP-TC0321") == []
    assert await connector_statuses(csms, "CP-TC0321") == {
        0: ("Available", "NoError"), 1: ("Finishing", "NoError"), 2: ("Available", "NoError")}
    await assert_only_calls(csms, rebooted, [])


# -- 3.12 Offline transactions -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_037_1_offline_start_transaction_valid_id_tag(csms, id_tags):
    station = await booted(csms, "CP-TC0371")
    started_offline = as_stored(clock_now(csms) - timedelta(hours=2))
    # Queued while offline: sent on reconnection with the time it really started.
    response = await start_transaction(csms, station, 1, VALID, meter_start=100, moment=started_offline)
    assert response["idTagInfo"] == {"status": "Accepted"}
    assert await station.status(1, "Charging") == {}
    stored = await transaction(csms, response["transactionId"])
    assert (stored["started_at"], stored["meter_start"], stored["active"]) == (started_offline, 100, True)
    assert stored["received_at"] == clock_now(csms)
    await assert_only_calls(csms, station, [])


@pytest_twisted.ensureDeferred
async def test_TC_037_3_offline_start_transaction_invalid_id_tag(csms, id_tags):
    station = await booted(csms, "CP-TC0373")
    started_offline = as_stored(clock_now(csms) - timedelta(minutes=30))
    response = await start_transaction(csms, station, 1, UNKNOWN, moment=started_offline)
    # The 1.6 schema requires a transactionId even when the id tag is refused.
    assert response["idTagInfo"] == {"status": "Invalid"}
    assert isinstance(response["transactionId"], int)
    transaction_id = response["transactionId"]
    assert await station.status(1, "Charging") == {}
    # StopTransactionOnInvalidId=true
    response = await stop_transaction(csms, station, transaction_id, "DeAuthorized", meter_stop=1100, id_tag=None)
    assert response == {}
    assert await station.status(1, "Finishing") == {}
    stored = await transaction(csms, transaction_id)
    assert (stored["id_tag"], stored["id_tag_status"], stored["active"], stored["stop_reason"]) == \
        (UNKNOWN, "Invalid", False, "DeAuthorized")
    await assert_only_calls(csms, station, [])


@pytest_twisted.ensureDeferred
async def test_TC_039_offline_transaction(csms, id_tags):
    station = await booted(csms, "CP-TC039")
    started_offline = as_stored(clock_now(csms) - timedelta(hours=1))
    stopped_offline = started_offline + timedelta(minutes=20)
    response = await start_transaction(csms, station, 1, VALID, meter_start=0, moment=started_offline)
    assert response["idTagInfo"] == {"status": "Accepted"}
    transaction_id = response["transactionId"]
    # The queued stop follows at once, referring to the id just assigned.
    response = await stop_transaction(csms, station, transaction_id, "Local", meter_stop=7000,
                                      moment=stopped_offline)
    assert response == {"idTagInfo": {"status": "Accepted"}}
    stored = await transaction(csms, transaction_id)
    assert (stored["started_at"], stored["stopped_at"], stored["meter_start"], stored["meter_stop"],
            stored["stop_reason"], stored["active"]) == \
        (started_offline, stopped_offline, 0, 7000, "Local", False)
    await assert_only_calls(csms, station, [])


# -- 3.13 Configuration keys refused -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_040_1_configuration_keys_not_supported(csms, operator):
    station = await booted(csms, "CP-TC0401")
    station.responses["ChangeConfiguration"] = {"status": "NotSupported"}
    response = await operate(operator, "CP-TC0401", "ChangeConfiguration", {"key": "OCTTUnknownKey", "value": "1"})
    assert response == {"status": "NotSupported"}
    assert await station.wait_for_call("ChangeConfiguration") == {"key": "OCTTUnknownKey", "value": "1"}
    assert await configuration(csms, "CP-TC0401") == {}
    await assert_only_calls(csms, station, ["ChangeConfiguration"])


@pytest_twisted.ensureDeferred
async def test_TC_040_2_configuration_keys_invalid_value(csms, operator):
    station = await booted(csms, "CP-TC0402")
    station.responses["ChangeConfiguration"] = {"status": "Rejected"}
    response = await operate(operator, "CP-TC0402", "ChangeConfiguration",
                             {"key": "MeterValueSampleInterval", "value": "-1"})
    assert response == {"status": "Rejected"}
    assert await station.wait_for_call("ChangeConfiguration") == {"key": "MeterValueSampleInterval", "value": "-1"}
    assert await configuration(csms, "CP-TC0402") == {}
    await assert_only_calls(csms, station, ["ChangeConfiguration"])


# -- 3.20 DataTransfer ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_064_data_transfer_unknown_vendor(csms):
    station = await booted(csms, "CP-TC064")
    response = await station.call("DataTransfer", {"vendorId": "org.openchargealliance.octt",
                                                   "messageId": "TestMessage", "data": "hello"})
    assert response == {"status": "UnknownVendorId"}
    await assert_only_calls(csms, station, [])


# -- generic rules (OCTT §1.2) -------------------------------------------------------------------------


@pytest.mark.parametrize("status_first", [True, False], ids=["status_first", "transaction_first"])
@pytest_twisted.ensureDeferred
async def test_generic_rule_charging_and_finishing_in_either_order(csms, id_tags, status_first):
    station = await booted(csms, "CP-ORDER")
    await authorized(station)
    assert await station.status(1, "Preparing") == {}
    if status_first:
        assert await station.status(1, "Charging") == {}
    response = await start_transaction(csms, station, 1, VALID)
    assert response["idTagInfo"] == {"status": "Accepted"}
    transaction_id = response["transactionId"]
    if not status_first:
        assert await station.status(1, "Charging") == {}
    if status_first:
        assert await station.status(1, "Finishing") == {}
    assert await stop_transaction(csms, station, transaction_id, "Local") == {"idTagInfo": {"status": "Accepted"}}
    if not status_first:
        assert await station.status(1, "Finishing") == {}
    stored = await transaction(csms, transaction_id)
    assert (stored["id_tag_status"], stored["active"], stored["stop_reason"]) == ("Accepted", False, "Local")
    assert (await connector_statuses(csms, "CP-ORDER"))[1] == ("Finishing", "NoError")
    await assert_only_calls(csms, station, [])
