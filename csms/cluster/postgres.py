"""The cluster on PostgreSQL: node leases, station presence and messages over LISTEN/NOTIFY.

* **Nodes** register in ``csms_nodes`` at start (taking over their name from a dead or duplicate
  previous instance), renew their lease every ``heartbeat_seconds`` and, in the same transaction,
  clear the presence of any node whose lease has expired. Lease times come from ``app.clock``: the
  nodes' clocks must be synchronised.
* **Presence** (``csms_presence``): one row per connected station, naming its node and connection,
  written in the transaction of the connection event. Every node keeps the map station -> node in
  memory, loaded at start and kept current by the presence messages, which PostgreSQL delivers in
  commit order; ``holder`` and ``online_ids`` read it.
* **Messages**: ``NOTIFY`` on one channel per node (forwarded calls, replies, evictions) and one shared
  channel (presence, plugins' topics). A body too large for NOTIFY is a row of
  ``csms_cluster_messages``, written in the same transaction; the notification carries its id. A
  dedicated thread holds the LISTEN connection (psycopg 3, autocommit), opened before the node
  registers, waits for notifications with a short timeout so that it can stop, hands each to the
  reactor thread, and reconnects after the connection drops; the presence map is reloaded then, as
  notifications sent meanwhile are lost, and the moves missed are told as they would have been.
"""
from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections import deque
from datetime import datetime, timedelta, timezone
from itertools import count

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from csms.cluster import ICluster, LocalPresenceEvents, Subscribers
from csms.cluster.routing import DISCONNECT, EVICT, REPLY, TOPICS, Router
from csms.cluster.tables import messages, nodes, presence
from csms.stations import as_utc

log = Logger(namespace="csms.cluster")

#: NOTIFY takes at most 8000 bytes; a message larger than this goes through csms_cluster_messages.
MAX_NOTIFY_BYTES = 7000
PRESENCE, NODE_GONE = "cluster.presence", "cluster.node_gone"
#: Seconds the listening thread waits for a notification before it looks whether it is to stop.
LISTEN_POLL = 0.25
#: Seconds between attempts to reconnect the LISTEN connection.
RECONNECT_DELAY = 1.0
_NOTIFY = text("SELECT pg_notify(:channel, :payload)")


def channel_name(schema: str, node: str | None) -> str:
    """A channel name (an identifier, at most 63 bytes) for ``node`` (None: every node) of the cluster
    whose tables are in ``schema``: clusters sharing a database in different schemas do not hear each other."""
    key = schema if node is None else f"{schema}\0{node}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return f"csms_all_{digest}" if node is None else f"csms_node_{digest}"


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


