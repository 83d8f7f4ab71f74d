"""Firmware Management profile: OCTT TC_044_x / TC_045_x, firmware hosting and diagnostics uploads."""
from __future__ import annotations

import hashlib
import io
from urllib.parse import urlsplit

import pytest_twisted
import treq
from twisted.internet import reactor, threads

from csms.testing.station import CallErrorFrame

FIRMWARE = bytes(range(256)) * 40  # 10240 bytes


def plugin_of(csms):
    return csms.app.pm.get_plugin("firmware")


async def upload_firmware(csms, name="fw-1.2.3.bin", data=FIRMWARE):
    status, body, _ = await csms.api("POST", f"/firmware-files?name={name}", data=data,
                                     headers={"Content-Type": "application/octet-stream"})
    assert status == 201, body
    return body


async def fsn(station, status):
    assert await station.call("FirmwareStatusNotification", {"status": status}) == {}


async def dsn(station, status):
    assert await station.call("DiagnosticsStatusNotification", {"status": status}) == {}


async def firmware_state(csms, station_id):
    status, body, _ = await csms.api("GET", f"/stations/{station_id}/firmware")
    assert status == 200, body
    return body


def ftp_upload(location: str, name: str, data: bytes, user: str | None = None, password: str | None = None):
    """A real FTP upload with ftplib (blocking: run it in a thread)."""
    import ftplib

    parts = urlsplit(location)
    with ftplib.FTP() as client:
        client.connect(parts.hostname, parts.port, timeout=10)
        client.login(user if user is not None else parts.username,
                     password if password is not None else parts.password)
        client.storbinary(f"STOR {name}", io.BytesIO(data))


def in_thread(f, *args, **kwargs):
    return threads.deferToThread(f, *args, **kwargs).addTimeout(30, reactor)


# -- OCTT 3.15: firmware update ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_044_1_firmware_update_download_and_install(csms):
    hosted = await upload_firmware(csms)
    station = await csms.connect_booted("FW1", connectors=2)

    status, body, _ = await csms.api("POST", "/stations/FW1/firmware-update",
                                     json={"firmware_id": hosted["id"], "retries": 3, "retry_interval": 60})
    assert status == 200, body
    request = await station.wait_for_call("UpdateFirmware")
    url = plugin_of(csms).firmware_url("fw-1.2.3.bin")
    assert request["location"] == url == hosted["url"]
    assert url.startswith("http://127.0.0.1:")
    assert request["retries"] == 3 and request["retryInterval"] == 60
    assert body["update"]["status"] == "Requested"
    assert body["update"]["firmware_file_id"] == hosted["id"]

    await fsn(station, "Downloading")
    rollout = (await csms.api("GET", "/firmware/status"))[1]
    assert [(i["station_id"], i["status"]) for i in rollout["items"]] == [("FW1", "Downloading")]
    # The station downloads the file from the CSMS's file server.
    response = await treq.get(request["location"], reactor=reactor)
    assert response.code == 200
    assert await treq.content(response) == FIRMWARE
    await fsn(station, "Downloaded")
    for connector in (0, 1, 2):
        await station.status(connector, "Unavailable")
    await fsn(station, "Installing")
    await station.call("BootNotification", {"chargePointVendor": "TestVendor", "chargePointModel": "TestModel"})
    for connector in (0, 1, 2):
        await station.status(connector, "Available")
    await fsn(station, "Installed")

    state = await firmware_state(csms, "FW1")
    assert state["status"] == "Installed"
    assert state["current_update"]["status"] == "Installed"
    assert state["current_update"]["location"] == url
    assert [h["status"] for h in state["history"]] == ["Installed", "Installing", "Downloaded", "Downloading"]
    assert {h["request_id"] for h in state["history"]} == {state["current_update"]["id"]}
    rollout = (await csms.api("GET", f"/firmware/status?firmware_id={hosted['id']}"))[1]
    assert rollout["counts"] == {"Installed": 1}
    assert rollout["items"][0]["update"]["id"] == state["current_update"]["id"]


@pytest_twisted.ensureDeferred
async def test_TC_044_2_firmware_update_download_failed(csms):
    station = await csms.connect_booted("FW2")
    location = "https://firmware.example.com/images/fw-9.bin"
    status, body, _ = await csms.api("POST", "/stations/FW2/firmware-update",
                                     json={"location": location, "retrieve_date": "2030-01-01T00:00:00Z"})
    assert status == 200, body
    request = await station.wait_for_call("UpdateFirmware")
    assert request == {"location": location, "retrieveDate": "2030-01-01T00:00:00Z"}
    await fsn(station, "Downloading")
    await fsn(station, "DownloadFailed")

    state = await firmware_state(csms, "FW2")
    assert state["status"] == "DownloadFailed"
    assert state["current_update"]["firmware_file_id"] is None
    assert [h["status"] for h in state["history"]] == ["DownloadFailed", "Downloading"]
    status, rollout, _ = await csms.api("GET", "/firmware/status?failed=true")
    assert [(i["station_id"], i["status"], i["failed"]) for i in rollout["items"]] == \
        [("FW2", "DownloadFailed", True)]
    assert (await csms.api("GET", "/firmware/status?failed=false"))[1]["items"] == []


