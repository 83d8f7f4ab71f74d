"""EventProbe: a test plugin that turns connection events into Deferreds a test can wait on."""
from __future__ import annotations

from collections import defaultdict, deque

from zope.interface import implementer

from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin

DEFAULT_TIMEOUT = 5.0


@implementer(ICSMSPlugin)
class EventProbe:
    """A test plugin (``extra_plugins=[EventProbe()]``) turning connection events into Deferreds to wait on.

    An event that happens before a test asks for it is kept, so the order of "act" and "wait" does not
    matter: ``await probe.next("connected", "CP-1")``.
    """

    name = "probe"
    profile = None
    inbound_actions = ()
    outbound_actions = ()
    settings = ()

    def __init__(self):
        self._seen = defaultdict(deque)
        self._waiters = defaultdict(deque)

    def _record(self, key, value):
        if self._waiters[key]:
            self._waiters[key].popleft().callback(value)
        else:
            self._seen[key].append(value)

    def next(self, event: str, station_id: str, timeout: float = DEFAULT_TIMEOUT):
        """Fires with the next ``event`` of a station: 'connected' (the session), 'disconnected' (the
        reason), 'presence' ((node, previous_node) from ``csms_on_presence_changed``)."""
        from twisted.internet import defer, reactor

        key = (event, station_id)
        if self._seen[key]:
            return defer.succeed(self._seen[key].popleft())
        d = defer.Deferred()
        self._waiters[key].append(d)
        return d.addTimeout(timeout, reactor)

    def unclaimed(self, event: str, station_id: str) -> int:
        """How many ``event``s of ``station_id`` happened that no :meth:`next` has taken yet."""
        return len(self._seen[(event, station_id)])

    @hookimpl
    def csms_on_station_connected(self, station):
        self._record(("connected", station.station_id), station)

    @hookimpl
    def csms_on_station_disconnected(self, station_id, reason):
        self._record(("disconnected", station_id), reason)

    @hookimpl
    def csms_on_presence_changed(self, station_id, node, previous_node):
        self._record(("presence", station_id), (node, previous_node))
