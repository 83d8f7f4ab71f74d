"""Security extension, logs: OCTT TC_079 (GetLog SecurityLog), uploads to the Firmware plugin's HTTP and
FTP upload servers, the log downloaded through the operator API, and bad input."""
from __future__ import annotations

import io
from urllib.parse import urlsplit

import pytest
import pytest_twisted
import treq
from conftest import error_of, table_contents
from twisted.internet import reactor, threads

LOG = b"2026-12-01T10:00:00Z security event: SettingSystemTime\n" * 40


async def transfer_tables(csms) -> dict:
    """The security and firmware plugins' rows (the stations' own rows change as they disconnect)."""
    return {name: rows for name, rows in (await table_contents(csms)).items()
            if name.startswith(("security_", "firmware_"))}



async def lsn(station, status, request_id):
    payload = {"status": status} if request_id is None else {"status": status, "requestId": request_id}
    assert await station.call("LogStatusNotification", payload) == {}


async def put(url, data):
    response = await treq.put(url, data=data, reactor=reactor)
    return response.code, await treq.json_content(response)


async def logs_view(csms, station_id):
    status, body, _ = await csms.api("GET", f"/stations/{station_id}/logs")
    assert status == 200, body
    return body


def ftp_upload(location: str, name: str, data: bytes):
    """A real FTP upload with ftplib (blocking: run it in a thread)."""
    import ftplib

    parts = urlsplit(location)
    with ftplib.FTP() as client:
        client.connect(parts.hostname, parts.port, timeout=10)
        client.login(parts.username, parts.password)
        client.storbinary(f"STOR {name}", io.BytesIO(data))


async def get_log(csms, station_id, answer=None, **body):
    station = await csms.connect_booted(station_id)
    station.responses["GetLog"] = answer or {"status": "Accepted", "filename": "security.log"}
    status, response, _ = await csms.api("POST", f"/stations/{station_id}/logs",
                                         json={"log_type": "SecurityLog", **body})
    return station, status, response


# -- OCTT TC_079 -----------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_079_CSMS_get_security_log(csms):
    station, status, body = await get_log(csms, "LOG-79", protocol="http", retries=1, retry_interval=10,
                                          oldest_timestamp="2026-11-01T00:00:00Z")
    assert status == 200, body
    request = await station.wait_for_call("GetLog")
    # OCTT: log.remoteLocation = the configured location; logType = SecurityLog.
    assert request["logType"] == "SecurityLog"
    location = request["log"]["remoteLocation"]
    base = csms.app.pm.get_plugin("firmware").http_base_url()
    assert location.startswith(base + "/diagnostics/")
    assert (request["retries"], request["retryInterval"], request["log"]["oldestTimestamp"]) == \
        (1, 10, "2026-11-01T00:00:00Z")
    assert (body["status"], body["filename"]) == ("Accepted", "security.log")
    row = body["request"]
    assert (row["request_id"], row["answer"], row["filename"], row["status"]) == \
        (request["requestId"], "Accepted", "security.log", "Requested")
    assert "***" in row["location"] and location not in row["location"]  # the secret is not kept

    await lsn(station, "Uploading", request["requestId"])
    code, stored = await put(location + "security.log", LOG)
    assert code == 201, stored
    await lsn(station, "Uploaded", request["requestId"])

    view = await logs_view(csms, "LOG-79")
    assert [(h["status"], h["row_id"]) for h in view["history"]] == [("Uploaded", row["id"]), ("Uploading", row["id"])]
    assert view["requests"][0]["status"] == "Uploaded"
    status, detail, _ = await csms.api("GET", f"/log-requests/{row['id']}")
    assert status == 200
    assert [(f["name"], f["size"], f["via"]) for f in detail["files"]] == [("security.log", len(LOG), "http")]
    assert "path" not in detail["files"][0]
    status, _, response = await csms.api("GET", f"/log-requests/{row['id']}/content")
    assert (status, await treq.content(response)) == (200, LOG)
    # The upload location is the GetLog's, not a diagnostics request of the Firmware plugin.
    assert (await csms.api("GET", "/stations/LOG-79/diagnostics"))[1]["requests"] == []


@pytest_twisted.ensureDeferred
async def test_diagnostics_log_uploaded_over_ftp(csms):
    station, status, body = await get_log(csms, "LOG-FTP", protocol="ftp")
    assert status == 200, body
    request = await station.wait_for_call("GetLog")
    location = request["log"]["remoteLocation"]
    assert location.startswith("ftp://")
    await lsn(station, "Uploading", request["requestId"])
    await threads.deferToThread(ftp_upload, location, "security.log", LOG).addTimeout(30, reactor)
    await lsn(station, "Uploaded", request["requestId"])
    status, _, response = await csms.api("GET", f"/log-requests/{body['request']['id']}/content")
    assert (status, await treq.content(response)) == (200, LOG)


@pytest_twisted.ensureDeferred
async def test_operator_location_is_sent_as_given(csms):
    station, status, body = await get_log(csms, "LOG-OWN", log_type="DiagnosticsLog",
                                          remote_location="ftp://user:pw@logs.example.com/in/")
    assert status == 200, body
    request = await station.wait_for_call("GetLog")
    assert request["logType"] == "DiagnosticsLog"
    assert request["log"] == {"remoteLocation": "ftp://user:pw@logs.example.com/in/"}
    assert body["request"]["upload_id"] is None
    status, err, _ = await csms.api("GET", f"/log-requests/{body['request']['id']}/content")
    assert (status, error_of(err)) == (404, "uploaded_log_of_request_not_found")


