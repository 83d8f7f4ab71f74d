"""The Smart Charging profile (OCPP 1.6 §3.13, §5.5, §5.7, §5.15).

The plugin checks every charging profile before it is sent (``csms_before_call``, so the generic
call endpoint and the Python API are checked too), keeps the CSMS's own record of what each station
holds from the station's answers (``csms_on_call_completed``) and from transaction events, and
computes the composite schedule a station should apply (:mod:`.composite`).
"""
from __future__ import annotations

import os

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from csms import ocpp16
from csms.app import CallRefused
from csms.config import ConfigError, Setting
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin

from . import composite
from .store import INSTALLED_TOPIC, SmartChargingStore
from .tables import metadata
from .validation import ProfileInvalid, check_remote_start_profile, check_set_charging_profile

log = Logger(namespace="csms.smartcharging")


#: SetChargingProfile.conf's statuses (OCPP 1.6 §7.13), the label values of csms_smartcharging_profiles_sent_total.
PROFILE_STATUSES = ("Accepted", "Rejected", "NotSupported")


def refusal(exc: ProfileInvalid, action: str) -> CallRefused:
    return CallRefused(f"Invalid {action}: {exc}", "invalid_charging_profile", {"problems": exc.problems})


class _KnownProfiles(service.Service):
    """Reads, once the database is ready, which stations have installed profiles."""

    name = "smartcharging-known-profiles"

    def __init__(self, store):
        self.store = store

    def startService(self):
        super().startService()
        self.store.load_stations_with_profiles().addErrback(
            lambda failure: log.failure("Reading the stations with charging profiles failed", failure))


