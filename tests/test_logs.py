"""Log lines (``[csms] log_format``), the per-station trace (``[ocpp] trace_stations``) and redaction.

The secrets test drives real traffic carrying every kind of secret the CSMS handles through a CSMS
whose every event (debug included) is written by both line formats, with the station traced, and
looks for each secret in what was written.
"""
from __future__ import annotations

import base64
import io
import json

import pytest
import pytest_twisted
from twisted.logger import LogLevel, Logger, globalLogPublisher
from twisted.python.failure import Failure

from conftest import within
from csms.config import ConfigError, load_config
from csms.logs import (REDACTED, TRACE_LIMIT, TRACE_NAMESPACE, file_observer, frame_for_trace, json_line,
                       level_predicate, redact, text_line)
from csms.testing import TEST_API_TOKEN
from csms.testing.station import StationRefused

PRIVATE_KEY = ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n"
               "-----END PRIVATE KEY-----")


def event(message: str = "hello", **fields) -> dict:
    return dict(log_format=message, log_time=1_800_000_000.25, log_level=LogLevel.info,
                log_namespace="csms.test", **fields)


class CapturedLogs:
    """Every event published while it is installed, written in both line formats."""

    def __init__(self):
        self.streams = {"text": io.StringIO(), "json": io.StringIO()}
        self.observers = [file_observer(stream, name) for name, stream in self.streams.items()]

    def __enter__(self):
        for observer in self.observers:
            globalLogPublisher.addObserver(observer)
        return self

    def __exit__(self, *exc):
        for observer in self.observers:
            globalLogPublisher.removeObserver(observer)

    @property
    def text(self) -> str:
        return self.streams["text"].getvalue()

    def json_records(self) -> list[dict]:
        return [json.loads(line) for line in self.streams["json"].getvalue().splitlines()]


# -- the line formats ------------------------------------------------------------------------------


def test_json_line_has_utc_timestamp_level_namespace_message_station_and_action():
    record = json.loads(json_line(event("{station} sent {action}", station="CP-1", action="Heartbeat")))
    assert record == {"timestamp": "2027-01-15T08:00:00.250Z", "level": "info", "namespace": "csms.test",
                      "message": "CP-1 sent Heartbeat", "station_id": "CP-1", "action": "Heartbeat"}


def test_json_line_of_a_failure_carries_its_traceback_redacted():
    try:
        raise ValueError(f"handshake failed: Authorization: Basic {base64.b64encode(b'CP-1:hunter22').decode()}")
    except ValueError:
        failure = Failure()
    record = json.loads(json_line(event("Handshake of {station} failed", station="CP-1", log_failure=failure)))
    assert "ValueError" in record["traceback"] and REDACTED in record["traceback"]
    assert "aHVudGVy" not in json.dumps(record) and record["level"] == "info"


def test_text_line_is_twistds_classic_line_redacted():
    line = text_line(event("key: " + PRIVATE_KEY))
    assert line.startswith("2027-01-15T08:00:00+0000 [csms.test#info] key: -----BEGIN PRIVATE KEY----- [redacted]")
    assert "MIIEvQ" not in line and line.endswith("\n")


@pytest.mark.parametrize("text, secret", [
    ("authorization: Basic Q1AtMTpodW50ZXIyMg==", "Q1AtMTpodW50ZXIyMg=="),
    ("{'authorization': 'Bearer tok-123456789'}", "tok-123456789"),
    ("sent Bearer abc.def-123_456", "abc.def-123_456"),
    ('[2,"1","ChangeConfiguration",{"key":"AuthorizationKey","value":"s3cr3t-key"}]', "s3cr3t-key"),
    ("{'value': 's3cr3t-key', 'key': 'AuthorizationKey'}", "s3cr3t-key"),
    ('{"id": "CP-1", "password": "pa55-word"}', "pa55-word"),
    ("password=pa55-word&x=1", "pa55-word"),
    ("postgresql+psycopg://csms:db-pa55@db/csms", "db-pa55"),
    ("cut " + PRIVATE_KEY[:60], "MIIEvQ"),
])
def test_redact_removes_each_kind_of_secret(text, secret):
    assert secret not in redact(text)


def test_redact_keeps_ordinary_text():
    text = "CP-1 sent Authorize for idTag ABC123 (Basic auth accepted); key HeartbeatInterval = 300"
    assert redact(text) == text


# -- configuration -----------------------------------------------------------------------------------


