"""Bad input from a station, end to end over loopback (OCPP-J 1.6 §4.2.3, §3.2).

Every bad message gets the CALLERROR OCPP-J names for it (or, for a stray answer, nothing at all), and
afterwards the same connection still works, a second station connected at the same time never
noticed, and the database holds exactly what it held before.
"""
from __future__ import annotations

import json

import pytest
import pytest_twisted
from sqlalchemy import select
from twisted.internet import reactor

from conftest import db_settled, table_contents

WAIT = 5
TIMESTAMP = "2024-05-01T10:00:00Z"


def frame(*items) -> str:
    return json.dumps(list(items))


def error(unique_id: str, code: str):
    return ("error", unique_id, code)


def answered(unique_id: str):
    return ("result", unique_id)


SILENCE = ("silence",)

#: name -> (what the station sends, sent in a binary frame?, what it must get back)
CASES = {
    "not-json": ("this is {not json", False, error("-1", "FormationViolation")),
    "binary-json-is-processed": (frame(2, "bin-1", "Heartbeat", {}).encode(), True, answered("bin-1")),
    "binary-invalid-utf8": (b"\xff\xfe[2, \"x\"]", True, error("-1", "FormationViolation")),
    "json-object-not-array": ('{"messageTypeId": 2}', False, error("-1", "FormationViolation")),
    "json-string-not-array": ('"hello"', False, error("-1", "FormationViolation")),
    "array-too-short": (frame(2, "short-1"), False, error("short-1", "FormationViolation")),
    "empty-array": ("[]", False, error("-1", "FormationViolation")),
    "unknown-message-type": (frame(7, "type-7", "Heartbeat", {}), False, error("type-7", "ProtocolError")),
    "message-type-as-string": (frame("2", "type-s", "Heartbeat", {}), False, error("type-s", "ProtocolError")),
    "unique-id-not-string": (frame(2, 12345, "Heartbeat", {}), False, error("-1", "FormationViolation")),
    "unique-id-over-36-chars": (frame(2, "u" * 37, "Heartbeat", {}), False, error("u" * 37, "FormationViolation")),
    "action-not-string": (frame(2, "act-1", 42, {}), False, error("act-1", "FormationViolation")),
    "payload-not-object": (frame(2, "pl-1", "Heartbeat", ["x"]), False, error("pl-1", "FormationViolation")),
    "call-missing-payload": (frame(2, "pl-2", "Heartbeat"), False, error("pl-2", "FormationViolation")),
    "unknown-action": (frame(2, "unk-1", "MakeCoffee", {}), False, error("unk-1", "NotImplemented")),
    "wrong-field-type": (frame(2, "type-1", "StatusNotification",
                               {"connectorId": "1", "status": "Available", "errorCode": "NoError"}),
                         False, error("type-1", "TypeConstraintViolation")),
    "missing-required-field": (frame(2, "req-1", "BootNotification", {"chargePointVendor": "V"}),
                               False, error("req-1", "OccurenceConstraintViolation")),
    "enum-violation": (frame(2, "enum-1", "StatusNotification",
                             {"connectorId": 1, "status": "Sleeping", "errorCode": "NoError"}),
                       False, error("enum-1", "PropertyConstraintViolation")),
    "max-length-violation": (frame(2, "len-1", "Authorize", {"idTag": "T" * 21}),
                             False, error("len-1", "PropertyConstraintViolation")),
    "bad-date-time": (frame(2, "date-1", "StartTransaction",
                            {"connectorId": 1, "idTag": "TAG", "meterStart": 0, "timestamp": "yesterday"}),
                      False, error("date-1", "PropertyConstraintViolation")),
    "extra-property": (frame(2, "extra-1", "Heartbeat", {"hello": "world"}),
                       False, error("extra-1", "FormationViolation")),
    "start-transaction-bad-field": (frame(2, "start-1", "StartTransaction",
                                          {"connectorId": 1, "idTag": "TAG", "meterStart": "zero",
                                           "timestamp": TIMESTAMP}),
                                    False, error("start-1", "TypeConstraintViolation")),
    # Connector ids outside what OCPP 1.6's text allows (StartTransaction > 0, StatusNotification and
    # MeterValues >= 0) or beyond its 32-bit integers: nothing is stored.
    **{f"start-transaction-on-connector-{name}": (
        frame(2, f"conn-{name}", "StartTransaction", {"connectorId": connector, "idTag": "TAG", "meterStart": 0,
                                                      "timestamp": TIMESTAMP}),
        False, error(f"conn-{name}", "PropertyConstraintViolation"))
       for name, connector in (("0", 0), ("-5", -5), ("2^31", 2 ** 31), ("2^63-1", 2 ** 63 - 1))},
    **{f"status-notification-on-connector-{name}": (
        frame(2, f"stat-{name}", "StatusNotification", {"connectorId": connector, "status": "Available",
                                                        "errorCode": "NoError"}),
        False, error(f"stat-{name}", "PropertyConstraintViolation"))
       for name, connector in (("-1", -1), ("2^31", 2 ** 31))},
    **{f"meter-values-on-connector-{name}": (
        frame(2, f"meter-{name}", "MeterValues", {"connectorId": connector, "meterValue": [
            {"timestamp": TIMESTAMP, "sampledValue": [{"value": "1"}]}]}),
        False, error(f"meter-{name}", "PropertyConstraintViolation"))
       for name, connector in (("-1", -1), ("2^31", 2 ** 31))},
    # Date-times no station sends: neither RFC 3339 nor ISO 8601's extended calendar form, or second 61.
    **{f"stop-transaction-timestamp-{name}": (
        frame(2, f"time-{name}", "StopTransaction", {"transactionId": 1, "meterStop": 0, "timestamp": timestamp}),
        False, error(f"time-{name}", "PropertyConstraintViolation"))
       for name, timestamp in (("second-61", "2016-12-31T23:59:61Z"), ("week-date", "2024-W18-3T10:00:00Z"),
                               ("basic-format", "20240501T100000Z"), ("padded", " 2024-05-01T10:00:00Z "),
                               ("decimal-mark-without-digits", "2024-05-01T10:00:00.Z"),
                               ("offset-with-seconds", "2024-05-01T10:00:00+01:00:30"))},
    "callresult-for-unknown-id": (frame(3, "nobody-asked", {"status": "Accepted"}), False, SILENCE),
    "callerror-for-unknown-id": (frame(4, "nobody-asked", "GenericError", "", {}), False, SILENCE),
}


