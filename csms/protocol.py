"""The WebSocket side: Autobahn server protocol and factory, and station admission.

Admission (OCPP-J 1.6 §3; OCPP 1.6 Security whitepaper, profile 1):
* the path is ``<path_prefix><chargePointId>``; the id is the percent-decoded last segment;
* the client must offer the ``ocpp1.6`` subprotocol, which is echoed back (OCTT TC_088);
* an unknown station is registered, registered as Pending, or refused, per ``[ocpp] unknown_stations``;
* a station with a password must present it with HTTP Basic auth, username = its id (OCTT TC_085);
* a second connection with the same id replaces the first.
"""
from __future__ import annotations

import base64
import binascii
from urllib.parse import unquote, urlsplit

import autobahn.websocket.protocol as _autobahn_protocol
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer, tcp, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from csms.ocpp16 import utc_from_timestamp
from csms.passwords import verify_password
from csms.rpc import OCPPSession

log = Logger(namespace="csms.protocol")

# Autobahn pretty-prints every connection's options for a debug log line even when debug logging is
# off (about 1.6 ms of CPU per connection: 16 s in a 10,000-station reconnect storm). Hand the log
# the raw value instead; it is only formatted if a debug observer actually renders it.
_autobahn_protocol.pformat = lambda value: value

SUBPROTOCOL = "ocpp1.6"
CLOSE_REPLACED = 4000
_OPEN = WebSocketProtocol.STATE_OPEN
_TEXT_FIN, _BINARY_FIN = 0x81, 0x82


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR a client frame's payload with its 4-byte mask (RFC 6455 §5.3), as one big-integer XOR in C."""
    n = len(payload)
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def frame_header(length: int, opcode_fin: int = _TEXT_FIN) -> bytes:
    """The header of an unmasked server-to-client frame (RFC 6455 §5.2) carrying ``length`` bytes."""
    if length < 126:
        return bytes((opcode_fin, length))
    if length < 65536:
        return bytes((opcode_fin, 126)) + length.to_bytes(2, "big")
    return bytes((opcode_fin, 127)) + length.to_bytes(8, "big")


def write_now(transport, data: bytes) -> None:
    """``transport.write(data)``, but onto the socket at once when nothing is queued before it.

    Twisted queues every write until the reactor's next turn, which costs two epoll changes and a
    write event per reply. On a plain TCP connection with an empty buffer the kernel almost always
    takes a whole OCPP reply, so try that first; whatever is left (or any socket error, which Twisted
    then reports the usual way) goes through ``transport.write``.
    """
    if (type(transport) is tcp.Server and transport.connected and not transport.disconnecting
            and not transport.dataBuffer and not transport._tempDataBuffer):
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


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


def _logged(result, what: str):
    """Log (and swallow) a failure to record a connection event: the connection itself goes on."""
    if isinstance(result, Failure):
        log.failure("Could not record the {what} connection event", result, what=what)
    return None


