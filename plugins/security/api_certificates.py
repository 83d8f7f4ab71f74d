"""Operator API routes of certificate management and security events (docs/security.md, docs/api.md)."""
from __future__ import annotations

from csms.api.errors import ApiError, conflict, not_found, unprocessable
from csms.api.resource import paginated
from csms.api.router import PAGINATION, Path, Query
from csms.api.stations import send_call
from csms.api.types import BOOLEAN, DATE_TIME, INTEGER, TEXT, array, columns, enum, nullable, page, record

from .certificates import CERTIFICATE_TYPES, HASH_ALGORITHMS, Refused, hash_data, is_self_signed, parse_certificate
from .events import CSMS, STATION
from .signing import AWAITING_CERTIFICATE, SEND_FAILED, STATUSES, failure_text
from .tables import certificate_requests, installed_certificates, security_events

#: Every requestedMessage of ExtendedTriggerMessage.req (whitepaper MessageTriggerEnumType).
EXTENDED_TRIGGER_MESSAGES = ("BootNotification", "LogStatusNotification", "FirmwareStatusNotification", "Heartbeat",
                             "MeterValues", "SignChargePointCertificate", "StatusNotification")
#: A certificate body is a few kilobytes; anything much larger is refused before it is parsed.
MAX_BODY = 64 * 1024

_TEXT = {"type": "string", "minLength": 1}
CERTIFICATE_TYPE = {"type": "string", "enum": list(CERTIFICATE_TYPES)}
INSTALL_BODY = {
    "type": "object", "additionalProperties": False, "required": ["certificate_type", "certificate"],
    "properties": {"certificate_type": CERTIFICATE_TYPE,
                   "certificate": {**_TEXT, "description": "One PEM root certificate (at most 5500 characters)"}},
}
QUERY_BODY = {"type": "object", "additionalProperties": False, "required": ["certificate_type"],
              "properties": {"certificate_type": CERTIFICATE_TYPE}}
HASH_DATA = {
    "type": "object", "additionalProperties": False,
    "required": ["hashAlgorithm", "issuerNameHash", "issuerKeyHash", "serialNumber"],
    "properties": {"hashAlgorithm": {"type": "string", "enum": list(HASH_ALGORITHMS)},
                   "issuerNameHash": {"type": "string", "minLength": 1, "maxLength": 128},
                   "issuerKeyHash": {"type": "string", "minLength": 1, "maxLength": 128},
                   "serialNumber": {"type": "string", "minLength": 1, "maxLength": 40}},
}
DELETE_BODY = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "certificate_hash_data": {**HASH_DATA, "description": "As the station reported it"},
        "certificate": {**_TEXT, "description": "A PEM root certificate: its hash data is computed with the "
                                                "algorithm the station reported it with (else hash_algorithm)"},
        "hash_algorithm": {"type": "string", "enum": list(HASH_ALGORITHMS), "description": "Default SHA256"},
    },
}
TRIGGER_BODY = {
    "type": "object", "additionalProperties": False, "required": ["requested_message"],
    "properties": {"requested_message": {"type": "string", "enum": list(EXTENDED_TRIGGER_MESSAGES)},
                   "connector_id": {"type": "integer", "minimum": 0, "maximum": 2147483647}},
}
CHAIN_BODY = {"type": "object", "additionalProperties": False, "required": ["certificate_chain"],
              "properties": {"certificate_chain": {**_TEXT, "description": "PEM certificates, the station's first "
                                                                           "(at most 10000 characters)"}}}
REQUEST_ID = Path("request_id", "integer", resource="certificate request")
EVENT_FILTERS = (Query("type", description="Only events of this type"),
                 Query("since", "date-time", "Events that happened at or after"),
                 Query("until", "date-time", "Events that happened before"),
                 Query("critical", "boolean", "Only critical (true) or non-critical (false) events"),
                 Query("origin", enum=(STATION, CSMS), description="Reported by the station, or found by the CSMS"))
STATION_ANSWERS = {"404": "Unknown station", "409": "Station not connected", "422": "Invalid input (code says what)",
                   "502": "The station answered with an error", "504": "No answer in time"}

