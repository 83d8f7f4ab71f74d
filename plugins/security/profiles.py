"""Security profiles per station: which one a connection proves, the stored floor, the TLS listener.

A connection's profile is what it proved (OCPP 1.6 Security whitepaper §2):

* **3**: TLS, and a client certificate that chains to the configured CAs (checked in the handshake) and
  names the station: subject CN = the charge point id in the URL, and O = ``organization_name`` when set;
* **2**: TLS with HTTP Basic auth, the station having a password (the Core plugin checks it);
* **1**: plain ws with Basic auth, the station having a password;
* **0**: anything else ("unsecured": plain ws, or TLS, without a password the CSMS checks).

Once a station has connected at profile N, a connection at a lower one is refused with 403 before the
WebSocket opens (TC_083); with 401 when it only left out the password that would have met N. Profile 1 is the password's: a station that has one must send it (the Core
plugin), and one whose password an operator removed is back at 0. An operator may set the floor
(``PUT /stations/{id}/security-profile``), lower too (a station replaced, its certificate lost). A
certificate that names another station, or not the configured organization, is refused with 403
whatever the floor; one that does not chain to the CAs or is expired fails the TLS handshake itself
(:mod:`.tls`).
"""
from __future__ import annotations

from datetime import datetime, timezone

from cryptography.x509.oid import NameOID
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import insert, select, update
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from csms.admission import AdmissionRefused
from csms.config import Setting
from csms.stations import stations

from .tables import station_profiles
from .tls import (DEFAULT_CIPHERS, ServerTLSContext, TLSListener, load_ca_certificates, load_server_credentials,
                  not_after)

log = Logger(namespace="csms.security.profiles")

PROFILES = (0, 1, 2, 3)
#: The annotations (the station session's ``admission``) holding a connection's profile, and the floor it
#: was admitted against.
PROFILE_ANNOTATION = "security_profile"
FLOOR_ANNOTATION = "security_profile_floor"

SETTINGS = (
    Setting("tls_endpoint", str, "",
            "Endpoint of the TLS (wss) listener for security profiles 2 and 3: a tcp: endpoint string such as "
            "tcp:9443 (the plugin adds TLS). It runs beside [ocpp] endpoint; empty: no TLS listener."),
    Setting("tls_certificate", str, "", "PEM file: the server certificate, then its intermediate CA certificates."),
    Setting("tls_private_key", str, "",
            "PEM file: the server certificate's unencrypted private key (RSA >= 2048 or EC >= 224 bits)."),
    Setting("tls_ca", str, "",
            "PEM file, or directory of .pem/.crt files: the CA certificates station certificates must chain to "
            "(security profile 3). Empty: no client certificate is asked for."),
    Setting("tls_handshake_timeout", float, 10.0,
            "Seconds a TLS connection has to complete its handshake; then it is closed (0: no limit)."),
    Setting("tls_ciphers", str, DEFAULT_CIPHERS, "TLS 1.2 cipher suites (OpenSSL names), in preference order."),
    Setting("tls13", bool, True, "Accept TLS 1.3 besides TLS 1.2."),
)


def subject_values(certificate, oid) -> list[str]:
    return [attribute.value for attribute in certificate.subject.get_attributes_for_oid(oid)]


def certificate_identity_problem(certificate, station_id: str, organization: str) -> str | None:
    """Why a client certificate does not identify ``station_id``, or None when it does."""
    common_names = subject_values(certificate, NameOID.COMMON_NAME)
    if common_names != [station_id]:
        return f"the client certificate's CN {', '.join(common_names) or '(none)'} is not the station's id"
    if organization:
        organizations = subject_values(certificate, NameOID.ORGANIZATION_NAME)
        if organizations != [organization]:
            return (f"the client certificate's O {', '.join(organizations) or '(none)'} is not the configured "
                    f"organization")
    return None


def connection_profile(tls: bool, certificate_identified: bool, has_password: bool, sent_password: bool) -> int:
    """The security profile a connection proves (see the module docstring)."""
    if tls and certificate_identified:
        return 3
    if has_password and sent_password:
        return 2 if tls else 1
    return 0



class ServerCertificateEnd:
    """``csms_security_tls_certificate_not_after_timestamp_seconds``, a prometheus_client collector.

    No sample until the TLS listener has read its chain: a plain Gauge would show 0 without a listener,
    which reads as a certificate that expired in 1970 and fires every alert on it (docs/metrics.md).
    """

    NAME = "csms_security_tls_certificate_not_after_timestamp_seconds"

    def __init__(self):
        self.value: float | None = None

    def set(self, value: float) -> None:
        self.value = value

    def describe(self):
        return []

    def collect(self):
        # Without a listener (or before it read its chain) the family has no sample, but it is there: its
        # HELP and TYPE are scraped, and a dashboard naming it is not naming a metric that does not exist.
        family = GaugeMetricFamily(self.NAME, "When the TLS listener's server certificate (or an intermediate of "
                                              "its chain) expires, as a Unix time")
        if self.value is not None:
            family.add_metric([], self.value)
        yield family