def test_log_format_and_shutdown_grace_are_read_and_checked():
    config = load_config(text="[csms]\nlog_format = JSON\nshutdown_grace = 2.5\n[ocpp]\ntrace_stations = CP-1, CP-2\n")
    assert (config.log_format, config.shutdown_grace, config.ocpp.trace_stations) == ("json", 2.5, ["CP-1", "CP-2"])
    assert load_config(text="").log_format == "text"
    with pytest.raises(ConfigError, match=r"\[csms\] log_format must be one of text, json, not 'xml'"):
        load_config(text="[csms]\nlog_format = xml\n")
    with pytest.raises(ConfigError, match="shutdown_grace"):
        load_config(text="[csms]\nshutdown_grace = -1\n")


# -- the trace ------------------------------------------------------------------------------------------


def test_trace_namespace_passes_the_level_filter_other_debug_does_not():
    from twisted.logger import PredicateResult

    predicate = level_predicate("info")
    assert predicate(dict(log_level=LogLevel.debug, log_namespace=TRACE_NAMESPACE)) != PredicateResult.no
    assert predicate(dict(log_level=LogLevel.debug, log_namespace="csms.rpc")) == PredicateResult.no
    assert predicate(dict(log_level=LogLevel.info, log_namespace="csms.rpc")) != PredicateResult.no


def test_trace_of_a_huge_frame_is_cut_and_counted():
    frame = json.dumps([2, "1", "DataTransfer", {"vendorId": "V", "data": "x" * 50_000}])
    shown, action = frame_for_trace(frame.encode())
    assert action == "DataTransfer" and len(shown) < TRACE_LIMIT + 50
    assert shown.endswith(f"... ({len(frame.replace(' ', '')) - TRACE_LIMIT} more characters)")


def test_trace_of_a_frame_that_is_not_json_is_redacted_text():
    shown, action = frame_for_trace('[2,"1","ChangeConfiguration",{"key":"AuthorizationKey","value":"s3cr3t"')
    assert action is None and "s3cr3t" not in shown


@pytest_twisted.ensureDeferred
async def test_traced_station_frames_are_logged_untraced_ones_not(csms_factory):
    csms = await csms_factory("[ocpp]\ntrace_stations = CP-T\n")
    with CapturedLogs() as logs:
        traced = await csms.connect("CP-T")
        other = await csms.connect("CP-U")
        await within(traced.call("Heartbeat", {}))
        await within(other.call("Heartbeat", {}))
    trace = [r for r in logs.json_records() if r["namespace"] == TRACE_NAMESPACE]
    assert {r["station_id"] for r in trace} == {"CP-T"}
    messages = [r["message"] for r in trace]
    assert any(m.startswith("CP-T handshake from") for m in messages), messages
    assert any(m.startswith('CP-T received [2,') and '"Heartbeat"' in m for m in messages), messages
    assert any(m.startswith('CP-T sent [3,') and "currentTime" in m for m in messages), messages
    assert all(r["level"] == "debug" for r in trace)


@pytest_twisted.ensureDeferred
async def test_station_text_in_a_text_log_line_has_its_control_characters_escaped(csms):
    """Found by fuzzing: a SecurityEventNotification's type and techInfo, or a DataTransfer's vendorId,
    reached the text log as sent, so a station could write terminal escape sequences (ESC), carriage
    returns that hide what went before on a terminal, and bidirectional overrides into the operator's
    log. Newlines stay the continuation lines twistd makes of them."""
    hostile = "\x1b[2J\x1b[31mFAKE\rok\u202egol\x07\x7f"
    station = await csms.connect_booted("CP-LOG")
    with CapturedLogs() as logs:
        assert await within(station.call("SecurityEventNotification", {
            "type": "X\x1b]0;owned\x07", "timestamp": "2026-03-01T10:00:00Z", "techInfo": hostile + "\nnext"})) == {}
        assert await within(station.call("DataTransfer", {"vendorId": "v\x1b[8m\r"})) == {"status": "UnknownVendorId"}
    text = logs.text
    assert "CP-LOG" in text
    for char in "\x1b\r\u202e\x07\x7f":
        assert char not in text, f"{char!r} in the text log"
    assert "\\x1b[2J\\x1b[31mFAKE\\rok\\u202egol\\x07\\x7f\n\tnext" in text
    assert "vendorId v\\x1b[8m\\r" in text
    # The JSON format escapes as JSON does: the message keeps what the station sent.
    assert any(hostile in record["message"] for record in logs.json_records())


