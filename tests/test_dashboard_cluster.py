"""The dashboard's live updates across a cluster (plugins/dashboard/relay.py): a page open on one node sees
what happens on another. The relay's rules against a recording stand-in for app.cluster; the whole path
between two real nodes on PostgreSQL."""
from __future__ import annotations

from datetime import timedelta

import pytest
import pytest_twisted
import treq
from conftest import clock_now, station_time, within
from csms_plugins.dashboard.events import EventBroker
from csms_plugins.dashboard.relay import EVENTS, HELLO, LISTENING, RELAY_INTERVAL, RELAY_MAX_EVENTS, Relay
from csms_plugins.dashboard.sessions import SessionStore
from test_cluster import start_node
from test_dashboard_http import StreamRequest, signed_in
from twisted.internet import defer, task

from csms.api.tokens import Caller

KEEPALIVE = 15.0


class RecordingCluster:
    """What the relay uses of app.cluster: broadcasts are recorded, each with a Deferred the test fires."""

    enabled = True

    def __init__(self):
        self.sent: list[tuple[str, dict, defer.Deferred]] = []
        self.subscribers: dict[str, list] = {}

    def subscribe(self, topic, callback):
        self.subscribers.setdefault(topic, []).append(callback)

    def broadcast(self, topic, data):
        done = defer.Deferred()
        self.sent.append((topic, data, done))
        return done

    def hear(self, topic, data, origin="B"):
        for callback in self.subscribers.get(topic, ()):
            callback(data, origin)

    def said(self, topic) -> list[dict]:
        return [data for sent_topic, data, _ in self.sent if sent_topic == topic]


def relay_on(cluster=None, count_dropped=lambda n: None):
    clock = task.Clock()
    sessions = SessionStore(clock, 3600, 86400, 10)
    broker = EventBroker(clock, sessions, max_streams=10, max_per_session=10, max_queued=10_000,
                         keepalive=KEEPALIVE)
    cluster = cluster or RecordingCluster()
    return Relay(cluster, clock, broker, KEEPALIVE, count_dropped), cluster, clock, broker, sessions


def open_stream(broker, sessions, transaction: int | None = None) -> StreamRequest:
    request = StreamRequest()
    broker.open(request, sessions.create(Caller("ops", "read")), transaction)
    return request


def test_events_go_to_the_other_nodes_only_while_one_of_them_listens():
    relay, cluster, clock, broker, sessions = relay_on()
    here = open_stream(broker, sessions)
    cluster.sent.clear()  # this node said it listens
    relay.publish("station", {"station_id": "CP-1", "online": True})
    clock.advance(RELAY_INTERVAL)
    assert cluster.said(EVENTS) == [] and b'"CP-1"' in b"".join(here.written)  # nobody else listens
    assert not relay._others_listen() and not relay.wants_meter(7)

    cluster.hear(LISTENING, {"streams": 2}, origin="B")
    relay.publish("station", {"station_id": "CP-2", "online": True})
    relay.publish("status", {"station_id": "CP-2", "connector_id": 1, "status": "Available"})
    clock.advance(RELAY_INTERVAL / 2)
    assert cluster.said(EVENTS) == []  # gathered for an interval
    clock.advance(RELAY_INTERVAL / 2)
    assert cluster.said(EVENTS) == [{"events": [["station", {"station_id": "CP-2", "online": True}],
                                                ["status", {"station_id": "CP-2", "connector_id": 1,
                                                            "status": "Available"}]], "dropped": 0}]
    # One message at a time: what comes while it is sent waits for it, in order.
    relay.publish("station", {"station_id": "CP-3", "online": True})
    clock.advance(RELAY_INTERVAL * 4)
    assert len(cluster.said(EVENTS)) == 1
    cluster.sent[-1][2].callback(None)
    clock.advance(RELAY_INTERVAL)
    assert cluster.said(EVENTS)[-1]["events"] == [["station", {"station_id": "CP-3", "online": True}]]
    cluster.sent[-1][2].callback(None)

    # A node that stops listening says so; one that dies says nothing and is forgotten after three keepalives.
    cluster.hear(LISTENING, {"streams": 0}, origin="B")
    relay.publish("station", {"station_id": "CP-4", "online": True})
    clock.advance(RELAY_INTERVAL)
    assert len(cluster.said(EVENTS)) == 2
    cluster.hear(LISTENING, {"streams": 1}, origin="C")
    clock.advance(3 * KEEPALIVE - 1)
    assert relay._others_listen()
    clock.advance(2)
    relay.publish("station", {"station_id": "CP-5", "online": True})
    clock.advance(RELAY_INTERVAL)
    assert len(cluster.said(EVENTS)) == 2 and relay.listeners == {}