@pytest_twisted.ensureDeferred
async def test_TC_044_3_firmware_update_installation_failed(csms):
    station = await csms.connect_booted("FW3", connectors=1)
    status, _, _ = await csms.api("POST", "/stations/FW3/firmware-update",
                                  json={"location": "ftp://files.example.com/fw.bin"})
    assert status == 200
    request = await station.wait_for_call("UpdateFirmware")
    assert request["retrieveDate"].endswith("Z")
    await fsn(station, "Downloading")
    await fsn(station, "Downloaded")
    await station.status(0, "Unavailable")
    await station.status(1, "Unavailable")
    await fsn(station, "Installing")
    await station.call("BootNotification", {"chargePointVendor": "TestVendor", "chargePointModel": "TestModel"})
    await station.status(0, "Available")
    await station.status(1, "Available")
    await fsn(station, "InstallationFailed")

    state = await firmware_state(csms, "FW3")
    assert state["status"] == "InstallationFailed"
    assert state["current_update"]["status"] == "InstallationFailed"
    assert [h["status"] for h in state["history"]] == \
        ["InstallationFailed", "Installing", "Downloaded", "Downloading"]
    assert (await csms.api("GET", "/firmware/status?status=InstallationFailed"))[1]["counts"] == \
        {"InstallationFailed": 1}


# -- OCTT 3.16: get diagnostics ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_045_1_get_diagnostics_uploaded_over_ftp(csms):
    station = await csms.connect_booted("DG1")
    station.responses["GetDiagnostics"] = {"fileName": "diag-DG1.log"}
    status, body, _ = await csms.api("POST", "/stations/DG1/diagnostics",
                                     json={"start_time": "2024-01-01T00:00:00Z", "retries": 2})
    assert status == 200, body
    request = await station.wait_for_call("GetDiagnostics")
    location = urlsplit(request["location"])
    assert location.scheme == "ftp" and location.hostname == "127.0.0.1"
    assert location.port == plugin_of(csms).servers.ftp_port.getHost().port
    assert request["startTime"] == "2024-01-01T00:00:00Z" and request["retries"] == 2
    assert body["file_name"] == "diag-DG1.log"
    assert body["request"]["file_name"] == "diag-DG1.log"
    # Only a masked location is kept.
    assert body["request"]["location"] == f"ftp://{location.username}:***@127.0.0.1:{location.port}/"

    await dsn(station, "Uploading")
    log = b"diagnostics line\n" * 500
    await in_thread(ftp_upload, request["location"], "diag-DG1.log", log)
    await dsn(station, "Uploaded")

    status, diag, _ = await csms.api("GET", "/stations/DG1/diagnostics")
    assert diag["status"] == "Uploaded"
    assert [h["status"] for h in diag["history"]] == ["Uploaded", "Uploading"]
    [req] = diag["requests"]
    assert req["status"] == "Uploaded" and req["upload_used_at"] is not None
    [stored] = req["files"]
    assert (stored["name"], stored["size"], stored["via"]) == ("diag-DG1.log", len(log), "ftp")
    assert stored["sha256"] == hashlib.sha256(log).hexdigest()
    status, _, response = await csms.api("GET", f"/diagnostics-files/{stored['id']}/content")
    assert status == 200
    assert await treq.content(response) == log
    listing = (await csms.api("GET", "/diagnostics-files?station_id=DG1"))[1]
    assert [f["id"] for f in listing["items"]] == [stored["id"]]


@pytest_twisted.ensureDeferred
async def test_TC_045_2_get_diagnostics_upload_failed(csms):
    station = await csms.connect_booted("DG2")
    status, body, _ = await csms.api("POST", "/stations/DG2/diagnostics",
                                     json={"location": "ftp://logs.example.com/upload/"})
    assert status == 200, body
    assert (await station.wait_for_call("GetDiagnostics")) == {"location": "ftp://logs.example.com/upload/"}
    await dsn(station, "Uploading")
    await dsn(station, "UploadFailed")
    # The station carries on normally.
    assert "currentTime" in await station.call("Heartbeat", {})

    diag = (await csms.api("GET", "/stations/DG2/diagnostics"))[1]
    assert diag["status"] == "UploadFailed"
    assert [h["status"] for h in diag["history"]] == ["UploadFailed", "Uploading"]
    assert [(r["location"], r["status"], r["files"]) for r in diag["requests"]] == \
        [("ftp://logs.example.com/upload/", "UploadFailed", [])]


