"""Operator API routes for signed firmware updates and log uploads (OCTT TC_079, TC_080, TC_081).

Firmware images are uploaded with the Firmware plugin's ``POST /firmware-files``; this part adds their
signature and signing certificate, checks the signature (``signed_firmware``), and offers the file in
SignedUpdateFirmware. Log uploads go to a one-time location of the Firmware plugin's HTTP/FTP upload
servers. Both through hooks (``csms_offer_firmware``, ``csms_upload_location``, ...), never by import.
"""
from __future__ import annotations

import secrets

from twisted.internet import threads

from csms.api.errors import ApiError, conflict, not_found, unprocessable
from csms.api.inputs import check_location, check_window
from csms.api.resource import Response, paginated
from csms.api.router import PAGINATION, Path
from csms.api.stations import send_call
from csms.api.types import BOOLEAN, DATE_TIME, INTEGER, TEXT, array, columns, nullable, page, record
from csms.ocpp16 import format_datetime

from .signed_firmware import SIGNATURE_MISMATCH, SignatureProblem, check_signature
from .transfer_store import FIRMWARE, LOG
from .transfer_tables import log_requests, signed_firmware, signed_updates, transfer_history
from .transfers import HISTORY_LIMIT

#: app.lookup's answer when no enabled plugin answers a hook at all.
_NOBODY = object()
_DATE_TIME = {"type": "string", "format": "date-time"}
_COUNT = {"type": "integer", "minimum": 0, "maximum": 2147483647}
_REQUEST_ID = {"type": "integer", "minimum": 1, "maximum": 2147483647,
               "description": "requestId to send (default: a random one)"}
SIGNED_FIRMWARE_ID = Path("signed_firmware_id", "integer", resource="signed firmware")
LOG_REQUEST_ID = Path("log_request_id", "integer", resource="log request")

SIGNED_FIRMWARE = {
    "type": "object", "additionalProperties": False, "required": ["firmware_id", "signature", "signing_certificate"],
    "properties": {
        "firmware_id": {"type": "integer", "minimum": 1, "description": "A firmware file hosted by the CSMS"},
        # The limits of SignedUpdateFirmware.req's fields (OCPP 1.6 security extension).
        "signature": {"type": "string", "minLength": 1, "maxLength": 800,
                      "description": "Base64 of the SHA-256 RSA or ECDSA signature over the file"},
        "signing_certificate": {"type": "string", "minLength": 1, "maxLength": 5500,
                                "description": "PEM of the certificate whose key made the signature"},
        "verify": {"type": "boolean", "description": "false: keep it even when the signature does not verify "
                                                     "(recorded as verified: false), e.g. for OCTT TC_081"},
    },
}
SIGNED_UPDATE = {
    "type": "object", "additionalProperties": False, "required": ["signed_firmware_id"],
    "properties": {
        "signed_firmware_id": {"type": "integer", "minimum": 1},
        "retrieve_date": {**_DATE_TIME, "description": "When to download (default: now)"},
        "install_date": {**_DATE_TIME, "description": "When to install (default: once downloaded)"},
        "retries": _COUNT,
        "retry_interval": _COUNT,
        "request_id": _REQUEST_ID,
    },
}
LOG_REQUEST = {
    "type": "object", "additionalProperties": False, "required": ["log_type"],
    "properties": {
        "log_type": {"type": "string", "enum": ["DiagnosticsLog", "SecurityLog"]},
        "remote_location": {"type": "string", "minLength": 1, "maxLength": 512,
                            "description": "Where the station uploads (default: a one-time location on the CSMS)"},
        "protocol": {"type": "string", "enum": ["ftp", "http"],
                     "description": "For a CSMS-hosted location (default: [plugin:firmware] diagnostics_protocol)"},
        "oldest_timestamp": _DATE_TIME,
        "latest_timestamp": _DATE_TIME,
        "retries": _COUNT,
        "retry_interval": _COUNT,
        "request_id": _REQUEST_ID,
    },
}

# -- what the routes answer --------------------------------------------------------------------------