def test_a_node_says_it_listens_when_its_first_stream_opens_at_each_keepalive_and_when_its_last_closes():
    relay, cluster, clock, broker, sessions = relay_on()
    first = open_stream(broker, sessions)
    assert cluster.said(LISTENING) == [{"streams": 1, "transactions": []}]
    second = open_stream(broker, sessions)
    assert len(cluster.said(LISTENING)) == 1  # not again for a second stream of the same kind
    clock.advance(KEEPALIVE)
    assert cluster.said(LISTENING)[-1] == {"streams": 2, "transactions": []}
    # A page of a transaction: the others are told which, to send its meter values.
    chart = open_stream(broker, sessions, transaction=7)
    assert cluster.said(LISTENING)[-1] == {"streams": 3, "transactions": [7]}
    # A node that starts asks; one with streams open answers at once.
    cluster.hear(HELLO, {}, origin="C")
    assert cluster.said(LISTENING)[-1] == {"streams": 3, "transactions": [7]}
    said = len(cluster.said(LISTENING))
    broker.streams[0].close(finish=True)
    assert len(cluster.said(LISTENING)) == said  # still listening, and for the same transactions
    broker.streams[-1].close(finish=True)
    assert cluster.said(LISTENING)[-1] == {"streams": 1, "transactions": []} and chart.finished
    broker.streams[0].close(finish=True)
    assert cluster.said(LISTENING)[-1] == {"streams": 0, "transactions": []} and first.finished and second.finished
    said = len(cluster.said(LISTENING))
    clock.advance(KEEPALIVE * 3)
    cluster.hear(HELLO, {}, origin="C")
    assert len(cluster.said(LISTENING)) == said  # nothing more while none is open
    relay.hello()
    assert cluster.said(HELLO) == [{}]
    # A stopping node says nothing more (its database may be going), and sends nothing gathered.
    cluster.hear(LISTENING, {"streams": 1}, origin="B")
    open_stream(broker, sessions)
    relay.publish("station", {"station_id": "CP-1", "online": True})
    relay.stop()
    broker.stop()
    clock.advance(RELAY_INTERVAL * 2)
    assert len(cluster.said(LISTENING)) == said + 1 and cluster.said(EVENTS) == []


def test_what_one_interval_cannot_carry_or_a_failed_send_lost_is_told_to_the_pages_elsewhere():
    counted = []
    relay, cluster, clock, _, _ = relay_on(count_dropped=counted.append)
    cluster.hear(LISTENING, {"streams": 1, "transactions": [7]}, origin="B")
    for number in range(RELAY_MAX_EVENTS + 5):
        relay.publish("meter", {"station_id": "CP-1", "transaction_id": 7, "n": number})
        relay.publish("meter", {"station_id": "CP-2", "transaction_id": 8, "n": number})  # watched nowhere
    clock.advance(RELAY_INTERVAL)
    message = cluster.said(EVENTS)[0]
    assert len(message["events"]) == RELAY_MAX_EVENTS and message["dropped"] == 5
    assert message["events"][-1] == ["meter", {"station_id": "CP-1", "transaction_id": 7, "n": RELAY_MAX_EVENTS - 1}]
    # The database refused it: those are lost too, and the next message says how many were.
    cluster.sent[0][2].errback(RuntimeError("the database went away"))
    relay.publish("station", {"station_id": "CP-2", "online": False})
    clock.advance(RELAY_INTERVAL)
    assert cluster.said(EVENTS)[1] == {"events": [["station", {"station_id": "CP-2", "online": False}]],
                                       "dropped": RELAY_MAX_EVENTS + 5}
    assert sum(counted) == RELAY_MAX_EVENTS + 5  # each lost event counted once (the metric)


