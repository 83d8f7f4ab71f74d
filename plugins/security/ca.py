"""The CSMS's own certificate authority: loaded from the operator's files, or generated on first start.

It signs the charge point certificates stations ask for with SignCertificate (whitepaper use case A02),
and its certificate is the trust anchor the TLS listener checks client certificates against (security
profile 3). File effects happen here, at start-up, never inside a database function.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from twisted.logger import Logger

from csms.config import ConfigError

#: Names of the files a generated CA is kept in, inside ``[plugin:security] ca_dir``.
GENERATED_CERTIFICATE = "csms-ca.pem"
GENERATED_KEY = "csms-ca-key.pem"
#: A generated CA lasts this long; the operator replaces it (or gives their own) before then.
GENERATED_VALIDITY = timedelta(days=3650)
#: A CA ending within this is warned about at start-up (as the TLS server certificate is, :mod:`.tls`).
EXPIRY_WARNING = timedelta(days=30)

log = Logger(namespace="csms.security")
#: Largest CA file read: a certificate or key is a few kilobytes; a bigger file is not one.
MAX_CA_FILE = 1024 * 1024


@dataclass
class CertificateAuthority:
    certificate: x509.Certificate
    key: object
    #: The PEM file of the CA certificate: the trust anchor for client certificates (security profile 3).
    certificate_path: str
    #: The setting it comes from (``ca_certificate_file``, or ``ca_dir`` for the generated one), for messages.
    setting: str = "ca_dir"

    @property
    def certificate_pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")

    def sign(self, csr: x509.CertificateSigningRequest, valid_from: datetime, validity: timedelta) -> x509.Certificate:
        """A charge point certificate for ``csr``: its subject and public key, this CA as issuer.

        Only the subject and key are taken from the request; the extensions are the CSMS's own (a TLS
        client certificate that cannot act as a CA), whatever the station asked for. It ends with this CA
        at the latest: a certificate outliving its issuer verifies no longer than the issuer does, and its
        stored end (station certificate expiry, docs/security.md) would promise more than it gives.
        """
        public_key = csr.public_key()
        not_after = min(valid_from + validity, self.certificate.not_valid_after_utc)
        builder = (x509.CertificateBuilder()
                   .subject_name(csr.subject)
                   .issuer_name(self.certificate.subject)
                   .public_key(public_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(valid_from - timedelta(minutes=5))  # stations' clocks drift
                   .not_valid_after(not_after)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=isinstance(public_key,
                                                rsa.RSAPublicKey), content_commitment=False, data_encipherment=False,
                                                key_agreement=False, key_cert_sign=False, crl_sign=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.certificate.public_key()),
                                  critical=False))
        return builder.sign(self.key, _signature_hash(self.key))


def _signature_hash(key):
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def load_or_create(ca_dir: str, certificate_file: str, key_file: str, organization: str,
                   now: datetime) -> CertificateAuthority:
    """The operator's CA (``certificate_file`` and ``key_file`` given) or the one kept in ``ca_dir``,
    generated there on first start. ConfigError, in one line, for anything that cannot be used."""
    if certificate_file or key_file:
        if not (certificate_file and key_file):
            raise ConfigError("[plugin:security] ca_certificate_file and ca_key_file go together: give both or "
                              "neither (neither: a CA is generated in ca_dir)")
        return _load(certificate_file, key_file, "ca_certificate_file", "ca_key_file")
    certificate_path = os.path.join(ca_dir, GENERATED_CERTIFICATE)
    key_path = os.path.join(ca_dir, GENERATED_KEY)
    have_certificate, have_key = os.path.exists(certificate_path), os.path.exists(key_path)
    if have_certificate and have_key:
        return _load(certificate_path, key_path, "ca_dir", "ca_dir")
    if have_certificate or have_key:
        present = certificate_path if have_certificate else key_path
        raise ConfigError(f"[plugin:security] ca_dir: {present} exists without its "
                          f"{'key' if have_certificate else 'certificate'}; restore it or remove both to generate "
                          "a new CA")
    return _generate(ca_dir, certificate_path, key_path, organization, now)


def _read(path: str, setting: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CA_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"[plugin:security] {setting}: cannot read {path} "
                          f"({(exc.strerror or str(exc)).lower()})") from None
    if len(data) > MAX_CA_FILE:
        raise ConfigError(f"[plugin:security] {setting}: {path} is larger than {MAX_CA_FILE} bytes, "
                          "not a PEM certificate or key")
    return data


def _load(certificate_path: str, key_path: str, certificate_setting: str, key_setting: str) -> CertificateAuthority:
    certificate_pem, key_pem = _read(certificate_path, certificate_setting), _read(key_path, key_setting)
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem)
    except ValueError:
        raise ConfigError(f"[plugin:security] {certificate_setting}: {certificate_path} is not a PEM "
                          "X.509 certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):  # TypeError: the key is encrypted
        raise ConfigError(f"[plugin:security] {key_setting}: {key_path} is not an unencrypted PEM private "
                          "key") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ConfigError(f"[plugin:security] {key_setting}: {key_path} holds neither an RSA nor an EC key")
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ConfigError(f"[plugin:security] {key_path} is not the key of the CA certificate {certificate_path}")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ConfigError(f"[plugin:security] {certificate_setting}: {certificate_path} is not a CA certificate "
                          "(basicConstraints CA:TRUE)")
    return CertificateAuthority(certificate, key, os.path.abspath(certificate_path), certificate_setting)


def _generate(ca_dir: str, certificate_path: str, key_path: str, organization: str,
              now: datetime) -> CertificateAuthority:
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, "CSMS Root CA")]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    name = x509.Name(attributes)
    certificate = (x509.CertificateBuilder()
                   .subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + GENERATED_VALIDITY)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    try:
        os.makedirs(ca_dir, mode=0o700, exist_ok=True)
        os.chmod(ca_dir, 0o700)  # makedirs' mode is masked by the umask, and says nothing of an existing directory
        _write_new(key_path, key_pem, 0o600)
        _write_new(certificate_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as exc:
        raise ConfigError(f"[plugin:security] ca_dir: cannot create the CA in {ca_dir} "
                          f"({(exc.strerror or str(exc)).lower()})") from None
    # Once, on first start: where the operator finds what tls_ca and the stations' CentralSystemRootCertificate
    # need (the next starts load it silently).
    log.info("Generated the CSMS CA ({subject}, valid until {end}) in {directory}: its certificate {path} is the "
             "trust anchor for station certificates ([plugin:security] tls_ca)", subject=name.rfc4514_string(),
             end=_utc_text(certificate.not_valid_after_utc), directory=ca_dir,
             path=certificate_path)
    return CertificateAuthority(certificate, key, os.path.abspath(certificate_path))


def _utc_text(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def check_validity(ca: CertificateAuthority, now: datetime) -> None:
    """ConfigError (one line, saying what to do) when the CA certificate is expired or not yet valid at
    ``now``: a station certificate it signs would not verify (a profile 3 station presenting one fails the
    TLS handshake), while the CSMS went on signing them. A warning when it ends within :data:`EXPIRY_WARNING`."""
    certificate = ca.certificate
    name = certificate.subject.rfc4514_string() or "(no subject)"
    if ca.setting == "ca_dir":
        replace = (f"move {GENERATED_CERTIFICATE} and {GENERATED_KEY} out of {os.path.dirname(ca.certificate_path)} "
                   "to have a new CA generated (then give stations and tls_ca the new certificate), or set "
                   "ca_certificate_file and ca_key_file")
    else:
        replace = "give a renewed CA certificate (and its key) in ca_certificate_file and ca_key_file"
    where = f"[plugin:security] {ca.setting}: the CA certificate {name} in {ca.certificate_path}"
    if now >= certificate.not_valid_after_utc:
        raise ConfigError(f"{where} expired on {_utc_text(certificate.not_valid_after_utc)}: certificates it signs "
                          f"are refused; {replace}")
    if now < certificate.not_valid_before_utc:
        raise ConfigError(f"{where} is not valid before {_utc_text(certificate.not_valid_before_utc)}: certificates "
                          f"it signs are refused until then; check this machine's clock, or {replace}")
    left = certificate.not_valid_after_utc - now
    if left < EXPIRY_WARNING:
        log.warn("The CSMS CA certificate {name} in {path} expires on {end} (in {days} days): station certificates "
                 "it signed stop verifying then; {replace}", name=name, path=ca.certificate_path,
                 end=_utc_text(certificate.not_valid_after_utc), days=left.days, replace=replace)


def _write_new(path: str, data: bytes, mode: int) -> None:
    # O_EXCL: never overwrite a CA someone put there meanwhile; the mode applies from the first byte.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer`` signed ``certificate`` (name and signature)."""
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
