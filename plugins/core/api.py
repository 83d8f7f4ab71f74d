"""The Core profile's operator API routes: id tags, transactions, station status and friendly commands.

Request bodies are snake_case; friendly command endpoints translate them to the OCPP payload, fill
sensible defaults, and answer with the station's response payload as it sent it (see
:func:`csms.api.stations.send_call` for how every call outcome maps to an HTTP status).
"""
from __future__ import annotations

from csms.api.errors import conflict, not_found, unprocessable
from csms.api.inputs import INT32_MAX
from csms.api.resource import Response, paginated
from csms.api.router import PAGINATION, Path, Query
from csms.api.stations import send_call
from csms.api.types import BOOLEAN, CHARGING_PROFILE, INTEGER, array, columns, enum, nullable, ocpp_response, page, record
from csms.ocpp16 import parse_datetime

from .plugin import OperatorStopRefused
from .store import ID_TAG_STATUSES
from .tables import (boot_info, configuration, connectors, id_tags, meter_values, status_history, transactions,
                     unmatched_stops)

ID_TAG = {"type": "string", "minLength": 1, "maxLength": 20, "description": "OCPP IdToken: 1 to 20 characters"}
OPTIONAL_ID_TAG = {"type": ["string", "null"], "minLength": 1, "maxLength": 20}
DATE_TIME = {"type": ["string", "null"], "format": "date-time", "description": "ISO 8601 with an offset (or Z)"}
ID_TAG_FIELDS = {
    "status": {"type": "string", "enum": list(ID_TAG_STATUSES)},
    "expiry_date": DATE_TIME,
    "parent_id_tag": OPTIONAL_ID_TAG,
    "description": {"type": ["string", "null"], "maxLength": 1000},
}
ID_TAG_CREATE = {"type": "object", "additionalProperties": False, "required": ["id_tag"],
                 "properties": {"id_tag": ID_TAG, **ID_TAG_FIELDS}}
ID_TAG_UPDATE = {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": ID_TAG_FIELDS}

TRANSACTION_FILTERS = (Query("station_id"), Query("id_tag"),
                       Query("active", "boolean", "Only open (true) or closed (false) transactions"),
                       Query("since", "date-time", "Started at or after"),
                       Query("until", "date-time", "Started before"))

STOP_REASONS = ("EmergencyStop", "EVDisconnected", "HardReset", "Local", "Other", "PowerLoss", "Reboot", "Remote",
                "SoftReset", "UnlockCommand", "DeAuthorized")
OPERATOR_STOP = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "reason": {"type": "string", "enum": list(STOP_REASONS), "description": "Default: Other"},
        "meter_stop": {"type": ["integer", "null"], "minimum": 0,
                       "description": "Meter reading in Wh, if known; not below the transaction's meter_start"},
        "stopped_at": {"type": "string", "format": "date-time",
                       "description": "Default: now; not before the transaction's start, nor later than now"},
    },
}

#: Connector ids are OCPP integers (32-bit), as the station's own messages carry them (csms.schemas).
CONNECTOR = {"type": "integer", "minimum": 1, "maximum": INT32_MAX}
#: Transaction ids are OCPP integers (32-bit): anything else cannot name one.
TRANSACTION_ID = Path("transaction_id", "integer", minimum=0, maximum=INT32_MAX, resource="transaction")


def _object(properties: dict, required: tuple = ()) -> dict:
    schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


REMOTE_START = _object({"id_tag": ID_TAG, "connector_id": CONNECTOR,
                        "charging_profile": CHARGING_PROFILE}, ("id_tag",))
REMOTE_STOP = _object({"transaction_id": {"type": "integer",
                                          "description": "Default: the station's only active transaction"}})
RESET = _object({"type": {"type": "string", "enum": ["Soft", "Hard"], "description": "Default: Soft"}})
UNLOCK = _object({"connector_id": CONNECTOR}, ("connector_id",))
AVAILABILITY = _object({"connector_id": {"type": "integer", "minimum": 0, "maximum": INT32_MAX,
                                         "description": "Default 0: the whole station"},
                        "type": {"type": "string", "enum": ["Operative", "Inoperative"]}}, ("type",))
