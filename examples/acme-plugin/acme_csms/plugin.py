"""The plugin: its actions and their schemas, its table, its routes and its event listener."""
from __future__ import annotations

import os
from importlib.resources import files

from sqlalchemy import BigInteger, Column, DateTime, MetaData, String, Table, delete, insert, select
from zope.interface import implementer

from csms.api import Path
from csms.api.errors import not_found
from csms.api.stations import send_call
from csms.api.types import DATE_TIME, INTEGER, TEXT, array, nullable, ocpp_response, record
from csms.db import BIG_KEY
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from csms.schemas import schemas_in
from csms.stations import as_utc

metadata = MetaData()

#: Every AcmeHello a station sent; the table name starts with the plugin's name, as every plugin's must.
hellos = Table(
    "acmehub_hellos", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("station_id", String(255), nullable=False, index=True),
    # ACME's second-generation serial numbers are up to 40 characters (migration acmehub_0002).
    Column("serial_number", String(40), nullable=False),
    Column("module_count", BigInteger, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    # Sent since firmware 2.0; absent from older stations' hellos (added by migration acmehub_0002).
    Column("firmware_version", String(50)),
)

REBOOT = {
    "type": "object", "additionalProperties": False, "required": ["module"],
    "properties": {"module": {"type": "integer", "minimum": 1, "maximum": 16},
                   "delaySeconds": {"type": "integer", "minimum": 0, "maximum": 3600}},
}

#: What the hellos route answers: declared with the route, so that the OpenAPI document types it and
#: the test fixtures hold every answer to it.
HELLOS = record({"station_id": TEXT, "items": array(record(
    {"serial_number": TEXT, "module_count": INTEGER, "firmware_version": nullable(TEXT), "received_at": DATE_TIME},
    title="AcmeHelloRecord"))})


class AcmeStore:
    """The plugin's database work: each method returns a Deferred; the SQL runs on the database pool."""

    def __init__(self, app):
        self.app = app

    def record_hello(self, station_id: str, payload: dict):
        row = {"station_id": station_id, "serial_number": payload["serialNumber"],
               "module_count": payload["moduleCount"], "firmware_version": payload.get("firmwareVersion"),
               "received_at": self.app.now()}

        def thd(conn):
            conn.execute(insert(hellos).values(**row))
        return self.app.db.run(thd, desc="acmehub_record_hello")

    def hellos(self, station_id: str):
        def thd(conn):
            rows = conn.execute(select(hellos.c.serial_number, hellos.c.module_count, hellos.c.firmware_version,
                                       hellos.c.received_at)
                                .where(hellos.c.station_id == station_id).order_by(hellos.c.id)).fetchall()
            return [{"serial_number": serial, "module_count": modules, "firmware_version": firmware,
                     "received_at": as_utc(at)} for serial, modules, firmware, at in rows]
        return self.app.db.run(thd, desc="acmehub_hellos")

    def forget(self, station_id: str):
        def thd(conn):
            conn.execute(delete(hellos).where(hellos.c.station_id == station_id))
        return self.app.db.run(thd, desc="acmehub_forget")


@implementer(ICSMSPlugin)
class AcmePlugin:
    name = "acmehub"
    #: Its own migration history (docs/migrations.md), shipped in the package (see pyproject.toml's package-data).
    migrations = os.path.join(os.path.dirname(__file__), "migrations")
    profile = None
    settings = ()
    inbound_actions = ("AcmeHello",)
    outbound_actions = ("AcmeReboot",)
    #: schemas/AcmeHello.json, schemas/AcmeHelloResponse.json, ... shipped in this package.
    action_schemas = schemas_in(files("acme_csms") / "schemas", "AcmeHello", "AcmeReboot")

    @hookimpl
    def csms_configure(self, app):
        self.app = app
        self.store = AcmeStore(app)

    @hookimpl
    def csms_tables(self):
        return metadata

    @hookimpl
    def csms_handle_call(self, station, action, payload):
        # Only AcmeHello reaches this plugin (the one inbound action it lists), already schema-valid.
        return self._hello(station, payload)

    async def _hello(self, station, payload):
        await self.store.record_hello(station.station_id, payload)
        return {"status": "Accepted"}

    @hookimpl
    def csms_on_station_deleted(self, station_id):
        return self.store.forget(station_id)

    @hookimpl
    def csms_api_routes(self, app, router):
        router.add("GET", "/acmehub/stations/{station_id}/hellos", self.list_hellos,
                   "What an ACME station said in its AcmeHello messages, oldest first", tags=("acmehub",),
                   response=HELLOS,
                   responses={"200": "OK", "404": "Unknown station"})
        router.add("POST", "/acmehub/stations/{station_id}/reboot", self.reboot,
                   "Reboot one power module of an ACME station (AcmeReboot)", tags=("acmehub",), body=REBOOT,
                   response=ocpp_response("AcmeReboot"), path=(Path("station_id", description="The station's id"),),
                   responses={"200": "The station's AcmeReboot response", "404": "Unknown station",
                              "409": "Station not connected", "502": "The station answered with an error",
                              "504": "The station did not answer in time"})

    async def _station(self, station_id: str) -> None:
        if await self.app.station_store.get(station_id) is None:
            raise not_found("station", station_id)

    async def list_hellos(self, request):
        station_id = request.params["station_id"]
        await self._station(station_id)
        return {"station_id": station_id, "items": await self.store.hellos(station_id)}

    async def reboot(self, request):
        station_id = request.params["station_id"]
        await self._station(station_id)
        return await send_call(self.app, station_id, "AcmeReboot", request.body)
