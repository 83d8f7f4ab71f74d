"""Certificates and signing requests as the security extension exchanges them: PEM text, checked.

Pure functions (no files, no database): parse and check a CSR against the station that sent it,
parse certificates and chains with bounds, and compute ``certificateHashData`` as the whitepaper
describes it (see docs/security.md, "Certificates").
"""
from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

#: Bounds of the security extension's schemas: SignCertificate.req csr and InstallCertificate.req
#: certificate are at most 5500 characters, CertificateSigned.req certificateChain at most 10000.
MAX_CSR = 5500
MAX_CERTIFICATE = 5500
MAX_CHAIN = 10000
#: Smallest keys the whitepaper allows for certificates (RSA 2048 bits, EC 224 bits).
MIN_RSA_BITS = 2048
MIN_EC_BITS = 224
HASH_ALGORITHMS = {"SHA256": hashes.SHA256, "SHA384": hashes.SHA384, "SHA512": hashes.SHA512}
CERTIFICATE_TYPES = ("CentralSystemRootCertificate", "ManufacturerRootCertificate")
_PEM_CERTIFICATE_END = "-----END CERTIFICATE-----"


class Refused(ValueError):
    """A CSR or certificate that cannot be used: ``code`` names the reason (API error code, stored
    with a rejected CSR), the message says it for a person."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# -- signing requests --------------------------------------------------------------------------------


def parse_csr(pem: str) -> x509.CertificateSigningRequest:
    if len(pem) > MAX_CSR:
        raise Refused("csr_too_large", f"The CSR is longer than {MAX_CSR} characters")
    try:
        csr = x509.load_pem_x509_csr(pem.encode("utf-8"))
    except (ValueError, UnicodeEncodeError):
        raise Refused("csr_not_pem", "The CSR is not a PEM-encoded PKCS#10 certificate signing request") from None
    return csr


def check_csr(csr: x509.CertificateSigningRequest, station_id: str, organization: str) -> None:
    """Refused unless ``csr`` is what the whitepaper asks a charge point to send (A02): signed with
    the key it holds, a strong enough key, and a subject naming this station (CN = its charge point
    id) and, when one is configured, the operator's organization (O)."""
    try:
        signature_valid = csr.is_signature_valid
    except Exception:  # noqa: BLE001 - an algorithm the library cannot check is not a valid signature
        signature_valid = False
    if not signature_valid:
        raise Refused("csr_signature_invalid", "The CSR's signature does not verify with its public key")
    check_key(csr.public_key())
    try:
        # Parsed only when first asked for: a value of a string type the library lacks raises KeyError
        # (cryptography 47), bad UTF-8 or an empty RDN ValueError. The signature covers it all the same.
        subject = csr.subject
    except Exception:  # noqa: BLE001 - whatever the parser raises, the subject cannot be used
        raise Refused("csr_not_pem", "The CSR's subject is not a distinguished name that can be read") from None
    names = _attributes(subject, NameOID.COMMON_NAME)
    if names != [station_id]:
        raise Refused("common_name_mismatch", f"The CSR's subject commonName is {_shown(names)}, "
                                              f"not this station's id {station_id!r}")
    if organization:
        organizations = _attributes(subject, NameOID.ORGANIZATION_NAME)
        if organizations != [organization]:
            raise Refused("organization_mismatch", f"The CSR's subject organizationName is {_shown(organizations)}, "
                                                   f"not {organization!r}")


def check_key(public_key) -> None:
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise Refused("weak_key", f"An RSA key of {public_key.key_size} bits is too weak "
                                      f"(at least {MIN_RSA_BITS})")
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.key_size < MIN_EC_BITS:
            raise Refused("weak_key", f"An EC key of {public_key.curve.key_size} bits is too weak "
                                      f"(at least {MIN_EC_BITS})")
    else:
        raise Refused("unsupported_key", "The key is neither RSA nor EC")


def _attributes(name: x509.Name, oid) -> list[str]:
    return [str(attribute.value) for attribute in name.get_attributes_for_oid(oid)]


def _shown(values: list[str]) -> str:
    return "missing" if not values else repr(values[0]) if len(values) == 1 else f"given {len(values)} times"


def same_public_key(a, b) -> bool:
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(*der) == b.public_bytes(*der)


# -- certificates ------------------------------------------------------------------------------------


def parse_certificate(pem: str, limit: int = MAX_CERTIFICATE) -> x509.Certificate:
    """Exactly one PEM certificate."""
    chain = parse_chain(pem, limit)
    if len(chain) != 1:
        raise Refused("not_one_certificate", f"Expected one PEM certificate, found {len(chain)}")
    return chain[0]


def parse_chain(pem: str, limit: int = MAX_CHAIN) -> list[x509.Certificate]:
    """One or more PEM certificates, leaf first; nothing but certificates and whitespace between them."""
    if len(pem) > limit:
        raise Refused("certificate_too_large", f"The certificate text is longer than {limit} characters")
    try:
        certificates = x509.load_pem_x509_certificates(pem.encode("utf-8"))
    except (ValueError, UnicodeEncodeError):
        raise Refused("certificate_not_pem", "The text is not PEM-encoded X.509 certificates") from None
    # load_pem_x509_certificates skips text around the blocks; what follows the last one is not a certificate.
    if pem.rstrip().rsplit(_PEM_CERTIFICATE_END, 1)[-1].strip():
        raise Refused("certificate_not_pem", "Text follows the last PEM certificate")
    return certificates


def to_pem(certificates) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in certificates)


def is_self_signed(certificate: x509.Certificate) -> bool:
    from .ca import issued_by
    return certificate.issuer == certificate.subject and issued_by(certificate, certificate)


def hash_data(certificate: x509.Certificate, algorithm: str, issuer: x509.Certificate | None = None) -> dict:
    """``certificateHashData`` of ``certificate`` (whitepaper CertificateHashDataType).

    The whitepaper's three values are those of an OCSP CertID (RFC 6960 §4.1.1), computed here by
    ``cryptography``'s OCSP request builder: issuerNameHash, the hash of the DER encoding of the
    certificate's issuer name; issuerKeyHash, the hash of the issuer's public key (the content of the
    subjectPublicKey BIT STRING of the issuer's certificate); serialNumber, the serial number in
    hexadecimal without leading zeroes. Hex digits are lowercase. ``issuer``: the issuing certificate;
    None for a self-signed one (a root certificate, the only kind InstallCertificate installs).
    """
    request = (ocsp.OCSPRequestBuilder()
               .add_certificate(certificate, issuer or certificate, HASH_ALGORITHMS[algorithm]())
               .build())
    return {
        "hashAlgorithm": algorithm,
        "issuerNameHash": request.issuer_name_hash.hex(),
        "issuerKeyHash": request.issuer_key_hash.hex(),
        "serialNumber": format(request.serial_number, "x"),
    }


def same_hash_data(a: dict, b: dict) -> bool:
    """Two certificateHashData naming the same certificate (hex compared without regard to case)."""
    return (a["hashAlgorithm"] == b["hashAlgorithm"]
            and a["issuerNameHash"].lower() == b["issuerNameHash"].lower()
            and a["issuerKeyHash"].lower() == b["issuerKeyHash"].lower()
            and a["serialNumber"].lower().lstrip("0") == b["serialNumber"].lower().lstrip("0"))
