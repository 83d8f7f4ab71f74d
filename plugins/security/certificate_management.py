"""Certificate management and security events, wired together for the security plugin.

The plugin (plugin.py) creates one :class:`CertificateManagement` in ``csms_configure`` and hands it
the events it needs; everything else lives in the modules named below.
"""
from __future__ import annotations

import os
from datetime import timedelta

from twisted.application import service
from twisted.internet import defer

from csms.config import ConfigError, Setting

from .ca import CertificateAuthority, check_validity, load_or_create
from .events import SecurityEvents
from .expiry import CertificateExpiry, CertificateExpiryService
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
    Setting("certificate_expiry_warning_days", int, 30,
            "A warning is logged once a day while stations' current certificates expire within this many days "
            "(or have expired); csms_security_station_certificates_expiring counts them. 0: no warning."),
    Setting("external_ca", bool, False,
            "Store CSRs for an external CA instead of signing them: the operator posts the signed chain "
            "through the API."),
)
DIRECTORY_SETTINGS = ("ca_dir",)
MAX_VALIDITY_DAYS = 3650


class CertificateManagement:
    """The CSMS CA, certificate signing requests, the installed-certificate inventory, security events.

    The CA is loaded (or generated) when the Central System starts serving (:class:`CAService`), or at its
    first use without one, never when the plugin is configured: ``csms-admin`` builds the Central System
    to read the plugins' migration histories, and a migration command must not create a CA."""

    def __init__(self, app, settings):
        validity_days = settings["certificate_validity_days"]
        if not 1 <= validity_days <= MAX_VALIDITY_DAYS:
            raise ConfigError(f"[plugin:security] certificate_validity_days must be between 1 and {MAX_VALIDITY_DAYS}")
        warning_days = settings["certificate_expiry_warning_days"]
        if not 0 <= warning_days <= MAX_VALIDITY_DAYS:
            raise ConfigError(f"[plugin:security] certificate_expiry_warning_days must be between 0 and "
                              f"{MAX_VALIDITY_DAYS}")
        organization = settings["organization_name"]
        self.app = app
        self._ca_settings = (os.path.abspath(settings["ca_dir"]), settings["ca_certificate_file"],
                             settings["ca_key_file"], organization)
        self._ca: CertificateAuthority | None = None
        #: When the CA certificate ends (a Unix time), set once it is loaded: alert well before it does.
        self.ca_end_metric = app.metrics.gauge(
            "csms_security_ca_certificate_not_after_timestamp_seconds", "When the CSMS CA certificate (the one "
            "that signs station certificates) expires, as a Unix time")
        self.events = SecurityEvents(app)
        self.inventory = Inventory(app)
        self.requests = CertificateRequests(app, lambda: self.ca, self.events, organization,
                                            timedelta(days=validity_days), settings["external_ca"])
        self.expiry = CertificateExpiry(app, self.requests, warning_days)

    @property
    def ca(self) -> CertificateAuthority:
        """The CSMS CA, loaded (or generated) on first use if :class:`CAService` has not loaded it yet."""
        if self._ca is None:
            self.load_ca()
        return self._ca

    def load_ca(self) -> CertificateAuthority:
        """Load the CA (generate it in ``ca_dir`` on first start) and check its dates; ConfigError, in one
        line, for a CA that cannot be used (unreadable, not a CA, expired, not yet valid)."""
        ca_dir, certificate_file, key_file, organization = self._ca_settings
        now = self.app.now()
        ca = load_or_create(ca_dir, certificate_file, key_file, organization, now)
        check_validity(ca, now)
        self.ca_end_metric.set(ca.certificate.not_valid_after_utc.timestamp())
        self._ca = ca
        return ca

    def services(self) -> list:
        return [CAService(self), CertificateExpiryService(self.expiry)]

    def register(self, handlers: dict) -> None:
        handlers["SignCertificate"] = self.requests.handle_sign_certificate
        handlers["SecurityEventNotification"] = self.events.handle_notification

    def call_completed(self, station_id, action, request, response):
        if action == "CertificateSigned":
            # A certificate the station accepted is its current one: the expiry metrics follow at once.
            return self.requests.call_completed(station_id, request, response).addCallback(
                lambda _: self.expiry.refresh())
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
        return defer.gatherResults([self.requests.delete_station(station_id), self.inventory.delete_station(station_id),
                                    self.events.delete_station(station_id)], consumeErrors=True).addCallback(
            lambda _: self.expiry.refresh())

    def station_details(self, station_ids) -> defer.Deferred:
        """``station_certificate`` of each station view: its current certificate, or None."""
        def details(current):
            return {station_id: {"station_certificate": current.get(station_id)} for station_id in station_ids}
        return self.requests.current_of(list(station_ids)).addCallback(details)

    def add_routes(self, app, router):
        from .api_certificates import add_routes
        add_routes(self, app, router)


class CAService(service.Service):
    """Loads (or generates) the CSMS CA as the Central System starts: before the TLS listener, whose
    ``tls_ca`` may name the generated certificate. A CA that cannot be used fails start-up with its line."""

    name = "security-ca"

    def __init__(self, certificates: CertificateManagement):
        self.certificates = certificates

    def startService(self):
        super().startService()
        from csms.service import StartupError

        try:
            self.certificates.load_ca()
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
