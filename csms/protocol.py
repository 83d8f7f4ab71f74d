"""The WebSocket side: Autobahn server protocol and factory, and station admission.

Admission (OCPP-J 1.6 §3): the framework checks what is protocol-level, the plugins decide the rest:
* at most ``[ocpp] max_connections`` open connections, and ``max_connections_per_address`` from one
  remote address, counted from TCP accept (handshakes in progress count); one more is aborted at once;
* the path is ``<path_prefix><chargePointId>``; the id is the percent-decoded (UTF-8) last segment and
  must be a storable, printable id (see :func:`charge_point_id_problem`), else 400;
* the client must offer the ``ocpp1.6`` subprotocol, which is echoed back (OCTT TC_088);
* then the ``csms_admit_station`` implementations admit, refuse or annotate the handshake (the Core
  plugin's: unknown stations per ``[ocpp] unknown_stations``, HTTP Basic auth passwords (OCTT TC_085));
  a refusal is recorded as a ``refused`` connection event with its detail;
* a second connection with the same id replaces the first;
* a connection that does not prove itself a working station within ``[ocpp] boot_timeout`` seconds is
  closed with 1008 (see :meth:`OCPPServerProtocol._boot_answer_seen` for the rule).
"""
from __future__ import annotations

import inspect

import autobahn.websocket.protocol as _autobahn_protocol
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure

from csms.admission import (AdmissionRefused, AdmissionRequest, ConnectionLimits, RefusedConnection,
                            charge_point_id_from_path, charge_point_id_problem, printable)
from csms.fastpath import FastPathGuard, frame_header, unmask, write_now
from csms.logs import trace_frame, trace_handshake
from csms.ocpp16 import utc_from_timestamp
from csms.session import StationSession
from csms.stations import UNRECORDED_END

log = Logger(namespace="csms.protocol")

# Autobahn pretty-prints every connection's options for a debug log line even when debug logging is
# off (about 1.6 ms of CPU per connection: 16 s in a 10,000-station reconnect storm). Hand the log
# the raw value instead; it is only formatted if a debug observer actually renders it.
_autobahn_protocol.pformat = lambda value: value

SUBPROTOCOL = "ocpp1.6"
CLOSE_REPLACED = 4000
#: RFC 6455 §7.4.1: the endpoint received a message that violates its policy.
CLOSE_POLICY_VIOLATION = 1008
#: RFC 6455 §7.4.1: the endpoint is going away (the Central System is shutting down).
CLOSE_GOING_AWAY = 1001
SHUTDOWN_REASON = "The Central System is shutting down"
BOOT_TIMEOUT_REASON = "No BootNotification accepted in time"
_OPEN = WebSocketProtocol.STATE_OPEN
_TEXT_FIN, _BINARY_FIN = 0x81, 0x82


class _DebugOnlyLog:
    """Autobahn's logger for a connection whose handshake the Central System refused: its lines at debug.

    The refusal is counted (``csms_ocpp_handshakes_refused_total``) and, but for a path that is no OCPP
    path and a stop under way, logged once at info where it is decided (an admission refusal is recorded
    as a connection event too); Autobahn would add an info line ("failing WebSocket opening handshake")
    and a warning ("dropping connection ... : Unauthorized") for each, and anyone can have a handshake
    refused at will (a wrong password, an unknown id)."""

    def __init__(self, logger):
        self._logger = logger

    def __getattr__(self, name):
        if name in ("info", "warn", "warning", "error", "critical"):
            return self._logger.debug
        return getattr(self._logger, name)


def _logged(result, what: str):
    """Log (and swallow) a failure to record a connection event: the connection itself goes on."""
    if isinstance(result, Failure):
        log.failure("Could not record the {what} connection event", result, what=what)
    return None


