"""The Core profile (OCPP 1.6 §4-§6): boot, heartbeat, status, authorization, transactions, meter values."""
from __future__ import annotations

import os

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from csms import ocpp16
from csms.admission import AdmissionRefused
from csms.app import as_deferred
from csms.config import Setting
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from csms.ocpp16 import format_datetime
from csms.passwords import verify_password
from csms.stations import as_utc

from .store import ID_TAG_TOPIC, CoreStore, register_event_types
from .tables import metadata

log = Logger(namespace="csms.core")


#: Configuration keys whose values are secrets (OCPP 1.6 Security whitepaper: AuthorizationKey is write-only):
#: a ChangeConfiguration of one is not kept in the stored configuration the API shows.
WRITE_ONLY_KEYS = frozenset(("AuthorizationKey",))


class OperatorStopRefused(ValueError):
    """An operator's stop whose values contradict the transaction (see
    :meth:`CorePlugin.stop_transaction_by_operator`); ``code`` names why, as the API's 422 does."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _empty_answer(_) -> dict:
    return {}


def _stop_request_of(transaction: dict) -> dict:
    """The StopTransaction payload of a transaction the CSMS closed itself (csms_on_transaction_stopped):
    the keys a station's would have, with the values recorded; no idTag, no transactionData."""
    return {"transactionId": transaction["transaction_id"], "meterStop": transaction["meter_stop"],
            "timestamp": format_datetime(transaction["stopped_at"]), "reason": transaction["stop_reason"]}


def _as_stopped(transaction: dict, estimates: dict) -> dict:
    """A stopped transaction as csms_on_transaction_stopped tells it: ``meter_stop`` always a number of Wh,
    ``meter_stop_estimated`` True when no reading was given (then it is the CSMS's estimate)."""
    if transaction["meter_stop"] is not None:
        return dict(transaction, meter_stop_estimated=False)
    return dict(transaction, meter_stop=estimates[transaction["transaction_id"]], meter_stop_estimated=True)