SIGNED_FIRMWARE_RECORD = record(columns(signed_firmware), title="SignedFirmware")
SIGNED_FIRMWARE_CREATED = record({**columns(signed_firmware), "url": nullable(dict(
    TEXT, description="Where stations download the file (null: file server off)"))})
SIGNED_UPDATE_RECORD = record(columns(signed_updates), title="SignedFirmwareUpdate")
LOG_REQUEST_RECORD = record(columns(log_requests), title="LogRequest")
TRANSFER_STATUS = record({
    **columns(transfer_history, *(c.name for c in transfer_history.c if c.name not in ("station_id", "kind"))),
    "known_request": dict(BOOLEAN, description="Its requestId names a request the CSMS sent (or it has none)")},
    title="TransferStatusRecord")
#: What ``csms_uploaded_files`` promises of a file (the hook's implementer may add more).
UPLOADED_FILE = record({"id": INTEGER, "name": TEXT, "size": INTEGER, "sha256": TEXT, "via": TEXT,
                        "uploaded_at": DATE_TIME}, open_ended=True, title="UploadedLogFile")
SIGNED_UPDATE_SENT = record({"station_id": TEXT, "status": dict(TEXT, description="The station's answer"),
                             "request": {"$ref": "#/components/schemas/SignedUpdateFirmwareRequest"},
                             "update": nullable(SIGNED_UPDATE_RECORD)})
STATION_SIGNED_FIRMWARE = record({"station_id": TEXT,
                                  "requests": array(SIGNED_UPDATE_RECORD, description="Newest first"),
                                  "history": array(TRANSFER_STATUS, description="Newest first")})
LOG_SENT = record({"station_id": TEXT, "status": dict(TEXT, description="The station's answer"),
                   "filename": nullable(dict(TEXT, description="The file the station will upload")),
                   "request": nullable(LOG_REQUEST_RECORD)})
STATION_LOGS = record({"station_id": TEXT, "requests": array(LOG_REQUEST_RECORD, description="Newest first"),
                       "history": array(TRANSFER_STATUS, description="Newest first")})
LOG_REQUEST_FILES = record({**columns(log_requests), "files": array(UPLOADED_FILE, description="Oldest first")})


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _file_view(row: dict) -> dict:
    return {key: value for key, value in row.items() if key != "path"}


