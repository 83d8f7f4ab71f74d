"""Interop: the `ocpp` package's v16 ChargePoint (asyncio + websockets) receives ReserveNow from the CSMS
and starts a transaction with the reservation id; the CSMS then shows the reservation as consumed.

The asyncio loop runs in a thread of its own; Twisted waits on it through Deferreds, never blocking the
reactor.
"""
from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
import pytest_twisted
from conftest import core_store
from twisted.internet import defer

from test_reservation_octt import VALID, clock_now, reservation, station_time, within
from csms.testing.asyncio_thread import AsyncioThread

STATION = "OCPP-LIB-RSV"




@pytest.fixture
def asyncio_thread():
    runner = AsyncioThread()
    yield runner
    runner.stop()


@pytest.fixture
def csms(csms_factory):
    return pytest_twisted.blockon(defer.ensureDeferred(csms_factory(plugins=["core", "reservation"])))


def make_charge_point_class():
    from ocpp.routing import on
    from ocpp.v16 import ChargePoint, call_result
    from ocpp.v16.enums import Action, ReservationStatus

    class ReservingChargePoint(ChargePoint):
        """Accepts every reservation and remembers it."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.reservations: list[dict] = []

        @on(Action.reserve_now)
        def on_reserve_now(self, connector_id, expiry_date, id_tag, reservation_id, parent_id_tag=None):
            self.reservations.append({"connector_id": connector_id, "expiry_date": expiry_date, "id_tag": id_tag,
                                      "reservation_id": reservation_id, "parent_id_tag": parent_id_tag})
            return call_result.ReserveNow(status=ReservationStatus.accepted)

    return ReservingChargePoint


@pytest_twisted.ensureDeferred
async def test_ocpp_library_charge_point_reserves_and_consumes(csms, asyncio_thread):
    import websockets
    from ocpp.v16 import call

    assert await within(core_store(csms).put_id_tag(VALID, "Accepted")) is True
    charge_point_class = make_charge_point_class()
    peer = {}

    async def connect_and_boot():
        ws = await websockets.connect(f"ws://127.0.0.1:{csms.port}/ocpp/{STATION}", subprotocols=["ocpp1.6"])
        cp = charge_point_class(STATION, ws)
        peer.update(ws=ws, cp=cp, task=asyncio.get_running_loop().create_task(cp.start()))
        boot = await cp.call(call.BootNotification(charge_point_model="LibCP", charge_point_vendor="ocpp-lib"))
        for connector_id in (0, 1):
            await cp.call(call.StatusNotification(connector_id=connector_id, error_code="NoError", status="Available"))
        return boot.status

    async def close():
        peer["task"].cancel()
        await peer["ws"].close()

    try:
        assert await asyncio_thread.run(connect_and_boot()) == "Accepted"
        expiry = station_time(clock_now(csms) + timedelta(hours=1))
        status, body, _ = await within(csms.api("POST", f"/stations/{STATION}/reservations",
                                                json={"connector_id": 1, "expiry_date": expiry, "id_tag": VALID}))
        assert (status, body["status"], body["active"]) == (201, "Accepted", True)
        reservation_id = body["reservation_id"]
        assert peer["cp"].reservations == [{"connector_id": 1, "expiry_date": expiry, "id_tag": VALID,
                                            "reservation_id": reservation_id, "parent_id_tag": None}]

        async def start():
            cp = peer["cp"]
            await cp.call(call.StatusNotification(connector_id=1, error_code="NoError", status="Reserved"))
            return await cp.call(call.StartTransaction(connector_id=1, id_tag=VALID, meter_start=0,
                                                       timestamp=station_time(clock_now(csms)), reservation_id=reservation_id))
        started = await asyncio_thread.run(start())
        assert started.id_tag_info == {"status": "Accepted"}
        row = await reservation(csms, STATION, reservation_id)
        assert (row["state"], row["transaction_id"], row["connector_status"]) == \
            ("consumed", started.transaction_id, "Reserved")
    finally:
        if peer:
            await asyncio_thread.run(close())
