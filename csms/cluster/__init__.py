"""Several ``twistd csms`` nodes as one Central System (docs/cluster.md).

``app.cluster`` is always there. On one node (the default, and the only mode on SQLite) it is a
:class:`SingleNode`: every station is local, nothing is published. With ``[cluster] enabled`` it is
the PostgreSQL implementation (:mod:`csms.cluster.postgres`): node leases, station presence, calls
forwarded to the node holding the station, and messages between nodes over LISTEN/NOTIFY.

What plugins use (the same on one node and on many):

* ``app.call(station_id, action, payload)`` sends to a station wherever it is connected;
  ``app.is_connected(station_id)`` answers for the whole cluster.
* ``app.cluster.publish(conn, topic, data)`` inside a database function: every *other* node's
  subscribers of ``topic`` get ``data`` once the transaction commits, and never if it rolls back (a
  cache invalidation sent with the change that makes it). ``app.cluster.broadcast(topic, data)`` does
  the same outside a transaction.
* ``app.cluster.subscribe(topic, callback)``: ``callback(data, origin)`` runs on the reactor thread for
  each message another node published (``origin`` is its name). A node never hears its own messages:
  it made the change and updated its own memory already.
* The ``csms_on_presence_changed`` event: which node holds a station changed.
* ``app.cluster.leads()``: whether this node does the work only one node may do at a time (webhook
  delivery); ``app.cluster.watch_leadership(callback)`` tells when that changes.

Messages are JSON; one over 7000 bytes travels through the ``csms_cluster_messages`` table (any size
works, small ones cost less). Messages from one node arrive in the order it committed them.

Topics are the plugin's name, a dot, and a word: ``core.id_tag``, ``reservation.changed``.
"""
from __future__ import annotations

import socket

from itertools import count

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

log = Logger(namespace="csms.cluster")


class ICluster(Interface):
    """How this node sees the others (see the module docstring)."""

    enabled = Attribute("True when several nodes share the database ([cluster] enabled)")
    node = Attribute("This node's name ([cluster] node_name, by default host name:OCPP port)")

    def publish(conn, topic, data):
        """Inside a database function: send ``data`` (a JSON-able dict) to the other nodes' subscribers
        of ``topic`` when the transaction commits."""

    def broadcast(topic, data):
        """Outside a transaction: publish in a transaction of its own; a Deferred firing once sent."""

    def subscribe(topic, callback):
        """Call ``callback(data, origin)`` on the reactor thread for each message of ``topic`` another
        node sends."""

    def holder(station_id):
        """The name of the node the station is connected to, or None when it is connected nowhere."""

    def leads():
        """Whether this node does the cluster's one-at-a-time work (webhook delivery): the alive node with
        the smallest name, as its last heartbeat saw; always True on a single node."""

    def watch_leadership(callback):
        """Call ``callback(leading)`` on the reactor thread when :meth:`leads` changes."""

    def online_ids():
        """The ids of every station connected to any node (a set)."""

    # What the framework itself uses (csms.app, csms.protocol, csms.service, csms.api.nodes):

    def start():
        """Register this node (after the schema is ready); a Deferred."""

    def start_blocking():
        """:meth:`start` on the calling thread, before the reactor runs (``twistd csms``)."""

    def stop():
        """Leave the cluster cleanly (this node's presence and registration removed); a Deferred."""

    def stop_listening():
        """Stop timers and listening without touching the database (a failed start); a Deferred."""

    def new_connection_id():
        """An id for a new station connection on this node (presence rows name it)."""

    def presence_claim(station_id, connection):
        """None, or a database function recording the connection here (run with the connected event),
        returning the node that held the station before."""

    def presence_release(station_id, connection):
        """None, or a database function recording the disconnection, returning True when this
        connection still held the station."""

    def station_arrived(station_id, previous_node):
        """After a connection was recorded: fire ``csms_on_presence_changed``; a Deferred."""

    def station_left(station_id, released):
        """After a disconnection was recorded: fire ``csms_on_presence_changed`` if it was released."""

    def forward(holder, station_id, action, payload):
        """Send a call through node ``holder``; fails as ``app.call`` does."""

    def disconnect_remote(holder, station_id, reason):
        """Ask node ``holder`` to close the station's connection; a Deferred."""

    def nodes():
        """A Deferred firing with the nodes as ``GET /api/v1/nodes`` lists them."""


