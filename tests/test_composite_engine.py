"""The composite schedule engine (OCPP 1.6 §3.13) against hand-worked cases, and its invariants
checked with hypothesis. Pure Python: no reactor, no database."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csms_plugins.smartcharging import composite
from csms_plugins.smartcharging.composite import compare, compute, convert

#: A Monday, so that Weekly recurrences start on a week boundary.
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
HOUR = 3600
DAY = 86400


def at(seconds: int) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def profile(connector_id, purpose, stack, periods, kind="Absolute", start=0, duration=None, unit="A",
            recurrency=None, valid_from=None, valid_to=None, profile_id=None):
    schedule = {"chargingRateUnit": unit,
                "chargingSchedulePeriod": [dict(zip(("startPeriod", "limit", "numberPhases"), p)) for p in periods]}
    if kind != "Relative" and start is not None:
        schedule["startSchedule"] = at(start)
    if duration is not None:
        schedule["duration"] = duration
    body = {"chargingProfileId": profile_id if profile_id is not None else stack * 10 + connector_id,
            "stackLevel": stack, "chargingProfilePurpose": purpose, "chargingProfileKind": kind,
            "chargingSchedule": schedule}
    if recurrency:
        body["recurrencyKind"] = recurrency
    if valid_from is not None:
        body["validFrom"] = at(valid_from)
    if valid_to is not None:
        body["validTo"] = at(valid_to)
    return {"connector_id": connector_id, "profile": body}


def periods(schedule):
    """(startPeriod, limit[, numberPhases]) tuples of a ChargingSchedule, for compact expectations."""
    out = []
    for p in schedule["chargingSchedulePeriod"]:
        out.append((p["startPeriod"], p["limit"], p["numberPhases"]) if "numberPhases" in p
                   else (p["startPeriod"], p["limit"]))
    return out


CASES = [
    # (name, profiles, connector, window start offset, duration, unit, transaction start offset,
    #  expected startSchedule offset, expected duration, expected periods)
    ("stacking: a higher stack level wins while its schedule lasts, then the lower one applies",
     [profile(0, "TxDefaultProfile", 0, [(0, 16)]),
      profile(0, "TxDefaultProfile", 1, [(0, 10)], start=2 * HOUR, duration=HOUR)],
     1, 0, 6 * HOUR, "A", None, 0, 6 * HOUR, [(0, 16.0), (7200, 10.0), (10800, 16.0)]),
    ("recurring daily across midnight",
     [profile(0, "TxDefaultProfile", 0, [(0, 32), (8 * HOUR, 16), (22 * HOUR, 8)], kind="Recurring",
              recurrency="Daily")],
     1, 20 * HOUR, 8 * HOUR, "A", None, 20 * HOUR, 8 * HOUR, [(0, 16.0), (7200, 8.0), (14400, 32.0)]),
    ("recurring weekly across a week boundary",
     [profile(0, "TxDefaultProfile", 0, [(0, 10), (6 * DAY + 12 * HOUR, 20)], kind="Recurring",
              recurrency="Weekly")],
     1, 6 * DAY + 20 * HOUR, 6 * HOUR, "A", None, 6 * DAY + 20 * HOUR, 6 * HOUR, [(0, 20.0), (14400, 10.0)]),
    ("relative TxProfile counts from the transaction start and overrides the TxDefaultProfile",
     [profile(0, "TxDefaultProfile", 0, [(0, 16)]),
      profile(1, "TxProfile", 0, [(0, 10), (1800, 20)], kind="Relative", duration=HOUR)],
     1, 0, 3 * HOUR, "A", HOUR, 0, 3 * HOUR, [(0, 16.0), (3600, 10.0), (5400, 20.0), (7200, 16.0)]),
    ("A and W mixed: a W cap converted to A with 3 phases at 230 V",
     [profile(0, "ChargePointMaxProfile", 0, [(0, 11040)], unit="W"),
      profile(0, "TxDefaultProfile", 0, [(0, 20), (HOUR, 12)])],
     1, 0, 2 * HOUR, "A", None, 0, 2 * HOUR, [(0, 16.0), (3600, 12.0)]),
    ("A and W mixed: a 1-phase A profile under a W cap, in W",
     [profile(0, "ChargePointMaxProfile", 0, [(0, 11040)], unit="W"),
      profile(1, "TxDefaultProfile", 0, [(0, 32, 1)])],
     1, 0, HOUR, "W", None, 0, HOUR, [(0, 7360.0, 1)]),
    ("validity ending mid-window hands over to the lower stack level",
     [profile(0, "TxDefaultProfile", 0, [(0, 16)]),
      profile(0, "TxDefaultProfile", 1, [(0, 10)], valid_to=HOUR)],
     1, 0, 2 * HOUR, "A", None, 0, 2 * HOUR, [(0, 10.0), (3600, 16.0)]),
    ("validity starting mid-window",
     [profile(0, "TxDefaultProfile", 0, [(0, 16)]),
      profile(0, "TxDefaultProfile", 1, [(0, 10)], valid_from=HOUR)],
     1, 0, 2 * HOUR, "A", None, 0, 2 * HOUR, [(0, 16.0), (3600, 10.0)]),
    ("a connector's own TxDefaultProfile overrides connector 0's, whatever the stack levels",
     [profile(0, "TxDefaultProfile", 5, [(0, 16)]), profile(1, "TxDefaultProfile", 0, [(0, 10)])],
     1, 0, HOUR, "A", None, 0, HOUR, [(0, 10.0)]),
    ("connector 0's TxDefaultProfile applies to a connector without its own",
     [profile(0, "TxDefaultProfile", 5, [(0, 16)]), profile(1, "TxDefaultProfile", 0, [(0, 10)])],
     2, 0, HOUR, "A", None, 0, HOUR, [(0, 16.0)]),
    ("the ChargePointMaxProfile caps the TxProfile",
     [profile(0, "ChargePointMaxProfile", 0, [(0, 12), (HOUR, 40)]),
      profile(1, "TxProfile", 0, [(0, 20)], kind="Relative")],
     1, 0, 2 * HOUR, "A", 0, 0, 2 * HOUR, [(0, 12.0), (3600, 20.0)]),
    ("leading unlimited time is trimmed: the schedule starts at the first limit",
     [profile(0, "TxDefaultProfile", 0, [(0, 8)], start=HOUR, duration=HOUR)],
     1, 0, 3 * HOUR, "A", None, HOUR, HOUR, [(0, 8.0)]),
    ("connector 0 reports the station-wide cap only",
     [profile(0, "ChargePointMaxProfile", 0, [(0, 63)]), profile(0, "TxDefaultProfile", 0, [(0, 16)])],
     0, 0, HOUR, "A", None, 0, HOUR, [(0, 63.0)]),
    ("equal adjacent limits from different profiles merge into one period",
     [profile(0, "TxDefaultProfile", 0, [(0, 16)]),
      profile(0, "TxDefaultProfile", 1, [(0, 16), (600, 10)], start=HOUR, duration=1200)],
     1, 0, 2 * HOUR, "A", None, 0, 2 * HOUR, [(0, 16.0), (4200, 10.0), (4800, 16.0)]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_composite_hand_worked(case):
    _, profiles, connector, start, duration, unit, tx_start, exp_start, exp_duration, exp_periods = case
    result = compute(profiles, connector, T0 + timedelta(seconds=start), duration, unit,
                     transaction_start=None if tx_start is None else T0 + timedelta(seconds=tx_start))
    schedule = result.to_charging_schedule()
    assert schedule["startSchedule"] == at(exp_start).replace("Z", ".000Z")
    assert schedule["duration"] == exp_duration
    assert schedule["chargingRateUnit"] == unit
    assert periods(schedule) == exp_periods


def test_nothing_limits_the_window():
    result = compute([profile(0, "TxDefaultProfile", 0, [(0, 16)], valid_to=0)], 1, T0, HOUR)
    assert result.to_charging_schedule() is None
    assert [(s.start, s.end, s.limit) for s in result.segments] == [(int(T0.timestamp()), int(T0.timestamp()) + HOUR,
                                                                      None)]


def test_gap_in_the_middle_is_reported_without_a_limit():
    result = compute([profile(0, "TxDefaultProfile", 0, [(0, 16)], duration=HOUR),
                      profile(0, "TxDefaultProfile", 1, [(0, 10)], start=2 * HOUR)], 1, T0, 3 * HOUR)
    assert periods(result.to_charging_schedule()) == [(0, 16.0), (3600, None), (7200, 10.0)]


def test_recurring_profile_before_its_start_sets_no_limit():
    result = compute([profile(0, "TxDefaultProfile", 0, [(0, 16)], kind="Recurring", recurrency="Daily",
                              start=2 * HOUR)], 1, T0, 4 * HOUR)
    schedule = result.to_charging_schedule()
    assert (schedule["startSchedule"], schedule["duration"], periods(schedule)) == \
        (at(2 * HOUR).replace("Z", ".000Z"), 2 * HOUR, [(0, 16.0)])


def test_convert_both_ways():
    assert convert(16, "A", "W", 3, 230) == 11040.0
    assert convert(6000, "W", "A", 1, 230) == pytest.approx(26.0869565)
    assert convert(10, "A", "A", 1, 230) == 10.0
    with pytest.raises(ValueError):
        convert(1, "A", "kW", 3, 230)


def test_compare_reports_only_the_differing_stretch():
    expected = compute([profile(0, "TxDefaultProfile", 0, [(0, 16), (HOUR, 10)])], 1, T0, 2 * HOUR)
    station = {"startSchedule": at(0), "duration": 2 * HOUR, "chargingRateUnit": "A",
               "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 16.0}, {"startPeriod": 1800, "limit": 8.0}]}
    assert compare(station, expected) == [
        {"from": "2024-01-01T00:30:00.000Z", "to": "2024-01-01T01:00:00.000Z", "station_limit": 8.0,
         "csms_limit": 16.0},
        {"from": "2024-01-01T01:00:00.000Z", "to": "2024-01-01T02:00:00.000Z", "station_limit": 8.0,
         "csms_limit": 10.0},
    ]
    same = {"startSchedule": at(0), "duration": 2 * HOUR, "chargingRateUnit": "W",
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 11040.0}, {"startPeriod": HOUR, "limit": 6900.0}]}
    assert compare(same, expected) == []


# -- properties -----------------------------------------------------------------------------------

def _periods_strategy(max_limit):
    """Periods starting at 0 with strictly ascending startPeriod, random limits and phases."""
    limit_phases = st.tuples(st.integers(0, max_limit), st.sampled_from([1, 2, 3]))
    return st.tuples(limit_phases, st.lists(st.tuples(st.integers(1, 7200), limit_phases), max_size=4)).map(
        lambda drawn: _ascending(*drawn))


def _ascending(first, more):
    out = [(0,) + first]
    offset = 0
    for step, (limit, phases) in more:
        offset += step
        out.append((offset, limit, phases))
    return out


@st.composite
def profile_sets(draw):
    def one(connector, purpose, stack):
        kind = draw(st.sampled_from(["Absolute", "Relative", "Recurring"]))
        unit = draw(st.sampled_from(["A", "W"]))
        max_limit = 64 if unit == "A" else 44000
        return profile(connector, purpose, stack, draw(_periods_strategy(max_limit)), kind=kind,
                       start=draw(st.integers(-DAY, DAY)) if kind != "Relative" else None,
                       duration=draw(st.one_of(st.none(), st.integers(1, 2 * DAY))), unit=unit,
                       recurrency=draw(st.sampled_from(["Daily", "Weekly"])) if kind == "Recurring" else None,
                       valid_to=draw(st.one_of(st.none(), st.integers(0, 2 * DAY))))
    unit = draw(st.sampled_from(["A", "W"]))
    # One cap that is in force over every window, so that the property is tested on each example.
    lasting_cap = profile(0, "ChargePointMaxProfile", 0,
                          draw(_periods_strategy(64 if unit == "A" else 44000)), start=-DAY, unit=unit)
    caps = [lasting_cap] + [one(0, "ChargePointMaxProfile", s) for s in range(1, draw(st.integers(1, 2)))]
    others = [one(draw(st.sampled_from([0, 1])), "TxDefaultProfile", s) for s in range(draw(st.integers(0, 3)))]
    others += [one(1, "TxProfile", s) for s in range(draw(st.integers(0, 2)))]
    return caps, others


@settings(max_examples=150, deadline=None)
@given(profile_sets(), st.integers(0, DAY), st.integers(60, 2 * DAY), st.sampled_from(["A", "W"]))
def test_composite_never_exceeds_the_charge_point_max_profile(sets, start, duration, unit):
    caps, others = sets
    window = T0 + timedelta(seconds=start)
    full = compute(caps + others, 1, window, duration, unit, transaction_start=T0)
    begin = int(window.timestamp())
    timelines = [composite.ProfileTimeline(c["profile"], 0, int(T0.timestamp())) for c in caps]
    points = {s.start for s in full.segments}
    for timeline in timelines:
        points |= timeline.breakpoints(begin, begin + duration)
    checked = 0
    for t in sorted(points):
        # The cap in force: the highest stack level whose schedule defines a limit at t (§3.13.2).
        in_force = [tl.limit_at(t, unit, 230.0) for tl in sorted(timelines, key=lambda tl: -tl.stack_level)]
        cap_limit = next((limit.value for limit in in_force if limit is not None), None)
        if cap_limit is not None:
            limit = full.limit_at(t)
            assert limit is not None and limit <= cap_limit + 1e-9
            checked += 1
    assert checked >= 1  # the lasting cap is always in force somewhere in the window


@settings(max_examples=150, deadline=None)
@given(profile_sets(), st.integers(0, DAY), st.integers(60, 2 * DAY), st.sampled_from(["A", "W"]))
def test_composite_is_piecewise_constant_with_ascending_periods(sets, start, duration, unit):
    caps, others = sets
    window = T0 + timedelta(seconds=start)
    result = compute(caps + others, 1, window, duration, unit, transaction_start=T0)
    # The segments tile the window exactly, and adjacent ones differ.
    assert result.segments[0].start == result.start
    assert result.segments[-1].end == result.start + duration
    for before, after in zip(result.segments, result.segments[1:]):
        assert before.end == after.start
        assert before.start < before.end
        assert (before.limit, before.phases) != (after.limit, after.phases)
    schedule = result.to_charging_schedule()
    if schedule is None:  # every profile's validity or duration ended before the window
        assert all(segment.limit is None for segment in result.segments)
        return
    starts = [p["startPeriod"] for p in schedule["chargingSchedulePeriod"]]
    assert starts[0] == 0
    assert all(a < b for a, b in zip(starts, starts[1:]))
    assert starts[-1] < schedule["duration"]
    assert all(p["limit"] is None or p["limit"] >= 0 for p in schedule["chargingSchedulePeriod"])


def test_engine_refuses_a_bad_unit_or_duration():
    with pytest.raises(ValueError):
        compute([], 1, T0, HOUR, "kW")
    with pytest.raises(ValueError):
        compute([], 1, T0, 0)
    assert composite.DEFAULT_VOLTAGE == 230.0
