"""Framework routes: stations (identity, admission, password), connection events, and OCPP calls."""
from __future__ import annotations

import secrets

from twisted.internet import defer, threads

from csms import ocpp16
from csms.admission import charge_point_id_problem
from csms.api.errors import ApiError, conflict, not_found, unprocessable
from csms.api.resource import Response, paginated
from csms.api.router import PAGINATION, Query
from csms.api.types import BOOLEAN, INTEGER, TEXT, array, columns, nullable, page, record
from csms.app import ActionUnavailable, CallRefused, as_deferred
from csms.passwords import hash_password
from csms.schemas import SchemaViolation
from csms.rpc import CallErrorReceived, CallTimeout, RequestInvalid, ResponseInvalid, StationOffline
from csms.stations import REGISTRATION_STATUSES, connection_events, stations

STATION_ID = {"type": "string", "minLength": 1, "maxLength": 255,
              "description": "The chargePointId: at most [ocpp] max_charge_point_id_length characters (48 by "
                             "default), none of them a control, invisible or unassigned character (422 "
                             "invalid_station_id: an id the OCPP endpoint would refuse)"}
#: Seconds a deletion waits for a station that just connected to be announced to the plugins.
ANNOUNCE_TIMEOUT = 10.0
PASSWORD = {"type": "string", "minLength": 16, "maxLength": 40,
            "description": "16 to 40 characters (OCPP 1.6 Security: AuthorizationKey)"}

STATION_CREATE = {
    "type": "object", "additionalProperties": False, "required": ["id"],
    "properties": {
        "id": STATION_ID,
        "registration_status": {"type": "string", "enum": list(REGISTRATION_STATUSES)},
        "description": {"type": ["string", "null"], "maxLength": 1000},
        "password": PASSWORD,
    },
}
STATION_UPDATE = {
    "type": "object", "additionalProperties": False, "minProperties": 1,
    "properties": {
        "registration_status": {"type": "string", "enum": list(REGISTRATION_STATUSES)},
        "description": {"type": ["string", "null"], "maxLength": 1000},
    },
}
#: ChargePointStatus (OCPP 1.6 §7.7).
CONNECTOR_STATUSES = ("Available", "Preparing", "Charging", "SuspendedEVSE", "SuspendedEV", "Finishing",
                      "Reserved", "Unavailable", "Faulted")
PASSWORD_SET = {"type": "object", "additionalProperties": False, "required": ["password"],
                "properties": {"password": PASSWORD}}

STATION = record(
    {**columns(stations, "id", "registration_status", "description", "created_at", "updated_at",
               "last_connected_at", "last_disconnected_at", "last_seen_at"),
     "has_password": BOOLEAN, "online": dict(BOOLEAN, description="Connected to any node"),
     "node": dict(nullable(TEXT), description="The node it is connected to (GET /nodes), null when offline")},
    title="Station", open_ended=True,
    description="A station with its live state; enabled plugins add their own fields (csms_station_details)")
STATION_PASSWORD = record({"id": TEXT, "has_password": BOOLEAN, "password": dict(TEXT, description="Shown once")},
                          optional=("password",), title="StationPassword")
CONNECTION_EVENT = record(columns(connection_events), title="ConnectionEvent")
CONNECTION_EVENTS = record({"items": array(CONNECTION_EVENT), "limit": INTEGER, "offset": INTEGER})


#: The generic route sending any CSMS-initiated call (the OpenAPI document lists the actions it takes).
CALL_ROUTE = "/stations/{station_id}/calls/{action}"


def call_actions(app) -> dict:
    """Every action the generic call route sends on ``app``: action -> {"plugin", "request", "response"}."""
    return {action: {"plugin": plugin, "request": app.schemas.schema(action),
                     "response": app.schemas.schema(action + "Response")}
            for action, plugin in app.outbound_actions.items()}


def _hash(app, password: str):
    return threads.deferToThreadPool(app.reactor, app.reactor.getThreadPool(), hash_password, password)


@defer.inlineCallbacks
def station_views(app, rows: list[dict]):
    """Station rows plus live state and what each plugin adds (``csms_station_details``)."""
    ids = [row["id"] for row in rows]
    extras: dict = {}
    if ids:
        results = app.hook.csms_station_details(station_ids=ids)
        from csms.app import as_deferred
        for details in (yield defer.gatherResults([as_deferred(r) for r in results if r is not None],
                                                  consumeErrors=True)):
            for station_id, fields in (details or {}).items():
                extras.setdefault(station_id, {}).update(fields)
    views = []
    for row in rows:
        session = app.sessions.get(row["id"])
        view = dict(row)
        view["node"] = app.cluster.holder(row["id"])
        view["online"] = view["node"] is not None
        if session is not None and getattr(session, "last_seen", None) is not None:
            view["last_seen_at"] = ocpp16.utc_from_timestamp(session.last_seen)
        view.update(extras.get(row["id"], {}))
        views.append(view)
    return views


