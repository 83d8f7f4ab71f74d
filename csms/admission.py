"""Station admission before the WebSocket opens (used by :mod:`csms.protocol`).

The framework checks what is protocol-level: how many connections a listener and a remote address may
hold, and the charge point id. Whether a station may connect at all is for the plugins to decide:
:class:`AdmissionRequest` is what their ``csms_admit_station`` implementations judge, and
:func:`admission_outcome` combines their answers.
"""
from __future__ import annotations

import base64
import binascii
import unicodedata
from urllib.parse import unquote_to_bytes, urlsplit

from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from csms.logs import SummedUp

log = Logger(namespace="csms.protocol")

#: Unicode categories an id may not contain: control, format (invisible, bidi overrides), surrogate,
#: private use, unassigned, line and paragraph separators.
_FORBIDDEN_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))


# -- admission: the charge point id ----------------------------------------------------------------


def charge_point_id_from_path(path: str, prefix: str) -> str | None:
    """The charge point id in a handshake's request path, or None when the path is not under ``prefix``.

    The id is the last segment, percent-decoded as UTF-8 (RFC 3986 §2.5); raises ValueError when the
    bytes are not UTF-8 (``%FF``, or ``%ED%A0%80``, a surrogate), which would otherwise become U+FFFD
    and let two different ids name one station. Autobahn hands the path over as ISO-8859-1 text, so
    unescaped non-ASCII bytes are read back as the UTF-8 they were sent as.
    """
    path = urlsplit(path).path
    if not path.startswith(prefix):
        return None
    segment = path[len(prefix):].rstrip("/").rsplit("/", 1)[-1]
    try:
        return unquote_to_bytes(segment.encode("latin-1")).decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise ValueError("chargePointId is not valid UTF-8 once percent-decoded") from None


def charge_point_id_problem(station_id: str, max_length: int) -> str | None:
    """Why ``station_id`` cannot be a charge point id, or None when it can.

    OCPP-J 1.6 §3.1.1 makes the id the last path segment and gives it no type (OCPP 1.6's CiStrings
    have a length, no character set); OCPP 2.0.1 caps it at 48 characters. Besides the length, the CSMS refuses what no id needs and what a database, a log
    line or an operator's screen cannot show faithfully: control characters (NUL, which PostgreSQL
    cannot store, among them), invisible format characters, surrogates, private-use and unassigned
    code points, and line separators. Letters of any script, digits, punctuation and spaces are kept.
    """
    if not station_id or len(station_id) > max_length:
        return f"chargePointId must be 1 to {max_length} characters"
    if station_id.isascii() and station_id.isprintable():
        return None
    if any(unicodedata.category(char) in _FORBIDDEN_CATEGORIES for char in station_id):
        return "chargePointId must not contain control, invisible or unassigned characters"
    return None


def printable(text: str) -> str:
    """``text`` with every unprintable character escaped, fit for a log line and any database."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


def parse_basic_auth(header: str | None):
    """(username, password) from an ``Authorization: Basic ...`` header, or None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, sep, password = decoded.partition(":")
    return (username, password) if sep else None


# -- admission: the plugins' decision -------------------------------------------------------------


class AdmissionRefused(Exception):
    """Raise from ``csms_admit_station`` (or fail its Deferred with it) to refuse a handshake.

    ``status`` is the HTTP status the station gets (401, 403, 404 ...) and ``reason`` the text sent
    with it; ``detail`` is what the ``refused`` connection event and the log say (``reason`` when
    not given), so that it may name what the station should not be told.
    """

    def __init__(self, status: int, reason: str, detail: str | None = None):
        if type(status) is not int or not 400 <= status <= 599:
            raise ValueError(f"an admission is refused with an HTTP 4xx or 5xx status, not {status!r}")
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.detail = detail if detail is not None else reason


class AdmissionRequest:
    """A WebSocket handshake whose path, charge point id and subprotocol passed the framework's checks.

    ``csms_admit_station`` implementations read it and may add to :attr:`annotations`, which becomes
    the station session's ``admission`` dict once the station is admitted.
    """

    def __init__(self, station_id: str, headers: dict, peer: str, address=None, certificate=None, tls: bool = False):
        #: The charge point id, percent-decoded from the path.
        self.station_id = station_id
        #: The handshake's HTTP headers, names in lower case (as Autobahn gives them).
        self.headers = headers
        #: The remote end as connection events record it, e.g. ``tcp4:127.0.0.1:53211``.
        self.peer = peer
        #: The transport's ``getPeer()`` (``.host``, ``.port`` for TCP), or None.
        self.address = address
        #: The TLS client certificate (a ``cryptography.x509.Certificate``) when the connection is TLS
        #: and the station presented one; None otherwise (always None on plain TCP).
        self.certificate = certificate
        #: Whether the connection is TLS (wss), whichever listener it came through.
        self.tls = tls
        #: How a plugin proved the station's identity other than by its Basic auth password (e.g. "client
        #: certificate"), or None. Set it in ``csms_admit_station`` before returning (not in a callback):
        #: the Core plugin, called last, then does not ask for the password.
        self.authenticated_by: str | None = None
        #: What the plugins note about the station while admitting it; the session's ``admission``.
        self.annotations: dict = {}
        credentials = parse_basic_auth(headers.get("authorization"))
        #: The HTTP Basic auth username and password as presented, or None when there are none (or
        #: the header is not Basic auth that decodes). Nothing is checked here.
        self.username, self.password = credentials if credentials is not None else (None, None)

    @classmethod
    def from_handshake(cls, station_id: str, request, transport) -> AdmissionRequest:
        """Built from Autobahn's ``ConnectionRequest`` and the connection's transport."""
        certificate = None
        tls = ISSLTransport.providedBy(transport)
        if tls:
            peer_certificate = transport.getPeerCertificate()  # pyOpenSSL's X509, or None
            if peer_certificate is not None:
                certificate = peer_certificate.to_cryptography()
        get_peer = getattr(transport, "getPeer", None)
        return cls(station_id, request.headers, request.peer, get_peer() if get_peer is not None else None,
                   certificate, tls)


