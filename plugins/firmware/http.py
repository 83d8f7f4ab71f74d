"""The file server stations talk to: firmware downloads and diagnostics uploads over HTTP.

It listens on its own endpoint (``[plugin:firmware] http_endpoint``), apart from the operator API,
because the API binds loopback by default while stations must reach these files.

* ``GET/HEAD /firmware/<name>``: a firmware image, with Range support (an interrupted download resumes).
* ``PUT /diagnostics/<user>-<secret>/<file>``, or ``POST`` a raw or multipart/form-data body there:
  a diagnostics upload (OCPP 1.6 §5.8). The credentials may instead come as HTTP Basic auth on
  ``/diagnostics/<file>``.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import stat
from collections import deque
from datetime import timezone
from email.utils import parsedate_to_datetime

from twisted.internet import interfaces, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from zope.interface import implementer

from csms.api.resource import LimitedRequest
from csms.httplimits import HTTPLimits, LimitedSite

from .files import firmware_name
from .ranges import requested_ranges
from .store import EXPIRED, UNKNOWN, USED
from .uploads import BAD_UPLOAD, TOO_LARGE, UploadRefused, split_path_token

log = Logger(namespace="csms.firmware.http")

#: Room for multipart headers and boundaries on top of the diagnostics size limit.
MULTIPART_OVERHEAD = 65536

_STATUS = {UNKNOWN: 401, USED: 403, EXPIRED: 403, TOO_LARGE: 413, BAD_UPLOAD: 400}


def _json(request, status: int, body: dict) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body).encode("utf-8")


class _NotFound(resource.Resource):
    isLeaf = True

    def render(self, request):
        return _json(request, 404, {"error": {"status": 404, "code": "not_found", "message": "No such file"}})


class _Root(resource.Resource):
    def getChild(self, name, request):
        return _NotFound()

    def render(self, request):
        return _NotFound().render(request)


class FirmwareFiles(resource.Resource):
    """``/firmware/<name>``: plain files of the firmware directory, never a listing or a hidden file.

    The file system is touched only on ``reactor``'s thread pool (opening, stat, every read): a cold
    disk or a slow network mount delays that download, never the OCPP traffic on the reactor thread."""

    def __init__(self, directory: str, max_ranges: int, reactor):
        super().__init__()
        self.directory = directory
        self.max_ranges = max_ranges
        self.reactor = reactor

    def getChild(self, name, request):
        try:
            name = firmware_name(name.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return _NotFound()
        return FirmwareFile(os.path.join(self.directory, name), self.max_ranges, self.reactor)

    def render(self, request):
        return _NotFound().render(request)


class FirmwareFile(resource.Resource):
    """One firmware image: GET (with Range, RFC 9110 §14) and HEAD, streamed from disk.

    Validators: a strong ETag (size and modification time) and Last-Modified, for If-None-Match,
    If-Modified-Since (304) and If-Range (a resumed download never mixes two versions of a file).
    Always ``application/octet-stream`` with no Content-Encoding, whatever the name ends with, so
    that no client unpacks an image on the way.
    """

    isLeaf = True
    METHODS = (b"GET", b"HEAD")

    def __init__(self, path: str, max_ranges: int, reactor):
        super().__init__()
        self.path = path
        self.max_ranges = max_ranges
        self.reactor = reactor

    def render(self, request):
        if request.postpath:
            return _NotFound().render(request)
        if request.method not in self.METHODS:
            request.setHeader(b"allow", b", ".join(self.METHODS))
            return _json(request, 405, {"error": {"status": 405, "code": "method_not_allowed",
                                                  "message": "Only GET and HEAD are allowed here"}})
        d = _in_pool(self.reactor, _open_regular, self.path)
        d.addCallback(self._opened, request)
        d.addErrback(self._failed, request)
        return server.NOT_DONE_YET

    def _opened(self, opened, request):
        if opened is None:  # no such file (or not a plain one)
            return _finish(request, _NotFound().render(request))
        file, info = opened
        if request._disconnected:
            return _in_pool(self.reactor, file.close)
        try:
            body = self._respond(request, file, info)
        except BaseException:
            _in_pool(self.reactor, file.close)
            raise
        if body is not server.NOT_DONE_YET:
            _in_pool(self.reactor, file.close)
            _finish(request, body)

    def _failed(self, failure, request):
        log.failure("Firmware file {path} could not be served", failure, path=self.path)
        if not request._disconnected and not request.finished:
            _finish(request, _json(request, 500, {"error": {"status": 500, "code": "internal_error",
                                                            "message": "The file could not be read"}}))

    def _respond(self, request, file, info):
        size = info.st_size
        etag = f'"{size:x}-{info.st_mtime_ns:x}"'
        modified = int(info.st_mtime)
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"etag", etag.encode("ascii"))
        request.setHeader(b"last-modified", http.datetimeToString(modified))
        if _not_modified(request, etag, modified):
            request.setResponseCode(304)
            return b""
        if request.method == b"HEAD":  # Range is defined for GET only (RFC 9110 §14.2)
            return _file_headers(request, size)
        ranges = None
        range_header = request.getHeader(b"range")
        if range_header is not None and _if_range_holds(request, etag, modified):
            ranges = requested_ranges(range_header.decode("latin-1"), size, self.max_ranges)
        if ranges is None:
            parts = [(0, size)]
            _file_headers(request, size)
        elif not ranges:
            request.setHeader(b"content-range", b"bytes */%d" % size)
            return _json(request, 416, {"error": {"status": 416, "code": "range_not_satisfiable",
                                                  "message": f"No requested range is within the file's {size} "
                                                             "bytes"}})
        elif len(ranges) == 1:
            [(first, last)] = ranges
            parts = [(first, last - first + 1)]
            request.setResponseCode(206)
            request.setHeader(b"content-range", b"bytes %d-%d/%d" % (first, last, size))
            _file_headers(request, last - first + 1)
        else:
            parts = _byteranges(request, ranges, size)
        _FileParts(request, file, parts, self.reactor).start()
        return server.NOT_DONE_YET


def _in_pool(reactor, f, *args):
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)


def _open_regular(path: str):
    """(the open file, its stat) if ``path`` is a plain file, else None (on the thread pool)."""
    try:
        file = open(path, "rb")  # noqa: SIM115 - closed by the caller or the producer
    except OSError:
        return None
    try:
        info = os.fstat(file.fileno())
        if stat.S_ISREG(info.st_mode):
            return file, info
    except OSError:
        pass
    file.close()
    return None


def _finish(request, body: bytes) -> None:
    """What Twisted does with the bytes ``render`` returns, for an answer made later."""
    if request._disconnected:
        return
    if request.method == b"HEAD":
        if body:  # the length of the GET's answer; a HEAD's has no body
            request.setHeader(b"content-length", b"%d" % len(body))
        request.write(b"")
    else:
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
    request.finish()


def _file_headers(request, length: int) -> bytes:
    request.setHeader(b"content-type", b"application/octet-stream")
    request.setHeader(b"content-length", b"%d" % length)
    return b""


def _byteranges(request, ranges, size: int) -> list:
    """Headers of a multipart/byteranges answer (RFC 9110 §14.6); returns its parts for :class:`_FileParts`."""
    boundary = secrets.token_hex(16).encode("ascii")
    parts: list = []
    for first, last in ranges:
        parts.append(b"--%s\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes %d-%d/%d\r\n\r\n"
                     % (boundary, first, last, size))
        parts.append((first, last - first + 1))
        parts.append(b"\r\n")
    parts.append(b"--%s--\r\n" % boundary)
    length = sum(len(part) if isinstance(part, bytes) else part[1] for part in parts)
    request.setResponseCode(206)
    request.setHeader(b"content-type", b"multipart/byteranges; boundary=" + boundary)
    request.setHeader(b"content-length", b"%d" % length)
    return parts


def _http_date(value: bytes) -> int | None:
    try:
        moment = parsedate_to_datetime(value.decode("latin-1"))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


def _not_modified(request, etag: str, modified: int) -> bool:
    """RFC 9110 §13.1.2 / §13.1.3; If-None-Match takes precedence (§13.2.2)."""
    if_none_match = request.getHeader(b"if-none-match")
    if if_none_match is not None:
        tags = [tag.strip(" \t") for tag in if_none_match.decode("latin-1").split(",")]
        return "*" in tags or any(tag.removeprefix("W/") == etag for tag in tags)  # weak comparison
    if_modified_since = request.getHeader(b"if-modified-since")
    if if_modified_since is None:
        return False
    since = _http_date(if_modified_since)
    return since is not None and since >= modified


def _if_range_holds(request, etag: str, modified: int) -> bool:
    """If-Range (RFC 9110 §13.1.5): the range only if the client's validator is the file's (strong match)."""
    if_range = request.getHeader(b"if-range")
    if if_range is None:
        return True
    value = if_range.decode("latin-1").strip(" \t")
    if value.startswith('"') or value.startswith("W/"):
        return value == etag
    return _http_date(if_range) == modified


@implementer(interfaces.IPushProducer)
class _FileParts:
    """Writes a response made of bytes and ``(offset, length)`` slices of a file, a chunk at a time, each
    read on the thread pool, one read in flight at a time and none while the client's socket is paused:
    the file is never read whole into memory, nor on the reactor thread."""

    chunk_size = 65536

    def __init__(self, request, file, parts, reactor):
        self.request = request
        self.file = file
        self.reactor = reactor
        self.parts = deque(part for part in parts if isinstance(part, bytes) or part[1] > 0)
        self.paused = False
        self.reading = False

    def start(self):
        self.request.registerProducer(self, True)
        self._more()

    def _more(self):
        """Write what is next, while the client takes it: bytes at once, a slice once read."""
        while self.request is not None and not self.paused and not self.reading:
            if not self.parts:
                return self._end(complete=True)
            part = self.parts[0]
            if isinstance(part, bytes):
                self.parts.popleft()
                self.request.write(part)  # may pause us: the loop looks again
                continue
            offset, remaining = part
            self.reading = True
            d = _in_pool(self.reactor, os.pread, self.file.fileno(), min(self.chunk_size, remaining), offset)
            d.addBoth(self._read)
            return None

    def _read(self, data):
        self.reading = False
        if self.request is None:  # stopped while the read was in flight: the file is ours to close now
            _in_pool(self.reactor, self.file.close)
            return
        if isinstance(data, Failure) or not data:  # failed, or the file shrank: the promised length cannot be sent
            if isinstance(data, Failure):
                log.warn("Firmware file {path} could not be read: {error}", path=self.file.name,
                         error=data.getErrorMessage())
            return self._end(complete=False)
        offset, remaining = self.parts[0]
        if len(data) >= remaining:
            self.parts.popleft()
        else:
            self.parts[0] = (offset + len(data), remaining - len(data))
        self.request.write(data)
        self._more()

    def _end(self, complete: bool):
        request = self.request
        self.stopProducing()
        request.unregisterProducer()
        if complete:
            request.finish()
        else:
            request.loseConnection()

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self._more()

    def stopProducing(self):
        if self.request is None:
            return
        self.request = None
        if not self.reading:  # else _read closes it once the read in flight is back
            _in_pool(self.reactor, self.file.close)


class DiagnosticsUpload(resource.Resource):
    """``/diagnostics/...``: one upload per set of credentials."""

    isLeaf = True

    def __init__(self, uploads):
        super().__init__()
        self.uploads = uploads

    def _credentials(self, request):
        """(user, secret, file name from the path) or None."""
        segments = [s.decode("utf-8", "replace") for s in request.postpath if s]
        auth = request.getHeader("authorization") or ""
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, secret = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
            if segments and split_path_token(segments[0]) == (user, secret):
                segments = segments[1:]
            return user, secret, "/".join(segments) or None
        if not segments:
            return None
        pair = split_path_token(segments[0])
        if pair is None:
            return None
        return pair[0], pair[1], "/".join(segments[1:]) or None

    def render_PUT(self, request):
        return self._upload(request, multipart=False)

    def render_POST(self, request):
        content_type = request.getHeader("content-type") or ""
        return self._upload(request, multipart=content_type.lower().startswith("multipart/form-data"))

    def _upload(self, request, multipart: bool):
        found = self._credentials(request)
        if found is None:
            request.setHeader(b"www-authenticate", b'Basic realm="csms-diagnostics"')
            return _json(request, 401, {"error": {"status": 401, "code": UNKNOWN,
                                                  "message": "Upload credentials are required"}})
        user, secret, name = found
        if getattr(request, "body_too_large", False):
            self.uploads.count("http", TOO_LARGE)
            return _json(request, 413, {"error": {"status": 413, "code": TOO_LARGE,
                                                  "message": UploadRefused.MESSAGES[TOO_LARGE]}})
        request.content.seek(0)
        d = self.uploads.receive(user, secret, name, request.content, "http",
                                 multipart_type=request.getHeader("content-type") if multipart else None)
        d.addCallbacks(self._stored, self._refused, callbackArgs=(request,), errbackArgs=(request,))
        d.addErrback(self._failed, request)
        d.addCallback(lambda body: _finish(request, body))
        return server.NOT_DONE_YET

    def _stored(self, stored, request):
        log.info("Diagnostics {name} ({size} bytes) uploaded over HTTP for request {request_id}",
                 name=stored["name"], size=stored["size"], request_id=stored["request_id"])
        return _json(request, 201, {"id": stored["id"], "name": stored["name"], "size": stored["size"],
                                    "sha256": stored["sha256"]})

    def _refused(self, failure, request):
        failure.trap(UploadRefused)
        exc = failure.value
        status = _STATUS.get(exc.reason, 400)
        if status == 401:
            request.setHeader(b"www-authenticate", b'Basic realm="csms-diagnostics"')
        return _json(request, status, {"error": {"status": status, "code": exc.reason, "message": str(exc)}})

    def _failed(self, failure, request):
        log.failure("Diagnostics upload failed", failure)
        return _json(request, 500, {"error": {"status": 500, "code": "internal_error",
                                              "message": "The upload could not be stored"}})


class UploadRequest(LimitedRequest):
    """Bodies are bounded by the site's limit and never parsed as forms by Twisted (we parse them)."""

    def __init__(self, *args, **kwargs):
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(*args, **kwargs)


class FileServerSite(LimitedSite):
    requestFactory = UploadRequest
    noisy = False

    def __init__(self, firmware_dir: str, uploads, limits: HTTPLimits, clock, reactor, max_ranges: int = 8):
        root = _Root()
        root.putChild(b"firmware", FirmwareFiles(firmware_dir, max_ranges, reactor))
        root.putChild(b"diagnostics", DiagnosticsUpload(uploads))
        super().__init__(root, limits, clock)
        self.max_body_size = uploads.max_size + MULTIPART_OVERHEAD
        self.displayTracebacks = False

    def log(self, request):
        # Never log paths: the upload credentials may be in them.
        log.debug("{method} {code}", method=request.method, code=request.code)


def listening_url(port) -> str:
    """``http://host:port`` for a listening port (wildcard addresses become this host's name)."""
    import socket

    address = port.getHost()
    host = address.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{address.port}"