class OCPPServerProtocol(WebSocketServerProtocol):
    """One station's WebSocket connection; OCPP-J messages go to its :class:`OCPPSession`."""

    station_id: str | None = None
    session: OCPPSession | None = None

    @defer.inlineCallbacks
    def onConnect(self, request):
        app = self.factory.app
        ocpp = app.config.ocpp
        station_id = self.factory.station_id_from_path(request.path)
        peer = request.peer
        if station_id is None:
            raise ConnectionDeny(404, "Not an OCPP endpoint: connect to " + ocpp.path_prefix + "<chargePointId>")
        if not station_id or len(station_id) > ocpp.max_charge_point_id_length:
            raise ConnectionDeny(400, f"chargePointId must be 1 to {ocpp.max_charge_point_id_length} characters")
        if SUBPROTOCOL not in request.protocols:
            log.info("Refused {station} from {peer}: subprotocol ocpp1.6 not offered ({offered})",
                     station=station_id, peer=peer, offered=request.protocols)
            raise ConnectionDeny(400, "The ocpp1.6 WebSocket subprotocol is required")
        policy = ocpp.unknown_stations
        register_as = None if policy == "reject" else ("Pending" if policy == "pending" else "Accepted")
        admission = yield app.station_store.admit(station_id, register_as)
        if admission is None:
            yield app.station_store.record_event(station_id, "refused", peer, "unknown station")
            log.info("Refused unknown station {station} from {peer}", station=station_id, peer=peer)
            raise ConnectionDeny(404, "Unknown charge point")
        _, password_hash, registered = admission
        if registered:
            log.info("Registered unknown station {station} ({policy})", station=station_id, policy=policy)
        if password_hash is not None:
            credentials = parse_basic_auth(request.headers.get("authorization"))
            ok = False
            if credentials is not None and credentials[0] == station_id:
                ok = yield threads.deferToThreadPool(
                    self.factory.reactor, self.factory.reactor.getThreadPool(),
                    verify_password, credentials[1], password_hash)
            if not ok:
                yield app.station_store.record_event(station_id, "refused", peer, "bad credentials")
                log.info("Refused {station} from {peer}: missing or wrong Basic auth credentials",
                         station=station_id, peer=peer)
                raise ConnectionDeny(401, "Unauthorized")
        elif ocpp.require_password:
            yield app.station_store.record_event(station_id, "refused", peer, "no password set")
            raise ConnectionDeny(401, "Unauthorized: this station has no password")
        self.station_id = station_id
        return SUBPROTOCOL

    def connectionMade(self):
        super().connectionMade()
        # Autobahn applies tcpNoDelay before it copies the factory's options onto the protocol, and
        # swallows the error: Nagle stays on and a small write behind an unacknowledged one waits for
        # the peer's delayed ACK (40 ms). Set it here, on the socket itself.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass  # not a TCP socket after all (or already gone)

    def onOpen(self):
        app = self.factory.app
        station_id = self.station_id
        self.session = OCPPSession(station_id, app.dispatch, self._send_text, app.clock,
                                   app.config.ocpp.response_timeout, handler_timeout=app.config.ocpp.handler_timeout)
        self.session.app = app
        self.session.peer = self.peer
        self.session.protocol = self
        self.session.last_seen = app.clock.seconds()
        previous = self.factory.connections.get(station_id)
        self.factory.connections[station_id] = self
        app.sessions[station_id] = self.session
        # Plugins hear of a connection change only once it is recorded, in the order it happened.
        d = defer.succeed(None)
        if previous is not None:
            log.info("{station} connected again from {peer}; closing its previous connection",
                     station=station_id, peer=self.peer)
            previous.replaced = True
            previous.session.connection_lost()
            previous.sendClose(CLOSE_REPLACED, "Replaced by a newer connection")
            d.addCallback(lambda _: app.station_store.record_event(station_id, "replaced", previous.peer))
            d.addBoth(_logged, "replaced")
            # As csms_on_station_disconnected promises; told before the new connection's event.
            d.addCallback(lambda _: app.fire("csms_on_station_disconnected", station_id=station_id,
                                             reason="replaced"))
        log.info("{station} connected from {peer}", station=station_id, peer=self.peer)
        d.addCallback(lambda _: app.station_store.record_event(station_id, "connected", self.peer,
                                                               touch="last_connected_at"))
        d.addBoth(_logged, "connected")
        d.addCallback(lambda _: app.fire("csms_on_station_connected", station=self.session))

    def _send_text(self, data: bytes) -> None:
        """Send one text message (UTF-8 bytes): framed here in the steady state, else by Autobahn."""
        if self.state != _OPEN or self._perMessageCompress is not None or self.send_queue or self.autoFragmentSize:
            self.sendMessage(data, isBinary=False)
            return
        write_now(self.transport, frame_header(len(data)) + data)

    # Incoming frames. In the steady state almost every frame is a whole, masked, unfragmented text
    # frame that arrives in one read; those are parsed here, in a few lines, instead of going through
    # Autobahn's general frame machine (about a third of the per-message CPU). Anything else (a
    # control frame, a fragment, a partial frame, an oversized or invalid one) goes to Autobahn with
    # everything after it, so the protocol's rules and error handling stay Autobahn's.

    def _dataReceived(self, data: bytes) -> None:
        if (self.state == _OPEN and self.current_frame is None and not self.data and not self.inside_message
                and self._perMessageCompress is None):
            data = self._fast_frames(data)
            if not data:
                return
        super()._dataReceived(data)

    def _fast_frames(self, data: bytes) -> bytes:
        """Handle the whole simple frames at the start of ``data``; return what is left for Autobahn."""
        pos, end = 0, len(data)
        limit = self.maxMessagePayloadSize
        while end - pos >= 6:
            first, second = data[pos], data[pos + 1]
            if (first != _TEXT_FIN and first != _BINARY_FIN) or not second & 0x80:
                break
            length = second & 0x7F
            if length < 126:
                start = pos + 6
            elif length == 126 and end - pos >= 8:
                length = (data[pos + 2] << 8) | data[pos + 3]
                if length < 126:
                    break  # not the minimal encoding: Autobahn fails the connection
                start = pos + 8
            else:
                break
            stop = start + length
            if stop > end or 0 < limit < length:
                break
            payload = unmask(data[start:stop], data[start - 4:start])
            if first == _TEXT_FIN:
                try:
                    payload = payload.decode("utf-8")
                except UnicodeDecodeError:
                    break  # Autobahn closes with 1007, as for any text frame that is not UTF-8
            pos = stop
            if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                self._cancelAutoPingTimeoutCall()
            self._message_received(payload)
            if self.state != _OPEN:
                return b""
        return data[pos:] if pos else data

    def _message_received(self, text) -> None:
        session = self.session
        if session is None:
            return
        session.last_seen = self.factory.app.clock.seconds()
        if type(text) is bytes:
            # OCPP-J uses text frames; some firmwares send JSON in binary ones. Be lenient.
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                text = ""  # answered as FormationViolation
        session.text_received(text)

    def onMessage(self, payload: bytes, isBinary: bool):
        """Autobahn's path (for what :meth:`_fast_frames` leaves to it): same handling."""
        if isBinary:
            log.debug("{station} sent a binary frame; reading it as text", station=self.station_id)
        else:
            # Autobahn has validated the UTF-8 of a text message already.
            payload = payload.decode("utf-8")
        self._message_received(payload)

    def onClose(self, wasClean, code, reason):
        if self.session is None:
            return
        app = self.factory.app
        station_id = self.station_id
        if getattr(self, "replaced", False):
            return
        self.session.connection_lost()
        if self.factory.connections.get(station_id) is self:
            del self.factory.connections[station_id]
            app.sessions.pop(station_id, None)
        detail = f"code={code} reason={reason}" if code is not None else "connection lost"
        log.info("{station} disconnected ({detail})", station=station_id, detail=detail)
        last_seen = utc_from_timestamp(self.session.last_seen)
        d = app.station_store.record_event(station_id, "disconnected", self.peer, detail,
                                           touch="last_disconnected_at")
        d.addCallback(lambda _: app.station_store.touch_last_seen(station_id, last_seen))
        d.addBoth(_logged, "disconnected")
        d.addCallback(lambda _: app.fire("csms_on_station_disconnected", station_id=station_id, reason=detail))


