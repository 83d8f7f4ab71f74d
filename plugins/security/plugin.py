"""The security plugin: which actions it owns, its settings, and the hooks that tie its parts together.

Each part lives in its own module (profiles and TLS, certificates, security events, signed firmware
and logs); this class only wires them to the framework.
"""
from __future__ import annotations

import os

from twisted.internet import defer
from zope.interface import implementer

from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin

from .certificate_management import DIRECTORY_SETTINGS as CERTIFICATE_DIRECTORIES
from .certificate_management import SETTINGS as CERTIFICATE_SETTINGS
from .certificate_management import CertificateManagement
from . import profiles
from .events import register_event_types
from .tables import metadata
from .transfers import Transfers

#: CP->CS actions of the security extension (their schemas ship with the `ocpp` package).
INBOUND = ("LogStatusNotification", "SecurityEventNotification", "SignCertificate",
           "SignedFirmwareStatusNotification")
#: CS->CP actions of the security extension.
OUTBOUND = ("CertificateSigned", "DeleteCertificate", "ExtendedTriggerMessage", "GetInstalledCertificateIds",
            "GetLog", "InstallCertificate", "SignedUpdateFirmware")


@implementer(ICSMSPlugin)
class SecurityPlugin:
    name = "security"
    #: Its Alembic migration history (docs/migrations.md).
    migrations = os.path.join(os.path.dirname(__file__), "migrations")
    profile = None
    inbound_actions = INBOUND
    outbound_actions = OUTBOUND
    settings = (*profiles.SETTINGS, *CERTIFICATE_SETTINGS)
    #: The test fixtures point these at a fresh directory under the test's tmp_path.
    directory_settings = (*CERTIFICATE_DIRECTORIES,)

    app = None
    #: action -> callable(station, payload) returning (a Deferred of) the answer; each part adds its own.
    handlers: dict
    #: The CSMS CA, CSRs, installed certificates and security events (certificate_management.py).
    certificates: CertificateManagement | None = None

    #: Security profiles and the TLS listener (:mod:`.profiles`).
    profiles: profiles.SecurityProfiles

    @hookimpl
    def csms_configure(self, app):
        self.app = app
        self.handlers = {}
        register_event_types(app.outbox, self.name)
        self.certificates = CertificateManagement(app, app.config.plugin(self.name))
        self.certificates.register(self.handlers)
        self.transfers = Transfers(app)
        self.transfers.install(self.handlers)
        self.profiles = profiles.SecurityProfiles(app, app.config.plugin(self.name))

    @hookimpl
    def csms_handle_call(self, station, action, payload):
        handler = self.handlers.get(action)
        return None if handler is None else handler(station, payload)

    @hookimpl
    def csms_tables(self):
        return metadata

    @hookimpl
    def csms_retention(self, app):
        # Imported here: one hunk beside csms_tables, for easy merges with the handlers' changes.
        from csms.retention import Retention

        from .tables import security_events

        return [Retention("security_events", security_events, "received_at",
                          "Days security events (the stations' SecurityEventNotifications and the Central System's own "
                          "findings) are kept, counted from when the Central System received them.")]

    @hookimpl
    def csms_services(self, app):
        # The CA first: the TLS listener's tls_ca may name the certificate it generates.
        return self.certificates.services() + self.profiles.services()

    @hookimpl
    def csms_admit_station(self, request):
        return self.profiles.admit(request)

    @hookimpl
    def csms_on_station_connected(self, station_id, station):
        return self.profiles.on_connected(station_id, station)

    @hookimpl
    def csms_station_details(self, station_ids):
        def merged(results):
            profiles, certificates = results
            return {station_id: {**profiles.get(station_id, {}), **certificates.get(station_id, {})}
                    for station_id in station_ids}
        return defer.gatherResults([defer.maybeDeferred(self.profiles.details, station_ids),
                                    self.certificates.station_details(station_ids)],
                                   consumeErrors=True).addCallback(merged)

    @hookimpl
    def csms_api_routes(self, app, router):
        from .api_profiles import add_routes as add_profile_routes
        from .api_transfers import add_routes as add_transfer_routes
        add_profile_routes(self.profiles, app, router)
        self.certificates.add_routes(app, router)
        add_transfer_routes(self.transfers, app, router)

    @hookimpl
    def csms_on_call_sending(self, station_id, action, request):
        return self.transfers.call_sending(station_id, action, request)

    @hookimpl
    def csms_on_call_completed(self, station_id, action, request, response):
        return _together(self.certificates.call_completed(station_id, action, request, response),
                         self.transfers.call_completed(station_id, action, request, response))

    @hookimpl
    def csms_on_call_failed(self, station_id, action, request, error):
        return _together(self.certificates.call_failed(station_id, action, request, error),
                         self.transfers.call_failed(station_id, action, request, error))

    @hookimpl
    def csms_on_station_deleted(self, station_id):
        return _together(self.profiles.store.delete(station_id), self.certificates.station_deleted(station_id),
                         self.transfers.store.delete_station(station_id))


def _together(*results):
    """One Deferred for what several parts answered an event with (None when none had work to do)."""
    waiting = [result for result in results if result is not None]
    if not waiting:
        return None
    return defer.gatherResults([result if isinstance(result, defer.Deferred) else defer.succeed(result)
                                for result in waiting], consumeErrors=True)
