"""Certificate management and security events, wired together for the security plugin.

The plugin (plugin.py) creates one :class:`CertificateManagement` in ``csms_configure`` and hands it
the events it needs; everything else lives in the modules named below.
"""
from __future__ import annotations

import os
from datetime import timedelta

from csms.config import ConfigError, Setting

from .ca import load_or_create
from .events import SecurityEvents
from .inventory import Inventory
from .signing import CertificateRequests

SETTINGS = (
    Setting("ca_dir", str, "var/security/ca",
            "Directory of the CA the CSMS generates on first start (mode 0700; key 0600) when "
            "ca_certificate_file and ca_key_file are empty. Its csms-ca.pem is the trust anchor of charge "
            "point certificates."),
    Setting("ca_certificate_file", str, "", "The operator's own CA certificate (PEM); with ca_key_file."),
    Setting("ca_key_file", str, "", "The unencrypted PEM private key of ca_certificate_file."),
    Setting("organization_name", str, "",
            "The organization (O) a station's CSR must name, as the station's CpoName; empty: not checked."),
    Setting("certificate_validity_days", int, 365, "Days a charge point certificate the CSMS signs is valid."),
    Setting("external_ca", bool, False,
            "Store CSRs for an external CA instead of signing them: the operator posts the signed chain "
            "through the API."),
)
DIRECTORY_SETTINGS = ("ca_dir",)
MAX_VALIDITY_DAYS = 3650


class CertificateManagement:
    """The CSMS CA, certificate signing requests, the installed-certificate inventory, security events."""

    def __init__(self, app, settings):
        validity_days = settings["certificate_validity_days"]
        if not 1 <= validity_days <= MAX_VALIDITY_DAYS:
            raise ConfigError(f"[plugin:security] certificate_validity_days must be between 1 and {MAX_VALIDITY_DAYS}")
        organization = settings["organization_name"]
        self.app = app
        self.ca = load_or_create(os.path.abspath(settings["ca_dir"]), settings["ca_certificate_file"],
                                 settings["ca_key_file"], organization, app.now())
        self.events = SecurityEvents(app)
        self.inventory = Inventory(app)
        self.requests = CertificateRequests(app, self.ca, self.events, organization,
                                            timedelta(days=validity_days), settings["external_ca"])

    def register(self, handlers: dict) -> None:
        handlers["SignCertificate"] = self.requests.handle_sign_certificate
        handlers["SecurityEventNotification"] = self.events.handle_notification

    def call_completed(self, station_id, action, request, response):
        if action == "CertificateSigned":
            return self.requests.call_completed(station_id, request, response)
        if response.get("status") != "Accepted" and action != "GetInstalledCertificateIds":
            return None
        if action == "InstallCertificate":
            return self.inventory.installed(station_id, request["certificateType"], request["certificate"])
        if action == "DeleteCertificate":
            return self.inventory.deleted(station_id, request["certificateHashData"])
        if action == "GetInstalledCertificateIds" and response["status"] in ("Accepted", "NotFound"):
            return self.inventory.reported(station_id, request["certificateType"],
                                           response.get("certificateHashData") or [])
        return None

    def call_failed(self, station_id, action, request, error):
        if action == "CertificateSigned":
            return self.requests.call_failed(station_id, request, error)
        return None

    def station_deleted(self, station_id):
        from twisted.internet import defer

        return defer.gatherResults([self.requests.delete_station(station_id), self.inventory.delete_station(station_id),
                                    self.events.delete_station(station_id)], consumeErrors=True)

    def add_routes(self, app, router):
        from .api_certificates import add_routes
        add_routes(self, app, router)
