"""A scriptable OCPP-J 1.6 charge point for tests, on Autobahn's WebSocket client.

It is deliberately low level: it sends whatever frames a test asks for (including broken ones),
answers the CSMS's calls from a table the test fills, and exposes every frame it receives.
"""
from __future__ import annotations

import base64
import json
import re
from collections import deque
from itertools import count

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer

#: Answers a station gives when a test has not said otherwise.
DEFAULT_RESPONSES = {
    "ChangeAvailability": {"status": "Accepted"},
    "ChangeConfiguration": {"status": "Accepted"},
    "ClearCache": {"status": "Accepted"},
    "DataTransfer": {"status": "Accepted"},
    "GetConfiguration": {"configurationKey": [], "unknownKey": []},
    "RemoteStartTransaction": {"status": "Accepted"},
    "RemoteStopTransaction": {"status": "Accepted"},
    "Reset": {"status": "Accepted"},
    "UnlockConnector": {"status": "Unlocked"},
    "GetDiagnostics": {},
    "UpdateFirmware": {},
    "GetLocalListVersion": {"listVersion": 0},
    "SendLocalList": {"status": "Accepted"},
    "CancelReservation": {"status": "Accepted"},
    "ReserveNow": {"status": "Accepted"},
    "ClearChargingProfile": {"status": "Accepted"},
    "GetCompositeSchedule": {"status": "Rejected"},
    "SetChargingProfile": {"status": "Accepted"},
    "TriggerMessage": {"status": "Accepted"},
}

DEFAULT_TIMEOUT = 10.0


class StationRefused(Exception):
    """The CSMS refused the WebSocket handshake (``status`` is the HTTP status code, when known)."""

    def __init__(self, status: int | None, reason: str):
        super().__init__(f"handshake refused ({status}): {reason}")
        self.status = status
        self.reason = reason


class CallErrorFrame(Exception):
    def __init__(self, frame):
        super().__init__(f"{frame[2]}: {frame[3]}")
        self.frame = frame
        self.code = frame[2]


