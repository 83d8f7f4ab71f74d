"""OCPP-J 1.6 RPC (OCPP-J 1.6 §4): CALL / CALLRESULT / CALLERROR framing over one station's connection.

:class:`OCPPSession` knows nothing of WebSockets: it is given text and a ``send`` callable, so it is
tested on a fake transport with a :class:`twisted.internet.task.Clock`.

* Inbound CALLs are validated, handled one at a time in arrival order (a StopTransaction that follows
  its StartTransaction never overtakes it), and answered; every bad message gets a CALLERROR with the
  code OCPP-J names and the connection stays up.
* Outbound CALLs (:meth:`OCPPSession.call`) are validated, queued, and sent one at a time
  (OCPP-J 1.6 §4.1.1: one CALL in flight per side); each returns a Deferred firing with the validated
  response payload or failing with :class:`CallErrorReceived`, :class:`CallTimeout`,
  :class:`ResponseInvalid` or :class:`StationOffline`.
"""
from __future__ import annotations

import inspect
import json
import uuid
from collections import deque

import orjson

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from csms.schemas import SchemaViolation, schemas

CALL, CALLRESULT, CALLERROR = 2, 3, 4
MAX_UNIQUE_ID_LENGTH = 36
UNREADABLE_ID = "-1"

log = Logger(namespace="csms.rpc")


class CallError(Exception):
    """Raise from a handler to answer a CALL with CALLERROR ``code``; also the base of received errors."""

    def __init__(self, code: str, description: str = "", details: dict | None = None):
        super().__init__(f"{code}: {description}" if description else code)
        self.code = code
        self.description = description
        self.details = details or {}


class CallErrorReceived(CallError):
    """The station answered our CALL with a CALLERROR."""


class CallTimeout(Exception):
    """The station did not answer our CALL within the response timeout."""


class StationOffline(Exception):
    """The station is not connected (or disconnected before it answered)."""


class RequestInvalid(Exception):
    """A request the CSMS was asked to send does not match the action's schema; nothing was sent."""

    def __init__(self, action: str, code: str, message: str):
        super().__init__(f"{action}: {message}")
        self.action = action
        self.code = code
        self.message = message


class ResponseInvalid(Exception):
    """The station's CALLRESULT does not match the action's response schema."""

    def __init__(self, action: str, code: str, message: str, payload):
        super().__init__(f"{action} response: {message}")
        self.action = action
        self.code = code
        self.message = message
        self.payload = payload


class _PendingCall:
    __slots__ = ("unique_id", "action", "payload", "deferred", "timer")

    def __init__(self, action: str, payload: dict):
        self.unique_id = str(uuid.uuid4())
        self.action = action
        self.payload = payload
        self.deferred: defer.Deferred = defer.Deferred()
        self.timer = None


