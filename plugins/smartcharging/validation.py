"""Checks a charging profile must pass before the CSMS sends it (pure functions, no Twisted).

The OCPP schemas already refuse unknown enum values and wrong types; these are the rules of OCPP 1.6
§3.13 and §7.7-§7.9 the schemas cannot express. Each problem is a ``{"field", "message"}`` dict so
the API can say exactly what is wrong; :class:`ProfileInvalid` carries them.
"""
from __future__ import annotations

from csms.ocpp16 import parse_datetime

RATE_UNITS = ("A", "W")
PURPOSES = ("ChargePointMaxProfile", "TxDefaultProfile", "TxProfile")
#: ChargingScheduleAllowedChargingRateUnit values (OCPP 1.6 §9.4) -> the unit they allow.
ALLOWED_UNIT_NAMES = {"Current": "A", "Power": "W"}


class ProfileInvalid(ValueError):
    """A charging profile (or a call carrying one) breaks an OCPP 1.6 rule; ``problems`` lists each."""

    def __init__(self, problems: list[dict]):
        self.problems = problems
        super().__init__("; ".join(f"{p['field']}: {p['message']}" for p in problems))


def _problem(field: str, message: str) -> dict:
    return {"field": field, "message": message}


def schedule_problems(schedule: dict, where: str = "chargingSchedule") -> list[dict]:
    """Rules of a ChargingSchedule (OCPP 1.6 §7.9, §7.10) on their own."""
    problems = []
    unit = schedule.get("chargingRateUnit")
    if unit not in RATE_UNITS:
        problems.append(_problem(f"{where}.chargingRateUnit", f"must be A or W, not {unit!r}"))
    duration = schedule.get("duration")
    if duration is not None and duration <= 0:
        problems.append(_problem(f"{where}.duration", "must be a positive number of seconds"))
    if schedule.get("minChargingRate") is not None and schedule["minChargingRate"] < 0:
        problems.append(_problem(f"{where}.minChargingRate", "must not be negative"))
    if schedule.get("startSchedule") is not None:
        problems.extend(_date_problems(schedule, ("startSchedule",), where))
    periods = schedule.get("chargingSchedulePeriod") or []
    if not periods:
        problems.append(_problem(f"{where}.chargingSchedulePeriod", "needs at least one period"))
    previous = None
    for index, period in enumerate(periods):
        field = f"{where}.chargingSchedulePeriod[{index}]"
        start = period.get("startPeriod")
        if index == 0 and start != 0:
            problems.append(_problem(f"{field}.startPeriod", "the first period must start at 0"))
        elif previous is not None and start is not None and start <= previous:
            problems.append(_problem(f"{field}.startPeriod",
                                     f"periods must be in strictly ascending startPeriod order "
                                     f"({start} after {previous}: overlapping or unordered)"))
        if start is not None and start < 0:
            problems.append(_problem(f"{field}.startPeriod", "must not be negative"))
        if period.get("limit") is not None and period["limit"] < 0:
            problems.append(_problem(f"{field}.limit", "must not be negative"))
        phases = period.get("numberPhases")
        if phases is not None and phases not in (1, 2, 3):
            problems.append(_problem(f"{field}.numberPhases", "must be 1, 2 or 3"))
        previous = start if start is not None else previous
    return problems


def _date_problems(container: dict, keys, where: str) -> list[dict]:
    problems = []
    for key in keys:
        value = container.get(key)
        if value is None:
            continue
        try:
            parse_datetime(value)
        except (TypeError, ValueError):
            problems.append(_problem(f"{where}.{key}", "is not an ISO 8601 date-time"))
    return problems


def profile_problems(profile: dict, where: str = "csChargingProfiles") -> list[dict]:
    """Rules of one ChargingProfile (OCPP 1.6 §7.7) that do not depend on the station's state."""
    problems = []
    purpose = profile.get("chargingProfilePurpose")
    kind = profile.get("chargingProfileKind")
    if purpose not in PURPOSES:
        problems.append(_problem(f"{where}.chargingProfilePurpose", f"unknown purpose {purpose!r}"))
    if profile.get("stackLevel", 0) < 0:
        problems.append(_problem(f"{where}.stackLevel", "must not be negative"))
    if profile.get("chargingProfileId", 0) < 0:
        problems.append(_problem(f"{where}.chargingProfileId", "must not be negative"))
    if profile.get("transactionId") is not None and purpose != "TxProfile":
        problems.append(_problem(f"{where}.transactionId", "is only allowed with chargingProfilePurpose TxProfile"))
    schedule = profile.get("chargingSchedule") or {}
    if kind == "Recurring":
        if profile.get("recurrencyKind") is None:
            problems.append(_problem(f"{where}.recurrencyKind", "is required for a Recurring profile"))
        if schedule.get("startSchedule") is None:
            problems.append(_problem(f"{where}.chargingSchedule.startSchedule",
                                     "is required for a Recurring profile"))
    elif profile.get("recurrencyKind") is not None:
        problems.append(_problem(f"{where}.recurrencyKind", "is only allowed with chargingProfileKind Recurring"))
    if kind == "Relative" and schedule.get("startSchedule") is not None:
        problems.append(_problem(f"{where}.chargingSchedule.startSchedule",
                                 "must be omitted for a Relative profile (it starts with the transaction)"))
    date_problems = _date_problems(profile, ("validFrom", "validTo"), where)
    problems.extend(date_problems)
    if not date_problems and profile.get("validFrom") and profile.get("validTo") and \
            parse_datetime(profile["validFrom"]) >= parse_datetime(profile["validTo"]):
        problems.append(_problem(f"{where}.validTo", "must be after validFrom"))
    problems.extend(schedule_problems(schedule, f"{where}.chargingSchedule"))
    return problems


