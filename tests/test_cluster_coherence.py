"""What nodes keep in memory stays true when another node changes the data or a station moves (issue 16, item 4).

Every test here first shows the stale answer a node gives before it hears of the other node's change,
then the right one after the message (or the presence event) arrives:

* the Core plugin's id-tag cache (``core.id_tag``): tags written, transactions holding them;
* the Reservation plugin's timers and ``none_live_at`` shortcut (``reservation.live``, presence), and
  expiry exactly once whichever nodes' timers fire;
* the Smart Charging plugin's "stations with profiles" shortcut (``smartcharging.installed``, presence);
* the Local Authorization List: its state is read from the database per request; automatic syncs
  reach stations on every node (``localauth.id_tag``); a boot sync stays with the station's node.

Messages travel on :class:`Bus`, a stand-in for the PostgreSQL channel: what a node publishes is kept
until the test has awaited the change (so it is committed) and then handed to the other nodes'
``app.cluster.deliver``, as the channel does. On SQLite (and PostgreSQL) the "other node" is a second
store of the plugin on the same database; ``postgresql_only`` tests run two whole Central Systems on one
database.
"""
from __future__ import annotations

import json
from datetime import timedelta

import pytest
import pytest_twisted
from conftest import booted, clock_now, core_store, db_settled, station_time, within
from csms_plugins.core.store import CoreStore
from csms_plugins.reservation.store import ReservationStore
from csms_plugins.smartcharging.store import SmartChargingStore
from twisted.internet import task

from csms.cluster import Subscribers

STATION = "CLU-1"
TAG = "CLU-TAG-01"
OTHER = "node-b"


class Bus:
    """Carries what each node publishes to every other node, when the test calls :meth:`flush`."""

    def __init__(self):
        self.sent: list[tuple] = []
        self.nodes: list = []

    def join(self, cluster, name: str):
        """Put a cluster (an app's ``app.cluster``, or a :class:`StandIn`) on the bus as node ``name``."""
        cluster.enabled = True
        cluster.node = name
        cluster.publish = lambda conn, topic, data: self._send(cluster, topic, data)
        cluster.broadcast = lambda topic, data: self._sent_now(cluster, topic, data)
        self.nodes.append(cluster)
        return cluster

    def _send(self, origin, topic: str, data: dict) -> None:
        # Through JSON, as NOTIFY carries it: a datetime or set in a message fails here.
        self.sent.append((origin, topic, json.loads(json.dumps(data))))

    def _sent_now(self, origin, topic, data):
        from twisted.internet import defer
        self._send(origin, topic, data)
        return defer.succeed(None)

    def flush(self) -> list[str]:
        """Deliver what was published so far; returns the topics delivered."""
        sent, self.sent = self.sent, []
        for origin, topic, data in sent:
            for node in self.nodes:
                if node is not origin:
                    node.deliver(topic, data, origin=origin.node)
        return [topic for _, topic, _ in sent]


class StandIn:
    """The cluster of a node that is only a store (the other node of a one-app test)."""

    def __init__(self):
        self.subscribers = Subscribers()

    def subscribe(self, topic, callback):
        self.subscribers.subscribe(topic, callback)

    def deliver(self, topic, data, origin):
        self.subscribers.deliver(topic, data, origin)


def plugin(csms, name):
    return csms.app.pm.get_plugin(name)


async def authorize(station, id_tag: str = TAG) -> str:
    return (await within(station.call("Authorize", {"idTag": id_tag})))["idTagInfo"]["status"]


def presence_here(csms, station_id: str = STATION):
    """The presence event a cluster fires when the station connects to this node, coming from another."""
    return within(csms.app.fire("csms_on_presence_changed", station_id=station_id, node=csms.app.cluster.node,
                                previous_node=OTHER))


@pytest.fixture
def bus():
    return Bus()


# -- Core: the id-tag cache -------------------------------------------------------------------------------


