"""Interop: the ``ocpp`` package's v16 ChargePoint (asyncio + websockets) receives UpdateFirmware and
GetDiagnostics from the CSMS (checked against the package's own OCPP 1.6 schemas), reports progress
with FirmwareStatusNotification / DiagnosticsStatusNotification, and uploads to the CSMS over HTTP.

The ChargePoint runs on an asyncio loop in its own thread; coroutines are handed to it and their
results come back as Deferreds, so the reactor never waits.
"""
from __future__ import annotations

import asyncio

import pytest
import pytest_twisted
import treq
from ocpp.routing import on
from ocpp.v16 import ChargePoint, call, call_result
from ocpp.v16.enums import Action, DiagnosticsStatus, FirmwareStatus
from twisted.internet import reactor
from csms.testing.asyncio_thread import AsyncioThread

TIMEOUT = 15




@pytest.fixture
def asyncio_thread():
    runner = AsyncioThread()
    yield runner
    runner.stop()


class FirmwareChargePoint(ChargePoint):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.update_requests: list = []
        self.diagnostics_requests: list = []

    @on(Action.update_firmware)
    def on_update_firmware(self, location, retrieve_date, **kwargs):
        self.update_requests.append({"location": location, "retrieve_date": retrieve_date, **kwargs})
        return call_result.UpdateFirmware()

    @on(Action.get_diagnostics)
    def on_get_diagnostics(self, location, **kwargs):
        self.diagnostics_requests.append({"location": location, **kwargs})
        return call_result.GetDiagnostics(file_name="interop-diag.log")


async def open_charge_point(port: int, station_id: str):
    from websockets.asyncio.client import connect

    connection = await connect(f"ws://127.0.0.1:{port}/ocpp/{station_id}", subprotocols=["ocpp1.6"])
    charge_point = FirmwareChargePoint(station_id, connection)
    reader = asyncio.ensure_future(charge_point.start())
    response = await charge_point.call(call.BootNotification(charge_point_vendor="Interop", charge_point_model="FW"))
    assert response.status == "Accepted"
    return charge_point, reader


async def close_charge_point(charge_point, reader):
    reader.cancel()
    await charge_point._connection.close()


@pytest_twisted.ensureDeferred
async def test_ocpp_charge_point_updates_firmware_and_uploads_diagnostics(csms, asyncio_thread):
    firmware = b"interop firmware " * 100
    status, hosted, _ = await csms.api("POST", "/firmware-files?name=interop.bin", data=firmware)
    assert status == 201
    charge_point, reader = await asyncio_thread.run(open_charge_point(csms.port, "IOP-FW"))
    try:
        status, body, _ = await csms.api("POST", "/stations/IOP-FW/firmware-update",
                                         json={"firmware_id": hosted["id"], "retries": 2, "retry_interval": 30,
                                               "retrieve_date": "2030-05-01T12:00:00Z"})
        assert status == 200, body
        assert charge_point.update_requests == [{"location": hosted["url"], "retrieve_date": "2030-05-01T12:00:00Z",
                                                 "retries": 2, "retry_interval": 30}]
        for firmware_status in (FirmwareStatus.downloading, FirmwareStatus.downloaded, FirmwareStatus.installing,
                                FirmwareStatus.installed):
            await asyncio_thread.run(charge_point.call(call.FirmwareStatusNotification(status=firmware_status)))
        state = (await csms.api("GET", "/stations/IOP-FW/firmware"))[1]
        assert (state["status"], state["current_update"]["status"]) == ("Installed", "Installed")

        status, body, _ = await csms.api("POST", "/stations/IOP-FW/diagnostics",
                                         json={"protocol": "http", "stop_time": "2024-03-01T00:00:00Z"})
        assert status == 200, body
        assert body["file_name"] == "interop-diag.log"
        [request] = charge_point.diagnostics_requests
        assert request["stop_time"] == "2024-03-01T00:00:00Z"
        await asyncio_thread.run(charge_point.call(
            call.DiagnosticsStatusNotification(status=DiagnosticsStatus.uploading)))
        log = b"interop diagnostics\n" * 50
        response = await treq.put(request["location"] + "interop-diag.log", data=log, reactor=reactor)
        assert response.code == 201, await treq.content(response)
        await asyncio_thread.run(charge_point.call(
            call.DiagnosticsStatusNotification(status=DiagnosticsStatus.uploaded)))
        diag = (await csms.api("GET", "/stations/IOP-FW/diagnostics"))[1]
        assert diag["status"] == "Uploaded"
        [stored] = diag["requests"][0]["files"]
        status, _, response = await csms.api("GET", f"/diagnostics-files/{stored['id']}/content")
        assert (status, await treq.content(response)) == (200, log)
    finally:
        await asyncio_thread.run(close_charge_point(charge_point, reader))