class TestStationProtocol(WebSocketClientProtocol):
    """One test station connection. Use :func:`connect_station` to make one."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(self):
        super().__init__()
        self._ids = count(1)
        self._pending: dict[str, defer.Deferred] = {}
        self._unmatched: deque = deque()
        self._unmatched_waiters: deque = deque()
        self._call_waiters: dict[str, deque] = {}
        self._calls_by_action: dict[str, deque] = {}
        #: action -> response payload, or callable(payload) -> payload, or CallErrorFrame-like tuple
        self.responses: dict = dict(DEFAULT_RESPONSES)
        #: every CALL the CSMS sent, as [2, id, action, payload]
        self.received_calls: list = []
        self.closed: defer.Deferred = defer.Deferred()
        self.subprotocol = None

    # -- connection --------------------------------------------------------------------------

    def onConnect(self, response):
        self.subprotocol = response.protocol
        self.response_headers = response.headers

    def onOpen(self):
        self.factory.opened.callback(self)

    def onClose(self, wasClean, code, reason):
        if not self.factory.opened.called:
            # Autobahn says "WebSocket connection upgrade failed [401]: ..." (older releases "(401 - ...)").
            match = re.search(r"upgrade failed \W*(\d{3})", reason or "")
            self.factory.opened.errback(StationRefused(int(match.group(1)) if match else None, reason or ""))
        for d in list(self._pending.values()):
            d.errback(ConnectionError(f"closed: {code} {reason}"))
        self._pending.clear()
        # No frame can come any more: a waiter fails now rather than at its timeout.
        while self._unmatched_waiters:
            self._unmatched_waiters.popleft().errback(ConnectionError(f"closed: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback((wasClean, code, reason))

    # -- receiving ---------------------------------------------------------------------------

    def onMessage(self, payload, isBinary):
        frame = json.loads(payload.decode("utf-8"))
        if frame[0] == 2:
            self._answer(frame)
            return
        d = self._pending.pop(frame[1], None)
        if d is not None:
            d.callback(frame)
        elif self._unmatched_waiters:
            self._unmatched_waiters.popleft().callback(frame)
        else:
            self._unmatched.append(frame)

    def _answer(self, frame):
        _, unique_id, action, payload = frame
        self.received_calls.append(frame)
        answer = self.responses.get(action, {})
        if callable(answer):
            answer = answer(payload)
        if answer is None:
            pass  # the test wants silence (e.g. to provoke a timeout)
        elif isinstance(answer, tuple) and answer and answer[0] == "CALLERROR":
            self.send_frame([4, unique_id, answer[1], answer[2] if len(answer) > 2 else "", {}])
        else:
            self.send_frame([3, unique_id, answer])
        waiters = self._call_waiters.get(action)
        if waiters:
            waiters.popleft().callback(payload)
        else:
            self._calls_by_action.setdefault(action, deque()).append(payload)

    def wait_for_call(self, action: str, timeout: float = DEFAULT_TIMEOUT) -> defer.Deferred:
        """Fires with the payload of the next CALL ``action`` from the CSMS (one already received counts)."""
        queued = self._calls_by_action.get(action)
        if queued:
            return defer.succeed(queued.popleft())
        d = defer.Deferred()
        self._call_waiters.setdefault(action, deque()).append(d)
        return d.addTimeout(timeout, self.factory.reactor)

    def next_unmatched(self, timeout: float = DEFAULT_TIMEOUT) -> defer.Deferred:
        """Fires with the next received frame that answers none of our calls (e.g. an error to garbage)."""
        if self._unmatched:
            return defer.succeed(self._unmatched.popleft())
        d = defer.Deferred()
        self._unmatched_waiters.append(d)
        return d.addTimeout(timeout, self.factory.reactor)

    # -- sending -----------------------------------------------------------------------------

    def send_frame(self, frame) -> None:
        self.sendMessage(json.dumps(frame).encode("utf-8"), isBinary=False)

    def send_raw(self, data, binary: bool = False) -> None:
        self.sendMessage(data if isinstance(data, bytes) else data.encode("utf-8"), isBinary=binary)

    def call_frame(self, action: str, payload: dict, unique_id: str | None = None,
                   timeout: float = DEFAULT_TIMEOUT) -> defer.Deferred:
        """Send a CALL; fires with the whole answer frame (CALLRESULT or CALLERROR)."""
        unique_id = unique_id or f"t{next(self._ids)}"
        d = defer.Deferred()
        self._pending[unique_id] = d
        self.send_frame([2, unique_id, action, payload])
        return d.addTimeout(timeout, self.factory.reactor)

    def call(self, action: str, payload: dict, timeout: float = DEFAULT_TIMEOUT) -> defer.Deferred:
        """Send a CALL; fires with the CALLRESULT payload, fails with CallErrorFrame on a CALLERROR."""
        def unwrap(frame):
            if frame[0] == 4:
                raise CallErrorFrame(frame)
            return frame[2]
        return self.call_frame(action, payload, timeout=timeout).addCallback(unwrap)

    def close(self) -> defer.Deferred:
        if not self.closed.called:
            self.sendClose(1000)
        return self.closed

    # -- reusable states (OCTT §3.22) --------------------------------------------------------

    @defer.inlineCallbacks
    def boot(self, connectors: int = 1, vendor: str = "TestVendor", model: str = "TestModel"):
        """The OCTT "Booted" state: BootNotification, then StatusNotification(Available) for 0..connectors."""
        response = yield self.call("BootNotification", {"chargePointVendor": vendor, "chargePointModel": model})
        for connector_id in range(connectors + 1):
            yield self.status(connector_id, "Available")
        return response

    def status(self, connector_id: int, status: str, error_code: str = "NoError", **extra) -> defer.Deferred:
        return self.call("StatusNotification", {"connectorId": connector_id, "status": status,
                                                "errorCode": error_code, **extra})


class TestStationFactory(WebSocketClientFactory):
    __test__ = False
    protocol = TestStationProtocol
    noisy = False


def connect_station(reactor, port: int, station_id: str, password: str | None = None,
                    protocols=("ocpp1.6",), host: str = "127.0.0.1", path_prefix: str = "/ocpp/",
                    username: str | None = None, timeout: float = DEFAULT_TIMEOUT, tls=None) -> defer.Deferred:
    """Connect a test station; fires with its protocol once open, fails with StationRefused.

    ``tls``: connect over TLS (wss) with these client options (``twisted.internet.ssl.optionsForClientTLS``,
    or any Twisted client TLS context factory); a handshake that fails is a StationRefused with status None.
    """
    headers = {}
    if password is not None:
        token = base64.b64encode(f"{username or station_id}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    from urllib.parse import quote
    url = f"{'wss' if tls is not None else 'ws'}://{host}:{port}{path_prefix}{quote(station_id, safe='')}"
    factory = TestStationFactory(url, protocols=list(protocols) or None, headers=headers, reactor=reactor)
    # One deadline for the whole connection: Autobahn's own handshake timeout (5 s) would end a
    # handshake that a busy Central System is still admitting, before ``timeout`` has passed.
    factory.setProtocolOptions(openHandshakeTimeout=timeout)
    factory.reactor = reactor
    factory.opened = defer.Deferred()
    if tls is not None:
        reactor.connectSSL(host, port, factory, tls)
    else:
        reactor.connectTCP(host, port, factory)
    return factory.opened.addTimeout(timeout, reactor)
