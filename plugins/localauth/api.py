"""Operator API routes of the Local Auth List Management profile."""
from __future__ import annotations

from twisted.internet import defer

from csms.api.errors import ApiError, conflict, not_found, unprocessable
from csms.api.resource import paginated
from csms.api.router import PAGINATION
from csms.api.stations import send_call
from csms.api.types import BOOLEAN, INTEGER, TEXT, array, columns, enum, nullable, ocpp_schema, page, record

from .lists import UPDATE_TYPES
from .plugin import MAX_LIST_KEY, MAX_SEND_KEY, IdTagsUnavailable, ListTooLong, NothingToSend, version_matches
from .tables import stations, updates

SYNC_BODY = {
    "type": "object", "additionalProperties": False, "required": ["update_type"],
    "properties": {"update_type": {"type": "string", "enum": list(UPDATE_TYPES),
                                   "description": "Full: the whole list; Differential: the changes since the "
                                                  "version the station acknowledged"}},
}
TAGS_BODY = {
    "type": "object", "additionalProperties": False, "required": ["id_tags"],
    "properties": {"id_tags": {
        "description": "The id tags to put on this station's list; null for every id tag the CSMS holds",
        "oneOf": [{"type": "null"},
                  {"type": "array", "uniqueItems": True, "maxItems": 100000,
                   "items": {"type": "string", "minLength": 1, "maxLength": 20}}]}},
}

_STATE = columns(stations, "selection", "sent_version", "sent_update_type", "sent_at", "acknowledged_version",
                 "acknowledged_at", "reported_version", "reported_at", "last_status", "last_status_at", "last_error",
                 "not_supported")
ID_TAG_INFO = ocpp_schema("SendLocalList", "properties", "localAuthorizationList", "items", "properties", "idTagInfo",
                          title="IdTagInfo", description="An OCPP 1.6 IdTagInfo")
CHANGES = record({"added": array(TEXT), "changed": array(TEXT), "removed": array(TEXT)}, title="LocalListChanges")
LOCAL_LIST = record({
    "station_id": TEXT, **_STATE,
    "id_tags": nullable(array(TEXT, description="The chosen id tags; null: every id tag")),
    "version_matches": nullable(BOOLEAN),
    "limits": record({MAX_LIST_KEY: nullable(INTEGER), MAX_SEND_KEY: nullable(INTEGER)}, title="LocalListLimits"),
    "entries": array(record({"idTag": TEXT, "idTagInfo": ID_TAG_INFO}),
                     description="The list as the station acknowledged it"),
    "pending_changes": nullable(CHANGES),
}, title="LocalList")
SYNC_REPORT = record({
    "station_id": TEXT, "requested_update_type": enum(UPDATE_TYPES), "fallback_to_full": BOOLEAN,
    "requests": array(record({"list_version": INTEGER, "update_type": enum(UPDATE_TYPES), "entries": INTEGER,
                              "status": TEXT})),
    "changes": CHANGES, "status": TEXT, "update_type": enum(UPDATE_TYPES), "list_version": INTEGER,
    "acknowledged_version": nullable(INTEGER), "entries": INTEGER,
}, optional=("changes",))
VERSION_READ = record({"station_id": TEXT, "list_version": INTEGER, "acknowledged_version": nullable(INTEGER),
                       "sent_version": nullable(INTEGER), "version_matches": nullable(BOOLEAN)})
UPDATE_RECORD = record(columns(updates), title="LocalListUpdate")


