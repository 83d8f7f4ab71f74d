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
from twisted.internet import task

from csms.cluster import Subscribers
from csms_plugins.core.store import CoreStore
from csms_plugins.reservation.store import ReservationStore
from csms_plugins.smartcharging.store import SmartChargingStore

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
        cluster.broadcast = lambda topic, data: pytest_twisted.blockon(self._sent_now(cluster, topic, data))
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
