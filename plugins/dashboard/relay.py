"""Live updates for the whole cluster: what happens on one node reaches the pages open on every node.

A station is connected to one node, and its events (the framework's hooks) fire there; a browser's event
stream is held by whichever node the load balancer sent it to. The relay joins the two over the cluster's
messages (``app.cluster``, LISTEN/NOTIFY on PostgreSQL), and costs nothing where nobody watches:

* A node with event streams open says so (``dashboard.listening``: how many, and the transactions whose
  meter values a page of it draws) when that changes, and again at every keepalive while any is open. A
  node that starts asks (``dashboard.hello``), and those with streams answer at once.
* A node forwards its events only while another node has said it listens (and not longer than three
  keepalives after the last time it said so: a node that died keeps nobody forwarding), and a meter
  values event only while another node has a page of its transaction open. It gathers them
  for ``RELAY_INTERVAL`` seconds into one message (``dashboard.events``), one message in flight at a
  time, so that they arrive in the order they happened, at most ``RELAY_MAX_EVENTS`` in a message.
* Beyond that, events are dropped and counted, never queued without bound; the pages on the other nodes
  are told (a ``missed`` event: the page says it should be reloaded), as they are when their own stream
  was dropped for reading too slowly.

On a single node (``app.cluster.enabled`` false) the relay only hands events to this node's streams.
"""
from __future__ import annotations

from twisted.logger import Logger

log = Logger(namespace="csms.dashboard")

EVENTS, LISTENING, HELLO = "dashboard.events", "dashboard.listening", "dashboard.hello"
#: Seconds events are gathered before they go to the other nodes as one message.
RELAY_INTERVAL = 0.25
#: Events one message carries at most; more in one interval are dropped (and the pages told).
RELAY_MAX_EVENTS = 1000
#: The events a page understands (dashboard.js); a message naming another is ignored.
KNOWN = frozenset({"station", "boot", "status", "transaction", "meter"})


class Relay:
    def __init__(self, cluster, clock, broker, keepalive: float, count_dropped=lambda n: None):
        self.cluster = cluster
        #: ``count_dropped(n)``: n events this node could not relay (the plugin's metric).
        self.count_dropped = count_dropped
        self.clock = clock
        self.broker = broker
        self.keepalive = keepalive
        #: node -> (when, in clock seconds, its last word that it listens stops counting, the transactions
        #: whose meter values it wants).
        self.listeners: dict[str, tuple[float, frozenset]] = {}
        self.pending: list = []
        self.dropped = 0
        self._flush_call = None
        self._sending = None
        self._failing = False
        #: What this node last said: (streams open or not, the transactions watched here).
        self._said = (False, frozenset())
        self._stopped = False
        if cluster.enabled:
            cluster.subscribe(EVENTS, self._heard_events)
            cluster.subscribe(LISTENING, self._heard_listening)
            cluster.subscribe(HELLO, self._heard_hello)
            broker.watch(self._streams_changed)

    # -- this node's events ----------------------------------------------------------------------

    def wants_meter(self, transaction_id: int) -> bool:
        """Whether a page, here or on another node, draws this transaction's meter values now."""
        return transaction_id in self.broker.watched() or transaction_id in self._watched_elsewhere()

    def publish(self, event: str, data: dict) -> None:
        self.broker.publish(event, data)
        if not self.cluster.enabled:
            return
        if event == "meter":
            if data.get("transaction_id") not in self._watched_elsewhere():
                return
        elif not self._others_listen():
            return
        if len(self.pending) >= RELAY_MAX_EVENTS:
            self.dropped += 1
            self.count_dropped(1)
        else:
            self.pending.append([event, data])
        self._schedule()

    def _others_listen(self) -> bool:
        if not self.listeners:
            return False
        now = self.clock.seconds()
        for node, (until, _) in list(self.listeners.items()):
            if until < now:
                del self.listeners[node]
        return bool(self.listeners)

    def _watched_elsewhere(self) -> frozenset:
        if not self._others_listen():
            return frozenset()
        return frozenset().union(*(watched for _, watched in self.listeners.values()))

    def _schedule(self) -> None:
        if self._flush_call is None and self._sending is None and not self._stopped:
            self._flush_call = self.clock.callLater(RELAY_INTERVAL, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        if not self.pending and not self.dropped:
            return
        message = {"events": self.pending, "dropped": self.dropped}
        self.pending, self.dropped = [], 0
        self._sending = self.cluster.broadcast(EVENTS, message)
        self._sending.addCallbacks(self._sent, self._not_sent, errbackArgs=(message,))

    def _sent(self, _) -> None:
        self._sending = None
        if self._failing:
            self._failing = False
            log.info("Dashboard events reach the other nodes again")
        if self.pending or self.dropped:
            self._schedule()

    def _not_sent(self, failure, message) -> None:
        self._sending = None
        # Lost, as they would be past RELAY_MAX_EVENTS: the next message tells the other nodes' pages.
        self.dropped += len(message["events"]) + message["dropped"]
        self.count_dropped(len(message["events"]))
        if not self._failing:
            self._failing = True
            log.warn("Dashboard events could not be sent to the other nodes: {error}",
                     error=failure.getErrorMessage())
        self._schedule()

    # -- saying whether this node listens ---------------------------------------------------------

    def _streams_changed(self, tick: bool) -> None:
        """The broker opened or closed a stream, or ticked (``tick``: every keepalive, while any is open):
        this node says so at every tick, and when whether it listens, or which transactions, changed."""
        now = (bool(self.broker.streams), self.broker.watched())
        if self._stopped or not (tick or now != self._said):
            return
        self._said = now
        self._say_listening()

    def _say_listening(self) -> None:
        self._say(LISTENING, {"streams": len(self.broker.streams), "transactions": sorted(self.broker.watched())})

    def _say(self, topic: str, data: dict) -> None:
        def failed(failure):
            log.warn("Dashboard: {topic} could not be sent to the other nodes: {error}", topic=topic,
                     error=failure.getErrorMessage())
        self.cluster.broadcast(topic, data).addErrback(failed)

    def hello(self) -> None:
        """On this node's start: ask the nodes with pages open to say so now."""
        if self.cluster.enabled and not self._stopped:
            self._say(HELLO, {})

    # -- the other nodes' messages ----------------------------------------------------------------

    def _heard_listening(self, data: dict, origin: str) -> None:
        streams, transactions = data.get("streams"), data.get("transactions")
        if isinstance(streams, int) and streams > 0:
            watched = frozenset(t for t in transactions if isinstance(t, int)) \
                if isinstance(transactions, list) else frozenset()
            self.listeners[origin] = (self.clock.seconds() + 3 * self.keepalive, watched)
        else:
            self.listeners.pop(origin, None)

    def _heard_hello(self, data: dict, origin: str) -> None:
        if self.broker.streams and not self._stopped:
            self._say_listening()

    def _heard_events(self, data: dict, origin: str) -> None:
        events = data.get("events")
        for item in events if isinstance(events, list) else ():
            if (isinstance(item, list) and len(item) == 2 and item[0] in KNOWN
                    and isinstance(item[1], dict)):
                self.broker.publish(item[0], item[1])
        dropped = data.get("dropped")
        if isinstance(dropped, int) and dropped > 0:
            self.broker.publish("missed", {"node": origin, "events": dropped})

    def stop(self) -> None:
        """Before the broker closes this node's streams: nothing more is said or sent. (The other nodes stop
        forwarding here three keepalives after this node last said it listens.)"""
        self._stopped = True
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