def default_node_name(ocpp_endpoint: str) -> str:
    """Host name and the OCPP listener's port: unique per process on a machine, readable in the API."""
    port = ""
    for part in ocpp_endpoint.split(":")[1:]:
        if part.isdigit():
            port = part
            break
    host = socket.gethostname() or "localhost"
    return f"{host}:{port}" if port else host


class Subscribers:
    """topic -> callbacks, called for messages of other nodes; a failing callback is logged, not raised."""

    def __init__(self):
        self._callbacks: dict[str, list] = {}

    def subscribe(self, topic: str, callback) -> None:
        self._callbacks.setdefault(topic, []).append(callback)

    def deliver(self, topic: str, data: dict, origin: str) -> None:
        for callback in self._callbacks.get(topic, ()):
            try:
                callback(data, origin)
            except Exception:
                log.failure("Cluster message {topic} from {origin}: a subscriber failed", topic=topic,
                            origin=origin)


class LocalPresenceEvents:
    """``csms_on_presence_changed`` for this node's own connections (the others' come as messages)."""

    def station_arrived(self, station_id: str, previous_node: str | None) -> defer.Deferred:
        return self.app.fire("csms_on_presence_changed", station_id=station_id, node=self.node,
                             previous_node=previous_node)

    def station_left(self, station_id: str, released: bool) -> defer.Deferred:
        if not released:
            return defer.succeed(None)
        return self.app.fire("csms_on_presence_changed", station_id=station_id, node=None, previous_node=self.node)


@implementer(ICluster)
class SingleNode(LocalPresenceEvents):
    """One node: every station is local, there is nobody to tell."""

    enabled = False

    def __init__(self, app, node: str):
        self.app = app
        self.node = node
        self.subscribers = Subscribers()
        self.started_at = None
        self._connections = count(1)

    def publish(self, conn, topic: str, data: dict) -> None:
        pass

    def broadcast(self, topic: str, data: dict) -> defer.Deferred:
        return defer.succeed(None)

    def subscribe(self, topic: str, callback) -> None:
        self.subscribers.subscribe(topic, callback)

    def deliver(self, topic: str, data: dict, origin: str) -> None:
        """Hand a message from ``origin`` to this node's subscribers (a channel calls this; so can a test)."""
        self.subscribers.deliver(topic, data, origin)

    def holder(self, station_id: str) -> str | None:
        return self.node if station_id in self.app.sessions else None

    def leads(self) -> bool:
        return True

    def watch_leadership(self, callback) -> None:
        pass  # one node leads for ever

    def online_ids(self) -> set:
        return set(self.app.sessions)

    def start(self) -> defer.Deferred:
        self.started_at = self.app.now()
        return defer.succeed(None)

    def start_blocking(self) -> None:
        self.started_at = self.app.now()

    def stop(self) -> defer.Deferred:
        return defer.succeed(None)

    def stop_listening(self) -> defer.Deferred:
        return defer.succeed(None)

    def new_connection_id(self) -> str:
        return str(next(self._connections))

    def presence_claim(self, station_id: str, connection: str):
        return None

    def presence_release(self, station_id: str, connection: str):
        return None

    def forward(self, holder: str, station_id: str, action: str, payload: dict) -> defer.Deferred:
        from csms.rpc import StationOffline

        return defer.fail(StationOffline(f"{station_id} is not connected"))

    def disconnect_remote(self, holder: str, station_id: str, reason: str) -> defer.Deferred:
        return defer.succeed(None)

    def nodes(self) -> defer.Deferred:
        now = self.app.now()
        config = self.app.config
        return defer.succeed([{"name": self.node, "alive": True, "started_at": self.started_at or now,
                               "heartbeat_at": now, "lease_expires_at": None, "stations": len(self.app.sessions),
                               "ocpp_endpoint": config.ocpp.endpoint, "api_endpoint": config.api.endpoint}])


def make_cluster(app):
    """``app.cluster``: PostgreSQL-backed with ``[cluster] enabled``, else :class:`SingleNode`."""
    from csms.config import check_cluster_database

    check_cluster_database(app.config)
    settings = app.config.cluster
    node = settings.node_name or default_node_name(app.config.ocpp.endpoint)
    if not settings.enabled:
        return SingleNode(app, node)
    from csms.cluster.postgres import PostgresCluster

    return PostgresCluster(app, node)
