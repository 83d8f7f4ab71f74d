"""Three nodes on one PostgreSQL database, in one reactor, each on its own ports and task.Clock: presence,
commands sent through any node, the newer connection winning across nodes, node leases (issue 16)."""
from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import defer, task
from sqlalchemy import text

from conftest import EventProbe, db_settled, error_of, within
from test_webhooks import ALLOW_LOOPBACK, drain, plugin_of, receiver, subscribe  # noqa: F401, F811 (a fixture)
from csms.rpc import CallTimeout, StationOffline
from csms.stations import UNRECORDED_END

RESET = {"type": "Soft"}
LEASE, HEARTBEAT = 15, 5


def synchronised_clock(csms_factory) -> task.Clock:
    """A node's own clock, reading at its start what the test's first node's read at its own: a cluster's
    nodes compare lease times, so their clocks must agree (docs/cluster.md), however long the real time
    between two nodes' starts on a loaded machine (a lease's worth of seconds would have one node take
    the other for gone)."""
    if not hasattr(csms_factory, "cluster_epoch"):
        csms_factory.cluster_epoch = time.time()
    clock = task.Clock()
    clock.advance(csms_factory.cluster_epoch)
    return clock


async def start_node(csms_factory, name: str, plugins=("core",), extra: str = ""):
    probe = EventProbe()
    node = await csms_factory(f"[cluster]\nenabled = true\nnode_name = {name}\nlease_seconds = {LEASE}\n"
                              f"heartbeat_seconds = {HEARTBEAT}\n" + extra, extra_plugins=[probe],
                              plugins=list(plugins), clock=synchronised_clock(csms_factory))
    node.probe = probe
    return node


async def three_nodes(csms_factory):
    return [await start_node(csms_factory, name) for name in ("A", "B", "C")]


async def connected_to(node, others, station_id: str):
    """A booted station on ``node``, once every other node has heard where it is."""
    station = await node.connect_booted(station_id)
    for other in others:
        assert await other.probe.next("presence", station_id) == (node.app.cluster.node, None)
    return station


def forwarded(node) -> dict:
    """outcome -> count of the calls ``node`` forwarded (its csms_cluster_forwarded_calls_total)."""
    return {sample.labels["outcome"]: sample.value
            for family in node.app.metrics.registry.collect() if family.name == "csms_cluster_forwarded_calls"
            for sample in family.samples if sample.name.endswith("_total")}