class ProfileStore:
    """Reads and writes ``security_station_profiles`` (every method returns a Deferred)."""

    def __init__(self, db, clock):
        self.db = db
        self.clock = clock

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), tz=timezone.utc)

    def admission_state(self, station_id: str):
        """(stored profile floor, whether the station has a password), in one round trip."""
        def thd(conn):
            has_password = conn.execute(select(stations.c.password_hash.is_not(None))
                                        .where(stations.c.id == station_id)).scalar()
            floor = conn.execute(select(station_profiles.c.profile)
                                 .where(station_profiles.c.station_id == station_id)).scalar()
            return floor or 0, bool(has_password)
        return self.db.run(thd, desc="security_admission_state")

    def get(self, station_ids: list[str]):
        def thd(conn):
            rows = conn.execute(select(station_profiles).where(station_profiles.c.station_id.in_(station_ids)))
            return {row.station_id: (row.profile, row.last_connection_profile) for row in rows}
        return self.db.run(thd, desc="security_profiles")

    def connected(self, station_id: str, profile: int, admitted_floor: int):
        """A station connected at ``profile``, admitted against ``admitted_floor``: the higher of the two is
        its floor from now on."""
        now = self.now()
        floor = max(profile, admitted_floor)

        def thd(conn):
            stored = conn.execute(select(station_profiles.c.profile)
                                  .where(station_profiles.c.station_id == station_id)).scalar()
            if stored is None:
                conn.execute(insert(station_profiles).values(station_id=station_id, profile=floor,
                                                             last_connection_profile=profile, updated_at=now))
            else:
                conn.execute(update(station_profiles).where(station_profiles.c.station_id == station_id)
                             .values(profile=floor, last_connection_profile=profile, updated_at=now))
            return floor
        return self.db.run(thd, desc="security_profile_connected")

    def set_floor(self, station_id: str, profile: int):
        now = self.now()

        def thd(conn):
            changed = conn.execute(update(station_profiles).where(station_profiles.c.station_id == station_id)
                                   .values(profile=profile, updated_at=now)).rowcount
            if not changed:
                conn.execute(insert(station_profiles).values(station_id=station_id, profile=profile,
                                                             last_connection_profile=None, updated_at=now))
        return self.db.run(thd, desc="security_profile_set")

    def delete(self, station_id: str):
        def thd(conn):
            conn.execute(station_profiles.delete().where(station_profiles.c.station_id == station_id))
        return self.db.run(thd, desc="security_profile_delete")