def tls_error_text(error) -> str | None:
    """OpenSSL's reasons for ``error`` ("http request", "certificate verify failed; ..."), or None when it
    is not a TLS error."""
    if not isinstance(error, SSL.Error):
        return None
    entries = error.args[0] if error.args and isinstance(error.args[0], list) else []
    reasons = [entry[2] for entry in entries if isinstance(entry, tuple) and len(entry) == 3 and entry[2]]
    return "; ".join(reasons) or str(error) or type(error).__name__


def _code_and_reason(code, reason) -> str:
    return f"code={code}" + (f" reason={printable(reason)}" if reason else "")


class OCPPServerProtocol(WebSocketServerProtocol):
    """One station's WebSocket connection; OCPP-J messages go to its :class:`StationSession`."""

    station_id: str | None = None
    session: StationSession | None = None
    #: What the plugins noted while admitting the station (see ``csms_admit_station``).
    admission: dict | None = None
    #: The station's registration status when it was admitted (the ``registration_status`` annotation).
    registration_status: str | None = None
    #: Whether this connection parses and frames simple messages itself (see :mod:`csms.fastpath`).
    fast_path = False
    replaced = False
    #: Whether every frame of this station is logged (``[ocpp] trace_stations``).
    traced = False
    #: Which of the station's connections this is (presence rows name it; see csms.cluster).
    connection_id: str | None = None
    _boot_deadline = None
    _counted = False
    #: Waiting for the plugins to have heard of this connection (see :meth:`announced`); None once they have.
    _announcing: list | None = None
    _counted_address: str | None = None

    def onConnect(self, request):
        return self._admit_handshake(request).addErrback(self._refused)

    def _refused(self, failure):
        """A refusal decided here was logged (at info) and counted where it was decided: Autobahn's own
        lines for this connection go to debug (:class:`_DebugOnlyLog`). A handshake Autobahn itself fails
        (not HTTP, no Upgrade header) keeps its lines: nothing else logs those."""
        if failure.check(ConnectionDeny):
            self.log = _DebugOnlyLog(self.log)
        return failure

    @defer.inlineCallbacks
    def _admit_handshake(self, request):
        app = self.factory.app
        ocpp = app.config.ocpp
        peer = request.peer
        try:
            station_id = self.factory.station_id_from_path(request.path)
            problem = None if station_id is None else charge_point_id_problem(
                station_id, ocpp.max_charge_point_id_length)
        except ValueError as exc:
            problem = str(exc)
        if problem is not None:
            log.info("Refused a connection from {peer}: {problem}", peer=peer, problem=problem)
            self.factory.count_refusal("invalid_station_id", 400)
            raise ConnectionDeny(400, problem)
        if station_id is None:
            self.factory.count_refusal("not_ocpp_path", 404)
            raise ConnectionDeny(404, "Not an OCPP endpoint: connect to " + ocpp.path_prefix + "<chargePointId>")
        if station_id in self.factory.trace_stations:
            self.traced = True
            trace_handshake(station_id, peer, request.path, request.headers)
        if self.factory.shutting_down:
            raise ConnectionDeny(503, SHUTDOWN_REASON)
        if SUBPROTOCOL not in request.protocols:
            log.info("Refused {station} from {peer}: subprotocol ocpp1.6 not offered ({offered})",
                     station=station_id, peer=peer, offered=request.protocols)
            self.factory.count_refusal("no_subprotocol", 400)
            raise ConnectionDeny(400, "The ocpp1.6 WebSocket subprotocol is required")
        try:
            annotations = yield app.admit(AdmissionRequest.from_handshake(station_id, request, self.transport))
        except AdmissionRefused as refusal:
            log.info("Refused {station} from {peer}: {detail}", station=station_id, peer=peer, detail=refusal.detail)
            self.factory.count_refusal("not_admitted", refusal.status)
            yield app.station_store.record_event(station_id, "refused", peer, refusal.detail)
            raise ConnectionDeny(refusal.status, refusal.reason) from None
        self.station_id = station_id
        self.admission = annotations
        self.registration_status = annotations.get("registration_status")
        return SUBPROTOCOL

    def succeedHandshake(self, res):
        """Autobahn's, unless the connection ended while ``onConnect`` waited for the admission.

        Autobahn completes the handshake whenever ``onConnect`` answers, even on a connection that is
        already gone: it would set the state back to open, and :meth:`onOpen` would record a station as
        connected that no one can reach (and the TCP loss reported after a drop would resolve
        ``is_closed`` a second time). A closed connection stays closed."""
        if self.state == WebSocketProtocol.STATE_CLOSED:
            log.info("{station} left during its admission ({peer}); nothing opened",
                     station=self.station_id, peer=self.peer)
            return None
        return super().succeedHandshake(res)

    def connectionMade(self):
        super().connectionMade()
        self.factory.protocols.add(self)
        # Autobahn applies tcpNoDelay before it copies the factory's options onto the protocol, and
        # swallows the error: Nagle stays on and a small write behind an unacknowledged one waits for
        # the peer's delayed ACK (40 ms). Set it here, on the socket itself.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass  # not a TCP socket after all (or already gone)

    def connectionLost(self, reason):
        tls_error = tls_error_text(reason.value)
        if tls_error is not None:
            # Autobahn logs a connection lost to a TLS error at error level, one line each: anyone who can
            # reach a TLS port makes one at will (plain HTTP, an old version, a refused certificate, a bad
            # record), and it is no fault of the Central System. The TLS listener counts them and sums them
            # up (the security plugin's: docs/security.md); Autobahn is told of a lost connection (logged at
            # debug), and the disconnect's detail keeps what TLS said.
            if self.wasNotCleanReason is None:
                self.wasNotCleanReason = f"TLS error: {tls_error}"
            reason = Failure(ConnectionLost(f"TLS error: {tls_error}"))
        try:
            super().connectionLost(reason)
        finally:
            if self._boot_deadline is not None and self._boot_deadline.active():
                self._boot_deadline.cancel()
            self._boot_deadline = None
            if self._counted:
                self._counted = False
                self.factory.limits.release(self._counted_address)
            self.factory.protocol_gone(self)

    def onOpen(self):
        app = self.factory.app
        ocpp = app.config.ocpp
        station_id = self.station_id
        self.fast_path = self.factory.fast_path.allows(self)
        dispatch = app.dispatch
        if ocpp.boot_timeout > 0:
            dispatch = self._dispatch_watching_boot
            self._boot_deadline = app.clock.callLater(ocpp.boot_timeout, self._boot_deadline_passed)
        send = self._send_text if self.fast_path else self._send_message
        if self.traced:
            send = self._tracing(send)
        self.session = StationSession(app, station_id, dispatch, send, self.peer, self, self.admission)
        self.session.last_seen = app.clock.seconds()
        self.connection_id = app.cluster.new_connection_id()
        previous = self.factory.connections.get(station_id)
        self.factory.connections[station_id] = self
        app.sessions[station_id] = self.session
        # Plugins hear of a connection change only once it is recorded, in the order it happened: after
        # the end of the station's previous connection here, when that is still being recorded.
        d = self.factory.closing_recorded(station_id)
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
        # In a cluster the presence row is written with the event; it knows the node that held the station.
        claim = app.cluster.presence_claim(station_id, self.connection_id)
        held_here = app.cluster.node if previous is not None else None
        d.addCallback(lambda _: app.station_store.record_connected(station_id, self.peer, also=claim,
                                                                   replacing=previous is not None,
                                                                   node=app.cluster.node))
        d.addCallbacks(self._lost_end_told, lambda failure: _logged(failure, "connected") or (None, None))
        d.addCallback(lambda held_before: held_before if claim is not None else held_here)
        d.addCallback(lambda previous_node: app.cluster.station_arrived(station_id, previous_node))
        d.addCallback(lambda _: app.fire("csms_on_station_connected", station_id=station_id, station=self.session))
        self._announcing = []
        d.addBoth(self._announced_now)
        if self.factory.shutting_down:  # admitted while the Central System began to stop
            self.go_away()

    def _lost_end_told(self, recorded):
        """After the connection is recorded: a previous connection's end recorded with it (lost with the
        process that held it, see StationStore.record_connected) is told as its disconnection."""
        held_before, ended = recorded
        if ended != UNRECORDED_END:  # none, or "replaced": told by the node that held the connection
            return held_before
        log.info("{station}: its previous connection ended without being recorded (the Central System "
                 "stopped while it was connected); recorded now", station=self.station_id)
        d = self.factory.app.fire("csms_on_station_disconnected", station_id=self.station_id, reason=ended)
        return d.addCallback(lambda _: held_before)

    def _announced_now(self, _) -> None:
        waiting, self._announcing = self._announcing or [], None
        for waiter in waiting:
            if not waiter.called:  # one given up on (a timeout) was cancelled
                waiter.callback(None)

    def announced(self) -> defer.Deferred:
        """Fires once this connection is recorded and every ``csms_on_station_connected`` listener is done
        with it (at once if it already is): what they write then is committed. Deleting the station
        waits for it, so that nothing they write outlives the deletion."""
        if self._announcing is None:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._announcing.append(waiter)
        return waiter

    def replaced_elsewhere(self, node: str) -> None:
        """The station connected to another node of the cluster: close this older connection as a
        newer one on the same node would (its presence now names the other node: left alone)."""
        if self.session is None or self.replaced:
            return
        app = self.factory.app
        station_id = self.station_id
        log.info("{station} connected to node {node}; closing its connection here", station=station_id, node=node)
        self.replaced = True
        self.session.connection_lost()
        if self.factory.connections.get(station_id) is self:
            del self.factory.connections[station_id]
            app.sessions.pop(station_id, None)
        self.sendClose(CLOSE_REPLACED, "Replaced by a newer connection")
        # The other node recorded this connection's end (``replaced``) with its own connection.
        app.fire("csms_on_station_disconnected", station_id=station_id, reason="replaced")

    # -- shutdown ---------------------------------------------------------------------------------

    def go_away(self) -> None:
        """Stop taking the station's calls, let the one being handled be answered, then close with 1001
        (going away: the station reconnects, to another instance behind the same address if there is one)."""
        if self.session is None or self.state != _OPEN:
            return
        self.session.stop_accepting().addCallback(self._close_going_away)

    def _close_going_away(self, _=None) -> None:
        if self.state == _OPEN:
            # 1001 is not one of the codes sendClose lets an application send; sendCloseFrame sends any.
            self.sendCloseFrame(code=CLOSE_GOING_AWAY, reasonUtf8=SHUTDOWN_REASON.encode(), isReply=False)

    # -- the boot deadline -----------------------------------------------------------------------

    def _dispatch_watching_boot(self, session, action: str, payload: dict):
        """``app.dispatch``, watching the answers while the boot deadline runs; one attribute test after."""
        result = self.factory.app.dispatch(session, action, payload)
        if self._boot_deadline is None:
            return result
        if isinstance(result, defer.Deferred):
            return result.addCallback(self._boot_answer_seen, action)
        if inspect.isawaitable(result):
            return defer.ensureDeferred(result).addCallback(self._boot_answer_seen, action)
        return self._boot_answer_seen(result, action)

    def _boot_answer_seen(self, answer, action: str):
        """Stop or move the boot deadline on the answer to one of the station's calls; returns ``answer``.

        The rule: a connection must show within ``boot_timeout`` seconds that a working station is on
        it. A BootNotification answered Accepted does (OCPP 1.6 §4.2). So does any other call answered
        with a CALLRESULT when the station's registration is Accepted: a station that reconnects
        without rebooting does not boot again (§4.2 asks for a BootNotification at each boot, not at
        each connection). A BootNotification answered Pending or Rejected restarts the deadline with
        the ``interval`` the answer gave on top, since the station must boot again after it: a
        station waiting for an operator keeps its connection as long as it keeps retrying.
        """
        if self._boot_deadline is None or not isinstance(answer, dict):
            return answer
        if action == "BootNotification":
            status = answer.get("status")
            if status == "Accepted":
                self._stop_boot_deadline()
            elif status in ("Pending", "Rejected"):
                interval = answer.get("interval")
                retry = interval if type(interval) is int and interval > 0 else 0
                self._stop_boot_deadline()
                self._boot_deadline = self.factory.app.clock.callLater(
                    self.factory.app.config.ocpp.boot_timeout + retry, self._boot_deadline_passed)
        elif self.registration_status == "Accepted":
            self._stop_boot_deadline()
        return answer

    def _stop_boot_deadline(self) -> None:
        if self._boot_deadline.active():
            self._boot_deadline.cancel()
        self._boot_deadline = None

    def _boot_deadline_passed(self) -> None:
        self._boot_deadline = None
        if self.state != _OPEN:
            return
        log.info("Closing the connection of {station} from {peer}: no BootNotification accepted in time",
                 station=self.station_id, peer=self.peer)
        # 1008 is not one of the codes sendClose lets an application send; sendCloseFrame sends any.
        self.sendCloseFrame(code=CLOSE_POLICY_VIOLATION, reasonUtf8=BOOT_TIMEOUT_REASON.encode(), isReply=False)

    # -- outgoing messages -----------------------------------------------------------------------

    def _send_message(self, data: bytes) -> None:
        """Send one text message (UTF-8 bytes) through Autobahn."""
        self.sendMessage(data, isBinary=False)

    def _tracing(self, send):
        def traced_send(data: bytes) -> None:
            trace_frame(self.station_id, "sent", data)
            send(data)
        return traced_send

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
        if (self.fast_path and self.state == _OPEN and self.current_frame is None and not self.data
                and not self.inside_message and self._perMessageCompress is None):
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
        if self.traced:
            trace_frame(self.station_id, "received", text)
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
        if self.session is None or self.replaced:
            return
        app = self.factory.app
        station_id = self.station_id
        self.session.connection_lost()
        current = self.factory.connections.get(station_id) is self
        if current:
            del self.factory.connections[station_id]
            app.sessions.pop(station_id, None)
        detail = self.close_detail(wasClean, code, reason)
        log.info("{station} disconnected ({detail})", station=station_id, detail=detail)
        last_seen = utc_from_timestamp(self.session.last_seen)
        release = app.cluster.presence_release(station_id, self.connection_id)
        d = app.station_store.record_event(station_id, "disconnected", self.peer, detail,
                                           touch="last_disconnected_at", also=release)
        self.factory.closing(station_id, d)
        d.addCallback(lambda released: released if release is not None else current)
        d.addCallback(lambda released: app.station_store.touch_last_seen(station_id, last_seen).addCallback(
            lambda _: released))
        d.addErrback(lambda failure: _logged(failure, "disconnected") or current)
        d.addCallback(lambda released: app.cluster.station_left(station_id, released))
        d.addCallback(lambda _: app.fire("csms_on_station_disconnected", station_id=station_id, reason=detail))

    def close_detail(self, was_clean: bool, code, reason) -> str:
        """How the connection ended, for the connection event and ``csms_on_station_disconnected``.

        Who closed it and how: the Central System (with the code it sent), the station with a close
        code, the station with a close frame that has none (1005, RFC 6455 §7.1.5), or nobody: the
        TCP connection was lost without a closing handshake (1006).
        """
        if getattr(self, "closedByMe", False):
            sent = getattr(self, "localCloseReason", None)
            return "closed by the Central System: " + _code_and_reason(
                getattr(self, "localCloseCode", None), sent.decode("utf-8", "replace") if sent else None)
        if not was_clean:
            return f"connection lost (1006): {printable(reason or 'no closing handshake')}"
        if code is None:
            return "closed by the station without a status code (1005)"
        return "closed by the station: " + _code_and_reason(code, reason)


