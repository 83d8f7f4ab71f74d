"""Station input that used to crash a handler, drop the connection or stall the station's queue (issue 12),
end to end over loopback on every database.

Each input gets a named CALLERROR for its own call; the connection stays up, the calls queued behind it
are answered in order, nothing is stored, a second station never notices, and nothing is logged as an
error.
"""
from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.logger import capturedLogs
from zope.interface import implementer

from conftest import db_settled, table_contents, within
from csms.config import ConfigError, load_config
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from ocpp_inputs import case_id, cases, with_value
from test_rpc import OVERFLOWING_TIMESTAMPS, bad_log_events

WAIT = 5


async def answers(station, count: int) -> list:
    """The next ``count`` frames the station received that answer none of its own calls."""
    return [await station.next_unmatched(timeout=WAIT) for _ in range(count)]


async def assert_still_served(*stations) -> None:
    for station in stations:
        assert not station.closed.called
        answer = await station.call_frame("Heartbeat", {}, timeout=WAIT)
        assert answer[0] == 3, answer


async def bystander_and_snapshot(csms):
    bystander = await csms.connect_booted("CP-BYSTANDER")
    await db_settled(csms.app)  # connection bookkeeping is written without waiting
    return bystander, await table_contents(csms)


@pytest.mark.parametrize("timestamp", OVERFLOWING_TIMESTAMPS)
@pytest_twisted.ensureDeferred
async def test_timestamp_overflowing_in_utc_behind_a_database_call_is_refused_and_the_queue_moves(csms, timestamp):
    station = await csms.connect_booted("CP-1")
    bystander = await csms.connect_booted("CP-BYSTANDER")
    start = {"connectorId": 1, "idTag": "TAG", "meterStart": 0, "timestamp": "2024-05-01T10:00:00Z"}
    with capturedLogs() as events:
        # Sent back to back: the second waits for the first's database write, the third for the second.
        station.send_raw(json.dumps([2, "start", "StartTransaction", start]))
        station.send_raw(json.dumps([2, "overflow", "StartTransaction", {**start, "timestamp": timestamp}]))
        station.send_raw(json.dumps([2, "next", "Heartbeat", {}]))
        first, second, third = await answers(station, 3)
        await assert_still_served(station, bystander)
    assert (first[:2], second[:3], third[:2]) == ([3, "start"], [4, "overflow", "PropertyConstraintViolation"],
                                                  [3, "next"])
    assert "not a representable date-time" in second[3]
    assert bad_log_events(events) == []


@pytest_twisted.ensureDeferred
async def test_json_nested_30000_deep_is_a_formation_violation(csms):
    station = await csms.connect("CP-1")
    bystander, before = await bystander_and_snapshot(csms)
    with capturedLogs() as events:
        station.send_raw("[" * 30000 + "]" * 30000)
        station.send_raw('[2, "deep", "DataTransfer", {"vendorId": "x", "data": ' + "[" * 30000 + "]" * 30000 + "}]")
        assert [frame[:3] for frame in await answers(station, 2)] == [[4, "-1", "FormationViolation"]] * 2
        await assert_still_served(station, bystander)
    assert bad_log_events(events) == []
    assert await table_contents(csms) == before


@pytest_twisted.ensureDeferred
async def test_unique_id_with_a_lone_surrogate_gets_an_answer_with_that_id(csms):
    station = await csms.connect_booted("CP-1")
    with capturedLogs() as events:
        station.send_raw('[2, "id-\\ud800", "Heartbeat", {}]')
        station.send_raw('[2, "tag-\\udfff", "Authorize", {"idTag": "T\\ud800"}]')
        heartbeat, authorize = await answers(station, 2)
        await assert_still_served(station)
    assert heartbeat[:2] == [3, "id-\ud800"]
    assert authorize[:3] == [4, "tag-\udfff", "PropertyConstraintViolation"]
    assert bad_log_events(events) == []


@pytest_twisted.ensureDeferred
async def test_string_the_database_cannot_store_is_refused_in_every_field_of_every_action(csms):
    """NUL (PostgreSQL cannot store it) and lone surrogates (no UTF-8 at all), in each string field of
    each inbound action, all on one connection: each is refused, nothing is stored."""
    station = await csms.connect_booted("CP-1")
    bystander, before = await bystander_and_snapshot(csms)
    marker = "\u2603"
    sent = []
    with capturedLogs() as events:
        for action, path in cases("string"):
            for bad in ("\\u0000", "\\ud800"):
                unique_id = f"s{len(sent)}"
                payload = json.dumps(with_value(action, path, marker), ensure_ascii=False).replace(marker, "x" + bad)
                station.send_raw(f'[2, "{unique_id}", "{action}", {payload}]')
                sent.append((unique_id, case_id(action, path), bad))
        received = await answers(station, len(sent))
        await assert_still_served(station, bystander)
    assert [(frame[0], frame[1], frame[2]) for frame in received] == \
        [(4, unique_id, "PropertyConstraintViolation") for unique_id, _, _ in sent], sent
    assert bad_log_events(events) == []
    assert await table_contents(csms) == before