def other_core(csms, bus) -> CoreStore:
    return CoreStore(csms.app.db, csms.clock, cluster=bus.join(StandIn(), OTHER))


@pytest.mark.parametrize("how", ["put", "update", "delete"])
@pytest_twisted.ensureDeferred
async def test_id_tag_changed_on_another_node_is_not_answered_from_the_cache(csms, bus, how):
    bus.join(csms.app.cluster, "node-a")
    other = other_core(csms, bus)
    await within(core_store(csms).put_id_tag(TAG))
    station = await booted(csms, STATION)
    assert await authorize(station) == "Accepted"  # cached now
    bus.flush()  # the set-up's own messages
    change = {"put": lambda: other.put_id_tag(TAG, "Blocked"), "update": lambda: other.update_id_tag(TAG, status="Blocked"),
              "delete": lambda: other.delete_id_tag(TAG)}[how]
    await within(change())
    assert await authorize(station) == "Accepted"  # stale until the message arrives
    assert bus.flush() == ["core.id_tag"]
    assert await authorize(station) == ("Invalid" if how == "delete" else "Blocked")


@pytest_twisted.ensureDeferred
async def test_transaction_on_another_node_makes_the_tag_concurrent_tx_here(csms, bus):
    bus.join(csms.app.cluster, "node-a")
    other = other_core(csms, bus)
    await within(core_store(csms).put_id_tag(TAG))
    station = await booted(csms, STATION)
    assert await authorize(station) == "Accepted"
    bus.flush()
    payload = {"connectorId": 1, "idTag": TAG, "meterStart": 0, "timestamp": station_time(clock_now(csms))}
    transaction, _ = await within(other.start_transaction("CLU-ELSEWHERE", payload, {"status": "Accepted"}))
    assert bus.flush() == ["core.id_tag"]
    assert await authorize(station) == "ConcurrentTx"
    await within(other.stop_transaction("CLU-ELSEWHERE", {
        "transactionId": transaction["transaction_id"], "meterStop": 10, "timestamp": payload["timestamp"]}))
    assert bus.flush() == ["core.id_tag"]
    assert await authorize(station) == "Accepted"


@pytest_twisted.ensureDeferred
async def test_a_refused_start_elsewhere_tells_nobody(csms, bus):
    """Only a start that holds its tag changes ConcurrentTx answers: no message for a refused one."""
    other = other_core(csms, bus)
    payload = {"connectorId": 1, "idTag": TAG, "meterStart": 0, "timestamp": station_time(clock_now(csms))}
    await within(other.start_transaction("CLU-ELSEWHERE", payload, {"status": "Invalid"}))
    assert bus.flush() == []


@pytest_twisted.ensureDeferred
async def test_a_message_naming_no_tag_clears_the_whole_cache(csms):
    store = core_store(csms)
    for tag in (TAG, "CLU-TAG-02"):
        await within(store.put_id_tag(tag))
        await within(store.id_tag_info(tag, False))
    assert store.cached_id_tag_info(TAG, False) == {"status": "Accepted"}
    csms.app.cluster.deliver("core.id_tag", {"id_tag": None}, origin=OTHER)
    assert [store.cached_id_tag_info(tag, False) for tag in (TAG, "CLU-TAG-02")] == [None, None]


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_operator_blocks_a_tag_on_one_node_station_on_the_other_sees_it(csms_factory, bus):
    node_a = await csms_factory(plugins=["core"])
    node_b = await csms_factory(plugins=["core"])
    bus.join(node_a.app.cluster, "node-a")
    bus.join(node_b.app.cluster, "node-b")
    await within(core_store(node_a).put_id_tag(TAG))
    station = await booted(node_b, STATION)
    bus.flush()
    assert await authorize(station) == "Accepted"  # cached on node B
    status, _, _ = await within(node_a.api("PATCH", f"/id-tags/{TAG}", json={"status": "Blocked"}))
    assert status == 200
    assert await authorize(station) == "Accepted"
    assert bus.flush() == ["core.id_tag"]
    assert await authorize(station) == "Blocked"