class PostgresChannel:
    """NOTIFY out, LISTEN in. ``deliver(topic, data, origin, own)`` is called on the reactor thread for
    each message, in the order PostgreSQL delivered them (commit order)."""

    def __init__(self, app, node: str, instance: str, deliver):
        self.app = app
        self.node = node
        self.instance = instance
        self.deliver = deliver
        self.schema = "public"
        #: target -> messages waiting for the transaction sending to it to commit; targets being sent to.
        self._outbox: dict[str, list] = {}
        self._sending: set = set()
        #: The LISTEN connection's server process (for the reconnection test).
        self.backend_pid: int | None = None
        #: Whether the LISTEN connection is up (readiness).
        self.listening = False
        self._inbox: deque = deque()
        self._reading = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped: defer.Deferred | None = None
        #: Called on the reactor thread each time LISTEN is (re)established.
        self.on_listening = None

    # -- sending -----------------------------------------------------------------------------------

    def notify(self, conn, target: str | None, topic: str, data: dict) -> None:
        """Inside a database function: send when its transaction commits (never if it rolls back)."""
        self._notify(conn, target, topic, self._envelope(topic, data))

    def _envelope(self, topic: str, data: dict) -> str:
        return json.dumps({"o": self.node, "i": self.instance, "t": topic, "d": data}, separators=(",", ":"))

    def _notify(self, conn, target: str | None, topic: str, envelope: str) -> None:
        if len(envelope.encode()) > MAX_NOTIFY_BYTES:
            row_id = conn.execute(insert(messages).values(
                target=target or "*", body=envelope, created_at=_utc(self.app.clock.seconds()))
                .returning(messages.c.id)).scalar_one()
            envelope = json.dumps({"o": self.node, "i": self.instance, "t": topic, "ref": row_id})
        conn.execute(_NOTIFY, {"channel": channel_name(self.schema, target), "payload": envelope})

    def send(self, target: str | None, topic: str, data: dict) -> defer.Deferred:
        """Outside a transaction: fires once sent. Messages to one target arrive in the order they were
        sent (the pool's threads may commit in any order): while one transaction sends, the messages
        that come meanwhile wait, and go together in the next. Replies need no order."""
        try:
            envelope = self._envelope(topic, data)
        except (TypeError, ValueError) as exc:  # not JSON: this caller's mistake alone
            return defer.fail(exc)
        if topic == REPLY:
            return self.app.db.run(self._notify, target, topic, envelope, desc="cluster_send")
        key = target or "*"
        d = defer.Deferred()
        self._outbox.setdefault(key, []).append((topic, envelope, d))
        if key not in self._sending:
            self._send_batch(key, target)
        return d

    def _send_batch(self, key: str, target: str | None) -> None:
        batch = self._outbox.pop(key, None)
        if not batch:
            self._sending.discard(key)
            return
        self._sending.add(key)

        def thd(conn):
            for topic, envelope, _ in batch:
                self._notify(conn, target, topic, envelope)

        def sent(result):
            for *_, d in batch:
                d.errback(result) if isinstance(result, Failure) else d.callback(None)
            self._send_batch(key, target)
        self.app.db.run(thd, desc="cluster_send").addBoth(sent)

    # -- receiving ---------------------------------------------------------------------------------

    def start(self, conn) -> None:
        """Read notifications from ``conn`` (made by :meth:`connect`, already listening) on a thread of
        their own. Those that arrived since it began to listen come first."""
        self._stopping.clear()
        self._stopped = defer.Deferred()
        self.listening = True
        self._thread = threading.Thread(target=self._listen_loop, args=(conn,),
                                        name=f"csms-cluster-listen-{self.node}", daemon=True)
        self._thread.start()

    def stop(self) -> defer.Deferred:
        """Fires once the listening thread has ended (within LISTEN_POLL seconds)."""
        if self._thread is None:
            return defer.succeed(None)
        self._thread = None
        self._stopping.set()
        return self._stopped

    def connect(self):
        """A new connection listening on this node's channels (blocking: not on the reactor thread)."""
        import psycopg

        engine = self.app.db.engine
        args, kwargs = engine.dialect.create_connect_args(engine.url)
        conn = psycopg.connect(*args, **kwargs, autocommit=True)
        try:
            self.schema = conn.execute("SELECT current_schema()").fetchone()[0]
            for channel in (channel_name(self.schema, None), channel_name(self.schema, self.node)):
                conn.execute(f'LISTEN "{channel}"')
        except BaseException:
            conn.close()
            raise
        self.backend_pid = conn.info.backend_pid
        return conn

    def _listen_loop(self, conn) -> None:
        """On its own thread: hand notifications to the reactor until told to stop; after the connection
        drops, connect and LISTEN again (the reactor thread is told: notifications were missed)."""
        reactor = self.app.reactor
        failures = 0
        while not self._stopping.is_set():
            try:
                if conn is None:
                    conn = self.connect()
                    if failures:
                        log.info("Cluster: listening again after the connection to PostgreSQL was lost")
                    failures = 0
                    reactor.callFromThread(self._listening)
                while not self._stopping.is_set():
                    for notification in conn.notifies(timeout=LISTEN_POLL):
                        reactor.callFromThread(self._received, notification.payload)
            except Exception as exc:  # noqa: BLE001 - the connection dropped: say so, wait, reconnect
                reactor.callFromThread(setattr, self, "listening", False)
                if not self._stopping.is_set():
                    failures += 1
                    if failures == 1:
                        log.warn("Cluster: the LISTEN connection to PostgreSQL failed ({error}); reconnecting",
                                 error=str(exc).strip() or type(exc).__name__)
                    else:  # the first retry at once: a dropped connection usually comes back straight away
                        self._stopping.wait(RECONNECT_DELAY)
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001 - closing a broken connection
                        pass
                conn = None
        reactor.callFromThread(setattr, self, "listening", False)
        reactor.callFromThread(self._stopped.callback, None)

    def _listening(self) -> None:
        if self._thread is None:
            return  # stopped meanwhile
        self.listening = True
        if self.on_listening is not None:
            self.on_listening()

    def _received(self, payload: str) -> None:
        if self._thread is None:
            return  # stopped: what the thread read last is for nobody (the node left, or never finished starting)
        try:
            envelope = json.loads(payload)
            envelope["o"], envelope["i"], envelope["t"]
        except (ValueError, KeyError, TypeError):
            log.warn("Cluster: ignored a notification that is not a cluster message: {payload!r}",
                     payload=payload[:200])
            return
        self._inbox.append(envelope)
        self._read_inbox()

    def _read_inbox(self) -> None:
        """Deliver in arrival order; a message whose body is in the table holds back the ones after it."""
        if self._reading:
            return
        while self._inbox:
            envelope = self._inbox[0]
            if "ref" in envelope:
                self._reading = True
                self._fetch(envelope).addBoth(self._fetched)
                return
            self._inbox.popleft()
            self._deliver(envelope)

    def _fetched(self, _):
        self._reading = False
        self._inbox.popleft()
        if self._thread is None:
            self._inbox.clear()
            return
        self._read_inbox()

    def _fetch(self, envelope: dict) -> defer.Deferred:
        row_id = envelope["ref"]

        def thd(conn):
            query = select(messages.c.target, messages.c.body).where(messages.c.id == row_id)
            row = conn.execute(query).first()
            if row is not None and row.target != "*":
                conn.execute(delete(messages).where(messages.c.id == row_id))  # read once, by its one reader
            return None if row is None else row.body

        def got(body):
            if self._thread is None:
                return  # stopped while it was read
            if body is None:
                log.warn("Cluster: the body of a {topic} message from {origin} is gone", topic=envelope["t"],
                         origin=envelope["o"])
                return
            self._deliver(json.loads(body))
        d = self.app.db.run(thd, desc="cluster_message_body").addCallback(got)
        return d.addErrback(lambda failure: log.failure("Cluster: reading a large message failed", failure))

    def _deliver(self, envelope: dict) -> None:
        try:
            self.deliver(envelope["t"], envelope.get("d") or {}, envelope["o"], envelope["i"] == self.instance)
        except Exception:  # noqa: BLE001 - one bad message must not stop the others
            log.failure("Cluster: handling a {topic} message from {origin} failed", topic=envelope.get("t"),
                        origin=envelope.get("o"))


