"""Interoperability with an independent OCPP 1.6J implementation: the ``ocpp`` package's v16 ChargePoint.

The library runs on asyncio with ``websockets``, so it gets an event loop of its own on a separate thread.
The test (on the Twisted reactor) hands coroutines to that loop and awaits them as Deferreds, which are
fired on the reactor thread: the reactor never blocks, and the CSMS keeps serving while the library waits.
The library validates every message against the OCPP 1.6 schemas on its side too.
"""
from __future__ import annotations

import asyncio
from contextlib import suppress
from datetime import datetime, timezone

import pytest
import pytest_twisted
from conftest import core_store
from ocpp.routing import on
from ocpp.v16 import ChargePoint, call, call_result
from ocpp.v16.enums import (Action, AuthorizationStatus, AvailabilityStatus, ChargePointErrorCode,
                            ChargePointStatus, ClearCacheStatus, ConfigurationStatus, DataTransferStatus,
                            Reason, RegistrationStatus, RemoteStartStopStatus, ResetStatus, UnlockStatus)
from twisted.internet import defer, reactor
from websockets.asyncio.client import connect
from csms.testing.asyncio_thread import AsyncioThread

TIMEOUT = 10
VALID = "INTEROP-TAG-1"




class LibraryChargePoint(ChargePoint):
    """The ``ocpp`` package's charge point, answering every Core call a Central System may send."""

    def __init__(self, station_id, connection):
        super().__init__(station_id, connection, response_timeout=TIMEOUT)
        #: action -> the keyword arguments its handler received
        self.requests: dict[str, dict] = {}

    @on(Action.change_availability)
    def on_change_availability(self, connector_id, type, **kwargs):
        self.requests["ChangeAvailability"] = {"connector_id": connector_id, "type": type, **kwargs}
        return call_result.ChangeAvailability(status=AvailabilityStatus.scheduled)

    @on(Action.change_configuration)
    def on_change_configuration(self, key, value, **kwargs):
        self.requests["ChangeConfiguration"] = {"key": key, "value": value, **kwargs}
        return call_result.ChangeConfiguration(status=ConfigurationStatus.reboot_required)

    @on(Action.clear_cache)
    def on_clear_cache(self, **kwargs):
        self.requests["ClearCache"] = kwargs
        return call_result.ClearCache(status=ClearCacheStatus.accepted)

    @on(Action.data_transfer)
    def on_data_transfer(self, vendor_id, **kwargs):
        self.requests["DataTransfer"] = {"vendor_id": vendor_id, **kwargs}
        return call_result.DataTransfer(status=DataTransferStatus.accepted, data="pong:" + kwargs.get("data", ""))

    @on(Action.get_configuration)
    def on_get_configuration(self, **kwargs):
        self.requests["GetConfiguration"] = kwargs
        known = {"HeartbeatInterval": ("300", False), "NumberOfConnectors": ("1", True)}
        keys = kwargs.get("key") or list(known)
        return call_result.GetConfiguration(
            configuration_key=[{"key": k, "readonly": known[k][1], "value": known[k][0]} for k in keys if k in known],
            unknown_key=[k for k in keys if k not in known])

    @on(Action.remote_start_transaction)
    def on_remote_start_transaction(self, id_tag, **kwargs):
        self.requests["RemoteStartTransaction"] = {"id_tag": id_tag, **kwargs}
        return call_result.RemoteStartTransaction(status=RemoteStartStopStatus.accepted)

    @on(Action.remote_stop_transaction)
    def on_remote_stop_transaction(self, transaction_id, **kwargs):
        self.requests["RemoteStopTransaction"] = {"transaction_id": transaction_id, **kwargs}
        return call_result.RemoteStopTransaction(status=RemoteStartStopStatus.rejected)

    @on(Action.reset)
    def on_reset(self, type, **kwargs):
        self.requests["Reset"] = {"type": type, **kwargs}
        return call_result.Reset(status=ResetStatus.accepted)

    @on(Action.unlock_connector)
    def on_unlock_connector(self, connector_id, **kwargs):
        self.requests["UnlockConnector"] = {"connector_id": connector_id, **kwargs}
        return call_result.UnlockConnector(status=UnlockStatus.unlocked)


