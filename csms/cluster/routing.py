"""Calls forwarded between nodes, and the closes one node asks of another: independent of the channel.

A node that is asked to call a station held by another node sends ``cluster.call`` to that node; the
holder runs its own ``app.call`` (its ``csms_before_call`` checks, its call events, the station
session's queue, which keeps the order of calls per station) and sends ``cluster.reply`` with the
outcome; the asking node re-raises the same exception the holder's ``app.call`` raised, so the API
maps it to the same status. The asking node never waits longer than its ``timeout`` (CallTimeout),
and gives up at once (StationOffline) when the holder is gone or the station moved.

The :class:`Channel` carries the messages: PostgreSQL NOTIFY in production
(:mod:`csms.cluster.postgres`), an in-memory one in the unit tests.
"""
from __future__ import annotations

import uuid

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

log = Logger(namespace="csms.cluster")

CALL, REPLY, EVICT, DISCONNECT = "cluster.call", "cluster.reply", "cluster.evict", "cluster.disconnect"
#: The topics the router handles (a channel hands it these).
TOPICS = (CALL, REPLY, EVICT, DISCONNECT)


class IChannel(Interface):
    """Messages to one node, or to every node."""

    def send(target, topic, data):
        """Send ``data`` (a JSON-able dict) under ``topic`` to node ``target``; a Deferred firing once sent."""


class RemoteCallFailed(Exception):
    """The holder's ``app.call`` failed with an exception no caller expects (a bug there; see its log)."""


def _errors() -> dict:
    from csms.app import ActionUnavailable, CallRefused
    from csms.rpc import CallErrorReceived, CallTimeout, RequestInvalid, ResponseInvalid, StationOffline

    return {
        "ActionUnavailable": (ActionUnavailable, lambda e: {"message": str(e)}, lambda d: ActionUnavailable(d["message"])),
        "CallRefused": (CallRefused, lambda e: {"message": e.message, "code": e.code, "details": e.details},
                        lambda d: CallRefused(d["message"], d["code"], d["details"])),
        "RequestInvalid": (RequestInvalid, lambda e: {"action": e.action, "code": e.code, "message": e.message},
                           lambda d: RequestInvalid(d["action"], d["code"], d["message"])),
        "StationOffline": (StationOffline, lambda e: {"message": str(e)}, lambda d: StationOffline(d["message"])),
        "CallErrorReceived": (CallErrorReceived,
                              lambda e: {"code": e.code, "description": e.description, "details": e.details},
                              lambda d: CallErrorReceived(d["code"], d["description"], d["details"])),
        "ResponseInvalid": (ResponseInvalid, lambda e: {"action": e.action, "code": e.code, "message": e.message,
                                                        "payload": e.payload},
                            lambda d: ResponseInvalid(d["action"], d["code"], d["message"], d["payload"])),
        "CallTimeout": (CallTimeout, lambda e: {"message": str(e)}, lambda d: CallTimeout(d["message"])),
    }


def outcome_message(result) -> dict:
    """An ``app.call`` outcome (a response payload or a Failure) as a JSON-able dict."""
    if not isinstance(result, Failure):
        return {"response": result}
    for name, (kind, encode, _) in _errors().items():
        if isinstance(result.value, kind):  # CallErrorReceived before CallError's other uses: no subclass clash
            return {"error": name, **encode(result.value)}
    return {"error": "RemoteCallFailed", "message": f"{type(result.value).__name__}: {result.value}"}


def outcome_result(message: dict):
    """The payload a :func:`outcome_message` carries, or raise the exception it names."""
    if "error" not in message:
        return message["response"]
    known = _errors().get(message["error"])
    if known is None:
        raise RemoteCallFailed(message.get("message", ""))
    raise known[2](message)


def _outcome_label(result) -> str:
    """A forwarded call's outcome as one of a few metric label values."""
    if not isinstance(result, Failure):
        return "answered"
    from csms.rpc import CallErrorReceived, CallTimeout, ResponseInvalid, StationOffline

    if result.check(CallErrorReceived, ResponseInvalid):
        return "answered"
    if result.check(CallTimeout):
        return "timeout"
    if result.check(StationOffline):
        return "offline"
    return "error"


class _Forwarded:
    __slots__ = ("deferred", "holder", "station_id", "action", "deadline")

    def __init__(self, deferred, holder, station_id, action, deadline):
        self.deferred, self.holder, self.station_id, self.action, self.deadline = (
            deferred, holder, station_id, action, deadline)


