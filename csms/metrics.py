"""Prometheus metrics of one Central System, in its own ``prometheus_client`` registry.

Each :class:`csms.app.CentralSystem` has its own :class:`Metrics` (``app.metrics``) and registry, so that
several Central Systems in one process (the tests start many) never share or collide. Plugins add their
own metrics with :meth:`Metrics.counter`, :meth:`Metrics.gauge` and :meth:`Metrics.histogram`
(docs/metrics.md lists every metric).

The OCPP hot path (:mod:`csms.rpc`) does not call ``prometheus_client`` per message: a labelled
child's ``inc()`` takes a lock and ``labels()`` builds a tuple and looks it up, together a few µs, a
few per cent of a Heartbeat's whole CPU cost. It counts in plain integers on pre-built per-action
objects instead (reactor thread only, as is a scrape: no lock needed), which :class:`OCPPCollector`
turns into metric families when Prometheus scrapes.

Label values are bounded: an action the Central System does not know, a CALLERROR code OCPP-J does not
name, an HTTP method or status outside the usual ones collapse to one fixed value; no label ever holds
a station id or a raw path.
"""
from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from csms import ocpp16

#: The label value of an action the Central System has no schema for, or a message with no readable action.
UNKNOWN_ACTION = "unknown"
#: The label value of a CALLERROR code, HTTP method or boot status outside the known ones.
OTHER = "other"
#: OCPP-J 1.6 §4.2.3's CALLERROR codes (and "OccurrenceConstraintViolation", the spelling some stations use).
CALL_ERROR_CODES = frozenset((
    "NotImplemented", "NotSupported", "InternalError", "ProtocolError", "SecurityError", "FormationViolation",
    "PropertyConstraintViolation", "OccurenceConstraintViolation", "OccurrenceConstraintViolation",
    "TypeConstraintViolation", "GenericError"))
BOOT_STATUSES = frozenset(("Accepted", "Pending", "Rejected"))
HTTP_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
#: Handler latency buckets (seconds): a cached answer takes well under a millisecond, a commit a few.
HANDLER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 200)
#: How a CSMS-initiated call ended (``csms_ocpp_calls_sent_total``'s ``outcome``).
SENT_OUTCOMES = ("result", "error", "invalid", "timeout", "offline")


class InboundAction:
    """Counts of one action's station-initiated calls, and its handler latency histogram."""

    __slots__ = ("action", "results", "errors", "buckets", "seconds", "handled")

    def __init__(self, action: str):
        self.action = action
        self.results = 0
        self.errors = 0
        self.buckets = [0] * (len(HANDLER_BUCKETS) + 1)
        self.seconds = 0.0
        self.handled = 0

    def answered(self, response: dict) -> None:
        self.results += 1


class BootAction(InboundAction):
    """BootNotification: also counts the statuses it was answered with."""

    __slots__ = ("statuses",)

    def __init__(self, action: str):
        super().__init__(action)
        self.statuses = dict.fromkeys((*sorted(BOOT_STATUSES), OTHER), 0)

    def answered(self, response: dict) -> None:
        self.results += 1
        status = response.get("status")
        self.statuses[status if status in BOOT_STATUSES else OTHER] += 1