class OCPPServerFactory(WebSocketServerFactory):
    protocol = OCPPServerProtocol
    noisy = False

    def __init__(self, app, reactor=None):
        super().__init__(reactor=reactor or app.reactor)
        self.app = app
        self.reactor = reactor or app.reactor
        #: station id -> its live protocol
        self.connections: dict[str, OCPPServerProtocol] = {}
        #: station id -> fires once the end of its last connection here is recorded (while it is being recorded)
        self._closing: dict[str, defer.Deferred] = {}
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
        self.limits = ConnectionLimits(app.clock, ocpp.max_connections, ocpp.max_connections_per_address)
        self.fast_path = FastPathGuard(self)
        self.trace_stations = frozenset(ocpp.trace_stations)
        #: Every connection from TCP accept to its loss, handshakes in progress included.
        self.protocols: set = set()
        self.shutting_down = False
        self._all_gone: list[defer.Deferred] = []

    def shut_down(self) -> defer.Deferred:
        """Close every station gracefully (see :meth:`OCPPServerProtocol.go_away`); fires once every
        connection is gone. A handshake still in progress is dropped: the station retries elsewhere."""
        self.shutting_down = True
        for protocol in list(self.protocols):
            if protocol.state == _OPEN and protocol.session is not None:
                protocol.go_away()
            else:
                protocol.dropConnection(abort=True)
        d = defer.Deferred()
        self._all_gone.append(d)
        self._check_all_gone()
        return d

    def abandon(self) -> int:
        """Drop every connection still open (the shutdown grace is over); returns how many there were."""
        remaining = list(self.protocols)
        for protocol in remaining:
            protocol.dropConnection(abort=True)
        return len(remaining)

    def closing(self, station_id: str, recording: defer.Deferred) -> None:
        """A connection of ``station_id`` closed and ``recording`` records its end: see closing_recorded."""
        recorded = self._closing[station_id] = defer.Deferred()

        def done(result):
            if self._closing.get(station_id) is recorded:
                del self._closing[station_id]
            recorded.callback(None)
            return result
        recording.addBoth(done)

    def closing_recorded(self, station_id: str) -> defer.Deferred:
        """Fires once the end of the station's last connection here is recorded (at once when it is): a
        new connection is recorded after it, so that its events keep their order and the new connection
        does not take the old one for lost (StationStore.record_connected)."""
        recorded = self._closing.get(station_id)
        if recorded is None:
            return defer.succeed(None)
        waiter = defer.Deferred()
        recorded.addCallback(lambda _: waiter.callback(None))
        return waiter

    def protocol_gone(self, protocol) -> None:
        self.protocols.discard(protocol)
        self._check_all_gone()

    def _check_all_gone(self) -> None:
        if not self.protocols and self._all_gone:
            waiting, self._all_gone = self._all_gone, []
            for d in waiting:
                d.callback(None)

    def buildProtocol(self, addr):
        """A protocol for a connection just accepted, or a :class:`RefusedConnection` over the limits."""
        address = getattr(addr, "host", None)
        if not self.limits.admit(address):
            self.count_refusal("connection_limit")
            return RefusedConnection()
        protocol = super().buildProtocol(addr)
        protocol._counted = True
        protocol._counted_address = address
        return protocol

    def count_refusal(self, reason: str, status: int | None = None) -> None:
        """A handshake refused (``reason``: docs/metrics.md lists them), for ``csms_ocpp_handshakes_refused``."""
        metrics = self.app.metrics.ocpp
        if metrics is not None:
            metrics.handshake_refused(reason, status)

    def stopFactory(self):
        self.limits.stop()
        super().stopFactory()

    def station_id_from_path(self, path: str) -> str | None:
        """See :func:`charge_point_id_from_path` (ValueError for an id that is not UTF-8)."""
        return charge_point_id_from_path(path, self.app.config.ocpp.path_prefix)