class SecurityProfiles:
    """The profiles part of the security plugin: admission, the stored floor, the TLS listener's settings."""

    def __init__(self, app, settings):
        self.app = app
        self.store = ProfileStore(app.db, app.clock)
        self.tls_endpoint = settings["tls_endpoint"]
        self.tls_certificate = settings["tls_certificate"]
        self.tls_private_key = settings["tls_private_key"]
        self.tls_ca = settings["tls_ca"]
        self.organization = settings["organization_name"]
        self.tls_handshake_timeout = settings["tls_handshake_timeout"]
        self.tls_ciphers = settings["tls_ciphers"]
        self.tls13 = settings["tls13"]
        #: Connections that never finished their TLS handshake, as the listener counts them (its outcome, and
        #: for ``tls_failed`` the kind; docs/metrics.md).
        self.tls_failures_metric = app.metrics.counter(
            "csms_security_tls_handshakes_failed", "TLS connections closed before their handshake finished, by "
            "outcome (tls_failed, handshake_timeout, handshake_abandoned) and kind of TLS failure",
            ("outcome", "kind"))
        #: When the server certificate chain the listener serves ends (a Unix time), for alerts before it does.
        self.tls_certificate_end_metric = ServerCertificateEnd()
        app.metrics.registry.register(self.tls_certificate_end_metric)
        #: The running TLS listener (a :class:`.tls.TLSListener`) and its port, once started.
        self.listener: TLSListener | None = None
        self.port = None

    @property
    def client_certificates(self) -> bool:
        """Whether stations can connect at profile 3 here (a TLS listener with CAs to check against)."""
        return bool(self.tls_endpoint and self.tls_ca)

    # -- admission ----------------------------------------------------------------------------

    def admit(self, request):
        """``csms_admit_station``: refuse a certificate naming someone else, or a profile below the floor.

        Leaves the admission itself to the others (answers None). A certificate that identifies the
        station is marked on the request at once (``authenticated_by``), before the Core plugin's check
        reads it: such a station needs no password.
        """
        # Only this plugin's listener checks a certificate's chain: without CAs configured none is asked
        # for, and one that came some other way identifies nobody.
        certificate = request.certificate if request.tls and self.client_certificates else None
        identified = False
        if certificate is not None:
            problem = certificate_identity_problem(certificate, request.station_id, self.organization)
            if problem is not None:
                raise AdmissionRefused(403, "Forbidden: the client certificate does not identify this station",
                                       problem)
            identified = True
            request.authenticated_by = "client certificate"
        return self.store.admission_state(request.station_id).addCallback(
            self._check_floor, request, identified)

    def _check_floor(self, state, request, identified: bool):
        floor, has_password = state
        if floor == 1 and not has_password:
            floor = 0  # profile 1 is the password's: an operator who removed it took the station back to 0
        sent_password = request.password is not None
        profile = connection_profile(request.tls, identified, has_password, sent_password)
        if profile < floor:
            if has_password and not sent_password and \
                    connection_profile(request.tls, identified, True, True) >= floor:
                # Its password is what it lacks: 401, as the Core plugin answers a station without one.
                raise AdmissionRefused(401, "Unauthorized",
                                       f"no password sent (the station's security profile {floor} requires it)")
            raise AdmissionRefused(403, f"Forbidden: security profile {floor} is required",
                                   f"security profile {profile}, below the station's profile {floor}")
        request.annotations[PROFILE_ANNOTATION] = profile
        request.annotations[FLOOR_ANNOTATION] = floor
        return None

    def on_connected(self, station_id: str, station):
        admission = station.admission or {}
        profile = admission.get(PROFILE_ANNOTATION)
        if profile is None:
            return None
        return self.store.connected(station_id, profile, admission.get(FLOOR_ANNOTATION, 0))

    @defer.inlineCallbacks
    def details(self, station_ids):
        stored = yield self.store.get(list(station_ids))
        out = {}
        for station_id in station_ids:
            floor, last = stored.get(station_id, (0, None))
            session = self.app.sessions.get(station_id)
            if session is not None:
                last = (session.admission or {}).get(PROFILE_ANNOTATION, last)
            out[station_id] = {"security_profile": floor, "connection_security_profile": last}
        return out

    # -- the TLS listener ---------------------------------------------------------------------

    def services(self) -> list:
        return [TLSListenerService(self)] if self.tls_endpoint else []

    def build_listener(self) -> TLSListener:
        """The TLS listener for the current settings; StartupError (one line) when they cannot be used."""
        from csms.service import StartupError

        if self.tls_endpoint.split(":", 1)[0].lower() == "ssl":
            raise StartupError("[plugin:security] tls_endpoint: give a tcp: endpoint; the plugin adds TLS itself")
        chain, key = load_server_credentials(self.tls_certificate, self.tls_private_key, now=self.app.now())
        self.tls_certificate_end_metric.set(not_after(chain).timestamp())
        cas = load_ca_certificates(self.tls_ca) if self.tls_ca else []
        context = ServerTLSContext(chain, key, cas, ciphers=self.tls_ciphers, tls13=self.tls13)
        factory = getattr(self.app, "ocpp_factory", None)
        if factory is None:
            raise StartupError("[plugin:security] tls_endpoint: this Central System has no OCPP WebSocket factory "
                               "to serve over TLS")
        return TLSListener(context, factory, self.app.clock, self.tls_handshake_timeout, self.tls_failures_metric)


class TLSListenerService(service.Service):
    """Listens on ``tls_endpoint`` with the OCPP WebSocket factory the plain listener uses."""

    name = "security-tls-listener"

    def __init__(self, profiles: SecurityProfiles):
        self.profiles = profiles

    def startService(self):
        super().startService()
        from csms.service import listen

        try:
            listener = self.profiles.build_listener()
        except Exception as exc:  # noqa: BLE001 - StartupError, or a context OpenSSL refused
            return defer.fail(exc)
        self.profiles.listener = listener

        def listening(port):
            self.profiles.port = port
            log.info("OCPP 1.6J TLS endpoint listening on {where} (security profiles 2{three})",
                     where=port.getHost(), three=" and 3" if listener.requests_client_certificates else " only")
            return port
        return listen(self.profiles.app.reactor, self.profiles.tls_endpoint, listener,
                      "[plugin:security] tls_endpoint").addCallback(listening)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        port, self.profiles.port = self.profiles.port, None
        if self.profiles.listener is not None:
            self.profiles.listener.stop()
        if port is not None:
            yield port.stopListening()