# -- firmware hosting ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_firmware_file_upload_records_checksums_and_serves_ranges(csms):
    hosted = await upload_firmware(csms, "image.bin")
    assert hosted["size"] == len(FIRMWARE)
    assert hosted["sha256"] == hashlib.sha256(FIRMWARE).hexdigest()
    assert hosted["md5"] == hashlib.md5(FIRMWARE).hexdigest()
    listing = (await csms.api("GET", "/firmware-files"))[1]
    assert [f["name"] for f in listing["items"]] == ["image.bin"]

    response = await treq.get(hosted["url"], headers={"Range": ["bytes=100-199"]}, reactor=reactor)
    assert response.code == 206
    assert response.headers.getRawHeaders("content-range") == [f"bytes 100-199/{len(FIRMWARE)}"]
    assert await treq.content(response) == FIRMWARE[100:200]
    # Resuming an interrupted download: from an offset to the end.
    response = await treq.get(hosted["url"], headers={"Range": ["bytes=10000-"]}, reactor=reactor)
    assert response.code == 206
    assert await treq.content(response) == FIRMWARE[10000:]


@pytest_twisted.ensureDeferred
async def test_firmware_file_names_cannot_escape_or_repeat(csms):
    base = plugin_of(csms).http_base_url()
    for name in ("..%2Fescape.bin", "%2Fetc%2Fpasswd", ".hidden", "a..b", ""):
        status, body, _ = await csms.api("POST", f"/firmware-files?name={name}", data=b"x")
        assert (status, body["error"]["code"]) == (422, "invalid_file_name"), name
    status, body, _ = await csms.api("POST", "/firmware-files", data=b"x")
    assert (status, body["error"]["code"], body["error"]["details"]) == (
        400, "missing_query_parameter", {"missing": ["name"]})
    await upload_firmware(csms, "same.bin")
    status, body, _ = await csms.api("POST", "/firmware-files?name=same.bin", data=b"other")
    assert (status, body["error"]["code"]) == (409, "firmware_file_exists")
    assert (await treq.get(f"{base}/firmware/same.bin", reactor=reactor)).code == 200
    for path in ("/firmware/", "/firmware/..%2F..%2Fcsms.sqlite", "/firmware/.upload-x", "/nothing"):
        response = await treq.get(base + path, reactor=reactor)
        await treq.content(response)
        assert response.code == 404, path
    files = sorted(p.name for p in __import__("pathlib").Path(plugin_of(csms).firmware_dir).iterdir())
    assert files == ["same.bin"]


@pytest_twisted.ensureDeferred
async def test_firmware_file_too_large_or_empty_is_refused_and_not_stored(csms_factory):
    csms = await csms_factory(config_text="[plugin:firmware]\nmax_firmware_size = 1000\n")
    status, body, _ = await csms.api("POST", "/firmware-files?name=big.bin", data=b"x" * 1001)
    assert (status, body["error"]["code"]) == (413, "body_too_large")
    status, body, _ = await csms.api("POST", "/firmware-files?name=empty.bin", data=b"")
    assert (status, body["error"]["code"]) == (422, "empty_file")
    assert (await csms.api("GET", "/firmware-files"))[1]["total"] == 0
    assert list(__import__("pathlib").Path(plugin_of(csms).firmware_dir).iterdir()) == []
    await upload_firmware(csms, "ok.bin", b"y" * 1000)


@pytest_twisted.ensureDeferred
async def test_firmware_file_delete(csms):
    hosted = await upload_firmware(csms, "old.bin")
    status, _, _ = await csms.api("DELETE", f"/firmware-files/{hosted['id']}")
    assert status == 204
    assert (await csms.api("GET", f"/firmware-files/{hosted['id']}"))[0] == 404
    response = await treq.get(hosted["url"], reactor=reactor)
    await treq.content(response)
    assert response.code == 404


# -- bad input ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unknown_status_is_refused_and_nothing_is_stored(csms):
    from conftest import table_contents

    station = await csms.connect_booted("BAD1")
    before = await table_contents(csms)
    for action in ("FirmwareStatusNotification", "DiagnosticsStatusNotification"):
        try:
            await station.call(action, {"status": "Exploded"})
        except CallErrorFrame as exc:
            assert exc.code == "PropertyConstraintViolation"
        else:
            raise AssertionError(f"{action} with an unknown status was accepted")
    assert await table_contents(csms) == before