async def renew(node, seconds: float) -> None:
    """Move a node's clock on and renew its lease (sweeping the nodes whose lease expired)."""
    node.clock.advance(seconds)
    await node.app.cluster.heartbeat()


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_a_command_sent_to_any_node_reaches_the_station_on_its_node(csms_factory):
    a, b, c = await three_nodes(csms_factory)
    station = await connected_to(a, (b, c), "CP-1")
    station.responses["Reset"] = {"status": "Accepted"}
    status, body, _ = await within(c.api("POST", "/stations/CP-1/calls/Reset", json=RESET))
    assert (status, body) == (200, {"status": "Accepted"})
    assert station.received_calls[-1][2:] == ["Reset", RESET]
    status, body, _ = await within(b.api("POST", "/stations/CP-1/reset", json={"type": "Hard"}))  # a friendly route
    assert (status, body) == (200, {"status": "Accepted"})
    assert station.received_calls[-1][2:] == ["Reset", {"type": "Hard"}]
    status, body, _ = await within(b.api("GET", "/stations/CP-1"))
    assert (status, body["online"], body["node"]) == (200, True, "A")
    status, body, _ = await within(c.api("GET", "/stations?online=true"))
    assert [item["id"] for item in body["items"]] == ["CP-1"]
    # A station known to all but connected nowhere: 409 from any node.
    assert (await within(c.api("POST", "/stations", json={"id": "CP-2"})))[0] == 201
    status, body, _ = await within(c.api("POST", "/stations/CP-2/calls/Reset", json=RESET))
    assert (status, error_of(body)) == (409, "station_offline")
    assert forwarded(c) == {"answered": 1.0} and forwarded(b) == {"answered": 1.0} and forwarded(a) == {}
    # The station leaves A: every node hears it.
    await within(station.close())
    for node in (b, c):  # each node hears it on its own connection, in no set order between them
        assert await node.probe.next("presence", "CP-1") == (None, "A")
    status, body, _ = await within(c.api("GET", "/stations/CP-1"))
    assert (body["online"], body["node"]) == (False, None)
    status, body, _ = await within(b.api("GET", "/stations?online=false"))
    assert [item["id"] for item in body["items"]] == ["CP-1", "CP-2"]


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_a_station_that_does_not_answer_a_forwarded_call_is_504(csms_factory):
    a, b, c = await three_nodes(csms_factory)
    station = await connected_to(a, (b, c), "CP-1")
    station.responses["Reset"] = None  # silence
    answer = within(c.api("POST", "/stations/CP-1/calls/Reset", json=RESET))
    await within(station.wait_for_call("Reset"))
    a.clock.advance(a.app.config.ocpp.response_timeout)  # the holder's own timeout: its CallTimeout travels back
    status, body, _ = await answer
    assert (status, error_of(body)) == (504, "station_timeout")
    assert forwarded(c) == {"timeout": 1.0}


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_the_newer_connection_on_another_node_closes_the_older_one(csms_factory):
    a, b, c = await three_nodes(csms_factory)
    older = await connected_to(a, (b, c), "CP-1")
    newer = await b.connect_booted("CP-1")
    was_clean, code, reason = await within(older.closed)
    assert (code, reason) == (4000, "Replaced by a newer connection")
    assert await a.probe.next("disconnected", "CP-1") == "replaced"
    assert await c.probe.next("presence", "CP-1") == ("B", "A")
    assert "CP-1" not in a.app.sessions and "CP-1" in b.app.sessions
    status, body, _ = await within(c.api("GET", "/stations/CP-1"))
    assert body["node"] == "B"
    # The older connection's end is recorded once, by the node that took the station, before the newer
    # connection (whether the older node is alive to close it or not).
    await db_settled(a.app)
    status, body, _ = await within(c.api("GET", "/stations/CP-1/events"))
    assert [(e["event"], e["detail"]) for e in reversed(body["items"])] == [
        ("connected", None), ("replaced", "connected to node B"), ("connected", None)]
    newer.responses["Reset"] = {"status": "Accepted"}
    status, body, _ = await within(a.api("POST", "/stations/CP-1/calls/Reset", json=RESET))
    assert (status, body) == (200, {"status": "Accepted"})


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_nodes_are_listed_with_their_station_counts(csms_factory):
    a, b, c = await three_nodes(csms_factory)
    await connected_to(a, (b, c), "CP-1")
    await connected_to(a, (b, c), "CP-2")
    await connected_to(c, (a, b), "CP-3")
    status, body, _ = await within(b.api("GET", "/nodes"))
    assert status == 200
    assert [(node["name"], node["alive"], node["stations"]) for node in body["items"]] == [
        ("A", True, 2), ("B", True, 0), ("C", True, 1)]


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_an_expired_lease_clears_the_nodes_presence_and_ends_its_forwarded_calls(csms_factory):
    a, b, c = await three_nodes(csms_factory)
    await connected_to(a, (b, c), "CP-1")
    await a.app.cluster.stop_listening()  # A hangs: no heartbeat, hears nothing
    waiting = c.app.call("CP-1", "Reset", RESET)
    await renew(c, LEASE + HEARTBEAT)
    await renew(b, LEASE + HEARTBEAT)  # B finds A's lease expired and clears it
    assert await b.probe.next("presence", "CP-1") == (None, "A")
    assert await c.probe.next("presence", "CP-1") == (None, "A")
    with pytest.raises(StationOffline):
        await within(waiting)  # at once, well before the forward timeout
    assert not c.app.is_connected("CP-1")
    status, body, _ = await within(c.api("GET", "/nodes"))
    assert [node["name"] for node in body["items"]] == ["B", "C"]


