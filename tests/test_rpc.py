"""OCPP-J 1.6 RPC (OCPP-J 1.6 §4) on a fake transport: no sockets, no reactor time, a Clock for timeouts.

Every test builds a :class:`csms.rpc.OCPPSession` whose ``send`` appends the frames it would put on the
wire to a list, so each assertion is about the exact frames the station would see.
"""
from __future__ import annotations

import json

import pytest
from twisted.internet import defer, task

from csms.rpc import (CallError, CallErrorReceived, CallTimeout, OCPPSession, RequestInvalid, ResponseInvalid,
                      StationOffline)

RESPONSE_TIMEOUT = 30.0
HEARTBEAT_ANSWER = {"currentTime": "2024-01-01T00:00:00.000Z"}


class FakeTransport:
    """What the session sent, decoded, plus what it dispatched to the application."""

    def __init__(self, dispatch=None):
        self.sent: list = []
        self.dispatched: list = []
        self.clock = task.Clock()
        self._dispatch = dispatch or (lambda session, action, payload: HEARTBEAT_ANSWER)
        self.session = OCPPSession("CP-1", self.dispatch, self.send, self.clock, RESPONSE_TIMEOUT)

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


def test_integer_wider_than_64_bits_reaches_schema_validation():
    """orjson refuses such numbers; the standard library reads them, so the station gets the schema's
    code for a bad value, not a FormationViolation for JSON that is in fact valid."""
    transport = FakeTransport()
    transport.receive('[2, "big", "StatusNotification", {"connectorId": 123456789012345678901234567890, '
                      '"errorCode": "NoError", "status": "Available"}]')
    [frame] = transport.sent
    assert frame[:2] == [4, "big"] and frame[2] != "FormationViolation", frame
    assert transport.dispatched == []


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
