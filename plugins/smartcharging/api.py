"""The Smart Charging profile's operator API routes: set, clear and list charging profiles; the
composite schedule as the CSMS computes it (preview) and as the station reports it (compared)."""
from __future__ import annotations

from csms.api.errors import ApiError, not_found
from csms.api.inputs import INT32_MAX
from csms.api.resource import paginated
from csms.api.router import PAGINATION, Path, Query
from csms.api.stations import send_call
from csms.api.types import (BOOLEAN, CHARGING_PROFILE, CHARGING_SCHEDULE, DATE_TIME, INTEGER, NUMBER, array,
                            columns, enum, nullable, ocpp_response, page, record)
from csms.ocpp16 import format_datetime, parse_datetime

from . import composite
from .store import STATES
from .tables import profiles
from .validation import PURPOSES

CONNECTOR = {"type": "integer", "minimum": 0, "maximum": INT32_MAX}
SET_PROFILE = {
    "type": "object", "additionalProperties": False, "required": ["connector_id", "charging_profile"],
    "properties": {
        "connector_id": dict(CONNECTOR, description="0 for the whole station (ChargePointMaxProfile, TxDefaultProfile)"),
        "charging_profile": CHARGING_PROFILE,
    },
}
CLEAR = {
    "type": "object", "additionalProperties": False,
    "description": "Every field optional; the station clears the profiles matching all the fields given, "
                   "and all profiles when none is given (OCPP 1.6 §5.5)",
    "properties": {
        "id": {"type": "integer", "description": "chargingProfileId"},
        "connector_id": CONNECTOR,
        "purpose": {"type": "string", "enum": list(PURPOSES)},
        "stack_level": {"type": "integer", "minimum": 0},
    },
}
#: The longest composite schedule window the API asks for or computes (31 days).
MAX_WINDOW = 31 * 86400
ASK_COMPOSITE = {
    "type": "object", "additionalProperties": False, "required": ["connector_id", "duration"],
    "properties": {
        "connector_id": CONNECTOR,
        "duration": {"type": "integer", "minimum": 1, "maximum": MAX_WINDOW,
                     "description": "Seconds (at most 31 days, as the preview's)"},
        "charging_rate_unit": {"type": "string", "enum": ["A", "W"]},
    },
}
LIST_QUERY = PAGINATION + (
    Query("connector_id", "integer", "Only this connector's profiles", minimum=0, maximum=INT32_MAX),
    Query("state", enum=STATES + ("all",), description="Default: installed"),
)
PREVIEW_QUERY = (
    Query("connector_id", "integer", "The connector (0: the whole station); default 1", minimum=0,
          maximum=INT32_MAX),
    Query("duration", "integer", "Seconds; default 86400", minimum=1, maximum=MAX_WINDOW),
    Query("charging_rate_unit", enum=("A", "W"), description="Default: [plugin:smartcharging] default_rate_unit"),
    Query("start", "date-time", "Window start; default now"),
)
#: chargingProfileId is an OCPP integer (32-bit).
CHARGING_PROFILE_ID = Path("charging_profile_id", "integer", minimum=-INT32_MAX - 1, maximum=INT32_MAX,
                           resource="charging profile")
TAGS = ("smart charging",)
COMMAND_RESPONSES = {"200": "The station's answer", "404": "Unknown station", "409": "Station not connected",
                     "422": "Invalid profile; nothing was sent", "502": "The station answered with an error",
                     "504": "The station did not answer in time"}

PROFILE_RECORD = record({**columns(profiles), "profile": CHARGING_PROFILE}, title="ChargingProfileRecord")
#: The composite schedule as this API shows it: OCPP's ChargingSchedule, a period limit of null marking a gap
#: no profile limits (OCPP has no way to say it).
COMPOSITE_SCHEDULE = dict(CHARGING_SCHEDULE, title="CompositeChargingSchedule",
                          description="An OCPP ChargingSchedule; a period limit of null marks an unlimited gap")
