"""Station certificate expiry: metrics an alert can use, and a daily warning (docs/security.md, "Station
certificate expiry").

At security profile 3 a station whose certificate has expired fails the TLS handshake: it is locked out
until someone renews its certificate over another connection, or on site. Each station's current
certificate is the one of its newest accepted certificate request (:mod:`.signing` stores the serial and
validity of every chain it sends). This part reads them from the database on the app's clock, once an
hour and after each certificate a station accepts, and keeps what it found for the metrics (no label: one
value for every station together) and, once a day, a warning line naming the first stations concerned.
"""
from __future__ import annotations

from datetime import timedelta

from prometheus_client.core import GaugeMetricFamily
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

log = Logger(namespace="csms.security")

#: Seconds between two readings of the stations' certificates (the counts move with time, not only with
#: new certificates).
REFRESH_INTERVAL = 3600.0
#: The warning about certificates ending soon is logged at most this often.
WARNING_INTERVAL = timedelta(days=1)
#: Stations named in the warning line; it says how many more there are.
NAMED = 10


def _utc_text(moment) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class CertificateExpiry:
    """Reads the stations' current certificates' ends; a prometheus_client collector of what it last read."""

    def __init__(self, app, requests, warning_days: int):
        self.app = app
        self.requests = requests
        self.warning = timedelta(days=warning_days)
        #: The last reading (:meth:`.signing.CertificateRequests.expiry_summary`), None before the first.
        self.summary: dict | None = None
        self._last_warning = None
        self._reading: defer.Deferred | None = None
        self._again = False
        app.metrics.registry.register(self)

    # -- prometheus_client collector -------------------------------------------------------------------

    def describe(self):
        return []

    def collect(self):
        # Each family is there from the start (its HELP and TYPE scraped, a dashboard naming it names a
        # metric that exists); a sample only once read, and none for the earliest end without a
        # certificate: 0 would read as long expired.
        summary = self.summary or {}
        earliest = GaugeMetricFamily(
            "csms_security_station_certificate_earliest_not_after_timestamp_seconds",
            "When the first of the stations' current certificates (signed through the CSMS and accepted) "
            "expires, as a Unix time")
        if summary.get("earliest") is not None:
            earliest.add_metric([], summary["earliest"].timestamp())
        yield earliest
        expired = GaugeMetricFamily("csms_security_station_certificates_expired",
                                    "Stations whose current certificate has expired")
        expiring = GaugeMetricFamily("csms_security_station_certificates_expiring",
                                     "Stations whose current certificate expires within [plugin:security] "
                                     "certificate_expiry_warning_days")
        if summary:
            expired.add_metric([], summary["expired"])
            expiring.add_metric([], summary["soon"])
        yield expired
        yield expiring

    # -- reading ---------------------------------------------------------------------------------------

    def refresh(self) -> defer.Deferred:
        """Read the certificates again (once more after the reading under way, if one is); fires when done.
        Failures are logged, never raised: the next reading tries again."""
        if self._reading is not None:
            self._again = True
            return self._reading
        now = self.app.now()
        d = self.requests.expiry_summary(now, now + self.warning, NAMED)
        self._reading = d

        def read(summary):
            self.summary = summary
            self._warn(summary, now)

        def done(_):
            self._reading = None
            if self._again:
                self._again = False
                return self.refresh()
        d.addCallback(read)
        d.addErrback(lambda failure: log.failure("Reading the station certificates' expiry failed", failure))
        return d.addBoth(done)

    def _warn(self, summary: dict, now) -> None:
        if not self.warning or not summary["first"]:
            return
        if self._last_warning is not None and now - self._last_warning < WARNING_INTERVAL:
            return
        self._last_warning = now
        named = ", ".join(f"{station_id} ({_utc_text(end)})" for station_id, end in summary["first"])
        total = summary["expired"] + summary["soon"]
        more = f" and {total - len(summary['first'])} more" if total > len(summary["first"]) else ""
        log.warn("Station certificates: {expired} expired, {soon} expiring within {days} days (at security profile "
                 "3 such a station cannot connect; renew with ExtendedTriggerMessage(SignChargePointCertificate)): "
                 "{named}{more}", expired=summary["expired"], soon=summary["soon"], days=self.warning.days,
                 named=named, more=more)


class CertificateExpiryService(service.Service):
    """Reads the station certificates' expiry at start, then every :data:`REFRESH_INTERVAL` on the app's clock."""

    name = "security-certificate-expiry"

    def __init__(self, expiry: CertificateExpiry):
        self.expiry = expiry
        self._loop: task.LoopingCall | None = None

    def startService(self):
        super().startService()
        self._loop = task.LoopingCall(self.expiry.refresh)
        self._loop.clock = self.expiry.app.clock
        self._loop.start(REFRESH_INTERVAL, now=True)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        reading = self.expiry._reading
        return reading if reading is not None else None