@pytest_twisted.ensureDeferred
async def test_firmware_location_that_is_not_a_url_is_refused_and_not_sent(csms):
    station = await csms.connect_booted("BAD2")
    for location in ("not a url", "firmware.bin", "mailto:someone@example.com", "http://", "http://ex ample.com/x"):
        status, body, _ = await csms.api("POST", "/stations/BAD2/firmware-update", json={"location": location})
        assert (status, body["error"]["code"]) == (422, "invalid_location"), location
    status, body, _ = await csms.api("POST", "/stations/BAD2/diagnostics", json={"location": "nowhere"})
    assert (status, body["error"]["code"]) == (422, "invalid_location")
    status, body, _ = await csms.api("POST", "/stations/BAD2/firmware-update",
                                     json={"location": "http://a.example/x", "firmware_id": 1})
    assert (status, body["error"]["code"]) == (422, "location_or_firmware_id")
    status, body, _ = await csms.api("POST", "/stations/BAD2/firmware-update", json={"firmware_id": 99})
    assert (status, body["error"]["code"]) == (404, "firmware_file_not_found")
    # Through the generic endpoint the OCPP schema ("format": "uri") refuses it.
    status, body, _ = await csms.api("POST", "/stations/BAD2/calls/UpdateFirmware",
                                     json={"location": "not a url", "retrieveDate": "2030-01-01T00:00:00Z"})
    assert (status, body["error"]["code"]) == (422, "invalid_ocpp_payload")
    assert [c for c in station.received_calls if c[2] in ("UpdateFirmware", "GetDiagnostics")] == []
    state = await firmware_state(csms, "BAD2")
    assert (state["status"], state["updates"]) == (None, [])


@pytest_twisted.ensureDeferred
async def test_unknown_station_and_offline_station(csms):
    status, body, _ = await csms.api("POST", "/stations/NOPE/firmware-update", json={"location": "http://a.b/c"})
    assert (status, body["error"]["code"]) == (404, "station_not_found")
    station = await csms.connect_booted("OFF1")
    await station.close()
    await csms.app.pm.get_plugin("core").store.db.run(lambda conn: None)
    status, body, _ = await csms.api("POST", "/stations/OFF1/diagnostics", json={"protocol": "http"})
    assert (status, body["error"]["code"]) == (409, "station_offline")
    diag = (await csms.api("GET", "/stations/OFF1/diagnostics"))[1]
    assert diag["requests"] == []  # the unsent request and its credentials are gone
    assert plugin_of(csms).pending_diagnostics == {}


@pytest_twisted.ensureDeferred
async def test_get_diagnostics_refused_by_station_keeps_no_credentials(csms):
    station = await csms.connect_booted("DG3")
    station.responses["GetDiagnostics"] = ("CALLERROR", "InternalError", "disk on fire")
    status, body, _ = await csms.api("POST", "/stations/DG3/diagnostics", json={})
    assert (status, body["error"]["code"]) == (502, "station_call_error")
    request = await station.wait_for_call("GetDiagnostics")
    # Kept (notifications may already be linked to it), marked failed, its credentials expired.
    diag = (await csms.api("GET", "/stations/DG3/diagnostics"))[1]
    assert [(r["status"], r["call_error"], r["upload_expires_at"] is not None) for r in diag["requests"]] == \
        [("CallFailed", "CALLERROR InternalError", True)]
    assert diag["status"] == "CallFailed"
    try:
        await in_thread(ftp_upload, request["location"], "x.log", b"data")
    except Exception as exc:  # ftplib.error_perm
        assert str(exc).startswith("530")
    else:
        raise AssertionError("credentials of a refused GetDiagnostics still work")