class LibraryStation:
    """A :class:`LibraryChargePoint` connected to the CSMS, driven from the reactor thread."""

    def __init__(self, runner: AsyncioThread, port: int, station_id: str):
        self.runner = runner
        self.url = f"ws://127.0.0.1:{port}/ocpp/{station_id}"
        self.station_id = station_id
        self.websocket = None
        self.cp: LibraryChargePoint | None = None
        self._serving = None

    async def _connect(self):
        self.websocket = await connect(self.url, subprotocols=["ocpp1.6"], open_timeout=TIMEOUT,
                                       close_timeout=TIMEOUT)
        self.cp = LibraryChargePoint(self.station_id, self.websocket)
        self._serving = asyncio.ensure_future(self.cp.start())
        return self.websocket.subprotocol

    def connect(self) -> defer.Deferred:
        """Fires with the negotiated subprotocol."""
        return self.runner.submit(self._connect())

    def call(self, payload) -> defer.Deferred:
        """Send a call (an ``ocpp.v16.call`` dataclass); fires with the ``call_result`` dataclass."""
        return self.runner.submit(self.cp.call(payload, suppress=False))

    async def _close(self):
        if self._serving is not None:
            self._serving.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await self._serving
        if self.websocket is not None:
            await self.websocket.close()

    def close(self) -> defer.Deferred:
        return self.runner.submit(self._close())


@pytest.fixture
def asyncio_thread():
    runner = AsyncioThread()
    runner.start()
    yield runner
    runner.stop()


@pytest.fixture
def library_station(csms, asyncio_thread):
    """The library's charge point, not yet connected; always closed after the test, passed or failed."""
    station = LibraryStation(asyncio_thread, csms.port, "CP-OCPP-LIB")
    yield station
    pytest_twisted.blockon(station.close())


@pytest.fixture
def valid_tag(csms):
    assert pytest_twisted.blockon(core_store(csms).put_id_tag(VALID)) is True