def add_routes(transfers, app, router):
    store = transfers.store

    async def existing_station(station_id: str):
        if await app.station_store.get(station_id) is None:
            raise not_found("station", station_id)

    async def offer(firmware_id: int) -> dict:
        hosted = await app.lookup("csms_offer_firmware", default=_NOBODY, firmware_id=firmware_id)
        if hosted is _NOBODY:
            raise conflict("No enabled plugin hosts firmware files (enable the firmware plugin)",
                           "firmware_hosting_unavailable")
        if hosted is None:
            raise not_found("firmware file", firmware_id)
        return hosted

    def request_id_of(body) -> int:
        return body.get("request_id") or secrets.randbelow(2 ** 31 - 1) + 1

    async def send_tracked(station_id, action, payload, known: dict):
        key = (station_id, payload["requestId"])
        transfers.pending[key] = known
        try:
            return await send_call(app, station_id, action, payload)
        finally:
            transfers.pending.pop(key, None)  # never sent: nothing recorded, nothing left behind

    # -- signed firmware -----------------------------------------------------------------------------

    async def add_signed_firmware(request):
        body = request.body
        hosted = await offer(body["firmware_id"])
        verify = body.get("verify", True)
        problem = None
        try:
            check_signature(hosted["sha256"], body["signature"], body["signing_certificate"])
        except SignatureProblem as exc:
            if verify or exc.code != SIGNATURE_MISMATCH:
                raise unprocessable(str(exc), exc.code, firmware_id=hosted["id"])
            problem = str(exc)
        row = await store.add_signed_firmware({
            "firmware_file_id": hosted["id"], "name": hosted["name"], "sha256": hosted["sha256"],
            "signature": body["signature"], "signing_certificate": body["signing_certificate"],
            "verified": problem is None, "verify_error": problem, "created_at": app.now()})
        return Response(201, dict(row, url=hosted["url"]), {"Location": f"/api/v1/signed-firmware/{row['id']}"})

    async def list_signed_firmware(request):
        limit, offset = request.page()
        total, rows = await store.list_signed_firmware(limit, offset)
        return paginated(rows, total, limit, offset)

    async def get_signed_firmware(request):
        row = await store.get_signed_firmware(request.params["signed_firmware_id"])
        if row is None:
            raise not_found("signed firmware", request.params["signed_firmware_id"])
        return row

    async def signed_firmware_update(request):
        station_id, body = request.params["station_id"], request.body
        await existing_station(station_id)
        signed = await store.get_signed_firmware(body["signed_firmware_id"])
        if signed is None:
            raise not_found("signed firmware", body["signed_firmware_id"])
        try:
            hosted = await offer(signed["firmware_file_id"])
        except ApiError as exc:
            if exc.status != 404:
                raise
            raise conflict(f"The firmware file of signed firmware {signed['id']} was deleted", "firmware_file_gone")
        if hosted["url"] is None:
            raise conflict("The firmware file server is not running (set [plugin:firmware] http_endpoint or "
                           "public_url)", "file_server_unavailable")
        firmware = {"location": hosted["url"],
                    "retrieveDateTime": body.get("retrieve_date") or format_datetime(app.now()),
                    "signingCertificate": signed["signing_certificate"], "signature": signed["signature"]}
        if "install_date" in body:
            firmware["installDateTime"] = body["install_date"]
        payload = {"requestId": request_id_of(body), "firmware": firmware}
        for key, field in (("retries", "retries"), ("retry_interval", "retryInterval")):
            if key in body:
                payload[field] = body[key]
        response = await send_tracked(station_id, "SignedUpdateFirmware", payload,
                                      {"signed_firmware_id": signed["id"]})
        return {"station_id": station_id, "status": response["status"], "request": payload,
                "update": await store.latest_request(FIRMWARE, station_id, payload["requestId"])}

    async def station_signed_firmware(request):
        station_id = request.params["station_id"]
        await existing_station(station_id)
        return dict(await store.station_view(FIRMWARE, station_id, HISTORY_LIMIT), station_id=station_id)

    # -- logs ------------------------------------------------------------------------------------------

    async def get_log(request):
        station_id, body = request.params["station_id"], request.body
        await existing_station(station_id)
        if "remote_location" in body and "protocol" in body:
            raise unprocessable("protocol is only for a CSMS-hosted location", "protocol_with_location")
        check_window(body, "oldest_timestamp", "latest_timestamp")
        upload = {}
        if "remote_location" in body:
            location = check_location(body["remote_location"])
        else:
            upload = await app.lookup("csms_upload_location", station_id=station_id, purpose="GetLog",
                                      protocol=body.get("protocol"))
            if upload is None:
                raise conflict("No upload server is running for stations' logs (see [plugin:firmware])",
                               "upload_server_unavailable")
            location = upload["location"]
        log = {"remoteLocation": location}
        for key, field in (("oldest_timestamp", "oldestTimestamp"), ("latest_timestamp", "latestTimestamp")):
            if key in body:
                log[field] = body[key]
        payload = {"logType": body["log_type"], "requestId": request_id_of(body), "log": log}
        for key, field in (("retries", "retries"), ("retry_interval", "retryInterval")):
            if key in body:
                payload[field] = body[key]
        try:
            response = await send_tracked(station_id, "GetLog", payload, upload)
        except BaseException:
            if upload:
                await transfers.withdraw_upload(upload["upload_id"])
            raise
        return {"station_id": station_id, "status": response["status"], "filename": response.get("filename"),
                "request": await store.latest_request(LOG, station_id, payload["requestId"])}

    async def station_logs(request):
        station_id = request.params["station_id"]
        await existing_station(station_id)
        return dict(await store.station_view(LOG, station_id, HISTORY_LIMIT), station_id=station_id)

    async def uploaded_files(row) -> list:
        if row["upload_id"] is None:
            return []
        return await app.lookup("csms_uploaded_files", default=[], upload_id=row["upload_id"]) or []

    async def log_request_row(request) -> dict:
        row = await store.get_request(LOG, request.params["log_request_id"])
        if row is None:
            raise not_found("log request", request.params["log_request_id"])
        return row

    async def log_request(request):
        row = await log_request_row(request)
        return dict(row, files=[_file_view(f) for f in await uploaded_files(row)])

    async def log_content(request):
        row = await log_request_row(request)
        files = await uploaded_files(row)
        if not files:
            raise not_found("uploaded log of request", row["id"])
        newest = files[-1]
        try:
            data = await threads.deferToThreadPool(app.reactor, app.reactor.getThreadPool(), _read, newest["path"])
        except OSError:
            raise ApiError(410, "log_file_gone", f"The log uploaded for request {row['id']} is no longer on disk")
        return Response(200, raw=data, content_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{newest["name"]}"'})

    # -- the routes ------------------------------------------------------------------------------------

    tags = ("security",)
    router.add("POST", "/signed-firmware", add_signed_firmware,
               "Give a hosted firmware file its signature and signing certificate; the CSMS checks them",
               tags=tags, body=SIGNED_FIRMWARE, response=SIGNED_FIRMWARE_CREATED,
               responses={"201": "Stored (verified, or verify: false)", "404": "Unknown firmware file",
                          "409": "No plugin hosts firmware", "422": "Signature not base64, certificate not PEM, "
                          "key neither RSA nor EC, or the signature does not verify"})
    router.add("GET", "/signed-firmware", list_signed_firmware, "List signed firmware", tags=tags, query=PAGINATION,
               response=page(SIGNED_FIRMWARE_RECORD))
    router.add("GET", "/signed-firmware/{signed_firmware_id}", get_signed_firmware, "One signed firmware",
               tags=tags, path=(SIGNED_FIRMWARE_ID,), response=SIGNED_FIRMWARE_RECORD, responses={"200": "OK", "404": "Unknown signed firmware"})
    router.add("POST", "/stations/{station_id}/signed-firmware-update", signed_firmware_update,
               "Send SignedUpdateFirmware offering a signed firmware file", tags=("commands",) + tags,
               body=SIGNED_UPDATE, response=SIGNED_UPDATE_SENT, scope="commands",
               responses={"200": "The station answered (status: Accepted, Rejected, AcceptedCanceled, "
                                 "InvalidCertificate, RevokedCertificate)",
                          "404": "Unknown station or signed firmware",
                          "409": "Station not connected, firmware file deleted or file server off",
                          "422": "Invalid body", "502": "The station answered with an error",
                          "504": "No answer in time"})
    router.add("GET", "/stations/{station_id}/signed-firmware", station_signed_firmware,
               "The station's SignedUpdateFirmware requests and SignedFirmwareStatusNotifications (newest first)",
               tags=tags, response=STATION_SIGNED_FIRMWARE, responses={"200": "OK", "404": "Unknown station"})
    router.add("POST", "/stations/{station_id}/logs", get_log,
               "Send GetLog; by default the station uploads to a one-time location on the CSMS",
               tags=("commands",) + tags, body=LOG_REQUEST, response=LOG_SENT, scope="commands",
               responses={"200": "The station answered (status: Accepted, Rejected, AcceptedCanceled)",
                          "404": "Unknown station", "409": "Station not connected or no upload server",
                          "422": "Invalid body or location", "502": "The station answered with an error",
                          "504": "No answer in time"})
    router.add("GET", "/stations/{station_id}/logs", station_logs,
               "The station's GetLog requests and LogStatusNotifications (newest first)",
               tags=tags, response=STATION_LOGS, responses={"200": "OK", "404": "Unknown station"})
    router.add("GET", "/log-requests/{log_request_id}", log_request, "One GetLog request with its uploaded files",
               tags=tags, path=(LOG_REQUEST_ID,), response=LOG_REQUEST_FILES,
               responses={"200": "OK", "404": "Unknown log request"})
    router.add("GET", "/log-requests/{log_request_id}/content", log_content,
               "The log the station uploaded for a GetLog request (its newest file)", tags=tags,
               path=(LOG_REQUEST_ID,), response_type="application/octet-stream",
               responses={"200": "The file", "404": "Unknown request or nothing uploaded yet",
                          "410": "The file is no longer on disk"})