# -- Reservation: timers and the none_live_at shortcut ----------------------------------------------------


def other_reservations(csms, bus) -> ReservationStore:
    return ReservationStore(csms.app.db, csms.clock, cluster=bus.join(StandIn(), OTHER))


def reserve_now(csms, reservation_id: int, seconds: float = 600, connector_id: int = 1) -> dict:
    return {"connectorId": connector_id, "idTag": TAG, "reservationId": reservation_id,
            "expiryDate": station_time(clock_now(csms) + timedelta(seconds=seconds))}


async def reservation_state(store: ReservationStore, reservation_id: int) -> str:
    return (await within(store.get(STATION, reservation_id)))["state"]


async def reservation_csms(csms_factory, clock=None, plugins=("core", "reservation")):
    csms = await csms_factory(plugins=plugins, clock=clock)
    await within(plugin(csms, "reservation").timers.ready)
    await within(core_store(csms).put_id_tag(TAG))
    return csms


async def start_transaction(csms, station) -> dict:
    answer = await within(station.call("StartTransaction", {"connectorId": 1, "idTag": TAG, "meterStart": 0,
                                                            "timestamp": station_time(clock_now(csms))}))
    await within(db_settled(csms.app))
    return answer


@pytest_twisted.ensureDeferred
async def test_reservation_made_on_another_node_is_consumed_by_a_start_here(csms_factory, bus):
    csms = await reservation_csms(csms_factory)
    bus.join(csms.app.cluster, "node-a")
    other = other_reservations(csms, bus)
    station = await booted(csms, STATION)
    timers = plugin(csms, "reservation").timers
    bus.flush()
    row, _ = await within(other.record_reserve_answer(STATION, reserve_now(csms, 41), "Accepted"))
    assert timers.none_live_at(STATION)  # stale until the message arrives
    assert bus.flush() == ["reservation.live"]
    assert not timers.none_live_at(STATION) and row["record_id"] in timers.calls
    await start_transaction(csms, station)
    assert await reservation_state(other, 41) == "consumed"
    assert timers.calls == {} and timers.none_live_at(STATION)


@pytest_twisted.ensureDeferred
async def test_reservation_closed_on_another_node_loses_its_timer_here(csms_factory, bus):
    csms = await reservation_csms(csms_factory)
    bus.join(csms.app.cluster, "node-a")
    other = other_reservations(csms, bus)
    timers = plugin(csms, "reservation").timers
    cancelled, _ = await within(other.record_reserve_answer(STATION, reserve_now(csms, 42), "Accepted"))
    replaced, _ = await within(other.record_reserve_answer(STATION, reserve_now(csms, 43), "Accepted"))
    bus.flush()
    assert set(timers.calls) == {cancelled["record_id"], replaced["record_id"]}
    await within(other.record_cancel(STATION, 42, "Accepted"))
    newer, closed = await within(other.record_reserve_answer(STATION, reserve_now(csms, 43, 900), "Accepted"))
    assert closed == [replaced["record_id"]]
    assert bus.flush() == ["reservation.live", "reservation.live"]
    assert set(timers.calls) == {newer["record_id"]}
    await within(other.delete_station(STATION))
    bus.flush()
    assert timers.calls == {} and timers.none_live_at(STATION)