async def connection_events(node, station_id: str) -> list[tuple[str, str | None]]:
    status, body, _ = await within(node.api("GET", f"/stations/{station_id}/events"))
    assert status == 200, body
    return [(e["event"], e["detail"]) for e in reversed(body["items"])]


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_a_connection_on_a_node_that_died_is_recorded_ended_whenever_the_station_comes_back(csms_factory):
    """A node that dies records no end for its connections: the node the station connects to next does,
    as ``replaced`` while the dead node still holds the station, as lost once the dead node was swept."""
    a, b, c = await three_nodes(csms_factory)
    await connected_to(a, (b, c), "CP-1")
    await connected_to(a, (b, c), "CP-2")
    await a.app.cluster.stop_listening()  # A died: no heartbeat, hears nothing, closes nothing
    # Before A's lease expires: A still holds CP-1, the new connection replaces it.
    await b.connect_booted("CP-1")
    assert await c.probe.next("presence", "CP-1") == ("B", "A")
    assert await connection_events(c, "CP-1") == [("connected", None), ("replaced", "connected to node B"),
                                                  ("connected", None)]
    await renew(c, LEASE + HEARTBEAT)
    await renew(b, LEASE + HEARTBEAT)  # B finds A's lease expired: CP-2 is connected nowhere now
    assert await c.probe.next("presence", "CP-2") == (None, "A")
    await c.connect_booted("CP-2")
    assert await c.probe.next("disconnected", "CP-2") == UNRECORDED_END
    assert await connection_events(b, "CP-2") == [("connected", None), ("disconnected", UNRECORDED_END),
                                                  ("connected", None)]


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_a_holder_that_stops_answering_ends_the_call_with_a_timeout(csms_factory):
    a, b, c = await three_nodes(csms_factory)
    await connected_to(a, (b, c), "CP-1")
    assert (await within(a.app.readiness.run()))["cluster"] is None
    await a.app.cluster.stop_listening()
    assert "not listening" in (await within(a.app.readiness.run()))["cluster"]  # /readyz: 503, no new stations
    waiting = c.app.call("CP-1", "Reset", RESET)
    c.clock.advance(c.app.config.cluster.forward_deadline(c.app.config.ocpp.response_timeout))
    with pytest.raises(CallTimeout):
        await within(waiting)


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_a_clean_stop_removes_the_node_and_its_stations(csms_factory):
    a, b, c = await three_nodes(csms_factory)
    await connected_to(a, (b, c), "CP-1")
    await a.stop()
    assert await b.probe.next("presence", "CP-1") == (None, "A")
    status, body, _ = await within(b.api("GET", "/nodes"))
    assert [node["name"] for node in body["items"]] == ["B", "C"]


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_a_node_started_again_under_its_name_takes_it_over(csms_factory):
    a, b, c = await three_nodes(csms_factory)
    await connected_to(a, (b, c), "CP-1")
    await a.app.cluster.stop_listening()  # the process died without leaving
    again = await start_node(csms_factory, "A")
    assert await b.probe.next("presence", "CP-1") == (None, "A")
    assert not b.app.is_connected("CP-1")
    await connected_to(again, (b, c), "CP-2")
    await a.stop()  # the old instance, stopping late, leaves the new one's stations alone
    status, body, _ = await within(c.api("GET", "/nodes"))
    assert [(node["name"], node["stations"]) for node in body["items"]] == [("A", 1), ("B", 0), ("C", 0)]
    assert c.app.cluster.holder("CP-2") == "A"


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_deleting_a_station_on_one_node_closes_its_connection_on_another(csms_factory):
    a, b, c = await three_nodes(csms_factory)
    station = await connected_to(a, (b, c), "CP-1")
    assert (await within(c.api("DELETE", "/stations/CP-1")))[0] == 204
    was_clean, code, reason = await within(station.closed)
    assert code == 1000 and "deleted" in reason


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_plugins_hear_each_others_messages_small_and_large(csms_factory):
    a, b, c = await three_nodes(csms_factory)
    from twisted.internet import defer

    heard = {name: defer.Deferred() for name in ("A", "C")}
    for node in (a, c):
        node.app.cluster.subscribe("test.hello", lambda data, origin, n=node: heard[n.app.cluster.node].callback(
            (data, origin)))
    big = {"text": "x" * 20000}
    await b.app.cluster.broadcast("test.hello", big)
    assert await within(heard["A"]) == (big, "B")
    assert await within(heard["C"]) == (big, "B")


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_calls_and_answers_larger_than_notify_allows_go_through_the_table(csms_factory):
    a, b, c = await three_nodes(csms_factory)
    station = await connected_to(a, (b, c), "CP-1")
    station.responses["DataTransfer"] = {"status": "Accepted", "data": "y" * 20000}
    request = {"vendorId": "acme", "data": "x" * 20000}
    status, body, _ = await within(c.api("POST", "/stations/CP-1/calls/DataTransfer", json=request))
    assert (status, body) == (200, {"status": "Accepted", "data": "y" * 20000})
    assert station.received_calls[-1][3] == request
    rows = await a.app.db.run(lambda conn: conn.execute(text("SELECT count(*) FROM csms_cluster_messages"))
                              .scalar_one())
    assert rows == 0  # each read once by its one reader, and deleted


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_a_node_whose_listen_connection_drops_listens_again(csms_factory):
    a, b, c = await three_nodes(csms_factory)
    listening_again = a.app.cluster.when_listening()
    pid = a.app.cluster.channel.backend_pid
    await b.app.db.run(lambda conn: conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}))
    await within(listening_again)
    assert a.app.cluster.channel.backend_pid != pid
    await connected_to(b, (a, c), "CP-1")  # A hears the presence again
    assert a.app.cluster.holder("CP-1") == "B"


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_what_a_node_missed_while_not_listening_is_told_once_it_listens_again(csms_factory, monkeypatch):
    import threading

    a, b = await start_node(csms_factory, "A"), await start_node(csms_factory, "B")
    waiting = await connected_to(b, (a,), "CP-1")
    waiting.responses["Reset"] = None  # never answers: the call forwarded from A waits
    forwarded_call = a.app.call("CP-1", "Reset", RESET)
    await within(waiting.wait_for_call("Reset"))
    channel, gate = a.app.cluster.channel, threading.Event()
    connect = channel.connect

    def held_connect():
        gate.wait(10)
        return connect()
    monkeypatch.setattr(channel, "connect", held_connect)
    listening_again = a.app.cluster.when_listening()
    await b.app.db.run(lambda conn: conn.execute(text("SELECT pg_terminate_backend(:pid)"),
                                                 {"pid": channel.backend_pid}))
    await within(waiting.close())  # CP-1 leaves B while A hears nothing
    await connected_to(b, (), "CP-2")
    assert await b.probe.next("disconnected", "CP-1")  # recorded
    gate.set()
    await within(listening_again)
    assert await a.probe.next("presence", "CP-1") == (None, "B")
    assert await a.probe.next("presence", "CP-2") == ("B", None)
    with pytest.raises(StationOffline):
        await within(forwarded_call)  # at once, not after the forward deadline
    assert (a.app.cluster.holder("CP-1"), a.app.cluster.holder("CP-2")) == (None, "B")