def station_limit_problems(profile: dict, configuration: dict | None, where: str = "csChargingProfiles") -> list[dict]:
    """Limits the station announced in its configuration (OCPP 1.6 §9.4), when the CSMS knows them."""
    problems = []
    configuration = configuration or {}
    raw = configuration.get("ChargeProfileMaxStackLevel")
    try:
        max_level = int(raw) if raw not in (None, "") else None
    except ValueError:
        max_level = None
    if max_level is not None and profile.get("stackLevel", 0) > max_level:
        problems.append(_problem(f"{where}.stackLevel",
                                 f"exceeds the station's ChargeProfileMaxStackLevel ({max_level})"))
    allowed_raw = configuration.get("ChargingScheduleAllowedChargingRateUnit")
    if allowed_raw:
        allowed = {ALLOWED_UNIT_NAMES[name.strip()] for name in allowed_raw.split(",")
                   if name.strip() in ALLOWED_UNIT_NAMES}
        unit = (profile.get("chargingSchedule") or {}).get("chargingRateUnit")
        if allowed and unit in RATE_UNITS and unit not in allowed:
            problems.append(_problem(f"{where}.chargingSchedule.chargingRateUnit",
                                     f"the station only accepts {allowed_raw} "
                                     "(ChargingScheduleAllowedChargingRateUnit)"))
    return problems


def check_set_charging_profile(payload: dict, active_transactions: list[dict],
                               configuration: dict | None = None) -> None:
    """Raise :class:`ProfileInvalid` unless SetChargingProfile ``payload`` may be sent (OCPP 1.6 §5.15).

    ``active_transactions`` are the station's open transactions (``transaction_id``, ``connector_id``).
    """
    connector_id = payload["connectorId"]
    profile = payload["csChargingProfiles"]
    problems = []
    if connector_id < 0:
        problems.append(_problem("connectorId", "must not be negative"))
    problems.extend(profile_problems(profile))
    problems.extend(station_limit_problems(profile, configuration))
    purpose = profile.get("chargingProfilePurpose")
    if purpose == "ChargePointMaxProfile" and connector_id != 0:
        problems.append(_problem("connectorId", "a ChargePointMaxProfile can only be set on connector 0"))
    if purpose == "TxProfile":
        if connector_id == 0:
            problems.append(_problem("connectorId", "a TxProfile needs the connector of a transaction, not 0"))
        else:
            running = [t for t in active_transactions if t["connector_id"] == connector_id]
            if not running:
                problems.append(_problem("connectorId", f"connector {connector_id} has no active transaction, "
                                                        "so a TxProfile cannot be set on it"))
            elif profile.get("transactionId") is not None and \
                    profile["transactionId"] not in {t["transaction_id"] for t in running}:
                problems.append(_problem("csChargingProfiles.transactionId",
                                         f"transaction {profile['transactionId']} is not the active transaction "
                                         f"on connector {connector_id} "
                                         f"({', '.join(str(t['transaction_id']) for t in running)})"))
    if problems:
        raise ProfileInvalid(problems)


def check_remote_start_profile(payload: dict, configuration: dict | None = None) -> None:
    """Raise :class:`ProfileInvalid` unless the chargingProfile of RemoteStartTransaction ``payload`` is
    acceptable (OCPP 1.6 §5.11: purpose TxProfile; no transactionId, as the transaction does not exist
    yet; OCTT TC_059). A payload without chargingProfile passes.
    """
    profile = payload.get("chargingProfile")
    if profile is None:
        return
    where = "chargingProfile"
    problems = profile_problems(profile, where)
    problems.extend(station_limit_problems(profile, configuration, where))
    if profile.get("chargingProfilePurpose") != "TxProfile":
        problems.append(_problem(f"{where}.chargingProfilePurpose",
                                 "must be TxProfile in RemoteStartTransaction"))
    if profile.get("transactionId") is not None:
        problems.append(_problem(f"{where}.transactionId",
                                 "must be omitted in RemoteStartTransaction (the transaction does not exist yet)"))
    if payload.get("connectorId") is not None and payload["connectorId"] <= 0:
        problems.append(_problem("connectorId", "must be a connector (1 or more) when given"))
    if problems:
        raise ProfileInvalid(problems)