_PERIOD = COMPOSITE_SCHEDULE["properties"]["chargingSchedulePeriod"]
COMPOSITE_SCHEDULE["properties"] = dict(COMPOSITE_SCHEDULE["properties"], chargingSchedulePeriod=dict(
    _PERIOD, items=dict(_PERIOD["items"], properties=dict(_PERIOD["items"]["properties"],
                                                          limit=nullable(_PERIOD["items"]["properties"]["limit"])))))
SET_RESULT = record({"status": enum(("Accepted", "Rejected", "NotSupported")), "profile": nullable(PROFILE_RECORD)})
CLEAR_RESULT = record({"status": enum(("Accepted", "Unknown")),
                       "cleared": array(INTEGER, description="Records (id) the station's answer closed")})
SCHEDULE = record({"start": DATE_TIME, "duration": INTEGER, "chargingRateUnit": enum(("A", "W")),
                   "chargingSchedule": nullable(COMPOSITE_SCHEDULE)},
                  title="CompositeScheduleView")
PREVIEW = record({**SCHEDULE["properties"], "connectorId": INTEGER})
DIFFERENCE = record({"from": DATE_TIME, "to": DATE_TIME, "station_limit": nullable(NUMBER),
                     "csms_limit": nullable(NUMBER)}, title="ScheduleDifference")
COMPARISON = record({"status": enum(("Accepted", "Rejected")), "station": ocpp_response("GetCompositeSchedule"),
                     "csms": SCHEDULE, "matches": BOOLEAN, "differences": array(DIFFERENCE)})


def schedule_view(schedule: composite.CompositeSchedule) -> dict:
    return {"start": format_datetime(composite.window_start(schedule.start)), "duration": schedule.duration,
            "chargingRateUnit": schedule.unit, "chargingSchedule": schedule.to_charging_schedule()}