# -- what the routes answer --------------------------------------------------------------------------

_STATION_STATUS = {"type": "string", "description": "The station's answer"}
CA_VIEW = record({"certificate": dict(TEXT, description="PEM"), "subject": TEXT, "not_valid_after": DATE_TIME,
                  "certificate_path": dict(TEXT, description="The file, e.g. for [plugin:security] tls_ca"),
                  "external_ca": dict(BOOLEAN, description="CSRs wait for a chain an external CA signs")},
                 title="SecurityCA")
INSTALLED_CERTIFICATE = record(columns(installed_certificates), title="InstalledCertificate")
CERTIFICATE_REQUEST = record(columns(certificate_requests), title="CertificateRequest")
STATION_CERTIFICATE = record({
    "station_id": TEXT,
    "request_id": dict(INTEGER, description="The certificate request it was signed for"),
    "serial_number": nullable(dict(TEXT, description="Hexadecimal")),
    "not_before": nullable(DATE_TIME),
    "not_after": nullable(dict(DATE_TIME, description="When it expires: at profile 3 the station cannot connect "
                                                      "with it after that")),
    "accepted_at": dict(DATE_TIME, description="When the station accepted it (CertificateSigned)"),
}, title="StationCertificate", description="A station's current certificate: the one of its newest accepted "
                                           "certificate request")
EXPIRES_BEFORE = Query("expires_before", "date-time", "Only certificates that expire before this time")
SECURITY_EVENT = record(columns(security_events), title="SecurityEvent")
INSTALLED = record({"station_id": TEXT, "certificate_type": CERTIFICATE_TYPE, "status": _STATION_STATUS})
INVENTORY = record({"items": array(INSTALLED_CERTIFICATE)})
QUERIED = record({"station_id": TEXT, "certificate_type": CERTIFICATE_TYPE, "status": _STATION_STATUS,
                  "certificate_hash_data": array(HASH_DATA, description="As the station reported them"),
                  "items": array(INSTALLED_CERTIFICATE, description="The inventory after this report")})
DELETED = record({"station_id": TEXT, "certificate_hash_data": HASH_DATA, "status": _STATION_STATUS})
TRIGGERED = record({"station_id": TEXT, "requested_message": enum(EXTENDED_TRIGGER_MESSAGES),
                    "connector_id": nullable(INTEGER), "status": _STATION_STATUS})
CHAIN_SENT = record({"station_id": TEXT, "request_id": INTEGER, "status": _STATION_STATUS})


def refused(exc: Refused):
    return unprocessable(exc.message, exc.code)


