"""Forwarded calls between nodes (csms.cluster.routing), over an in-memory channel on a task.Clock: the
asking node gets the holder's outcome as the same exception, never waits past its timeout, and gives up
at once when the holder is gone or the station moved."""
from __future__ import annotations

import json

import pytest
from twisted.internet import defer, task
from zope.interface import implementer

from csms.metrics import Metrics
from csms.app import ActionUnavailable, CallRefused
from csms.cluster.routing import CALL, EVICT, REPLY, IChannel, RemoteCallFailed, Router
from csms.rpc import CallErrorReceived, CallTimeout, RequestInvalid, ResponseInvalid, StationOffline

TIMEOUT = 35.0


@implementer(IChannel)
class FakeChannel:
    """Delivers each message on the clock's next turn, through JSON, to the target's router if it is up."""

    def __init__(self, network: dict, origin: str, clock):
        self.network, self.origin, self.clock = network, origin, clock
        self.sent: list = []
        self.fail_sends = False

    def send(self, target, topic, data):
        if self.fail_sends:
            return defer.fail(ConnectionError("database unreachable"))
        self.sent.append((target, topic))
        wire = json.dumps(data)

        def deliver():
            router = self.network.get(target)
            if router is not None:
                router.deliver(topic, json.loads(wire), self.origin)
        self.clock.callLater(0, deliver)
        return defer.succeed(None)


class FakeProtocol:
    def __init__(self, connection_id):
        self.connection_id = connection_id
        self.replaced_by: list = []

    def replaced_elsewhere(self, node):
        self.replaced_by.append(node)


class FakeApp:
    """What the router uses of a CentralSystem: sessions, call, ocpp_factory.connections, disconnect, metrics."""

    def __init__(self):
        self.sessions: dict = {}
        self.calls: list = []
        self.outcome = None
        self.ocpp_factory = type("Factory", (), {"connections": {}})()
        self.disconnected: list = []
        self.metrics = Metrics(enabled=True)

    def call(self, station_id, action, payload):
        self.calls.append((station_id, action, payload))
        if isinstance(self.outcome, Exception):
            return defer.fail(self.outcome)
        return defer.succeed(self.outcome) if self.outcome is not None else defer.Deferred()

    def disconnect(self, station_id, reason):
        self.disconnected.append((station_id, reason))
        return True


@pytest.fixture
def cluster():
    clock = task.Clock()
    network: dict = {}
    apps = {name: FakeApp() for name in ("A", "B")}
    for name, app in apps.items():
        network[name] = Router(app, name, FakeChannel(network, name, clock), clock, TIMEOUT)
    apps["B"].sessions["CP1"] = object()
    return clock, network, apps


def outcome(d):
    results = []
    d.addBoth(results.append)
    return results


def test_a_forwarded_call_runs_on_the_holder_and_answers_its_response(cluster):
    clock, network, apps = cluster
    apps["B"].outcome = {"status": "Accepted"}
    results = outcome(network["A"].forward("B", "CP1", "Reset", {"type": "Soft"}))
    clock.advance(0)  # the call reaches B
    clock.advance(0)  # the reply reaches A
    assert results == [{"status": "Accepted"}]
    assert apps["B"].calls == [("CP1", "Reset", {"type": "Soft"})]
    assert network["A"].pending() == 0
    assert [topic for _, topic in network["A"].channel.sent] == [CALL]
    assert network["B"].channel.sent == [("A", REPLY)]