class OCPPMetrics:
    """What :mod:`csms.rpc` and :mod:`csms.protocol` count, in plain integers (reactor thread only)."""

    def __init__(self, inbound_actions, outbound_actions):
        self.inbound = {action: (BootAction if action == "BootNotification" else InboundAction)(action)
                        for action in inbound_actions}
        self.unknown = InboundAction(UNKNOWN_ACTION)
        self.outbound = frozenset(outbound_actions)
        self.errors_sent = dict.fromkeys((*sorted(CALL_ERROR_CODES), OTHER), 0)
        self.errors_received = dict.fromkeys((*sorted(CALL_ERROR_CODES), OTHER), 0)
        #: (action, outcome) -> CSMS-initiated calls ended so.
        self.sent: dict[tuple[str, str], int] = {}
        #: CSMS-initiated calls queued or in flight, on every connection.
        self.pending_calls = 0
        #: (reason, HTTP status or "none") -> refused WebSocket handshakes.
        self.refused: dict[tuple[str, str], int] = {}

    # -- station-initiated calls (the hot path) ------------------------------------------------------

    def call_answered(self, action: str, response: dict) -> None:
        """A CALL was answered with a CALLRESULT."""
        self.inbound.get(action, self.unknown).answered(response)

    def error_sent(self, action, code: str) -> None:
        """A message from a station was answered with a CALLERROR (``action`` None: no readable action)."""
        stats = self.inbound.get(action, self.unknown) if type(action) is str else self.unknown
        stats.errors += 1
        self.errors_sent[code if type(code) is str and code in CALL_ERROR_CODES else OTHER] += 1

    def handled(self, action: str, seconds: float) -> None:
        """A handler answered (or timed out) ``seconds`` after it was called."""
        stats = self.inbound.get(action, self.unknown)
        stats.buckets[bisect_left(HANDLER_BUCKETS, seconds)] += 1
        stats.seconds += seconds
        stats.handled += 1

    # -- CSMS-initiated calls ------------------------------------------------------------------------

    def call_queued(self) -> None:
        self.pending_calls += 1

    def call_ended(self, action: str, outcome: str, error_code: str | None = None) -> None:
        self.pending_calls -= 1
        key = (action if action in self.outbound else UNKNOWN_ACTION, outcome)
        self.sent[key] = self.sent.get(key, 0) + 1
        if error_code is not None:
            self.errors_received[error_code if error_code in CALL_ERROR_CODES else OTHER] += 1

    # -- handshakes ----------------------------------------------------------------------------------

    def handshake_refused(self, reason: str, status: int | None = None) -> None:
        key = (reason, str(status) if status is not None else "none")
        self.refused[key] = self.refused.get(key, 0) + 1


class OCPPCollector:
    """Turns :class:`OCPPMetrics` into Prometheus metric families at scrape time (a custom collector)."""

    def __init__(self, ocpp: OCPPMetrics, sessions: dict):
        self.ocpp = ocpp
        self.sessions = sessions

    def describe(self):
        return []  # families are built at scrape time; nothing to check at registration

    def collect(self):
        ocpp = self.ocpp
        stations = GaugeMetricFamily("csms_ocpp_stations_connected", "Stations with an open OCPP connection")
        stations.add_metric([], len(self.sessions))
        yield stations
        received = CounterMetricFamily("csms_ocpp_calls_received", "Messages from stations the CSMS answered, "
                                       "by action and by answer (result: CALLRESULT, error: CALLERROR)",
                                       labels=("action", "outcome"))
        latency = HistogramMetricFamily("csms_ocpp_handler_duration_seconds", "Time from a station's CALL "
                                        "reaching its handler to the answer", labels=("action",))
        boots = CounterMetricFamily("csms_ocpp_boots", "BootNotifications answered, by the status answered",
                                    labels=("status",))
        for stats in (*ocpp.inbound.values(), ocpp.unknown):
            if stats.results or stats.errors:
                received.add_metric([stats.action, "result"], stats.results)
                received.add_metric([stats.action, "error"], stats.errors)
            if stats.handled:
                cumulative, buckets = 0, []
                for bound, count in zip((*HANDLER_BUCKETS, float("inf")), stats.buckets):
                    cumulative += count
                    buckets.append((_bound_text(bound), cumulative))
                latency.add_metric([stats.action], buckets, stats.seconds)
            if isinstance(stats, BootAction):
                for status, count in stats.statuses.items():
                    boots.add_metric([status], count)
        yield received
        yield latency
        yield boots
        errors = CounterMetricFamily("csms_ocpp_callerrors", "CALLERRORs sent to stations and received from them, "
                                     "by code", labels=("direction", "code"))
        for direction, counts in (("sent", ocpp.errors_sent), ("received", ocpp.errors_received)):
            for code, count in counts.items():
                if count:
                    errors.add_metric([direction, code], count)
        yield errors
        sent = CounterMetricFamily("csms_ocpp_calls_sent", "CSMS-initiated calls, by action and by how they ended",
                                   labels=("action", "outcome"))
        for (action, outcome), count in sorted(ocpp.sent.items()):
            sent.add_metric([action, outcome], count)
        yield sent
        pending = GaugeMetricFamily("csms_ocpp_pending_calls", "CSMS-initiated calls queued or awaiting an answer")
        pending.add_metric([], ocpp.pending_calls)
        yield pending
        refused = CounterMetricFamily("csms_ocpp_handshakes_refused", "WebSocket connections refused before "
                                      "they opened, by reason and HTTP status", labels=("reason", "status"))
        for (reason, status), count in sorted(ocpp.refused.items()):
            refused.add_metric([reason, status], count)
        yield refused