def add_routes(part, app, router):
    """``part``: the plugin's :class:`plugins.security.certificate_management.CertificateManagement`."""

    async def existing(station_id: str) -> None:
        if await app.station_store.get(station_id) is None:
            raise not_found("station", station_id)

    def root_certificate(pem: str):
        try:
            certificate = parse_certificate(pem)
        except Refused as exc:
            raise refused(exc)
        if not is_self_signed(certificate):
            raise unprocessable("InstallCertificate installs root certificates: this one is not self-signed",
                                "not_a_root_certificate")
        return certificate

    async def ca_certificate(request):
        ca = part.ca
        return {"certificate": ca.certificate_pem, "subject": ca.certificate.subject.rfc4514_string(),
                "not_valid_after": ca.certificate.not_valid_after_utc, "certificate_path": ca.certificate_path,
                "external_ca": part.requests.external_ca}

    async def install_certificate(request):
        station_id = request.params["station_id"]
        certificate_type, pem = request.body["certificate_type"], request.body["certificate"]
        root_certificate(pem)
        await existing(station_id)
        response = await send_call(app, station_id, "InstallCertificate",
                                   {"certificateType": certificate_type, "certificate": pem})
        return {"station_id": station_id, "certificate_type": certificate_type, "status": response["status"]}

    async def list_certificates(request):
        station_id = request.params["station_id"]
        await existing(station_id)
        return {"items": await part.inventory.list(station_id, request.query.get("certificate_type"))}

    async def query_certificates(request):
        station_id, certificate_type = request.params["station_id"], request.body["certificate_type"]
        await existing(station_id)
        response = await send_call(app, station_id, "GetInstalledCertificateIds", {"certificateType": certificate_type})
        return {"station_id": station_id, "certificate_type": certificate_type, "status": response["status"],
                "certificate_hash_data": response.get("certificateHashData", []),
                "items": await part.inventory.list(station_id, certificate_type)}

    async def delete_certificate(request):
        station_id, body = request.params["station_id"], request.body
        if ("certificate_hash_data" in body) == ("certificate" in body):
            raise unprocessable("Give either certificate_hash_data or certificate", "hash_data_or_certificate")
        await existing(station_id)
        if "certificate" in body:
            certificate = root_certificate(body["certificate"])
            algorithm = await part.inventory.algorithm_for(station_id, body["certificate"])
            data = hash_data(certificate, algorithm or body.get("hash_algorithm", "SHA256"))
        else:
            if "hash_algorithm" in body:
                raise unprocessable("hash_algorithm goes with certificate; certificate_hash_data names its own",
                                    "hash_algorithm_unexpected")
            data = body["certificate_hash_data"]
        response = await send_call(app, station_id, "DeleteCertificate", {"certificateHashData": data})
        return {"station_id": station_id, "certificate_hash_data": data, "status": response["status"]}

    async def extended_trigger(request):
        station_id, body = request.params["station_id"], request.body
        await existing(station_id)
        payload = {"requestedMessage": body["requested_message"]}
        if "connector_id" in body:
            payload["connectorId"] = body["connector_id"]
        response = await send_call(app, station_id, "ExtendedTriggerMessage", payload)
        return {"station_id": station_id, "requested_message": body["requested_message"],
                "connector_id": body.get("connector_id"), "status": response["status"]}

    async def list_requests(request):
        station_id = request.params["station_id"]
        await existing(station_id)
        limit, offset = request.page()
        total, items = await part.requests.list(station_id, limit, offset, request.query.get("status"),
                                                request.query.get("expires_before"))
        return paginated(items, total, limit, offset)

    async def station_certificates(request):
        limit, offset = request.page()
        total, items = await part.requests.list_current(limit, offset, request.query.get("expires_before"),
                                                        request.query.get("station_id"))
        return paginated(items, total, limit, offset)

    async def certificate_request(station_id: str, request_id: int) -> dict:
        await existing(station_id)
        found = await part.requests.get(station_id, request_id)
        if found is None:
            raise not_found("certificate request", request_id)
        return found

    async def get_request(request):
        return await certificate_request(request.params["station_id"], request.params["request_id"])

    async def post_signed_certificate(request):
        station_id, request_id = request.params["station_id"], request.params["request_id"]
        found = await certificate_request(station_id, request_id)
        if found["status"] not in (AWAITING_CERTIFICATE, SEND_FAILED):
            raise conflict(f"Certificate request {request_id} is {found['status']}, not awaiting a certificate",
                           "certificate_request_not_awaiting", status=found["status"])
        try:
            chain = part.requests.check_signed_chain(found, request.body["certificate_chain"], station_id)
        except Refused as exc:
            raise refused(exc)
        if not app.is_connected(station_id):  # before the chain is stored: the request stays as it was
            raise conflict(f"Station {station_id!r} is not connected", "station_offline")
        await part.requests.store_chain(request_id, chain)
        try:
            response = await send_call(app, station_id, "CertificateSigned", {"certificateChain": chain})
        except ApiError as exc:
            await part.requests.unsent(request_id, failure_text(exc))
            raise
        return {"station_id": station_id, "request_id": request_id, "status": response["status"]}

    async def list_events(request, station_id: str | None = None):
        limit, offset = request.page()
        query = request.query
        total, items = await part.events.list(limit, offset, station_id=station_id or query.get("station_id"),
                                              event_type=query.get("type"), since=query.get("since"),
                                              until=query.get("until"), critical=query.get("critical"),
                                              origin=query.get("origin"))
        return paginated(items, total, limit, offset)

    async def list_station_events(request):
        station_id = request.params["station_id"]
        await existing(station_id)
        return await list_events(request, station_id)

    tags = ("security",)
    router.add("GET", "/security/ca", ca_certificate, "The CSMS CA certificate (trust anchor of charge point "
               "certificates)", tags=tags, response=CA_VIEW, responses={"200": "OK"})
    router.add("POST", "/stations/{station_id}/certificates", install_certificate,
               "Install a root certificate on the station (InstallCertificate)", tags=tags, body=INSTALL_BODY,
               max_body=MAX_BODY, response=INSTALLED, responses={"200": "The station's answer", **STATION_ANSWERS},
               scope="commands")
    router.add("GET", "/stations/{station_id}/certificates", list_certificates,
               "The station's installed certificates as last reported (or installed since)", tags=tags,
               query=(Query("certificate_type", enum=CERTIFICATE_TYPES),), response=INVENTORY,
               responses={"200": "OK", "404": "Unknown station"})
    router.add("POST", "/stations/{station_id}/certificates/query", query_certificates,
               "Ask the station for its installed certificates of a type (GetInstalledCertificateIds)", tags=tags,
               body=QUERY_BODY, response=QUERIED,
               responses={"200": "The station's answer and the inventory", **STATION_ANSWERS}, scope="commands")
    router.add("POST", "/stations/{station_id}/certificates/delete", delete_certificate,
               "Delete a certificate from the station (DeleteCertificate)", tags=tags, body=DELETE_BODY,
               max_body=MAX_BODY, response=DELETED, responses={"200": "The station's answer", **STATION_ANSWERS},
               scope="commands")
    router.add("POST", "/stations/{station_id}/extended-trigger", extended_trigger,
               "Ask the station to send a message now (ExtendedTriggerMessage)", tags=tags, body=TRIGGER_BODY,
               response=TRIGGERED, responses={"200": "The station's answer", **STATION_ANSWERS}, scope="commands")
    router.add("GET", "/stations/{station_id}/certificate-requests", list_requests,
               "The station's certificate signing requests (SignCertificate), newest first", tags=tags,
               query=PAGINATION + (Query("status", enum=STATUSES), EXPIRES_BEFORE),
               response=page(CERTIFICATE_REQUEST),
               responses={"200": "OK", "404": "Unknown station"})
    router.add("GET", "/security/station-certificates", station_certificates,
               "Each station's current certificate (the newest it accepted), the first to expire first", tags=tags,
               query=PAGINATION + (Query("station_id"), EXPIRES_BEFORE), response=page(STATION_CERTIFICATE),
               responses={"200": "OK"})
    router.extend_schema("Station", {"station_certificate": nullable(STATION_CERTIFICATE)}, "security")
    router.add("GET", "/stations/{station_id}/certificate-requests/{request_id}", get_request,
               "One certificate signing request", tags=tags, path=(REQUEST_ID,), response=CERTIFICATE_REQUEST,
               responses={"200": "OK", "404": "Unknown station or request"})
    router.add("POST", "/stations/{station_id}/certificate-requests/{request_id}/certificate",
               post_signed_certificate, "Send the chain an external CA signed for a request (CertificateSigned)",
               tags=tags, path=(REQUEST_ID,), body=CHAIN_BODY, max_body=MAX_BODY, response=CHAIN_SENT,
               responses={"200": "The station's answer", "409": "Not awaiting a certificate, or station not "
                          "connected", **{k: v for k, v in STATION_ANSWERS.items() if k != "409"}})
    router.add("GET", "/security-events", list_events, "Security events of every station, newest first",
               tags=tags, query=PAGINATION + (Query("station_id"),) + EVENT_FILTERS,
               response=page(SECURITY_EVENT), responses={"200": "OK"})
    router.add("GET", "/stations/{station_id}/security-events", list_station_events,
               "The station's security events, newest first", tags=tags, query=PAGINATION + EVENT_FILTERS, response=page(SECURITY_EVENT),
               responses={"200": "OK", "404": "Unknown station"})