@pytest_twisted.ensureDeferred
async def test_station_connecting_here_rereads_its_reservations(csms_factory, bus):
    """Messages lost (a node's channel reconnected): the presence event re-reads the station's reservations."""
    csms = await reservation_csms(csms_factory)
    bus.join(csms.app.cluster, "node-a")
    other = other_reservations(csms, bus)
    timers = plugin(csms, "reservation").timers
    known, _ = await within(other.record_reserve_answer(STATION, reserve_now(csms, 44), "Accepted"))
    bus.flush()
    await within(other.record_cancel(STATION, 44, "Accepted"))
    live, _ = await within(other.record_reserve_answer(STATION, reserve_now(csms, 45, 300), "Accepted"))
    bus.sent.clear()  # lost
    assert set(timers.calls) == {known["record_id"]}
    await presence_here(csms)
    assert set(timers.calls) == {live["record_id"]} and not timers.none_live_at(STATION)
    csms.clock.advance(300)
    await within(db_settled(csms.app))
    assert await reservation_state(other, 45) == "expired"
    assert timers.none_live_at(STATION)


@pytest_twisted.ensureDeferred
async def test_presence_elsewhere_or_on_one_node_reads_nothing(csms_factory, bus):
    csms = await reservation_csms(csms_factory, plugins=("core", "reservation", "smartcharging", "localauth"))
    await within(db_settled(csms.app))
    functions = csms.app.db.stats["functions"]
    await within(csms.app.fire("csms_on_presence_changed", station_id=STATION, node=csms.app.cluster.node,
                               previous_node=None))  # one node: nothing to re-read
    bus.join(csms.app.cluster, "node-a")
    await within(csms.app.fire("csms_on_presence_changed", station_id=STATION, node=OTHER, previous_node=None))
    assert csms.app.db.stats["functions"] == functions


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_each_reservation_expires_exactly_once_when_every_node_fires_its_timer(csms_factory, bus):
    clock = task.Clock()
    clock.advance(1_700_000_000)
    nodes = [await reservation_csms(csms_factory, clock), await reservation_csms(csms_factory, clock)]
    for csms, name in zip(nodes, ("node-a", "node-b")):
        bus.join(csms.app.cluster, name)
    expired, events = [], []
    for csms in nodes:
        store = plugin(csms, "reservation").store
        expire, add = store.expire, csms.app.outbox.add

        def spy_expire(record_id, expire=expire, name=csms.app.cluster.node):
            return expire(record_id).addCallback(lambda row: expired.append((name, row is not None)) or row)

        def spy_add(conn, event_type, data, add=add):
            if event_type == "reservation.changed" and data["state"] == "expired":
                events.append(data["reservation_id"])
            return add(conn, event_type, data)
        store.expire, csms.app.outbox.add = spy_expire, spy_add
    await booted(nodes[0], STATION)
    status, body, _ = await within(nodes[0].api("POST", f"/stations/{STATION}/reservations", json={
        "connector_id": 1, "id_tag": TAG, "expiry_date": station_time(clock_now(nodes[0]) + timedelta(seconds=60))}))
    assert status == 201 and body["state"] == "active"
    assert "reservation.live" in bus.flush()
    assert [list(plugin(csms, "reservation").timers.calls) for csms in nodes] == [[body["record_id"]]] * 2
    clock.advance(60)  # both nodes' timers fire in this tick, their UPDATEs race on two connections
    for csms in nodes:
        await within(db_settled(csms.app))
    assert sorted(won for _, won in expired) == [False, True]
    assert events == [body["reservation_id"]]
    assert await reservation_state(plugin(nodes[1], "reservation").store, body["reservation_id"]) == "expired"
    bus.flush()
    assert [plugin(csms, "reservation").timers.calls for csms in nodes] == [{}, {}]


# -- Smart Charging: which stations may have installed profiles ---------------------------------------------