class DatabaseCollector:
    """The database pool's running totals and queue, read at scrape time."""

    def __init__(self, db):
        self.db = db

    def describe(self):
        return []

    def collect(self):
        stats = self.db.stats
        for key, help_text in (("transactions", "Database transactions committed (group commits)"),
                               ("functions", "Database functions committed"),
                               ("retries", "Group commits retried after a transient error"),
                               ("isolated", "Group commits rerun with each function in its own SAVEPOINT"),
                               ("lock_waits", "SQLite transactions that waited for the write lock another "
                                              "process (the webhook delivery worker) held")):
            family = CounterMetricFamily(f"csms_db_{key}", help_text)
            family.add_metric([], stats[key])
            yield family
        queue = GaugeMetricFamily("csms_db_queue_depth", "Database functions queued, waiting for a pool thread")
        queue.add_metric([], self.db.queued())
        yield queue


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class Metrics:
    """One Central System's metrics: ``registry`` (a ``prometheus_client.CollectorRegistry``) and the
    framework's own metrics; :meth:`counter`, :meth:`gauge`, :meth:`histogram` for plugins.

    ``enabled`` False (``[metrics] enabled = false``): nothing is counted on the OCPP path, the database
    and the API, and ``/metrics`` answers 404; plugins' metrics still work (they are not served).
    """

    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=False)
        #: What the OCPP path counts; None when metrics are disabled (the hot path then skips them).
        self.ocpp: OCPPMetrics | None = None
        self.api_requests = self.counter("csms_api_requests", "Operator API requests, by method, route template "
                                         "and HTTP status", ("method", "route", "status"))
        self.db_commit_seconds = self.histogram("csms_db_commit_seconds", "Time one database transaction (a group "
                                                "commit) took, from BEGIN to COMMIT", buckets=COMMIT_BUCKETS)
        self.db_batch_size = self.histogram("csms_db_batch_size", "Database functions committed together in one "
                                            "transaction (group commit)", buckets=BATCH_BUCKETS)

    def attach(self, app) -> None:
        """Start counting what ``app`` does (its actions are known by now)."""
        if not self.enabled:
            return
        self.ocpp = OCPPMetrics({*ocpp16.INBOUND, *app.inbound_actions}, {*ocpp16.OUTBOUND, *app.outbound_actions})
        self.registry.register(OCPPCollector(self.ocpp, app.sessions))
        self.registry.register(DatabaseCollector(app.db))
        app.db.observe_commit = self.observe_commit

    def observe_commit(self, seconds: float, batch_size: int) -> None:
        """On a database pool thread: one transaction committed (prometheus_client's metrics are thread-safe)."""
        self.db_commit_seconds.observe(seconds)
        self.db_batch_size.observe(batch_size)

    def api_request(self, method: bytes, route: str, status: int) -> None:
        if not self.enabled:
            return
        name = method.decode("ascii", "replace") if isinstance(method, bytes) else str(method)
        self.api_requests.labels(name if name in HTTP_METHODS else OTHER, route,
                                 str(status) if 100 <= status <= 599 else OTHER).inc()

    # -- for plugins ---------------------------------------------------------------------------------

    def counter(self, name: str, documentation: str, labelnames=()) -> Counter:
        """A ``prometheus_client.Counter`` in this Central System's registry (``_total`` is added to ``name``).

        Name it ``csms_<plugin>_...``; label values must come from a small fixed set (never a station id).
        A name already taken raises :class:`csms.plugins.PluginError` (start-up stops with that one line).
        """
        return self._register(Counter, name, documentation, labelnames)

    def gauge(self, name: str, documentation: str, labelnames=()) -> Gauge:
        """A ``prometheus_client.Gauge`` in this Central System's registry."""
        return self._register(Gauge, name, documentation, labelnames)

    def histogram(self, name: str, documentation: str, labelnames=(), buckets=Histogram.DEFAULT_BUCKETS) -> Histogram:
        """A ``prometheus_client.Histogram`` in this Central System's registry."""
        return self._register(Histogram, name, documentation, labelnames, buckets=buckets)

    def _register(self, kind, name: str, documentation: str, labelnames, **kwargs):
        from csms.plugins import PluginError

        try:
            return kind(name, documentation, tuple(labelnames), registry=self.registry, **kwargs)
        except ValueError as exc:  # a duplicate name
            raise PluginError(f"metric {name!r} cannot be registered: {exc}") from None

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format."""
        return generate_latest(self.registry)
