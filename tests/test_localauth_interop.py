"""Interop: the ``ocpp`` package's v16 ChargePoint (asyncio + websockets) receives SendLocalList and
GetLocalListVersion from the CSMS, validating each against its own OCPP 1.6 schemas.

The ChargePoint runs on an asyncio loop in its own thread; :class:`AsyncioThread` turns its coroutines
into Deferreds, so the reactor never waits on it.
"""
from __future__ import annotations

import asyncio

import pytest_twisted
from ocpp.routing import on
from ocpp.v16 import ChargePoint, call, call_result
from ocpp.v16.enums import Action
from csms.testing.asyncio_thread import AsyncioThread

TIMEOUT = 15




async def open_charge_point(cls, port: int, station_id: str):
    """(charge point, its reader task): connected with subprotocol ocpp1.6 and booted."""
    from websockets.asyncio.client import connect

    connection = await connect(f"ws://127.0.0.1:{port}/ocpp/{station_id}", subprotocols=["ocpp1.6"])
    charge_point = cls(station_id, connection)
    reader = asyncio.ensure_future(charge_point.start())
    response = await charge_point.call(call.BootNotification(charge_point_vendor="Interop", charge_point_model="OCPP"))
    assert response.status == "Accepted"
    return charge_point, reader


async def close_charge_point(charge_point, reader) -> None:
    reader.cancel()
    await charge_point._connection.close()


class LocalListChargePoint(ChargePoint):
    """Keeps its local list as OCPP 1.6 §5.14 describes, and its version."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.list_version = 0
        self.local_list: dict = {}
        self.requests: list = []

    @on(Action.send_local_list)
    def on_send_local_list(self, list_version, update_type, local_authorization_list=None, **_):
        entries = local_authorization_list or []
        self.requests.append((list_version, update_type, entries))
        if update_type == "Full":
            self.local_list = {}
        for entry in entries:
            if "id_tag_info" in entry:
                self.local_list[entry["id_tag"]] = entry["id_tag_info"]
            else:
                self.local_list.pop(entry["id_tag"], None)
        self.list_version = list_version
        return call_result.SendLocalList(status="Accepted")

    @on(Action.get_local_list_version)
    def on_get_local_list_version(self, **_):
        return call_result.GetLocalListVersion(list_version=self.list_version)


@pytest_twisted.ensureDeferred
async def test_ocpp_charge_point_receives_full_and_differential_lists(csms):
    core = csms.app.pm.get_plugin("core")
    await core.put_id_tag("INTEROP-A", status="Accepted")
    await core.put_id_tag("INTEROP-B", status="Blocked")
    runner = AsyncioThread()
    try:
        charge_point, reader = await runner.run(open_charge_point(LocalListChargePoint, csms.port, "CP-INTEROP-LL"))
        status, body, _ = await csms.api("POST", "/stations/CP-INTEROP-LL/local-list/sync",
                                         json={"update_type": "Full"})
        assert (status, body["status"], body["list_version"]) == (200, "Accepted", 1)
        await core.put_id_tag("INTEROP-C", status="Accepted")
        await core.delete_id_tag("INTEROP-A")
        status, body, _ = await csms.api("POST", "/stations/CP-INTEROP-LL/local-list/sync",
                                         json={"update_type": "Differential"})
        assert (status, body["status"], body["list_version"]) == (200, "Accepted", 2)
        status, body, _ = await csms.api("POST", "/stations/CP-INTEROP-LL/local-list/version")
        assert (status, body["list_version"], body["version_matches"]) == (200, 2, True)

        assert charge_point.requests == [
            (1, "Full", [{"id_tag": "INTEROP-A", "id_tag_info": {"status": "Accepted"}},
                         {"id_tag": "INTEROP-B", "id_tag_info": {"status": "Blocked"}}]),
            (2, "Differential", [{"id_tag": "INTEROP-A"},
                                 {"id_tag": "INTEROP-C", "id_tag_info": {"status": "Accepted"}}]),
        ]
        assert charge_point.local_list == {"INTEROP-B": {"status": "Blocked"}, "INTEROP-C": {"status": "Accepted"}}
        await runner.run(close_charge_point(charge_point, reader))
    finally:
        runner.stop()
