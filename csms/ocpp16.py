"""The OCPP 1.6 action catalogue: which actions exist, in which direction, in which feature profile."""
from __future__ import annotations

import re
from datetime import datetime, timezone

CORE = "Core"
FIRMWARE = "FirmwareManagement"
LOCAL_AUTH = "LocalAuthListManagement"
RESERVATION = "Reservation"
SMART_CHARGING = "SmartCharging"
REMOTE_TRIGGER = "RemoteTrigger"

#: Actions a charge point sends to the Central System (OCPP 1.6 §4), by profile.
INBOUND = {
    "Authorize": CORE,
    "BootNotification": CORE,
    "DataTransfer": CORE,
    "Heartbeat": CORE,
    "MeterValues": CORE,
    "StartTransaction": CORE,
    "StatusNotification": CORE,
    "StopTransaction": CORE,
    "DiagnosticsStatusNotification": FIRMWARE,
    "FirmwareStatusNotification": FIRMWARE,
}

#: Actions the Central System sends to a charge point (OCPP 1.6 §5), by profile.
OUTBOUND = {
    "ChangeAvailability": CORE,
    "ChangeConfiguration": CORE,
    "ClearCache": CORE,
    "DataTransfer": CORE,
    "GetConfiguration": CORE,
    "RemoteStartTransaction": CORE,
    "RemoteStopTransaction": CORE,
    "Reset": CORE,
    "UnlockConnector": CORE,
    "GetDiagnostics": FIRMWARE,
    "UpdateFirmware": FIRMWARE,
    "GetLocalListVersion": LOCAL_AUTH,
    "SendLocalList": LOCAL_AUTH,
    "CancelReservation": RESERVATION,
    "ReserveNow": RESERVATION,
    "ClearChargingProfile": SMART_CHARGING,
    "GetCompositeSchedule": SMART_CHARGING,
    "SetChargingProfile": SMART_CHARGING,
    "TriggerMessage": REMOTE_TRIGGER,
}

PROFILES = (CORE, FIRMWARE, LOCAL_AUTH, RESERVATION, SMART_CHARGING, REMOTE_TRIGGER)


def inbound_of(profile: str) -> tuple[str, ...]:
    """The CP->CS actions of one feature profile (what its plugin answers)."""
    return tuple(action for action, owner in INBOUND.items() if owner == profile)


def outbound_of(profile: str) -> tuple[str, ...]:
    """The CS->CP actions of one feature profile (what its plugin offers operators)."""
    return tuple(action for action, owner in OUTBOUND.items() if owner == profile)

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def hook_name(action: str) -> str:
    """``StartTransaction`` -> ``csms_handle_start_transaction``: the firstresult hook for an inbound action."""
    return "csms_handle_" + _CAMEL.sub("_", action).lower()


def format_datetime(value: datetime) -> str:
    """UTC ISO 8601 with milliseconds and a ``Z``, as every timestamp the CSMS sends."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    elif value.utcoffset():
        value = value.astimezone(timezone.utc)  # (OverflowError past year 9999, as before)
    # isoformat: half the time of strftime, and a 4-digit year below 1000 too; milliseconds truncated.
    return value.isoformat(timespec="milliseconds")[:23] + "Z"


#: The date-times :func:`parse_datetime` reads: ISO 8601's extended calendar form, which RFC 3339 (the JSON
#: schemas' ``date-time``) profiles, with the tolerances stations need. See docs/connections.md (Date-times).
_DATE_TIME = re.compile(
    r"\d{4}-\d\d-\d\d[Tt]"                    # date: no week or ordinal dates, no basic format
    r"\d\d:\d\d(?::(?P<second>\d\d)(?:[.,]\d+)?)?"  # hh:mm, seconds (60: a leap second) and fraction optional
    r"(?:[Zz]|[+-]\d\d(?::?[0-5]\d)?)?",          # Z, +hh:mm, +hhmm, +hh, or none (read as UTC)
    re.ASCII)
#: The last instant of a minute Python can represent: where a leap second (second 60) is put.
_LAST_MICROSECOND = 999999


def parse_datetime(text: str) -> datetime:
    """An ISO 8601 date-time in the extended calendar form (``2024-05-01T10:00:00.123+02:00``), as an
    aware UTC datetime.

    A value without an offset is read as UTC: OCPP 1.6 asks for UTC and some stations omit the ``Z``.
    Also taken: a lower-case ``t`` or ``z``, a comma as decimal mark (ISO 8601's own), any number of
    fraction digits (truncated to microseconds), offsets without a colon or minutes, and a time without
    seconds. A leap second (second 60, RFC 3339 §5.7, in whatever minute the offset puts it) is read as
    the last microsecond of its minute, ``23:59:59.999999``: it keeps its day, and it comes after every
    instant before it and before every instant after it (later instants of the leap second itself read
    the same), so a stop stamped in it is never before its start. Refused, with ValueError: surrounding
    whitespace, week and ordinal dates, the basic format (``20240501T100000Z``), a decimal mark without
    digits, offsets with seconds or over 59 minutes, second 61, and a date-time that falls outside the
    years 1 to 9999 once converted to UTC (``0001-01-01T00:00:00+01:00``), so callers need catch only that.
    """
    if not isinstance(text, str):
        raise TypeError(f"a date-time is a string, not {type(text).__name__}")
    match = _DATE_TIME.fullmatch(text)
    if match is None:
        raise ValueError(f"{text[:40]!r} is not an ISO 8601 date-time such as 2024-05-01T10:00:00Z")
    readable = text.replace("z", "Z")
    leap = match.group("second") == "60"
    if leap:
        readable = readable[:match.start("second")] + "59" + readable[match.end("second"):]
    value = datetime.fromisoformat(readable)
    if leap:
        value = value.replace(microsecond=_LAST_MICROSECOND)
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError(f"{text!r} is not a representable date-time: in UTC it falls outside the years "
                         "1 to 9999") from None


def utc_from_timestamp(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)
