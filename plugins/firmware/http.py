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

from twisted.logger import Logger
from twisted.web import resource, server, static

from csms.api.resource import LimitedRequest
from csms.httplimits import HTTPLimits, LimitedSite

from .files import firmware_name
from .uploads import BAD_UPLOAD, TOO_LARGE, UploadRefused, split_path_token
from .store import EXPIRED, UNKNOWN, USED

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
    """``/firmware/<name>``: plain files of the firmware directory, never a listing or a hidden file."""

    def __init__(self, directory: str):
        super().__init__()
        self.directory = directory

    def getChild(self, name, request):
        try:
            name = firmware_name(name.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return _NotFound()
        path = os.path.join(self.directory, name)
        if not os.path.isfile(path):
            return _NotFound()
        file = static.File(path, defaultType="application/octet-stream")
        file.childNotFound = _NotFound()
        return file

    def render(self, request):
        return _NotFound().render(request)


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
            return _json(request, 413, {"error": {"status": 413, "code": TOO_LARGE,
                                                  "message": UploadRefused.MESSAGES[TOO_LARGE]}})
        request.content.seek(0)
        d = self.uploads.receive(user, secret, name, request.content, "http",
                                 multipart_type=request.getHeader("content-type") if multipart else None)
        d.addCallbacks(self._stored, self._refused, callbackArgs=(request,), errbackArgs=(request,))
        d.addErrback(self._failed, request)
        d.addCallback(self._finish, request)
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

    def _finish(self, data, request):
        if request._disconnected:
            return
        request.setHeader(b"content-length", str(len(data)).encode())
        request.write(data)
        request.finish()


class UploadRequest(LimitedRequest):
    """Bodies are bounded by the site's limit and never parsed as forms by Twisted (we parse them)."""

    def __init__(self, *args, **kwargs):
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(*args, **kwargs)


class FileServerSite(LimitedSite):
    requestFactory = UploadRequest
    noisy = False

    def __init__(self, firmware_dir: str, uploads, limits: HTTPLimits, clock):
        root = _Root()
        root.putChild(b"firmware", FirmwareFiles(firmware_dir))
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