#: The refusal when no implementation of ``csms_admit_station`` admitted the station.
NOT_ADMITTED = ("Forbidden", "no plugin admitted the station")
#: The refusal when an implementation failed with something else than AdmissionRefused.
ADMISSION_FAILED = ("Internal Server Error", "an admission check failed")


def admission_outcome(outcomes: list) -> AdmissionRefused | None:
    """Combine the answers of ``csms_admit_station`` implementations, in the order they were called:
    None when the station is admitted, else the refusal to send.

    ``outcomes`` are ``(succeeded, value)`` pairs, as a DeferredList gives them. The first failure
    decides (an AdmissionRefused is sent as it is; anything else is logged and refused with 500);
    without one, the station is admitted when at least one implementation answered True.
    """
    admitted = False
    for succeeded, value in outcomes:
        if not succeeded:
            if isinstance(value, Failure) and value.check(AdmissionRefused):
                return value.value
            log.failure("A csms_admit_station implementation failed", value)
            return AdmissionRefused(500, *ADMISSION_FAILED)
        if value is True:
            admitted = True
        elif value is not None:
            log.error("A csms_admit_station implementation answered {value!r}, not True or None", value=value)
            return AdmissionRefused(500, *ADMISSION_FAILED)
    return None if admitted else AdmissionRefused(403, *NOT_ADMITTED)


# -- admission: how many connections ---------------------------------------------------------------


class ConnectionLimits:
    """The OCPP listeners' open connections, in total and per remote address, from TCP accept to close
    (one factory's: a plugin's listener serving ``app.ocpp_factory``, such as the TLS one, counts here too).

    :meth:`admit` counts a new connection, or refuses it (False) when it would exceed a limit (0: no
    limit). The first refusal is logged at once; later ones are summed up in one line per
    ``SUMMARY_INTERVAL`` while they go on, so a flood of refusals cannot flood the log.
    """

    SUMMARY_INTERVAL = 60.0

    def __init__(self, clock, max_total: int, max_per_address: int):
        self.clock = clock
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.total = 0
        self.per_address: dict[str, int] = {}
        self._refusals = SummedUp(clock, self.SUMMARY_INTERVAL, self._summarise)

    def admit(self, address: str | None) -> bool:
        if self.max_total and self.total >= self.max_total:
            self._refused(address, f"{self.total} connections are open, [ocpp] max_connections = {self.max_total}")
            return False
        tracked = address is not None and self.max_per_address > 0
        if tracked:
            count = self.per_address.get(address, 0)
            if count >= self.max_per_address:
                self._refused(address, f"{count} connections from this address are open, "
                                       f"[ocpp] max_connections_per_address = {self.max_per_address}")
                return False
            self.per_address[address] = count + 1
        self.total += 1
        return True

    def release(self, address: str | None) -> None:
        """A connection :meth:`admit` counted has closed."""
        self.total -= 1
        if address is not None and self.max_per_address > 0:
            left = self.per_address[address] - 1
            if left:
                self.per_address[address] = left
            else:
                del self.per_address[address]

    def stop(self) -> None:
        self._refusals.stop()

    def _refused(self, address, why: str) -> None:
        if self._refusals.occurred():
            log.warn("Refused a connection from {address}: {why} (further refusals are summed up every "
                     "{interval:.0f} s)", address=address, why=why, interval=self.SUMMARY_INTERVAL)

    def _summarise(self, counts) -> None:
        log.warn("Refused {count} more connections over the [ocpp] connection limits in the last {interval:.0f} s "
                 "({total} open)", count=counts[None], interval=self.SUMMARY_INTERVAL, total=self.total)


class RefusedConnection(Protocol):
    """Stands in for a connection over the limits: aborted as soon as it is accepted, before a byte is read."""

    def connectionMade(self):
        self.transport.abortConnection()
