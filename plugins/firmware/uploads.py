"""Diagnostics uploads, whatever the transport (HTTP or FTP): one-time credentials and safe storage.

Each GetDiagnostics with a CSMS-hosted location gets its own user name and random secret. The
secret is handed to the station inside the location URL; the database keeps only its SHA-256. An
upload is accepted once, before the credentials expire (the app clock decides), and is stored
under ``diagnostics_dir/<request id>/<file name>`` in the same transaction that uses them up.
"""
from __future__ import annotations

import os
import secrets
from email import message_from_bytes

from twisted.internet import defer, threads
from twisted.python.failure import Failure

from .files import TooLarge, discard, inside, spool, upload_name
from .store import EXPIRED, UNKNOWN, USED

TOO_LARGE = "too_large"
BAD_UPLOAD = "bad_upload"
#: ``csms_firmware_diagnostics_uploads_total``'s outcomes besides the refusal reasons.
STORED, FAILED = "stored", "failed"


class UploadRefused(Exception):
    """An upload was refused; ``reason`` is one of the store's reasons, ``too_large`` or ``bad_upload``."""

    MESSAGES = {
        UNKNOWN: "Unknown upload credentials",
        USED: "These upload credentials were already used",
        EXPIRED: "These upload credentials have expired",
        TOO_LARGE: "The upload is larger than the configured limit",
        BAD_UPLOAD: "The upload could not be read",
    }

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or self.MESSAGES.get(reason, reason))
        self.reason = reason


def new_credentials() -> tuple[str, str]:
    """(user, secret): a unique user name and a 128-bit secret, both URL- and FTP-safe."""
    return "diag" + secrets.token_hex(6), secrets.token_hex(16)


def split_path_token(token: str) -> tuple[str, str] | None:
    """``<user>-<secret>`` (the HTTP path form of the credentials) -> (user, secret)."""
    user, sep, secret = token.partition("-")
    if not sep or not user or not secret:
        return None
    return user, secret


def multipart_file(body: bytes, content_type: str) -> tuple[str | None, bytes]:
    """The first file part of a multipart/form-data body: (file name, content). ValueError if none."""
    message = message_from_bytes(b"MIME-Version: 1.0\r\nContent-Type: " + content_type.encode("latin-1")
                                 + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise ValueError("not a multipart/form-data body")
    fallback = None
    for part in message.get_payload():
        filename = part.get_param("filename", header="content-disposition")
        payload = part.get_payload(decode=True)
        if payload is None:
            continue
        if filename:
            return str(filename), payload
        if fallback is None:
            fallback = (None, payload)
    if fallback is None:
        raise ValueError("the multipart body has no file part")
    return fallback


class DiagnosticsUploads:
    """Checks credentials and stores uploads; used by both the HTTP and the FTP listener."""

    def __init__(self, app, store, directory: str, max_size: int):
        self.app = app
        self.store = store
        self.directory = directory
        self.max_size = max_size
        self.uploads_counted = app.metrics.counter(
            "csms_firmware_diagnostics_uploads", "Diagnostics uploads stations made, by transport (http, ftp) and "
            "outcome (stored, or why it was refused: unknown_credentials, credentials_used, credentials_expired, "
            "too_large, bad_upload; failed)",
            ("via", "outcome"))

    def count(self, via: str, outcome: str) -> None:
        self.uploads_counted.labels(via, outcome).inc()

    def _in_thread(self, f, *args):
        reactor = self.app.reactor
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    @defer.inlineCallbacks
    def check(self, user: str, secret: str):
        """Fires with the request the credentials belong to; fails with UploadRefused."""
        request, reason = yield self.store.check_upload(user, secret, self.app.now())
        if request is None:
            raise UploadRefused(reason)
        return request

    def receive(self, user: str, secret: str, name: str | None, source, via: str,
                multipart_type: str | None = None):
        """Store one upload (``source``: bytes or a file object) for the request of these credentials.

        Fires with the stored file's dict; fails with UploadRefused, and then nothing is kept.
        """
        def counted(outcome):
            if isinstance(outcome, Failure):
                self.count(via, outcome.value.reason if outcome.check(UploadRefused) else FAILED)
            else:
                self.count(via, STORED)
            return outcome
        return self._receive(user, secret, name, source, via, multipart_type).addBoth(counted)

    @defer.inlineCallbacks
    def _receive(self, user, secret, name, source, via, multipart_type):
        yield self.check(user, secret)
        if multipart_type is not None:
            body = source if isinstance(source, bytes) else (yield self._in_thread(source.read))
            try:
                part_name, source = yield self._in_thread(multipart_file, body, multipart_type)
            except ValueError as exc:
                raise UploadRefused(BAD_UPLOAD, str(exc))
            name = part_name or name
        try:
            temp, size, sha256, _md5 = yield self._in_thread(spool, self.directory, source, self.max_size)
        except TooLarge:
            raise UploadRefused(TOO_LARGE, f"The upload is larger than {self.max_size} bytes")
        safe_name = upload_name(name)
        try:
            stored, reason = yield self.store.claim_upload(user, secret, self.app.now(), safe_name, size, sha256, via)
        except Exception:
            yield self._in_thread(discard, temp)
            raise
        if stored is None:
            yield self._in_thread(discard, temp)
            raise UploadRefused(reason)
        try:
            yield self._in_thread(self._place, temp, stored["stored_path"])
        except Exception:
            yield self.store.release_upload(stored["id"])
            yield self._in_thread(discard, temp)
            raise
        del stored["stored_path"]
        return stored

    def _place(self, temp: str, stored_path: str) -> None:
        """Move a spooled upload to ``stored_path`` (in a thread, after its row committed)."""
        folder = os.path.join(self.directory, os.path.dirname(stored_path))
        os.makedirs(folder, exist_ok=True)
        os.replace(temp, inside(folder, os.path.basename(stored_path)))

    def path_of(self, stored_path: str) -> str:
        return inside(os.path.dirname(os.path.join(self.directory, stored_path)), os.path.basename(stored_path))
