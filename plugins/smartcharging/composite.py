"""The composite schedule engine (OCPP 1.6 §3.13): pure Python, no Twisted, no database.

Given the charging profiles a station holds, a connector and a time window, it computes the schedule
the station should apply, the way OCPP 1.6 §3.13 describes a station combining its profiles:

* a profile counts only inside its validity window (``validFrom`` <= t < ``validTo``);
* Absolute schedules start at ``startSchedule``; Relative ones at the transaction's start; Recurring
  ones repeat from ``startSchedule`` every day (Daily) or every 7 days (Weekly);
* within one purpose, the highest stack level whose schedule defines a limit at t wins; where it
  defines none (outside its duration or validity), the next lower stack level applies (§3.13.2);
* a TxDefaultProfile set on the connector itself overrides one set on connector 0;
* a TxProfile overrides the TxDefaultProfile (§3.13.1);
* the ChargePointMaxProfile (connector 0) caps the result;
* limits are compared in one unit: ``W = A x voltage x numberPhases`` (numberPhases defaults to 3).

The algorithm samples every instant where any input may change (period starts, schedule ends,
validity bounds, recurrences) and evaluates the rules there; between two such instants every
profile's limit is constant, so the result is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from csms.ocpp16 import format_datetime, parse_datetime

DEFAULT_VOLTAGE = 230.0
DEFAULT_PHASES = 3
RECURRENCE_SECONDS = {"Daily": 86400, "Weekly": 7 * 86400}
#: Limits closer than this (in the compared unit) count as equal when comparing schedules.
DEFAULT_TOLERANCE = 0.05


def _seconds(value) -> int | None:
    """Whole seconds since the epoch of a datetime, an ISO 8601 string or a number (None stays None)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return math.floor(value)
    if isinstance(value, str):
        value = parse_datetime(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return math.floor(value.timestamp())


def _datetime(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def convert(limit: float, from_unit: str, to_unit: str, phases: int, voltage: float) -> float:
    """A limit in ``from_unit`` expressed in ``to_unit`` (A or W) for ``phases`` phases at ``voltage``."""
    if from_unit == to_unit:
        return float(limit)
    if from_unit == "A" and to_unit == "W":
        return float(limit) * voltage * phases
    if from_unit == "W" and to_unit == "A":
        return float(limit) / (voltage * phases)
    raise ValueError(f"unknown charging rate unit {from_unit!r} or {to_unit!r}")


@dataclass
class Limit:
    """A limit in force at one instant, already converted to the composite's unit."""

    value: float
    phases: int


@dataclass
class ProfileTimeline:
    """One charging profile (OCPP ``csChargingProfiles``) placed in absolute time."""

    profile: dict
    connector_id: int
    #: When the schedule of a Relative profile (or an Absolute one without startSchedule) starts.
    anchor: int | None

    @property
    def purpose(self) -> str:
        return self.profile["chargingProfilePurpose"]

    @property
    def stack_level(self) -> int:
        return self.profile["stackLevel"]

    @property
    def schedule(self) -> dict:
        return self.profile["chargingSchedule"]

    def _valid_at(self, t: int) -> bool:
        valid_from = _seconds(self.profile.get("validFrom"))
        valid_to = _seconds(self.profile.get("validTo"))
        return (valid_from is None or t >= valid_from) and (valid_to is None or t < valid_to)

    def _start_of_schedule(self, t: int) -> int | None:
        """The instant the schedule governing ``t`` started (the current recurrence), or None."""
        kind = self.profile["chargingProfileKind"]
        start = _seconds(self.schedule.get("startSchedule"))
        if kind == "Recurring":
            period = RECURRENCE_SECONDS.get(self.profile.get("recurrencyKind"))
            if period is None or start is None or t < start:
                return None
            return start + ((t - start) // period) * period
        if kind == "Relative":
            return self.anchor
        return start if start is not None else self.anchor

    def period_at(self, t: int) -> dict | None:
        """The chargingSchedulePeriod in force at ``t``, or None where this profile sets no limit."""
        if not self._valid_at(t):
            return None
        start = self._start_of_schedule(t)
        if start is None or t < start:
            return None
        offset = t - start
        duration = self.schedule.get("duration")
        if self.profile["chargingProfileKind"] == "Recurring":
            period = RECURRENCE_SECONDS[self.profile["recurrencyKind"]]
            duration = period if duration is None else min(duration, period)
        if duration is not None and offset >= duration:
            return None
        found = None
        for schedule_period in sorted(self.schedule["chargingSchedulePeriod"], key=lambda p: p["startPeriod"]):
            if schedule_period["startPeriod"] <= offset:
                found = schedule_period
            else:
                break
        return found

    def limit_at(self, t: int, unit: str, voltage: float) -> Limit | None:
        schedule_period = self.period_at(t)
        if schedule_period is None:
            return None
        phases = schedule_period.get("numberPhases", DEFAULT_PHASES)
        return Limit(convert(schedule_period["limit"], self.schedule["chargingRateUnit"], unit, phases, voltage),
                     phases)

    def breakpoints(self, begin: int, end: int) -> set[int]:
        """Every instant in [begin, end) where this profile's limit may change."""
        points = set()
        for key in ("validFrom", "validTo"):
            value = _seconds(self.profile.get(key))
            if value is not None:
                points.add(value)
        offsets = [p["startPeriod"] for p in self.schedule["chargingSchedulePeriod"]]
        duration = self.schedule.get("duration")
        if duration is not None:
            offsets.append(duration)
        kind = self.profile["chargingProfileKind"]
        start = _seconds(self.schedule.get("startSchedule"))
        if kind == "Recurring":
            period = RECURRENCE_SECONDS.get(self.profile.get("recurrencyKind"))
            if period is not None and start is not None:
                offsets.append(period)
                first = max(0, (begin - start) // period - 1)
                last = (end - start) // period + 1
                for k in range(first, last + 1):
                    points.update(start + k * period + offset for offset in offsets)
        else:
            anchor = self.anchor if kind == "Relative" or start is None else start
            if anchor is not None:
                points.update(anchor + offset for offset in offsets)
        return {p for p in points if begin <= p < end}


def _highest(timelines: list[ProfileTimeline], t: int, unit: str, voltage: float) -> Limit | None:
    """OCPP 1.6 §3.13.2: the highest stack level that defines a limit at ``t`` wins."""
    for timeline in sorted(timelines, key=lambda tl: tl.stack_level, reverse=True):
        limit = timeline.limit_at(t, unit, voltage)
        if limit is not None:
            return limit
    return None


@dataclass
class Segment:
    """[start, end) in epoch seconds with the limit in force (None: no profile limits it)."""

    start: int
    end: int
    limit: float | None
    phases: int | None


@dataclass
class CompositeSchedule:
    """The engine's answer: the window, the unit and the merged segments covering the window."""

    start: int
    duration: int
    unit: str
    segments: list[Segment] = field(default_factory=list)

    def limit_at(self, t: int) -> float | None:
        for segment in self.segments:
            if segment.start <= t < segment.end:
                return segment.limit
        return None

    def to_charging_schedule(self) -> dict | None:
        """As an OCPP ChargingSchedule: startSchedule at the first limited instant, periods merged.

        OCPP 1.6 has no way to say "no limit" inside a schedule, so leading and trailing unlimited
        time is trimmed and an unlimited gap in the middle is given ``"limit": None`` (a CSMS
        extension, documented in docs/smartcharging.md). None when nothing limits the window.
        """
        limited = [s for s in self.segments if s.limit is not None]
        if not limited:
            return None
        first, last = limited[0].start, limited[-1].end
        periods = []
        for segment in self.segments:
            if segment.end <= first or segment.start >= last:
                continue
            period = {"startPeriod": segment.start - first,
                      "limit": None if segment.limit is None else round(segment.limit, 1)}
            if segment.phases is not None and segment.phases != DEFAULT_PHASES:
                period["numberPhases"] = segment.phases
            periods.append(period)
        return {"startSchedule": format_datetime(_datetime(first)), "duration": last - first,
                "chargingRateUnit": self.unit, "chargingSchedulePeriod": periods}


def compute(profiles: list[dict], connector_id: int, start, duration: int, unit: str = "A",
            voltage: float = DEFAULT_VOLTAGE, transaction_start=None) -> CompositeSchedule:
    """The composite schedule for ``connector_id`` over [start, start + duration).

    ``profiles`` are dicts ``{"connector_id": int, "profile": csChargingProfiles}`` of the profiles
    installed on the station. ``transaction_start`` (datetime, string or None) is the
    start of the connector's transaction, which Relative schedules count from; without one they count
    from ``start``.
    """
    if unit not in ("A", "W"):
        raise ValueError(f"chargingRateUnit must be A or W, not {unit!r}")
    if duration <= 0:
        raise ValueError("duration must be positive")
    begin = _seconds(start)
    end = begin + int(duration)
    tx_start = _seconds(transaction_start)
    relative_anchor = tx_start if tx_start is not None else begin

    def timeline(entry) -> ProfileTimeline:
        profile = entry["profile"]
        # OCPP 1.6 §7.9: an Absolute schedule without startSchedule is relative to the start of charging.
        counts_from_transaction = profile["chargingProfileKind"] == "Relative" or (
            profile["chargingProfileKind"] == "Absolute" and not profile["chargingSchedule"].get("startSchedule"))
        anchor = relative_anchor if counts_from_transaction else None
        return ProfileTimeline(profile, entry["connector_id"], anchor)

    timelines = [timeline(entry) for entry in profiles]
    cp_max = [tl for tl in timelines if tl.purpose == "ChargePointMaxProfile" and tl.connector_id == 0]
    if connector_id == 0:
        tx_default_own, tx_default_station, tx = [], [], []
    else:
        tx_default_own = [tl for tl in timelines if tl.purpose == "TxDefaultProfile" and tl.connector_id == connector_id]
        tx_default_station = [tl for tl in timelines if tl.purpose == "TxDefaultProfile" and tl.connector_id == 0]
        tx = [tl for tl in timelines if tl.purpose == "TxProfile" and tl.connector_id == connector_id]
    relevant = cp_max + tx_default_own + tx_default_station + tx

    points = {begin}
    for tl in relevant:
        points |= tl.breakpoints(begin, end)
    ordered = sorted(points)

    segments: list[Segment] = []
    for index, t in enumerate(ordered):
        t_end = ordered[index + 1] if index + 1 < len(ordered) else end
        transaction_limit = (_highest(tx, t, unit, voltage) or _highest(tx_default_own, t, unit, voltage)
                             or _highest(tx_default_station, t, unit, voltage))
        cap = _highest(cp_max, t, unit, voltage)
        candidates = [limit for limit in (transaction_limit, cap) if limit is not None]
        chosen = min(candidates, key=lambda limit: limit.value) if candidates else None
        value = None if chosen is None else chosen.value
        phases = None if chosen is None else chosen.phases
        if segments and _same(segments[-1].limit, value) and segments[-1].phases == phases:
            segments[-1].end = t_end
        else:
            segments.append(Segment(t, t_end, value, phases))
    return CompositeSchedule(begin, int(duration), unit, segments)


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) < 1e-9


def schedule_segments(schedule: dict, start, duration: int, unit: str, voltage: float = DEFAULT_VOLTAGE):
    """A station's ChargingSchedule (e.g. GetCompositeSchedule's) as [(start, end, limit in ``unit``)].

    The schedule counts from its ``startSchedule`` (else from ``start``) and lasts ``duration`` (else
    to the end of the window).
    """
    begin = _seconds(start)
    end = begin + int(duration)
    origin = _seconds(schedule.get("startSchedule")) or begin
    stop = origin + schedule["duration"] if schedule.get("duration") is not None else end
    periods = sorted(schedule["chargingSchedulePeriod"], key=lambda p: p["startPeriod"])
    out = []
    for index, period in enumerate(periods):
        p_start = origin + period["startPeriod"]
        p_end = origin + periods[index + 1]["startPeriod"] if index + 1 < len(periods) else stop
        p_start, p_end = max(p_start, begin), min(p_end, end, stop)
        if p_start >= p_end:
            continue
        limit = period.get("limit")
        if limit is not None:
            limit = convert(limit, schedule["chargingRateUnit"], unit,
                            period.get("numberPhases", DEFAULT_PHASES), voltage)
        out.append((p_start, p_end, limit))
    return out


def compare(station_schedule: dict | None, composite: CompositeSchedule, voltage: float = DEFAULT_VOLTAGE,
            tolerance: float = DEFAULT_TOLERANCE) -> list[dict]:
    """Where a station's reported schedule differs from the CSMS's composite, as a list of
    ``{"from", "to", "station_limit", "csms_limit"}`` (times ISO 8601; limits in the composite's unit,
    None where that side sets no limit). Empty when they agree within ``tolerance``.
    """
    begin, end = composite.start, composite.start + composite.duration
    theirs = schedule_segments(station_schedule, _datetime(begin), composite.duration, composite.unit, voltage) \
        if station_schedule else []
    ours = [(s.start, s.end, s.limit) for s in composite.segments]
    points = sorted({begin, end} | {p for seg in theirs + ours for p in seg[:2]})

    def value_at(segments, t):
        for s_start, s_end, limit in segments:
            if s_start <= t < s_end:
                return limit
        return None

    differences: list[dict] = []
    for index, t in enumerate(points[:-1]):
        t_end = points[index + 1]
        if t >= end:
            break
        station_limit, csms_limit = value_at(theirs, t), value_at(ours, t)
        equal = (station_limit is None and csms_limit is None) or (
            station_limit is not None and csms_limit is not None and abs(station_limit - csms_limit) <= tolerance)
        if equal:
            continue
        station_limit = None if station_limit is None else round(station_limit, 1)
        csms_limit = None if csms_limit is None else round(csms_limit, 1)
        last = differences[-1] if differences else None
        if last and last["_end"] == t and last["station_limit"] == station_limit and last["csms_limit"] == csms_limit:
            last["_end"] = t_end
            continue
        differences.append({"_start": t, "_end": t_end, "station_limit": station_limit, "csms_limit": csms_limit})
    return [{"from": format_datetime(_datetime(d["_start"])), "to": format_datetime(_datetime(d["_end"])),
             "station_limit": d["station_limit"], "csms_limit": d["csms_limit"]} for d in differences]


#: The last whole second a datetime holds (9999-12-31T23:59:59Z), in seconds since the epoch.
LAST_SECOND = (datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)
               - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(seconds=1)


def window_fits(start, duration: int) -> bool:
    """Whether the window [start, start + duration) ends within the years a datetime can show."""
    return _seconds(start) + int(duration) <= LAST_SECOND


def window_start(value) -> datetime:
    """A window start as an aware datetime truncated to the second (helper for callers)."""
    return _datetime(_seconds(value))


__all__ = ["compute", "compare", "convert", "CompositeSchedule", "Segment", "schedule_segments", "window_fits",
           "window_start", "DEFAULT_VOLTAGE"]
