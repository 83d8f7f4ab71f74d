"""The TLS listener of security profiles 2 and 3: server credentials, the TLS context, handshake policing.

The context is built with pyOpenSSL (Twisted's ``ssl:`` endpoint string cannot ask for client
certificates). What it enforces (OCPP 1.6 Security whitepaper, "TLS" requirements; OCTT TC_086/TC_087):

* TLS 1.2 at least; TLS 1.3 too unless ``tls13 = false``;
* TLS 1.2 cipher suites: the four the whitepaper requires (ECDHE-ECDSA-AES128/256-GCM for an EC server
  key, AES128/256-GCM with RSA key exchange for an RSA one) and, preferred over the RSA key-exchange
  ones, their forward-secret ECDHE-RSA twins; nothing else (``tls_ciphers`` changes the list). TLS 1.3
  has its own suites (all AEAD), OpenSSL's defaults;
* the server key is RSA of 2048 bits or more, or EC of 224 bits or more, checked at start-up;
* with CA certificates configured (profile 3) a client certificate is requested, not required (stations
  at profile 2 share the listener); one that is presented must chain to those CAs and be valid now, or
  the handshake fails. Whose certificate it is, and whether the station needed one, is decided at
  admission (:mod:`.profiles`), once the request names the station;
* a connection must finish its handshake within ``tls_handshake_timeout`` seconds; one that fails it
  (a client speaking no TLS, a TLS 1.1 client, no shared cipher, a certificate refused), stalls or is
  closed first is counted once, under what ended it (:attr:`TLSListener.outcomes`), and logged at a
  bounded rate (the first at once, then a summary a minute); the other connections are not disturbed.

Connections go to the same WebSocket factory as the plain listener: one set of connected stations, one
set of ``[ocpp]`` connection limits counting both listeners' connections together.
"""
from __future__ import annotations

import os
from collections import Counter
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, ISSLTransport
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from csms.admission import RefusedConnection
from csms.logs import SummedUp
from csms.protocol import tls_error_text
from csms.service import StartupError

log = Logger(namespace="csms.security.tls")

#: The whitepaper's four suites (OpenSSL names), with the ECDHE-RSA ones ahead of plain RSA key exchange.
DEFAULT_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",   # required, EC server key
    "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384",       # forward secrecy for an RSA key
    "AES128-GCM-SHA256", "AES256-GCM-SHA384",                           # required, RSA server key
))
MIN_RSA_BITS = 2048
MIN_EC_BITS = 224
#: Largest PEM file read as a certificate, key or CA bundle: far above any real one.
MAX_PEM_SIZE = 1024 * 1024
#: A server certificate (or intermediate) ending within this is warned about at start-up.
EXPIRY_WARNING = timedelta(days=30)


