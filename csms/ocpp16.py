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


def parse_datetime(text: str) -> datetime:
    """Any ISO 8601 date-time with an offset (or ``Z``), as an aware UTC datetime.

    A value without an offset is read as UTC: OCPP 1.6 asks for UTC and some stations omit the ``Z``.
    Raises ValueError for text that is not such a date-time, including one that falls outside the years
    1 to 9999 once converted to UTC (``0001-01-01T00:00:00+01:00``), so callers need catch only that.
    """
    if not isinstance(text, str):
        raise TypeError(f"a date-time is a string, not {type(text).__name__}")
    value = datetime.fromisoformat(text.strip().replace("z", "Z"))
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError(f"{text!r} is not a representable date-time: in UTC it falls outside the years "
                         "1 to 9999") from None


def utc_from_timestamp(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)