def add_routes(plugin, app, router):
    store = plugin.store

    async def existing_station(station_id: str) -> None:
        if await app.station_store.get(station_id) is None:
            raise not_found("station", station_id)

    async def set_profile(request):
        station_id, body = request.params["station_id"], request.body
        await existing_station(station_id)
        profile = body["charging_profile"]
        response = await send_call(app, station_id, "SetChargingProfile",
                                   {"connectorId": body["connector_id"], "csChargingProfiles": profile})
        _, rows = await store.list(station_id, connector_id=body["connector_id"], limit=1)
        record = rows[0] if rows and rows[0]["charging_profile_id"] == profile["chargingProfileId"] else None
        return {"status": response["status"], "profile": record}

    async def list_profiles(request):
        station_id = request.params["station_id"]
        await existing_station(station_id)
        limit, offset = request.page()
        state = request.query.get("state", "installed")
        total, rows = await store.list(station_id, connector_id=request.query.get("connector_id"),
                                       states=None if state == "all" else (state,), limit=limit, offset=offset)
        return paginated(rows, total, limit, offset)

    async def clear(station_id: str, payload: dict) -> dict:
        await existing_station(station_id)
        before = {row["id"] for row in await store.installed(station_id)}
        response = await send_call(app, station_id, "ClearChargingProfile", payload)
        after = {row["id"] for row in await store.installed(station_id)}
        return {"status": response["status"], "cleared": sorted(before - after)}

    async def clear_by_id(request):
        return await clear(request.params["station_id"], {"id": request.params["charging_profile_id"]})

    async def clear_by_criteria(request):
        body = request.body or {}
        names = {"id": "id", "connector_id": "connectorId", "purpose": "chargingProfilePurpose",
                 "stack_level": "stackLevel"}
        return await clear(request.params["station_id"],
                           {names[key]: value for key, value in body.items() if value is not None})

    async def preview(request):
        station_id = request.params["station_id"]
        await existing_station(station_id)
        query = request.query
        start = query.get("start") or app.now()
        schedule = await plugin.composite(station_id, query.get("connector_id", 1), start,
                                          query.get("duration", 86400), query.get("charging_rate_unit"))
        return dict(schedule_view(schedule), connectorId=query.get("connector_id", 1))

    async def ask_composite(request):
        station_id, body = request.params["station_id"], request.body
        await existing_station(station_id)
        payload = {"connectorId": body["connector_id"], "duration": body["duration"]}
        if body.get("charging_rate_unit"):
            payload["chargingRateUnit"] = body["charging_rate_unit"]
        asked_at = app.now()
        response = await send_call(app, station_id, "GetCompositeSchedule", payload)
        reported = response.get("chargingSchedule")
        unit = body.get("charging_rate_unit") or (reported or {}).get("chargingRateUnit")
        start = asked_at
        for candidate in (response.get("scheduleStart"), (reported or {}).get("startSchedule")):
            if candidate:
                try:
                    start = parse_datetime(candidate)
                    break
                except ValueError:
                    continue
        if not composite.window_fits(start, body["duration"]):
            # A station's scheduleStart near the end of year 9999: no schedule can be computed there.
            raise ApiError(502, "station_invalid_response", "The station's GetCompositeSchedule response is "
                           f"invalid: its schedule starts at {format_datetime(start)}, and a window of "
                           f"{body['duration']} s from there ends after the year 9999",
                           {"code": "PropertyConstraintViolation", "response": response})
        expected = await plugin.composite(station_id, body["connector_id"], start, body["duration"], unit)
        differences = composite.compare(reported, expected, plugin.voltage, plugin.tolerance) \
            if response["status"] == "Accepted" else []
        return {"status": response["status"], "station": response, "csms": schedule_view(expected),
                "matches": response["status"] == "Accepted" and not differences, "differences": differences}

    base = "/stations/{station_id}"
    router.add("POST", base + "/charging-profiles", set_profile,
               "Send a charging profile (SetChargingProfile), checked first", tags=TAGS, body=SET_PROFILE,
               response=SET_RESULT,
               description="422 with the list of problems when the profile breaks an OCPP 1.6 rule (see "
                           "docs/smartcharging.md); nothing is sent then. The answer holds the station's status "
                           "and the CSMS's record of the profile (installed, or rejected).",
               responses=COMMAND_RESPONSES, scope="commands")
    router.add("GET", base + "/charging-profiles", list_profiles,
               "The charging profiles the CSMS has recorded for a station (installed by default)", tags=TAGS,
               query=LIST_QUERY, response=page(PROFILE_RECORD), responses={"200": "OK", "404": "Unknown station"})
    router.add("DELETE", base + "/charging-profiles/{charging_profile_id}", clear_by_id,
               "Clear one charging profile by its chargingProfileId (ClearChargingProfile id)", tags=TAGS,
               path=(CHARGING_PROFILE_ID,), response=CLEAR_RESULT, responses=COMMAND_RESPONSES,
               scope="commands")
    router.add("POST", base + "/charging-profiles/clear", clear_by_criteria,
               "Clear charging profiles by id, connector, purpose and stack level; an empty body clears all",
               tags=TAGS, body=CLEAR, body_required=False, response=CLEAR_RESULT, responses=COMMAND_RESPONSES, scope="commands")
    router.add("GET", base + "/composite-schedule/preview", preview,
               "The composite schedule the CSMS expects the station to apply (computed here, nothing sent)",
               tags=TAGS, query=PREVIEW_QUERY, response=PREVIEW, responses={"200": "OK", "404": "Unknown station"})
    router.add("POST", base + "/composite-schedule", ask_composite,
               "Ask the station for its composite schedule (GetCompositeSchedule) and compare it with the "
               "CSMS's own computation", tags=TAGS, body=ASK_COMPOSITE, response=COMPARISON,
               responses=COMMAND_RESPONSES, scope="commands")