def assert_nothing_more_received(station) -> None:
    """The station holds no frame beyond those the test already took."""
    d = station.next_unmatched(timeout=WAIT)
    leftovers = []
    d.addCallbacks(leftovers.append, lambda failure: None)
    assert not leftovers, f"unexpected frame {leftovers[0]!r}"
    d.cancel()


async def assert_heartbeat_answered(station) -> None:
    answer = await station.call_frame("Heartbeat", {}, timeout=WAIT)
    assert answer[0] == 3, answer
    assert answer[2]["currentTime"].endswith("Z")


@pytest.mark.parametrize("sent, binary, expected", list(CASES.values()), ids=list(CASES))
@pytest_twisted.ensureDeferred
async def test_bad_message_is_answered_and_harms_nobody(csms, sent, binary, expected):
    station = await csms.connect("CP-BAD")
    bystander = await csms.connect("CP-BYSTANDER")
    await bystander.boot(connectors=1)
    await db_settled(csms.app)  # connection bookkeeping is written without waiting
    before = await table_contents(csms)

    station.send_raw(sent, binary=binary)

    if expected is SILENCE:
        await assert_heartbeat_answered(station)
        assert_nothing_more_received(station)
    else:
        answer = await station.next_unmatched(timeout=WAIT)
        if expected[0] == "error":
            _, unique_id, code = expected
            assert answer[:3] == [4, unique_id, code]
            assert isinstance(answer[3], str) and answer[3]
            assert answer[4] == {}
        else:
            assert answer[:2] == [3, expected[1]]
        await assert_heartbeat_answered(station)
        assert_nothing_more_received(station)

    assert await table_contents(csms) == before
    await assert_heartbeat_answered(bystander)
    assert (await bystander.call("StatusNotification", {"connectorId": 1, "status": "Preparing",
                                                         "errorCode": "NoError"}, timeout=WAIT)) == {}
    assert csms.app.is_connected("CP-BAD") and csms.app.is_connected("CP-BYSTANDER")
    assert not station.closed.called and not bystander.closed.called


