"""Hardening of the Firmware Management profile (issue 12).

* The station-facing firmware server answers any Range header (RFC 9110 §14) with a bounded response:
  a bounded number of ranges, overlapping and adjacent ranges merged, invalid headers ignored,
  unsatisfiable ones 416. Every request goes over a real loopback socket with treq.
* UpdateFirmware / GetDiagnostics are current from the moment they are sent, so notifications a
  station sends before its answer (OCPP-J allows it) are linked to them.
"""
from __future__ import annotations

import email
import json

from urllib.parse import urlsplit

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.http_headers import Headers

from conftest import within
from test_firmware import FIRMWARE, dsn, firmware_state, fsn, plugin_of, upload_firmware

SIZE = len(FIRMWARE)


async def fetch(url, method="GET", **headers):
    """(status, headers, body) of one request to the file server; headers given as keyword arguments.

    Twisted's own Agent, not treq: treq's gzip decoding rewrites Content-Length and Content-Encoding.
    """
    raw = Headers({name.replace("_", "-"): [value] for name, value in headers.items()})
    response = await Agent(reactor).request(method.encode(), url.encode(), raw)
    body = await treq.content(response)
    if response.length is not UNKNOWN_LENGTH:  # the Agent takes Content-Length out of the headers
        response.headers.setRawHeaders(b"content-length", [b"%d" % response.length])
    return response.code, response.headers, body


class _RawExchange(Protocol):
    def __init__(self, request: bytes):
        self.request = request
        self.received = b""
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.done.callback(self.received)


async def raw_response(url: str, request: bytes) -> tuple[bytes, bytes]:
    """(head, body) of the answer to bytes written on a raw socket, read until the server closes."""
    parts = urlsplit(url)
    exchange = _RawExchange(request)
    await connectProtocol(TCP4ClientEndpoint(reactor, parts.hostname, parts.port), exchange)
    answer = await within(exchange.done)
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


def header(headers, name):
    values = headers.getRawHeaders(name.encode())
    return values[0] if values else None


async def hosted_url(csms, name="image.bin"):
    return (await upload_firmware(csms, name))["url"]