@implementer(ICSMSPlugin)
class SmartChargingPlugin:
    name = "smartcharging"
    #: Its Alembic migration history (docs/migrations.md).
    migrations = os.path.join(os.path.dirname(__file__), "migrations")
    profile = ocpp16.SMART_CHARGING
    inbound_actions = ocpp16.inbound_of(ocpp16.SMART_CHARGING)
    outbound_actions = ocpp16.outbound_of(ocpp16.SMART_CHARGING)
    settings = (
        Setting("voltage", float, composite.DEFAULT_VOLTAGE,
                "Mains voltage (phase to neutral, V) for converting charging limits between A and W."),
        Setting("default_rate_unit", str, "A", "Unit of the composite schedule preview when the request names "
                                               "none.", choices=("A", "W")),
        Setting("compare_tolerance", float, composite.DEFAULT_TOLERANCE,
                "Two limits closer than this count as equal when a station's composite schedule is compared "
                "with the CSMS's own."),
    )

    app = None
    store: SmartChargingStore | None = None

    @hookimpl
    def csms_configure(self, app):
        settings = app.config.plugin(self.name)
        self.app = app
        self.voltage = settings["voltage"]
        self.tolerance = settings["compare_tolerance"]
        self.default_rate_unit = settings["default_rate_unit"]
        if self.voltage <= 0:
            raise ConfigError("[plugin:smartcharging] voltage must be positive")
        self.profiles_sent = app.metrics.counter(
            "csms_smartcharging_profiles_sent", "Charging profiles sent to stations (SetChargingProfile), by the "
            "status they answered: Accepted (installed), Rejected, NotSupported", ("status",))
        app.outbox.register("charging_profile.changed", "A charging profile the station answered was recorded "
                            "(`change` sent: installed or rejected, see `state`), or profiles were cleared "
                            "(`change` cleared).",
                            {"station_id": "CP-1", "change": "sent", "connector_id": 1, "charging_profile_id": 5,
                             "purpose": "TxDefaultProfile", "stack_level": 0, "state": "installed",
                             "station_status": "Accepted", "profile": {"chargingProfileId": 5}}, owner=self.name)
        self.store = SmartChargingStore(app.db, app.clock, app.outbox, app.cluster)
        app.cluster.subscribe(INSTALLED_TOPIC, self.store.installed_elsewhere)

    @hookimpl
    def csms_tables(self):
        return metadata

    @hookimpl
    def csms_services(self, app):
        return [_KnownProfiles(self.store)]

    @hookimpl
    def csms_api_routes(self, app, router):
        from .api import add_routes
        add_routes(self, app, router)

    # -- checks before sending -----------------------------------------------------------------

    def active_transactions(self, station_id: str):
        return self.app.lookup("csms_active_transactions", default=[], station_id=station_id)

    def station_configuration(self, station_id: str):
        return self.app.lookup("csms_station_configuration", default={}, station_id=station_id)

    @hookimpl
    def csms_before_call(self, station_id, action, payload):
        if action == "SetChargingProfile":
            return self._check_set(station_id, payload)
        if action == "RemoteStartTransaction" and payload.get("chargingProfile") is not None:
            return self._check_remote_start(station_id, payload)
        return None

    @defer.inlineCallbacks
    def _check_set(self, station_id, payload):
        transactions = yield self.active_transactions(station_id)
        configuration = yield self.station_configuration(station_id)
        try:
            check_set_charging_profile(payload, transactions or [], configuration)
        except ProfileInvalid as exc:
            raise refusal(exc, "SetChargingProfile") from None

    @defer.inlineCallbacks
    def _check_remote_start(self, station_id, payload):
        configuration = yield self.station_configuration(station_id)
        try:
            check_remote_start_profile(payload, configuration)
        except ProfileInvalid as exc:
            raise refusal(exc, "RemoteStartTransaction") from None

    # -- the CSMS's record, from the station's answers -------------------------------------------

    @hookimpl
    def csms_on_call_completed(self, station_id, action, request, response):
        if action == "SetChargingProfile":
            return self._record_set(station_id, request, response)
        if action == "ClearChargingProfile" and response.get("status") == "Accepted":
            return self.store.clear(station_id, request, self.app.now())
        if action == "RemoteStartTransaction" and request.get("chargingProfile") is not None:
            return self.store.record_sent(station_id, request.get("connectorId"), request["chargingProfile"],
                                          "RemoteStartTransaction", response.get("status"), None, self.app.now())
        return None

    @defer.inlineCallbacks
    def _record_set(self, station_id, request, response):
        profile = request["csChargingProfiles"]
        connector_id = request["connectorId"]
        transaction_id = profile.get("transactionId")
        if profile["chargingProfilePurpose"] == "TxProfile" and transaction_id is None:
            # OCPP 1.6 §7.7: without transactionId a TxProfile applies to the connector's running transaction.
            running = [t for t in ((yield self.active_transactions(station_id)) or [])
                       if t["connector_id"] == connector_id]
            transaction_id = running[0]["transaction_id"] if running else None
        row = yield self.store.record_sent(station_id, connector_id, profile, "SetChargingProfile",
                                           response.get("status"), transaction_id, self.app.now())
        status = response.get("status")
        self.profiles_sent.labels(status if status in PROFILE_STATUSES else "other").inc()
        log.info("{station} answered {status} to charging profile {id} ({purpose}, connector {connector})",
                 station=station_id, status=response.get("status"), id=profile["chargingProfileId"],
                 purpose=profile["chargingProfilePurpose"], connector=connector_id)
        return row

    @hookimpl
    def csms_on_transaction_started(self, station_id, transaction, request):
        if not self.store.may_have_profiles(station_id):
            return None  # nothing installed at this station: no TxProfile to bind
        return self.store.bind_transaction(station_id, transaction["connector_id"], transaction["transaction_id"],
                                           self.app.now())

    @hookimpl
    def csms_on_transaction_stopped(self, station_id, transaction, request):
        if not self.store.may_have_profiles(station_id):
            return None
        return self.store.end_transaction(station_id, transaction["transaction_id"], self.app.now())

    @hookimpl
    def csms_on_presence_changed(self, station_id, node, previous_node):
        # On one node every profile was recorded here; in a cluster the station's new node re-reads.
        if not self.app.cluster.enabled or node != self.app.cluster.node:
            return None
        return self.store.refresh(station_id).addErrback(
            lambda failure: log.failure("Re-reading the charging profiles of {station} failed", failure,
                                        station=station_id))

    @hookimpl
    def csms_on_station_deleted(self, station_id):
        return self.store.delete_station(station_id)

    # -- the composite schedule ----------------------------------------------------------------

    @defer.inlineCallbacks
    def composite(self, station_id: str, connector_id: int, start, duration: int, unit: str | None = None):
        """Fires with the :class:`composite.CompositeSchedule` the CSMS expects the station to apply
        on ``connector_id`` over [start, start + duration), from the profiles it has recorded."""
        rows = yield self.store.installed(station_id)
        transactions = yield self.active_transactions(station_id)
        transaction_start = None
        for transaction in transactions or []:
            if transaction["connector_id"] == connector_id:
                transaction_start = transaction["started_at"]
        entries = [{"connector_id": row["connector_id"], "profile": row["profile"]}
                   for row in rows if row["connector_id"] is not None
                   and not (row["purpose"] == "TxProfile" and row["transaction_id"] is None)]
        return composite.compute(entries, connector_id, start, duration, unit or self.default_rate_unit,
                                 self.voltage, transaction_start)