@implementer(ICSMSPlugin)
class CorePlugin:
    """Handlers are thin: read the request, call the store, fire the event, build the reply."""

    name = "core"
    #: Its Alembic migration history (docs/migrations.md).
    migrations = os.path.join(os.path.dirname(__file__), "migrations")
    profile = ocpp16.CORE
    inbound_actions = ocpp16.inbound_of(ocpp16.CORE)
    outbound_actions = ocpp16.outbound_of(ocpp16.CORE)
    # Vendor plugins answer DataTransfer for their own vendorId; Core answers the rest (UnknownVendorId).
    shared_actions = ("DataTransfer",)
    settings = (
        Setting("heartbeat_interval", int, 300, "Heartbeat interval handed to Accepted stations, in seconds."),
        Setting("boot_retry_interval", int, 60, "Interval handed to Pending or Rejected stations before they boot "
                                                "again, in seconds."),
        Setting("concurrent_tx_check", bool, True, "Answer ConcurrentTx for an id tag that already has a "
                                                   "transaction running."),
        Setting("id_tag_cache_seconds", float, 60.0, "Seconds Authorize answers from memory per id tag (0: always "
                                                     "ask the database)."),
    )

    app = None
    store: CoreStore | None = None

    @hookimpl
    def csms_configure(self, app):
        settings = app.config.plugin(self.name)
        self.app = app
        self.heartbeat_interval = settings["heartbeat_interval"]
        self.boot_retry_interval = settings["boot_retry_interval"]
        register_event_types(app.outbox)
        self.store = CoreStore(app.db, app.clock, concurrent_tx=settings["concurrent_tx_check"],
                               id_tag_cache_seconds=settings["id_tag_cache_seconds"], outbox=app.outbox,
                               cluster=app.cluster)
        app.cluster.subscribe(ID_TAG_TOPIC, self.store.tag_changed_elsewhere)

    @hookimpl
    def csms_tables(self):
        return metadata

    @hookimpl
    def csms_retention(self, app):
        # Imported here: one hunk beside csms_tables, for easy merges with the handlers' changes.
        from csms.retention import Retention

        from .tables import status_history

        return [Retention("core_status_history", status_history, "received_at",
                          "Days the connector status history (every StatusNotification, as received) is kept; each "
                          "connector's current status is kept regardless.")]

    @hookimpl
    def csms_api_routes(self, app, router):
        from .api import add_routes
        add_routes(self, app, router)

    # -- admission ---------------------------------------------------------------------------

    @hookimpl(trylast=True)
    def csms_admit_station(self, request):
        return self._admit(request)

    @defer.inlineCallbacks
    def _admit(self, request):
        """``[ocpp] unknown_stations`` and the station's password (Security whitepaper profile 1:
        HTTP Basic auth, username = the station's id; OCTT TC_085), in one database round trip."""
        ocpp = self.app.config.ocpp
        station_id = request.station_id
        policy = ocpp.unknown_stations
        register_as = None if policy == "reject" else ("Pending" if policy == "pending" else "Accepted")
        known = yield self.app.station_store.admit(station_id, register_as)
        if known is None:
            raise AdmissionRefused(404, "Unknown charge point", "unknown station")
        registration_status, password_hash, registered = known
        if registered:
            log.info("Registered unknown station {station} ({policy})", station=station_id, policy=policy)
        request.annotations["registration_status"] = registration_status
        if request.authenticated_by is not None:
            pass  # another plugin proved who the station is (a TLS client certificate): no password asked
        elif password_hash is not None:
            ok = False
            if request.username == station_id and request.password is not None:
                # scrypt takes tens of milliseconds of CPU: never on the reactor thread.
                reactor = self.app.reactor
                ok = yield threads.deferToThreadPool(reactor, reactor.getThreadPool(), verify_password,
                                                     request.password, password_hash)
            if not ok:
                raise AdmissionRefused(401, "Unauthorized", "bad credentials")
        elif ocpp.require_password:
            raise AdmissionRefused(401, "Unauthorized: this station has no password", "no password set")
        return True

    # -- inbound -----------------------------------------------------------------------------

    @hookimpl
    def csms_handle_boot_notification(self, station, payload):
        return self._boot(station, payload)

    @defer.inlineCallbacks
    def _boot(self, station, payload):
        record = yield self.app.station_store.get(station.station_id)
        status = record["registration_status"] if record is not None else "Accepted"
        closed = yield self.store.record_boot(station.station_id, payload, status)
        for transaction in closed:
            log.info("{station} booted: its transaction {tx} ({status}, never stopped) is closed",
                     station=station.station_id, tx=transaction["transaction_id"],
                     status=transaction["id_tag_status"])
        yield self._closed_by_csms(station.station_id, closed)
        yield self.app.fire("csms_on_boot", station_id=station.station_id, request=payload, status=status)
        interval = self.heartbeat_interval if status == "Accepted" else self.boot_retry_interval
        return {"status": status, "currentTime": format_datetime(self.app.now()), "interval": interval}

    @hookimpl
    def csms_handle_heartbeat(self, station, payload):
        return {"currentTime": format_datetime(self.app.now())}

    @hookimpl
    def csms_handle_status_notification(self, station, payload):
        return self._status(station, payload)

    @defer.inlineCallbacks
    def _status(self, station, payload):
        previous = yield self.store.record_status(station.station_id, payload)
        yield self.app.fire("csms_on_status_changed", station_id=station.station_id,
                            connector_id=payload["connectorId"], status=payload["status"],
                            error_code=payload["errorCode"], previous_status=previous, request=payload)
        return {}

    @hookimpl(trylast=True)
    def csms_authorize_id_tag(self, station, id_tag, purpose):
        # ConcurrentTx is judged here for Authorize; for StartTransaction the store judges it in the
        # same database transaction that records the start (ignoring that connector's own stale one).
        # A tag the cache knows is answered with a plain dict: no Deferred, no database.
        concurrent = purpose == "Authorize"
        info = self.store.cached_id_tag_info(id_tag, check_concurrent=concurrent)
        return info if info is not None else self.store.id_tag_info(id_tag, check_concurrent=concurrent)

    def authorize(self, station, id_tag: str, purpose: str):
        return self.app.lookup("csms_authorize_id_tag", default={"status": "Invalid"},
                               station=station, id_tag=id_tag, purpose=purpose)

    @hookimpl
    def csms_handle_authorize(self, station, payload):
        info = self.app.hook.csms_authorize_id_tag(station=station, id_tag=payload["idTag"], purpose="Authorize")
        if info is None:
            return {"idTagInfo": {"status": "Invalid"}}
        if isinstance(info, dict):
            return {"idTagInfo": info}  # answered at once (the common case: a cached tag)
        return as_deferred(info).addCallback(lambda answer: {"idTagInfo": answer})

    @hookimpl
    def csms_handle_start_transaction(self, station, payload):
        return self._start(station, payload)

    @defer.inlineCallbacks
    def _start(self, station, payload):
        info = yield self.authorize(station, payload["idTag"], "StartTransaction")
        transaction, created = yield self.store.start_transaction(station.station_id, payload, info)
        info = dict(info, status=transaction["id_tag_status"])
        if created:
            log.info("{station} started transaction {tx} on connector {connector} for {tag} ({status})",
                     station=station.station_id, tx=transaction["transaction_id"],
                     connector=transaction["connector_id"], tag=transaction["id_tag"], status=info["status"])
            yield self.app.fire("csms_on_transaction_started", station_id=station.station_id,
                                transaction=transaction, request=payload)
        else:
            log.info("{station} retransmitted the start of transaction {tx}", station=station.station_id,
                     tx=transaction["transaction_id"])
        return {"transactionId": transaction["transaction_id"], "idTagInfo": info}

    @hookimpl
    def csms_handle_stop_transaction(self, station, payload):
        return self._stop(station, payload)

    @defer.inlineCallbacks
    def _stop(self, station, payload):
        transaction, stopped = yield self.store.stop_transaction(station.station_id, payload)
        if transaction is None:
            log.warn("{station} stopped unknown transaction {tx}; recorded in core_unmatched_stops",
                     station=station.station_id, tx=payload["transactionId"])
        elif stopped:
            yield self.app.fire("csms_on_transaction_stopped", station_id=station.station_id,
                                transaction=dict(transaction, meter_stop_estimated=False), request=payload)
        response = {}
        if payload.get("idTag"):
            info = yield self.authorize(station, payload["idTag"], "StopTransaction")
            response["idTagInfo"] = info
        return response

    @hookimpl
    def csms_handle_meter_values(self, station, payload):
        # The busiest message of a charging network: a plain callback chain, not inlineCallbacks.
        station_id = station.station_id

        def stored(transaction_id):
            if transaction_id != payload.get("transactionId"):
                log.warn("{station} sent MeterValues for transaction {tx}, which is not one of its own; "
                         "kept without a transaction", station=station_id, tx=payload.get("transactionId"))
            if not self.app.listened("csms_on_meter_values"):
                return {}
            return self.app.fire("csms_on_meter_values", station_id=station_id,
                                 connector_id=payload["connectorId"], transaction_id=transaction_id,
                                 meter_values=payload["meterValue"]).addCallback(_empty_answer)
        return self.store.record_meter_values(station_id, payload).addCallback(stored)

    @hookimpl(trylast=True)
    def csms_handle_data_transfer(self, station, payload):
        # No vendor plugin claimed this vendorId (OCTT TC_064).
        log.info("{station} sent DataTransfer for unknown vendorId {vendor}", station=station.station_id,
                 vendor=payload["vendorId"])
        return {"status": "UnknownVendorId"}

    # -- lookups for other plugins -------------------------------------------------------------

    @hookimpl
    def csms_active_transactions(self, station_id):
        return self.store.active_transactions(station_id)

    @hookimpl
    def csms_connector_ids(self, station_id):
        return self.store.connector_ids(station_id)

    @hookimpl
    def csms_stations_with_connectors(self, status, error):
        return self.store.stations_with_connectors(status, error)

    @hookimpl
    def csms_id_tags(self, id_tags):
        return self.store.list_id_tags(limit=None, id_tags_in=id_tags).addCallback(lambda result: result[1])

    @hookimpl
    def csms_station_details(self, station_ids):
        return self.store.station_details(list(station_ids))

    @hookimpl
    def csms_station_configuration(self, station_id):
        return self.store.configuration(station_id).addCallback(
            lambda rows: {row["key"]: row["value"] for row in rows if row["known"]})

    # -- id tags, for the API and anything else that changes them: every change fires an event ----

    @defer.inlineCallbacks
    def put_id_tag(self, id_tag: str, replace: bool = True, **values):
        """Create or replace an id tag: fires (the tag, whether it was created); with ``replace=False`` an
        existing tag is left alone and (None, False) fires."""
        before = yield self.store.get_id_tag(id_tag)
        created = yield self.store.put_id_tag(id_tag, replace=replace, **values)
        if not created and not replace:
            return None, False
        after = yield self.store.get_id_tag(id_tag)
        yield self.app.fire("csms_on_id_tag_changed", id_tag=id_tag, before=before, after=after)
        return after, created

    @defer.inlineCallbacks
    def update_id_tag(self, id_tag: str, **values):
        before = yield self.store.get_id_tag(id_tag)
        if before is None:
            return None
        after = yield self.store.update_id_tag(id_tag, **values)
        yield self.app.fire("csms_on_id_tag_changed", id_tag=id_tag, before=before, after=after)
        return after

    @defer.inlineCallbacks
    def delete_id_tag(self, id_tag: str):
        before = yield self.store.get_id_tag(id_tag)
        if before is None:
            return False
        yield self.store.delete_id_tag(id_tag)
        yield self.app.fire("csms_on_id_tag_changed", id_tag=id_tag, before=before, after=None)
        return True

    # -- transactions a station will never close ---------------------------------------------------

    @defer.inlineCallbacks
    def stop_transaction_by_operator(self, transaction_id: int, reason: str = "Other",
                                     meter_stop: int | None = None, stopped_at=None):
        """Close a stuck transaction (recorded with ``stopped_by="operator"``); fires
        (transaction or None when unknown, newly_stopped), or fails with :class:`OperatorStopRefused`
        for a ``meter_stop`` below the transaction's meterStart or a ``stopped_at`` (aware) before its
        start or later than now. Nothing is sent to the station."""
        transaction = yield self.store.get_transaction(transaction_id)
        if transaction is None:
            return None, False
        if not transaction["active"]:
            return transaction, False
        if meter_stop is not None and meter_stop < transaction["meter_start"]:
            raise OperatorStopRefused("meter_stop_below_start", f"meter_stop {meter_stop} is below the "
                                      f"transaction's meter_start {transaction['meter_start']}")
        if stopped_at is not None:
            # Only a time the operator gives: without one it is now, even if a station whose clock runs
            # ahead started the transaction "later" (a stuck transaction can always be closed).
            started_at = as_utc(transaction["started_at"])
            if stopped_at < started_at:
                raise OperatorStopRefused("stopped_before_start", f"stopped_at {format_datetime(stopped_at)} "
                                          f"is before the transaction's start, {format_datetime(started_at)}")
            if stopped_at > self.app.now():
                raise OperatorStopRefused("stopped_in_future", f"stopped_at {format_datetime(stopped_at)} "
                                          "is later than now")
        # Recorded as given: without a reading meter_stop stays unknown (NULL); the event estimates it.
        recorded = {"transactionId": transaction_id, "meterStop": meter_stop,
                    "timestamp": format_datetime(stopped_at or self.app.now()), "reason": reason}
        transaction, stopped = yield self.store.stop_transaction(transaction["station_id"], recorded,
                                                                 stopped_by="operator")
        if stopped:
            log.info("An operator stopped transaction {tx} of {station} ({reason})", tx=transaction_id,
                     station=transaction["station_id"], reason=reason)
            yield self._closed_by_csms(transaction["station_id"], [transaction])
        return transaction, stopped

    @defer.inlineCallbacks
    def _closed_by_csms(self, station_id: str, closed: list[dict]):
        """Fire csms_on_transaction_stopped for transactions the CSMS closed (boot, operator), each with a
        StopTransaction payload a listener can use as a station's: see docs/hooks.md."""
        estimates = yield self.store.meter_stop_estimates([t for t in closed if t["meter_stop"] is None])
        for transaction in closed:
            stopped = _as_stopped(transaction, estimates)
            yield self.app.fire("csms_on_transaction_stopped", station_id=station_id, transaction=stopped,
                                request=_stop_request_of(stopped))

    # -- results of CSMS-initiated calls ---------------------------------------------------------

    @hookimpl
    def csms_on_call_completed(self, station_id, action, request, response):
        if action == "GetConfiguration":
            return self.store.record_configuration(station_id, response.get("configurationKey") or [],
                                                   response.get("unknownKey") or [])
        if action == "ChangeConfiguration" and response.get("status") in ("Accepted", "RebootRequired") \
                and request["key"] not in WRITE_ONLY_KEYS:
            return self.store.set_configuration_value(station_id, request["key"], request["value"])
        if action == "ChangeAvailability" and response.get("status") in ("Accepted", "Scheduled"):
            return self.store.set_requested_availability(station_id, request["connectorId"], request["type"])
        return None

    @hookimpl
    def csms_on_station_deleted(self, station_id):
        return self.store.delete_station(station_id)
