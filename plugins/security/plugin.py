"""The security plugin: which actions it owns, its settings, and the hooks that tie its parts together.

Each part lives in its own module (profiles and TLS, certificates, security events, signed firmware
and logs); this class only wires them to the framework.
"""
from __future__ import annotations

from zope.interface import implementer

from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin

from . import profiles
from .tables import metadata

#: CP->CS actions of the security extension (their schemas ship with the `ocpp` package).
INBOUND = ("LogStatusNotification", "SecurityEventNotification", "SignCertificate",
           "SignedFirmwareStatusNotification")
#: CS->CP actions of the security extension.
OUTBOUND = ("CertificateSigned", "DeleteCertificate", "ExtendedTriggerMessage", "GetInstalledCertificateIds",
            "GetLog", "InstallCertificate", "SignedUpdateFirmware")


@implementer(ICSMSPlugin)
class SecurityPlugin:
    name = "security"
    profile = None
    inbound_actions = INBOUND
    outbound_actions = OUTBOUND
    settings = (*profiles.SETTINGS,)

    app = None
    #: action -> callable(station, payload) returning (a Deferred of) the answer; each part adds its own.
    handlers: dict

    #: Security profiles and the TLS listener (:mod:`.profiles`).
    profiles: profiles.SecurityProfiles

    @hookimpl
    def csms_configure(self, app):
        self.app = app
        self.handlers = {}
        self.profiles = profiles.SecurityProfiles(app, app.config.plugin(self.name))

    @hookimpl
    def csms_handle_call(self, station, action, payload):
        handler = self.handlers.get(action)
        return None if handler is None else handler(station, payload)

    @hookimpl
    def csms_tables(self):
        return metadata

    @hookimpl
    def csms_services(self, app):
        return self.profiles.services()

    @hookimpl
    def csms_admit_station(self, request):
        return self.profiles.admit(request)

    @hookimpl
    def csms_on_station_connected(self, station_id, station):
        return self.profiles.on_connected(station_id, station)

    @hookimpl
    def csms_station_details(self, station_ids):
        return self.profiles.details(station_ids)

    @hookimpl
    def csms_api_routes(self, app, router):
        from .api_profiles import add_routes
        add_routes(self.profiles, app, router)

    @hookimpl
    def csms_on_station_deleted(self, station_id):
        return self.profiles.store.delete(station_id)
