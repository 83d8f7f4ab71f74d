"""The security plugin: which actions it owns, its settings, and the hooks that tie its parts together.

Each part lives in its own module (profiles and TLS, certificates, security events, signed firmware
and logs); this class only wires them to the framework.
"""
from __future__ import annotations

import os

from zope.interface import implementer

from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin

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
    #: Its Alembic migration history (docs/migrations.md).
    migrations = os.path.join(os.path.dirname(__file__), "migrations")
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

    @hookimpl
    def csms_handle_call(self, station, action, payload):
        handler = self.handlers.get(action)
        return None if handler is None else handler(station, payload)

    @hookimpl
    def csms_tables(self):
        return metadata
