"""The Reservation profile (OCPP 1.6 §3.12, §5.3, §5.13): ReserveNow, CancelReservation, and the life of a
reservation until it expires, is cancelled or is consumed by a StartTransaction.

Talks to the Core plugin only through hooks: ``csms_connector_ids``, ``csms_active_transactions`` and
``csms_id_tags`` lookups, and the ``csms_on_transaction_started`` / ``csms_on_status_changed`` events.
"""
from __future__ import annotations

import os
from datetime import timedelta

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from csms import ocpp16
from csms.db import DatabaseStopped
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from csms.ocpp16 import parse_datetime

from .store import LIVE, LIVE_TOPIC, ReservationStore
from .tables import metadata

log = Logger(namespace="csms.reservation")


class ExpiryTimers(service.Service):
    """One ``clock.callLater`` per live reservation, firing at its expiry date; re-armed at start-up.

    No polling: a reservation closed otherwise (cancelled, consumed, replaced) has its timer cancelled.
    In a cluster every node keeps a timer for every live reservation, learning of the other nodes'
    changes from ``reservation.live`` messages and re-reading a station's when it connects here; the
    expiry itself is a conditional UPDATE, so whichever nodes are up, each reservation expires once.
    """

    name = "reservation-expiry"

    def __init__(self, plugin):
        self.plugin = plugin
        self.calls: dict[int, object] = {}
        #: record id -> station, and live reservations per station, for the armed ones
        self.stations: dict[int, str] = {}
        self.live: dict[str, int] = {}
        #: True once every live reservation found at start-up has its timer
        self.rearmed = False
        #: Stations whose live reservations are being re-read (none_live_at cannot answer for them)
        self.refreshing: dict[str, int] = {}
        #: Fires once the live reservations found at start-up have their timers.
        self.ready = defer.Deferred()

    def startService(self):
        super().startService()
        # Runs after the tables exist: the CSMS adds plugin services once the database is ready.
        d = self._rearm().addErrback(self._rearm_failed)
        d.chainDeferred(self.ready)

    @staticmethod
    def _rearm_failed(failure) -> None:
        if failure.check(DatabaseStopped):  # the Central System stopped first (a start-up that failed)
            log.info("Reservation timers not re-armed: the Central System stopped first")
            return
        log.failure("Re-arming reservation timers failed", failure)

    @defer.inlineCallbacks
    def _rearm(self):
        store = self.plugin.store
        app = self.plugin.app
        # Another node's ReserveNow may still be waiting for its answer: only older requests are orphans.
        made_before = app.now() - timedelta(seconds=2 * app.config.ocpp.response_timeout) \
            if app.cluster.enabled else None
        yield store.fail_interrupted(made_before)
        _, rows = yield store.list(active=True, limit=None)
        for row in rows:
            self.arm(row)
        self.rearmed = True
        if rows:
            log.info("Re-armed expiry timers of {count} live reservations", count=len(rows))

    def stopService(self):
        for call in self.calls.values():
            if call.active():
                call.cancel()
        self.calls.clear()
        self.stations.clear()
        self.live.clear()
        self.rearmed = False
        return super().stopService()

    def arm(self, row: dict) -> None:
        self.disarm(row["record_id"])
        delay = max(0.0, (row["expiry_date"] - self.plugin.app.now()).total_seconds())
        self.calls[row["record_id"]] = self.plugin.app.clock.callLater(delay, self._expire, row["record_id"])
        self._track(row["record_id"], row["station_id"])

    def disarm(self, record_id: int) -> None:
        call = self.calls.pop(record_id, None)
        self._untrack(record_id)
        if call is not None and call.active():
            call.cancel()

    def _track(self, record_id: int, station_id: str) -> None:
        self.stations[record_id] = station_id
        self.live[station_id] = self.live.get(station_id, 0) + 1

    def _untrack(self, record_id: int) -> None:
        station_id = self.stations.pop(record_id, None)
        if station_id is not None:
            left = self.live[station_id] - 1
            if left:
                self.live[station_id] = left
            else:
                del self.live[station_id]

    def none_live_at(self, station_id: str) -> bool:
        """True when this station certainly has no live reservation: every live reservation has a timer
        once start-up re-armed them, and the other nodes tell of the ones they record."""
        return self.rearmed and station_id not in self.live and station_id not in self.refreshing

    def changed_elsewhere(self, data: dict, origin: str) -> None:
        """A ``reservation.live`` message: another node made reservations live or closed them."""
        if not self.running:
            return  # start-up reads them all; after the stop nothing may be armed
        for record_id in data["closed"]:
            self.disarm(record_id)
        for live in data["live"]:
            self.arm({"record_id": live["record_id"], "station_id": data["station_id"],
                      "expiry_date": parse_datetime(live["expiry_date"])})

    @defer.inlineCallbacks
    def refresh(self, station_id: str):
        """Re-read the station's live reservations (it connected here: messages may have been missed)."""
        armed_before = {record_id for record_id, station in self.stations.items() if station == station_id}
        self.refreshing[station_id] = self.refreshing.get(station_id, 0) + 1
        try:
            _, rows = yield self.plugin.store.list(station_id, active=True, limit=None)
        finally:
            left = self.refreshing.pop(station_id) - 1
            if left:
                self.refreshing[station_id] = left
        if not self.running:
            return
        # A row live before the read and not in it was closed for good; ones armed meanwhile stay.
        for record_id in armed_before - {row["record_id"] for row in rows}:
            self.disarm(record_id)
        for row in rows:
            self.arm(row)

    def _expire(self, record_id: int):
        self.calls.pop(record_id, None)
        self._untrack(record_id)
        d = self.plugin.store.expire(record_id)

        def expired(row):
            if row is not None:
                log.info("Reservation {rid} of {station} expired", rid=row["reservation_id"],
                         station=row["station_id"])
        return d.addCallbacks(expired, lambda failure: log.failure("Expiring reservation {record} failed",
                                                                   failure, record=record_id))