# -- generic calls endpoint --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_generic_call_endpoint_is_tracked_too(csms):
    hosted = await upload_firmware(csms, "generic.bin")
    station = await csms.connect_booted("GEN1")
    station.responses["GetDiagnostics"] = {"fileName": "g.tar.gz"}
    status, body, _ = await csms.api("POST", "/stations/GEN1/calls/UpdateFirmware",
                                     json={"location": hosted["url"], "retrieveDate": "2030-01-01T00:00:00Z",
                                           "retries": 1})
    assert (status, body) == (200, {})
    state = await firmware_state(csms, "GEN1")
    update = state["current_update"]
    assert (update["location"], update["firmware_file_id"], update["retries"], update["status"]) == \
        (hosted["url"], hosted["id"], 1, "Requested")
    assert update["retrieve_date"] == "2030-01-01T00:00:00.000Z"

    status, body, _ = await csms.api("POST", "/stations/GEN1/calls/GetDiagnostics",
                                     json={"location": "http://logs.example.com/in/",
                                           "stopTime": "2024-02-01T00:00:00Z"})
    assert (status, body) == (200, {"fileName": "g.tar.gz"})
    diag = (await csms.api("GET", "/stations/GEN1/diagnostics"))[1]
    [req] = diag["requests"]
    assert (req["location"], req["file_name"], req["protocol"], req["stop_time"], req["status"]) == \
        ("http://logs.example.com/in/", "g.tar.gz", "http", "2024-02-01T00:00:00.000Z", "Requested")
    station_view = (await csms.api("GET", "/stations/GEN1"))[1]
    assert (station_view["firmware_status"], station_view["diagnostics_status"]) == ("Requested", "Requested")


# -- diagnostics uploads over HTTP ------------------------------------------------------------------------


async def http_location(csms, station_id):
    station = await csms.connect_booted(station_id)
    station.responses["GetDiagnostics"] = {"fileName": "diag.zip"}
    status, body, _ = await csms.api("POST", f"/stations/{station_id}/diagnostics", json={"protocol": "http"})
    assert status == 200, body
    request = await station.wait_for_call("GetDiagnostics")
    return request["location"], body["request"]["id"]


async def put(url, data, **kwargs):
    response = await treq.put(url, data=data, reactor=reactor, **kwargs)
    return response.code, await treq.json_content(response)


@pytest_twisted.ensureDeferred
async def test_http_put_upload_is_stored_once(csms):
    location, request_id = await http_location(csms, "HT1")
    assert location.startswith(plugin_of(csms).http_base_url() + "/diagnostics/diag")
    data = b"\x00\x01zip" * 1000
    code, body = await put(location + "diag.zip", data)
    assert code == 201, body
    assert (body["name"], body["size"], body["sha256"]) == ("diag.zip", len(data), hashlib.sha256(data).hexdigest())
    # Used up: the same credentials are refused, and the first file stays as it was.
    code, body = await put(location + "again.zip", b"other")
    assert (code, body["error"]["code"]) == (403, "credentials_used")
    req = (await csms.api("GET", f"/diagnostics-requests/{request_id}"))[1]
    assert [(f["name"], f["size"], f["via"]) for f in req["files"]] == [("diag.zip", len(data), "http")]
    status, _, response = await csms.api("GET", f"/diagnostics-files/{req['files'][0]['id']}/content")
    assert (status, await treq.content(response)) == (200, data)


@pytest_twisted.ensureDeferred
async def test_http_multipart_post_upload_with_basic_auth(csms):
    location, request_id = await http_location(csms, "HT2")
    user, secret = location.rstrip("/").rsplit("/", 1)[1].split("-")
    base = plugin_of(csms).http_base_url()
    data = b"log " * 300
    response = await treq.post(f"{base}/diagnostics/", auth=(user, secret), reactor=reactor,
                               files={"file": ("../../etc/evil name.log", "text/plain", io.BytesIO(data))})
    body = await treq.json_content(response)
    assert response.code == 201, body
    # A path in the uploaded name cannot escape the directory.
    assert (body["name"], body["size"]) == ("evil_name.log", len(data))
    req = (await csms.api("GET", f"/diagnostics-requests/{request_id}"))[1]
    assert [f["name"] for f in req["files"]] == ["evil_name.log"]
    stored = __import__("pathlib").Path(plugin_of(csms).diagnostics_dir) / str(request_id) / "evil_name.log"
    assert stored.read_bytes() == data


@pytest_twisted.ensureDeferred
async def test_http_upload_refused_with_wrong_credentials_after_expiry_and_when_too_large(csms_factory):
    csms = await csms_factory(config_text="[plugin:firmware]\nmax_diagnostics_size = 2000\nupload_expiry = 600\n")
    location, request_id = await http_location(csms, "HT3")
    base = plugin_of(csms).http_base_url()
    user = location.rstrip("/").rsplit("/", 1)[1].split("-")[0]

    code, body = await put(f"{base}/diagnostics/{user}-{'0' * 32}/x.log", b"data")
    assert (code, body["error"]["code"]) == (401, "unknown_credentials")
    code, body = await put(f"{base}/diagnostics/x.log", b"data")
    assert (code, body["error"]["code"]) == (401, "unknown_credentials")
    code, body = await put(location + "big.log", b"x" * 2001)
    assert (code, body["error"]["code"]) == (413, "too_large")
    code, body = await put(location + "big.log", b"x" * 70000)  # past the site's buffer limit too
    assert (code, body["error"]["code"]) == (413, "too_large")
    csms.clock.advance(601)
    code, body = await put(location + "late.log", b"data")
    assert (code, body["error"]["code"]) == (403, "credentials_expired")

    req = (await csms.api("GET", f"/diagnostics-requests/{request_id}"))[1]
    assert (req["files"], req["upload_used_at"]) == ([], None)
    leftovers = list(__import__("pathlib").Path(plugin_of(csms).diagnostics_dir).rglob("*"))
    assert leftovers == []


