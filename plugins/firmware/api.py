"""Operator API routes of the Firmware Management profile: firmware files, updates, rollout, diagnostics."""
from __future__ import annotations

import os

from twisted.internet import defer, threads

from csms.api.errors import ApiError, conflict, not_found, unprocessable
from csms.api.inputs import check_location, check_window
from csms.api.resource import Response, paginated
from csms.api.router import PAGINATION, Path, Query
from csms.api.stations import send_call
from csms.api.types import (BOOLEAN, DATE_TIME, INTEGER, TEXT, array, columns, nullable, page, record)
from csms.ocpp16 import format_datetime

from .files import TooLarge, discard, firmware_name, inside, read_bytes, spool
from .store import CALL_FAILED, FIRMWARE_FAILED, REQUESTED
from .tables import diagnostics_files, diagnostics_requests, files, status_history, updates
from .uploads import new_credentials

FIRMWARE_STATUSES = ("Downloaded", "DownloadFailed", "Downloading", "Idle", "InstallationFailed", "Installing",
                     "Installed", REQUESTED, CALL_FAILED)
#: Schemes a station may be handed; anything else is not a location it can fetch from or upload to.

_DATE_TIME = {"type": "string", "format": "date-time"}
_COUNT = {"type": "integer", "minimum": 0, "maximum": 2147483647}
FIRMWARE_FILE_ID = Path("file_id", "integer", resource="firmware file")
DIAGNOSTICS_FILE_ID = Path("file_id", "integer", resource="diagnostics file")
DIAGNOSTICS_REQUEST_ID = Path("request_id", "integer", resource="diagnostics request")

FIRMWARE_UPDATE = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "location": {"type": "string", "minLength": 1, "maxLength": 2000,
                     "description": "Any URL the station can download the firmware from"},
        "firmware_id": {"type": "integer", "minimum": 1, "description": "A firmware file hosted by the CSMS"},
        "retrieve_date": {**_DATE_TIME, "description": "When to download (default: now)"},
        "retries": _COUNT,
        "retry_interval": _COUNT,
    },
}
DIAGNOSTICS_REQUEST = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "location": {"type": "string", "minLength": 1, "maxLength": 2000,
                     "description": "Where the station uploads (default: a one-time location on the CSMS)"},
        "protocol": {"type": "string", "enum": ["ftp", "http"],
                     "description": "For a CSMS-hosted location (default: [plugin:firmware] diagnostics_protocol)"},
        "start_time": _DATE_TIME,
        "stop_time": _DATE_TIME,
        "retries": _COUNT,
        "retry_interval": _COUNT,
    },
}

# -- what the routes answer --------------------------------------------------------------------------

FIRMWARE_FILE = record({**columns(files), "url": nullable(dict(TEXT, description="Where stations download it "
                                                                               "(null: file server off)"))},
                       title="FirmwareFile")
FIRMWARE_UPDATE_RECORD = record(columns(updates), title="FirmwareUpdate")
STATUS_NOTIFICATION = record(columns(status_history, *(c.name for c in status_history.c if c.name != "station_id")),
                             title="FirmwareStatusRecord")
_STATE = {"station_id": TEXT, "status": nullable(TEXT), "status_at": nullable(DATE_TIME)}
STATION_FIRMWARE = record({**_STATE, "current_update": nullable(FIRMWARE_UPDATE_RECORD),
                           "updates": array(FIRMWARE_UPDATE_RECORD, description="Newest first"),
                           "history": array(STATUS_NOTIFICATION, description="Newest first")})
UPDATE_SENT = record({"station_id": TEXT, "request": {"$ref": "#/components/schemas/UpdateFirmwareRequest"},
                      "update": nullable(FIRMWARE_UPDATE_RECORD)})
ROLLOUT_ITEM = record({"station_id": TEXT, "status": TEXT, "status_at": DATE_TIME, "failed": BOOLEAN,
                       "update": nullable(record(
                           {**columns(updates, "id", "location", "firmware_file_id", "requested_at",
                                      "retrieve_date")}))}, title="RolloutStation")
ROLLOUT = page(ROLLOUT_ITEM, counts={"type": "object", "additionalProperties": INTEGER,
                                     "description": "Matching stations per status"})
DIAGNOSTICS_FILE = record(columns(diagnostics_files, *(c.name for c in diagnostics_files.c
                                                       if c.name != "stored_path")), title="DiagnosticsFile")
