"""Station admission before the WebSocket opens: the charge point id, and how many connections a
listener and a remote address may hold (used by :mod:`csms.protocol`)."""
from __future__ import annotations

import base64
import binascii
import unicodedata
from urllib.parse import unquote_to_bytes, urlsplit

from twisted.internet.protocol import Protocol
from twisted.logger import Logger

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


# -- admission: how many connections ---------------------------------------------------------------


class ConnectionLimits:
    """One listener's open connections, in total and per remote address, from TCP accept to close.

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
        self._unreported = 0
        self._summary_call = None

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
        if self._summary_call is not None and self._summary_call.active():
            self._summary_call.cancel()
        self._summary_call = None

    def _refused(self, address, why: str) -> None:
        if self._summary_call is not None:
            self._unreported += 1
            return
        log.warn("Refused a connection from {address}: {why} (further refusals are summed up every {interval:.0f} s)",
                 address=address, why=why, interval=self.SUMMARY_INTERVAL)
        self._summary_call = self.clock.callLater(self.SUMMARY_INTERVAL, self._summarise)

    def _summarise(self) -> None:
        self._summary_call = None
        if not self._unreported:
            return
        log.warn("Refused {count} more connections over the [ocpp] connection limits in the last {interval:.0f} s "
                 "({total} open)", count=self._unreported, interval=self.SUMMARY_INTERVAL, total=self.total)
        self._unreported = 0
        self._summary_call = self.clock.callLater(self.SUMMARY_INTERVAL, self._summarise)


class RefusedConnection(Protocol):
    """Stands in for a connection over the limits: aborted as soon as it is accepted, before a byte is read."""

    def connectionMade(self):
        self.transport.abortConnection()