def byteranges(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """The parts of a multipart/byteranges body: (Content-Range, data) each, in order."""
    message = email.message_from_bytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    assert message.is_multipart()
    return [(part["Content-Range"], part.get_payload(decode=True)) for part in message.get_payload()]


# -- Range on the firmware server -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_thousand_repeated_ranges_get_the_file_once(csms):
    url = await hosted_url(csms)
    ranges = "bytes=" + ",".join(["0-"] * 1000)
    assert 2900 < len(ranges) < 3100  # the 3 KB request of the report
    status, headers, body = await fetch(url, Range=ranges)
    # More ranges than a client needs: the header is ignored (RFC 9110 §14.2) and the file is sent once.
    assert status == 200
    assert body == FIRMWARE
    assert header(headers, "content-length") == str(SIZE).encode()


@pytest_twisted.ensureDeferred
async def test_too_many_ranges_as_configured_are_ignored(csms_factory):
    csms = await csms_factory(config_text="[plugin:firmware]\nmax_ranges = 2\n")
    url = await hosted_url(csms)
    status, _, body = await fetch(url, Range="bytes=0-0,2-2,4-4")
    assert (status, body) == (200, FIRMWARE)
    status, headers, body = await fetch(url, Range="bytes=0-0,2-2")
    assert status == 206
    assert byteranges(header(headers, "content-type").decode(), body) == \
        [(f"bytes 0-0/{SIZE}", FIRMWARE[0:1]), (f"bytes 2-2/{SIZE}", FIRMWARE[2:3])]


@pytest.mark.parametrize("suffix", [99999999, SIZE, SIZE + 1])
@pytest_twisted.ensureDeferred
async def test_suffix_range_at_least_as_long_as_the_file_is_the_whole_file(csms, suffix):
    url = await hosted_url(csms)
    status, headers, body = await fetch(url, Range=f"bytes=-{suffix}")
    assert status == 206
    assert header(headers, "content-range") == f"bytes 0-{SIZE - 1}/{SIZE}".encode()
    assert body == FIRMWARE


@pytest.mark.parametrize("value", ["bytes=", "bytes=,", "bytes= , ", "bytes=5-1", "bytes=abc", "bytes=1-2-3",
                                   "bytes=--5", "bytes=+1-2", "bytes=0x1-2", "bytes 0-1", "bytes=0-1;x",
                                   "items=0-1", "=0-1", "bytes=0-1,,junk", "bytes=" + "9" * 5000])
@pytest_twisted.ensureDeferred
async def test_syntactically_invalid_range_is_ignored(csms, value):
    url = await hosted_url(csms)
    status, headers, body = await fetch(url, Range=value)
    assert status == 200
    assert body == FIRMWARE
    assert header(headers, "content-range") is None


@pytest.mark.parametrize("value", [f"bytes={SIZE}-", f"bytes={SIZE}-{SIZE + 10}", "bytes=-0",
                                   "bytes=99999999999999999999999-", "bytes=" + "9" * 5000 + "-",
                                   f"bytes={SIZE + 5}-,-0"])
@pytest_twisted.ensureDeferred
async def test_unsatisfiable_range_answers_416(csms, value):
    url = await hosted_url(csms)
    status, headers, body = await fetch(url, Range=value)
    assert status == 416
    assert header(headers, "content-range") == f"bytes */{SIZE}".encode()
    assert json.loads(body)["error"] == {"status": 416, "code": "range_not_satisfiable",
                                         "message": f"No requested range is within the file's {SIZE} bytes"}


@pytest_twisted.ensureDeferred
async def test_single_ranges(csms):
    url = await hosted_url(csms)
    for value, first, last in (("bytes=100-199", 100, 199), ("bytes=10000-", 10000, SIZE - 1),
                               ("bytes=10000-99999999", 10000, SIZE - 1), ("bytes=-40", SIZE - 40, SIZE - 1),
                               ("BYTES = 0-0", None, None), ("bytes=0-0", 0, 0),
                               (" bytes=7-8 ", 7, 8), (f"bytes={SIZE - 1}-", SIZE - 1, SIZE - 1),
                               (f"bytes=,5-6,{SIZE + 1}-", 5, 6), ("bytes=0-" + "9" * 5000, 0, SIZE - 1)):
        status, headers, body = await fetch(url, Range=value)
        if first is None:  # "BYTES = 0-0": whitespace before "=" is not the grammar: ignored
            assert (status, body) == (200, FIRMWARE), value
            continue
        assert status == 206, value
        assert header(headers, "content-range") == f"bytes {first}-{last}/{SIZE}".encode(), value
        assert header(headers, "content-length") == str(last - first + 1).encode(), value
        assert body == FIRMWARE[first:last + 1], value


@pytest_twisted.ensureDeferred
async def test_overlapping_and_adjacent_ranges_are_merged(csms):
    url = await hosted_url(csms)
    for value, first, last in (("bytes=0-99,50-149,150-199", 0, 199), ("bytes=0-,0-,0-", 0, SIZE - 1),
                               ("bytes=300-399,100-299", 100, 399), ("bytes=-100,0-", 0, SIZE - 1),
                               ("bytes=10-20,12-15", 10, 20)):
        status, headers, body = await fetch(url, Range=value)
        assert status == 206, value
        assert header(headers, "content-range") == f"bytes {first}-{last}/{SIZE}".encode(), value
        assert body == FIRMWARE[first:last + 1], value


@pytest_twisted.ensureDeferred
async def test_multiple_ranges_are_multipart_byteranges_in_request_order(csms):
    url = await hosted_url(csms)
    status, headers, body = await fetch(url, Range="bytes=5000-5099, 0-9,20-29,25-39,-10")
    assert status == 206
    content_type = header(headers, "content-type").decode()
    assert content_type.startswith("multipart/byteranges; boundary=")
    assert header(headers, "content-length") == str(len(body)).encode()
    # RFC 9110 §14.6: parts in the order the ranges were asked for, merged ones where the first of them was.
    assert byteranges(content_type, body) == [
        (f"bytes 5000-5099/{SIZE}", FIRMWARE[5000:5100]),
        (f"bytes 0-9/{SIZE}", FIRMWARE[0:10]),
        (f"bytes 20-39/{SIZE}", FIRMWARE[20:40]),
        (f"bytes {SIZE - 10}-{SIZE - 1}/{SIZE}", FIRMWARE[-10:]),
    ]
    # Bounded: the parts and their headers, nothing more.
    assert len(body) < 5 * 200 + 100 + 10 + 20 + 10


@pytest_twisted.ensureDeferred
async def test_files_larger_than_a_chunk_are_streamed_whole(csms):
    from csms_plugins.firmware.http import _FileParts

    data = bytes(range(251)) * 1200  # 301,200 bytes: several chunks; 251 is prime, so chunks differ
    assert len(data) > 4 * _FileParts.chunk_size
    url = (await upload_firmware(csms, "large.bin", data))["url"]
    assert (await fetch(url))[::2] == (200, data)
    status, headers, body = await fetch(url, Range="bytes=60000-140000")
    assert (status, body) == (206, data[60000:140001])
    status, headers, body = await fetch(url, Range="bytes=1-65537,-70000")
    assert byteranges(header(headers, "content-type").decode(), body) == \
        [(f"bytes 1-65537/{len(data)}", data[1:65538]), (f"bytes {len(data) - 70000}-{len(data) - 1}/{len(data)}",
                                                          data[-70000:])]


@pytest_twisted.ensureDeferred
async def test_head_gives_the_headers_of_a_full_get(csms):
    url = await hosted_url(csms)
    _, get_headers, _ = await fetch(url)
    assert header(get_headers, "accept-ranges") == b"bytes"
    assert header(get_headers, "content-type") == b"application/octet-stream"
    path = urlsplit(url).path.encode()
    for extra in (b"", b"Range: bytes=0-9\r\n"):  # Range is for GET only (RFC 9110 §14.2)
        # A raw socket: HTTP clients hide a HEAD answer's Content-Length.
        head, body = await raw_response(url, b"HEAD %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%s\r\n"
                                        % (path, extra))
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = Headers()
        for line in lines:
            name, _, value = line.partition(":")
            headers.addRawHeader(name.strip(), value.strip())
        assert (status_line, body) == ("HTTP/1.1 200 OK", b"")
        assert header(headers, "content-length") == str(SIZE).encode()
        for name in ("accept-ranges", "etag", "last-modified", "content-type"):
            assert header(headers, name) == header(get_headers, name), name


@pytest_twisted.ensureDeferred
async def test_validators_for_resuming_and_caching(csms):
    url = await hosted_url(csms)
    _, headers, _ = await fetch(url)
    etag, modified = header(headers, "etag").decode(), header(headers, "last-modified").decode()
    assert etag.startswith('"') and etag.endswith('"')
    # If-Range: the range only while the file is the one the client has part of.
    assert (await fetch(url, Range="bytes=0-9", If_Range=etag))[0] == 206
    assert (await fetch(url, Range="bytes=0-9", If_Range=modified))[0] == 206
    for stale in ('"other"', "W/" + etag, "Thu, 01 Jan 1970 00:00:00 GMT", "garbage"):
        status, _, body = await fetch(url, Range="bytes=0-9", If_Range=stale)
        assert (status, body) == (200, FIRMWARE), stale
    # Conditional GET.
    assert (await fetch(url, If_None_Match=f'"x", {etag}'))[:3:2] == (304, b"")
    assert (await fetch(url, If_None_Match='"x"'))[0] == 200
    assert (await fetch(url, If_Modified_Since=modified))[:3:2] == (304, b"")
    assert (await fetch(url, If_Modified_Since="Thu, 01 Jan 1970 00:00:00 GMT"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_other_methods_and_paths_below_a_file(csms):
    url = await hosted_url(csms)
    status, headers, body = await fetch(url, method="POST")
    assert status == 405
    assert header(headers, "allow") == b"GET, HEAD"
    assert json.loads(body)["error"]["code"] == "method_not_allowed"
    status, _, body = await fetch(url + "/more")
    assert (status, json.loads(body)["error"]["code"]) == (404, "not_found")


# -- notifications a station sends before it answers the call -----------------------------------------


def answer_later(station, action: str) -> None:
    """The station will not answer ``action`` by itself: the test answers with :func:`answer`."""
    station.responses[action] = None


async def call_received(station, action: str) -> tuple[str, dict]:
    """(unique id, payload) of the next ``action`` CALL the station received."""
    payload = await station.wait_for_call(action)
    [frame] = [f for f in station.received_calls if f[2] == action and f[3] is payload]
    return frame[1], payload


def answer(station, unique_id: str, payload: dict | None = None, error: str | None = None) -> None:
    if error is None:
        station.send_frame([3, unique_id, payload or {}])
    else:
        station.send_frame([4, unique_id, error, "", {}])


def api_in_background(csms, method, path, json=None):
    """An operator request that is answered only once the station answers its call."""
    return defer.ensureDeferred(csms.api(method, path, json=json))


async def diagnostics_view(csms, station_id):
    status, body, _ = await csms.api("GET", f"/stations/{station_id}/diagnostics")
    assert status == 200, body
    return body


@pytest_twisted.ensureDeferred
async def test_diagnostics_notifications_and_upload_before_the_answer_are_linked(csms):
    station = await csms.connect_booted("EARLY1")
    answer_later(station, "GetDiagnostics")
    sent = api_in_background(csms, "POST", "/stations/EARLY1/diagnostics", json={"protocol": "http"})
    unique_id, request = await call_received(station, "GetDiagnostics")
    await dsn(station, "Uploading")
    data = b"diagnostics " * 100
    response = await treq.put(request["location"] + "diag.log", data=data, reactor=reactor)
    assert response.code == 201, await treq.content(response)
    await dsn(station, "Uploaded")
    answer(station, unique_id, {"fileName": "diag.log"})

    status, body, _ = await within(sent)
    assert status == 200, body
    linked = body["request"]
    assert (linked["status"], linked["file_name"], linked["call_error"]) == ("Uploaded", "diag.log", None)
    assert [(f["name"], f["size"]) for f in linked["files"]] == [("diag.log", len(data))]
    view = await diagnostics_view(csms, "EARLY1")
    assert (view["status"], view["current_request_id"]) == ("Uploaded", linked["id"])
    assert [(h["status"], h["request_id"]) for h in view["history"]] == \
        [("Uploaded", linked["id"]), ("Uploading", linked["id"])]


@pytest_twisted.ensureDeferred
async def test_diagnostics_notifications_before_the_answer_of_a_generic_call_are_linked(csms):
    station = await csms.connect_booted("EARLY2")
    answer_later(station, "GetDiagnostics")
    sent = api_in_background(csms, "POST", "/stations/EARLY2/calls/GetDiagnostics",
                             json={"location": "ftp://logs.example.com/in/"})
    unique_id, _ = await call_received(station, "GetDiagnostics")
    await dsn(station, "Uploading")
    await dsn(station, "Uploaded")
    answer(station, unique_id, {"fileName": "g.tar.gz"})
    assert (await within(sent))[:2] == (200, {"fileName": "g.tar.gz"})

    view = await diagnostics_view(csms, "EARLY2")
    [linked] = view["requests"]
    assert (linked["location"], linked["status"], linked["file_name"]) == \
        ("ftp://logs.example.com/in/", "Uploaded", "g.tar.gz")
    assert {h["request_id"] for h in view["history"]} == {linked["id"]}


@pytest_twisted.ensureDeferred
async def test_firmware_notification_before_the_answer_is_linked(csms):
    hosted = await upload_firmware(csms, "early.bin")
    station = await csms.connect_booted("EARLY3")
    answer_later(station, "UpdateFirmware")
    sent = api_in_background(csms, "POST", "/stations/EARLY3/firmware-update", json={"firmware_id": hosted["id"]})
    unique_id, _ = await call_received(station, "UpdateFirmware")
    await fsn(station, "Downloading")
    answer(station, unique_id)

    status, body, _ = await within(sent)
    assert status == 200, body
    update = body["update"]
    assert (update["status"], update["firmware_file_id"], update["call_error"]) == \
        ("Downloading", hosted["id"], None)
    for status in ("Downloaded", "Installing", "Installed"):
        await fsn(station, status)
    state = await firmware_state(csms, "EARLY3")
    assert (state["status"], state["current_update"]["id"], state["current_update"]["status"]) == \
        ("Installed", update["id"], "Installed")
    assert [(h["status"], h["request_id"]) for h in reversed(state["history"])] == \
        [(s, update["id"]) for s in ("Downloading", "Downloaded", "Installing", "Installed")]


@pytest_twisted.ensureDeferred
async def test_failed_calls_keep_the_notifications_already_linked(csms):
    station = await csms.connect_booted("EARLY4")
    # CALLERROR after an Uploading.
    answer_later(station, "GetDiagnostics")
    sent = api_in_background(csms, "POST", "/stations/EARLY4/calls/GetDiagnostics",
                             json={"location": "ftp://logs.example.com/in/"})
    unique_id, _ = await call_received(station, "GetDiagnostics")
    await dsn(station, "Uploading")
    answer(station, unique_id, error="InternalError")
    status, body, _ = await within(sent)
    assert (status, body["error"]["code"]) == (502, "station_call_error")
    view = await diagnostics_view(csms, "EARLY4")
    [failed] = view["requests"]
    assert (failed["status"], failed["call_error"]) == ("Uploading", "CALLERROR InternalError")
    assert [(h["status"], h["request_id"]) for h in view["history"]] == [("Uploading", failed["id"])]

    # No answer in time after a Downloading.
    answer_later(station, "UpdateFirmware")
    sent = api_in_background(csms, "POST", "/stations/EARLY4/firmware-update",
                             json={"location": "http://files.example.com/fw.bin"})
    await call_received(station, "UpdateFirmware")
    await fsn(station, "Downloading")
    csms.clock.advance(csms.app.config.ocpp.response_timeout)
    status, body, _ = await within(sent)
    assert (status, body["error"]["code"]) == (504, "station_timeout")
    state = await firmware_state(csms, "EARLY4")
    timed_out = state["current_update"]
    assert (state["status"], timed_out["status"], timed_out["call_error"]) == ("Downloading", "Downloading",
                                                                               "timeout")
    assert [(h["status"], h["request_id"]) for h in state["history"]] == [("Downloading", timed_out["id"])]

    # The station goes away after a Downloading, before it answers.
    sent = api_in_background(csms, "POST", "/stations/EARLY4/firmware-update",
                             json={"location": "http://files.example.com/fw2.bin"})
    await call_received(station, "UpdateFirmware")
    await fsn(station, "Downloading")
    await station.close()
    status, body, _ = await within(sent)
    assert (status, body["error"]["code"]) == (409, "station_offline")
    state = await firmware_state(csms, "EARLY4")
    gone = state["current_update"]
    assert gone["id"] != timed_out["id"]
    assert (gone["status"], gone["call_error"]) == ("Downloading", "offline")
    assert [h["request_id"] for h in state["history"]] == [gone["id"], timed_out["id"]]


@pytest_twisted.ensureDeferred
async def test_a_failed_call_without_notifications_is_call_failed_not_requested(csms):
    station = await csms.connect_booted("EARLY5")
    station.responses["UpdateFirmware"] = ("CALLERROR", "NotSupported", "no updates here")
    status, body, _ = await csms.api("POST", "/stations/EARLY5/firmware-update",
                                     json={"location": "http://files.example.com/fw.bin"})
    assert (status, body["error"]["code"]) == (502, "station_call_error")
    state = await firmware_state(csms, "EARLY5")
    assert (state["status"], state["current_update"]["status"], state["current_update"]["call_error"]) == \
        ("CallFailed", "CallFailed", "CALLERROR NotSupported")
    rollout = (await csms.api("GET", "/firmware/status?failed=true"))[1]
    assert [(i["station_id"], i["status"], i["failed"]) for i in rollout["items"]] == \
        [("EARLY5", "CallFailed", True)]
    # A status the station reports later still counts (it acted on the update after all).
    await fsn(station, "Downloading")
    state = await firmware_state(csms, "EARLY5")
    assert (state["status"], state["current_update"]["status"]) == ("Downloading", "Downloading")


@pytest.mark.parametrize("value, message", [("0", "max_ranges must be positive"), ("many", "'many' is not a valid int")])
def test_max_ranges_must_be_a_positive_integer(tmp_path, value, message):
    from csms.app import CentralSystem
    from csms.config import ConfigError, load_config

    config = load_config(text=f"[plugins]\nenabled = core, firmware\n[database]\nurl = sqlite:///{tmp_path}/db\n"
                              f"[plugin:firmware]\nfirmware_dir = {tmp_path}/fw\ndiagnostics_dir = {tmp_path}/dg\n"
                              f"max_ranges = {value}\n")
    with pytest.raises(ConfigError, match=message):
        CentralSystem(config)


# -- the file system off the reactor thread ----------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_files_are_opened_and_read_on_the_thread_pool_never_on_the_reactor_thread(csms, monkeypatch):
    """A cold disk or a slow mount delays a download, never the OCPP traffic on the reactor thread."""
    import os
    import threading

    from csms_plugins.firmware import http as file_server

    data = bytes(range(256)) * 1024  # 262,144 bytes: four chunks
    url = (await upload_firmware(csms, "pooled.bin", data))["url"]
    touched = []
    open_regular, pread = file_server._open_regular, os.pread

    def recording_open(path):
        touched.append(("open", threading.current_thread()))
        return open_regular(path)

    def recording_pread(fd, length, offset):
        touched.append(("read", threading.current_thread()))
        return pread(fd, length, offset)
    monkeypatch.setattr(file_server, "_open_regular", recording_open)
    monkeypatch.setattr(os, "pread", recording_pread)
    assert (await fetch(url))[::2] == (200, data)
    status, _, body = await fetch(url, Range="bytes=70000-70009,200000-200009")
    assert status == 206 and body.count(data[70000:70010]) == 1
    assert [kind for kind, _ in touched].count("open") == 2 and [kind for kind, _ in touched].count("read") >= 6
    assert all(thread is not threading.main_thread() for _, thread in touched)


@pytest_twisted.ensureDeferred
async def test_a_directory_under_the_firmware_directory_is_not_found(csms):
    import os

    base = plugin_of(csms).http_base_url()
    os.mkdir(os.path.join(plugin_of(csms).firmware_dir, "folder.bin"))
    for method in ("GET", "HEAD"):
        status, _, body = await fetch(f"{base}/firmware/folder.bin", method=method)
        assert status == 404
    assert json.loads((await fetch(f"{base}/firmware/folder.bin"))[2])["error"]["code"] == "not_found"


@pytest_twisted.ensureDeferred
async def test_a_download_abandoned_half_way_closes_its_file(csms, monkeypatch):
    """A client stops reading, then goes away with most of the file unsent: the producer stops, and the
    file it had open is closed, so abandoned downloads leak no descriptor (both ways a producer can be
    stopped: test_a_stopped_producer_closes_its_file_once_no_read_is_in_flight)."""
    from csms_plugins.firmware import http as file_server

    data = b"z" * (16 * 1024 * 1024)  # far more than the sockets' buffers and the server's take at once
    url = (await upload_firmware(csms, "abandoned.bin", data))["url"]
    closed = defer.Deferred()
    open_regular = file_server._open_regular

    class Watched:
        def __init__(self, file):
            self.file, self.name = file, file.name

        def fileno(self):
            return self.file.fileno()

        def close(self):
            self.file.close()
            reactor.callFromThread(lambda: closed.called or closed.callback(None))

    def watched_open(path):
        opened = open_regular(path)
        return None if opened is None else (Watched(opened[0]), opened[1])
    monkeypatch.setattr(file_server, "_open_regular", watched_open)

    class Stalled(Protocol):
        def __init__(self):
            self.first = defer.Deferred()

        def connectionMade(self):
            self.transport.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % urlsplit(url).path.encode())

        def dataReceived(self, received):
            if not self.first.called:
                self.transport.pauseProducing()  # reads no more: the server's socket fills up
                self.first.callback(None)
    parts = urlsplit(url)
    client = Stalled()
    await connectProtocol(TCP4ClientEndpoint(reactor, parts.hostname, parts.port), client)
    await within(client.first)
    client.transport.abortConnection()
    await within(closed)
    assert (await fetch(url))[::2] == (200, data)  # the server goes on serving


class _PoolByHand:
    """A reactor whose thread pool runs each task when the test says (``run_next``), on the test's thread."""

    def __init__(self):
        self.tasks = []

    def getThreadPool(self):
        return self

    def callInThreadWithCallback(self, on_result, f, *args):
        self.tasks.append((on_result, f, args))

    def callFromThread(self, f, *args):
        f(*args)

    def run_next(self):
        on_result, f, args = self.tasks.pop(0)
        on_result(True, f(*args))


class _Request:
    def __init__(self, pause_after_writes=None):
        self.written, self.producer, self.finished, self.lost = [], None, False, False
        self.pause_after_writes = pause_after_writes

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def write(self, data):
        self.written.append(data)
        if len(self.written) == self.pause_after_writes:
            self.producer.pauseProducing()

    def finish(self):
        self.finished = True

    def loseConnection(self):
        self.lost = True


@pytest.mark.parametrize("read_in_flight", [False, True], ids=["paused", "reading"])
def test_a_stopped_producer_closes_its_file_once_no_read_is_in_flight(tmp_path, read_in_flight):
    """Stopped while paused, it closes the file at once; stopped with a read on the pool, it closes it when
    the read is back: never while a thread may still read from its descriptor (which could be reused)."""
    from csms_plugins.firmware.http import _FileParts

    path = tmp_path / "image.bin"
    path.write_bytes(b"x" * (3 * _FileParts.chunk_size))
    pool, request = _PoolByHand(), _Request(pause_after_writes=1)
    file = open(path, "rb")  # noqa: SIM115 - the producer closes it
    producer = _FileParts(request, file, [(0, 3 * _FileParts.chunk_size)], pool)
    producer.start()
    assert len(pool.tasks) == 1  # the first read, on the pool
    if not read_in_flight:
        pool.run_next()  # written, and the request paused the producer: nothing in flight
        assert producer.paused and not pool.tasks and len(request.written) == 1
    producer.stopProducing()
    if read_in_flight:
        assert not file.closed and len(pool.tasks) == 1
        pool.run_next()  # the read comes back to a stopped producer: its data is dropped
        assert len(request.written) == 0
    assert not file.closed and len(pool.tasks) == 1  # the close, on the pool too
    pool.run_next()
    assert file.closed and not pool.tasks and not request.finished and not request.lost


def test_a_producer_sends_bytes_and_slices_in_order_and_ends_the_request():
    """The parts of a multipart answer: bytes as they are, slices read from the file; resumed after a
    pause; the request finished at the end, or its connection lost if the file came up short."""
    import io
    import os
    import tempfile

    from csms_plugins.firmware.http import _FileParts

    with tempfile.NamedTemporaryFile() as named:
        named.write(bytes(range(256)))
        named.flush()
        for parts, complete in (([b"<", (10, 5), b"|", (250, 6), b">"], True), ([(250, 20)], False)):
            pool, request = _PoolByHand(), _Request(pause_after_writes=2)
            file = io.open(os.dup(named.fileno()), "rb")
            producer = _FileParts(request, file, parts, pool)
            producer.start()
            while pool.tasks:
                pool.run_next()
                if producer.paused:
                    producer.resumeProducing()
            data = b"".join(request.written)
            if complete:
                assert data == b"<" + bytes(range(10, 15)) + b"|" + bytes(range(250, 256)) + b">"
                assert request.finished and not request.lost
            else:
                assert data == bytes(range(250, 256)) and request.lost and not request.finished
            assert file.closed