DIAGNOSTICS_REQUEST_RECORD = record({
    **columns(diagnostics_requests, *(c.name for c in diagnostics_requests.c if c.name != "upload_secret_sha256")),
    "files": array(DIAGNOSTICS_FILE)}, title="DiagnosticsRequest")
DIAGNOSTICS_SENT = record({"station_id": TEXT, "file_name": nullable(dict(TEXT, description="The file the station "
                                                                          "will upload (null: nothing to upload)")),
                           "request": nullable(DIAGNOSTICS_REQUEST_RECORD)})
STATION_DIAGNOSTICS = record({**_STATE, "current_request_id": nullable(INTEGER),
                              "requests": array(DIAGNOSTICS_REQUEST_RECORD, description="Newest first"),
                              "history": array(STATUS_NOTIFICATION, description="Newest first")})


def _in_thread(app, f, *args):
    return threads.deferToThreadPool(app.reactor, app.reactor.getThreadPool(), f, *args)


def add_routes(plugin, app, router):
    store = plugin.store
    # What csms_station_details adds to the station views (stations that sent a notification).
    router.extend_schema("Station", {"firmware_status": nullable(TEXT), "diagnostics_status": nullable(TEXT)},
                         plugin.name)
    # A file is moved or removed after its row's commit: one change at a time, so that a deletion's
    # removal never hits the image an upload of the same name has just put in place.
    file_changes = defer.DeferredLock()

    async def existing_station(station_id: str):
        if await app.station_store.get(station_id) is None:
            raise not_found("station", station_id)

    def file_view(row: dict) -> dict:
        return dict(row, url=plugin.firmware_url(row["name"]))

    # -- firmware files ----------------------------------------------------------------------------

    async def upload_firmware(request):
        raw_name = request.query.get("name", "")
        try:
            name = firmware_name(raw_name)
        except ValueError as exc:
            raise unprocessable(f"name {raw_name!r}: {exc}", "invalid_file_name")
        if await store.get_firmware_file(name=name) is not None:
            raise conflict(f"A firmware file named {name!r} exists", "firmware_file_exists")
        content = request.request.content
        content.seek(0)
        try:
            temp, size, sha256, md5 = await _in_thread(app, spool, plugin.firmware_dir, content,
                                                       plugin.max_firmware_size)
        except TooLarge:
            raise ApiError(413, "body_too_large", f"The request body is larger than {plugin.max_firmware_size} "
                           "bytes", {"limit": plugin.max_firmware_size})
        if size == 0:
            await _in_thread(app, discard, temp)
            raise unprocessable("The firmware file is empty", "empty_file")
        final = inside(plugin.firmware_dir, name)
        async with file_changes:
            try:
                row = await store.add_firmware_file(name, size, sha256, md5, request.query.get("description"),
                                                    app.now())
            except Exception:
                await _in_thread(app, discard, temp)
                raise
            if row is None:
                await _in_thread(app, discard, temp)
                raise conflict(f"A firmware file named {name!r} exists", "firmware_file_exists")
            try:
                await _in_thread(app, os.replace, temp, final)
            except Exception:
                await store.delete_firmware_file(row["id"])  # a row must not name a file that is not there
                await _in_thread(app, discard, temp)
                raise
        plugin.firmware_uploads.inc()
        return Response(201, file_view(row), {"Location": f"/api/v1/firmware-files/{row['id']}"})

    async def list_firmware(request):
        limit, offset = request.page()
        total, rows = await store.list_firmware_files(limit, offset)
        return paginated([file_view(r) for r in rows], total, limit, offset)

    async def get_firmware(request):
        row = await store.get_firmware_file(file_id=request.params["file_id"])
        if row is None:
            raise not_found("firmware file", request.params["file_id"])
        return file_view(row)

    async def delete_firmware(request):
        file_id = request.params["file_id"]
        async with file_changes:
            removed = await store.delete_firmware_file(file_id)
            if removed is None:
                raise not_found("firmware file", file_id)
            # After the commit: a crash right here leaves the image on disk (see docs/firmware.md).
            await _in_thread(app, discard, inside(plugin.firmware_dir, removed["name"]))
        return Response(204)

    # -- firmware updates ----------------------------------------------------------------------------

    async def update_firmware(request):
        station_id, body = request.params["station_id"], request.body
        if ("location" in body) == ("firmware_id" in body):
            raise unprocessable("Give exactly one of location and firmware_id", "location_or_firmware_id")
        await existing_station(station_id)
        if "firmware_id" in body:
            row = await store.get_firmware_file(file_id=body["firmware_id"])
            if row is None:
                raise not_found("firmware file", body["firmware_id"])
            location = plugin.firmware_url(row["name"])
            if location is None:
                raise conflict("The firmware file server is not running (set [plugin:firmware] http_endpoint "
                               "or public_url)", "file_server_unavailable")
        else:
            location = check_location(body["location"])
        payload = {"location": location,
                   "retrieveDate": body.get("retrieve_date") or format_datetime(app.now())}
        if "retries" in body:
            payload["retries"] = body["retries"]
        if "retry_interval" in body:
            payload["retryInterval"] = body["retry_interval"]
        await send_call(app, station_id, "UpdateFirmware", payload)
        state = await store.station_firmware(station_id, 1)
        return {"station_id": station_id, "request": payload, "update": state["current_update"]}

    async def station_firmware(request):
        station_id = request.params["station_id"]
        await existing_station(station_id)
        return dict(await store.station_firmware(station_id, plugin.history_limit), station_id=station_id)

    async def rollout(request):
        limit, offset = request.page()
        query = request.query
        total, counts, items = await store.rollout(limit, offset, status=query.get("status"),
                                                   failed=query.get("failed"),
                                                   firmware_file_id=query.get("firmware_id"),
                                                   station_id=query.get("station_id"))
        return dict(paginated(items, total, limit, offset), counts=counts)

    # -- diagnostics ---------------------------------------------------------------------------------

    async def get_diagnostics(request):
        station_id, body = request.params["station_id"], request.body
        await existing_station(station_id)
        check_window(body, "start_time", "stop_time")
        payload = {}
        for key, field in (("start_time", "startTime"), ("stop_time", "stopTime"), ("retries", "retries"),
                           ("retry_interval", "retryInterval")):
            if key in body:
                payload[field] = body[key]
        if "location" in body:
            if "protocol" in body:
                raise unprocessable("protocol is only for a CSMS-hosted location", "protocol_with_location")
            payload = {"location": check_location(body["location"]), **payload}
            response = await send_call(app, station_id, "GetDiagnostics", payload)
            state = await store.station_diagnostics(station_id, 1)
            return {"station_id": station_id, "file_name": response.get("fileName"),
                    "request": state["requests"][0] if state["requests"] else None}
        protocol = body.get("protocol", plugin.upload_protocol)
        user, secret = new_credentials()
        locations = plugin.upload_location(protocol, user, secret)
        if locations is None:
            raise conflict(f"The {protocol.upper()} upload server is not running (see [plugin:firmware])",
                           "upload_server_unavailable")
        location, shown = locations
        payload = {"location": location, **payload}
        times = {key: _time(body[key]) for key in ("start_time", "stop_time") if key in body}
        request_id = await store.create_diagnostics_request(station_id, payload, shown, protocol, user, secret,
                                                            app.now(), plugin.upload_expires_at(), times)
        key = (station_id, location)
        plugin.pending_diagnostics[key] = request_id
        try:
            response = await send_call(app, station_id, "GetDiagnostics", payload)
        except BaseException:
            plugin.pending_diagnostics.pop(key, None)
            await store.discard_unsent_diagnostics_request(request_id)
            raise
        return {"station_id": station_id, "file_name": response.get("fileName"),
                "request": await store.get_diagnostics_request(request_id)}

    async def station_diagnostics(request):
        station_id = request.params["station_id"]
        await existing_station(station_id)
        return dict(await store.station_diagnostics(station_id, plugin.history_limit), station_id=station_id)

    async def diagnostics_request(request):
        row = await store.get_diagnostics_request(request.params["request_id"])
        if row is None:
            raise not_found("diagnostics request", request.params["request_id"])
        return row

    async def list_diagnostics_files(request):
        limit, offset = request.page()
        total, rows = await store.list_diagnostics_files(limit, offset, station_id=request.query.get("station_id"),
                                                         request_id=request.query.get("request_id"))
        return paginated(rows, total, limit, offset)

    async def diagnostics_file_content(request):
        row = await store.get_diagnostics_file(request.params["file_id"])
        if row is None:
            raise not_found("diagnostics file", request.params["file_id"])
        try:
            data = await _in_thread(app, read_bytes, plugin.uploads.path_of(row["stored_path"]))
        except (OSError, ValueError):
            raise ApiError(410, "diagnostics_file_gone", f"The file of diagnostics upload {row['id']} is no longer "
                           "on disk")
        return Response(200, raw=data, content_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{row["name"]}"'})

    # -- the routes --------------------------------------------------------------------------------

    tags = ("firmware",)
    router.add("POST", "/firmware-files", upload_firmware,
               "Upload a firmware file (raw request body); the CSMS serves it to stations", tags=tags,
               json_body=False, max_body=plugin.max_firmware_size, response=FIRMWARE_FILE,
               query=(Query("name", description="File name: 1-128 characters of A-Z a-z 0-9 . _ + -, starting "
                                                "with a letter or a digit, without '..'", required=True),
                      Query("description", description="Free text")),
               description="Stored under [plugin:firmware] firmware_dir with its SHA-256 and MD5. The answer's "
                           "`url` is where stations download it (with HTTP range requests).",
               responses={"201": "Stored", "409": "A file with that name exists", "413": "Too large",
                          "422": "Invalid or empty file"})
    router.add("GET", "/firmware-files", list_firmware, "List hosted firmware files", tags=tags, query=PAGINATION,
               response=page(FIRMWARE_FILE))
    router.add("GET", "/firmware-files/{file_id}", get_firmware, "One hosted firmware file", tags=tags,
               path=(FIRMWARE_FILE_ID,), response=FIRMWARE_FILE, responses={"200": "OK", "404": "Unknown file"})
    router.add("DELETE", "/firmware-files/{file_id}", delete_firmware, "Delete a hosted firmware file", tags=tags,
               path=(FIRMWARE_FILE_ID,), responses={"204": "Deleted", "404": "Unknown file"})
    router.add("POST", "/stations/{station_id}/firmware-update", update_firmware,
               "Send UpdateFirmware with a hosted firmware file or any URL", tags=("commands",) + tags,
               body=FIRMWARE_UPDATE, response=UPDATE_SENT,
               responses={"200": "Accepted by the station", "404": "Unknown station or file",
                          "409": "Station not connected", "422": "Invalid location or body",
                          "502": "The station answered with an error", "504": "No answer in time"}, scope="commands")
    router.add("GET", "/stations/{station_id}/firmware", station_firmware,
               "The station's firmware status, its updates and its FirmwareStatusNotifications (newest first)",
               tags=tags, response=STATION_FIRMWARE, responses={"200": "OK", "404": "Unknown station"})
    router.add("GET", "/firmware/status", rollout,
               "Rollout view: each station's latest firmware status with its current update", tags=tags,
               response=ROLLOUT,
               query=PAGINATION + (Query("status", enum=FIRMWARE_STATUSES),
                                   Query("failed", "boolean", f"Only {' or '.join(FIRMWARE_FAILED)} (true) or "
                                                              "the others (false)"),
                                   Query("firmware_id", "integer", "Only updates of this hosted file", minimum=1),
                                   Query("station_id")),
               description="`counts` gives the number of matching stations per status.")
    router.add("POST", "/stations/{station_id}/diagnostics", get_diagnostics,
               "Send GetDiagnostics; without a location the station uploads to the CSMS (one-time credentials)",
               tags=("commands",) + tags, body=DIAGNOSTICS_REQUEST, response=DIAGNOSTICS_SENT,
               responses={"200": "Accepted by the station", "404": "Unknown station",
                          "409": "Station not connected or upload server off", "422": "Invalid location or body",
                          "502": "The station answered with an error", "504": "No answer in time"}, scope="commands")
    router.add("GET", "/stations/{station_id}/diagnostics", station_diagnostics,
               "The station's diagnostics status, its requests with uploaded files, and its notifications",
               tags=tags, response=STATION_DIAGNOSTICS, responses={"200": "OK", "404": "Unknown station"})
    router.add("GET", "/diagnostics-requests/{request_id}", diagnostics_request,
               "One diagnostics request with its uploaded files", tags=tags, path=(DIAGNOSTICS_REQUEST_ID,),
               response=DIAGNOSTICS_REQUEST_RECORD,
               responses={"200": "OK", "404": "Unknown request"})
    router.add("GET", "/diagnostics-files", list_diagnostics_files, "Uploaded diagnostics files", tags=tags, response=page(DIAGNOSTICS_FILE),
               query=PAGINATION + (Query("station_id"), Query("request_id", "integer", minimum=1)))
    router.add("GET", "/diagnostics-files/{file_id}/content", diagnostics_file_content,
               "Download an uploaded diagnostics file", tags=tags, path=(DIAGNOSTICS_FILE_ID,),
               response_type="application/octet-stream",
               responses={"200": "The file", "404": "Unknown file", "410": "File removed from disk"})


def _time(text: str):
    from csms.ocpp16 import parse_datetime
    return parse_datetime(text)