TX_PROFILE = {"chargingProfileId": 7, "stackLevel": 0, "chargingProfilePurpose": "TxProfile",
              "chargingProfileKind": "Relative",
              "chargingSchedule": {"chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 16}]}}


async def smartcharging_csms(csms_factory, bus):
    csms = await csms_factory(plugins=["core", "smartcharging"])
    await within(db_settled(csms.app))  # the stations with profiles are read at start-up
    await within(core_store(csms).put_id_tag(TAG))
    bus.join(csms.app.cluster, "node-a")
    other = SmartChargingStore(csms.app.db, csms.clock, cluster=bus.join(StandIn(), OTHER))
    return csms, plugin(csms, "smartcharging").store, other


async def remote_start_profile_installed(csms, other):
    """Another node recorded the TxProfile of a RemoteStartTransaction the station accepted."""
    await within(other.record_sent(STATION, 1, TX_PROFILE, "RemoteStartTransaction", "Accepted", None,
                                   clock_now(csms)))


@pytest_twisted.ensureDeferred
async def test_profile_installed_on_another_node_is_bound_by_a_start_here(csms_factory, bus):
    csms, store, other = await smartcharging_csms(csms_factory, bus)
    station = await booted(csms, STATION)
    bus.flush()
    await remote_start_profile_installed(csms, other)
    assert not store.may_have_profiles(STATION)  # stale until the message arrives
    assert bus.flush() == ["smartcharging.installed"]
    assert store.may_have_profiles(STATION)
    started = await start_transaction(csms, station)
    _, rows = await within(other.list(STATION))
    assert [row["transaction_id"] for row in rows] == [started["transactionId"]]


@pytest_twisted.ensureDeferred
async def test_station_connecting_here_rereads_whether_it_has_profiles(csms_factory, bus):
    csms, store, other = await smartcharging_csms(csms_factory, bus)
    await remote_start_profile_installed(csms, other)
    bus.sent.clear()  # lost
    assert not store.may_have_profiles(STATION)
    await presence_here(csms)
    assert store.may_have_profiles(STATION)
    await within(other.clear(STATION, {}, clock_now(csms)))  # nothing installed any more: nothing told
    assert bus.flush() == []
    await presence_here(csms)
    assert not store.may_have_profiles(STATION)


@pytest_twisted.ensureDeferred
async def test_profile_recorded_during_a_reread_is_kept(csms_factory, bus):
    csms, store, _ = await smartcharging_csms(csms_factory, bus)
    reread = presence_here(csms)
    assert store.may_have_profiles(STATION)  # while it reads: not certain
    store.installed_elsewhere({"station_id": STATION}, OTHER)  # arrives before the read answers "none"
    await reread
    assert store.may_have_profiles(STATION)


# -- Local Authorization List ----------------------------------------------------------------------------

AUTO_SYNC = "[plugin:localauth]\nauto_sync_on_change = true\n"


def calls(station, action: str) -> list:
    return [frame[3] for frame in station.received_calls if frame[2] == action]


@pytest_twisted.ensureDeferred
async def test_id_tag_changed_on_another_node_syncs_the_stations_here(csms_factory, bus):
    csms = await csms_factory(config_text=AUTO_SYNC, plugins=["core", "localauth"])
    bus.join(csms.app.cluster, "node-a")
    other_node = bus.join(StandIn(), OTHER)
    station = await csms.connect_booted(STATION)
    await within(CoreStore(csms.app.db, csms.clock, cluster=other_node).put_id_tag(TAG))
    other_node.publish(None, "localauth.id_tag", {"id_tag": TAG})  # what the other node's plugin tells
    assert calls(station, "SendLocalList") == []
    bus.flush()
    sent = await within(station.wait_for_call("SendLocalList"))
    assert sent["localAuthorizationList"] == [{"idTag": TAG, "idTagInfo": {"status": "Accepted"}}]
    await within(plugin(csms, "localauth").idle())


@pytest_twisted.ensureDeferred
async def test_id_tag_changed_here_is_told_to_the_other_nodes_only_in_a_cluster(csms_factory, bus):
    csms = await csms_factory(config_text=AUTO_SYNC, plugins=["core", "localauth"])
    broadcast = []
    csms.app.cluster.broadcast = lambda topic, data: broadcast.append(topic)  # on one node: never asked
    await within(plugin(csms, "core").put_id_tag(TAG))
    assert broadcast == []
    bus.join(csms.app.cluster, "node-a")
    await within(plugin(csms, "core").put_id_tag(TAG, status="Blocked"))
    assert "localauth.id_tag" in bus.flush()


@pytest_twisted.ensureDeferred
async def test_boot_sync_waiting_here_is_dropped_when_the_station_moves(csms_factory, bus):
    csms = await csms_factory(config_text="[plugin:localauth]\nauto_sync_on_boot = true\nboot_sync_delay = 5\n",
                              plugins=["core", "localauth"])
    bus.join(csms.app.cluster, "node-a")
    station = await csms.connect_booted(STATION)
    await within(csms.app.fire("csms_on_presence_changed", station_id=STATION, node=OTHER,
                               previous_node=csms.app.cluster.node))
    csms.clock.advance(5)
    await within(plugin(csms, "localauth").idle())
    assert calls(station, "GetLocalListVersion") == []


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_local_list_versions_are_read_from_the_database_on_every_node(csms_factory, bus):
    """Nothing of a station's list is held in memory: a node sees the versions another node recorded,
    and an automatic sync started by a change on one node reaches the station on the other."""
    node_a = await csms_factory(config_text=AUTO_SYNC, plugins=["core", "localauth"])
    node_b = await csms_factory(config_text=AUTO_SYNC, plugins=["core", "localauth"])
    bus.join(node_a.app.cluster, "node-a")
    bus.join(node_b.app.cluster, "node-b")
    station = await node_b.connect_booted(STATION)
    status, _, _ = await within(node_a.api("POST", "/id-tags", json={"id_tag": TAG}))
    assert status == 201
    await within(plugin(node_a, "localauth").idle())
    assert calls(station, "SendLocalList") == []  # node A holds no station
    assert "localauth.id_tag" in bus.flush()
    assert (await within(station.wait_for_call("SendLocalList")))["listVersion"] == 1
    await within(plugin(node_b, "localauth").idle())
    status, state, _ = await within(node_a.api("GET", f"/stations/{STATION}/local-list"))
    assert (status, state["acknowledged_version"], state["sent_version"]) == (200, 1, 1)
    status, _, _ = await within(node_a.api("PATCH", f"/id-tags/{TAG}", json={"status": "Blocked"}))
    pending = await within(plugin(node_b, "localauth").pending_changes(STATION))
    assert any(TAG in tags for tags in pending.values())
    assert await within(plugin(node_a, "localauth").pending_changes(STATION)) == pending
    bus.flush()
    sent = await within(station.wait_for_call("SendLocalList"))
    assert (sent["listVersion"], sent["updateType"]) == (2, "Differential")


@pytest_twisted.ensureDeferred
async def test_a_node_starting_fails_only_reserve_requests_too_old_to_be_in_flight(csms_factory, bus):
    """At start-up a ``requested`` reservation is an orphan on one node; in a cluster a young one may be
    another node's ReserveNow still waiting for its answer."""
    csms = await reservation_csms(csms_factory)
    timeout = csms.app.config.ocpp.response_timeout
    other_clock = task.Clock()
    other_clock.advance(csms.clock.seconds() - 2 * timeout - 1)
    other = ReservationStore(csms.app.db, other_clock)
    expiry = clock_now(csms) + timedelta(hours=1)
    orphan = await within(other.create(STATION, 1, TAG, None, expiry))
    other_clock.advance(2 * timeout)
    waiting = await within(other.create(STATION, 1, TAG, None, expiry))
    timers = plugin(csms, "reservation").timers
    bus.join(csms.app.cluster, "node-a")
    await within(timers._rearm())  # what a node starting in the cluster does
    assert [await reservation_state(other, row["reservation_id"]) for row in (orphan, waiting)] == \
        ["failed", "requested"]
    csms.app.cluster.enabled = False
    await within(timers._rearm())  # one node: nobody else can be waiting
    assert await reservation_state(other, waiting["reservation_id"]) == "failed"
