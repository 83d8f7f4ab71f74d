"""The Reservation profile's operator API routes: reserve, cancel, and list reservations."""
from __future__ import annotations

from csms.api.errors import ApiError, conflict, not_found, unprocessable
from csms.api.inputs import INT32_MAX, Invalid, to_datetime
from csms.api.resource import Response, paginated
from csms.api.router import PAGINATION, Path, Query
from csms.api.stations import send_call
from csms.api.types import BOOLEAN, INTEGER, columns, enum, nullable, page, record
from csms.ocpp16 import format_datetime
from csms.schemas import SchemaViolation, schemas

from .store import STATES
from .tables import events, reservations

ID_TAG = {"type": "string", "minLength": 1, "maxLength": 20}

RESERVE = {
    "type": "object", "additionalProperties": False, "required": ["connector_id", "expiry_date", "id_tag"],
    "properties": {
        "connector_id": {"type": "integer", "minimum": 0, "maximum": INT32_MAX,
                         "description": "A connector the station has reported, or 0 for the whole station"},
        "expiry_date": {"type": "string", "format": "date-time",
                        "description": "ISO 8601 date-time with an offset (or Z), in the future"},
        "id_tag": ID_TAG,
        "parent_id_tag": dict(ID_TAG, description="Default: the id tag's parent as the CSMS holds it"),
    },
}

#: Reservation ids are OCPP integers (32-bit): anything else cannot name one.
RESERVATION_ID = Path("reservation_id", "integer", minimum=0, maximum=INT32_MAX, resource="reservation")

LIST_QUERY = PAGINATION + (
    Query("active", "boolean", "Only live reservations (true) or only closed ones (false)"),
    Query("state", enum=STATES),
)

RESERVATION = record({**columns(reservations, rename={"id": "record_id"}),
                      "active": dict(BOOLEAN, description="Live: accepted by the station, not yet used, "
                                                          "cancelled or expired")}, title="Reservation")
CANCEL_RESULT = record({"reservation_id": INTEGER, "status": enum(("Accepted", "Rejected")),
                        "known": dict(BOOLEAN, description="Whether the CSMS knew the reservation id"),
                        "reservation": nullable(RESERVATION)})
RESERVATION_EVENT = record(columns(events), title="ReservationEvent")


