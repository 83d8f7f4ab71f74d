"""Operator API routes of the security profiles: the stored profile, its upgrade (TC_083) and the
AuthorizationKey rotation (TC_073)."""
from __future__ import annotations

import secrets

from twisted.internet import threads
from twisted.logger import Logger

from csms.api.errors import ApiError, conflict, not_found, unprocessable
from csms.api.stations import send_call
from csms.api.types import BOOLEAN, INTEGER, TEXT, nullable, record
from csms.passwords import hash_password

log = Logger(namespace="csms.security.api")

#: OCPP 1.6 Security whitepaper: the Basic auth password is 16 to 20 bytes; AuthorizationKey carries it in hex.
PASSWORD_BYTES = (16, 20)
#: ChangeConfiguration answers after which the station uses the new value (at once, or after its reboot).
APPLIED = ("Accepted", "RebootRequired")

PROFILE_SET = {"type": "object", "additionalProperties": False, "required": ["profile"],
               "properties": {"profile": {"type": "integer", "minimum": 0, "maximum": 3,
                                          "description": "The lowest security profile the station may connect at"}}}
PROFILE_UPGRADE = {"type": "object", "additionalProperties": False, "required": ["profile"],
                   "properties": {"profile": {"type": "integer", "minimum": 1, "maximum": 3,
                                              "description": "The station's new security profile"}}}
AUTHORIZATION_KEY = {
    "type": "object", "additionalProperties": False,
    "properties": {"password": {"type": "string", "minLength": 4, "maxLength": 20,  # 16 bytes: 4 characters at least
                                "description": "The new Basic auth password, 16 to 20 bytes in UTF-8, printable "
                                               "ASCII recommended. Default: a random one, shown in the answer once"}},
}

# -- what the routes answer --------------------------------------------------------------------------

_CHANGE_CONFIGURATION = {"type": "string", "description": "The station's ChangeConfiguration status"}
PROFILE_VIEW = record({
    "station_id": TEXT,
    "security_profile": dict(INTEGER, description="The lowest profile the station may connect at"),
    "connection_security_profile": nullable(dict(INTEGER, description="The profile of its current (or last) "
                                                                      "connection; null: none seen")),
    "online": BOOLEAN,
    "tls_listener": dict(BOOLEAN, description="The TLS listener runs ([plugin:security] tls_endpoint)"),
    "client_certificates": dict(BOOLEAN, description="The listener checks client certificates (tls_ca)"),
}, title="SecurityProfile")
UPGRADE_RESULT = record({"station_id": TEXT, "profile": INTEGER, "change_configuration": _CHANGE_CONFIGURATION,
                         "reset": nullable(dict(TEXT, description="The station's Reset status; null: not sent"))})
AUTHORIZATION_KEY_RESULT = record({
    "station_id": TEXT, "change_configuration": _CHANGE_CONFIGURATION,
    "stored": dict(BOOLEAN, description="The new password's hash is stored: the old password is refused"),
    "password": dict(TEXT, description="The generated password, shown this once (absent when one was given)"),
}, optional=("password",))
COMMAND_RESPONSES = {"200": "The station's answers", "404": "Unknown station", "409": "Station not connected",
                     "502": "The station answered with an error", "504": "The station did not answer in time"}


def password_problem(password: str) -> str | None:
    size = len(password.encode("utf-8"))
    if not PASSWORD_BYTES[0] <= size <= PASSWORD_BYTES[1]:
        return f"password must be {PASSWORD_BYTES[0]} to {PASSWORD_BYTES[1]} bytes in UTF-8, not {size}"
    if not password.isprintable():
        return "password must be printable"
    return None


