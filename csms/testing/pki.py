"""Test certificates made with ``cryptography``: CAs, server and station (client) certificates, CSRs.

For tests of the security profiles (TLS, client certificates) and of certificate management: every
certificate is generated when the test runs, with the key type, subject and validity the test asks
for (an expired one, one from another CA, one naming another station). Nothing here is fit for
production use: keys are kept unencrypted and validity defaults are short.

    ca = make_ca("Test Root CA")
    server = make_certificate(ca, "localhost", server=True)
    station = make_certificate(ca, "CP-1", organization="Test CPO")
    paths = server.write(tmp_path, "server")        # {"certificate": ..., "key": ..., "chain": ...}
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Key types :func:`make_key` understands: ("rsa", bits) or ("ec", curve size in bits; 192 is too weak
#: for the whitepaper, there for tests of its refusal).
EC_CURVES = {192: ec.SECP192R1, 224: ec.SECP224R1, 256: ec.SECP256R1, 384: ec.SECP384R1, 521: ec.SECP521R1}


def make_key(key_type: str = "ec", size: int | None = None):
    """A new private key: ``"rsa"`` (default 2048 bits) or ``"ec"`` (default P-256; 192, 224, 384, 521)."""
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=size or 2048)
    if key_type == "ec":
        return ec.generate_private_key(EC_CURVES[size or 256]())
    raise ValueError(f"key_type is 'rsa' or 'ec', not {key_type!r}")


def subject(common_name: str | None, organization: str | None = None) -> x509.Name:
    """CN and O (either left out when None)."""
    attributes = [] if common_name is None else [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


@dataclass
class Credentials:
    """A certificate, its private key and the chain of CA certificates above it (issuer first)."""

    certificate: x509.Certificate
    key: object
    chain: list = field(default_factory=list)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def chain_pem(self) -> bytes:
        """This certificate followed by its chain, as a server or station presents it."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [self.certificate, *self.chain])

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def write(self, directory, name: str) -> dict:
        """Write ``NAME.pem`` (certificate), ``NAME-chain.pem`` and ``NAME-key.pem`` into ``directory``;
        returns their paths as strings under "certificate", "chain" and "key"."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"certificate": directory / f"{name}.pem", "chain": directory / f"{name}-chain.pem",
                 "key": directory / f"{name}-key.pem"}
        paths["certificate"].write_bytes(self.certificate_pem)
        paths["chain"].write_bytes(self.chain_pem)
        paths["key"].write_bytes(self.key_pem)
        paths["key"].chmod(0o600)
        return {kind: str(path) for kind, path in paths.items()}


def _validity(not_before: datetime | None, not_after: datetime | None, days: int):
    now = datetime.now(timezone.utc)
    start = not_before if not_before is not None else now - timedelta(hours=1)
    return start, not_after if not_after is not None else now + timedelta(days=days)


def make_ca(common_name: str = "Test Root CA", organization: str | None = "Test CPO", key_type: str = "ec",
            key_size: int | None = None, issuer: Credentials | None = None, days: int = 30, key=None,
            serial: int | None = None) -> Credentials:
    """A CA certificate: self-signed, or an intermediate signed by ``issuer``; ``key`` and ``serial``
    when the test needs particular ones."""
    key = key if key is not None else make_key(key_type, key_size)
    name = subject(common_name, organization)
    signer = issuer.key if issuer is not None else key
    builder = _builder(name, issuer.certificate.subject if issuer is not None else name, key, None, None, days,
                       serial)
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    builder = builder.add_extension(x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
        critical=True)
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    certificate = builder.sign(signer, hashes.SHA256())
    chain = [issuer.certificate, *issuer.chain] if issuer is not None else []
    return Credentials(certificate, key, chain)


def make_certificate(ca: Credentials, common_name: str, organization: str | None = None, key_type: str = "ec",
                     key_size: int | None = None, server: bool = False, not_before: datetime | None = None,
                     not_after: datetime | None = None, days: int = 30, key=None,
                     hosts=("localhost", "127.0.0.1")) -> Credentials:
    """A leaf certificate signed by ``ca``: a TLS server's (``server=True``: its ``hosts`` as subject
    alternative names) or a station's client certificate. ``not_after`` in the past makes it expired."""
    key = key if key is not None else make_key(key_type, key_size)
    builder = _builder(subject(common_name, organization), ca.certificate.subject, key, not_before, not_after, days)
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        names = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(ca.key, hashes.SHA256())
    return Credentials(certificate, key, [ca.certificate, *ca.chain])


def make_csr(common_name: str | None, organization: str | None = None, key_type: str = "ec", key_size: int | None = None,
             key=None):
    """(CSR, private key): a certificate signing request as a station sends it in SignCertificate
    (``csr.public_bytes(serialization.Encoding.PEM)`` is the PEM text); no CN when ``common_name`` is None."""
    key = key if key is not None else make_key(key_type, key_size)
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject(common_name, organization)).sign(
        key, hashes.SHA256())
    return csr, key


def _builder(name, issuer_name, key, not_before, not_after, days, serial=None) -> x509.CertificateBuilder:
    start, end = _validity(not_before, not_after, days)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name).public_key(key.public_key())
            .serial_number(serial if serial is not None else x509.random_serial_number()).not_valid_before(start).not_valid_after(end))