@pytest_twisted.ensureDeferred
async def test_a_single_node_lists_itself_and_tells_presence_on_connect_and_disconnect(csms_factory):
    probe = EventProbe()
    node = await csms_factory(extra_plugins=[probe], plugins=["core"])
    station = await node.connect_booted("CP-1")
    assert await probe.next("presence", "CP-1") == (node.app.cluster.node, None)
    status, body, _ = await within(node.api("GET", "/nodes"))
    assert status == 200
    [listed] = body["items"]
    assert (listed["name"], listed["alive"], listed["stations"]) == (node.app.cluster.node, True, 1)
    status, body, _ = await within(node.api("GET", "/stations/CP-1"))
    assert (body["online"], body["node"]) == (True, node.app.cluster.node)
    await within(station.close())
    assert await probe.next("presence", "CP-1") == (None, node.app.cluster.node)
    status, body, _ = await within(node.api("GET", "/stations/CP-1"))
    assert (body["online"], body["node"]) == (False, None)


def test_cluster_settings_are_checked():
    from csms.config import ConfigError, load_config

    assert load_config(text="[cluster]\nenabled = true\nnode_name = east-1\n").cluster.node_name == "east-1"
    for text, message in [("lease_seconds = 5\nheartbeat_seconds = 5", "lease_seconds must be"),
                          ("heartbeat_seconds = 0", "heartbeat_seconds must be"),
                          ("forward_timeout = -1", "forward_timeout must be"),
                          ("nodes = 3", "has no setting 'nodes'")]:
        with pytest.raises(ConfigError, match=message):
            load_config(text="[cluster]\n" + text + "\n")


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_a_message_published_in_a_transaction_that_rolls_back_is_never_sent(csms_factory):
    from twisted.internet import defer

    a, b = await start_node(csms_factory, "A"), await start_node(csms_factory, "B")
    heard, first = [], defer.Deferred()

    def hear(data, origin):
        heard.append((data, origin))
        if not first.called:
            first.callback(None)
    b.app.cluster.subscribe("test.changed", hear)
    a.app.cluster.subscribe("test.changed", hear)  # a node does not hear its own messages

    def rolled_back(conn):
        a.app.cluster.publish(conn, "test.changed", {"n": 1})
        raise ValueError("the change failed")

    def committed(conn):
        a.app.cluster.publish(conn, "test.changed", {"n": 2})
    with pytest.raises(ValueError):
        await a.app.db.run(rolled_back)
    await a.app.db.run(committed)
    await within(first)  # messages come in commit order: the first heard would be the rolled-back one
    assert heard == [({"n": 2}, "A")]


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_one_node_leads_and_the_next_takes_over_when_its_lease_expires(csms_factory):
    """The cluster's one-at-a-time work (webhook delivery) has exactly one node at a time: the alive node
    with the smallest name; when it dies, the next one once the dead node's lease has expired."""
    a, b, c = await three_nodes(csms_factory)
    for node in (a, b, c):
        await renew(node, 0)
    assert [node.app.cluster.leads() for node in (a, b, c)] == [True, False, False]
    told = []
    b.app.cluster.watch_leadership(told.append)
    await a.app.cluster.stop_listening()  # A hangs: no heartbeat
    await renew(b, HEARTBEAT)
    assert not b.app.cluster.leads() and told == []  # A's lease still runs
    for _ in range((LEASE + HEARTBEAT) // HEARTBEAT):  # B and C go on beating; A's lease runs out
        await renew(c, HEARTBEAT)
        await renew(b, HEARTBEAT)
    assert [b.app.cluster.leads(), c.app.cluster.leads()] == [True, False]
    assert told == [True]
    a.clock.advance(LEASE + HEARTBEAT)  # A's own lease lapsed: it leads no more, whatever it last read
    assert not a.app.cluster.leads()


@pytest_twisted.ensureDeferred
async def test_a_single_node_always_leads(csms):
    assert csms.app.cluster.leads()


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_webhooks_subscribed_on_one_node_are_written_by_every_node_and_sent_by_the_leader(csms_factory,
                                                                                                 receiver):
    """Every node writes events for a subscription made on another (a message refreshes its writer); only
    the leading node delivers, so each event is POSTed once."""
    a, b, c = [await start_node(csms_factory, name, plugins=("core", "webhooks"), extra=ALLOW_LOOPBACK)
               for name in ("A", "B", "C")]
    assert [node.app.cluster.leads() for node in (a, b, c)] == [True, False, False]
    refreshed = defer.Deferred()
    writer_of_c = plugin_of(c)
    refresh = writer_of_c.refresh_wanted
    writer_of_c.refresh_wanted = lambda: refresh().addCallback(lambda _: refreshed.callback(None))
    await subscribe(b, receiver.url, ["station.connected"])
    await within(refreshed)
    # C writes station.connected to the outbox with the presence row: once A hears it, A's pass finds it.
    await connected_to(c, (a, b), "CP-1")
    a.clock.advance(HEARTBEAT)  # A's next look at the outbox
    delivered = await within(receiver.arrived.get())
    assert (delivered["json"]["type"], delivered["json"]["data"]["station_id"]) == ("station.connected", "CP-1")
    await drain(a)
    assert [plugin_of(node).dispatcher.stats["passes"] for node in (b, c)] == [0, 0]
    assert len(receiver.requests) == 1


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_a_started_node_hears_every_message_sent_after_its_start(csms_factory):
    """A node listens before start-up ends: a change another node makes right after is never missed."""
    a = await start_node(csms_factory, "A")
    heard = defer.Deferred()
    b = await start_node(csms_factory, "B")
    b.app.cluster.subscribe("test.hello", lambda data, origin: heard.callback((data, origin)))
    assert b.app.cluster.channel.listening
    await a.app.cluster.broadcast("test.hello", {"n": 1})
    await a.connect_booted("CP-1")
    assert await within(heard) == ({"n": 1}, "A")
    assert await b.probe.next("presence", "CP-1") == ("A", None)


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_a_node_taken_for_gone_records_no_presence_until_it_registers_again(csms_factory):
    """A presence row naming a node the others already cleared would never be swept: a station would stay
    'connected' to a dead node for ever. The node's heartbeat, registering it again, records it."""
    a, b = await start_node(csms_factory, "A"), await start_node(csms_factory, "B")
    await a.app.cluster.stop_listening()  # A hangs, its listener on: B takes it for gone
    await renew(b, LEASE + HEARTBEAT)
    await a.connect_booted("CP-1")
    assert await a.probe.next("presence", "CP-1") == ("A", None)  # A's own view: recorded as far as it can
    heard = defer.Deferred()
    b.app.cluster.subscribe("test.after", lambda data, origin: heard.callback(None))
    await a.app.cluster.broadcast("test.after", {})  # committed after A's connection event
    await within(heard)
    assert b.app.cluster.holder("CP-1") is None
    rows = await b.app.db.run(lambda conn: conn.execute(text("SELECT count(*) FROM csms_presence")).scalar_one())
    assert rows == 0
    await a.app.cluster.heartbeat()  # A comes back: registered again with its stations
    assert await b.probe.next("presence", "CP-1") == ("A", None)
    assert b.app.cluster.holder("CP-1") == "A"


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_a_stopped_node_handles_no_message_its_listener_read_last(csms_factory):
    """The listening thread may have handed messages to the reactor just before the node stopped."""
    import json

    a, b = await start_node(csms_factory, "A"), await start_node(csms_factory, "B")
    await b.app.cluster.stop_listening()
    late = {"o": "A", "i": a.app.cluster.instance, "t": "cluster.presence",
            "d": {"station": "CP-1", "node": "A", "previous": None, "connection": "x"}}
    b.app.cluster.channel._received(json.dumps(late))
    assert b.app.cluster.holder("CP-1") is None and b.probe.unclaimed("presence", "CP-1") == 0


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_a_heartbeat_under_way_when_the_node_stops_does_not_register_it_again(csms_factory, monkeypatch):
    """A renewal that commits after the node left would find its row gone and register it again: a stopped
    node listed (and leading) for a whole lease."""
    import threading

    from twisted.internet import reactor, threads

    a, b = await start_node(csms_factory, "A"), await start_node(csms_factory, "B")
    cluster = a.app.cluster
    beat, at_gate, gate = cluster._beat, threading.Event(), threading.Event()

    def held_beat(conn, now, local):
        at_gate.set()
        gate.wait(10)
        return beat(conn, now, local)
    monkeypatch.setattr(cluster, "_beat", held_beat)
    run, leaving = a.app.db.run, []

    def watched_run(function, *args, desc="", **kwargs):
        d = run(function, *args, desc=desc, **kwargs)
        if desc == "cluster_leave":
            leaving.append(d)
        return d
    monkeypatch.setattr(a.app.db, "run", watched_run)
    beating = cluster.heartbeat()
    await within(threads.deferToThreadPool(reactor, reactor.getThreadPool(), at_gate.wait, 10))
    stopping = cluster.stop()
    # The renewal goes on once the leave, if it was sent already, has committed: the worst order.
    if leaving:
        leaving[0].addBoth(lambda _: gate.set())
    else:
        gate.set()
    await within(stopping)
    await within(beating)
    status, body, _ = await within(b.api("GET", "/nodes"))
    assert [node["name"] for node in body["items"]] == ["B"]


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_listening_again_twice_in_a_row_applies_the_later_reload(csms_factory):
    """The LISTEN connection may drop again while the presence map reloads after the first drop."""
    import gc

    from test_hardening_http import LoggedFailures

    a, b = await start_node(csms_factory, "A"), await start_node(csms_factory, "B")
    await connected_to(b, (a,), "CP-1")
    cluster = a.app.cluster
    with LoggedFailures() as failures:
        listening = [cluster.when_listening()]
        cluster._listening()
        listening.append(cluster.when_listening())
        cluster._listening()  # before the first reload's read has come back
        await within(defer.gatherResults(listening))
        await within(db_settled(a.app))  # both reloads' reads have come back
        gc.collect()  # a failure nobody handled is logged when its Deferred goes
    assert failures.events == []
    assert cluster.holder("CP-1") == "B"