# -- refusals and failures: nothing half-written ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_rejected_get_log_withdraws_its_upload_location(csms):
    station, status, body = await get_log(csms, "LOG-REJ", {"status": "Rejected"}, protocol="http")
    assert (status, body["status"], body["request"]["answer"]) == (200, "Rejected", "Rejected")
    location = (await station.wait_for_call("GetLog"))["log"]["remoteLocation"]
    code, refused = await put(location + "late.log", LOG)
    assert (code, error_of(refused)) == (401, "unknown_credentials")


@pytest_twisted.ensureDeferred
async def test_a_call_error_answer_is_recorded_and_withdraws_the_location(csms):
    station, status, body = await get_log(csms, "LOG-ERR", ("CALLERROR", "InternalError"), protocol="http")
    assert (status, error_of(body)) == (502, "station_call_error")
    location = (await station.wait_for_call("GetLog"))["log"]["remoteLocation"]
    [row] = (await logs_view(csms, "LOG-ERR"))["requests"]
    assert (row["answer"], row["call_error"]) == (None, "CALLERROR InternalError")
    code, refused = await put(location + "late.log", LOG)
    assert (code, error_of(refused)) == (401, "unknown_credentials")


@pytest_twisted.ensureDeferred
async def test_get_log_to_an_offline_station_leaves_nothing(csms):
    await (await csms.connect_booted("LOG-OFF")).close()
    before = await transfer_tables(csms)
    status, body, _ = await csms.api("POST", "/stations/LOG-OFF/logs", json={"log_type": "SecurityLog"})
    assert (status, error_of(body)) == (409, "station_offline")
    assert await transfer_tables(csms) == before  # no log request, no upload location left behind


@pytest_twisted.ensureDeferred
async def test_oversize_log_upload_is_refused_and_nothing_stored(csms_factory):
    csms = await csms_factory(config_text="[plugin:firmware]\nmax_diagnostics_size = 1000\n")
    station, status, body = await get_log(csms, "LOG-BIG", protocol="http")
    assert status == 200, body
    request = await station.wait_for_call("GetLog")
    code, refused = await put(request["log"]["remoteLocation"] + "security.log", b"x" * 1001)
    assert (code, error_of(refused)) == (413, "too_large")
    await lsn(station, "UploadFailure", request["requestId"])
    status, detail, _ = await csms.api("GET", f"/log-requests/{body['request']['id']}")
    assert (detail["files"], detail["status"]) == ([], "UploadFailure")
    status, err, _ = await csms.api("GET", f"/log-requests/{body['request']['id']}/content")
    assert (status, error_of(err)) == (404, "uploaded_log_of_request_not_found")
    # The location is still good for one upload within the limit.
    code, stored = await put(request["log"]["remoteLocation"] + "security.log", LOG[:900])
    assert code == 201, stored


@pytest_twisted.ensureDeferred
async def test_log_status_for_an_unknown_request_id_is_kept_unlinked(csms):
    station = await csms.connect_booted("LOG-UNK")
    await lsn(station, "Uploading", 31337)
    await lsn(station, "Idle", None)
    view = await logs_view(csms, "LOG-UNK")
    assert view["requests"] == []
    assert [(h["status"], h["request_id"], h["known_request"]) for h in view["history"]] == \
        [("Idle", None, True), ("Uploading", 31337, False)]


@pytest.mark.parametrize("body, code", [
    ({"log_type": "SecurityLog", "remote_location": "not a url"}, "invalid_location"),
    ({"log_type": "SecurityLog", "remote_location": "ftp://x.example.com/", "protocol": "ftp"},
     "protocol_with_location"),
    ({"log_type": "AuditLog"}, None),
    ({"log_type": "SecurityLog", "request_id": 0}, None),
])
@pytest_twisted.ensureDeferred
async def test_bad_get_log_bodies_are_422_and_nothing_is_sent(csms, body, code):
    station = await csms.connect_booted("LOG-422")
    before = await transfer_tables(csms)
    status, answer, _ = await csms.api("POST", "/stations/LOG-422/logs", json=body)
    assert status == 422, answer
    if code:
        assert error_of(answer) == code
    assert await transfer_tables(csms) == before
    assert [frame for frame in station.received_calls if frame[2] == "GetLog"] == []


@pytest_twisted.ensureDeferred
async def test_unknown_log_request_and_station_are_404(csms):
    status, body, _ = await csms.api("GET", "/log-requests/77")
    assert (status, error_of(body)) == (404, "log_request_not_found")
    status, body, _ = await csms.api("GET", "/log-requests/77/content")
    assert (status, error_of(body)) == (404, "log_request_not_found")
    status, body, _ = await csms.api("POST", "/stations/NOPE/logs", json={"log_type": "SecurityLog"})
    assert (status, error_of(body)) == (404, "station_not_found")


@pytest.mark.parametrize("payload, code", [
    ({"status": "Exploded", "requestId": 1}, "PropertyConstraintViolation"),
    ({"requestId": 1}, "OccurenceConstraintViolation"),
])
@pytest_twisted.ensureDeferred
async def test_malformed_log_status_notification_gets_a_call_error(csms, payload, code):
    station = await csms.connect_booted("LOG-BAD")
    before = await transfer_tables(csms)
    frame = await station.call_frame("LogStatusNotification", payload)
    assert frame[0] == 4 and frame[2] == code, frame
    assert await transfer_tables(csms) == before
