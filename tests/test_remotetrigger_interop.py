"""Interop: the ``ocpp`` package's v16 ChargePoint receives TriggerMessage and sends the triggered message,
which the CSMS answers through the profile that owns it."""
from __future__ import annotations

import asyncio

import pytest_twisted
from ocpp.routing import after, on
from ocpp.v16 import ChargePoint, call, call_result
from ocpp.v16.enums import Action
from test_localauth_interop import AsyncioThread, close_charge_point, open_charge_point


class TriggeredChargePoint(ChargePoint):
    """Accepts Heartbeat and StatusNotification triggers and sends the message right after answering."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.triggers: list = []
        self.sent: asyncio.Queue = asyncio.Queue()

    @on(Action.trigger_message)
    def on_trigger_message(self, requested_message, connector_id=None, **_):
        self.triggers.append((requested_message, connector_id))
        if requested_message in ("Heartbeat", "StatusNotification"):
            return call_result.TriggerMessage(status="Accepted")
        return call_result.TriggerMessage(status="NotImplemented")

    @after(Action.trigger_message)
    async def send_triggered(self, requested_message, connector_id=None, **_):
        if requested_message == "Heartbeat":
            response = await self.call(call.Heartbeat())
            await self.sent.put(("Heartbeat", response.current_time))
        elif requested_message == "StatusNotification":
            response = await self.call(call.StatusNotification(connector_id=connector_id, error_code="NoError",
                                                               status="Faulted"))
            await self.sent.put(("StatusNotification", response))

    async def next_sent(self):
        return await asyncio.wait_for(self.sent.get(), 10)


@pytest_twisted.ensureDeferred
async def test_ocpp_charge_point_receives_trigger_message_and_sends_the_message(csms):
    runner = AsyncioThread()
    try:
        charge_point, reader = await runner.run(open_charge_point(TriggeredChargePoint, csms.port, "CP-INTEROP-RT"))
        status, body, _ = await csms.api("POST", "/stations/CP-INTEROP-RT/trigger",
                                         json={"requested_message": "Heartbeat"})
        assert (status, body["status"]) == (200, "Accepted")
        action, current_time = await runner.run(charge_point.next_sent())
        assert action == "Heartbeat" and current_time.endswith("Z")

        status, body, _ = await csms.api("POST", "/stations/CP-INTEROP-RT/trigger",
                                         json={"requested_message": "StatusNotification", "connector_id": 1})
        assert (status, body["status"]) == (200, "Accepted")
        assert await runner.run(charge_point.next_sent()) == ("StatusNotification", call_result.StatusNotification())
        connectors = await csms.app.pm.get_plugin("core").store.connectors("CP-INTEROP-RT")
        assert [(c["connector_id"], c["status"]) for c in connectors] == [(1, "Faulted")]

        status, body, _ = await csms.api("POST", "/stations/CP-INTEROP-RT/trigger",
                                         json={"requested_message": "FirmwareStatusNotification"})
        assert (status, body["status"]) == (200, "NotImplemented")
        assert charge_point.triggers == [("Heartbeat", None), ("StatusNotification", 1),
                                         ("FirmwareStatusNotification", None)]
        await runner.run(close_charge_point(charge_point, reader))
    finally:
        runner.stop()