@pytest_twisted.ensureDeferred
async def test_start_transaction_with_a_bad_field_writes_no_transaction(csms):
    from csms_plugins.core.tables import transactions

    station = await csms.connect_booted("CP-1")
    answer = await station.call_frame("StartTransaction", {"connectorId": 1, "idTag": "TAG", "meterStart": "zero",
                                                           "timestamp": TIMESTAMP}, timeout=WAIT)
    assert answer[2] == "TypeConstraintViolation"
    rows = await csms.app.db.run(lambda conn: conn.execute(select(transactions)).fetchall())
    assert rows == []
    # The same request, corrected, is then accepted and stored once.
    answer = await station.call("StartTransaction", {"connectorId": 1, "idTag": "TAG", "meterStart": 0,
                                                     "timestamp": TIMESTAMP}, timeout=WAIT)
    rows = await csms.app.db.run(lambda conn: conn.execute(select(transactions.c.id)).fetchall())
    assert [row[0] for row in rows] == [answer["transactionId"]]


@pytest_twisted.ensureDeferred
async def test_connector_id_out_of_range_is_refused_and_the_calls_queued_behind_it_are_answered(csms):
    from csms_plugins.core.tables import transactions

    station = await csms.connect_booted("CP-1")
    start = {"connectorId": 0, "idTag": "TAG", "meterStart": 0, "timestamp": TIMESTAMP}
    # Sent at once: the second and third wait in the station's queue behind the refused first.
    station.send_raw(frame(2, "start-0", "StartTransaction", start))
    station.send_raw(frame(2, "status-minus-1", "StatusNotification",
                           {"connectorId": -1, "status": "Available", "errorCode": "NoError"}))
    station.send_raw(frame(2, "start-1", "StartTransaction", dict(start, connectorId=1)))
    answers = [await station.next_unmatched(timeout=WAIT) for _ in range(3)]
    assert [answer[:3] for answer in answers[:2]] == [[4, "start-0", "PropertyConstraintViolation"],
                                                      [4, "status-minus-1", "PropertyConstraintViolation"]]
    assert "connectorId" in answers[0][3]
    assert answers[2][:2] == [3, "start-1"]
    rows = await csms.app.db.run(lambda conn: conn.execute(select(transactions.c.id, transactions.c.connector_id))
                                 .fetchall())
    assert [tuple(row) for row in rows] == [(answers[2][2]["transactionId"], 1)]


@pytest_twisted.ensureDeferred
async def test_connector_ids_at_the_edges_the_specification_allows_are_accepted(csms):
    """0 is the whole charge point (StatusNotification) or its main meter (MeterValues); the largest id is
    OCPP 1.6's largest integer, 2^31-1."""
    station = await csms.connect_booted("CP-1")
    for connector in (0, 2 ** 31 - 1):
        assert await station.call("StatusNotification", {"connectorId": connector, "status": "Available",
                                                          "errorCode": "NoError"}, timeout=WAIT) == {}
        assert await station.call("MeterValues", {"connectorId": connector, "meterValue": [
            {"timestamp": TIMESTAMP, "sampledValue": [{"value": "1"}]}]}, timeout=WAIT) == {}
    for connector in (1, 2 ** 31 - 1):
        answer = await station.call("StartTransaction", {"connectorId": connector, "idTag": "TAG", "meterStart": 0,
                                                         "timestamp": TIMESTAMP}, timeout=WAIT)
        assert isinstance(answer["transactionId"], int)