# -- diagnostics uploads over FTP -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ftp_upload_refused_after_use_with_wrong_password_and_after_expiry(csms):
    import ftplib

    station = await csms.connect_booted("FT1")
    await csms.api("POST", "/stations/FT1/diagnostics", json={})
    first = (await station.wait_for_call("GetDiagnostics"))["location"]
    await csms.api("POST", "/stations/FT1/diagnostics", json={})
    second = (await station.wait_for_call("GetDiagnostics"))["location"]
    assert urlsplit(first).username != urlsplit(second).username

    for kwargs in ({"password": "wrong"}, {"user": "nobody"}, {"user": "anonymous", "password": "a@b"}):
        with_error = in_thread(ftp_upload, first, "a.log", b"data", **kwargs)
        try:
            await with_error
        except ftplib.error_perm as exc:
            assert str(exc).startswith("530"), exc
        else:
            raise AssertionError(f"FTP login accepted with {kwargs}")
    await in_thread(ftp_upload, first, "a.log", b"first")
    try:
        await in_thread(ftp_upload, first, "b.log", b"again")
    except ftplib.error_perm as exc:
        assert str(exc).startswith("530"), exc
    else:
        raise AssertionError("used FTP credentials accepted")
    csms.clock.advance(86401)
    try:
        await in_thread(ftp_upload, second, "c.log", b"late")
    except ftplib.error_perm as exc:
        assert str(exc).startswith("530"), exc
    else:
        raise AssertionError("expired FTP credentials accepted")
    files = (await csms.api("GET", "/diagnostics-files?station_id=FT1"))[1]
    assert [(f["name"], f["size"], f["via"]) for f in files["items"]] == [("a.log", 5, "ftp")]


@pytest_twisted.ensureDeferred
async def test_ftp_oversized_upload_is_refused_and_not_stored(csms_factory):
    import ftplib

    csms = await csms_factory(config_text="[plugin:firmware]\nmax_diagnostics_size = 1000\n")
    station = await csms.connect_booted("FT2")
    await csms.api("POST", "/stations/FT2/diagnostics", json={"protocol": "ftp"})
    location = (await station.wait_for_call("GetDiagnostics"))["location"]
    try:
        await in_thread(ftp_upload, location, "big.log", b"x" * 1001)
    except ftplib.error_perm as exc:
        assert str(exc).startswith("552"), exc
    else:
        raise AssertionError("oversized FTP upload accepted")
    assert (await csms.api("GET", "/diagnostics-files"))[1]["total"] == 0
    # Not used up by the refused upload: a proper one still goes through.
    await in_thread(ftp_upload, location, "ok.log", b"x" * 1000)
    assert (await csms.api("GET", "/diagnostics-files"))[1]["total"] == 1


@pytest_twisted.ensureDeferred
async def test_listeners_bind_only_where_configured(csms):
    import ftplib

    servers = plugin_of(csms).servers
    assert servers.http_port.getHost().host == "127.0.0.1"
    assert servers.ftp_port.getHost().host == "127.0.0.1"
    station = await csms.connect_booted("FT3")
    await csms.api("POST", "/stations/FT3/diagnostics", json={"protocol": "ftp"})
    location = urlsplit((await station.wait_for_call("GetDiagnostics"))["location"])

    def passive_and_active():
        with ftplib.FTP() as client:
            client.connect(location.hostname, location.port, timeout=10)
            client.login(location.username, location.password)
            replies = []
            send = client.sendcmd
            client.sendcmd = lambda cmd: replies.append((cmd, send(cmd))) or replies[-1][1]
            listing = []
            client.retrlines("LIST", listing.append)  # PASV, then a real data connection
            passive = ftplib.parse227(dict(replies)["PASV"])
        with ftplib.FTP() as client:
            client.connect(location.hostname, location.port, timeout=10)
            client.login(location.username, location.password)
            try:
                client.sendcmd("PORT 10,9,8,7,4,1")  # FTP bounce: connect to a third host
            except ftplib.error_perm as exc:
                active = str(exc)
            else:
                active = "accepted"
        return listing, passive, active
    listing, (host, port), active = await in_thread(passive_and_active)
    # The passive data port is offered (and bound) on the control connection's address only.
    assert listing == []
    assert host == "127.0.0.1" and port > 0
    assert active.startswith("550")


