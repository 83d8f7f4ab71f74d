"""The Dashboard plugin: operator web pages under /ui/ on the operator API's site.

It answers no OCPP action and sends none itself: every page reads, and every form acts, through the
operator API's own route handlers (``app.api_resource.dispatch``) on behalf of the signed-in token, so
the token's scope and the audit trail apply to the pages exactly as to the API.
"""
from __future__ import annotations

from zope.interface import implementer

from csms.config import ConfigError, Setting
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from csms.ocpp16 import format_datetime

from .events import EventBroker, meter_points, request_samples
from .relay import Relay
from .sessions import SessionStore, SignInThrottle


@implementer(ICSMSPlugin)
class DashboardPlugin:
    name = "dashboard"
    profile = None
    inbound_actions = ()
    outbound_actions = ()
    settings = (
        Setting("session_idle_timeout", float, 1800.0, "Seconds a signed-in session lasts unused."),
        Setting("session_max_age", float, 43200.0, "Seconds a session lasts however much it is used."),
        Setting("max_sessions", int, 1000, "Signed-in sessions held at most (the least recently used goes)."),
        Setting("page_size", int, 50, "Rows a list page shows."),
        Setting("sign_in_failures_per_minute", int, 10, "Failed sign-ins from one address in a minute before "
                                                        "that address must wait (429)."),
        Setting("sse_max_streams", int, 200, "Live event streams open at most, all sessions together."),
        Setting("sse_max_streams_per_session", int, 8, "Live event streams one session may have open."),
        Setting("sse_max_queued", int, 500, "Events held for a stream that does not read; then it is closed."),
        Setting("sse_keepalive", float, 15.0, "Seconds between keepalive comments on an event stream."),
    )

    app = None
    sessions: SessionStore | None = None
    broker: EventBroker | None = None
    relay: Relay | None = None
    resource = None

    @hookimpl
    def csms_configure(self, app):
        settings = app.config.plugin(self.name)
        for key in ("session_idle_timeout", "session_max_age", "max_sessions", "page_size",
                    "sign_in_failures_per_minute", "sse_max_streams",
                    "sse_max_streams_per_session", "sse_max_queued", "sse_keepalive"):
            if settings[key] <= 0:
                raise ConfigError(f"[plugin:{self.name}] {key} must be positive")
        if settings["page_size"] > 1000:
            raise ConfigError(f"[plugin:{self.name}] page_size is at most 1000 (the API's largest page)")
        self.app = app
        self.page_size = settings["page_size"]
        self.sessions = SessionStore(app.clock, settings["session_idle_timeout"], settings["session_max_age"],
                                     settings["max_sessions"])
        self.throttle = SignInThrottle(app.clock, settings["sign_in_failures_per_minute"])
        self.broker = EventBroker(app.clock, self.sessions, settings["sse_max_streams"],
                                  settings["sse_max_streams_per_session"], settings["sse_max_queued"],
                                  settings["sse_keepalive"])
        # app.cluster is made before any plugin is configured (csms.app.Application).
        dropped = app.metrics.counter("csms_dashboard_relay_dropped_events",
                                      "Events this node could not relay to the dashboard pages of other nodes")
        self.relay = Relay(app.cluster, app.clock, self.broker, settings["sse_keepalive"], dropped.inc)

    @hookimpl
    def csms_web_resources(self, app):
        from .web import DashboardResource

        self.resource = DashboardResource(app, self)
        return {"ui": self.resource}

    # -- events, pushed to the pages --------------------------------------------------------------

    @hookimpl
    def csms_on_station_connected(self, station_id, station):
        self.relay.publish("station", {"station_id": station_id, "online": True})

    @hookimpl
    def csms_on_station_disconnected(self, station_id, reason):
        self.relay.publish("station", {"station_id": station_id, "online": False})

    @hookimpl
    def csms_on_boot(self, station_id, request, status):
        self.relay.publish("boot", {"station_id": station_id, "status": status,
                                    "vendor": request.get("chargePointVendor"),
                                    "model": request.get("chargePointModel")})

    @hookimpl
    def csms_on_status_changed(self, station_id, connector_id, status, error_code, previous_status, request):
        self.relay.publish("status", {"station_id": station_id, "connector_id": connector_id, "status": status,
                                      "error_code": error_code, "info": request.get("info"),
                                      "timestamp": request.get("timestamp")})

    @hookimpl
    def csms_on_transaction_started(self, station_id, transaction, request):
        self.relay.publish("transaction", {"station_id": station_id, "transaction_id": transaction["transaction_id"],
                                           "connector_id": transaction.get("connector_id"), "active": True})

    @hookimpl
    def csms_on_transaction_stopped(self, station_id, transaction, request):
        stopped_at = transaction.get("stopped_at")
        self.relay.publish("transaction", {"station_id": station_id, "transaction_id": transaction["transaction_id"],
                                           "connector_id": transaction.get("connector_id"), "active": False,
                                           "stopped_at": format_datetime(stopped_at) if stopped_at else None})

    @hookimpl
    def csms_on_meter_values(self, station_id, connector_id, transaction_id, meter_values):
        # The hot path: nothing is built unless a page, here or on another node, draws this transaction.
        if transaction_id is None or not self.relay.wants_meter(transaction_id):
            return
        self.relay.publish("meter", {"station_id": station_id, "transaction_id": transaction_id,
                                     **meter_points(request_samples(meter_values))})

    @hookimpl
    def csms_services(self, app):
        from twisted.application import service

        broker, relay = self.broker, self.relay

        class LiveUpdates(service.Service):
            def startService(self):
                super().startService()
                relay.hello()

            def stopService(self):
                relay.stop()
                broker.stop()
                return super().stopService()
        return [LiveUpdates()]