# -- no secret in any log --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_no_secret_reaches_the_log_in_either_format(csms_factory):
    """Basic auth (right and wrong), bearer tokens (right and wrong), passwords set and rotated through
    the API, an AuthorizationKey sent with ChangeConfiguration and echoed by GetConfiguration, with the
    station traced and every debug event written."""
    station_password = "station-pa55-0123456789"
    wrong_password = "wrong-pa55-9876543210"
    wrong_token = "wrong-token-abcdef0123456789"
    authorization_key = "0123456789abcdef-auth-key"
    csms = await csms_factory("[ocpp]\ntrace_stations = CP-S\nrequire_password = true\n")
    with CapturedLogs() as logs:
        status, _, _ = await csms.api("POST", "/stations", json={"id": "CP-S", "password": station_password})
        assert status == 201
        with pytest.raises(StationRefused):
            await csms.connect("CP-S", password=wrong_password)
        status, _, _ = await csms.api("GET", "/stations", token=wrong_token)
        assert status == 401
        station = await csms.connect("CP-S", password=station_password)
        station.responses["GetConfiguration"] = {
            "configurationKey": [{"key": "AuthorizationKey", "readonly": False, "value": authorization_key}]}
        status, body, _ = await csms.api("POST", "/stations/CP-S/calls/ChangeConfiguration",
                                         json={"key": "AuthorizationKey", "value": authorization_key})
        assert (status, body) == (200, {"status": "Accepted"})
        status, _, _ = await csms.api("POST", "/stations/CP-S/calls/GetConfiguration", json={})
        assert status == 200
        status, body, _ = await csms.api("POST", "/stations/CP-S/password/rotate")
        rotated = body["password"]
        Logger(namespace="csms.test").error("A key leaked into an error: {key}", key=PRIVATE_KEY, station="CP-S")
    secrets = {
        "station password": station_password,
        "wrong password": wrong_password,
        "Basic credentials": base64.b64encode(f"CP-S:{station_password}".encode()).decode(),
        "wrong Basic credentials": base64.b64encode(f"CP-S:{wrong_password}".encode()).decode(),
        "bearer token": TEST_API_TOKEN,
        "wrong bearer token": wrong_token,
        "AuthorizationKey": authorization_key,
        "rotated password": rotated,
        "private key": "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7",
    }
    json_text = logs.streams["json"].getvalue()
    for name, secret in secrets.items():
        assert secret not in logs.text, f"{name} in the text log"
        assert secret not in json_text, f"{name} in the JSON log"
    # The traffic was traced: the secrets were there to leak.
    trace = [r for r in logs.json_records() if r["namespace"] == TRACE_NAMESPACE]
    assert any(r.get("action") == "ChangeConfiguration" and REDACTED in r["message"] for r in trace), trace
    assert any("authorization" in r["message"] and REDACTED in r["message"] for r in trace), trace
    assert "CP-S received [3," in logs.text


# -- twistd's observers ------------------------------------------------------------------------------------


def test_install_gives_twistds_log_file_our_lines_and_filters_and_redacts_other_observers():
    from twisted.logger import FileLogObserver, LogPublisher, textFileLogObserver

    from csms.logs import install

    publisher = LogPublisher()
    log_file = io.StringIO()
    seen: list = []
    publisher.addObserver(textFileLogObserver(log_file))  # as twistd's own log file
    publisher.addObserver(seen.append)  # as syslog or --logger
    install(publisher, "info", "json")
    publisher(event("Authorization: Bearer tok-0123456789", station="CP-1"))
    publisher(dict(event("noise"), log_level=LogLevel.debug))
    (record,) = [json.loads(line) for line in log_file.getvalue().splitlines()]
    assert record["message"] == f"Authorization: {REDACTED}" and record["station_id"] == "CP-1"
    (other,) = seen
    from twisted.logger import formatEvent
    assert formatEvent(other) == f"Authorization: {REDACTED}"
    assert not any(isinstance(o, FileLogObserver) for o in publisher._observers)  # all behind the filter


def test_twistd_log_file_is_the_one_twistd_would_choose(tmp_path, monkeypatch):
    import signal
    import sys

    from twisted.python.logfile import LogFile

    from csms.logs import twistd_log_file

    monkeypatch.setattr(signal, "signal", lambda *args: None)  # no SIGUSR1 handler in the test process
    assert twistd_log_file({"nodaemon": True, "logfile": None}) is sys.stdout
    assert twistd_log_file({"nodaemon": True, "logfile": "-"}) is sys.stdout
    assert twistd_log_file({"syslog": True, "nodaemon": True}) is None
    assert twistd_log_file({"logger": "my.observer", "nodaemon": True}) is None
    log_file = twistd_log_file({"nodaemon": False, "logfile": str(tmp_path / "csms.log")})
    assert isinstance(log_file, LogFile) and log_file.path == str(tmp_path / "csms.log")
    log_file.close()
