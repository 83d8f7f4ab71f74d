"""OCPP-J 1.6 RPC (OCPP-J 1.6 §4): CALL / CALLRESULT / CALLERROR framing over one station's connection.

:class:`OCPPSession` knows nothing of WebSockets: it is given text and a ``send`` callable, so it is
tested on a fake transport with a :class:`twisted.internet.task.Clock`.

* Inbound CALLs are validated, handled one at a time in arrival order (a StopTransaction that follows
  its StartTransaction never overtakes it), and answered; every bad message gets a CALLERROR with the
  code OCPP-J names and the connection stays up. Whatever goes wrong while reading, validating or
  answering one call (even a bug) is answered for that call, and the calls queued behind it still run;
  a handler that has not answered within the handler timeout is answered InternalError.
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
from time import perf_counter

import orjson

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from csms.schemas import SchemaViolation, check_storable, schemas

CALL, CALLRESULT, CALLERROR = 2, 3, 4
MAX_UNIQUE_ID_LENGTH = 36
UNREADABLE_ID = "-1"
#: JSON text can hold a NUL only escaped, so a text without this holds none.
_NUL_ESCAPE = "\\u0000"
_NUL_ESCAPE_BYTES = b"\\u0000"
_COULD_NOT_HANDLE = "The Central System could not handle this request"
#: A handler deadline this close is due (the clock's float arithmetic must not make it wait for ever).
_DEADLINE_SLACK = 0.001

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


class _Handling:
    """An inbound CALL whose handler answered with a Deferred that has not fired yet."""

    __slots__ = ("unique_id", "action", "started", "deadline", "answered", "timed_out")

    def __init__(self, unique_id: str, action: str, started: float):
        self.unique_id = unique_id
        self.action = action
        self.started = started
        self.deadline = 0.0
        self.answered = False
        self.timed_out = False


class _PendingCall:
    __slots__ = ("unique_id", "action", "payload", "deferred", "timer")

    def __init__(self, action: str, payload: dict):
        self.unique_id = str(uuid.uuid4())
        self.action = action
        self.payload = payload
        self.deferred: defer.Deferred = defer.Deferred()
        self.timer = None


def encode(message: list) -> bytes:
    """Compact UTF-8 JSON; ValueError when the message cannot be written as JSON at all.

    orjson does it in C. What it refuses (an integer wider than 64 bits from a plugin, a unique id
    holding a lone surrogate echoed back to the station) goes through the standard library with every
    non-ASCII character escaped: the text is ASCII, so any Python string can be written, and the
    station reads back exactly what it sent.
    """
    try:
        return orjson.dumps(message)
    except TypeError:
        pass
    try:
        return json.dumps(message, separators=(",", ":"), allow_nan=False).encode("ascii")
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"not expressible as JSON: {exc}") from None


def _decode_leniently(text: str | bytes):
    """The standard library's reading of what orjson refused; ValueError if it is not JSON either."""
    try:
        return json.loads(text)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - RecursionError for nesting deeper than the stack, ...
        raise ValueError(f"unreadable JSON ({type(exc).__name__})") from None


