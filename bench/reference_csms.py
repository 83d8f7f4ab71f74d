#!/usr/bin/env python3
"""The reference Central System of the benchmark: the idiomatic one built on the ``ocpp`` package.

It is written the way that library's documentation shows a central system: a ``ChargePoint`` subclass
with one ``@on(Action...)`` handler per message, returning ``call_result`` dataclasses, started per
connection from a ``websockets.serve`` handler that insists on the ``ocpp1.6`` subprotocol. Every library
setting is left at its default (schema validation on, websockets' ping, queue and compression defaults).
It keeps nothing: no database, the way the documentation's example does; transaction ids come from a
counter. It binds 127.0.0.1 only.

    .venv/bin/python bench/reference_csms.py --port 9100
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
from datetime import datetime, timezone

import websockets
from ocpp.routing import on
from ocpp.v16 import ChargePoint as cp
from ocpp.v16 import call_result
from ocpp.v16.datatypes import IdTagInfo
from ocpp.v16.enums import Action, AuthorizationStatus, RegistrationStatus

logging.basicConfig(level=logging.WARNING)

_transaction_ids = itertools.count(1)


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


class ChargePoint(cp):
    @on(Action.boot_notification)
    def on_boot_notification(self, charge_point_vendor: str, charge_point_model: str, **kwargs):
        return call_result.BootNotification(current_time=now(), interval=300, status=RegistrationStatus.accepted)

    @on(Action.heartbeat)
    def on_heartbeat(self, **kwargs):
        return call_result.Heartbeat(current_time=now())

    @on(Action.status_notification)
    def on_status_notification(self, connector_id: int, error_code: str, status: str, **kwargs):
        return call_result.StatusNotification()

    @on(Action.authorize)
    def on_authorize(self, id_tag: str, **kwargs):
        return call_result.Authorize(id_tag_info=IdTagInfo(status=AuthorizationStatus.accepted))

    @on(Action.start_transaction)
    def on_start_transaction(self, connector_id: int, id_tag: str, meter_start: int, timestamp: str, **kwargs):
        return call_result.StartTransaction(transaction_id=next(_transaction_ids),
                                            id_tag_info=IdTagInfo(status=AuthorizationStatus.accepted))

    @on(Action.stop_transaction)
    def on_stop_transaction(self, transaction_id: int, meter_stop: int, timestamp: str, **kwargs):
        return call_result.StopTransaction(id_tag_info=IdTagInfo(status=AuthorizationStatus.accepted))

    @on(Action.meter_values)
    def on_meter_values(self, connector_id: int, meter_value: list, **kwargs):
        return call_result.MeterValues()


async def on_connect(websocket):
    """One connection: check the subprotocol, then hand it to a ChargePoint until it closes."""
    try:
        requested_protocols = websocket.request.headers["Sec-WebSocket-Protocol"]
    except KeyError:
        logging.error("Client hasn't requested any Subprotocol. Closing Connection")
        return await websocket.close()
    if not websocket.subprotocol:
        logging.warning("Protocols Mismatched | Expected Subprotocols: %s, but client supports %s | Closing connection",
                        websocket.available_subprotocols, requested_protocols)
        return await websocket.close()
    charge_point_id = websocket.request.path.strip("/").rsplit("/", 1)[-1]
    charge_point = ChargePoint(charge_point_id, websocket)
    try:
        await charge_point.start()
    except websockets.exceptions.ConnectionClosed:
        pass


async def main(port: int) -> None:
    server = await websockets.serve(on_connect, "127.0.0.1", port, subprotocols=["ocpp1.6"])
    logging.warning("Reference CSMS listening on ws://127.0.0.1:%d/ocpp/<id>", server.sockets[0].getsockname()[1])
    await server.wait_closed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Reference OCPP 1.6J central system (ocpp + websockets).")
    parser.add_argument("--port", type=int, default=9100)
    asyncio.run(main(parser.parse_args().port))