@implementer(ICluster)
class PostgresCluster(LocalPresenceEvents):
    """``app.cluster`` with ``[cluster] enabled`` (see the module docstring)."""

    enabled = True

    def __init__(self, app, node: str):
        self.app = app
        self.node = node
        self.instance = uuid.uuid4().hex
        settings = app.config.cluster
        self.lease_seconds = settings.lease_seconds
        self.heartbeat_seconds = settings.heartbeat_seconds
        self.subscribers = Subscribers()
        self.channel = PostgresChannel(app, node, self.instance, self._deliver)
        self.channel.on_listening = self._listening
        self.router = Router(app, node, self.channel, app.clock,
                             settings.forward_deadline(app.config.ocpp.response_timeout))
        #: station id -> the node holding it, as the presence messages said (this node's own: app.sessions).
        self._holders: dict[str, str] = {}
        self._connections = count(1)
        self._heartbeat: task.LoopingCall | None = None
        #: The heartbeat being written, if one is.
        self._beating: defer.Deferred | None = None
        self.started_at: datetime | None = None
        self._lease_expires = 0.0
        #: While the presence map reloads: the changes that arrived meanwhile, to apply again after it.
        self._arrived_while_loading: list | None = None
        self._listen_waiters: list = []
        #: The alive node with the smallest name, as this node's last heartbeat read it (see leads()).
        self._leader: str | None = None
        self._leadership_watchers: list = []

    # -- ICluster ----------------------------------------------------------------------------------

    def publish(self, conn, topic: str, data: dict) -> None:
        self.channel.notify(conn, None, topic, data)

    def broadcast(self, topic: str, data: dict) -> defer.Deferred:
        return self.channel.send(None, topic, data)

    def subscribe(self, topic: str, callback) -> None:
        self.subscribers.subscribe(topic, callback)

    def leads(self) -> bool:
        # A node whose own lease lapsed may already be taken for gone, and another node lead instead.
        return self._leader == self.node and self.app.clock.seconds() <= self._lease_expires

    def watch_leadership(self, callback) -> None:
        self._leadership_watchers.append(callback)

    def _set_leader(self, leader: str | None) -> None:
        leading_before = self._leader == self.node
        self._leader = leader
        if (leader == self.node) == leading_before:
            return
        log.info("Cluster: node {node} {now} the cluster's one-at-a-time work (webhook delivery)", node=self.node,
                 now="now does" if leader == self.node else "no longer does")
        for callback in self._leadership_watchers:
            try:
                callback(leader == self.node)
            except Exception:
                log.failure("Cluster: a leadership watcher failed")

    def holder(self, station_id: str) -> str | None:
        if station_id in self.app.sessions:
            return self.node
        return self._holders.get(station_id)

    def online_ids(self) -> set:
        return set(self._holders) | set(self.app.sessions)

    # -- start and stop ----------------------------------------------------------------------------

    def new_connection_id(self) -> str:
        return f"{self.instance[:12]}-{next(self._connections)}"

    def _register(self, conn, now: datetime):
        """Take the node's row (a previous instance's presence cleared); the presence of live nodes."""
        self.channel.schema = conn.execute(text("SELECT current_schema()")).scalar_one()
        previous = conn.execute(select(nodes.c.instance).where(nodes.c.name == self.node)).first()
        if previous is not None:
            self._clear_node(conn, self.node)
        config = self.app.config
        conn.execute(pg_insert(nodes).values(
            name=self.node, instance=self.instance, started_at=now, heartbeat_at=now,
            lease_expires_at=now + timedelta(seconds=self.lease_seconds),
            ocpp_endpoint=config.ocpp.endpoint, api_endpoint=config.api.endpoint).on_conflict_do_update(
            index_elements=[nodes.c.name], set_={"instance": self.instance, "started_at": now, "heartbeat_at": now,
                                                 "lease_expires_at": now + timedelta(seconds=self.lease_seconds),
                                                 "ocpp_endpoint": config.ocpp.endpoint,
                                                 "api_endpoint": config.api.endpoint}))
        return previous is not None, self._live_presence(conn, now)

    def _start(self, conn, now: datetime):
        return self._register(conn, now), self._leader_at(conn, now)

    @staticmethod
    def _leader_at(conn, now: datetime) -> str | None:
        """The node doing the cluster's one-at-a-time work: the alive node with the smallest name."""
        return conn.execute(select(func.min(nodes.c.name)).where(nodes.c.lease_expires_at >= now)).scalar()

    @staticmethod
    def _live_presence(conn, now: datetime) -> dict:
        rows = conn.execute(select(presence.c.station_id, presence.c.node).join(
            nodes, nodes.c.name == presence.c.node).where(nodes.c.lease_expires_at >= now)).fetchall()
        return {row.station_id: row.node for row in rows}

    def _clear_node(self, conn, node: str) -> list:
        """Delete a gone node's presence and row, telling every node (this one too)."""
        # The node row first: its lock waits for a presence claim of that node to commit (see
        # _still_registered), so the claim's row is among those deleted next.
        conn.execute(delete(nodes).where(nodes.c.name == node))
        stations = [row[0] for row in conn.execute(
            delete(presence).where(presence.c.node == node).returning(presence.c.station_id))]
        self.channel.notify(conn, None, NODE_GONE, {"node": node, "stations": stations})
        return stations

    def _readiness_problem(self) -> str | None:
        """Readiness (/readyz): a node that hears no cluster messages, or whose lease lapsed, is not to get
        stations: the others would take its stations for gone, and it would miss forwarded calls."""
        if not self.channel.listening:
            return "not listening for cluster messages (PostgreSQL LISTEN connection down)"
        if self.app.clock.seconds() > self._lease_expires:
            return "this node's cluster lease has not been renewed in time"
        return None

    def _registered(self, outcome, listener) -> None:
        self._lease_expires = self.app.clock.seconds() + self.lease_seconds
        self.app.add_readiness_check("cluster", self._readiness_problem)
        (took_over, holders), leader = outcome
        if took_over:
            log.warn("Cluster: node {node} took over its name from a previous instance (that process is gone, "
                     "or another process runs under the same [cluster] node_name)", node=self.node)
        self._holders = {station: node for station, node in holders.items() if node != self.node}
        self.channel.start(listener)
        self._heartbeat = task.LoopingCall(self.heartbeat)
        self._heartbeat.clock = self.app.clock
        self._heartbeat.start(self.heartbeat_seconds, now=False)
        log.info("Cluster: node {node} registered ({count} station(s) on other nodes)", node=self.node,
                 count=len(self._holders))
        self._set_leader(leader)

    # The node listens before it registers and reads where the stations are: every change committed
    # after that read is heard, and once start() has fired, so is every message (a cache invalidation,
    # a presence change). The notifications that arrive meanwhile wait in the listening connection and
    # are applied after the read: in commit order, on top of it, the map ends as the database is.

    @defer.inlineCallbacks
    def start(self):
        self.started_at = self.app.now()
        reactor = self.app.reactor
        listener = yield threads.deferToThreadPool(reactor, reactor.getThreadPool(), self.channel.connect)
        try:
            outcome = yield self.app.db.run(self._start, self.started_at, desc="cluster_register")
        except BaseException:
            listener.close()
            raise
        self._registered(outcome, listener)

    def start_blocking(self) -> None:
        self.started_at = self.app.now()
        listener = self.channel.connect()
        try:
            outcome = self.app.db.run_sync(self._start, self.started_at)
        except BaseException:
            listener.close()
            raise
        self._registered(outcome, listener)

    def stop_listening(self) -> defer.Deferred:
        """Stop the heartbeat and the listening thread, leaving the database alone (a failed start)."""
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self.router.stop()
        return self.channel.stop()

    @defer.inlineCallbacks
    def stop(self):
        """A clean stop: this node's presence and row deleted, the other nodes told."""
        listening = self.stop_listening()
        if self._beating is not None:
            # A renewal committed after the leave would find the row gone and register the node again.
            yield self._beating
        try:
            yield self.app.db.run(self._leave, desc="cluster_leave")
        except Exception:  # noqa: BLE001 - the others will sweep us when the lease expires
            log.failure("Cluster: node {node} could not remove itself; the others will once its lease expires",
                        node=self.node)
        yield listening

    def _leave(self, conn):
        owned = conn.execute(delete(nodes).where(nodes.c.name == self.node, nodes.c.instance == self.instance))
        if owned.rowcount:  # else a newer instance took the name over: its stations are its own
            stations = [row[0] for row in conn.execute(
                delete(presence).where(presence.c.node == self.node).returning(presence.c.station_id))]
            self.channel.notify(conn, None, NODE_GONE, {"node": self.node, "stations": stations})

    # -- heartbeat and sweep -----------------------------------------------------------------------

    def heartbeat(self) -> defer.Deferred:
        now = self.app.now()
        local = {station_id: getattr(session.protocol, "connection_id", "")
                 for station_id, session in self.app.sessions.items()}
        d = self.app.db.run(self._beat, now, local, desc="cluster_heartbeat")
        d.addCallback(self._beaten)
        d.addErrback(lambda failure: log.failure("Cluster: heartbeat of node {node} failed", failure, node=self.node))
        self._beating = d

        def done(_):
            if self._beating is d:
                self._beating = None
        d.addCallback(done)
        return d

    def _beat(self, conn, now: datetime, local: dict):
        """Renew the lease (registering again if the others swept this node), clear expired nodes."""
        lease = now + timedelta(seconds=self.lease_seconds)
        renewed = conn.execute(update(nodes).where(nodes.c.name == self.node, nodes.c.instance == self.instance)
                               .values(heartbeat_at=now, lease_expires_at=lease)).rowcount
        rejoined = False
        if not renewed:
            holder = conn.execute(select(nodes.c.instance).where(nodes.c.name == self.node)).first()
            if holder is not None:
                return "duplicate", [], None, None
            self._register(conn, now)
            rejoined = True
            for station_id, connection in local.items():
                claimed = conn.execute(pg_insert(presence).values(
                    station_id=station_id, node=self.node, connected_at=now, connection=connection)
                    .on_conflict_do_nothing().returning(presence.c.station_id)).first()
                if claimed is not None:
                    self.channel.notify(conn, None, PRESENCE, {"station": station_id, "node": self.node,
                                                                "previous": None, "connection": connection})
        expired = [row[0] for row in conn.execute(select(nodes.c.name).where(
            nodes.c.lease_expires_at < now, nodes.c.name != self.node).with_for_update(skip_locked=True))]
        for node in expired:
            stations = self._clear_node(conn, node)
            log.warn("Cluster: node {node}'s lease expired; cleared its {count} station(s)", node=node,
                     count=len(stations))
        # Large-message bodies of broadcasts nobody deletes, and targeted ones for a node that died.
        conn.execute(delete(messages).where(messages.c.created_at < now - timedelta(seconds=4 * self.lease_seconds)))
        return ("rejoined" if rejoined else "renewed"), expired, lease.timestamp(), self._leader_at(conn, now)

    def _beaten(self, outcome) -> None:
        state, _, lease_expires, leader = outcome
        if state != "duplicate":
            self._lease_expires = lease_expires
        self._set_leader(leader)
        if state == "duplicate":
            log.error("Cluster: another process runs as node {node} ([cluster] node_name): give each node its "
                      "own name", node=self.node)
        elif state == "rejoined":
            log.warn("Cluster: node {node} had been taken for gone (its lease expired); registered again",
                     node=self.node)

    def _listening(self) -> None:
        """LISTEN is (re)established: notifications may have been missed; reload the presence map.

        The presence messages that arrive while it loads are applied again on top of what it read: they
        come in commit order, so the map ends as the database is whether the read saw them or not.
        """
        now = self.app.now()
        arrived = self._arrived_while_loading = []

        def thd(conn):
            return self._live_presence(conn, now)

        def loaded(holders):
            if self._arrived_while_loading is not arrived:
                return  # listening again meanwhile (another drop): the later reload is the one to apply
            heard = self._holders
            self._holders = {station: node for station, node in holders.items() if node != self.node}
            self._arrived_while_loading = None
            for apply, data in arrived:
                apply(data)
            self._tell_missed_moves(heard)
            waiting, self._listen_waiters = self._listen_waiters, []
            for d in waiting:
                d.callback(None)

        def failed(failure):
            if self._arrived_while_loading is arrived:
                self._arrived_while_loading = None
            log.failure("Cluster: reloading presence failed", failure)
        self.app.db.run(thd, desc="cluster_presence").addCallbacks(loaded, failed)

    def _tell_missed_moves(self, heard: dict) -> None:
        """After a reload: what the presence messages lost while not listening would have told (plugins'
        event, and an end to calls forwarded to a station's former node)."""
        for station_id in set(heard) | set(self._holders):
            before, now = heard.get(station_id), self._holders.get(station_id)
            if before == now or (now is None and station_id in self.app.sessions):
                continue  # the same; or held here now, which this node told itself
            self.router.station_moved(station_id, now)
            self.app.fire("csms_on_presence_changed", station_id=station_id, node=now, previous_node=before)

    def when_listening(self) -> defer.Deferred:
        """Fires the next time this node starts listening (again) and has reloaded the presence map."""
        d = defer.Deferred()
        self._listen_waiters.append(d)
        return d

    # -- presence ----------------------------------------------------------------------------------

    def presence_claim(self, station_id: str, connection: str):
        """The database function recording a new connection here; it returns the previous holder."""
        now = self.app.now()

        def claim(conn):
            if not self._still_registered(conn):
                # Taken for gone (its presence cleared, the others told): a row written now would name a
                # node nobody sweeps any more. The heartbeat that registers it again claims its stations.
                return None
            current = select(presence.c.node, presence.c.connection).where(
                presence.c.station_id == station_id).with_for_update()
            row = conn.execute(current).first()
            if row is None:
                inserted = conn.execute(pg_insert(presence).values(
                    station_id=station_id, node=self.node, connected_at=now, connection=connection)
                    .on_conflict_do_nothing().returning(presence.c.station_id)).first()
                if inserted is None:  # another node's insert won the race: replace it (newer wins)
                    row = conn.execute(current).first()
            if row is not None:
                conn.execute(update(presence).where(presence.c.station_id == station_id).values(
                    node=self.node, connected_at=now, connection=connection))
                if row.node != self.node:
                    self.channel.notify(conn, row.node, EVICT, {"station": station_id, "connection": row.connection})
            previous = None if row is None else row.node
            self.channel.notify(conn, None, PRESENCE, {"station": station_id, "node": self.node,
                                                        "previous": previous, "connection": connection})
            return previous
        return claim

    def _still_registered(self, conn) -> bool:
        """Whether this instance's node row is there, locked against a sweep until the transaction ends
        (KEY SHARE: the heartbeat's renewal goes on; a sweep that locked it first has committed)."""
        return conn.execute(select(nodes.c.name).where(nodes.c.name == self.node, nodes.c.instance == self.instance)
                            .with_for_update(key_share=True, read=True)).first() is not None

    def presence_release(self, station_id: str, connection: str):
        """The database function recording a disconnection here; True when this connection held the station."""
        def release(conn):
            gone = conn.execute(delete(presence).where(
                presence.c.station_id == station_id, presence.c.node == self.node,
                presence.c.connection == connection).returning(presence.c.station_id)).first()
            if gone is None:
                return False  # the station is on a newer connection (here or on another node)
            self.channel.notify(conn, None, PRESENCE, {"station": station_id, "node": None,
                                                        "previous": self.node, "connection": connection})
            return True
        return release

    # -- forwarding --------------------------------------------------------------------------------

    def forward(self, holder: str, station_id: str, action: str, payload: dict) -> defer.Deferred:
        return self.router.forward(holder, station_id, action, payload)

    def disconnect_remote(self, holder: str, station_id: str, reason: str) -> defer.Deferred:
        return self.channel.send(holder, DISCONNECT, {"station": station_id, "reason": reason})

    # -- messages ----------------------------------------------------------------------------------

    def _deliver(self, topic: str, data: dict, origin: str, own: bool) -> None:
        if topic == PRESENCE:
            self._presence_changed(data, own)
        elif topic == NODE_GONE:
            self._node_gone(data, own)
        elif topic in TOPICS:
            self.router.deliver(topic, data, origin)
        elif not own:
            self.subscribers.deliver(topic, data, origin)

    def _presence_changed(self, data: dict, own: bool) -> None:
        self._apply(self._set_holder, data)
        if not own:
            self.router.station_moved(data["station"], data["node"])
            self.app.fire("csms_on_presence_changed", station_id=data["station"], node=data["node"],
                          previous_node=data["previous"])

    def _node_gone(self, data: dict, own: bool) -> None:
        node = data["node"]
        if node == self.node:
            return  # this node's previous instance, or this one leaving
        self.router.node_gone(node)
        told = [station_id for station_id in data["stations"] if self._holders.get(station_id) == node]
        self._apply(self._clear_holder, node)
        for station_id in told:
            self.app.fire("csms_on_presence_changed", station_id=station_id, node=None, previous_node=node)

    def _apply(self, change, data) -> None:
        change(data)
        if self._arrived_while_loading is not None:
            self._arrived_while_loading.append((change, data))

    def _set_holder(self, data: dict) -> None:
        # In commit order: the map ends as the database does. This node's own stations are in app.sessions.
        station_id, node = data["station"], data["node"]
        if node is None or node == self.node:
            self._holders.pop(station_id, None)
        else:
            self._holders[station_id] = node

    def _clear_holder(self, node: str) -> None:
        for station_id in [s for s, holder in self._holders.items() if holder == node]:
            del self._holders[station_id]

    # -- the nodes, for the API --------------------------------------------------------------------

    def nodes(self) -> defer.Deferred:
        """Fires with every registered node: name, alive, started_at, heartbeat_at, lease_expires_at,
        stations (how many it holds), ocpp_endpoint, api_endpoint."""
        now = self.app.now()

        def thd(conn):
            counts = dict(conn.execute(select(presence.c.node, func.count()).group_by(presence.c.node)).fetchall())
            rows = conn.execute(select(nodes).order_by(nodes.c.name)).fetchall()
            out = []
            for row in rows:
                data = dict(row._mapping)
                data.pop("instance")
                for key in ("started_at", "heartbeat_at", "lease_expires_at"):
                    data[key] = as_utc(data[key])
                data["alive"] = data["lease_expires_at"] >= now
                data["stations"] = counts.get(row.name, 0)
                out.append(data)
            return out
        return self.app.db.run(thd, desc="cluster_nodes")