ERRORS = [
    ActionUnavailable("Reset belongs to the Core profile"),
    CallRefused("No such connector", "unknown_connector", {"connector_id": 3}),
    RequestInvalid("Reset", "PropertyConstraintViolation", "type is not one of Hard, Soft"),
    StationOffline("CP1 disconnected before the call was sent"),
    CallErrorReceived("NotSupported", "not here", {"why": "firmware"}),
    ResponseInvalid("Reset", "FormationViolation", "status is missing", {"nope": 1}),
    CallTimeout("Reset to CP1 timed out"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_the_holders_exception_is_raised_again_on_the_asking_node(cluster, error):
    clock, network, apps = cluster
    apps["B"].outcome = error
    results = outcome(network["A"].forward("B", "CP1", "Reset", {"type": "Soft"}))
    clock.advance(0)
    clock.advance(0)
    [failure] = results
    raised = failure.value
    assert type(raised) is type(error)
    assert str(raised) == str(error)
    assert vars(raised) == vars(error)  # code, details, action, payload ... all carried


def test_an_unexpected_exception_on_the_holder_is_a_remote_call_failure(cluster):
    clock, network, apps = cluster
    apps["B"].outcome = KeyError("bug")
    results = outcome(network["A"].forward("B", "CP1", "Reset", {"type": "Soft"}))
    clock.advance(0)
    clock.advance(0)
    assert results[0].check(RemoteCallFailed)


def test_a_holder_that_no_longer_has_the_station_answers_station_offline(cluster):
    clock, network, apps = cluster
    apps["B"].sessions.clear()
    results = outcome(network["A"].forward("B", "CP1", "Reset", {"type": "Soft"}))
    clock.advance(0)
    clock.advance(0)
    assert results[0].check(StationOffline)
    assert apps["B"].calls == []


def test_no_answer_within_the_forward_timeout_is_a_call_timeout(cluster):
    clock, network, apps = cluster
    del network["B"]  # B hears nothing any more
    results = outcome(network["A"].forward("B", "CP1", "Reset", {"type": "Soft"}))
    clock.advance(TIMEOUT - 0.1)
    assert results == []
    clock.advance(0.1)
    assert results[0].check(CallTimeout)
    assert network["A"].pending() == 0


def test_a_reply_after_the_timeout_is_dropped(cluster):
    clock, network, apps = cluster
    results = outcome(network["A"].forward("B", "CP1", "Reset", {"type": "Soft"}))  # B's call never ends
    clock.advance(TIMEOUT)
    network["A"].on_reply({"id": "whatever", "outcome": {"response": {}}}, "B")
    assert len(results) == 1 and results[0].check(CallTimeout)


def test_the_holder_going_away_ends_its_forwarded_calls_at_once_with_station_offline(cluster):
    clock, network, apps = cluster
    results = outcome(network["A"].forward("B", "CP1", "Reset", {"type": "Soft"}))
    clock.advance(0)
    network["A"].node_gone("C")
    assert results == []
    network["A"].node_gone("B")
    assert results[0].check(StationOffline)
    assert clock.getDelayedCalls() == []  # the deadline went with it


def test_the_station_moving_ends_a_call_forwarded_to_its_old_holder(cluster):
    clock, network, apps = cluster
    results = outcome(network["A"].forward("B", "CP1", "Reset", {"type": "Soft"}))
    network["A"].station_moved("CP1", "B")
    assert results == []
    network["A"].station_moved("CP1", "C")
    assert results[0].check(StationOffline)


def test_a_call_that_cannot_be_sent_is_station_offline(cluster):
    clock, network, apps = cluster
    network["A"].channel.fail_sends = True
    results = outcome(network["A"].forward("B", "CP1", "Reset", {"type": "Soft"}))
    assert results[0].check(StationOffline)
    assert network["A"].pending() == 0


def test_stopping_ends_every_forwarded_call(cluster):
    clock, network, apps = cluster
    results = outcome(network["A"].forward("B", "CP1", "Reset", {"type": "Soft"}))
    network["A"].stop()
    assert results[0].check(StationOffline)


def test_evict_closes_only_the_connection_the_newer_one_replaced(cluster):
    clock, network, apps = cluster
    older = FakeProtocol("b-1")
    apps["B"].ocpp_factory.connections["CP1"] = older
    network["A"].channel.send("B", EVICT, {"station": "CP1", "connection": "b-0"})
    clock.advance(0)
    assert older.replaced_by == []  # a yet newer connection on B: kept
    network["A"].channel.send("B", EVICT, {"station": "CP1", "connection": "b-1"})
    clock.advance(0)
    assert older.replaced_by == ["A"]


def test_a_remote_disconnect_closes_the_station_on_its_holder(cluster):
    clock, network, apps = cluster
    network["A"].channel.send("B", "cluster.disconnect", {"station": "CP1", "reason": "station deleted"})
    clock.advance(0)
    assert apps["B"].disconnected == [("CP1", "station deleted")]
