"""Limits every HTTP listener applies (the operator API, the firmware file server) so that clients holding
connections open cannot exhaust the server's descriptors (slowloris, slow bodies, connection floods).

Twisted's idle timeout (``HTTPChannel`` is a ``TimeoutMixin``) restarts on every byte, so one byte every few
seconds keeps a connection open for ever. On top of it:

* the request headers must be complete ``request_header_timeout`` seconds after the connection opened, or
  after the previous response on a kept-alive connection, however the bytes trickle in;
* a body gets ``request_body_timeout`` seconds plus one second per ``request_body_min_rate`` bytes received
  (Apache mod_reqtimeout's rule): a large firmware or diagnostics upload at any fair rate finishes, a
  trickle does not, and no total time has to be guessed for the largest file on the slowest link;
* at most ``max_connections`` connections are open on the listener, ``max_connections_per_address`` from one
  address; one more is closed at once (Twisted closes the socket when the factory builds no protocol), and
  refusals are logged at most once a minute with how many there were.

A request that misses its deadline is answered 408 with a JSON error and the connection closed (silently
when nothing of it arrived). Deadlines run on the clock the listener is given (the Central System's, a
``task.Clock`` in tests).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields

from twisted.logger import Logger
from twisted.protocols import policies
from twisted.web import http, server

from csms.config import ConfigError

log = Logger(namespace="csms.http")

#: Refused connections are summed up in one log line at most this often (seconds).
REFUSAL_LOG_INTERVAL = 60.0


@dataclass(frozen=True)
class HTTPLimits:
    """One listener's limits; 0 means no limit for the rate and the connection caps."""

    request_header_timeout: float = 20.0
    request_body_timeout: float = 20.0
    request_body_min_rate: int = 500
    max_connections: int = 256
    max_connections_per_address: int = 32

    @classmethod
    def read(cls, get) -> "HTTPLimits":
        """The limits from ``get(name, default)`` (a config section's typed getter)."""
        return cls(**{f.name: get(f.name, f.default) for f in fields(cls)})

    def check(self, section: str, prefix: str = "") -> "HTTPLimits":
        """Itself, or ConfigError naming the setting (``[section] prefix+name``) that cannot be used."""
        for name in ("request_header_timeout", "request_body_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"[{section}] {prefix}{name} must be positive")
        for name in ("request_body_min_rate", "max_connections", "max_connections_per_address"):
            if getattr(self, name) < 0:
                raise ConfigError(f"[{section}] {prefix}{name} cannot be negative (0: no limit)")
        return self


def _timeout_response() -> bytes:
    body = json.dumps({"error": {"status": 408, "code": "request_timeout",
                                 "message": "The request was not received in time"}}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


REQUEST_TIMEOUT_RESPONSE = _timeout_response()


class DeadlineChannel(http.HTTPChannel):
    """An HTTP/1.1 channel whose requests must arrive in time (see the module docstring).

    The deadlines are timers of their own on the site's clock, apart from Twisted's idle timeout (which
    restarts on every byte by design and is left as it is: it closes a connection silent for a minute). On a
    kept-alive connection the next deadline starts with the next request's first byte: closing an idle
    kept-alive connection races with a client reusing it, and the idle timeout already covers silence.
    """

    _deadline = None
    _abort = None
    _busy = False  # a request is being handled; bytes meanwhile are the next (pipelined) request's
    _idle = False  # kept alive after a response, nothing of the next request received yet
    #: Bytes of the request under way received so far (0: nothing to answer when its time is up).
    request_bytes = 0
    _body_started_at = 0.0
    _body_received = 0

    def connectionMade(self):
        super().connectionMade()
        self._await_headers()

    def dataReceived(self, data):
        if self._idle:
            self._idle = False
            self._await_headers()
        self.request_bytes += len(data)
        super().dataReceived(data)

    def rawDataReceived(self, data):
        if not self._busy:
            self._body_received += len(data)
        super().rawDataReceived(data)

    def allHeadersReceived(self):
        super().allHeadersReceived()
        self._clear_deadline()
        if self.length != 0:  # a Content-Length, or None for a chunked body
            self._body_started_at = self.site.clock.seconds()
            self._body_received = 0
            self._set_deadline(self.site.http_limits.request_body_timeout, self._check_body)

    def allContentReceived(self):
        self._clear_deadline()
        self._busy = True
        self.request_bytes = 0  # from here on they belong to the next request
        super().allContentReceived()

    def requestDone(self, request):
        self._busy = False
        # Before the base class replays pipelined bytes, which may complete the next request's headers.
        if self.persistent:
            if self.request_bytes:
                self._await_headers()
            else:
                self._idle = True
        super().requestDone(request)

    def connectionLost(self, reason):
        self._clear_deadline()
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        super().connectionLost(reason)

    def _await_headers(self):
        self._set_deadline(self.site.http_limits.request_header_timeout, self._too_late)

    def _check_body(self):
        limits = self.site.http_limits
        allowed = limits.request_body_timeout
        if limits.request_body_min_rate:
            allowed += self._body_received / limits.request_body_min_rate
        left = self._body_started_at + allowed - self.site.clock.seconds()
        if left > 0:
            self._set_deadline(left, self._check_body)
        else:
            self._too_late()

    def _too_late(self):
        self._deadline = None
        if self.request_bytes:
            self.transport.write(REQUEST_TIMEOUT_RESPONSE)
        # As HTTPChannel.timeoutConnection does (without its log line per connection): close, and abort a
        # peer that does not let go.
        self._abort = self.site.clock.callLater(self.abortTimeout or 0, self.transport.abortConnection)
        self.loseConnection()

    def _set_deadline(self, seconds: float, then) -> None:
        self._clear_deadline()
        self._deadline = self.site.clock.callLater(seconds, then)

    def _clear_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None


class LimitedSite(server.Site):
    """A Site whose connections keep ``limits``' request deadlines, timed on ``clock``."""

    protocol = DeadlineChannel

    def __init__(self, resource, limits: HTTPLimits, clock, **kwargs):
        super().__init__(resource, **kwargs)
        self.http_limits = limits
        self.clock = clock


class ConnectionLimits(policies.WrappingFactory):
    """Wraps a listener's factory: at most ``max_connections`` open, ``max_connections_per_address`` each."""

    noisy = False

    def __init__(self, wrapped, limits: HTTPLimits, clock, name: str):
        super().__init__(wrapped)
        self.limits = limits
        self.clock = clock
        self.name = name
        self.open_by_address: dict[str | None, int] = {}
        self._address_of: dict = {}
        self._refused = 0
        self._next_refusal_log: float | None = None

    def buildProtocol(self, addr):
        address = getattr(addr, "host", None)
        if self._full(address):
            self._refuse(address)
            return None
        wrapper = super().buildProtocol(addr)
        self._address_of[wrapper] = address
        self.open_by_address[address] = self.open_by_address.get(address, 0) + 1
        return wrapper

    def unregisterProtocol(self, p):
        super().unregisterProtocol(p)
        address = self._address_of.pop(p)
        left = self.open_by_address[address] - 1
        if left:
            self.open_by_address[address] = left
        else:
            del self.open_by_address[address]

    def open_connections(self) -> int:
        return len(self._address_of)

    def _full(self, address) -> bool:
        limits = self.limits
        if limits.max_connections and self.open_connections() >= limits.max_connections:
            return True
        return bool(limits.max_connections_per_address and address is not None
                    and self.open_by_address.get(address, 0) >= limits.max_connections_per_address)

    def _refuse(self, address) -> None:
        self._refused += 1
        now = self.clock.seconds()
        if self._next_refusal_log is not None and now < self._next_refusal_log:
            return
        log.warn("{listener}: refused {count} connection(s) over its limits ({total} open at most, {per_address} "
                 "per address; the latest from {address})", listener=self.name, count=self._refused,
                 total=self.limits.max_connections or "no limit",
                 per_address=self.limits.max_connections_per_address or "no limit", address=address)
        self._refused = 0
        self._next_refusal_log = now + REFUSAL_LOG_INTERVAL


def limited_listener(site: LimitedSite, name: str) -> ConnectionLimits:
    """The factory to listen with: ``site`` behind its connection caps."""
    return ConnectionLimits(site, site.http_limits, site.clock, name)