def add_routes(plugin, app, router):
    store = plugin.store

    async def existing_station(station_id: str) -> None:
        if await app.station_store.get(station_id) is None:
            raise not_found("station", station_id)

    async def reserve(request):
        station_id, body = request.params["station_id"], request.body
        await existing_station(station_id)
        try:
            expiry = to_datetime(body["expiry_date"])
        except Invalid:
            raise unprocessable(f"expiry_date {body['expiry_date']!r} is not an ISO 8601 date-time",
                                "invalid_expiry_date")
        now = app.now()
        if expiry <= now:
            raise unprocessable("expiry_date must be in the future", "expiry_in_past",
                                expiry_date=format_datetime(expiry), now=format_datetime(now))
        if not app.is_connected(station_id):
            raise ApiError(409, "station_offline", f"Station {station_id!r} is not connected")
        connector_id = body["connector_id"]
        if connector_id != 0:
            known = await app.lookup("csms_connector_ids", station_id=station_id)
            if known is not None and connector_id not in known:
                raise unprocessable(f"Station {station_id!r} has no connector {connector_id}", "unknown_connector",
                                    connector_ids=list(known))
            active = await app.lookup("csms_active_transactions", default=[], station_id=station_id)
            busy = [t for t in active if t["connector_id"] == connector_id]
            if busy:
                raise conflict(f"Connector {connector_id} of {station_id!r} has a transaction in progress",
                               "connector_in_transaction", transaction_id=busy[0]["transaction_id"])
        parent = body.get("parent_id_tag")
        if parent is None:
            tags = await app.lookup("csms_id_tags", default=[], id_tags=[body["id_tag"]])
            parent = next((t.get("parent_id_tag") for t in tags if t["id_tag"] == body["id_tag"]), None)
        payload = {"connectorId": connector_id, "expiryDate": format_datetime(expiry), "idTag": body["id_tag"],
                   "reservationId": 0}
        if parent:
            payload["parentIdTag"] = parent
        try:
            schemas.validate_request("ReserveNow", payload)
        except SchemaViolation as exc:
            raise unprocessable(f"Invalid ReserveNow payload: {exc.message}", "invalid_ocpp_payload")
        row = await store.create(station_id, connector_id, body["id_tag"], parent, expiry)
        payload["reservationId"] = row["reservation_id"]
        try:
            await send_call(app, station_id, "ReserveNow", payload)
        except ApiError as exc:
            await store.mark_failed(row["record_id"], f"{exc.code}: {exc.message}")
            if exc.details is None:
                exc.details = {}
            exc.details["reservation_id"] = row["reservation_id"]
            raise
        row = await store.get(station_id, row["reservation_id"])
        return Response(201, row, {"Location": f"/api/v1/stations/{station_id}/reservations/{row['reservation_id']}"})

    async def cancel(request):
        """Send CancelReservation, also for an id the CSMS does not know (OCTT TC_052)."""
        station_id = request.params["station_id"]
        await existing_station(station_id)
        reservation_id = request.params["reservation_id"]
        response = await send_call(app, station_id, "CancelReservation", {"reservationId": reservation_id})
        row = await store.get(station_id, reservation_id)
        return {"reservation_id": reservation_id, "status": response["status"], "known": row is not None,
                "reservation": row}

    async def station_reservations(request):
        station_id = request.params["station_id"]
        await existing_station(station_id)
        limit, offset = request.page()
        total, rows = await store.list(station_id, request.query.get("active"), request.query.get("state"),
                                       limit, offset)
        return paginated(rows, total, limit, offset)

    async def one_reservation(request):
        station_id = request.params["station_id"]
        await existing_station(station_id)
        reservation_id = request.params["reservation_id"]
        row = await store.get(station_id, reservation_id)
        if row is None:
            raise not_found("reservation", reservation_id)
        return row

    async def all_reservations(request):
        limit, offset = request.page()
        total, rows = await store.list(request.query.get("station_id"), request.query.get("active"),
                                       request.query.get("state"), limit, offset)
        return paginated(rows, total, limit, offset)

    async def reservation_events(request):
        limit, offset = request.page()
        total, rows = await store.events(request.query.get("station_id"), limit, offset)
        return paginated(rows, total, limit, offset)

    tags = ("reservations",)
    sent = {"404": "Unknown station", "409": "Station not connected",
            "502": "The station answered with an error", "504": "The station did not answer in time"}
    router.add("POST", "/stations/{station_id}/reservations", reserve,
               "Reserve a connector (or, with connector_id 0, the whole station) for an id tag", tags=tags,
               operation_id="create_reservation", response=RESERVATION,
               body=RESERVE,
               description="The CSMS allocates the reservation id and sends ReserveNow. 201 with the reservation "
                           "whatever the station answered: its answer is `status` (Accepted, Faulted, Occupied, "
                           "Rejected, Unavailable); only an Accepted one is live (`active`). Refused up front: "
                           "unknown station (404), expiry_date not in the future or a connector the station has "
                           "not reported (422), a connector with a transaction in progress or a station not "
                           "connected (409).",
               responses=dict(sent, **{"201": "Sent; the station's answer is recorded",
                                       "409": "Connector in a transaction, or station not connected",
                                       "422": "Expiry in the past, unknown connector"}), scope="commands")
    router.add("GET", "/stations/{station_id}/reservations", station_reservations,
               "The station's reservations, newest first", tags=tags, operation_id="list_station_reservations",
               query=LIST_QUERY, response=page(RESERVATION),
               responses={"200": "OK", "404": "Unknown station"})
    router.add("GET", "/stations/{station_id}/reservations/{reservation_id}", one_reservation,
               "One reservation of the station", tags=tags, operation_id="get_station_reservation",
               path=(RESERVATION_ID,), response=RESERVATION,
               responses={"200": "OK", "404": "Unknown station or reservation"})
    router.add("POST", "/stations/{station_id}/reservations/{reservation_id}/cancel", cancel,
               "Send CancelReservation (also for an id the CSMS does not know)", tags=tags,
               operation_id="cancel_reservation", path=(RESERVATION_ID,), response=CANCEL_RESULT,
               description="200 with the station's answer (`status` Accepted or Rejected), whether the CSMS knew "
                           "the id (`known`) and the reservation as now recorded. Accepted closes a live "
                           "reservation as cancelled.",
               responses=dict(sent, **{"200": "The station's answer"}), scope="commands")
    router.add("DELETE", "/stations/{station_id}/reservations/{reservation_id}", cancel,
               "Cancel a reservation: the same as POST .../cancel", tags=tags, path=(RESERVATION_ID,),
               response=CANCEL_RESULT,
               responses=dict(sent, **{"200": "The station's answer"}), operation_id="cancel_reservation_delete", scope="commands")
    router.add("GET", "/reservations", all_reservations, "Reservations of every station, newest first", tags=tags,
               operation_id="list_reservations", response=page(RESERVATION),
               query=LIST_QUERY + (Query("station_id", description="Only this station's"),),
               responses={"200": "OK"})
    router.add("GET", "/reservation-events", reservation_events,
               "What did not fit the normal course: cancels of unknown ids, reservation ids unknown or reused "
               "at StartTransaction, replaced reservations; newest first", tags=tags,
               operation_id="list_reservation_events", response=page(RESERVATION_EVENT),
               query=PAGINATION + (Query("station_id", description="Only this station's"),),
               responses={"200": "OK"})
