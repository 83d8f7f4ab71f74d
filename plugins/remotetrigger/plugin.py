"""The Remote Trigger profile (OCPP 1.6 §5.17): ask a station to send a message now.

The triggered message itself is an ordinary CP->CS call: the plugin that owns its action answers it
(Core for BootNotification, Heartbeat, MeterValues and StatusNotification; Firmware Management for
the two status notifications), exactly as if the station had sent it unprompted.
"""
from __future__ import annotations

import os

from datetime import datetime, timezone

from sqlalchemy import delete, func, insert, select
from zope.interface import implementer

from csms import ocpp16
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from csms.stations import as_utc

from .tables import metadata, requests

#: MessageTrigger (OCPP 1.6 §7.39).
REQUESTED_MESSAGES = ("BootNotification", "DiagnosticsStatusNotification", "FirmwareStatusNotification",
                      "Heartbeat", "MeterValues", "StatusNotification")
#: The ones a connectorId means something for; the others concern the whole station.
CONNECTOR_MESSAGES = ("MeterValues", "StatusNotification")


class TriggerStore:
    def __init__(self, db, clock):
        self.db = db
        self.clock = clock

    def record(self, station_id: str, request: dict, status: str):
        now = datetime.fromtimestamp(self.clock.seconds(), tz=timezone.utc)

        def thd(conn):
            conn.execute(insert(requests).values(station_id=station_id, requested_message=request["requestedMessage"],
                                                 connector_id=request.get("connectorId"), status=status,
                                                 answered_at=now))
        return self.db.run(thd, desc="remotetrigger_record")

    def history(self, station_id: str, limit: int, offset: int):
        """(total, answered TriggerMessages newest first)."""
        def thd(conn):
            query = select(requests).where(requests.c.station_id == station_id)
            total = conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
            rows = conn.execute(query.order_by(requests.c.id.desc()).limit(limit).offset(offset)).fetchall()
            items = []
            for row in rows:
                item = dict(row._mapping)
                item["answered_at"] = as_utc(item["answered_at"])
                items.append(item)
            return total, items
        return self.db.run(thd, desc="remotetrigger_history")

    def delete_station(self, station_id: str):
        def thd(conn):
            conn.execute(delete(requests).where(requests.c.station_id == station_id))
        return self.db.run(thd, desc="remotetrigger_delete_station")


@implementer(ICSMSPlugin)
class RemoteTriggerPlugin:
    name = "remotetrigger"
    #: Its Alembic migration history (docs/migrations.md).
    migrations = os.path.join(os.path.dirname(__file__), "migrations")
    profile = ocpp16.REMOTE_TRIGGER
    inbound_actions = ocpp16.inbound_of(ocpp16.REMOTE_TRIGGER)
    outbound_actions = ocpp16.outbound_of(ocpp16.REMOTE_TRIGGER)
    settings = ()

    app = None
    store: TriggerStore | None = None

    @hookimpl
    def csms_configure(self, app):
        self.app = app
        self.store = TriggerStore(app.db, app.clock)

    @hookimpl
    def csms_tables(self):
        return metadata

    @hookimpl
    def csms_retention(self, app):
        # Imported here: one hunk beside csms_tables, for easy merges with the handlers' changes.
        from csms.retention import Retention

        from .tables import requests

        return [Retention("remotetrigger_requests", requests, "answered_at",
                          "Days the record of answered TriggerMessage calls is kept.")]

    @hookimpl
    def csms_api_routes(self, app, router):
        from .api import add_routes
        add_routes(self, app, router)

    async def warnings(self, station_id: str, requested_message: str, connector_id: int | None) -> list[str]:
        """What an operator should know about a trigger that will be sent anyway (TC_055 sends one on purpose)."""
        if connector_id is None:
            return []
        out = []
        if requested_message not in CONNECTOR_MESSAGES:
            out.append(f"connectorId has no meaning for {requested_message}; the station may ignore or reject it")
        if connector_id > 0:
            known = await self.app.lookup("csms_connector_ids", default=None, station_id=station_id)
            if known is not None and connector_id not in known:
                have = ", ".join(map(str, known)) if known else "none reported"
                out.append(f"Station {station_id!r} has no connector {connector_id} (its connectors: {have})")
        return out

    @hookimpl
    def csms_on_call_completed(self, station_id, action, request, response):
        if action == "TriggerMessage":
            return self.store.record(station_id, request, response["status"])
        return None

    @hookimpl
    def csms_on_station_deleted(self, station_id):
        return self.store.delete_station(station_id)