class OCPPServerFactory(WebSocketServerFactory):
    protocol = OCPPServerProtocol
    noisy = False

    def __init__(self, app, reactor=None):
        super().__init__(reactor=reactor or app.reactor)
        self.app = app
        self.reactor = reactor or app.reactor
        #: station id -> its live protocol
        self.connections: dict[str, OCPPServerProtocol] = {}
        ocpp = app.config.ocpp
        self.setProtocolOptions(
            maxMessagePayloadSize=ocpp.max_message_size,
            maxFramePayloadSize=ocpp.max_message_size,
            autoPingInterval=ocpp.auto_ping_interval or None,
            autoPingTimeout=ocpp.auto_ping_timeout or None,
            openHandshakeTimeout=ocpp.open_handshake_timeout,
            tcpNoDelay=True,
            # Close a failed connection with a close frame carrying the reason (e.g. 1009 for an
            # oversized message) instead of dropping TCP, so the station can tell what went wrong.
            failByDrop=False,
            # Autobahn's closing-handshake timer runs on txaio's batched timers, which round the
            # deadline down to a whole second: with the default 1 s it can fire at once and abort
            # the connection while the close frame (and its code) is still queued. 5 s leaves 4.
            closeHandshakeTimeout=5,
        )

    def station_id_from_path(self, path: str) -> str | None:
        prefix = self.app.config.ocpp.path_prefix
        path = urlsplit(path).path
        if not path.startswith(prefix):
            return None
        rest = path[len(prefix):]
        if "/" in rest.rstrip("/"):
            rest = rest.rstrip("/").rsplit("/", 1)[1]
        return unquote(rest.rstrip("/"))