class OCPPSession:
    """The RPC state of one connected station.

    ``dispatch(session, action, payload)`` handles a validated inbound CALL and returns (a Deferred
    of) the response payload, or raises :class:`CallError`.
    """

    #: Where action schemas come from; a station's session has its Central System's (plugin actions too).
    schemas = schemas
    #: What it counts for Prometheus (:class:`csms.metrics.OCPPMetrics`); None: nothing is counted.
    _metrics = None

    def __init__(self, station_id: str, dispatch, send, clock, response_timeout: float, *,
                 handler_timeout: float):
        """``send(data: bytes)`` puts one UTF-8 JSON text message on the wire; ``response_timeout`` is
        how long the station has to answer our CALL, ``handler_timeout`` how long a handler has to
        answer the station's (both in seconds of ``clock``)."""
        self.station_id = station_id
        self._dispatch = dispatch
        self._send = send
        self._clock = clock
        self._response_timeout = response_timeout
        self._handler_timeout = handler_timeout
        #: Inbound CALLs waiting for the one being handled; see :meth:`_call_received`.
        self._inbound_queue: deque = deque()
        self._inbound_busy = False
        #: The inbound call whose handler has yet to answer (there is at most one), and the timer that
        #: watches its deadline; see :meth:`_check_handler`.
        self._handling: _Handling | None = None
        self._handler_timer = None
        self._queue: deque[_PendingCall] = deque()
        self._in_flight: _PendingCall | None = None
        self.connected = True
        #: False once the Central System is stopping: calls not yet being handled are left unanswered.
        self.accepting = True
        self._idle_waiters: list[defer.Deferred] = []
        #: Counters an operator (and the benchmark) can read.
        self.stats = {"calls_in": 0, "calls_out": 0, "errors_sent": 0}

    # -- inbound -----------------------------------------------------------------------------

    def text_received(self, text: str | bytes) -> None:
        """Read one OCPP-J message and act on it. Never raises.

        orjson parses first. The standard library reads what orjson alone refuses (integers wider than
        64 bits, NaN, a lone surrogate), so that such a message still reaches validation and gets its
        proper CALLERROR code. ``screen`` says whether the message's values must also pass
        :func:`csms.schemas.check_storable`: true for what the standard library read, and for a text
        holding an escaped NUL. Anything else orjson read is storable once it passes its schema (orjson
        reads only valid Unicode, and integers up to 2^64-1, which the schemas bound).
        """
        try:
            message = orjson.loads(text)
        except Exception:  # noqa: BLE001 - orjson.JSONDecodeError, or a TypeError for what is no text
            try:
                message = _decode_leniently(text)
            except ValueError:
                self._send_error(UNREADABLE_ID, "FormationViolation", "Message is not valid JSON")
                return
            screen = True
        else:
            screen = _NUL_ESCAPE in text if type(text) is str else _NUL_ESCAPE_BYTES in text
        try:
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
                self._call_received(message, screen)
            elif type_id == CALLRESULT and not isinstance(type_id, bool):
                self._result_received(message, screen)
            elif type_id == CALLERROR and not isinstance(type_id, bool):
                self._error_received(message)
            else:
                self._send_error(unique_id, "ProtocolError", f"Unknown MessageTypeId {type_id!r}")
        except Exception:  # noqa: BLE001 - a bug: logged, and the connection stays up
            log.failure("Reading a message from {station} failed", station=self.station_id)

    @staticmethod
    def _readable_id(message) -> str:
        if isinstance(message, list) and len(message) > 1 and isinstance(message[1], str) \
                and 0 < len(message[1]) <= MAX_UNIQUE_ID_LENGTH:
            return message[1]
        return UNREADABLE_ID

    def _call_received(self, message: list, screen: bool) -> None:
        unique_id = message[1]
        if len(message) != 4:
            self._send_error(unique_id, "FormationViolation", "A CALL is [2, UniqueId, Action, Payload]")
            return
        action, payload = message[2], message[3]
        if not isinstance(action, str):
            self._send_error(unique_id, "FormationViolation", "Action must be a string")
            return
        if not isinstance(payload, dict):
            self._send_error(unique_id, "FormationViolation", "Payload must be a JSON object", action=action)
            return
        if not self.accepting:
            # Unanswered, the call counts as not received: the station sends it again once reconnected.
            log.debug("{station} sent {action} while the Central System is stopping: not handled",
                      station=self.station_id, action=action)
            return
        self.stats["calls_in"] += 1
        # One inbound call at a time, in arrival order (a StopTransaction never overtakes its
        # StartTransaction). A call answered synchronously (Heartbeat, a cached Authorize) is answered
        # right here, with no Deferred between the frame and the reply.
        if self._inbound_busy:
            self._inbound_queue.append((unique_id, action, payload, screen))
        else:
            self._run_calls(unique_id, action, payload, screen)

    def _run_calls(self, unique_id: str, action: str, payload: dict, screen: bool) -> None:
        while True:
            if self._handle_call(unique_id, action, payload, screen):
                # Still waiting (on the database, a plugin...): the next call waits for this one,
                # and _call_finished takes it up once this one is answered or has timed out.
                self._inbound_busy = True
                return
            if not self._inbound_queue:
                return
            unique_id, action, payload, screen = self._inbound_queue.popleft()

    def _call_finished(self) -> None:
        self._inbound_busy = False
        if self._inbound_queue:
            self._run_calls(*self._inbound_queue.popleft())
        elif self._idle_waiters:
            waiting, self._idle_waiters = self._idle_waiters, []
            for d in waiting:
                d.callback(None)

    def stop_accepting(self) -> defer.Deferred:
        """Take no more calls; fires once the call being handled, if any, has been answered (or has
        timed out). The calls queued behind it are dropped unanswered, like those arriving from now on."""
        self.accepting = False
        if self._inbound_queue:
            log.debug("{station}: {count} queued call(s) left unanswered at shutdown", station=self.station_id,
                      count=len(self._inbound_queue))
            self._inbound_queue.clear()
        if not self._inbound_busy:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def _handle_call(self, unique_id: str, action: str, payload: dict, screen: bool) -> bool:
        """Answer one CALL: False when answered already, True while its handler has yet to answer.

        Never raises: whatever goes wrong is answered for this call, so the calls queued behind it run.
        """
        try:
            try:
                known = self.schemas.has_request(action)
                if screen or not known:  # a vendor action has no schema to bound its integers
                    check_storable(payload)
                    check_storable(action, "Action")
                if known:
                    self.schemas.validate_request(action, payload)
            except SchemaViolation as exc:
                self._send_error(unique_id, exc.code, exc.message, action=action)
                return False
            return self._dispatch_call(unique_id, action, payload)
        except Exception:  # noqa: BLE001 - a bug in validation or in answering: logged, answered
            log.failure("Handling {action!r} from {station} failed", action=action, station=self.station_id)
            self._send_error(unique_id, "InternalError", _COULD_NOT_HANDLE, action=action)
            return False

    def _dispatch_call(self, unique_id: str, action: str, payload: dict) -> bool:
        metrics = self._metrics
        started = perf_counter() if metrics is not None else 0.0
        try:
            result = self._dispatch(self, action, payload)
        except Exception:  # noqa: BLE001 - CallError or a handler's bug: answered either way
            self._reply_failure(Failure(), unique_id, action)
            if metrics is not None:
                metrics.handled(action, perf_counter() - started)
            return False
        if type(result) is dict or not (isinstance(result, defer.Deferred) or inspect.isawaitable(result)):
            self._reply(result, unique_id, action)
            if metrics is not None:
                metrics.handled(action, perf_counter() - started)
            return False
        if not isinstance(result, defer.Deferred):
            result = defer.ensureDeferred(result)
        handling = _Handling(unique_id, action, started)
        result.addBoth(self._handler_answered, handling)
        if handling.answered:
            return False
        handling.deadline = self._clock.seconds() + self._handler_timeout
        self._handling = handling
        if self._handler_timer is None:
            self._handler_timer = self._clock.callLater(self._handler_timeout, self._check_handler)
        return True

    def _handler_answered(self, outcome, handling: _Handling) -> None:
        """Send the answer (or the CALLERROR) once the handler's Deferred fires. The chain ends here:
        nothing after it sees this call's outcome."""
        if handling.timed_out:
            self._discard_late(outcome, handling)
            return
        handling.answered = True
        waited = handling is self._handling
        if waited:
            self._handling = None
        self._send_answer(outcome, handling.unique_id, handling.action)
        if self._metrics is not None:
            self._metrics.handled(handling.action, perf_counter() - handling.started)
        if waited:
            self._call_finished()

    def _check_handler(self) -> None:
        """Answer InternalError for a handler past its deadline.

        One timer per session serves every call (they are handled one at a time): rather than set and
        cancel a timer per call on the hot path, an answered call only forgets its deadline, and the
        timer, when it fires, moves on to the deadline of the call then waiting, or ends.
        """
        self._handler_timer = None
        handling = self._handling
        if handling is None:
            return
        remaining = handling.deadline - self._clock.seconds()
        if remaining > _DEADLINE_SLACK:
            self._handler_timer = self._clock.callLater(remaining, self._check_handler)
            return
        self._handling = None
        handling.timed_out = True
        log.warn("The handler for {action} from {station} did not answer within {timeout}s: answered "
                 "InternalError", action=handling.action, station=self.station_id, timeout=self._handler_timeout)
        self._send_error(handling.unique_id, "InternalError", "The Central System did not answer in time",
                         action=handling.action)
        if self._metrics is not None:
            self._metrics.handled(handling.action, perf_counter() - handling.started)
        self._call_finished()

    def _discard_late(self, outcome, handling: _Handling) -> None:
        """A handler answered after its timeout: the station had InternalError already, so the outcome
        is only logged (the handler's work itself, a database write say, did happen)."""
        if isinstance(outcome, Failure) and not outcome.check(CallError):
            log.failure("The handler for {action} from {station} failed after its {timeout}s timeout",
                        outcome, action=handling.action, station=self.station_id, timeout=self._handler_timeout)
            return
        log.warn("The handler for {action} from {station} answered after its {timeout}s timeout; "
                 "the answer was discarded", action=handling.action, station=self.station_id,
                 timeout=self._handler_timeout)

    def _send_answer(self, outcome, unique_id: str, action: str) -> None:
        try:
            if isinstance(outcome, Failure):
                self._reply_failure(outcome, unique_id, action)
            else:
                self._reply(outcome, unique_id, action)
        except Exception:  # noqa: BLE001 - a bug: logged, and the station still gets an answer
            log.failure("Answering {action!r} from {station} failed", action=action, station=self.station_id)
            self._send_error(unique_id, "InternalError", _COULD_NOT_HANDLE, action=action)

    def _reply(self, result, unique_id: str, action: str) -> None:
        if not isinstance(result, dict):
            log.error("Handler for {action!r} from {station} returned {result!r}, not a dict", action=action,
                      station=self.station_id, result=result)
            self._send_error(unique_id, "InternalError", _COULD_NOT_HANDLE, action=action)
            return
        try:
            # Vendor actions answered through csms_handle_call have no OCPP schema to check against.
            if self.schemas.has_request(action):
                self.schemas.validate_response(action, result)
        except SchemaViolation as exc:
            log.error("Response to {action!r} from {station} does not match its schema: {message} ({result!r})",
                      action=action, station=self.station_id, message=exc.message, result=result)
            self._send_error(unique_id, "InternalError", "The Central System produced an invalid response",
                             action=action)
            return
        self._send_frame([CALLRESULT, unique_id, result])
        if self._metrics is not None:
            self._metrics.call_answered(action, result)

    def _reply_failure(self, failure: Failure, unique_id: str, action: str) -> None:
        if failure.check(CallError):
            exc = failure.value
            self._send_error(unique_id, exc.code, exc.description, exc.details, action=action)
            return
        log.failure("Handler for {action!r} from {station} failed", failure,
                    action=action, station=self.station_id)
        self._send_error(unique_id, "InternalError", _COULD_NOT_HANDLE, action=action)

    def _send_error(self, unique_id: str, code: str, description: str, details: dict | None = None,
                    action: str | None = None) -> None:
        """Answer a station's message with a CALLERROR; ``action``: the CALL's, when it had a readable one."""
        self.stats["errors_sent"] += 1
        if self._metrics is not None:
            self._metrics.error_sent(action, code)
        self._send_frame([CALLERROR, unique_id, code, description, details or {}])

    def _send_frame(self, message: list) -> None:
        """Put one frame on the wire. Never raises.

        An answer that cannot be written as JSON (a plugin's bug) is replaced by an InternalError, so
        the station still hears back about its call. (A CALL cannot fail so: its payload was validated.)
        """
        if not self.connected:
            return
        try:
            data = encode(message)
        except ValueError as exc:
            log.error("Cannot send {kind} {unique_id!r} to {station}: {error}", kind=message[0],
                      unique_id=message[1], station=self.station_id, error=exc)
            if message[0] == CALL:
                return
            data = encode([CALLERROR, message[1], "InternalError", "The Central System produced an answer "
                           "it cannot encode", {}])
        try:
            self._send(data)
        except Exception:  # noqa: BLE001 - the transport's problem; the connection's close tells the rest
            log.failure("Sending to {station} failed", station=self.station_id)

    # -- outbound ----------------------------------------------------------------------------

    def call(self, action: str, payload: dict) -> defer.Deferred:
        """Send ``action`` to the station; fires with its validated response payload."""
        if not self.connected:
            return defer.fail(StationOffline(self.station_id))
        try:
            check_storable(payload)
            self.schemas.validate_request(action, payload)
        except SchemaViolation as exc:
            return defer.fail(RequestInvalid(action, exc.code, exc.message))
        pending = _PendingCall(action, payload)
        self._queue.append(pending)
        if self._metrics is not None:
            self._metrics.call_queued()
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
        if self._metrics is not None:
            self._count_sent(pending.action, outcome)
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
            log.warn("{station} sent a {kind} for unknown UniqueId {unique_id!r}; ignored",
                     station=self.station_id, kind=kind, unique_id=unique_id)
            return None
        return pending

    def _result_received(self, message: list, screen: bool) -> None:
        pending = self._take_in_flight(message[1], "CALLRESULT")
        if pending is None:
            return
        payload = message[2]
        if len(message) != 3 or not isinstance(payload, dict):
            self._finish(pending, ResponseInvalid(pending.action, "FormationViolation",
                                                  "CALLRESULT is not [3, UniqueId, Payload]", payload))
            return
        try:
            if screen:
                check_storable(payload)
            self.schemas.validate_response(pending.action, payload)
        except SchemaViolation as exc:
            self._finish(pending, ResponseInvalid(pending.action, exc.code, exc.message, payload))
            return
        except Exception as exc:  # noqa: BLE001 - a bug in validation: logged; the call still ends
            log.failure("Checking {station}'s answer to {action} failed", station=self.station_id,
                        action=pending.action)
            self._finish(pending, ResponseInvalid(pending.action, "InternalError", str(exc), payload))
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

    def _count_sent(self, action: str, outcome) -> None:
        if isinstance(outcome, CallErrorReceived):
            self._metrics.call_ended(action, "error", outcome.code)
        elif isinstance(outcome, ResponseInvalid):
            self._metrics.call_ended(action, "invalid")
        elif isinstance(outcome, CallTimeout):
            self._metrics.call_ended(action, "timeout")
        else:
            self._metrics.call_ended(action, "result")

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
            if self._metrics is not None:
                self._metrics.call_ended(call.action, "offline")
            call.deferred.errback(Failure(StationOffline(f"{self.station_id} disconnected before answering")))