def encode(message: list) -> bytes:
    """Compact UTF-8 JSON. orjson does it in C; anything it refuses (an integer wider than 64 bits from a
    plugin, say) goes through the standard library, which accepts whatever JSON can express."""
    try:
        return orjson.dumps(message)
    except TypeError:
        return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode(text: str | bytes):
    """Parse one OCPP-J message; ValueError if it is not JSON.

    orjson first; the standard library for what orjson alone refuses (integers wider than 64 bits,
    NaN), so that such a message reaches schema validation and gets its proper CALLERROR code.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


class OCPPSession:
    """The RPC state of one connected station.

    ``dispatch(session, action, payload)`` handles a validated inbound CALL and returns (a Deferred
    of) the response payload, or raises :class:`CallError`.
    """

    #: Where action schemas come from; a station's session has its Central System's (plugin actions too).
    schemas = schemas

    def __init__(self, station_id: str, dispatch, send, clock, response_timeout: float):
        """``send(data: bytes)`` puts one UTF-8 JSON text message on the wire."""
        self.station_id = station_id
        self._dispatch = dispatch
        self._send = send
        self._clock = clock
        self._response_timeout = response_timeout
        #: Inbound CALLs waiting for the one being handled; see :meth:`_call_received`.
        self._inbound_queue: deque = deque()
        self._inbound_busy = False
        self._queue: deque[_PendingCall] = deque()
        self._in_flight: _PendingCall | None = None
        self.connected = True
        #: Counters an operator (and the benchmark) can read.
        self.stats = {"calls_in": 0, "calls_out": 0, "errors_sent": 0}

    # -- inbound -----------------------------------------------------------------------------

    def text_received(self, text: str | bytes) -> None:
        try:
            message = decode(text)
        except ValueError:
            self._send_error(UNREADABLE_ID, "FormationViolation", "Message is not valid JSON")
            return
        if not isinstance(message, list) or len(message) < 3:
            self._send_error(self._readable_id(message), "FormationViolation",
                             "Message must be a JSON array [MessageTypeId, UniqueId, ...]")
            return
        type_id, unique_id = message[0], message[1]
        if not isinstance(unique_id, str) or not unique_id:
            self._send_error(UNREADABLE_ID, "FormationViolation", "UniqueId must be a non-empty string")
            return
        if len(unique_id) > MAX_UNIQUE_ID_LENGTH:
            self._send_error(unique_id, "FormationViolation",
                             f"UniqueId is longer than {MAX_UNIQUE_ID_LENGTH} characters")
            return
        if type_id == CALL and not isinstance(type_id, bool):
            self._call_received(message)
        elif type_id == CALLRESULT and not isinstance(type_id, bool):
            self._result_received(message)
        elif type_id == CALLERROR and not isinstance(type_id, bool):
            self._error_received(message)
        else:
            self._send_error(unique_id, "ProtocolError", f"Unknown MessageTypeId {type_id!r}")

    @staticmethod
    def _readable_id(message) -> str:
        if isinstance(message, list) and len(message) > 1 and isinstance(message[1], str) \
                and 0 < len(message[1]) <= MAX_UNIQUE_ID_LENGTH:
            return message[1]
        return UNREADABLE_ID

    def _call_received(self, message: list) -> None:
        unique_id = message[1]
        if len(message) != 4:
            self._send_error(unique_id, "FormationViolation", "A CALL is [2, UniqueId, Action, Payload]")
            return
        action, payload = message[2], message[3]
        if not isinstance(action, str):
            self._send_error(unique_id, "FormationViolation", "Action must be a string")
            return
        if not isinstance(payload, dict):
            self._send_error(unique_id, "FormationViolation", "Payload must be a JSON object")
            return
        self.stats["calls_in"] += 1
        # One inbound call at a time, in arrival order (a StopTransaction never overtakes its
        # StartTransaction). A call answered synchronously (Heartbeat, a cached Authorize) is answered
        # right here, with no Deferred between the frame and the reply.
        if self._inbound_busy:
            self._inbound_queue.append((unique_id, action, payload))
        else:
            self._run_calls(unique_id, action, payload)

    def _run_calls(self, unique_id: str, action: str, payload: dict) -> None:
        while True:
            if self._handle_call(unique_id, action, payload) is not None:
                # Still waiting (on the database, a plugin...): the next call waits for this one,
                # and _answer takes it up once this one is answered.
                self._inbound_busy = True
                return
            if not self._inbound_queue:
                return
            unique_id, action, payload = self._inbound_queue.popleft()

    def _call_finished(self) -> None:
        self._inbound_busy = False
        if self._inbound_queue:
            self._run_calls(*self._inbound_queue.popleft())

    def _handle_call(self, unique_id: str, action: str, payload: dict) -> defer.Deferred | None:
        """Answer one CALL; None when answered already, else a Deferred that fires once it is."""
        try:
            if self.schemas.has_request(action):
                self.schemas.validate_request(action, payload)
        except SchemaViolation as exc:
            self._send_error(unique_id, exc.code, exc.message)
            return None
        try:
            result = self._dispatch(self, action, payload)
        except Exception:
            self._reply_failure(Failure(), unique_id, action)
            return None
        if type(result) is dict or not (isinstance(result, defer.Deferred) or inspect.isawaitable(result)):
            self._reply(result, unique_id, action)
            return None
        if not isinstance(result, defer.Deferred):
            result = defer.ensureDeferred(result)
        answered: list = []
        result.addBoth(self._answer, unique_id, action, answered)
        if answered:
            return None
        answered.append(False)  # answered later: _answer then lets the next inbound call run
        return result

    def _answer(self, outcome, unique_id: str, action: str, answered: list) -> None:
        """Send the answer (or the CALLERROR) once the handler's Deferred fires. The chain ends here:
        nothing after it sees this call's outcome."""
        try:
            if isinstance(outcome, Failure):
                self._reply_failure(outcome, unique_id, action)
            else:
                self._reply(outcome, unique_id, action)
        except Exception:
            log.failure("Answering {action} from {station} failed", action=action, station=self.station_id)
        if answered:
            self._call_finished()  # it was answered after _handle_call returned
        else:
            answered.append(True)

    def _reply(self, result, unique_id: str, action: str) -> None:
        if not isinstance(result, dict):
            log.error("Handler for {action} returned {result!r}, not a dict", action=action, result=result)
            self._send_error(unique_id, "InternalError", "The Central System could not handle this request")
            return
        try:
            # Vendor actions answered through csms_handle_call have no OCPP schema to check against.
            if self.schemas.has_request(action):
                self.schemas.validate_response(action, result)
        except SchemaViolation as exc:
            log.error("Response to {action} does not match its schema: {message} ({result!r})",
                      action=action, message=exc.message, result=result)
            self._send_error(unique_id, "InternalError", "The Central System produced an invalid response")
            return
        self._send_frame([CALLRESULT, unique_id, result])

    def _reply_failure(self, failure: Failure, unique_id: str, action: str) -> None:
        if failure.check(CallError):
            exc = failure.value
            self._send_error(unique_id, exc.code, exc.description, exc.details)
            return
        log.failure("Handler for {action} from {station} failed", failure,
                    action=action, station=self.station_id)
        self._send_error(unique_id, "InternalError", "The Central System could not handle this request")

    def _send_error(self, unique_id: str, code: str, description: str, details: dict | None = None) -> None:
        self.stats["errors_sent"] += 1
        self._send_frame([CALLERROR, unique_id, code, description, details or {}])

    def _send_frame(self, message: list) -> None:
        if self.connected:
            self._send(encode(message))

    # -- outbound ----------------------------------------------------------------------------

    def call(self, action: str, payload: dict) -> defer.Deferred:
        """Send ``action`` to the station; fires with its validated response payload."""
        if not self.connected:
            return defer.fail(StationOffline(self.station_id))
        try:
            self.schemas.validate_request(action, payload)
        except SchemaViolation as exc:
            return defer.fail(RequestInvalid(action, exc.code, exc.message))
        pending = _PendingCall(action, payload)
        self._queue.append(pending)
        self._send_next()
        return pending.deferred

    def _send_next(self) -> None:
        if self._in_flight is not None or not self._queue or not self.connected:
            return
        pending = self._queue.popleft()
        self._in_flight = pending
        pending.timer = self._clock.callLater(self._response_timeout, self._timed_out, pending)
        self.stats["calls_out"] += 1
        self._send_frame([CALL, pending.unique_id, pending.action, pending.payload])

    def _finish(self, pending: _PendingCall, outcome) -> None:
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        self._in_flight = None
        if isinstance(outcome, Exception):
            pending.deferred.errback(Failure(outcome))
        else:
            pending.deferred.callback(outcome)
        self._send_next()

    def _timed_out(self, pending: _PendingCall) -> None:
        pending.timer = None
        if self._in_flight is pending:
            log.warn("{station} did not answer {action} within {timeout}s",
                     station=self.station_id, action=pending.action, timeout=self._response_timeout)
            self._finish(pending, CallTimeout(f"{pending.action} to {self.station_id} timed out"))

    def _take_in_flight(self, unique_id: str, kind: str):
        pending = self._in_flight
        if pending is None or pending.unique_id != unique_id:
            log.warn("{station} sent a {kind} for unknown UniqueId {unique_id}; ignored",
                     station=self.station_id, kind=kind, unique_id=unique_id)
            return None
        return pending

    def _result_received(self, message: list) -> None:
        pending = self._take_in_flight(message[1], "CALLRESULT")
        if pending is None:
            return
        payload = message[2]
        if len(message) != 3 or not isinstance(payload, dict):
            self._finish(pending, ResponseInvalid(pending.action, "FormationViolation",
                                                  "CALLRESULT is not [3, UniqueId, Payload]", payload))
            return
        try:
            self.schemas.validate_response(pending.action, payload)
        except SchemaViolation as exc:
            self._finish(pending, ResponseInvalid(pending.action, exc.code, exc.message, payload))
            return
        self._finish(pending, payload)

    def _error_received(self, message: list) -> None:
        pending = self._take_in_flight(message[1], "CALLERROR")
        if pending is None:
            return
        code = message[2] if len(message) > 2 and isinstance(message[2], str) else "GenericError"
        description = message[3] if len(message) > 3 and isinstance(message[3], str) else ""
        details = message[4] if len(message) > 4 and isinstance(message[4], dict) else {}
        self._finish(pending, CallErrorReceived(code, description, details))

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def pending_calls(self) -> int:
        return len(self._queue) + (self._in_flight is not None)

    def connection_lost(self) -> None:
        """Fail every queued and in-flight call with :class:`StationOffline`."""
        self.connected = False
        pending = [self._in_flight] if self._in_flight is not None else []
        pending.extend(self._queue)
        self._in_flight = None
        self._queue.clear()
        for call in pending:
            if call.timer is not None and call.timer.active():
                call.timer.cancel()
            call.deferred.errback(Failure(StationOffline(f"{self.station_id} disconnected before answering")))