async def _existing(app, station_id: str) -> dict:
    row = await app.station_store.get(station_id)
    if row is None:
        raise not_found("station", station_id)
    return row


def add_routes(app, router):
    store = app.station_store

    async def list_stations(request):
        limit, offset = request.page()
        online = request.query.get("online")
        ids = exclude = None
        if online is True:
            ids = sorted(app.cluster.online_ids())
        elif online is False:
            exclude = sorted(app.cluster.online_ids())
        status, error = request.query.get("connector_status"), request.query.get("connector_error")
        if status is not None or error is not None:
            found = await as_deferred(app.hook.csms_stations_with_connectors(status=status, error=error))
            if found is None:
                raise ApiError(400, "filter_unavailable", "No enabled plugin tracks connectors: the "
                               "connector_status and connector_error filters are unavailable")
            ids = sorted(set(found) & set(ids)) if ids is not None else sorted(found)
        total, rows = await store.list(limit=limit, offset=offset, ids=ids, exclude_ids=exclude,
                                       registration_status=request.query.get("registration_status"),
                                       search=request.query.get("search"))
        return paginated((await station_views(app, rows)), total, limit, offset)

    async def create_station(request):
        body = request.body
        # The handshake's own rule (csms.admission): a station registered with an id it refuses could
        # never connect.
        problem = charge_point_id_problem(body["id"], app.config.ocpp.max_charge_point_id_length)
        if problem is not None:
            raise unprocessable(f"Invalid station id: {problem} ([ocpp] max_charge_point_id_length = "
                                f"{app.config.ocpp.max_charge_point_id_length})", "invalid_station_id")
        password_hash = await _hash(app, body["password"]) if "password" in body else None
        created = await store.create(body["id"], body.get("registration_status", "Accepted"), password_hash,
                                     body.get("description"))
        if not created:
            raise conflict(f"Station {body['id']!r} already exists", "station_exists")
        row = await store.get(body["id"])
        return Response(201, (await station_views(app, [row]))[0],
                        {"Location": f"/api/v1/stations/{body['id']}"})

    async def get_station(request):
        row = await _existing(app, request.params["station_id"])
        return (await station_views(app, [row]))[0]

    async def update_station(request):
        station_id = request.params["station_id"]
        await _existing(app, station_id)
        await store.update(station_id, **request.body)
        return (await station_views(app, [await store.get(station_id)]))[0]

    async def delete_station(request):
        station_id = request.params["station_id"]
        await _existing(app, station_id)
        protocol = getattr(app.sessions.get(station_id), "protocol", None)
        if protocol is not None and hasattr(protocol, "announced"):
            # A station that just connected: what the connection's listeners write (a security profile
            # floor, a presence row) is committed before the deletion, which then removes it too.
            try:
                await protocol.announced().addTimeout(ANNOUNCE_TIMEOUT, app.clock)
            except defer.TimeoutError:  # a listener that hangs does not keep the station from going
                pass
        await app.fire("csms_on_station_deleted", station_id=station_id)
        await store.delete(station_id)
        app.disconnect(station_id, "station deleted by an operator")
        return Response(204)

    async def set_password(request):
        station_id = request.params["station_id"]
        await _existing(app, station_id)
        await store.update(station_id, password_hash=await _hash(app, request.body["password"]))
        return {"id": station_id, "has_password": True}

    async def rotate_password(request):
        station_id = request.params["station_id"]
        await _existing(app, station_id)
        password = secrets.token_hex(10)  # 20 characters, as OCPP 1.6 Security asks for
        await store.update(station_id, password_hash=await _hash(app, password))
        return {"id": station_id, "has_password": True, "password": password}

    async def clear_password(request):
        station_id = request.params["station_id"]
        await _existing(app, station_id)
        await store.update(station_id, password_hash=None)
        return {"id": station_id, "has_password": False}

    async def station_events(request):
        station_id = request.params["station_id"]
        await _existing(app, station_id)
        limit, offset = request.page()
        events = await store.events(station_id, limit=limit, offset=offset)
        return {"items": events, "limit": limit, "offset": offset}

    async def call_action(request):
        station_id, action = request.params["station_id"], request.params["action"]
        try:
            app.action_profile(action)
        except ActionUnavailable as exc:
            raise ApiError(404, "action_unavailable", str(exc))
        await _existing(app, station_id)
        return await send_call(app, station_id, action, request.body)

    tags = ("stations",)
    router.add("GET", "/stations", list_stations, "List stations with their live state", tags=tags,
               response=page(STATION),
               query=PAGINATION + (Query("online", "boolean", "Only connected (true) or disconnected (false) ones"),
                                   Query("registration_status", enum=REGISTRATION_STATUSES),
                                   Query("search", description="Only stations whose id contains this text "
                                                               "(ignoring case)"),
                                   Query("connector_status", enum=CONNECTOR_STATUSES,
                                         description="Only stations with a connector in this status"),
                                   Query("connector_error", "boolean", "Only stations with a connector reporting "
                                                                       "an error (true) or none (false)")))
    router.add("POST", "/stations", create_station, "Register a station ahead of its first connection", tags=tags,
               body=STATION_CREATE, response=STATION, responses={"201": "Created", "409": "A station with that id exists"})
    router.add("GET", "/stations/{station_id}", get_station, "One station", tags=tags, response=STATION,
               responses={"200": "OK", "404": "Unknown station"})
    router.add("PATCH", "/stations/{station_id}", update_station, "Change a station's registration status or "
               "description", tags=tags, body=STATION_UPDATE, response=STATION, responses={"200": "OK", "404": "Unknown station"})
    router.add("DELETE", "/stations/{station_id}", delete_station, "Delete a station (and disconnect it)",
               tags=tags, responses={"204": "Deleted", "404": "Unknown station"})
    router.add("PUT", "/stations/{station_id}/password", set_password,
               "Set the station's HTTP Basic auth password (stored hashed)", tags=tags, body=PASSWORD_SET,
               response=STATION_PASSWORD,
               responses={"200": "OK", "404": "Unknown station"})
    router.add("POST", "/stations/{station_id}/password/rotate", rotate_password,
               "Generate a new random password; the answer is the only time it is shown", tags=tags,
               response=STATION_PASSWORD,
               responses={"200": "OK", "404": "Unknown station"})
    router.add("DELETE", "/stations/{station_id}/password", clear_password,
               "Remove the station's password (it may then connect without Basic auth)", tags=tags,
               response=STATION_PASSWORD,
               responses={"200": "OK", "404": "Unknown station"})
    router.add("GET", "/stations/{station_id}/events", station_events,
               "Connection events (connected, disconnected, replaced, refused), newest first", tags=tags,
               query=PAGINATION, response=CONNECTION_EVENTS, responses={"200": "OK", "404": "Unknown station"})
    router.add("POST", CALL_ROUTE, call_action,
               "Send any CSMS-initiated OCPP call (OCPP 1.6's, or one a plugin adds); the body is the OCPP "
               "request payload",
               tags=("commands",), body={"type": "object"}, response={"type": "object"},
               description="Answers with the station's response payload. 404: unknown station or an action no "
                           "enabled plugin provides; 409: station not connected; 422: payload not valid for the "
                           "action's schema; 502: the station answered CALLERROR (or an invalid response); "
                           "504: no answer in time.",
               responses={"200": "The station's response payload", "404": "Unknown station or action",
                          "409": "Station not connected", "502": "The station answered with an error",
                          "504": "The station did not answer in time"}, scope="commands")


