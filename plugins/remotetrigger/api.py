"""Operator API routes of the Remote Trigger profile."""
from __future__ import annotations

from csms.api.errors import not_found
from csms.api.inputs import INT32_MAX
from csms.api.resource import paginated
from csms.api.router import PAGINATION
from csms.api.stations import send_call
from csms.api.types import INTEGER, TEXT, array, columns, enum, nullable, page, record

from .plugin import REQUESTED_MESSAGES
from .tables import requests

TRIGGER_BODY = {
    "type": "object", "additionalProperties": False, "required": ["requested_message"],
    "properties": {
        "requested_message": {"type": "string", "enum": list(REQUESTED_MESSAGES)},
        "connector_id": {"type": "integer", "minimum": 0, "maximum": INT32_MAX,
                         "description": "Sent even when the station has no such connector (flagged in warnings)"},
    },
}

TRIGGER_RESULT = record({"station_id": TEXT, "requested_message": enum(REQUESTED_MESSAGES),
                         "connector_id": nullable(INTEGER),
                         "status": enum(("Accepted", "Rejected", "NotImplemented")),
                         "warnings": array(TEXT, description="E.g. a connector the station has not reported")})
TRIGGER_RECORD = record(columns(requests), title="TriggerRecord")


def add_routes(plugin, app, router):
    async def existing(station_id: str) -> None:
        if await app.station_store.get(station_id) is None:
            raise not_found("station", station_id)

    async def trigger_message(request):
        station_id = request.params["station_id"]
        await existing(station_id)
        requested, connector_id = request.body["requested_message"], request.body.get("connector_id")
        payload = {"requestedMessage": requested}
        if connector_id is not None:
            payload["connectorId"] = connector_id
        warnings = await plugin.warnings(station_id, requested, connector_id)
        response = await send_call(app, station_id, "TriggerMessage", payload)
        return {"station_id": station_id, "requested_message": requested, "connector_id": connector_id,
                "status": response["status"], "warnings": warnings}

    async def list_triggers(request):
        station_id = request.params["station_id"]
        await existing(station_id)
        limit, offset = request.page()
        total, items = await plugin.store.history(station_id, limit, offset)
        return paginated(items, total, limit, offset)

    tags = ("remote trigger",)
    router.add("POST", "/stations/{station_id}/trigger", trigger_message,
               "Ask the station to send a message now (TriggerMessage)", tags=tags, body=TRIGGER_BODY,
               response=TRIGGER_RESULT,
               description="Answers with the station's status (Accepted, Rejected, NotImplemented) and warnings, "
                           "e.g. for a connector the station has not reported. The triggered message is handled "
                           "by its own profile when it arrives.",
               responses={"200": "The station's answer", "404": "Unknown station", "409": "Station not connected",
                          "422": "Unknown requested_message or bad connector_id", "502": "The station answered "
                          "with an error", "504": "No answer in time"}, scope="commands")
    router.add("GET", "/stations/{station_id}/triggers", list_triggers, "Every answered TriggerMessage, newest first",
               tags=tags, query=PAGINATION, response=page(TRIGGER_RECORD),
               responses={"200": "OK", "404": "Unknown station"})