def test_events_heard_from_another_node_reach_the_streams_here_and_a_malformed_message_changes_nothing():
    relay, cluster, _, broker, sessions = relay_on()
    page = open_stream(broker, sessions)
    before = len(page.written)
    cluster.hear(EVENTS, {"events": [["status", {"station_id": "CP-9", "status": "Faulted"}],
                                     ["alert", {"x": 1}], ["meter"], "station", ["boot", "not a dict"]],
                          "dropped": 3}, origin="B")
    cluster.hear(EVENTS, {"events": "nonsense", "dropped": "many"}, origin="B")
    cluster.hear(EVENTS, {}, origin="B")
    written = page.written[before:]
    assert written == [b'event: status\ndata: {"station_id":"CP-9","status":"Faulted"}\n\n',
                       b'event: missed\ndata: {"node":"B","events":3}\n\n']
    cluster.hear(LISTENING, {"streams": "two"}, origin="B")
    assert relay.listeners == {}


def test_meter_values_go_only_to_the_pages_of_their_transaction_here_and_elsewhere():
    relay, cluster, clock, broker, sessions = relay_on()
    station_page, chart = open_stream(broker, sessions), open_stream(broker, sessions, transaction=7)
    cluster.hear(LISTENING, {"streams": 1, "transactions": [9, "x"]}, origin="B")
    cluster.hear(LISTENING, {"streams": 1, "transactions": "all"}, origin="C")
    assert (relay.wants_meter(7), relay.wants_meter(9), relay.wants_meter(8)) == (True, True, False)
    for transaction_id in (7, 8, 9):
        relay.publish("meter", {"transaction_id": transaction_id})
    relay.publish("transaction", {"transaction_id": 8, "active": True})
    clock.advance(RELAY_INTERVAL)
    assert b'"transaction_id":7' in b"".join(chart.written) and b"event: meter" not in b"".join(station_page.written)
    assert b'"transaction_id":8' in b"".join(chart.written)  # the transaction event goes to every page
    assert cluster.said(EVENTS) == [{"events": [["meter", {"transaction_id": 9}],
                                                ["transaction", {"transaction_id": 8, "active": True}]],
                                     "dropped": 0}]


def test_a_single_node_relays_nothing():
    class SingleNode(RecordingCluster):
        enabled = False

    relay, cluster, clock, broker, sessions = relay_on(SingleNode())
    open_stream(broker, sessions)
    relay.hello()
    relay.publish("station", {"station_id": "CP-1", "online": True})
    clock.advance(KEEPALIVE)
    assert cluster.sent == [] and cluster.subscribers == {}


# -- two real nodes ------------------------------------------------------------------------------------


async def relayed(node) -> None:
    """Run a node's relay (on the node's task.Clock) until it has sent everything it gathered."""
    relay = node.app.pm.get_plugin("dashboard").relay
    for _ in range(10):
        if relay._sending is not None:
            await within(relay._sending)
        elif relay._flush_call is not None:
            node.clock.advance(RELAY_INTERVAL)
        else:
            return
    raise AssertionError("the relay kept sending")