async def send_call(app, station_id: str, action: str, payload: dict):
    """Send a call for the API and map every outcome to an HTTP answer (used by friendly routes too).

    The payload is checked against the action's schema first, so a bad payload is a 422 whether or not
    the station is connected.
    """
    try:
        app.schemas.validate_request(action, payload)
    except SchemaViolation as exc:
        raise unprocessable(f"Invalid {action} payload: {exc.message.replace('data.', '').replace('data ', '')}",
                            "invalid_ocpp_payload", ocpp_error_code=exc.code)
    try:
        return await app.call(station_id, action, payload)
    except ActionUnavailable as exc:
        raise ApiError(404, "action_unavailable", str(exc))
    except CallRefused as exc:
        raise unprocessable(exc.message, exc.code, **exc.details)
    except RequestInvalid as exc:
        raise unprocessable(f"Invalid {action} payload: {exc.message.replace('data.', '').replace('data ', '')}",
                            "invalid_ocpp_payload", ocpp_error_code=exc.code)
    except StationOffline as exc:
        raise ApiError(409, "station_offline", f"Station {station_id!r} is not connected", {"reason": str(exc)})
    except CallErrorReceived as exc:
        raise ApiError(502, "station_call_error", f"The station answered {action} with {exc.code}",
                       {"code": exc.code, "description": exc.description, "details": exc.details})
    except ResponseInvalid as exc:
        raise ApiError(502, "station_invalid_response", f"The station's {action} response is invalid: "
                       f"{exc.message}", {"code": exc.code, "response": exc.payload})
    except CallTimeout:
        raise ApiError(504, "station_timeout", f"The station did not answer {action} within "
                       f"{app.config.ocpp.response_timeout:g}s")