def add_routes(plugin, app, router):
    def api_call(station_id, action, payload):
        return defer.ensureDeferred(send_call(app, station_id, action, payload))

    async def existing(station_id: str) -> None:
        if await app.station_store.get(station_id) is None:
            raise not_found("station", station_id)

    def require_connected(station_id: str) -> None:
        if not app.is_connected(station_id):
            raise ApiError(409, "station_offline", f"Station {station_id!r} is not connected")

    async def view(station_id: str) -> dict:
        state = await plugin.store.state(station_id)
        try:
            pending = await plugin.pending_changes(station_id, state)
        except IdTagsUnavailable:
            pending = None
        return {
            "station_id": station_id,
            "selection": state["selection"],
            "id_tags": state["chosen"],
            "sent_version": state["sent_version"],
            "sent_update_type": state["sent_update_type"],
            "sent_at": state["sent_at"],
            "acknowledged_version": state["acknowledged_version"],
            "acknowledged_at": state["acknowledged_at"],
            "reported_version": state["reported_version"],
            "reported_at": state["reported_at"],
            "version_matches": version_matches(state),
            "last_status": state["last_status"],
            "last_status_at": state["last_status_at"],
            "last_error": state["last_error"],
            "not_supported": state["not_supported"],
            "limits": await plugin.limits(station_id),
            "entries": [{"idTag": tag, "idTagInfo": state["entries"][tag]} for tag in sorted(state["entries"])],
            "pending_changes": pending,
        }

    async def get_local_list(request):
        station_id = request.params["station_id"]
        await existing(station_id)
        return await view(station_id)

    async def choose_local_list_tags(request):
        station_id = request.params["station_id"]
        await existing(station_id)
        id_tags = request.body["id_tags"]
        if id_tags is not None:
            known = await app.lookup("csms_id_tags", default=None, id_tags=id_tags)
            if known is None:
                raise conflict("No enabled plugin provides id tags (csms_id_tags)", "id_tags_unavailable")
            unknown = sorted(set(id_tags) - {tag["id_tag"] for tag in known})
            if unknown:
                raise unprocessable(f"Unknown id tags: {', '.join(unknown)}", "unknown_id_tags", id_tags=unknown)
            id_tags = sorted(id_tags)
        await plugin.store.choose_tags(station_id, id_tags)
        return await view(station_id)

    async def sync_local_list(request):
        station_id = request.params["station_id"]
        await existing(station_id)
        require_connected(station_id)
        try:
            return await plugin.sync(station_id, request.body["update_type"], call=api_call)
        except NothingToSend as exc:
            raise conflict(exc.message, exc.code, **exc.details)
        except ListTooLong as exc:
            raise unprocessable(exc.message, exc.code, **exc.details)
        except IdTagsUnavailable as exc:
            raise conflict(exc.message, exc.code)

    async def read_local_list_version(request):
        station_id = request.params["station_id"]
        await existing(station_id)
        require_connected(station_id)
        return await plugin.read_version(station_id, call=api_call)

    async def list_local_list_updates(request):
        station_id = request.params["station_id"]
        await existing(station_id)
        limit, offset = request.page()
        total, items = await plugin.store.history(station_id, limit, offset)
        return paginated(items, total, limit, offset)

    tags = ("local list",)
    known = {"404": "Unknown station"}
    router.add("GET", "/stations/{station_id}/local-list", get_local_list,
               "The station's local list: versions sent, acknowledged and read back, the acknowledged "
               "content and the changes a Differential would send", tags=tags, response=LOCAL_LIST, responses={"200": "OK", **known})
    router.add("PUT", "/stations/{station_id}/local-list/tags", choose_local_list_tags,
               "Choose which id tags go onto the station's list (null: all of them)", tags=tags, body=TAGS_BODY,
               response=LOCAL_LIST,
               responses={"200": "OK", **known, "422": "Unknown id tags"})
    router.add("POST", "/stations/{station_id}/local-list/sync", sync_local_list,
               "Send the list to the station with SendLocalList (Full or Differential)", tags=tags, body=SYNC_BODY,
               response=SYNC_REPORT,
               description="Lists longer than the station's SendLocalListMaxLength go out in chunks (a Full first "
                           "chunk, then Differential chunks with increasing versions). A Differential answered "
                           "VersionMismatch falls back to a Full update. The answer reports every request and the "
                           "station's final status (Accepted, Failed, NotSupported, VersionMismatch).",
               responses={"200": "The sync report", **known,
                          "409": "Station not connected, or a Differential with nothing to send",
                          "422": "The list is longer than the station's LocalAuthListMaxLength",
                          "502": "The station answered with an error", "504": "No answer in time"}, scope="commands")
    router.add("POST", "/stations/{station_id}/local-list/version", read_local_list_version,
               "Read the station's list version back (GetLocalListVersion) and compare it", tags=tags,
               response=VERSION_READ,
               responses={"200": "OK", **known, "409": "Station not connected"}, scope="commands")
    router.add("GET", "/stations/{station_id}/local-list/updates", list_local_list_updates,
               "Every answered SendLocalList, newest first", tags=tags, query=PAGINATION, response=page(UPDATE_RECORD),
               responses={"200": "OK", **known})