FETCH_CONFIGURATION = _object({"keys": {"type": "array", "items": {"type": "string", "minLength": 1,
                                                                  "maxLength": 50},
                                        "description": "Default: every key"}})
CHANGE_CONFIGURATION = _object({"value": {"type": "string", "maxLength": 500}}, ("value",))
EMPTY = _object({})
DATA_TRANSFER = _object({"vendor_id": {"type": "string", "minLength": 1, "maxLength": 255},
                         "message_id": {"type": "string", "maxLength": 50},
                         "data": {"type": "string"}}, ("vendor_id",))

# -- what the routes answer --------------------------------------------------------------------------

ID_TAG_VIEW = record({**columns(id_tags), "effective_status": enum(
    ID_TAG_STATUSES, description="status, or Expired once expiry_date has passed")}, title="IdTag")
METER_VALUE = record(columns(meter_values, *(c.name for c in meter_values.c
                                             if c.name not in ("id", "station_id", "transaction_id"))),
                     title="MeterValueSample")
_TRANSACTION = {**columns(transactions, rename={"id": "transaction_id"}),
                "active": dict(BOOLEAN, description="Not stopped yet")}
TRANSACTION_SUMMARY = record({**_TRANSACTION, "latest_meter_values": array(
    METER_VALUE, description="The samples of its most recent meter value timestamp")}, title="TransactionSummary")
TRANSACTION = record({**_TRANSACTION, "meter_values": array(METER_VALUE, description="Oldest first")},
                     title="Transaction")
STATUS_NOTIFICATION = record(columns(status_history), title="StatusNotificationRecord")
CONFIGURATION = record({"items": array(record(columns(configuration), title="ConfigurationKey"))})
UNMATCHED_STOP = record(columns(unmatched_stops), title="UnmatchedStop")
#: What csms_station_details adds to each station view (see plugin.py).
STATION_DETAILS = {
    "boot": nullable(record(columns(boot_info, *(c.name for c in boot_info.c if c.name != "station_id")),
                            title="BootInfo", description="The last BootNotification")),
    "connectors": array(record(columns(connectors, *(c.name for c in connectors.c if c.name != "station_id")),
                               title="ConnectorState")),
    "active_transaction_ids": array(INTEGER),
}
REMOTE_STOP_RESULT = record({"status": enum(("Accepted", "Rejected")), "transaction_id": INTEGER})

COMMAND_RESPONSES = {"200": "The station's response payload", "404": "Unknown station",
                     "409": "Station not connected", "502": "The station answered with an error",
                     "504": "The station did not answer in time"}


def _date_time(value, field: str):
    if value is None:
        return None
    try:
        return parse_datetime(value)
    except ValueError:
        raise unprocessable(f"Invalid request body: {field} must be an ISO 8601 date-time, got {value!r}")