# -- the profile disabled --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_disabled_profile_answers_not_supported_and_has_no_routes(csms_factory):
    csms = await csms_factory(plugins=["core"])
    station = await csms.connect_booted("NOFW")
    for action, payload in (("FirmwareStatusNotification", {"status": "Idle"}),
                            ("DiagnosticsStatusNotification", {"status": "Idle"})):
        try:
            await station.call(action, payload)
        except CallErrorFrame as exc:
            assert exc.code == "NotSupported"
        else:
            raise AssertionError(f"{action} answered with the profile disabled")
    for method, path in (("POST", "/stations/NOFW/firmware-update"), ("GET", "/firmware/status"),
                         ("GET", "/firmware-files")):
        status, body, _ = await csms.api(method, path, json={} if method == "POST" else None)
        assert (status, body["error"]["code"]) == (404, "route_not_found"), path
    status, body, _ = await csms.api("POST", "/stations/NOFW/calls/UpdateFirmware",
                                     json={"location": "http://a.b/c", "retrieveDate": "2030-01-01T00:00:00Z"})
    assert (status, body["error"]["code"]) == (404, "action_unavailable")
    assert csms.app.pm.get_plugin("firmware") is None


@pytest_twisted.ensureDeferred
async def test_idle_notification_keeps_the_update_outcome(csms):
    station = await csms.connect_booted("IDLE1")
    await csms.api("POST", "/stations/IDLE1/firmware-update", json={"location": "http://a.example/f.bin"})
    await fsn(station, "Installed")
    await fsn(station, "Idle")  # e.g. answering TriggerMessage (TC_054)
    state = await firmware_state(csms, "IDLE1")
    assert (state["status"], state["current_update"]["status"]) == ("Idle", "Installed")
    assert [h["status"] for h in state["history"]] == ["Idle", "Installed"]





# -- files change after the commit, never inside a database function (issue 13) ---------------------------


def transiently_failing(csms, monkeypatch, descs: tuple, failures: int = 1):
    """Make the database functions named ``descs`` raise a transient error after doing their work,
    ``failures`` times (csms.db then reruns them in a fresh transaction, up to MAX_ATTEMPTS times)."""
    from sqlalchemy.exc import OperationalError

    run = csms.app.db.run

    def run_flaky(thd, *args, desc: str = "", **kwargs):
        if desc not in descs:
            return run(thd, *args, desc=desc, **kwargs)
        attempts = []

        def thd_then_fail(conn, *thd_args, **thd_kwargs):
            result = thd(conn, *thd_args, **thd_kwargs)
            attempts.append(desc)
            if len(attempts) <= failures:
                raise OperationalError("COMMIT", {}, Exception("database is locked"))
            return result
        return run(thd_then_fail, *args, desc=desc, **kwargs)
    monkeypatch.setattr(csms.app.db, "run", run_flaky)


def files_under(directory) -> list[str]:
    """Every file below ``directory`` (hidden temporary ones included), as relative paths."""
    import pathlib

    root = pathlib.Path(directory)
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


@pytest_twisted.ensureDeferred
async def test_no_file_is_moved_or_removed_on_the_database_pool(csms, monkeypatch):
    import os
    import threading

    calls = []
    for name in ("replace", "rename", "remove", "unlink", "makedirs"):
        original = getattr(os, name)

        def recording(*args, _name=name, _original=original, **kwargs):
            calls.append((_name, threading.current_thread().name))
            return _original(*args, **kwargs)
        monkeypatch.setattr(os, name, recording)

    hosted = await upload_firmware(csms, "moved.bin")
    assert (await csms.api("DELETE", f"/firmware-files/{hosted['id']}"))[0] == 204
    location, _ = await http_location(csms, "FX1")
    code, body = await put(location + "diag.zip", b"zip" * 100)
    assert code == 201, body

    assert {name for name, _ in calls} >= {"replace", "unlink", "makedirs"}
    assert [(name, thread) for name, thread in calls if "csms-db" in thread] == []


