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
  (a client speaking no TLS, a TLS 1.1 client, no shared cipher, a certificate refused) or stalls is
  logged and counted (:attr:`TLSListener.outcomes`); the other connections are not disturbed.

Connections go to the same WebSocket factory as the plain listener: one set of connected stations, one
set of ``[ocpp]`` connection limits counting both listeners' connections together.
"""
from __future__ import annotations

import os
from collections import Counter

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, ISSLTransport
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from csms.admission import RefusedConnection
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


def load_server_credentials(certificate_path: str, key_path: str):
    """(certificate chain, private key) from PEM files, or StartupError saying what is wrong (one line):
    an unreadable file, no certificate, a key that is not the certificate's, a weak key."""
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
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size < 256:
        log.warn("The TLS server key in {path} is on {curve}: the whitepaper allows it, but TLS 1.3 and most TLS "
                 "clients cannot use it; prefer P-256 or larger", path=certificate_path, curve=key.curve.name)
    return chain, key


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


def describe_tls_failure(reason) -> str:
    """One line for a connection that ended before its TLS handshake finished."""
    value = reason.value
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        reasons = [entry[2] for entry in value.args[0] if len(entry) == 3 and entry[2]]
        if reasons:
            return "; ".join(reasons)
    return str(value) or type(value).__name__


@implementer(ISSLTransport)
class StationTLSProtocol(TLSMemoryBIOProtocol):
    """A TLS connection to the OCPP WebSocket protocol; the admission check reads its client certificate."""

    handshake_done = False
    handshake_timeout_reported = False
    _deadline = None

    def handshake_completed(self) -> None:
        self.handshake_done = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def connectionMade(self):
        super().connectionMade()
        timeout = self.factory.handshake_timeout
        if timeout > 0 and not self.handshake_done and not isinstance(self.wrappedProtocol, RefusedConnection):
            self._deadline = self.factory.clock.callLater(timeout, self._handshake_timed_out)

    def _handshake_timed_out(self) -> None:
        self._deadline = None
        if self.handshake_done or self.transport is None:
            return
        self.handshake_timeout_reported = True
        self.factory.outcome("handshake_timeout", self.transport.getPeer(),
                             f"no TLS handshake within {self.factory.handshake_timeout:g} s")
        self.transport.abortConnection()

    def connectionLost(self, reason):
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if not self.handshake_done and not self.handshake_timeout_reported \
                and not isinstance(self.wrappedProtocol, RefusedConnection):
            # Why TLS failed (OpenSSL's error) is what Twisted hands the wrapped protocol; the reason this
            # method gets is the TCP close that followed. Twisted keeps the former in _reason until the
            # base class runs: read it, guarded, and fall back to the TCP reason.
            tls_reason = getattr(self, "_reason", None) or reason
            self.factory.outcome("handshake_failed", self.transport.getPeer() if self.transport else None,
                                 describe_tls_failure(tls_reason))
        super().connectionLost(reason)


class TLSListener(TLSMemoryBIOFactory):
    """Wraps the OCPP WebSocket factory in TLS; counts connections that never got through the handshake.

    :attr:`outcomes` counts them by name: ``handshake_failed`` (the client spoke no TLS, an old version,
    no shared suite, or offered a certificate the CAs do not vouch for) and ``handshake_timeout``. The
    first is logged at once; later ones are summed up once per ``SUMMARY_INTERVAL`` while they go on,
    so that a scanner or a flood cannot flood the log.
    """

    protocol = StationTLSProtocol
    noisy = False
    SUMMARY_INTERVAL = 60.0

    def __init__(self, context: ServerTLSContext, ocpp_factory, clock, handshake_timeout: float):
        super().__init__(context, False, ocpp_factory)
        self.requests_client_certificates = context.requests_client_certificates
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self.outcomes: Counter = Counter()
        self._unreported: Counter = Counter()
        self._summary_call = None

    def outcome(self, name: str, peer, detail: str) -> None:
        self.outcomes[name] += 1
        if self._summary_call is not None:
            self._unreported[name] += 1
            return
        where = f"{peer.host}:{peer.port}" if hasattr(peer, "host") else "?"
        log.info("TLS connection from {peer} closed before its handshake finished ({outcome}): {detail} "
                 "(further ones are summed up every {interval:.0f} s)",
                 peer=where, outcome=name, detail=detail, interval=self.SUMMARY_INTERVAL)
        self._summary_call = self.clock.callLater(self.SUMMARY_INTERVAL, self._summarise)

    def _summarise(self) -> None:
        self._summary_call = None
        if not self._unreported:
            return
        log.info("TLS connections closed before their handshake finished in the last {interval:.0f} s: {counts}",
                 interval=self.SUMMARY_INTERVAL,
                 counts=", ".join(f"{count} {name}" for name, count in sorted(self._unreported.items())))
        self._unreported.clear()
        self._summary_call = self.clock.callLater(self.SUMMARY_INTERVAL, self._summarise)

    def stop(self) -> None:
        if self._summary_call is not None and self._summary_call.active():
            self._summary_call.cancel()
        self._summary_call = None