@implementer(ICSMSPlugin)
class ReservationPlugin:
    """Records every ReserveNow/CancelReservation answer, however it was sent, and keeps reservations current."""

    name = "reservation"
    #: Its Alembic migration history (docs/migrations.md).
    migrations = os.path.join(os.path.dirname(__file__), "migrations")
    profile = ocpp16.RESERVATION
    inbound_actions = ocpp16.inbound_of(ocpp16.RESERVATION)
    outbound_actions = ocpp16.outbound_of(ocpp16.RESERVATION)
    settings = ()

    app = None
    store: ReservationStore | None = None

    @hookimpl
    def csms_configure(self, app):
        self.app = app
        app.outbox.register("reservation.changed", "A reservation was answered by its station, cancelled, "
                            "expired or consumed by a transaction (`state`).",
                            {"station_id": "CP-1", "reservation_id": 12, "connector_id": 1, "id_tag": "04A1B2C3",
                             "state": "consumed", "status": "Accepted", "transaction_id": 42,
                             "expiry_date": "2026-12-01T12:00:00.000Z"}, owner=self.name)
        self.store = ReservationStore(app.db, app.clock, app.outbox, app.cluster)
        self.timers = ExpiryTimers(self)
        app.cluster.subscribe(LIVE_TOPIC, self.timers.changed_elsewhere)

    @hookimpl
    def csms_tables(self):
        return metadata

    @hookimpl
    def csms_retention(self, app):
        # Imported here: one hunk beside csms_tables, for easy merges with the handlers' changes.
        from csms.retention import Retention

        from .tables import events

        return [Retention("reservation_events", events, "at",
                          "Days reservation events (cancels of unknown ids, reused or unknown reservation ids, replaced "
                          "reservations) are kept; the reservations themselves are kept regardless.")]

    @hookimpl
    def csms_services(self, app):
        return [self.timers]

    @hookimpl
    def csms_api_routes(self, app, router):
        from .api import add_routes
        add_routes(self, app, router)

    # -- answers to CSMS-initiated calls, from the friendly routes and the generic one alike --------

    @hookimpl
    def csms_on_call_completed(self, station_id, action, request, response):
        if action == "ReserveNow":
            return self._reserve_answered(station_id, request, response["status"])
        if action == "CancelReservation":
            return self._cancel_answered(station_id, request["reservationId"], response["status"])
        return None

    @defer.inlineCallbacks
    def _reserve_answered(self, station_id, request, status):
        row, closed = yield self.store.record_reserve_answer(station_id, request, status)
        for record_id in closed:
            self.timers.disarm(record_id)
        if row["state"] == LIVE:
            self.timers.arm(row)
        log.info("{station} answered ReserveNow {rid} (connector {connector}, {tag}): {status}",
                 station=station_id, rid=row["reservation_id"], connector=row["connector_id"], tag=row["id_tag"],
                 status=status)

    @defer.inlineCallbacks
    def _cancel_answered(self, station_id, reservation_id, status):
        row, closed = yield self.store.record_cancel(station_id, reservation_id, status)
        for record_id in closed:
            self.timers.disarm(record_id)
        log.info("{station} answered CancelReservation {rid}: {status}{unknown}", station=station_id,
                 rid=reservation_id, status=status, unknown="" if row else " (an id the CSMS does not know)")

    # -- events from the Core plugin ---------------------------------------------------------------

    @hookimpl
    def csms_on_transaction_started(self, station_id, transaction, request):
        if transaction.get("reservation_id") is None and self.timers.none_live_at(station_id):
            return None  # nothing this start could consume (a reservationId is always checked and recorded)
        return self.store.consume(station_id, transaction).addCallback(self._consumed, transaction)

    def _consumed(self, row, transaction):
        if row is not None:
            self.timers.disarm(row["record_id"])
            log.info("Transaction {tx} of {station} consumed reservation {rid}", tx=transaction["transaction_id"],
                     station=row["station_id"], rid=row["reservation_id"])

    @hookimpl
    def csms_on_status_changed(self, station_id, connector_id, status, error_code, previous_status, request):
        return self.store.status_changed(station_id, connector_id, status)

    @hookimpl
    def csms_on_presence_changed(self, station_id, node, previous_node):
        # On one node the timers already know every change; in a cluster the station's new node re-reads.
        if not self.app.cluster.enabled or node != self.app.cluster.node or not self.timers.running:
            return None
        return self.timers.refresh(station_id).addErrback(
            lambda failure: log.failure("Re-reading the reservations of {station} failed", failure,
                                        station=station_id))

    @hookimpl
    def csms_on_station_deleted(self, station_id):
        def disarm(record_ids):
            for record_id in record_ids:
                self.timers.disarm(record_id)
        return self.store.delete_station(station_id).addCallback(disarm)