def add_routes(profiles, app, router):
    store = profiles.store
    router.extend_schema("Station", {name: PROFILE_VIEW["properties"][name]
                                     for name in ("security_profile", "connection_security_profile")}, "security")

    async def existing_station(station_id: str) -> None:
        if await app.station_store.get(station_id) is None:
            raise not_found("station", station_id)

    async def profile_view(station_id: str) -> dict:
        details = (await profiles.details([station_id]))[station_id]
        return {"station_id": station_id, **details, "online": app.is_connected(station_id),
                "tls_listener": bool(profiles.tls_endpoint), "client_certificates": profiles.client_certificates}

    async def get_profile(request):
        station_id = request.params["station_id"]
        await existing_station(station_id)
        return await profile_view(station_id)

    async def set_profile(request):
        station_id = request.params["station_id"]
        await existing_station(station_id)
        await store.set_floor(station_id, request.body["profile"])
        log.info("An operator set the security profile of {station} to {profile}", station=station_id,
                 profile=request.body["profile"])
        return await profile_view(station_id)

    async def upgrade_profile(request):
        """TC_083: ChangeConfiguration(SecurityProfile), then Reset(Hard) once the station applies it."""
        station_id = request.params["station_id"]
        profile = request.body["profile"]
        await existing_station(station_id)
        current = (await profiles.details([station_id]))[station_id]["security_profile"]
        if profile <= current:
            raise conflict(f"Station {station_id!r} is at security profile {current} already: an upgrade goes higher",
                           "not_an_upgrade", security_profile=current)
        if profile >= 2 and not profiles.tls_endpoint:
            raise conflict("Security profiles 2 and 3 need the TLS listener ([plugin:security] tls_endpoint)",
                           "tls_not_configured")
        if profile == 3 and not profiles.client_certificates:
            raise conflict("Security profile 3 needs CA certificates to check station certificates against "
                           "([plugin:security] tls_ca)", "client_certificates_not_configured")
        answer = await send_call(app, station_id, "ChangeConfiguration",
                                 {"key": "SecurityProfile", "value": str(profile)})
        result = {"station_id": station_id, "profile": profile, "change_configuration": answer["status"],
                  "reset": None}
        if answer["status"] in APPLIED:
            reset = await send_call(app, station_id, "Reset", {"type": "Hard"})
            result["reset"] = reset["status"]
        log.info("Security profile upgrade of {station} to {profile}: ChangeConfiguration {change}, Reset {reset}",
                 station=station_id, profile=profile, change=result["change_configuration"], reset=result["reset"])
        return result

    async def set_authorization_key(request):
        """TC_073: ChangeConfiguration(AuthorizationKey = hex of the password); the hash is stored once the
        station applies it, and the old password no longer works."""
        station_id = request.params["station_id"]
        await existing_station(station_id)
        given = request.body.get("password")
        if given is not None:
            problem = password_problem(given)
            if problem is not None:
                raise unprocessable(f"Invalid request body: {problem}", "invalid_password")
        password = given if given is not None else secrets.token_hex(10)
        answer = await send_call(app, station_id, "ChangeConfiguration",
                                 {"key": "AuthorizationKey", "value": password.encode("utf-8").hex()})
        status = answer["status"]
        result = {"station_id": station_id, "change_configuration": status, "stored": status in APPLIED}
        if status in APPLIED:
            password_hash = await threads.deferToThreadPool(app.reactor, app.reactor.getThreadPool(),
                                                            hash_password, password)
            if not await app.station_store.update(station_id, password_hash=password_hash):
                raise ApiError(404, "station_not_found", f"Station {station_id!r} was deleted meanwhile")
            if given is None:
                result["password"] = password
        log.info("AuthorizationKey change for {station}: {status}", station=station_id, status=status)
        return result

    tags = ("security",)
    router.add("GET", "/stations/{station_id}/security-profile", get_profile,
               "The station's security profile: the lowest it may connect at, and its current (or last) "
               "connection's", tags=tags, response=PROFILE_VIEW, responses={"200": "OK", "404": "Unknown station"})
    router.add("PUT", "/stations/{station_id}/security-profile", set_profile,
               "Set the lowest security profile the station may connect at (lower too: a station replaced)",
               tags=tags, body=PROFILE_SET, response=PROFILE_VIEW, responses={"200": "OK", "404": "Unknown station"})
    router.add("POST", "/stations/{station_id}/security-profile/upgrade", upgrade_profile,
               "Upgrade the station's security profile: ChangeConfiguration(SecurityProfile), then Reset(Hard) "
               "once it is accepted (OCTT TC_083)", tags=tags, body=PROFILE_UPGRADE, response=UPGRADE_RESULT,
               # It changes how the station authenticates: an admin's decision, not a routine command.
               scope="admin",
               description="Answers with the station's ChangeConfiguration status and, when it applies the change, "
                           "its Reset status (reset is null otherwise). Once the station reconnects at the new "
                           "profile, a connection at a lower one is refused. 409: not higher than the stored "
                           "profile, TLS (or client certificates) not configured, or the station is not connected.",
               responses={**COMMAND_RESPONSES, "409": "Not an upgrade, TLS not configured, or not connected"})
    router.add("POST", "/stations/{station_id}/authorization-key", set_authorization_key,
               "Change the station's Basic auth password on the station (ChangeConfiguration AuthorizationKey, "
               "OCTT TC_073), then store it", tags=tags, body=AUTHORIZATION_KEY, body_required=False,
               response=AUTHORIZATION_KEY_RESULT, scope="admin",  # it changes the station's credentials
               description="The new password's hash is stored only when the station answers Accepted (or "
                           "RebootRequired): from then on the old password is refused. Rejected, NotSupported, an "
                           "error or no answer leave the old one. A generated password is shown in the answer, "
                           "once; a given one is never echoed.",
               responses={**COMMAND_RESPONSES, "422": "Password not 16 to 20 bytes"})