def _read_pem(path: str, what: str, setting: str) -> bytes:
    try:
        with open(path, "rb") as pem:
            data = pem.read(MAX_PEM_SIZE + 1)
    except OSError as exc:
        raise StartupError(f"{setting}: cannot read the {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PEM_SIZE:
        raise StartupError(f"{setting}: {path} is larger than {MAX_PEM_SIZE} bytes: not a {what}")
    return data


def _certificates(data: bytes, path: str, setting: str) -> list:
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise StartupError(f"{setting}: {path} holds no PEM certificate")
    return certificates


def key_strength_problem(public_key) -> str | None:
    """Why a server key is too weak or of a kind the whitepaper does not allow, or None."""
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            return f"an RSA key of {public_key.key_size} bits (at least {MIN_RSA_BITS} are required)"
        return None
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.key_size < MIN_EC_BITS:
            return f"an EC key of {public_key.curve.key_size} bits (at least {MIN_EC_BITS} are required)"
        return None
    return f"a {type(public_key).__name__.replace('PublicKey', '')} key (RSA or EC keys only)"


def load_server_credentials(certificate_path: str, key_path: str, now: datetime | None = None):
    """(certificate chain, private key) from PEM files, or StartupError saying what is wrong (one line):
    an unreadable file, no certificate, a key that is not the certificate's, a weak key, and, given
    ``now``, a certificate of the chain that is expired or not yet valid (see :func:`check_validity`)."""
    if not certificate_path or not key_path:
        raise StartupError("[plugin:security] tls_endpoint is set: tls_certificate and tls_private_key are "
                           "needed too")
    chain = _certificates(_read_pem(certificate_path, "certificate", "[plugin:security] tls_certificate"),
                          certificate_path, "[plugin:security] tls_certificate")
    key_data = _read_pem(key_path, "private key", "[plugin:security] tls_private_key")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as exc:
        reason = "it is encrypted" if isinstance(exc, TypeError) else "not an unencrypted PEM private key"
        raise StartupError(f"[plugin:security] tls_private_key: cannot use {key_path}: {reason}") from None
    public_numbers = key.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    if public_numbers != chain[0].public_key().public_bytes(serialization.Encoding.DER,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo):
        raise StartupError(f"[plugin:security] tls_private_key: {key_path} is not the key of the certificate "
                           f"in {certificate_path}")
    problem = key_strength_problem(key.public_key())
    if problem is not None:
        raise StartupError(f"[plugin:security] tls_certificate: {certificate_path} has {problem}")
    if now is not None:
        check_validity(chain, certificate_path, now)
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size < 256:
        log.warn("The TLS server key in {path} is on {curve}: the whitepaper allows it, but TLS 1.3 and most TLS "
                 "clients cannot use it; prefer P-256 or larger", path=certificate_path, curve=key.curve.name)
    return chain, key


def _utc_text(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def check_validity(chain: list, certificate_path: str, now: datetime) -> None:
    """StartupError when a certificate of the server's chain is expired or not yet valid at ``now``: every
    station would refuse it in the handshake, while the CSMS reported itself ready. A warning when one ends
    within :data:`EXPIRY_WARNING` (the listener serves it until a restart loads the renewed file)."""
    setting = "[plugin:security] tls_certificate"
    for certificate in chain:
        name = certificate.subject.rfc4514_string() or "(no subject)"
        if now >= certificate.not_valid_after_utc:
            raise StartupError(f"{setting}: the certificate {name} in {certificate_path} expired on "
                               f"{_utc_text(certificate.not_valid_after_utc)}: stations refuse it; renew it")
        if now < certificate.not_valid_before_utc:
            raise StartupError(f"{setting}: the certificate {name} in {certificate_path} is not valid before "
                               f"{_utc_text(certificate.not_valid_before_utc)}: stations refuse it until then; "
                               f"renew it with a start in the past (or check this machine's clock)")
        left = certificate.not_valid_after_utc - now
        if left < EXPIRY_WARNING:
            log.warn("The TLS server certificate {name} in {path} expires on {end} (in {days} days): renew it, "
                     "then restart the Central System to load it",
                     name=name, path=certificate_path, end=_utc_text(certificate.not_valid_after_utc), days=left.days)


def not_after(chain: list) -> datetime:
    """When the first certificate of the server's chain ends (the listener's certificate is unusable then)."""
    return min(certificate.not_valid_after_utc for certificate in chain)


def load_ca_certificates(path: str) -> list:
    """The CA certificates in a PEM file, or in every ``*.pem``/``*.crt`` file of a directory."""
    setting = "[plugin:security] tls_ca"
    if os.path.isdir(path):
        names = sorted(name for name in os.listdir(path) if name.endswith((".pem", ".crt")))
        if not names:
            raise StartupError(f"{setting}: the directory {path} holds no .pem or .crt file")
        files = [os.path.join(path, name) for name in names]
    else:
        files = [path]
    certificates = []
    for file in files:
        certificates.extend(_certificates(_read_pem(file, "CA certificate", setting), file, setting))
    return certificates


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLSContext:
    """One OpenSSL context for every connection of the listener (see the module docstring for its policy)."""

    def __init__(self, chain: list, key, ca_certificates: list, ciphers: str = DEFAULT_CIPHERS,
                 tls13: bool = True):
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_max_proto_version(SSL.TLS1_3_VERSION if tls13 else SSL.TLS1_2_VERSION)
        # No compression (CRIME); the server's suite order wins; no client-initiated renegotiation (a
        # cheap way for a client to make the server do handshake work).
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
        try:
            context.set_cipher_list(ciphers.encode("ascii"))
        except (SSL.Error, UnicodeEncodeError):
            raise StartupError(f"[plugin:security] tls_ciphers: OpenSSL knows none of {ciphers!r}") from None
        context.use_certificate(chain[0])
        for certificate in chain[1:]:
            context.add_extra_chain_cert(certificate)
        context.use_privatekey(key)
        context.check_privatekey()
        if ca_certificates:
            store = context.get_cert_store()
            for certificate in ca_certificates:
                store.add_cert(crypto.X509.from_cryptography(certificate))
                context.add_client_ca(certificate)  # named in the request, so a station picks the right one
            context.set_verify(SSL.VERIFY_PEER, None)
            context.set_verify_depth(4)
        # Resumed sessions keep the client certificate they were made with: OpenSSL needs an id for that.
        context.set_session_id(b"csms-ocpp")
        context.set_info_callback(self._info)
        self.context = context
        self.requests_client_certificates = bool(ca_certificates)

    def serverConnectionForTLS(self, protocol):
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(protocol)
        return connection

    @staticmethod
    def _info(connection, where, ret):
        if where & SSL.SSL_CB_HANDSHAKE_DONE:
            protocol = connection.get_app_data()
            if protocol is not None:
                protocol.handshake_completed()


#: How a connection that never finished its TLS handshake is counted (:attr:`TLSListener.outcomes`), once:
#: OpenSSL refused the handshake (its kind in :attr:`TLSListener.tls_failures`); the client sent nothing
#: that finished it within ``tls_handshake_timeout``; the client closed it first, with no TLS error.
TLS_FAILED = "tls_failed"
HANDSHAKE_TIMEOUT = "handshake_timeout"
HANDSHAKE_ABANDONED = "handshake_abandoned"

#: The kinds of ``tls_failed``, from OpenSSL's reason strings (substrings; the first kind that matches wins).
#: ``not_tls``: the first bytes are no TLS record (HTTP, SSH, garbage) or a malformed one; ``protocol``:
#: no TLS version or suite both sides have; ``certificate``: a certificate refused, the station's by the
#: CSMS or the CSMS's by the client (an alert naming it); anything else is ``other``.
TLS_FAILURE_KINDS = (
    ("not_tls", ("http request", "https proxy request", "wrong version number", "unknown protocol",
                 "packet length too long", "data length too long", "record layer failure",
                 "unexpected message", "bad record type", "length mismatch")),
    ("certificate", ("certificate", "unknown ca", "bad signature")),
    ("protocol", ("unsupported protocol", "version too low", "no shared cipher", "no ciphers available",
                  "no shared signature algorithm", "no suitable signature algorithm", "no shared group",
                  "no suitable key share", "inappropriate fallback", "no protocols available")),
)
OTHER_KIND = "other"


def tls_failure_kind(detail: str) -> str:
    """The kind of a TLS failure (see :data:`TLS_FAILURE_KINDS`) from OpenSSL's reasons."""
    lowered = detail.lower()
    for kind, markers in TLS_FAILURE_KINDS:
        if any(marker in lowered for marker in markers):
            return kind
    return OTHER_KIND


def classify_handshake_end(reason) -> tuple[str, str | None, str]:
    """(outcome, kind or None, one line) for a connection that ended before its TLS handshake finished."""
    detail = tls_error_text(reason.value)
    if detail is not None:
        return TLS_FAILED, tls_failure_kind(detail), detail
    return HANDSHAKE_ABANDONED, None, str(reason.value) or type(reason.value).__name__


@implementer(ISSLTransport)
class StationTLSProtocol(TLSMemoryBIOProtocol):
    """A TLS connection to the OCPP WebSocket protocol; the admission check reads its client certificate.

    One that does not finish its handshake is counted once on the factory (:meth:`TLSListener.outcome`),
    under what ended it: whichever of the deadline and the connection's loss comes first."""

    handshake_done = False
    #: What this connection was counted as (an outcome name), once it was.
    outcome: str | None = None
    _deadline = None
    _lost = False

    def handshake_completed(self) -> None:
        self.handshake_done = True
        self._cancel_deadline()

    def makeConnection(self, transport):
        super().makeConnection(transport)
        # Armed here, once: TLSMemoryBIOProtocol.makeConnection runs connectionMade twice (Protocol's
        # makeConnection, then ProtocolWrapper's), and a deadline armed there twice outlived the connection
        # and counted a failed handshake as a timeout too, or a stalled one twice.
        timeout = self.factory.handshake_timeout
        if timeout > 0 and self._deadline is None and not self._settled():
            self._deadline = self.factory.clock.callLater(timeout, self._handshake_timed_out)

    def _settled(self) -> bool:
        """Whether nothing is left to count: the handshake finished, the connection was counted or is gone,
        or it is one the connection limits refused (counted there)."""
        return (self.handshake_done or self.outcome is not None or self._lost
                or isinstance(self.wrappedProtocol, RefusedConnection))

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _count(self, outcome: str, kind: str | None, detail: str) -> None:
        self.outcome = outcome
        self.factory.outcome(outcome, self.transport.getPeer() if self.transport is not None else None,
                             detail, kind)

    def _handshake_timed_out(self) -> None:
        self._deadline = None
        if self._settled():
            return
        self._count(HANDSHAKE_TIMEOUT, None, f"no TLS handshake within {self.factory.handshake_timeout:g} s")
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self._cancel_deadline()
        if not self._settled():
            # Why TLS failed (OpenSSL's error) is what Twisted hands the wrapped protocol; the reason this
            # method gets is the TCP close that followed. Twisted keeps the former in _reason until the
            # base class runs: read it, guarded, and fall back to the TCP reason.
            outcome, kind, detail = classify_handshake_end(getattr(self, "_reason", None) or reason)
            self._count(outcome, kind, detail)
        self._lost = True
        super().connectionLost(reason)


class TLSListener(TLSMemoryBIOFactory):
    """Wraps the OCPP WebSocket factory in TLS; counts connections that never got through the handshake.

    :attr:`outcomes` counts them, each once, by what ended it: ``tls_failed`` (OpenSSL refused the
    handshake; :attr:`tls_failures` counts its kinds: ``not_tls``, ``protocol``, ``certificate``,
    ``other``), ``handshake_timeout`` (no handshake within ``tls_handshake_timeout``) and
    ``handshake_abandoned`` (the client closed first). ``failures_metric``, when given (a labelled
    prometheus_client Counter with ``outcome`` and ``kind``), counts the same. The first is logged at
    once; later ones are summed up once per ``SUMMARY_INTERVAL`` while they go on, so that a scanner or a
    flood cannot flood the log (the OCPP protocol keeps Autobahn from logging each TLS error itself).
    """

    protocol = StationTLSProtocol
    noisy = False
    SUMMARY_INTERVAL = 60.0

    def __init__(self, context: ServerTLSContext, ocpp_factory, clock, handshake_timeout: float,
                 failures_metric=None):
        super().__init__(context, False, ocpp_factory)
        self.requests_client_certificates = context.requests_client_certificates
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self.failures_metric = failures_metric
        self.outcomes: Counter = Counter()
        self.tls_failures: Counter = Counter()
        self._handshakes = SummedUp(clock, self.SUMMARY_INTERVAL, self._summarise)

    def outcome(self, name: str, peer, detail: str, kind: str | None = None) -> None:
        self.outcomes[name] += 1
        if kind is not None:
            self.tls_failures[kind] += 1
        if self.failures_metric is not None:
            self.failures_metric.labels(name, kind or "none").inc()
        if not self._handshakes.occurred((name, kind)):
            return
        where = f"{peer.host}:{peer.port}" if hasattr(peer, "host") else "?"
        log.info("TLS connection from {peer} closed before its handshake finished ({outcome}): {detail} "
                 "(further ones are summed up every {interval:.0f} s)",
                 peer=where, outcome=name if kind is None else f"{name}, {kind}", detail=detail,
                 interval=self.SUMMARY_INTERVAL)

    def _summarise(self, counts: Counter) -> None:
        log.info("TLS connections closed before their handshake finished in the last {interval:.0f} s: {counts}",
                 interval=self.SUMMARY_INTERVAL, counts=self._summary_counts(counts))

    @staticmethod
    def _summary_counts(counts: Counter) -> str:
        """E.g. ``2 handshake_timeout, 48 tls_failed (8 certificate, 40 not_tls)``: outcomes and kinds by name."""
        totals: Counter = Counter()
        kinds: dict = {}
        for (name, kind), count in counts.items():
            totals[name] += count
            if kind is not None:
                kinds.setdefault(name, Counter())[kind] += count
        parts = []
        for name, count in sorted(totals.items()):
            by_kind = kinds.get(name)
            detail = f" ({', '.join(f'{n} {kind}' for kind, n in sorted(by_kind.items()))})" if by_kind else ""
            parts.append(f"{count} {name}{detail}")
        return ", ".join(parts)

    def stop(self) -> None:
        self._handshakes.stop()
