"""OCPP-J 1.6 RPC (OCPP-J 1.6 §4) on a fake transport: no sockets, no reactor time, a Clock for timeouts.

Every test builds a :class:`csms.rpc.OCPPSession` whose ``send`` appends the frames it would put on the
wire to a list, so each assertion is about the exact frames the station would see.
"""
from __future__ import annotations

import json

import pytest
from twisted.internet import defer, task
from twisted.logger import LogLevel, capturedLogs

from csms import rpc
from csms.rpc import (CallError, CallErrorReceived, CallTimeout, OCPPSession, RequestInvalid, ResponseInvalid,
                      StationOffline)
from ocpp_inputs import BASELINE, case_id, cases, with_value

RESPONSE_TIMEOUT = 30.0
HANDLER_TIMEOUT = 60.0
HEARTBEAT_ANSWER = {"currentTime": "2024-01-01T00:00:00.000Z"}


class FakeTransport:
    """What the session sent, decoded, plus what it dispatched to the application."""

    def __init__(self, dispatch=None):
        self.sent: list = []
        self.dispatched: list = []
        self.clock = task.Clock()
        self._dispatch = dispatch or (lambda session, action, payload: HEARTBEAT_ANSWER)
        self.session = OCPPSession("CP-1", self.dispatch, self.send, self.clock, RESPONSE_TIMEOUT,
                                   handler_timeout=HANDLER_TIMEOUT)

    def dispatch(self, session, action, payload):
        assert session is self.session
        self.dispatched.append((action, payload))
        return self._dispatch(session, action, payload)

    def send(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.sent.append(json.loads(data.decode("utf-8")))

    def receive(self, message) -> None:
        self.session.text_received(message if isinstance(message, str) else json.dumps(message))

    def take_sent(self) -> list:
        sent, self.sent = self.sent, []
        return sent


def failure_of(d: defer.Deferred):
    """The Failure a Deferred already failed with (the test fails if it has not)."""
    failures = []
    d.addErrback(failures.append)
    assert len(failures) == 1, f"expected {d!r} to have failed"
    return failures[0]


def result_of(d: defer.Deferred):
    results = []
    d.addBoth(results.append)
    assert len(results) == 1, f"expected {d!r} to have fired"
    assert not isinstance(results[0], Exception) and not hasattr(results[0], "raiseException"), results[0]
    return results[0]


def assert_pending(d: defer.Deferred) -> None:
    assert not d.called, f"{d!r} fired too early"


# -- inbound CALLs ---------------------------------------------------------------------------------


def test_call_is_answered_with_callresult_carrying_the_handler_payload():
    transport = FakeTransport()
    transport.receive([2, "abc-1", "Heartbeat", {}])
    assert transport.dispatched == [("Heartbeat", {})]
    assert transport.sent == [[3, "abc-1", HEARTBEAT_ANSWER]]


def test_call_answered_through_a_deferred_is_sent_when_it_fires():
    answer = defer.Deferred()
    transport = FakeTransport(lambda session, action, payload: answer)
    transport.receive([2, "abc-1", "Heartbeat", {}])
    assert transport.sent == []
    answer.callback(HEARTBEAT_ANSWER)
    assert transport.sent == [[3, "abc-1", HEARTBEAT_ANSWER]]


def test_handler_raising_call_error_sends_that_callerror():
    def dispatch(session, action, payload):
        raise CallError("SecurityError", "not for you", {"why": "test"})
    transport = FakeTransport(dispatch)
    transport.receive([2, "abc-1", "Heartbeat", {}])
    assert transport.sent == [[4, "abc-1", "SecurityError", "not for you", {"why": "test"}]]


def test_handler_failing_its_deferred_with_call_error_sends_that_callerror():
    transport = FakeTransport(lambda session, action, payload: defer.fail(CallError("NotSupported", "no")))
    transport.receive([2, "abc-1", "Heartbeat", {}])
    assert transport.sent == [[4, "abc-1", "NotSupported", "no", {}]]


def test_handler_raising_any_other_exception_sends_internal_error():
    def dispatch(session, action, payload):
        raise KeyError("bug")
    transport = FakeTransport(dispatch)
    transport.receive([2, "abc-1", "Heartbeat", {}])
    [frame] = transport.sent
    assert frame[:3] == [4, "abc-1", "InternalError"]
    assert "bug" not in frame[3]  # internals are logged, not told to the station
    assert frame[4] == {}


@pytest.mark.parametrize("answer", [
    {"currentTime": "not a date"},
    {},
    {"currentTime": "2024-01-01T00:00:00Z", "extra": 1},
    None,
    ["not", "a", "dict"],
], ids=["bad-format", "missing-field", "extra-field", "none", "list"])
def test_handler_returning_an_invalid_response_sends_internal_error(answer):
    transport = FakeTransport(lambda session, action, payload: answer)
    transport.receive([2, "abc-1", "Heartbeat", {}])
    [frame] = transport.sent
    assert frame[:3] == [4, "abc-1", "InternalError"]
    assert frame[4] == {}


def test_call_for_an_action_without_an_ocpp_schema_is_answered():
    # A vendor action handled through csms_handle_call has no OCPP schema to check the answer against.
    transport = FakeTransport(lambda session, action, payload: {"acme": payload["n"] + 1})
    transport.receive([2, "abc-1", "AcmeIncrement", {"n": 41}])
    assert transport.sent == [[3, "abc-1", {"acme": 42}]]


def test_invalid_request_is_not_dispatched():
    transport = FakeTransport()
    transport.receive([2, "abc-1", "StatusNotification", {"connectorId": "one", "status": "Available",
                                                            "errorCode": "NoError"}])
    assert transport.dispatched == []
    [frame] = transport.sent
    assert frame[:3] == [4, "abc-1", "TypeConstraintViolation"]


def test_inbound_calls_are_handled_one_at_a_time_in_arrival_order():
    answers: list[defer.Deferred] = []

    def dispatch(session, action, payload):
        d = defer.Deferred()
        answers.append(d)
        return d
    transport = FakeTransport(dispatch)
    transport.receive([2, "first", "Heartbeat", {}])
    transport.receive([2, "second", "Authorize", {"idTag": "TAG"}])
    transport.receive([2, "third", "Heartbeat", {}])
    # Only the first is being handled; the others wait for it.
    assert transport.dispatched == [("Heartbeat", {})]
    assert transport.sent == []

    answers[0].callback(HEARTBEAT_ANSWER)
    assert transport.sent == [[3, "first", HEARTBEAT_ANSWER]]
    assert transport.dispatched == [("Heartbeat", {}), ("Authorize", {"idTag": "TAG"})]

    answers[1].errback(CallError("GenericError", "nope"))
    assert transport.sent[1] == [4, "second", "GenericError", "nope", {}]
    assert len(transport.dispatched) == 3

    answers[2].callback(HEARTBEAT_ANSWER)
    assert [frame[1] for frame in transport.sent] == ["first", "second", "third"]


def test_synchronous_answers_queued_behind_a_pending_call_keep_their_order():
    """A plain-dict answer is sent at once only when nothing is pending; queued behind a Deferred
    answer it waits, and the calls after it that are answered synchronously follow in order."""
    slow = defer.Deferred()

    def dispatch(session, action, payload):
        return slow if payload.get("idTag") == "SLOW" else HEARTBEAT_ANSWER
    transport = FakeTransport(dispatch)
    transport.receive([2, "a", "Heartbeat", {}])
    assert [frame[1] for frame in transport.take_sent()] == ["a"]  # answered in the same turn
    transport.receive([2, "b", "Authorize", {"idTag": "SLOW"}])
    transport.receive([2, "c", "Heartbeat", {}])
    transport.receive([2, "d", "Heartbeat", {}])
    assert transport.sent == []
    assert len(transport.dispatched) == 2
    slow.callback({"idTagInfo": {"status": "Accepted"}})
    assert [frame[1] for frame in transport.sent] == ["b", "c", "d"]
    transport.receive([2, "e", "Heartbeat", {}])
    assert [frame[1] for frame in transport.sent] == ["b", "c", "d", "e"]


def test_an_already_fired_deferred_is_answered_in_the_same_turn_and_does_not_block_the_next():
    transport = FakeTransport(lambda session, action, payload: defer.succeed(HEARTBEAT_ANSWER))
    transport.receive([2, "a", "Heartbeat", {}])
    transport.receive([2, "b", "Heartbeat", {}])
    assert transport.sent == [[3, "a", HEARTBEAT_ANSWER], [3, "b", HEARTBEAT_ANSWER]]


def test_coroutine_handler_is_awaited_and_answered():
    gate = defer.Deferred()

    async def handler():
        await gate
        return HEARTBEAT_ANSWER
    transport = FakeTransport(lambda session, action, payload: handler())
    transport.receive([2, "a", "Heartbeat", {}])
    transport.receive([2, "b", "Heartbeat", {}])
    assert transport.sent == []
    gate.callback(None)
    assert [frame[1] for frame in transport.sent] == ["a", "b"]


def test_answer_with_an_integer_wider_than_64_bits_is_encoded():
    transport = FakeTransport(lambda session, action, payload: {"vendor": 2 ** 70})
    transport.receive([2, "v", "VendorThing", {}])
    assert transport.sent == [[3, "v", {"vendor": 2 ** 70}]]


def test_non_ascii_text_survives_the_round_trip():
    transport = FakeTransport(lambda session, action, payload: {"vendor": payload["text"]})
    transport.receive([2, "u", "VendorThing", {"text": "Größe – 電気"}])
    assert transport.sent == [[3, "u", {"vendor": "Größe – 電気"}]]


def test_bad_frame_arriving_while_a_call_is_handled_is_answered_at_once():
    pending = defer.Deferred()
    transport = FakeTransport(lambda session, action, payload: pending)
    transport.receive([2, "slow", "Heartbeat", {}])
    transport.receive("{not json")
    assert transport.take_sent() == [[4, "-1", "FormationViolation", "Message is not valid JSON", {}]]
    pending.callback(HEARTBEAT_ANSWER)
    assert transport.sent == [[3, "slow", HEARTBEAT_ANSWER]]


def test_answer_is_not_sent_after_the_connection_is_lost():
    pending = defer.Deferred()
    transport = FakeTransport(lambda session, action, payload: pending)
    transport.receive([2, "slow", "Heartbeat", {}])
    transport.session.connection_lost()
    pending.callback(HEARTBEAT_ANSWER)
    assert transport.sent == []


@pytest.mark.parametrize("message, expected_id, code", [
    ("not json", "-1", "FormationViolation"),
    ('{"a": 1}', "-1", "FormationViolation"),
    ("[2]", "-1", "FormationViolation"),
    ('[2, "x"]', "x", "FormationViolation"),
    ('[7, "x", "Heartbeat", {}]', "x", "ProtocolError"),
    ('[true, "x", "Heartbeat", {}]', "x", "ProtocolError"),
    ('[2, 17, "Heartbeat", {}]', "-1", "FormationViolation"),
    ('[2, "", "Heartbeat", {}]', "-1", "FormationViolation"),
    ('[2, "' + "x" * 37 + '", "Heartbeat", {}]', "x" * 37, "FormationViolation"),
    ('[2, "x", 5, {}]', "x", "FormationViolation"),
    ('[2, "x", "Heartbeat", []]', "x", "FormationViolation"),
    ('[2, "x", "Heartbeat"]', "x", "FormationViolation"),
    ('[2, "x", "Heartbeat", {}, {}]', "x", "FormationViolation"),
], ids=["not-json", "object", "too-short", "no-action", "type-7", "type-bool", "id-int", "id-empty",
        "id-too-long", "action-int", "payload-list", "call-3-items", "call-5-items"])
def test_malformed_frame_gets_the_named_callerror_and_is_not_dispatched(message, expected_id, code):
    transport = FakeTransport()
    transport.receive(message)
    assert transport.dispatched == []
    [frame] = transport.sent
    assert frame[0] == 4
    assert frame[1] == expected_id
    assert frame[2] == code
    assert isinstance(frame[3], str) and frame[3]
    assert frame[4] == {}
    # The session still works.
    transport.receive([2, "after", "Heartbeat", {}])
    assert transport.sent[-1] == [3, "after", HEARTBEAT_ANSWER]


# -- outbound CALLs --------------------------------------------------------------------------------


def test_call_sends_a_call_frame_and_fires_with_the_validated_result():
    transport = FakeTransport()
    d = transport.session.call("Reset", {"type": "Soft"})
    [frame] = transport.sent
    assert frame[0] == 2 and frame[2:] == ["Reset", {"type": "Soft"}]
    assert isinstance(frame[1], str) and 0 < len(frame[1]) <= 36
    assert_pending(d)
    transport.receive([3, frame[1], {"status": "Accepted"}])
    assert result_of(d) == {"status": "Accepted"}
    assert transport.session.pending_calls == 0


def test_invalid_request_is_refused_before_anything_is_sent():
    transport = FakeTransport()
    d = transport.session.call("Reset", {"type": "Sideways"})
    failure = failure_of(d)
    assert failure.check(RequestInvalid)
    assert failure.value.action == "Reset"
    assert failure.value.code == "PropertyConstraintViolation"
    assert transport.sent == []
    assert transport.session.pending_calls == 0


def test_only_one_outbound_call_is_in_flight_and_the_rest_go_out_in_order():
    transport = FakeTransport()
    first = transport.session.call("Reset", {"type": "Soft"})
    second = transport.session.call("ClearCache", {})
    third = transport.session.call("Reset", {"type": "Hard"})
    [sent] = transport.take_sent()
    assert sent[2:] == ["Reset", {"type": "Soft"}]
    assert transport.session.pending_calls == 3

    transport.receive([3, sent[1], {"status": "Accepted"}])
    assert result_of(first) == {"status": "Accepted"}
    [sent] = transport.take_sent()
    assert sent[2:] == ["ClearCache", {}]
    assert_pending(third)

    transport.receive([3, sent[1], {"status": "Rejected"}])
    assert result_of(second) == {"status": "Rejected"}
    [sent] = transport.take_sent()
    assert sent[2:] == ["Reset", {"type": "Hard"}]

    transport.receive([3, sent[1], {"status": "Accepted"}])
    assert result_of(third) == {"status": "Accepted"}
    assert transport.take_sent() == []
    assert transport.session.pending_calls == 0


def test_unanswered_call_times_out_and_the_next_queued_call_goes_out():
    transport = FakeTransport()
    first = transport.session.call("Reset", {"type": "Soft"})
    second = transport.session.call("ClearCache", {})
    [sent_first] = transport.take_sent()

    transport.clock.advance(RESPONSE_TIMEOUT - 0.001)
    assert_pending(first)
    assert transport.sent == []

    transport.clock.advance(0.001)
    assert failure_of(first).check(CallTimeout)
    [sent_second] = transport.take_sent()
    assert sent_second[2:] == ["ClearCache", {}]

    # The late answer to the timed-out call is ignored; it does not answer the second one.
    transport.receive([3, sent_first[1], {"status": "Accepted"}])
    assert_pending(second)
    assert transport.sent == []
    transport.receive([3, sent_second[1], {"status": "Accepted"}])
    assert result_of(second) == {"status": "Accepted"}


def test_answered_call_leaves_no_timer_behind():
    transport = FakeTransport()
    d = transport.session.call("ClearCache", {})
    [sent] = transport.take_sent()
    transport.receive([3, sent[1], {"status": "Accepted"}])
    assert result_of(d) == {"status": "Accepted"}
    assert transport.clock.getDelayedCalls() == []


@pytest.mark.parametrize("answer, code", [
    ({"status": "Maybe"}, "PropertyConstraintViolation"),
    ({}, "OccurenceConstraintViolation"),
    ({"status": 1}, "TypeConstraintViolation"),
    ({"status": "Accepted", "extra": True}, "FormationViolation"),
])
def test_callresult_not_matching_the_response_schema_fails_with_response_invalid(answer, code):
    transport = FakeTransport()
    d = transport.session.call("Reset", {"type": "Soft"})
    [sent] = transport.take_sent()
    transport.receive([3, sent[1], answer])
    failure = failure_of(d)
    assert failure.check(ResponseInvalid)
    assert failure.value.action == "Reset"
    assert failure.value.code == code
    assert failure.value.payload == answer
    assert transport.sent == []  # nothing is sent back for a bad CALLRESULT


def test_callresult_whose_payload_is_not_an_object_fails_with_response_invalid():
    transport = FakeTransport()
    d = transport.session.call("Reset", {"type": "Soft"})
    [sent] = transport.take_sent()
    transport.receive([3, sent[1], "Accepted"])
    failure = failure_of(d)
    assert failure.check(ResponseInvalid)
    assert failure.value.code == "FormationViolation"


def test_callerror_received_fails_the_call_with_its_code_and_description():
    transport = FakeTransport()
    d = transport.session.call("Reset", {"type": "Soft"})
    second = transport.session.call("ClearCache", {})
    [sent] = transport.take_sent()
    transport.receive([4, sent[1], "NotSupported", "cannot reset", {"hint": 1}])
    failure = failure_of(d)
    assert failure.check(CallErrorReceived)
    assert (failure.value.code, failure.value.description, failure.value.details) == \
        ("NotSupported", "cannot reset", {"hint": 1})
    # The error ends that call: the next one goes out.
    [sent] = transport.take_sent()
    assert sent[2:] == ["ClearCache", {}]
    assert_pending(second)


def test_connection_lost_fails_in_flight_and_queued_calls_with_station_offline():
    transport = FakeTransport()
    first = transport.session.call("Reset", {"type": "Soft"})
    second = transport.session.call("ClearCache", {})
    transport.take_sent()
    transport.session.connection_lost()
    assert failure_of(first).check(StationOffline)
    assert failure_of(second).check(StationOffline)
    assert transport.sent == []
    assert transport.session.pending_calls == 0
    assert transport.clock.getDelayedCalls() == []


def test_call_after_connection_lost_fails_with_station_offline_and_sends_nothing():
    transport = FakeTransport()
    transport.session.connection_lost()
    assert failure_of(transport.session.call("ClearCache", {})).check(StationOffline)
    assert transport.sent == []


@pytest.mark.parametrize("frame", [
    [3, "nobody-asked", {"status": "Accepted"}],
    [4, "nobody-asked", "GenericError", "", {}],
], ids=["callresult", "callerror"])
def test_answer_for_an_unknown_unique_id_is_ignored(frame):
    transport = FakeTransport()
    transport.receive(frame)
    assert transport.sent == []
    # And it does not disturb a call that is in flight.
    d = transport.session.call("ClearCache", {})
    [sent] = transport.take_sent()
    transport.receive(frame)
    assert_pending(d)
    assert transport.sent == []
    transport.receive([3, sent[1], {"status": "Accepted"}])
    assert result_of(d) == {"status": "Accepted"}


def test_inbound_call_is_answered_while_an_outbound_call_is_in_flight():
    transport = FakeTransport()
    d = transport.session.call("ClearCache", {})
    [sent] = transport.take_sent()
    transport.receive([2, "cp-1", "Heartbeat", {}])
    assert transport.take_sent() == [[3, "cp-1", HEARTBEAT_ANSWER]]
    transport.receive([3, sent[1], {"status": "Accepted"}])
    assert result_of(d) == {"status": "Accepted"}


# -- what a station sends never escapes the RPC layer ---------------------------------------------------

INT64_MAX = 2 ** 63 - 1
INT64_MIN = -2 ** 63
OVERFLOWING_TIMESTAMPS = ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"]


def raw_call(unique_id: str, action: str, payload_json: str) -> str:
    """A CALL frame as text, with the payload written by hand (for what json.dumps cannot write)."""
    return f'[2, "{unique_id}", "{action}", {payload_json}]'


def bad_log_events(events) -> list:
    """Events the CSMS logged as failures or errors (tracebacks, "Unhandled error" ...)."""
    return [event for event in events
            if "log_failure" in event or event.get("log_level") in (LogLevel.error, LogLevel.critical)]


@pytest.mark.parametrize("timestamp", OVERFLOWING_TIMESTAMPS)
@pytest.mark.parametrize("action, path", cases("string", "date-time"), ids=lambda v: ".".join(map(str, v))
                         if isinstance(v, tuple) else v)
def test_timestamp_that_overflows_in_utc_is_a_property_constraint_violation(action, path, timestamp):
    transport = FakeTransport()
    with capturedLogs() as events:
        transport.receive([2, "late", action, with_value(action, path, timestamp)])
    [frame] = transport.sent
    assert frame[:3] == [4, "late", "PropertyConstraintViolation"]
    assert "not a representable date-time" in frame[3]
    assert transport.dispatched == []
    assert bad_log_events(events) == []


def test_overflowing_timestamp_queued_behind_a_pending_call_is_answered_and_the_queue_moves():
    pending = defer.Deferred()
    transport = FakeTransport(lambda session, action, payload: pending if action == "Authorize"
                              else HEARTBEAT_ANSWER)
    transport.receive([2, "slow", "Authorize", {"idTag": "TAG"}])
    transport.receive([2, "bad", "StartTransaction",
                       with_value("StartTransaction", ("timestamp",), OVERFLOWING_TIMESTAMPS[0])])
    transport.receive([2, "next", "Heartbeat", {}])
    assert transport.sent == []
    pending.callback({"idTagInfo": {"status": "Accepted"}})
    assert [frame[:3] for frame in transport.sent] == [
        [3, "slow", {"idTagInfo": {"status": "Accepted"}}], [4, "bad", "PropertyConstraintViolation"],
        [3, "next", HEARTBEAT_ANSWER]]


@pytest.mark.parametrize("error, code", [
    (ValueError("odd value"), "PropertyConstraintViolation"),
    (OverflowError("too far"), "PropertyConstraintViolation"),
    (RecursionError("too deep"), "PropertyConstraintViolation"),
    (KeyError("a bug in a validator"), "InternalError"),
], ids=["value", "overflow", "recursion", "bug"])
def test_exception_raised_while_validating_is_answered_and_the_queue_moves(monkeypatch, error, code):
    """Whatever a validator raises, the call gets a CALLERROR and the calls queued behind it run."""
    import fastjsonschema

    real_compile = fastjsonschema.compile

    def compile_raising_for_authorize(schema, *args, **kwargs):
        validate = real_compile(schema, *args, **kwargs)
        if schema.get("title") != "AuthorizeRequest":
            return validate

        def raising(payload):
            raise error
        return raising
    monkeypatch.setattr(fastjsonschema, "compile", compile_raising_for_authorize)
    monkeypatch.setattr(rpc.schemas, "_compiled", {})
    pending = defer.Deferred()
    transport = FakeTransport(lambda session, action, payload: pending if action == "StatusNotification"
                              else HEARTBEAT_ANSWER)
    with capturedLogs() as events:
        transport.receive([2, "slow", "StatusNotification", BASELINE["StatusNotification"]])
        transport.receive([2, "odd", "Authorize", {"idTag": "TAG"}])
        transport.receive([2, "next", "Heartbeat", {}])
        pending.callback({})
    assert [frame[:3] for frame in transport.sent] == [[3, "slow", {}], [4, "odd", code],
                                                       [3, "next", HEARTBEAT_ANSWER]]
    assert [action for action, _ in transport.dispatched] == ["StatusNotification", "Heartbeat"]
    # A value a validator cannot cope with is the station's problem; anything else is a bug, logged.
    assert len(bad_log_events(events)) == (code == "InternalError")


def test_exception_raised_while_checking_an_answer_is_answered_and_the_queue_moves(monkeypatch):
    pending = defer.Deferred()
    transport = FakeTransport(lambda session, action, payload: pending if action == "Authorize"
                              else HEARTBEAT_ANSWER)

    def broken_validate_response(action, payload):
        raise KeyError("a bug")
    transport.receive([2, "slow", "Authorize", {"idTag": "TAG"}])
    transport.receive([2, "next", "Heartbeat", {}])
    with monkeypatch.context() as patch, capturedLogs() as events:
        patch.setattr(rpc.schemas, "validate_response", broken_validate_response)
        pending.callback({"idTagInfo": {"status": "Accepted"}})
    assert [frame[:3] for frame in transport.sent] == [[4, "slow", "InternalError"], [4, "next", "InternalError"]]
    assert len(bad_log_events(events)) == 2  # a bug: logged, with its traceback
    transport.receive([2, "after", "Heartbeat", {}])
    assert transport.sent[-1] == [3, "after", HEARTBEAT_ANSWER]


@pytest.mark.parametrize("answered_at_once", [True, False], ids=["at-once", "later"])
def test_send_that_raises_does_not_stop_the_queue(answered_at_once):
    pending = defer.Deferred()
    transport = FakeTransport(lambda session, action, payload: pending if action == "Authorize"
                              else HEARTBEAT_ANSWER)
    real_send = transport.session._send
    failing = [True]

    def send_failing_once(data):
        if failing:
            failing.clear()
            raise OSError("transport gone")
        real_send(data)
    transport.session._send = send_failing_once
    with capturedLogs() as events:
        if answered_at_once:
            transport.receive([2, "first", "Heartbeat", {}])
        transport.receive([2, "slow", "Authorize", {"idTag": "TAG"}])
        transport.receive([2, "next", "Heartbeat", {}])
        pending.callback({"idTagInfo": {"status": "Accepted"}})
    expected = [[3, "slow", {"idTagInfo": {"status": "Accepted"}}]] if answered_at_once else []
    assert transport.sent == expected + [[3, "next", HEARTBEAT_ANSWER]]
    assert len(bad_log_events(events)) == 1


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("answer", [lambda: {"thing": object()}, lambda: {"deep": nested(5000)}],
                         ids=["not-json", "too-deep"])
def test_answer_that_cannot_be_written_as_json_is_sent_as_internal_error(answer):
    transport = FakeTransport(lambda session, action, payload: answer())
    with capturedLogs() as events:
        transport.receive([2, "v", "AcmeThing", {}])
    assert [frame[:3] for frame in transport.sent] == [[4, "v", "InternalError"]]
    assert len(bad_log_events(events)) == 1


def test_json_nested_30000_deep_is_a_formation_violation():
    transport = FakeTransport()
    with capturedLogs() as events:
        transport.receive("[" * 30000 + "]" * 30000)
        transport.receive('[2, "deep", "DataTransfer", {"vendorId": "x", "data": ' + "[" * 30000 + "]" * 30000 + "}]")
    assert [frame[:3] for frame in transport.sent] == [[4, "-1", "FormationViolation"]] * 2
    assert bad_log_events(events) == []
    transport.receive([2, "after", "Heartbeat", {}])
    assert transport.sent[-1] == [3, "after", HEARTBEAT_ANSWER]


def test_unique_id_with_a_lone_surrogate_is_answered_with_that_id():
    """The answer escapes the id (pure ASCII JSON), so the station reads back exactly the id it sent."""
    frames: list[bytes] = []
    transport = FakeTransport()
    transport.session._send = frames.append
    transport.receive(raw_call("a\\ud800b", "Heartbeat", "{}"))
    [data] = frames
    assert data.isascii()
    assert json.loads(data) == [3, "a\ud800b", HEARTBEAT_ANSWER]


@pytest.mark.parametrize("action, path", cases("string"), ids=[case_id(*c) for c in cases("string")])
@pytest.mark.parametrize("bad, what", [("\\u0000", "NUL"), ("\\ud800", "surrogate"), ("\\udfff", "surrogate")],
                         ids=["nul", "high-surrogate", "low-surrogate"])
def test_string_the_database_cannot_store_is_a_property_constraint_violation(action, path, bad, what):
    """PostgreSQL refuses NUL in text, and a lone surrogate is no UTF-8 at all: such strings are refused
    at the door, in every field of every inbound action (an enum or date-time field too)."""
    marker = "\u2603"
    payload = json.dumps(with_value(action, path, marker), ensure_ascii=False).replace(marker, f"x{bad}")
    transport = FakeTransport()
    with capturedLogs() as events:
        transport.receive(raw_call("s-1", action, payload))
    [frame] = transport.sent
    assert frame[:3] == [4, "s-1", "PropertyConstraintViolation"]
    assert transport.dispatched == []
    assert bad_log_events(events) == []


@pytest.mark.parametrize("text", [
    raw_call("v", "AcmeThing", '{"note": "a\\u0000b"}'),
    raw_call("v", "AcmeThing", '{"a\\u0000b": 1}'),
    raw_call("v", "AcmeThing", '{"deep": [{"note": "\\ud800"}]}'),
    # orjson reads 10^30 as a float; with a lone surrogate in the id the standard library reads it exact.
    raw_call("v\\ud800", "AcmeThing", '{"n": 123456789012345678901234567890}'),
    raw_call("v", "AcmeThing", '{"n": NaN}'),
    raw_call("v", "AcmeThing", '{"n": -Infinity}'),
    raw_call("v", "AcmeThing", '{"n": 1e400}'),
    raw_call("v", "Acme\\u0000Thing", '{}'),
], ids=["nul", "nul-in-key", "surrogate", "int-beyond-64-bits", "nan", "infinity", "overflowing-float", "action"])
def test_vendor_action_payload_the_database_cannot_store_is_refused(text):
    transport = FakeTransport(lambda session, action, payload: {"ok": True})
    transport.receive(text)
    [frame] = transport.sent
    assert frame[0] == 4 and frame[1] in ("v", "v\ud800"), frame
    assert frame[2] == "PropertyConstraintViolation", frame
    assert transport.dispatched == []


def test_escaped_backslash_before_u0000_is_plain_text_not_nul():
    transport = FakeTransport(lambda session, action, payload: {"idTagInfo": {"status": "Accepted"}})
    transport.receive(raw_call("bs", "Authorize", '{"idTag": "a\\\\u0000"}'))
    assert transport.dispatched == [("Authorize", {"idTag": "a\\u0000"})]
    assert transport.sent[0][0] == 3


INTEGER_CASES = cases("integer")


@pytest.mark.parametrize("value", [INT64_MAX + 1, 2 ** 64 - 1, 2 ** 64, 10 ** 30, INT64_MIN - 1, -10 ** 30],
                         ids=["2^63", "2^64-1", "2^64", "10^30", "-2^63-1", "-10^30"])
@pytest.mark.parametrize("action, path", INTEGER_CASES, ids=[case_id(*c) for c in INTEGER_CASES])
def test_integer_outside_signed_64_bits_is_a_property_constraint_violation(action, path, value):
    transport = FakeTransport()
    transport.receive([2, "big", action, with_value(action, path, value)])
    [frame] = transport.sent
    assert frame[:3] == [4, "big", "PropertyConstraintViolation"], frame
    assert transport.dispatched == []


@pytest.mark.parametrize("action, path", INTEGER_CASES, ids=[case_id(*c) for c in INTEGER_CASES])
def test_integer_wider_than_64_bits_read_by_the_fallback_parser_is_refused(action, path):
    """orjson turns 10^30 into a float and refuses a lone surrogate; with both in one message the
    standard library parses it, and the integer reaches validation exact."""
    marker = 424242
    payload = json.dumps(with_value(action, path, marker)).replace(str(marker), "1" + "0" * 30)
    transport = FakeTransport()
    transport.receive(raw_call("big\\ud800", action, payload))
    [frame] = transport.sent
    assert frame[:3] == [4, "big\ud800", "PropertyConstraintViolation"], frame


@pytest.mark.parametrize("value", [INT64_MAX, INT64_MIN], ids=["2^63-1", "-2^63"])
def test_integers_at_the_signed_64_bit_limits_are_accepted(value):
    transport = FakeTransport(lambda session, action, payload: {"transactionId": 1,
                                                                 "idTagInfo": {"status": "Accepted"}})
    payload = with_value("StartTransaction", ("meterStart",), value)
    transport.receive([2, "edge", "StartTransaction", payload])
    assert transport.dispatched == [("StartTransaction", payload)]
    assert transport.sent[0][0] == 3


# -- handler timeout -------------------------------------------------------------------------------


def test_handler_that_never_answers_gets_internal_error_after_the_handler_timeout_and_the_queue_moves():
    never = defer.Deferred()
    transport = FakeTransport(lambda session, action, payload: never if action == "DataTransfer"
                              else HEARTBEAT_ANSWER)
    transport.receive([2, "stuck", "DataTransfer", {"vendorId": "acme"}])
    transport.receive([2, "next", "Heartbeat", {}])
    transport.clock.advance(HANDLER_TIMEOUT - 0.001)
    assert transport.sent == []
    assert len(transport.dispatched) == 1
    with capturedLogs() as events:
        transport.clock.advance(0.001)
    assert [frame[:3] for frame in transport.sent] == [[4, "stuck", "InternalError"], [3, "next", HEARTBEAT_ANSWER]]
    [warning] = [event for event in events if event["log_level"] == LogLevel.warn]
    assert (warning["station"], warning["action"]) == ("CP-1", "DataTransfer")
    assert transport.clock.getDelayedCalls() == []


def test_each_queued_handler_gets_its_own_full_timeout():
    answers: list[defer.Deferred] = []

    def dispatch(session, action, payload):
        answers.append(defer.Deferred())
        return answers[-1]
    transport = FakeTransport(dispatch)
    for unique_id in ("first", "second", "third"):
        transport.receive([2, unique_id, "Heartbeat", {}])
    transport.clock.advance(HANDLER_TIMEOUT)  # the first times out; the second is dispatched now
    assert [frame[:3] for frame in transport.take_sent()] == [[4, "first", "InternalError"]]
    transport.clock.advance(HANDLER_TIMEOUT / 2)
    answers[1].callback(HEARTBEAT_ANSWER)  # the third is dispatched, half a timeout later
    assert transport.take_sent() == [[3, "second", HEARTBEAT_ANSWER]]
    transport.clock.advance(HANDLER_TIMEOUT - 1)
    assert transport.sent == []
    transport.clock.advance(1)
    assert [frame[:3] for frame in transport.take_sent()] == [[4, "third", "InternalError"]]
    assert transport.clock.getDelayedCalls() == []


@pytest.mark.parametrize("late", [{"status": "Accepted"}, CallError("GenericError", "late"), KeyError("late bug")],
                         ids=["result", "call-error", "exception"])
def test_late_handler_outcome_is_discarded_and_logged(late):
    slow = defer.Deferred()
    transport = FakeTransport(lambda session, action, payload: slow if action == "DataTransfer"
                              else HEARTBEAT_ANSWER)
    transport.receive([2, "stuck", "DataTransfer", {"vendorId": "acme"}])
    transport.clock.advance(HANDLER_TIMEOUT)
    transport.receive([2, "next", "Heartbeat", {}])
    sent = transport.take_sent()
    with capturedLogs() as events:
        if isinstance(late, Exception):
            slow.errback(late)
        else:
            slow.callback(late)
    assert transport.sent == []
    assert not slow.called or slow.result is None  # consumed: no "Unhandled error in Deferred" later
    [late_event] = [event for event in events if event.get("station") == "CP-1"]
    assert late_event["action"] == "DataTransfer"
    if isinstance(late, KeyError):  # a bug in the handler: logged with its traceback
        assert "log_failure" in late_event
    else:
        assert late_event["log_level"] == LogLevel.warn
    assert [frame[1] for frame in sent] == ["stuck", "next"]
    transport.receive([2, "after", "Heartbeat", {}])
    assert transport.sent == [[3, "after", HEARTBEAT_ANSWER]]


def test_handler_timeout_counts_from_dispatch_not_from_arrival():
    answers: list[defer.Deferred] = []

    def dispatch(session, action, payload):
        answers.append(defer.Deferred())
        return answers[-1]
    transport = FakeTransport(dispatch)
    transport.receive([2, "first", "Heartbeat", {}])
    transport.receive([2, "second", "Heartbeat", {}])
    transport.clock.advance(HANDLER_TIMEOUT / 2)
    answers[0].callback(HEARTBEAT_ANSWER)  # the second is dispatched now, half a timeout after it arrived
    transport.clock.advance(HANDLER_TIMEOUT - 1)
    assert transport.take_sent() == [[3, "first", HEARTBEAT_ANSWER]]
    answers[1].callback(HEARTBEAT_ANSWER)
    assert transport.sent == [[3, "second", HEARTBEAT_ANSWER]]
    # The session's one handler timer ends once it finds nothing waiting.
    transport.clock.advance(HANDLER_TIMEOUT)
    assert transport.clock.getDelayedCalls() == []


def test_call_answered_at_once_sets_no_handler_timer():
    transport = FakeTransport()
    transport.receive([2, "a", "Heartbeat", {}])
    transport.receive([2, "b", "Heartbeat", {}])
    assert transport.clock.getDelayedCalls() == []


# -- what a station answers, and what the CSMS is asked to send ---------------------------------------


@pytest.mark.parametrize("action, request_payload, answer_json", [
    ("Reset", {"type": "Soft"}, '{"status": "Accepted\\u0000"}'),
    ("Reset", {"type": "Soft"}, '{"status": "\\ud800"}'),
    ("GetConfiguration", {}, '{"configurationKey": [{"key": "k", "readonly": true, "value": "a\\u0000"}]}'),
    ("DataTransfer", {"vendorId": "acme"}, '{"status": "Accepted", "data": "\\udc00"}'),
    ("GetLocalListVersion", {}, '{"listVersion": 9223372036854775808}'),
    ("GetLocalListVersion", {}, '{"listVersion": -9223372036854775809}'),
    ("GetLocalListVersion", {}, '{"listVersion": 18446744073709551615}'),
    ("GetCompositeSchedule", {"connectorId": 1, "duration": 60},
     '{"status": "Accepted", "chargingSchedule": {"chargingRateUnit": "A", "chargingSchedulePeriod": '
     '[{"startPeriod": 0, "limit": Infinity}]}}'),
    ("GetCompositeSchedule", {"connectorId": 1, "duration": 60},
     '{"status": "Accepted", "chargingSchedule": {"chargingRateUnit": "A", "chargingSchedulePeriod": '
     '[{"startPeriod": 0, "limit": NaN}]}}'),
    ("GetCompositeSchedule", {"connectorId": 1, "duration": 60},
     '{"status": "Accepted", "chargingSchedule": {"chargingRateUnit": "A", "chargingSchedulePeriod": '
     '[{"startPeriod": 0, "limit": 1e400}]}}'),
    ("GetCompositeSchedule", {"connectorId": 1, "duration": 60},
     '{"status": "Accepted", "scheduleStart": "0001-01-01T00:00:00+01:00"}'),
], ids=["nul", "surrogate", "nested-nul", "low-surrogate", "2^63", "-2^63-1", "2^64-1", "infinity", "nan",
        "overflowing-float", "overflowing-date"])
def test_station_answer_that_cannot_be_stored_fails_with_response_invalid(action, request_payload, answer_json):
    transport = FakeTransport()
    d = transport.session.call(action, request_payload)
    [sent] = transport.take_sent()
    with capturedLogs() as events:
        transport.receive(f'[3, "{sent[1]}", {answer_json}]')
    failure = failure_of(d)
    assert failure.check(ResponseInvalid), failure
    assert failure.value.code == "PropertyConstraintViolation"
    assert transport.sent == []
    assert bad_log_events(events) == []
    assert transport.session.pending_calls == 0


@pytest.mark.parametrize("action, payload", [
    ("ReserveNow", {"connectorId": 1, "expiryDate": "2030-01-01T00:00:00Z", "idTag": "T",
                    "reservationId": 2 ** 63}),
    ("RemoteStopTransaction", {"transactionId": -2 ** 63 - 1}),
    ("ChangeAvailability", {"connectorId": 10 ** 30, "type": "Operative"}),
    ("DataTransfer", {"vendorId": "acme\x00"}),
    ("DataTransfer", {"vendorId": "acme", "data": "\ud800"}),
    ("ReserveNow", {"connectorId": 1, "expiryDate": "9999-12-31T23:59:59-01:00", "idTag": "T",
                    "reservationId": 1}),
], ids=["2^63", "-2^63-1", "10^30", "nul", "surrogate", "overflowing-date"])
def test_request_the_station_could_not_store_is_refused_before_anything_is_sent(action, payload):
    transport = FakeTransport()
    failure = failure_of(transport.session.call(action, payload))
    assert failure.check(RequestInvalid), failure
    assert failure.value.code == "PropertyConstraintViolation"
    assert transport.sent == []
    assert transport.session.pending_calls == 0
