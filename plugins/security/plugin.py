"""The security plugin: which actions it owns, its settings, and the hooks that tie its parts together.

Each part lives in its own module (profiles and TLS, certificates, security events, signed firmware
and logs); this class only wires them to the framework.
"""
from __future__ import annotations

from zope.interface import implementer

from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin

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
    profile = None
    inbound_actions = INBOUND
    outbound_actions = OUTBOUND
    settings = ()

    app = None
    #: action -> callable(station, payload) returning (a Deferred of) the answer; each part adds its own.
    handlers: dict

    @hookimpl
    def csms_configure(self, app):
        self.app = app
        self.handlers = {}
        self.transfers = Transfers(app)
        self.transfers.install(self.handlers)

    @hookimpl
    def csms_handle_call(self, station, action, payload):
        handler = self.handlers.get(action)
        return None if handler is None else handler(station, payload)

    @hookimpl
    def csms_tables(self):
        return metadata

    # -- signed firmware and logs (transfers.py) ---------------------------------------------------------

    @hookimpl
    def csms_on_call_sending(self, station_id, action, request):
        return self.transfers.call_sending(station_id, action, request)

    @hookimpl
    def csms_on_call_completed(self, station_id, action, request, response):
        return self.transfers.call_completed(station_id, action, request, response)

    @hookimpl
    def csms_on_call_failed(self, station_id, action, request, error):
        return self.transfers.call_failed(station_id, action, request, error)

    @hookimpl
    def csms_api_routes(self, app, router):
        from .api_transfers import add_routes
        add_routes(self.transfers, app, router)

    @hookimpl
    def csms_on_station_deleted(self, station_id):
        return self.transfers.store.delete_station(station_id)