@pytest_twisted.ensureDeferred
async def test_a_rerun_database_function_stores_each_file_once(csms, monkeypatch):
    transiently_failing(csms, monkeypatch, ("firmware_add_file", "firmware_claim_upload"))
    hosted = await upload_firmware(csms, "rerun.bin")
    assert files_under(plugin_of(csms).firmware_dir) == ["rerun.bin"]
    response = await treq.get(hosted["url"], reactor=reactor)
    assert (response.code, await treq.content(response)) == (200, FIRMWARE)

    location, request_id = await http_location(csms, "FX2")
    code, body = await put(location + "diag.zip", b"zip" * 100)
    assert code == 201, body
    assert files_under(plugin_of(csms).diagnostics_dir) == [f"{request_id}/diag.zip"]
    req = (await csms.api("GET", f"/diagnostics-requests/{request_id}"))[1]
    assert [(f["name"], f["size"]) for f in req["files"]] == [("diag.zip", 300)]


@pytest_twisted.ensureDeferred
async def test_a_deletion_that_never_commits_keeps_the_file(csms, monkeypatch):
    from csms.db import MAX_ATTEMPTS

    hosted = await upload_firmware(csms, "kept.bin")
    transiently_failing(csms, monkeypatch, ("firmware_delete_file",), failures=MAX_ATTEMPTS)
    status, body, _ = await csms.api("DELETE", f"/firmware-files/{hosted['id']}")
    assert (status, body["error"]["code"]) == (500, "internal_error")
    assert (await csms.api("GET", f"/firmware-files/{hosted['id']}"))[0] == 200
    assert files_under(plugin_of(csms).firmware_dir) == ["kept.bin"]


@pytest_twisted.ensureDeferred
async def test_a_file_that_cannot_be_put_in_place_leaves_no_row_and_no_file(csms, monkeypatch):
    import os

    original_replace = os.replace

    def full_disk(source, target):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", full_disk)
    status, body, _ = await csms.api("POST", "/firmware-files?name=nowhere.bin", data=FIRMWARE)
    assert (status, body["error"]["code"]) == (500, "internal_error")
    assert (await csms.api("GET", "/firmware-files"))[1]["total"] == 0

    location, request_id = await http_location(csms, "FX3")
    code, body = await put(location + "diag.zip", b"zip")
    assert code == 500, body
    req = (await csms.api("GET", f"/diagnostics-requests/{request_id}"))[1]
    assert (req["files"], req["upload_used_at"]) == ([], None)  # the credentials were given back
    assert files_under(plugin_of(csms).firmware_dir) == files_under(plugin_of(csms).diagnostics_dir) == []

    monkeypatch.setattr(os, "replace", original_replace)
    code, body = await put(location + "diag.zip", b"zip")
    assert code == 201, body


@pytest_twisted.ensureDeferred
async def test_uploads_a_crash_interrupted_are_removed_at_start_up(csms_factory, tmp_path):
    firmware_dir, diagnostics_dir = tmp_path / "fw", tmp_path / "diag"
    for directory in (firmware_dir, diagnostics_dir / "7"):
        directory.mkdir(parents=True)
    (firmware_dir / ".upload-abc123").write_bytes(b"half an image")
    (firmware_dir / "by-hand.bin").write_bytes(b"an operator's file")
    (diagnostics_dir / ".upload-def456").write_bytes(b"half a log")
    (diagnostics_dir / "7" / "diag.zip").write_bytes(b"a stored upload")
    await csms_factory(config_text=f"[plugin:firmware]\nfirmware_dir = {firmware_dir}\n"
                                   f"diagnostics_dir = {diagnostics_dir}\n")
    assert files_under(firmware_dir) == ["by-hand.bin"]
    assert files_under(diagnostics_dir) == ["7/diag.zip"]


@pytest_twisted.ensureDeferred
async def test_directories_are_prepared_when_the_csms_starts_never_when_it_is_only_configured(csms_factory, tmp_path):
    """csms-admin configures every plugin to read their migration histories, beside a CSMS that may be
    serving: configuring creates no directory and removes no file (a hidden one may be an upload in
    progress); starting creates the directories and removes what a crash left."""
    from csms.app import CentralSystem
    from csms.config import load_config

    firmware_dir, diagnostics_dir = tmp_path / "new" / "fw", tmp_path / "diag"
    diagnostics_dir.mkdir()
    (diagnostics_dir / ".upload-def456").write_bytes(b"half a log")
    config_text = f"[plugin:firmware]\nfirmware_dir = {firmware_dir}\ndiagnostics_dir = {diagnostics_dir}\n"
    CentralSystem(load_config(text=f"[database]\nurl = sqlite://\n[plugins]\nenabled = core, firmware\n"
                                   + config_text))
    assert not (tmp_path / "new").exists()
    assert files_under(diagnostics_dir) == [".upload-def456"]

    await csms_factory(config_text=config_text)
    assert firmware_dir.is_dir() and files_under(firmware_dir) == []
    assert files_under(diagnostics_dir) == []
