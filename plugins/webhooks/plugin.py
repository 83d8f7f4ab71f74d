"""The webhooks plugin: subscriptions (API), the outbox writer, and the dispatcher service."""
from __future__ import annotations

import os

from twisted.application import service
from twisted.logger import Logger
from zope.interface import implementer

from csms.config import ConfigError, Setting
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin

from .delivery_db import open_delivery_database, prepare
from .dispatcher import Dispatcher
from .guard import AddressPolicy, ReceiverGuard, parse_networks
from .store import ALL_TYPES, WebhookStore
from .tables import metadata
from .worker import WorkerProcess, worker_spec

log = Logger(namespace="csms.webhooks")

#: The cluster topic telling the other nodes a subscription was made, changed or deleted.
SUBSCRIPTIONS_CHANGED = "webhooks.subscriptions"
DELIVERY_MODES = ("worker", "in-process", "external")
POSITIVE = ("poll_interval", "request_timeout", "retry_initial_delay", "retry_max_delay", "dead_letter_after",
            "history_retention", "batch_size", "max_concurrent_deliveries", "max_concurrent_per_subscription",
            "max_response_bytes", "meter_values_batch_size", "max_subscriptions")


@implementer(ICSMSPlugin)
class WebhooksPlugin:
    """Outbox events to operators' HTTP receivers; see docs/webhooks.md."""

    name = "webhooks"
    #: Its Alembic migration history (docs/migrations.md).
    migrations = os.path.join(os.path.dirname(__file__), "migrations")
    profile = None
    inbound_actions = ()
    outbound_actions = ()
    settings = (
        Setting("delivery", str, "worker",
                "Where events are sent from: worker (a process the CSMS starts beside it), in-process (on the "
                "OCPP reactor), external (`csms-admin webhooks deliver`, run by the operator).",
                choices=DELIVERY_MODES),
        Setting("worker_nice", int, 10,
                "How much lower the worker's CPU priority is than the CSMS's (0-19, as nice(1)): on a busy "
                "machine the OCPP process gets the CPU first, and delivery what is left."),
        Setting("worker_policy", str, "idle",
                "idle: on Linux the worker the CSMS starts runs under SCHED_IDLE, so it has a CPU only while "
                "no other process wants it and a waking OCPP process takes the CPU from it at once (under nice "
                "alone it may first finish its time slice, up to a few ms); normal: worker_nice only.",
                choices=("idle", "normal")),
        Setting("allow_private_networks", str, "",
                "Addresses or networks (comma separated CIDR) receivers may resolve to besides public ones."),
        Setting("poll_interval", float, 1.0, "Seconds between looks at the outbox when it is idle."),
        Setting("batch_size", int, 500, "Deliveries claimed per pass (and most held in memory); a batch of "
                "meter values is one."),
        Setting("max_concurrent_deliveries", int, 64, "POSTs in flight at once, in all."),
        Setting("max_concurrent_per_subscription", int, 4, "POSTs in flight at once to one subscription."),
        Setting("request_timeout", float, 10.0, "Seconds a receiver has to answer (connection included)."),
        Setting("max_response_bytes", int, 4096, "Most bytes of a receiver's answer read."),
        Setting("retry_initial_delay", float, 10.0, "Seconds before the first retry (then doubling)."),
        Setting("retry_max_delay", float, 3600.0, "Longest wait between two attempts, in seconds."),
        Setting("dead_letter_after", float, 86400.0, "Seconds after its event a delivery is given up (dead)."),
        Setting("history_retention", float, 604800.0, "Seconds delivered and dead deliveries are kept."),
        Setting("meter_values_batch_size", int, 100, "Most meter_values events in one POST."),
        Setting("max_subscriptions", int, 100, "Most subscriptions."),
    )

    #: For csms_factory (csms.testing), which runs the CSMS in the test process on the test's clock: the
    #: dispatcher goes with it, where the test can drain it and its clock drives the retries.
    in_test_settings = {"delivery": "in-process"}

    app = None
    store: WebhookStore | None = None
    #: SQLite: the delivery file's Database (None: the deliveries are in the main database).
    delivery_db = None
    #: The event types the deliverer reads from their stored rows rather than from outbox rows (an SQLite
    #: file's split layout, once the delivery file has a mark for each: WebhookStore.read_rows_from_now).
    read_from_rows: frozenset = frozenset()
    #: The in-process dispatcher (``delivery = in-process``), else None.
    dispatcher: Dispatcher | None = None
    #: The delivery worker's supervisor (``delivery = worker``), else None.
    worker: WorkerProcess | None = None

    @hookimpl
    def csms_configure(self, app):
        self.app = app
        self.settings_values = self.read_settings(app.config.plugin(self.name))
        networks = parse_networks(self.settings_values["allow_private_networks"], "allow_private_networks")
        delivery = self.settings_values["delivery"]
        self.guard = ReceiverGuard(AddressPolicy(networks), app.reactor.nameResolver)
        # SQLite: the deliveries in a file of their own (delivery_db.py), which the API reads here.
        self.delivery_db = open_delivery_database(app.db, app.reactor, app.config.database.sqlite_synchronous)
        self.store = WebhookStore(app.db, app.clock, self.delivery_db)
        app.outbox.attach(self.store.write_event)
        metrics = app.metrics
        self.deliveries_metric = metrics.counter(
            "csms_webhook_deliveries", "Webhook deliveries ended, by outcome (delivered, dead)", ["outcome"])
        self.failed_posts_metric = metrics.counter(
            "csms_webhook_failed_posts", "Webhook POSTs that failed (each is retried later, or dead-lettered)")
        self.worker_up_metric = metrics.gauge(
            "csms_webhook_worker_up", "1 while this node's webhook delivery worker runs (delivery = worker)")
        self.worker_delivering_metric = metrics.gauge(
            "csms_webhook_worker_delivering", "1 while this node's worker holds the delivery lock and delivers")
        self.worker_restarts_metric = metrics.counter(
            "csms_webhook_worker_restarts", "Times this node restarted its webhook delivery worker after it ended")
        if delivery == "in-process":
            self.dispatcher = Dispatcher(self.store, self.settings_values, app.reactor, app.clock, self.guard,
                                         app.cluster.leads, count=self.count)
            app.cluster.watch_leadership(lambda leading: self.dispatcher.poke() if leading else None)
        elif delivery == "worker":
            self.worker = WorkerProcess(self, app.reactor, app.clock, worker_spec(app.config, self.settings_values))
        # Another node's subscription change: this node's outbox writer must store events for it too.
        app.cluster.subscribe(SUBSCRIPTIONS_CHANGED, lambda data, origin: self.refresh_wanted())

    @classmethod
    def read_settings(cls, section) -> dict:
        """The typed ``[plugin:webhooks]`` values (a :class:`csms.config.PluginSettings`), or ConfigError."""
        values = {setting.name: section[setting.name] for setting in cls.settings}
        for name in POSITIVE:
            if not values[name] > 0:
                raise ConfigError(f"[plugin:webhooks] {name} must be positive")
        if not 0 <= values["worker_nice"] <= 19:
            raise ConfigError("[plugin:webhooks] worker_nice must be from 0 to 19")
        return values

    @hookimpl
    def csms_tables(self):
        return metadata

    @hookimpl
    def csms_services(self, app):
        # Here, not in csms_configure: `csms-admin db revision` configures an app on an in-memory database.
        delivery = self.settings_values["delivery"]
        if delivery != "in-process" and app.db.is_sqlite and (app.db.url.database or ":memory:") == ":memory:":
            raise ConfigError(f"[plugin:webhooks] delivery = {delivery} needs a database another process can open "
                              "(an SQLite file or PostgreSQL): this one is in memory; use delivery = in-process")
        return [_Starter(self)] + [service for service in (self.dispatcher, self.worker) if service is not None]

    @hookimpl
    def csms_api_routes(self, app, router):
        from .api import add_routes
        add_routes(self, app, router)

    def poke(self) -> None:
        """Look at the outbox now (a test-fire, a resumed subscription) rather than at the next poll."""
        if self.dispatcher is not None:
            self.dispatcher.poke()
        elif self.worker is not None:
            self.worker.poke()

    def count(self, outcome: str, n: int) -> None:
        """Delivery outcomes for the metrics, from the in-process dispatcher or from the worker's reports."""
        if outcome == "failed":
            self.failed_posts_metric.inc(n)
        elif outcome in ("delivered", "dead") and n:
            self.deliveries_metric.labels(outcome).inc(n)

    def worker_state(self, up: bool, delivering: bool = False) -> None:
        self.worker_up_metric.set(1 if up else 0)
        self.worker_delivering_metric.set(1 if delivering else 0)

    def worker_restarted(self) -> None:
        self.worker_restarts_metric.inc()

    def expand(self, types: list) -> set:
        """The event types a subscription's ``event_types`` stand for."""
        names = set(types) - {ALL_TYPES}
        if ALL_TYPES in types:
            names |= {name for name, event_type in self.app.outbox.types.items() if not event_type.opt_in}
        return names

    def subscriptions_changed(self):
        """After a subscription change here: this node's writer, then every other node's, know of it."""
        return self.refresh_wanted().addCallback(lambda _: self.app.cluster.broadcast(SUBSCRIPTIONS_CHANGED, {}))

    def refresh_wanted(self):
        """Tell the outbox which event types someone subscribes to, and the writer which subscriptions
        want each (after any subscription change)."""
        def wanted(all_types):
            subscribers: dict[str, list] = {}
            for subscription_id, types in all_types:
                for name in self.expand(types):
                    subscribers.setdefault(name, []).append(subscription_id)
            self.store.subscribers = {name: tuple(ids) for name, ids in subscribers.items()}
            # The types the deliverer reads from their stored rows are not written as outbox rows too.
            self.app.outbox.want(name for name in subscribers if name not in self.read_from_rows)
        return self.store.all_event_types().addCallback(wanted)

    def derived_types(self) -> dict:
        """event type -> (StoredRows, opt_in): the registered types whose events can be read from rows."""
        return {name: (event_type.source, event_type.opt_in)
                for name, event_type in self.app.outbox.types.items() if event_type.source is not None}

    def start_reading_rows(self):
        """Once the delivery file is ready: the types read from stored rows from now on (SQLite file)."""
        def reading(types):
            self.read_from_rows = types
        return self.store.read_rows_from_now().addCallback(reading)


class _Starter(service.Service):
    """Opens the delivery file (SQLite) and loads the subscribed event types before stations connect
    (services start before the listeners); closes the file at the end."""

    name = "webhooks-subscriptions"

    def __init__(self, plugin):
        self.plugin = plugin

    def startService(self):
        service.Service.startService(self)
        self.plugin.store.derived = self.plugin.derived_types()  # every plugin has registered its types
        delivery_db = self.plugin.delivery_db
        if delivery_db is None:
            return self.plugin.refresh_wanted()
        delivery_db.start()
        return prepare(delivery_db).addCallback(lambda _: self.plugin.start_reading_rows()).addCallback(
            lambda _: self.plugin.refresh_wanted())

    def stopService(self):
        service.Service.stopService(self)
        if self.plugin.delivery_db is not None:
            self.plugin.delivery_db.stop()