@pytest.mark.parametrize("value", [2 ** 63, 2 ** 64 - 1, -2 ** 63 - 1, 10 ** 30], ids=["2^63", "2^64-1", "-2^63-1",
                                                                                      "10^30"])
@pytest_twisted.ensureDeferred
async def test_integer_outside_signed_64_bits_is_refused_in_every_field_of_every_action(csms, value):
    station = await csms.connect_booted("CP-1")
    bystander, before = await bystander_and_snapshot(csms)
    integer_cases = cases("integer")
    with capturedLogs() as events:
        for index, (action, path) in enumerate(integer_cases):
            station.send_frame([2, f"i{index}", action, with_value(action, path, value)])
        received = await answers(station, len(integer_cases))
        await assert_still_served(station, bystander)
    assert [frame[:3] for frame in received] == \
        [[4, f"i{index}", "PropertyConstraintViolation"] for index in range(len(integer_cases))]
    assert bad_log_events(events) == []
    assert await table_contents(csms) == before


@pytest.mark.parametrize("action, request_payload, answer", [
    ("DataTransfer", {"vendorId": "acme"}, {"status": "Accepted", "data": "a\x00b"}),
    ("DataTransfer", {"vendorId": "acme"}, {"status": "Accepted", "data": "\ud800"}),
    ("GetLocalListVersion", {}, {"listVersion": 2 ** 63}),
], ids=["nul", "surrogate", "2^63"])
@pytest_twisted.ensureDeferred
async def test_station_answer_that_cannot_be_stored_is_an_invalid_response(csms, operator, action, request_payload,
                                                                          answer):
    from csms.rpc import ResponseInvalid

    station = await csms.connect_booted("CP-1")
    station.responses[action] = answer
    with capturedLogs() as events:
        with pytest.raises(ResponseInvalid) as raised:
            await within(operator.call("CP-1", action, request_payload))
        await assert_still_served(station)
    assert raised.value.code == "PropertyConstraintViolation"
    assert bad_log_events(events) == []


# -- a handler that never answers ---------------------------------------------------------------------


@implementer(ICSMSPlugin)
class StallingPlugin:
    """Answers the vendor action ``AcmeStall`` with a Deferred that fires only when the test says so."""

    name = "stalling"
    profile = None
    inbound_actions = ()
    outbound_actions = ()

    def __init__(self):
        self.stalled: list[defer.Deferred] = []
        #: Fires when the handler is first called.
        self.called = defer.Deferred()

    @hookimpl
    def csms_handle_call(self, station, action, payload):
        if action != "AcmeStall":
            return None
        self.stalled.append(defer.Deferred())
        if not self.called.called:
            self.called.callback(None)
        return self.stalled[-1]


@pytest_twisted.ensureDeferred
async def test_handler_that_never_answers_gets_internal_error_after_handler_timeout(csms_factory):
    plugin = StallingPlugin()
    csms = await csms_factory(config_text="[ocpp]\nhandler_timeout = 5\n", extra_plugins=[plugin])
    station = await csms.connect_booted("CP-1")
    bystander = await csms.connect_booted("CP-BYSTANDER")
    with capturedLogs() as events:
        station.send_frame([2, "stuck", "AcmeStall", {}])
        station.send_frame([2, "queued", "Heartbeat", {}])
        first_answer = station.next_unmatched(timeout=WAIT)
        await within(plugin.called, WAIT)  # the handler's time runs from here
        await assert_still_served(bystander)  # (plugin.called fires inside the handler: let it return)
        csms.clock.advance(4.9)
        await assert_still_served(bystander)
        assert not first_answer.called
        csms.clock.advance(0.2)  # past the deadline, whatever the float rounding of the clock
        stuck, queued = await first_answer, await station.next_unmatched(timeout=WAIT)
        plugin.stalled[0].callback({"late": True})
        await assert_still_served(station, bystander)
    assert stuck[:3] == [4, "stuck", "InternalError"]
    assert queued[:2] == [3, "queued"]
    assert [event["action"] for event in events if event.get("station") == "CP-1"] == ["AcmeStall", "AcmeStall"]
    assert bad_log_events(events) == []


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_handler_timeout_must_be_a_positive_number_of_seconds(value):
    with pytest.raises(ConfigError, match="handler_timeout must be a positive"):
        load_config(text=f"[ocpp]\nhandler_timeout = {value}\n")


def test_handler_timeout_defaults_to_a_minute():
    assert load_config(text="").ocpp.handler_timeout == 60