def add_routes(plugin, app, router):
    store = plugin.store
    router.extend_schema("Station", STATION_DETAILS, plugin.name)

    def id_tag_view(tag: dict) -> dict:
        expiry = tag.get("expiry_date")
        effective = tag["status"]
        if effective == "Accepted" and expiry is not None and expiry <= app.now():
            effective = "Expired"
        return {**tag, "effective_status": effective}

    async def existing_station(station_id: str) -> dict:
        row = await app.station_store.get(station_id)
        if row is None:
            raise not_found("station", station_id)
        return row

    async def command(request, action: str, payload: dict):
        station_id = request.params["station_id"]
        await existing_station(station_id)
        return await send_call(app, station_id, action, payload)

    # -- id tags -------------------------------------------------------------------------------

    async def list_id_tags(request):
        limit, offset = request.page()
        total, tags = await store.list_id_tags(limit=limit, offset=offset, status=request.query.get("status"),
                                               parent_id_tag=request.query.get("parent_id_tag"),
                                               search=request.query.get("search"))
        return paginated([id_tag_view(t) for t in tags], total, limit, offset)

    def id_tag_values(body: dict) -> dict:
        values = {k: v for k, v in body.items() if k != "id_tag"}
        if "expiry_date" in values:
            values["expiry_date"] = _date_time(values["expiry_date"], "expiry_date")
        return values

    async def create_id_tag(request):
        body = request.body
        id_tag = body["id_tag"]
        values = id_tag_values(body)
        if values.get("parent_id_tag") == id_tag:
            raise unprocessable("Invalid request body: an id tag cannot be its own parent_id_tag")
        tag, created = await plugin.put_id_tag(id_tag, replace=False, **{"status": "Accepted", **values})
        if not created:  # checked by the insert itself: two creations at once make one tag and one 409
            raise conflict(f"Id tag {id_tag!r} already exists", "id_tag_exists")
        return Response(201, id_tag_view(tag), {"Location": f"/api/v1/id-tags/{id_tag}"})

    async def get_id_tag(request):
        tag = await store.get_id_tag(request.params["id_tag"])
        if tag is None:
            raise not_found("id tag", request.params["id_tag"])
        return id_tag_view(tag)

    async def update_id_tag(request):
        id_tag = request.params["id_tag"]
        values = id_tag_values(request.body)
        if values.get("parent_id_tag") == id_tag:
            raise unprocessable("Invalid request body: an id tag cannot be its own parent_id_tag")
        tag = await plugin.update_id_tag(id_tag, **values)
        if tag is None:
            raise not_found("id tag", id_tag)
        return id_tag_view(tag)

    async def delete_id_tag(request):
        if not await plugin.delete_id_tag(request.params["id_tag"]):
            raise not_found("id tag", request.params["id_tag"])
        return Response(204)

    tags = ("id tags",)
    router.add("GET", "/id-tags", list_id_tags, "List id tags (ordered by id tag)", tags=tags,
               response=page(ID_TAG_VIEW),
               query=PAGINATION + (Query("status", enum=ID_TAG_STATUSES),
                                   Query("parent_id_tag", description="Only the members of this group"),
                                   Query("search", description="Only id tags containing this text (ignoring "
                                                               "case)")))
    router.add("POST", "/id-tags", create_id_tag, "Create an id tag (status defaults to Accepted)", tags=tags,
               body=ID_TAG_CREATE, response=ID_TAG_VIEW, responses={"201": "Created", "409": "The id tag exists"})
    router.add("GET", "/id-tags/{id_tag}", get_id_tag, "One id tag", tags=tags, response=ID_TAG_VIEW,
               responses={"200": "OK", "404": "Unknown id tag"})
    router.add("PATCH", "/id-tags/{id_tag}", update_id_tag, "Change an id tag's status, expiry date, parent or "
               "description (null clears)", tags=tags, body=ID_TAG_UPDATE, response=ID_TAG_VIEW,
               responses={"200": "OK", "404": "Unknown id tag"})
    router.add("DELETE", "/id-tags/{id_tag}", delete_id_tag, "Delete an id tag", tags=tags,
               responses={"204": "Deleted", "404": "Unknown id tag"})

    # -- transactions --------------------------------------------------------------------------

    async def list_transactions(request):
        limit, offset = request.page()
        q = request.query
        total, items = await store.list_transactions(
            limit=limit, offset=offset, station_id=q.get("station_id"), id_tag=q.get("id_tag"),
            active=q.get("active"), since=q.get("since"), until=q.get("until"))
        return paginated(items, total, limit, offset)

    async def get_transaction(request):
        transaction_id = request.params["transaction_id"]
        transaction = await store.transaction_with_meter_values(transaction_id)
        if transaction is None:
            raise not_found("transaction", transaction_id)
        return transaction

    async def stop_transaction(request):
        transaction_id = request.params["transaction_id"]
        body = request.body
        try:
            transaction, stopped = await plugin.stop_transaction_by_operator(
                transaction_id, reason=body.get("reason", "Other"), meter_stop=body.get("meter_stop"),
                stopped_at=_date_time(body.get("stopped_at"), "stopped_at"))
        except OperatorStopRefused as exc:
            raise unprocessable(str(exc), exc.code)
        if transaction is None:
            raise not_found("transaction", transaction_id)
        if not stopped:
            raise conflict(f"Transaction {transaction_id} is already stopped", "transaction_stopped",
                           stopped_at=transaction["stopped_at"], stopped_by=transaction["stopped_by"])
        return await store.transaction_with_meter_values(transaction_id)

    tags = ("transactions",)
    router.add("GET", "/transactions", list_transactions, "List transactions, newest first, each with its "
               "latest meter values", tags=tags, response=page(TRANSACTION_SUMMARY),
               query=PAGINATION + TRANSACTION_FILTERS)
    from . import exports
    exports.add_routes(app, router, TRANSACTION_FILTERS)
    router.add("GET", "/transactions/{transaction_id}", get_transaction, "One transaction with all its meter "
               "values", tags=tags, path=(TRANSACTION_ID,), response=TRANSACTION,
               responses={"200": "OK", "404": "Unknown transaction"})
    router.add("POST", "/transactions/{transaction_id}/stop", stop_transaction,
               "Close a transaction the station will never stop (stuck); nothing is sent to the station",
               tags=tags, path=(TRANSACTION_ID,), body=OPERATOR_STOP, body_required=False, response=TRANSACTION,
               description="Recorded with stopped_by=operator and fires csms_on_transaction_stopped. "
                           "To ask a connected station to stop charging, use /stations/{station_id}/remote-stop.",
               responses={"200": "The stopped transaction", "404": "Unknown transaction",
                          "409": "Already stopped", "422": "A meter_stop below the transaction's meter_start "
                          "(meter_stop_below_start), a stopped_at before its start (stopped_before_start) or "
                          "later than now (stopped_in_future), or an invalid body"})

    # -- station state -------------------------------------------------------------------------

    async def status_history(request):
        station_id = request.params["station_id"]
        await existing_station(station_id)
        limit, offset = request.page()
        total, items = await store.status_history(station_id, limit=limit, offset=offset,
                                                  connector_id=request.query.get("connector_id"))
        return paginated(items, total, limit, offset)

    async def stored_configuration(request):
        station_id = request.params["station_id"]
        await existing_station(station_id)
        return {"items": await store.configuration(station_id)}

    async def unmatched_stops(request):
        station_id = request.params["station_id"]
        await existing_station(station_id)
        limit, offset = request.page()
        total, items = await store.unmatched_stops(station_id, limit=limit, offset=offset)
        return paginated(items, total, limit, offset)

    tags = ("stations",)
    router.add("GET", "/stations/{station_id}/status-history", status_history,
               "StatusNotifications as received, newest first", tags=tags, response=page(STATUS_NOTIFICATION),
               query=PAGINATION + (Query("connector_id", "integer", minimum=0, maximum=INT32_MAX),),
               responses={"200": "OK", "404": "Unknown station"})
    router.add("GET", "/stations/{station_id}/configuration", stored_configuration,
               "The station's configuration as last read back (configuration/fetch) or changed; "
               "known=false marks keys the station reported unknown", tags=tags, response=CONFIGURATION,
               responses={"200": "OK", "404": "Unknown station"})
    router.add("GET", "/stations/{station_id}/unmatched-stops", unmatched_stops,
               "StopTransactions for transactions the CSMS never knew, newest first", tags=tags,
               response=page(UNMATCHED_STOP),
               query=PAGINATION, responses={"200": "OK", "404": "Unknown station"})

    # -- friendly commands ----------------------------------------------------------------------

    async def remote_start(request):
        body = request.body
        payload = {"idTag": body["id_tag"]}
        if "connector_id" in body:
            payload["connectorId"] = body["connector_id"]
        if "charging_profile" in body:
            payload["chargingProfile"] = body["charging_profile"]
        return await command(request, "RemoteStartTransaction", payload)

    async def remote_stop(request):
        station_id = request.params["station_id"]
        await existing_station(station_id)
        transaction_id = request.body.get("transaction_id")
        if transaction_id is None:
            active = await store.active_transactions(station_id)
            if not active:
                raise conflict(f"Station {station_id!r} has no active transaction", "no_active_transaction")
            if len(active) > 1:
                raise conflict(f"Station {station_id!r} has {len(active)} active transactions: give "
                               "transaction_id", "ambiguous_transaction",
                               transaction_ids=[t["transaction_id"] for t in active])
            transaction_id = active[0]["transaction_id"]
        response = await send_call(app, station_id, "RemoteStopTransaction", {"transactionId": transaction_id})
        return {**response, "transaction_id": transaction_id}

    async def reset(request):
        return await command(request, "Reset", {"type": request.body.get("type", "Soft")})

    async def unlock(request):
        return await command(request, "UnlockConnector", {"connectorId": request.body["connector_id"]})

    async def availability(request):
        return await command(request, "ChangeAvailability", {"connectorId": request.body.get("connector_id", 0),
                                                              "type": request.body["type"]})

    async def fetch_configuration(request):
        payload = {"key": request.body["keys"]} if "keys" in request.body else {}
        return await command(request, "GetConfiguration", payload)

    async def change_configuration(request):
        return await command(request, "ChangeConfiguration", {"key": request.params["key"],
                                                              "value": request.body["value"]})

    async def clear_cache(request):
        return await command(request, "ClearCache", {})

    async def data_transfer(request):
        body = request.body
        payload = {"vendorId": body["vendor_id"]}
        if "message_id" in body:
            payload["messageId"] = body["message_id"]
        if "data" in body:
            payload["data"] = body["data"]
        return await command(request, "DataTransfer", payload)

    tags = ("commands",)
    for method, path, handler, summary, body, required, response in (
            ("POST", "remote-start", remote_start, "RemoteStartTransaction for an id tag", REMOTE_START, True,
             ocpp_response("RemoteStartTransaction")),
            ("POST", "remote-stop", remote_stop, "RemoteStopTransaction (default: the station's only active "
             "transaction); the answer adds transaction_id", REMOTE_STOP, False, REMOTE_STOP_RESULT),
            ("POST", "reset", reset, "Reset (type Soft unless given)", RESET, False, ocpp_response("Reset")),
            ("POST", "unlock", unlock, "UnlockConnector", UNLOCK, True, ocpp_response("UnlockConnector")),
            ("POST", "availability", availability, "ChangeAvailability (connector_id 0, the whole station, "
             "unless given)", AVAILABILITY, True, ocpp_response("ChangeAvailability")),
            ("POST", "configuration/fetch", fetch_configuration, "GetConfiguration (every key unless given); the "
             "answer is also stored for GET /stations/{station_id}/configuration", FETCH_CONFIGURATION, False,
             ocpp_response("GetConfiguration")),
            ("PUT", "configuration/{key}", change_configuration, "ChangeConfiguration of one key",
             CHANGE_CONFIGURATION, True, ocpp_response("ChangeConfiguration")),
            ("POST", "clear-cache", clear_cache, "ClearCache", EMPTY, False, ocpp_response("ClearCache")),
            ("POST", "data-transfer", data_transfer, "DataTransfer to the station", DATA_TRANSFER, True,
             ocpp_response("DataTransfer"))):
        responses = dict(COMMAND_RESPONSES)
        if handler is remote_stop:
            responses["409"] = "Station not connected, or no (or more than one) active transaction"
        router.add(method, "/stations/{station_id}/" + path, handler, summary, tags=tags, body=body,
                   body_required=required, response=response, responses=responses, scope="commands")
    return None