class Router:
    """Forwards calls to the node holding a station and answers the calls other nodes forward here.

    ``app`` is the :class:`csms.app.CentralSystem` (its ``call``, ``sessions``, ``ocpp_factory``),
    ``channel`` an :class:`IChannel`, ``timeout`` the seconds the asking node waits (``[cluster]
    forward_timeout``).
    """

    def __init__(self, app, node: str, channel, clock, timeout: float):
        self.app = app
        self.node = node
        self.channel = channel
        self.clock = clock
        self.timeout = timeout
        self._pending: dict[str, _Forwarded] = {}
        self.forwarded = app.metrics.counter(
            "csms_cluster_forwarded_calls", "Calls this node forwarded to the node holding the station, by outcome",
            ("outcome",))
        self.forward_seconds = app.metrics.histogram(
            "csms_cluster_forward_seconds", "Seconds from forwarding a call to the holding node's answer")

    # -- the asking side ---------------------------------------------------------------------------

    def forward(self, holder: str, station_id: str, action: str, payload: dict) -> defer.Deferred:
        """Ask ``holder`` to send the call; fires with the station's response or fails as ``app.call`` would."""
        from csms.rpc import CallTimeout, StationOffline

        call_id = uuid.uuid4().hex
        d = defer.Deferred()

        def deadline_passed():
            self._finish(call_id, Failure(CallTimeout(
                f"{action} to {station_id}: node {holder} did not answer within {self.timeout:g}s")))
        pending = _Forwarded(d, holder, station_id, action, self.clock.callLater(self.timeout, deadline_passed))
        self._pending[call_id] = pending
        started = self.clock.seconds()

        def measured(result):
            self.forward_seconds.observe(self.clock.seconds() - started)
            self.forwarded.labels(_outcome_label(result)).inc()
            return result
        d.addBoth(measured)

        def not_sent(failure):
            log.failure("Could not forward {action} for {station} to node {holder}", failure, action=action,
                        station=station_id, holder=holder)
            self._finish(call_id, Failure(StationOffline(
                f"{station_id} is connected to node {holder}, which could not be reached")))
        self.channel.send(holder, CALL, {"id": call_id, "origin": self.node, "station": station_id,
                                         "action": action, "payload": payload}).addErrback(not_sent)
        return d

    def pending(self) -> int:
        return len(self._pending)

    def _finish(self, call_id: str, result) -> None:
        pending = self._pending.pop(call_id, None)
        if pending is None:
            return  # answered already (a late reply, a deadline after the reply)
        if pending.deadline.active():
            pending.deadline.cancel()
        if isinstance(result, Failure):
            pending.deferred.errback(result)
        else:
            pending.deferred.callback(result)

    def on_reply(self, data: dict, origin: str) -> None:
        try:
            result = outcome_result(data["outcome"])
        except Exception:  # noqa: BLE001 - the outcome is an exception to re-raise here
            result = Failure()
        self._finish(data["id"], result)

    def node_gone(self, node: str) -> None:
        """``node``'s lease expired or it stopped: its forwarded calls will never be answered."""
        from csms.rpc import StationOffline

        for call_id, pending in list(self._pending.items()):
            if pending.holder == node:
                self._finish(call_id, Failure(StationOffline(
                    f"{pending.station_id} was connected to node {node}, which is gone")))

    def station_moved(self, station_id: str, node: str | None) -> None:
        """The station is now on ``node`` (None: nowhere): a call forwarded to its old holder is lost."""
        from csms.rpc import StationOffline

        for call_id, pending in list(self._pending.items()):
            if pending.station_id == station_id and pending.holder != node:
                self._finish(call_id, Failure(StationOffline(
                    f"{station_id} left node {pending.holder} before it answered")))

    def stop(self) -> None:
        """This node is stopping: nobody is left to wait for the answers."""
        from csms.rpc import StationOffline

        for call_id in list(self._pending):
            self._finish(call_id, Failure(StationOffline("the Central System node is stopping")))

    # -- the holding side ---------------------------------------------------------------------------

    def on_call(self, data: dict, origin: str) -> None:
        from csms.rpc import StationOffline

        station_id = data["station"]
        if station_id in self.app.sessions:
            d = self.app.call(station_id, data["action"], data["payload"])
        else:
            d = defer.fail(StationOffline(f"{station_id} is not connected to node {self.node}"))

        def reply(result):
            self.channel.send(data["origin"], REPLY, {"id": data["id"], "outcome": outcome_message(result)}
                              ).addErrback(lambda failure: log.failure(
                                  "Could not send the outcome of {action} for {station} to node {node}", failure,
                                  action=data["action"], station=station_id, node=data["origin"]))
        d.addBoth(reply)

    def on_evict(self, data: dict, origin: str) -> None:
        """The station connected to ``origin``: close its older connection here (the newer one wins)."""
        protocol = self._connection(data["station"])
        # Only the connection the newer one replaced: a yet newer one here is not to be closed.
        if protocol is not None and protocol.connection_id == data["connection"]:
            protocol.replaced_elsewhere(origin)

    def on_disconnect(self, data: dict, origin: str) -> None:
        self.app.disconnect(data["station"], data["reason"])

    def _connection(self, station_id: str):
        factory = self.app.ocpp_factory
        return None if factory is None else factory.connections.get(station_id)

    def deliver(self, topic: str, data: dict, origin: str) -> None:
        handler = {CALL: self.on_call, REPLY: self.on_reply, EVICT: self.on_evict, DISCONNECT: self.on_disconnect}[topic]
        handler(data, origin)
