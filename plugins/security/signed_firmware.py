"""Checking a firmware signature the way a station will (OCA whitepaper "Improved security for OCPP 1.6-J",
signed firmware): the signature is the base64 of an RSA (PKCS #1 v1.5) or ECDSA signature, with SHA-256,
over the firmware file, made with the key of the signing certificate.

The file's SHA-256 is all a signature needs (``Prehashed``): the CSMS checks it against the digest the
Firmware plugin computed at upload, without reading the image again.
"""
from __future__ import annotations

import base64
import binascii

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

#: Why a signature cannot be used at all: it is refused even with ``verify: false``.
SIGNATURE_NOT_BASE64 = "signature_not_base64"
CERTIFICATE_NOT_PEM = "signing_certificate_not_pem"
UNSUPPORTED_KEY = "unsupported_signing_key"
#: Well-formed, but it does not verify over the file: refused unless the operator sends it anyway.
SIGNATURE_MISMATCH = "signature_mismatch"


class SignatureProblem(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def load_signing_certificate(pem: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode("utf-8"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise SignatureProblem(CERTIFICATE_NOT_PEM, f"The signing certificate is not a PEM X.509 certificate ({exc})")


def decode_signature(signature: str) -> bytes:
    try:
        raw = base64.b64decode(signature.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raw = b""
    if not raw:
        raise SignatureProblem(SIGNATURE_NOT_BASE64, "The signature is not base64")
    return raw


def check_signature(sha256_hex: str, signature: str, certificate_pem: str) -> None:
    """Return when ``signature`` verifies over the file whose SHA-256 is ``sha256_hex``; else raise
    :class:`SignatureProblem` saying why."""
    raw = decode_signature(signature)
    key = load_signing_certificate(certificate_pem).public_key()
    digest = bytes.fromhex(sha256_hex)
    prehashed = utils.Prehashed(hashes.SHA256())
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(raw, digest, padding.PKCS1v15(), prehashed)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(raw, digest, ec.ECDSA(prehashed))
        else:
            raise SignatureProblem(UNSUPPORTED_KEY, "The signing certificate's key is neither RSA nor EC")
    except InvalidSignature:
        raise SignatureProblem(SIGNATURE_MISMATCH, "The signature does not verify over the firmware file with the "
                                                   "signing certificate's key (SHA-256 with RSA or ECDSA)") from None