def heard(node, topic: str, wanted=lambda data: True) -> defer.Deferred:
    """Fires with the first message of ``topic`` ``node`` hears that is ``wanted`` (after its relay has
    handled it)."""
    got = defer.Deferred()
    node.app.cluster.subscribe(topic, lambda data, origin: got.called or not wanted(data)
                               or got.callback((data, origin)))
    return got


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_a_page_on_one_node_sees_a_station_connected_to_another(csms_factory):
    a = await start_node(csms_factory, "A", plugins=("core", "dashboard"))
    b = await start_node(csms_factory, "B", plugins=("core", "dashboard"))
    relay_a = a.app.pm.get_plugin("dashboard").relay
    b_listens = heard(a, LISTENING)
    client = await signed_in(b)
    status, _, response = await client.request("GET", "/ui/events", unbuffered=True)
    assert status == 200
    assert (await within(b_listens)) == ({"streams": 1, "transactions": []}, "B")
    assert relay_a._others_listen() and relay_a.listeners["B"][1] == frozenset()

    received, seen = [], {}

    def collect(data):
        received.append(data)
        text = b"".join(received)
        for needle, waiter in list(seen.items()):
            if needle in text and not waiter.called:
                waiter.callback(None)

    def seen_on_b(needle: bytes) -> defer.Deferred:
        seen[needle] = defer.Deferred()
        collect(b"")
        return seen[needle]
    stream = treq.collect(response, collect)

    station = await a.connect_booted("CP-A1")
    await station.status(1, "Faulted", "GroundFailure")
    await relayed(a)  # A gathers its events for an interval, then sends them
    await within(seen_on_b(b'"error_code":"GroundFailure"'))
    text = b"".join(received)
    assert b'event: station\ndata: {"station_id":"CP-A1","online":true}' in text
    assert text.index(b'"online":true') < text.index(b"event: boot") < text.index(b"GroundFailure")

    # A transaction on A, and its page open on B: B asks for its meter values, and gets them from A.
    assert (await a.api("POST", "/id-tags", json={"id_tag": "DRIVER-1"}))[0] == 201
    start = clock_now(a)
    started = await station.call("StartTransaction", {"connectorId": 1, "idTag": "DRIVER-1", "meterStart": 1000,
                                                      "timestamp": station_time(start)})
    transaction_id = started["transactionId"]
    await relayed(a)
    await within(seen_on_b(b'"transaction_id":%d,"connector_id":1,"active":true' % transaction_id))
    b_watches = heard(a, LISTENING)
    status, _, chart_response = await client.request("GET", f"/ui/events?transaction={transaction_id}",
                                                     unbuffered=True)
    assert status == 200
    assert (await within(b_watches)) == ({"streams": 2, "transactions": [transaction_id]}, "B")
    chart, chart_seen = [], defer.Deferred()

    def collect_chart(data):
        chart.append(data)
        if b"event: meter" in b"".join(chart) and not chart_seen.called:
            chart_seen.callback(None)
    chart_stream = treq.collect(chart_response, collect_chart)
    await station.call("MeterValues", {"connectorId": 1, "transactionId": transaction_id, "meterValue": [{
        "timestamp": station_time(start + timedelta(minutes=1)),
        "sampledValue": [{"value": "1500", "measurand": "Energy.Active.Import.Register", "unit": "Wh"}]}]})
    await relayed(a)
    await within(chart_seen)
    assert b'"energy":[["%s",1500.0]]' % station_time(start + timedelta(minutes=1)).encode() in b"".join(chart)
    assert b"event: meter" not in b"".join(received)  # only the transaction's page gets its meter values

    # B's page closes: B says so, and A sends nothing more.
    b_stops = heard(a, LISTENING, lambda data: data["streams"] == 0)
    await client.request("POST", "/ui/logout", form={"csrf_token": b.app.pm.get_plugin("dashboard")
                                                     .broker.streams[0].session.csrf_token})
    await within(stream)
    await within(chart_stream)
    assert (await within(b_stops)) == ({"streams": 0, "transactions": []}, "B")
    assert not relay_a._others_listen()
    await station.status(1, "Available")
    assert relay_a.pending == [] and relay_a._flush_call is None and relay_a._sending is None