@pytest.mark.parametrize("action, payload", [
    ("FirmwareStatusNotification", {"status": "Installed"}),
    ("DiagnosticsStatusNotification", {"status": "Uploaded"}),
])
@pytest_twisted.ensureDeferred
async def test_action_of_a_disabled_profile_answers_not_supported(csms_factory, action, payload):
    csms = await csms_factory(plugins=["core"])
    station = await csms.connect("CP-1")
    answer = await station.call_frame(action, payload, timeout=WAIT)
    assert answer[0] == 4
    assert answer[2] == "NotSupported"
    assert "FirmwareManagement" in answer[3]
    await assert_heartbeat_answered(station)


@pytest_twisted.ensureDeferred
async def test_message_over_max_message_size_closes_only_that_connection_with_1009(csms_factory):
    csms = await csms_factory(config_text="[ocpp]\nmax_message_size = 2048\n")
    station = await csms.connect("CP-BIG")
    bystander = await csms.connect("CP-SMALL")

    # Just under the limit is fine.
    small = {"vendorId": "com.example", "data": "x" * 1900}
    assert len(json.dumps([2, "t1", "DataTransfer", small])) < 2048
    assert (await station.call("DataTransfer", small, timeout=WAIT)) == {"status": "UnknownVendorId"}

    station.send_frame([2, "big-1", "DataTransfer", {"vendorId": "com.example", "data": "x" * 4096}])
    was_clean, code, reason = await station.closed.addTimeout(WAIT, reactor)
    assert code == 1009, (was_clean, code, reason)

    await assert_heartbeat_answered(bystander)
    assert not bystander.closed.called
    # The station that was cut off can come back.
    station = await csms.connect("CP-BIG")
    await assert_heartbeat_answered(station)


@pytest_twisted.ensureDeferred
async def test_station_sending_garbage_repeatedly_keeps_getting_answers(csms):
    station = await csms.connect("CP-NOISY")
    for i in range(20):
        station.send_raw(f"garbage {i}")
    answers = [await station.next_unmatched(timeout=WAIT) for _ in range(20)]
    assert answers == [[4, "-1", "FormationViolation", "Message is not valid JSON", {}]] * 20
    await assert_heartbeat_answered(station)


@pytest_twisted.ensureDeferred
async def test_answers_keep_the_order_of_the_calls(csms):
    station = await csms.connect("CP-ORDER")
    for i in range(5):
        station.send_raw(frame(2, f"ok-{i}", "Heartbeat", {}))
        station.send_raw(frame(2, f"bad-{i}", "Heartbeat", {"x": i}))
    answers = [await station.next_unmatched(timeout=WAIT) for _ in range(10)]
    assert [a[1] for a in answers] == [f"{kind}-{i}" for i in range(5) for kind in ("ok", "bad")]
    assert [a[0] for a in answers] == [3, 4] * 5


@pytest_twisted.ensureDeferred
async def test_text_frame_of_invalid_utf8_closes_only_that_connection_with_1007(csms):
    # RFC 6455 §8.1: an endpoint must fail a connection whose text frame is not UTF-8. Unlike a binary
    # frame, which the CSMS reads itself (and answers FormationViolation), this is WebSocket's business.
    station = await csms.connect("CP-MOJIBAKE")
    bystander = await csms.connect("CP-FINE")
    station.send_raw(b"[2, \"x\xff\", \"Heartbeat\", {}]", binary=False)
    was_clean, code, reason = await station.closed.addTimeout(WAIT, reactor)
    assert code == 1007, (was_clean, code, reason)
    await assert_heartbeat_answered(bystander)