def now_text(csms) -> str:
    moment = datetime.fromtimestamp(csms.clock.seconds(), tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


async def boot(station, csms):
    assert await station.connect() == "ocpp1.6"
    response = await station.call(call.BootNotification(charge_point_model="LibModel", charge_point_vendor="LibVendor",
                                                        firmware_version="ocpp-2.x"))
    assert (response.status, response.interval, response.current_time) == \
        (RegistrationStatus.accepted, 300, now_text(csms))
    for connector_id in (0, 1):
        assert await station.call(call.StatusNotification(
            connector_id=connector_id, error_code=ChargePointErrorCode.no_error,
            status=ChargePointStatus.available)) == call_result.StatusNotification()


@pytest_twisted.ensureDeferred
async def test_library_charge_point_runs_a_charging_session(csms, library_station, valid_tag):
    station = library_station
    await boot(station, csms)
    info = await core_store(csms).boot_info("CP-OCPP-LIB")
    assert (info["charge_point_vendor"], info["charge_point_model"], info["firmware_version"]) == \
        ("LibVendor", "LibModel", "ocpp-2.x")

    response = await station.call(call.Authorize(id_tag=VALID))
    assert response.id_tag_info == {"status": AuthorizationStatus.accepted}
    await station.call(call.StatusNotification(connector_id=1, error_code=ChargePointErrorCode.no_error,
                                               status=ChargePointStatus.preparing))
    started_at = now_text(csms)
    response = await station.call(call.StartTransaction(connector_id=1, id_tag=VALID, meter_start=100,
                                                        timestamp=started_at))
    assert response.id_tag_info == {"status": AuthorizationStatus.accepted}
    transaction_id = response.transaction_id
    assert isinstance(transaction_id, int)
    await station.call(call.StatusNotification(connector_id=1, error_code=ChargePointErrorCode.no_error,
                                               status=ChargePointStatus.charging))

    assert await station.call(call.MeterValues(connector_id=1, transaction_id=transaction_id, meter_value=[
        {"timestamp": now_text(csms), "sampled_value": [
            {"value": "1500", "measurand": "Energy.Active.Import.Register", "unit": "Wh",
             "context": "Sample.Periodic"},
            {"value": "16.0", "measurand": "Current.Import", "unit": "A", "phase": "L1"}]}])) == \
        call_result.MeterValues()

    response = await station.call(call.StopTransaction(meter_stop=2100, timestamp=now_text(csms),
                                                       transaction_id=transaction_id, reason=Reason.local,
                                                       id_tag=VALID))
    assert response.id_tag_info == {"status": AuthorizationStatus.accepted}
    for status in (ChargePointStatus.finishing, ChargePointStatus.available):
        await station.call(call.StatusNotification(connector_id=1, error_code=ChargePointErrorCode.no_error,
                                                   status=status))
    response = await station.call(call.Heartbeat())
    assert response.current_time == now_text(csms)

    stored = await core_store(csms).get_transaction(transaction_id)
    assert (stored["station_id"], stored["id_tag"], stored["meter_start"], stored["meter_stop"],
            stored["stop_reason"], stored["active"]) == ("CP-OCPP-LIB", VALID, 100, 2100, "Local", False)
    samples = await core_store(csms).transaction_with_meter_values(transaction_id)
    assert [(s["value"], s["measurand"], s["unit"], s["phase"]) for s in samples["meter_values"]] == [
        ("1500", "Energy.Active.Import.Register", "Wh", None), ("16.0", "Current.Import", "A", "L1")]
    connectors = {row["connector_id"]: row["status"] for row in await core_store(csms).connectors("CP-OCPP-LIB")}
    assert connectors == {0: "Available", 1: "Available"}


@pytest_twisted.ensureDeferred
async def test_library_charge_point_answers_every_core_call(csms, operator, library_station):
    station = library_station
    await boot(station, csms)

    def operate(action, payload):
        return defer.ensureDeferred(operator.call("CP-OCPP-LIB", action, payload)).addTimeout(TIMEOUT, reactor)

    assert await operate("ChangeAvailability", {"connectorId": 1, "type": "Inoperative"}) == {"status": "Scheduled"}
    assert await operate("ChangeConfiguration", {"key": "MeterValueSampleInterval", "value": "60"}) == \
        {"status": "RebootRequired"}
    assert await operate("ClearCache", {}) == {"status": "Accepted"}
    assert await operate("DataTransfer", {"vendorId": "com.example", "messageId": "ping", "data": "42"}) == \
        {"status": "Accepted", "data": "pong:42"}
    assert await operate("GetConfiguration", {"key": ["HeartbeatInterval", "NoSuchKey"]}) == {
        "configurationKey": [{"key": "HeartbeatInterval", "readonly": False, "value": "300"}],
        "unknownKey": ["NoSuchKey"]}
    assert await operate("GetConfiguration", {}) == {
        "configurationKey": [{"key": "HeartbeatInterval", "readonly": False, "value": "300"},
                             {"key": "NumberOfConnectors", "readonly": True, "value": "1"}],
        "unknownKey": []}
    assert await operate("RemoteStartTransaction", {"idTag": VALID, "connectorId": 1}) == {"status": "Accepted"}
    assert await operate("RemoteStopTransaction", {"transactionId": 77}) == {"status": "Rejected"}
    assert await operate("Reset", {"type": "Hard"}) == {"status": "Accepted"}
    assert await operate("UnlockConnector", {"connectorId": 1}) == {"status": "Unlocked"}

    # What the library's handlers were given, field by field.
    assert station.cp.requests == {
        "ChangeAvailability": {"connector_id": 1, "type": "Inoperative"},
        "ChangeConfiguration": {"key": "MeterValueSampleInterval", "value": "60"},
        "ClearCache": {},
        "DataTransfer": {"vendor_id": "com.example", "message_id": "ping", "data": "42"},
        "GetConfiguration": {},
        "RemoteStartTransaction": {"id_tag": VALID, "connector_id": 1},
        "RemoteStopTransaction": {"transaction_id": 77},
        "Reset": {"type": "Hard"},
        "UnlockConnector": {"connector_id": 1},
    }
    # The answers the CSMS keeps.
    config = {row["key"]: (row["value"], row["known"]) for row in await core_store(csms).configuration("CP-OCPP-LIB")}
    assert config == {"HeartbeatInterval": ("300", True), "NumberOfConnectors": ("1", True),
                      "NoSuchKey": (None, False), "MeterValueSampleInterval": ("60", True)}
    requested = {row["connector_id"]: row["requested_availability"]
                 for row in await core_store(csms).connectors("CP-OCPP-LIB")}
    assert requested == {0: None, 1: "Inoperative"}
