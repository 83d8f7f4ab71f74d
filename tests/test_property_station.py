"""Property: nothing a station sends breaks the RPC layer (issue 12), checked with hypothesis against a live
Central System over a loopback socket, on every database.

Each example is a short burst of frames on one connection: CALLs of every inbound action whose payloads
sit on their schema's edges (longest strings, every enum value, huge and negative integers, extreme
dates, NUL, lone surrogates), CALLs with arbitrary JSON payloads or action names, arbitrary JSON values,
arbitrary text, deep nesting, and answers to calls nobody made. After each burst:

* every CALL got exactly one CALLRESULT or CALLERROR carrying its unique id, none of them InternalError;
* everything else received is a well-formed CALLERROR, and the station's queue still moves (a Heartbeat
  sent last is answered);
* the connection is still up, and a canary station on the same server is answered (a database write too);
* nothing was logged as an error or a failure.

pytest-twisted runs each hypothesis example of the coroutine on the reactor. One Central System (and
one pair of connections, re-opened only if one closes) serves every example of a run: that is the
point, so the function-scoped fixture health check is silenced. Examples are derandomized and bounded
so CI is reproducible and quick; they are not shrunk either (a burst of ten calls takes a while to run,
and shrinking one runs it hundreds of times): set CSMS_PROPERTY_SHRINK=1 to shrink a failure locally.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from itertools import count

import pytest
import pytest_twisted
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from twisted.logger import capturedLogs

from csms.ocpp16 import INBOUND
from ocpp_inputs import schema_of
from test_rpc import bad_log_events

WAIT = 5
MAX_FRAMES = 4
#: The CALLERROR codes OCPP-J 1.6 §4.2.3 names, less InternalError: a station's input must never make
#: the Central System fail.
ALLOWED_ERROR_CODES = {"NotImplemented", "NotSupported", "ProtocolError", "SecurityError", "FormationViolation",
                       "PropertyConstraintViolation", "OccurenceConstraintViolation", "TypeConstraintViolation",
                       "GenericError"}

# -- values from a schema's edges ---------------------------------------------------------------------

INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
EDGE_INTEGERS = [0, 1, -1, 2 ** 31 - 1, 2 ** 31, -2 ** 31 - 1, 2 ** 53 + 1, INT64_MAX, INT64_MIN]
BEYOND_64_BITS = [INT64_MAX + 1, INT64_MIN - 1, 2 ** 64 - 1, 2 ** 64, 10 ** 30, -10 ** 30]
EDGE_DATES = ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z", "0001-01-01T00:59:59+01:00",
              "9999-12-31T23:00:00-00:59", "2024-02-29T23:59:59.123456789+23:59", "2024-05-01t10:00:00z",
              "2024-05-01T10:00:00", "1970-01-01T00:00:00Z", "2038-01-19T03:14:08Z"]
BAD_DATES = ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2024-13-01T00:00:00Z",
             "2024-05-01T24:00:00Z", "2024-05-01"]
UNSTORABLE = ["\x00", "a\x00b", "\ud800", "\udfff", "x\udbff"]


def now_and_then(usual, rare, one_in: int = 8):
    """``usual``, and ``rare`` about once in ``one_in`` draws (one_of would draw each half the time, and a
    payload of nine strings would then nearly always hold one the CSMS refuses before its handler)."""
    return st.integers(1, one_in).flatmap(lambda n: rare if n == 1 else usual)


def dates():
    offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda minutes: timezone(timedelta(minutes=minutes)))
    generated = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59),
                             timezones=offsets).map(lambda value: value.isoformat())
    return now_and_then(st.sampled_from(EDGE_DATES) | generated, st.sampled_from(BAD_DATES))


def strings(max_length: int | None):
    longest = max_length or 300
    storable = st.one_of(
        st.text(max_size=longest),
        st.sampled_from(["x" * longest, "\U0001F50C" * longest, "é" * longest]),  # the longest allowed
    )
    unstorable = st.text(max_size=max(longest - 3, 0)).flatmap(
        lambda text: st.sampled_from(UNSTORABLE).map(lambda bad: (text + bad)[:longest]))
    return now_and_then(storable, unstorable, one_in=12)


def integers():
    storable = st.sampled_from(EDGE_INTEGERS) | st.integers(INT64_MIN, INT64_MAX)
    return now_and_then(storable, st.sampled_from(BEYOND_64_BITS) | st.integers())


def numbers():
    return st.floats(allow_nan=True, allow_infinity=True) | integers()


def from_schema(schema: dict):
    """Values valid against ``schema`` (an OCPP 1.6 request schema) as far as its shape goes, drawn from
    its edges; now and then a string holds what no database stores or an enum a value it lacks, and
    integers may leave the 64-bit range."""
    kind = schema.get("type")
    if "enum" in schema:
        return now_and_then(st.sampled_from(schema["enum"]), strings(None), one_in=12)
    if kind == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries({name: from_schema(sub) for name, sub in properties.items() if name in required},
                                     optional={name: from_schema(sub) for name, sub in properties.items()
                                               if name not in required})
    if kind == "array":
        return st.lists(from_schema(schema["items"]), min_size=schema.get("minItems", 0), max_size=2)
    if kind == "string":
        return dates() if schema.get("format") == "date-time" else strings(schema.get("maxLength"))
    if kind == "integer":
        return integers()
    if kind == "number":
        return numbers()
    if kind == "boolean":
        return st.booleans()
    raise AssertionError(f"no strategy for {schema}")


INBOUND_PAYLOADS = {action: from_schema(schema_of(action)) for action in INBOUND}

# -- frames -------------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | integers() | numbers() | strings(40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(strings(12), children, max_size=4),
    max_leaves=12,
)


class Frame:
    """One frame to send: ``unique_id`` is set for a CALL, which must be answered with that id."""

    def __init__(self, text: str, unique_id: str | None = None):
        self.text = text
        self.unique_id = unique_id

    def __repr__(self):
        return f"Frame({self.text[:300]!r}, {self.unique_id!r})"


def text_of(message) -> str:
    # ensure_ascii: NUL and lone surrogates go out escaped, as a station would have to write them.
    return json.dumps(message)


def call_frames(calls):
    """CALL frames from a strategy of (action, payload) pairs, each with its own unique id (an odd one now
    and then)."""
    odd_suffixes = st.lists(now_and_then(st.just(""), strings(30), one_in=4), min_size=len(INBOUND),
                            max_size=len(INBOUND))
    return st.tuples(calls, odd_suffixes).map(
        lambda drawn: [Frame(text_of([2, unique_id, action, payload]), unique_id)
                       for index, ((action, payload), suffix) in enumerate(zip(drawn[0], drawn[1]))
                       for unique_id in [f"k{index}-{suffix}"[:36]]])


def other_frames():
    """Anything but a well-framed CALL: what the CSMS must answer at once (or ignore), never choke on."""
    unknown_id = strings(36).filter(bool)
    return st.one_of(
        JSON_VALUES.map(text_of),
        st.lists(JSON_VALUES, min_size=3, max_size=5).map(lambda items: text_of([2] + items[1:])),
        st.text(max_size=200),
        st.integers(2, 30000).map(lambda depth: "[" * depth + "]" * depth),
        st.integers(900, 30000).map(lambda depth: '[2, "deep", "DataTransfer", {"vendorId": "x", "data": '
                                    + "[" * depth + "]" * depth + "}]"),
        st.tuples(unknown_id, JSON_VALUES).map(lambda item: text_of([3, item[0], item[1]])),
        st.tuples(unknown_id, strings(20), strings(40)).map(lambda item: text_of([4, item[0], item[1], item[2], {}])),
    ).map(Frame)


def mixed_bursts():
    """Calls of any action (or none) with arbitrary payloads, among frames that are no CALL at all."""
    arbitrary_calls = call_frames(st.lists(st.tuples(st.sampled_from(sorted(INBOUND)) | strings(20),
                                                     JSON_VALUES | st.dictionaries(strings(20), JSON_VALUES)),
                                           max_size=MAX_FRAMES))
    return st.tuples(arbitrary_calls, st.lists(other_frames(), max_size=MAX_FRAMES), st.randoms()).map(
        lambda parts: parts[2].sample(parts[0] + parts[1], len(parts[0]) + len(parts[1])))


# -- the live rig -------------------------------------------------------------------------------------


class Rig:
    """A station under test and a canary, connected to one running Central System."""

    def __init__(self, csms):
        self.csms = csms
        self.station = None
        self.canary = None
        self.sentinels = count()

    async def connected(self):
        if self.canary is None:
            self.canary = await self.csms.connect_booted("CP-CANARY")
        if self.station is None or self.station.closed.called:
            self.station = await self.csms.connect("CP-PROPERTY")

    async def check(self, frames: list[Frame]) -> None:
        await self.connected()
        station = self.station
        for frame in frames:
            station.send_raw(frame.text)
        # Sent last, answered last: calls are answered in order, anything else at once.
        sentinel = f"sentinel-{next(self.sentinels)}"
        station.send_raw(text_of([2, sentinel, "Heartbeat", {}]))
        received = []
        while True:
            answer = await station.next_unmatched(timeout=WAIT)
            if answer[1] == sentinel:
                assert answer[0] == 3, answer
                break
            received.append(answer)

        from hypothesis import event
        for frame in frames:
            if frame.unique_id:
                action = json.loads(frame.text)[2]
                ans = [a for a in received if a[1] == frame.unique_id]
                event(f"{action if isinstance(action, str) and action in INBOUND else 'other'} -> {ans[0][0] if ans else None} {ans[0][2] if ans and ans[0][0] == 4 else ''}")
            else:
                event("other frame")
        calls = [frame.unique_id for frame in frames if frame.unique_id is not None]
        for unique_id in calls:
            answers = [answer for answer in received if answer[1] == unique_id]
            assert len(answers) == 1, (unique_id, received)
            assert answers[0][0] in (3, 4), answers[0]
        assert len(received) <= len(frames), received
        for answer in received:
            assert answer[0] in (3, 4) and isinstance(answer[1], str), answer
            if answer[0] == 4:
                assert len(answer) == 5 and answer[2] in ALLOWED_ERROR_CODES, answer
                assert isinstance(answer[3], str) and isinstance(answer[4], dict), answer
        assert not station.closed.called, station.closed.result
        assert await self.canary.call("Heartbeat", {}, timeout=WAIT)
        assert await self.canary.status(1, "Available") == {}


@pytest.fixture(autouse=True)
def unwrapped_after_each_run(request):
    """pytest-twisted (1.14.3) wraps a hypothesis test's inner function on the function object itself, so
    the run for the second database would wrap it twice and block on the reactor from inside it: undo the
    wrapping after each run."""
    handle = request.function.hypothesis
    inner_test = handle.inner_test
    yield
    handle.inner_test = inner_test


@pytest.fixture
def rig(csms):
    with capturedLogs() as events:
        rig = Rig(csms)
        rig.events = events
        yield rig


BOUNDED = settings(derandomize=True, database=None, deadline=None,
                   phases=tuple(Phase) if os.environ.get("CSMS_PROPERTY_SHRINK") else
                   (Phase.explicit, Phase.reuse, Phase.generate),
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                          HealthCheck.data_too_large, HealthCheck.filter_too_much])


async def check_burst(rig, frames) -> None:
    first = len(rig.events)
    await rig.check(frames)
    assert bad_log_events(rig.events[first:]) == []


@settings(BOUNDED, max_examples=60)
@given(frames=st.permutations(sorted(INBOUND)).flatmap(
    lambda actions: call_frames(st.tuples(*(INBOUND_PAYLOADS[action].map(lambda payload, action=action: (action, payload))
                                             for action in actions)))))
@pytest_twisted.ensureDeferred
async def test_every_inbound_action_with_values_from_its_schemas_edges_is_answered(rig, frames):
    await check_burst(rig, frames)


@settings(BOUNDED, max_examples=80)
@given(frames=mixed_bursts())
@pytest_twisted.ensureDeferred
async def test_arbitrary_frames_and_payloads_are_answered(rig, frames):
    await check_burst(rig, frames)
