"""Security plugin, certificates: the CSMS CA, SignCertificate / CertificateSigned, InstallCertificate,
GetInstalledCertificateIds, DeleteCertificate and ExtendedTriggerMessage (OCTT TC_074 to TC_078).

The test station plays the OCTT tool. Certificates and CSRs are made here with ``cryptography``; the
hash data a station would report is computed independently, by the ``openssl ocsp`` command (an OCSP
CertID is the whitepaper's issuerNameHash / issuerKeyHash / serialNumber).
"""
from __future__ import annotations

import asyncio
import os
import re
import stat
import subprocess
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from conftest import error_of, table_contents, within
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from ocpp.routing import after, on
from ocpp.v16 import ChargePoint, call, call_result
from ocpp.v16.enums import Action
from OpenSSL import crypto
from test_localauth_interop import AsyncioThread, close_charge_point, open_charge_point
from test_rpc import bad_log_events
from twisted.logger import capturedLogs

from test_hardening_ws import logged  # noqa: F401  (a fixture)

from csms.config import load_config
from csms.service import CSMSService, StartupError
from csms.testing import pki
from csms.testing.pki import Credentials, make_ca, make_certificate, make_key, subject

# -- test PKI (csms.testing.pki), as the PEM text the API and stations exchange ---------------------------


def make_csr(common_name: str | None, key=None, organization: str | None = None) -> tuple[str, object]:
    csr, key = pki.make_csr(common_name, organization, key=key)
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key


def make_root(common_name: str = "Test Root", key=None, serial: int | None = None) -> tuple[str, object]:
    root = make_ca(common_name, "Test Org", key=key, serial=serial, days=365)
    return root.certificate_pem.decode(), root.key


def make_leaf(common_name: str, issuer_pem: str, issuer_key) -> str:
    issuer = Credentials(x509.load_pem_x509_certificate(issuer_pem.encode()), issuer_key)
    return make_certificate(issuer, common_name).certificate_pem.decode()


def openssl_hash_data(pem: str, algorithm: str, tmp_path) -> dict:
    """certificateHashData of a self-signed certificate, as ``openssl ocsp`` computes its CertID."""
    path, request = tmp_path / "cert.pem", tmp_path / "request.der"
    path.write_text(pem)
    subprocess.run(["openssl", "ocsp", "-issuer", str(path), f"-{algorithm.lower()}", "-cert", str(path),
                    "-no_nonce", "-reqout", str(request)], check=True, capture_output=True)
    text = subprocess.run(["openssl", "ocsp", "-reqin", str(request), "-req_text"], check=True,
                          capture_output=True, text=True).stdout.replace("\\\n", "")

    def field(label: str) -> str:
        return re.search(rf"{label}: ([0-9A-F]+)", text).group(1)
    return {"hashAlgorithm": algorithm, "issuerNameHash": field("Issuer Name Hash").lower(),
            "issuerKeyHash": field("Issuer Key Hash").lower(),
            "serialNumber": field("Serial Number").lower().lstrip("0") or "0"}


def verify_chain(chain_pem: str, ca_pem: str) -> None:
    """OpenSSL's own chain verification (as a TLS handshake does it); raises when the chain does not verify."""
    certificates = x509.load_pem_x509_certificates(chain_pem.encode())
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(x509.load_pem_x509_certificate(ca_pem.encode())))
    crypto.X509StoreContext(store, crypto.X509.from_cryptography(certificates[0]),
                            [crypto.X509.from_cryptography(c) for c in certificates[1:]]).verify_certificate()


# -- helpers ------------------------------------------------------------------------------------------------


def security(csms):
    return csms.app.pm.get_plugin("security").certificates


def calls(station, action: str) -> list:
    return [frame[3] for frame in station.received_calls if frame[2] == action]


async def api(csms, method: str, path: str, json=None):
    status, body, _ = await within(csms.api(method, path, json=json))
    return status, body


async def ca_pem(csms) -> str:
    status, body = await api(csms, "GET", "/security/ca")
    assert status == 200
    return body["certificate"]


async def renew(csms, station, station_id: str, csr_pem: str) -> str:
    """Reusable state RenewChargePointCertificate: ExtendedTriggerMessage(SignChargePointCertificate),
    SignCertificate, CertificateSigned; returns the chain the CSMS sent."""
    station.responses["ExtendedTriggerMessage"] = {"status": "Accepted"}
    status, body = await api(csms, "POST", f"/stations/{station_id}/extended-trigger",
                             {"requested_message": "SignChargePointCertificate"})
    assert (status, body["status"]) == (200, "Accepted")
    assert calls(station, "ExtendedTriggerMessage") == [{"requestedMessage": "SignChargePointCertificate"}]
    # The CSMS sends CertificateSigned only once the station has its SignCertificate.conf.
    order = []
    answer = station.responses["CertificateSigned"]
    station.responses["CertificateSigned"] = lambda request: order.append("CertificateSigned.req") or answer
    signing = station.call("SignCertificate", {"csr": csr_pem})
    signing.addCallback(lambda conf: order.append("SignCertificate.conf") or conf)
    assert await within(signing) == {"status": "Accepted"}
    signed = await within(station.wait_for_call("CertificateSigned"))
    await within(security(csms).requests.settled())
    assert order == ["SignCertificate.conf", "CertificateSigned.req"]
    return signed["certificateChain"]


async def requests_of(csms, station_id: str) -> list:
    status, body = await api(csms, "GET", f"/stations/{station_id}/certificate-requests")
    assert status == 200
    return body["items"]


# -- OCTT cases -----------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_074_CSMS(csms):
    """Update Charge Point Certificate by request of Central System: the chain's leaf carries the CSR's
    key and CN, and verifies against the CSMS CA; the station's Accepted is recorded."""
    station = await csms.connect_booted("CP-74")
    station.responses["CertificateSigned"] = {"status": "Accepted"}
    csr_pem, key = make_csr("CP-74", make_key("rsa", 2048))
    chain_pem = await renew(csms, station, "CP-74", csr_pem)

    chain = x509.load_pem_x509_certificates(chain_pem.encode())
    assert len(chain) == 2
    leaf, issuer = chain
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    assert [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == ["CP-74"]
    ca = await ca_pem(csms)
    assert issuer == x509.load_pem_x509_certificate(ca.encode())
    verify_chain(chain_pem, ca)
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc >= timedelta(days=365)
    # The chain's order on the wire: the answer to SignCertificate, then CertificateSigned.
    assert [frame[2] for frame in station.received_calls] == ["ExtendedTriggerMessage", "CertificateSigned"]
    [request] = await requests_of(csms, "CP-74")
    assert (request["status"], request["certificate_chain"], request["serial_number"]) == \
        ("accepted", chain_pem, format(leaf.serial_number, "x"))
    # What the TLS listener trusts for profile 3 is the same CA, in a file.
    with open(security(csms).ca.certificate_path) as f:
        assert f.read() == ca


@pytest_twisted.ensureDeferred
async def test_TC_075_1_CSMS(csms, tmp_path):
    await install_then_query(csms, tmp_path, "CP-75-1", "ManufacturerRootCertificate")


@pytest_twisted.ensureDeferred
async def test_TC_075_2_CSMS(csms, tmp_path):
    await install_then_query(csms, tmp_path, "CP-75-2", "CentralSystemRootCertificate")


async def install_then_query(csms, tmp_path, station_id: str, certificate_type: str) -> None:
    """Install a certificate: InstallCertificate, then GetInstalledCertificateIds of the same type."""
    station = await csms.connect_booted(station_id)
    root, _ = make_root(f"{certificate_type} root")
    reported = openssl_hash_data(root, "SHA256", tmp_path)
    station.responses["InstallCertificate"] = {"status": "Accepted"}
    station.responses["GetInstalledCertificateIds"] = {"status": "Accepted", "certificateHashData": [reported]}

    status, body = await api(csms, "POST", f"/stations/{station_id}/certificates",
                             {"certificate_type": certificate_type, "certificate": root})
    assert (status, body["status"]) == (200, "Accepted")
    assert calls(station, "InstallCertificate") == [{"certificateType": certificate_type, "certificate": root}]
    status, body = await api(csms, "GET", f"/stations/{station_id}/certificates")
    assert [(e["certificate_type"], e["source"], e["certificate"]) for e in body["items"]] == \
        [(certificate_type, "installed", root)]

    status, body = await api(csms, "POST", f"/stations/{station_id}/certificates/query",
                             {"certificate_type": certificate_type})
    assert (status, body["status"], body["certificate_hash_data"]) == (200, "Accepted", [reported])
    assert calls(station, "GetInstalledCertificateIds") == [{"certificateType": certificate_type}]
    [entry] = body["items"]
    assert (entry["source"], entry["certificate"], entry["serial_number"]) == ("reported", root,
                                                                               reported["serialNumber"])


@pytest.mark.parametrize("algorithm", ["SHA256", "SHA384", "SHA512"])
@pytest_twisted.ensureDeferred
async def test_TC_076_CSMS(csms, tmp_path, algorithm):
    """Delete a specific certificate: installed, reported with ``algorithm``, deleted with the hash data
    computed with that algorithm, which is what openssl computes."""
    station = await csms.connect_booted("CP-76")
    root, _ = make_root("Central System Root 2", serial=0x00AB_CDEF_0123)  # leading zero bytes in DER
    expected = openssl_hash_data(root, algorithm, tmp_path)
    station.responses["InstallCertificate"] = {"status": "Accepted"}
    station.responses["GetInstalledCertificateIds"] = {"status": "Accepted", "certificateHashData": [expected]}
    station.responses["DeleteCertificate"] = {"status": "Accepted"}

    await api(csms, "POST", "/stations/CP-76/certificates",
              {"certificate_type": "CentralSystemRootCertificate", "certificate": root})
    status, body = await api(csms, "POST", "/stations/CP-76/certificates/query",
                             {"certificate_type": "CentralSystemRootCertificate"})
    assert status == 200
    status, body = await api(csms, "POST", "/stations/CP-76/certificates/delete", {"certificate": root})
    assert (status, body["status"], body["certificate_hash_data"]) == (200, "Accepted", expected)
    assert calls(station, "DeleteCertificate") == [{"certificateHashData": expected}]
    assert expected["serialNumber"] == "abcdef0123"
    status, body = await api(csms, "GET", "/stations/CP-76/certificates")
    assert body["items"] == []


@pytest.mark.parametrize("algorithm", ["SHA256", "SHA384", "SHA512"])
def test_hash_data_matches_openssl_for_rsa_and_ec_roots(tmp_path, algorithm):
    from csms_plugins.security.certificates import hash_data

    for key in (make_key("rsa", 2048), make_key("ec", 384)):
        root, _ = make_root(key=key)
        assert hash_data(x509.load_pem_x509_certificate(root.encode()), algorithm) == \
            openssl_hash_data(root, algorithm, tmp_path)


@pytest_twisted.ensureDeferred
async def test_TC_077_CSMS(csms):
    """Invalid ChargePointCertificate Security Event: the station rejects the chain and says so."""
    station = await csms.connect_booted("CP-77")
    station.responses["CertificateSigned"] = {"status": "Rejected"}
    csr_pem, _ = make_csr("CP-77")
    await renew(csms, station, "CP-77", csr_pem)
    [request] = await requests_of(csms, "CP-77")
    assert request["status"] == "rejected_by_station"
    timestamp = "2026-03-01T10:00:00Z"
    assert await within(station.call("SecurityEventNotification", {
        "type": "InvalidChargePointCertificate", "timestamp": timestamp, "techInfo": "unknown issuer"})) == {}
    status, body = await api(csms, "GET", "/stations/CP-77/security-events")
    assert [(e["type"], e["origin"], e["tech_info"], e["critical"]) for e in body["items"]] == \
        [("InvalidChargePointCertificate", "station", "unknown issuer", False)]


@pytest_twisted.ensureDeferred
async def test_TC_078_CSMS(csms):
    """Invalid CentralSystemCertificate Security Event: InstallCertificate Rejected, then the event."""
    station = await csms.connect_booted("CP-78")
    station.responses["InstallCertificate"] = {"status": "Rejected"}
    root, _ = make_root()
    status, body = await api(csms, "POST", "/stations/CP-78/certificates",
                             {"certificate_type": "CentralSystemRootCertificate", "certificate": root})
    assert (status, body["status"]) == (200, "Rejected")
    assert calls(station, "InstallCertificate") == [{"certificateType": "CentralSystemRootCertificate",
                                                     "certificate": root}]
    assert await within(station.call("SecurityEventNotification", {
        "type": "InvalidCentralSystemCertificate", "timestamp": "2026-03-01T10:00:00Z"})) == {}
    status, body = await api(csms, "GET", "/stations/CP-78/certificates")
    assert body["items"] == []  # not installed
    status, body = await api(csms, "GET", "/security-events?type=InvalidCentralSystemCertificate")
    assert [(e["station_id"], e["tech_info"]) for e in body["items"]] == [("CP-78", None)]


# -- SignCertificate: bad CSRs ----------------------------------------------------------------------------------


def bad_csrs(station_id: str) -> dict:
    good = x509.load_pem_x509_csr(make_csr(station_id)[0].encode())
    return {
        "csr_not_pem": "-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgQ1NS\n-----END CERTIFICATE REQUEST-----\n",
        "common_name_mismatch": make_csr("CP-SOMEONE-ELSE")[0],
        "weak_key": make_csr(station_id, make_key("rsa", 1024))[0],
        "weak_ec_key": make_csr(station_id, make_key("ec", 192))[0],
        "csr_signature_invalid": broken_signature(good),
        "garbage": "hello",
        "no_common_name": make_csr(None)[0],
        "der_not_pem": good.public_bytes(serialization.Encoding.DER).hex(),
    }


def broken_signature(csr) -> str:
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0xFF  # inside the signature value
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


@pytest_twisted.ensureDeferred
async def test_bad_csrs_are_rejected_recorded_and_leave_other_stations_alone(csms):
    station = await csms.connect_booted("CP-BAD")
    bystander = await csms.connect_booted("CP-BYSTANDER")
    expected_codes = {"csr_not_pem": "csr_not_pem", "common_name_mismatch": "common_name_mismatch",
                      "weak_key": "weak_key", "weak_ec_key": "weak_key", "csr_signature_invalid": "csr_signature_invalid",
                      "garbage": "csr_not_pem", "no_common_name": "common_name_mismatch",
                      "der_not_pem": "csr_not_pem"}
    for label, pem in bad_csrs("CP-BAD").items():
        assert await within(station.call("SignCertificate", {"csr": pem})) == {"status": "Rejected"}, label
    assert calls(station, "CertificateSigned") == []
    requests = await requests_of(csms, "CP-BAD")
    assert sorted((r["status"], r["reason_code"]) for r in requests) == \
        sorted(("rejected", code) for code in expected_codes.values())
    assert all(r["certificate_chain"] is None for r in requests)
    status, body = await api(csms, "GET", "/stations/CP-BAD/security-events?origin=csms")
    assert body["total"] == len(expected_codes)
    assert {e["type"] for e in body["items"]} == {"CertificateSigningRequestRejected"}
    assert all(e["tech_info"].split(":")[0] in expected_codes.values() for e in body["items"])
    # Another station is served as before, and nothing was recorded for it.
    assert (await within(bystander.call("Heartbeat", {})))["currentTime"]
    assert await requests_of(csms, "CP-BYSTANDER") == []


def csr_with_raw_organization(station_id: str, tag: int, value: bytes) -> str:
    """A CSR for ``station_id``, signed by its own key, whose subject's organizationName is the DER
    element ``tag`` ``value`` as given: what a station's own ASN.1 encoder may produce and ``cryptography``
    refuses to build (and reads only when asked for the subject)."""
    placeholder = "P" * len(value)
    csr, key = pki.make_csr(station_id, placeholder)
    encoded = bytes([0x0C, len(value)]) + placeholder.encode()  # UTF8String, a short length
    assert len(value) < 0x80 and csr.tbs_certrequest_bytes.count(encoded) == 1
    info = csr.tbs_certrequest_bytes.replace(encoded, bytes([tag, len(value)]) + value)

    def der(tag: int, body: bytes) -> bytes:  # DER's shortest length form
        size = len(body)
        wide = size.to_bytes((size.bit_length() + 7) // 8, "big")
        length = bytes([size]) if size < 0x80 else bytes([0x80 | len(wide)]) + wide
        return bytes([tag]) + length + body
    ecdsa_with_sha256 = bytes.fromhex("300a06082a8648ce3d040302")
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    request = x509.load_der_x509_csr(der(0x30, info + ecdsa_with_sha256 + der(0x03, b"\x00" + signature)))
    return request.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize("tag, value", [(0x0C, b"\xff\xfe not UTF-8"), (0x02, b"\x01\x02")],
                         ids=["utf8string-not-utf8", "integer"])
@pytest_twisted.ensureDeferred
async def test_csr_whose_subject_cannot_be_read_is_rejected_recorded_and_logs_no_error(csms, tag, value):
    """Found by fuzzing: such a CSR's signature verifies, but reading its subject raised in the
    handler, so the station got InternalError, a traceback was logged and nothing was recorded."""
    station = await csms.connect_booted("CP-ODD")
    bystander = await csms.connect_booted("CP-BYSTANDER")
    pem = csr_with_raw_organization("CP-ODD", tag, value)
    with capturedLogs() as events:
        assert await within(station.call("SignCertificate", {"csr": pem})) == {"status": "Rejected"}
        assert (await within(station.call("Heartbeat", {})))["currentTime"]
        assert (await within(bystander.call("Heartbeat", {})))["currentTime"]
    assert bad_log_events(events) == []
    assert calls(station, "CertificateSigned") == []
    [request] = await requests_of(csms, "CP-ODD")
    assert (request["status"], request["reason_code"]) == ("rejected", "csr_not_pem")
    status, body = await api(csms, "GET", "/stations/CP-ODD/security-events?origin=csms")
    assert [e["type"] for e in body["items"]] == ["CertificateSigningRequestRejected"]


@pytest_twisted.ensureDeferred
async def test_oversize_csr_is_a_schema_violation_and_nothing_is_stored(csms):
    station = await csms.connect_booted("CP-HUGE")
    before = await within(table_contents(csms))
    answer = await within(station.call_frame("SignCertificate", {"csr": "A" * 5501}))
    assert answer[0] == 4 and answer[2] in ("PropertyConstraintViolation", "FormationViolation",
                                            "OccurenceConstraintViolation", "TypeConstraintViolation"), answer
    assert await within(table_contents(csms)) == before


@pytest_twisted.ensureDeferred
async def test_organization_is_checked_when_configured(csms_factory):
    csms = await csms_factory("[plugin:security]\norganization_name = ACME Charging\n")
    station = await csms.connect_booted("CP-ORG")
    station.responses["CertificateSigned"] = {"status": "Accepted"}
    wrong, _ = make_csr("CP-ORG", organization="Other Corp")
    assert await within(station.call("SignCertificate", {"csr": wrong})) == {"status": "Rejected"}
    right, _ = make_csr("CP-ORG", organization="ACME Charging")
    assert await within(station.call("SignCertificate", {"csr": right})) == {"status": "Accepted"}
    await within(station.wait_for_call("CertificateSigned"))
    await within(security(csms).requests.settled())
    assert [(r["status"], r["reason_code"]) for r in await requests_of(csms, "CP-ORG")] == \
        [("accepted", None), ("rejected", "organization_mismatch")]


@pytest_twisted.ensureDeferred
async def test_certificate_signed_to_an_offline_station_is_recorded_as_send_failed(csms):
    station = await csms.connect_booted("CP-GONE")
    station.responses["CertificateSigned"] = None  # never answers: the connection is dropped meanwhile
    csr_pem, _ = make_csr("CP-GONE")
    assert await within(station.call("SignCertificate", {"csr": csr_pem})) == {"status": "Accepted"}
    await within(station.wait_for_call("CertificateSigned"))
    station.dropConnection(abort=True)
    await within(security(csms).requests.settled())
    [request] = await requests_of(csms, "CP-GONE")
    assert request["status"] == "send_failed" and request["reason"]


# -- the external CA ------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_external_ca_stores_the_csr_and_sends_the_chain_the_operator_posts(csms_factory):
    csms = await csms_factory("[plugin:security]\nexternal_ca = true\n")
    station = await csms.connect_booted("CP-EXT")
    station.responses["CertificateSigned"] = {"status": "Accepted"}
    csr_pem, key = make_csr("CP-EXT")
    assert await within(station.call("SignCertificate", {"csr": csr_pem})) == {"status": "Accepted"}
    [request] = await requests_of(csms, "CP-EXT")
    assert (request["status"], request["csr"]) == ("awaiting_certificate", csr_pem)
    assert calls(station, "CertificateSigned") == []
    path = f"/stations/CP-EXT/certificate-requests/{request['id']}/certificate"

    # The external CA's answer, built here: its root signs the CSR's key for CP-EXT.
    external_root, external_key = make_root("External CA")
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    now = datetime.now(timezone.utc)
    leaf = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(
        x509.load_pem_x509_certificate(external_root.encode()).subject).public_key(csr.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + timedelta(days=9))
        .sign(external_key, hashes.SHA256())).public_bytes(serialization.Encoding.PEM).decode()

    wrong_key = make_leaf("CP-EXT", external_root, external_key)
    for body, code in (({"certificate_chain": wrong_key + external_root}, "public_key_mismatch"),
                       ({"certificate_chain": "garbage"}, "certificate_not_pem"),
                       ({"certificate_chain": leaf + "trailing"}, "certificate_not_pem"),
                       ({"certificate_chain": leaf + leaf}, "chain_broken"),
                       ({"certificate_chain": leaf * 30}, "certificate_too_large")):
        status, answer = await api(csms, "POST", path, body)
        assert (status, error_of(answer)) == (422, code), body["certificate_chain"][:40]
    assert calls(station, "CertificateSigned") == []

    status, answer = await api(csms, "POST", path, {"certificate_chain": leaf + external_root})
    assert (status, answer["status"]) == (200, "Accepted")
    assert calls(station, "CertificateSigned") == [{"certificateChain": leaf + external_root}]
    [request] = await requests_of(csms, "CP-EXT")
    assert request["status"] == "accepted"
    status, answer = await api(csms, "POST", path, {"certificate_chain": leaf + external_root})
    assert (status, error_of(answer)) == (409, "certificate_request_not_awaiting")
    status, answer = await api(csms, "POST", "/stations/CP-EXT/certificate-requests/999/certificate",
                               {"certificate_chain": leaf})
    assert (status, error_of(answer)) == (404, "certificate_request_not_found")


# -- operator input -----------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_certificate_routes_refuse_bad_input_with_named_outcomes_and_send_nothing(csms):
    station = await csms.connect_booted("CP-INPUT")
    root, root_key = make_root()
    leaf = make_leaf("leaf", root, root_key)
    install = "/stations/CP-INPUT/certificates"
    cases = [
        (install, {"certificate_type": "V2GRootCertificate", "certificate": root}, 422, "validation_failed"),
        (install, {"certificate_type": "CentralSystemRootCertificate", "certificate": "garbage"}, 422,
         "certificate_not_pem"),
        (install, {"certificate_type": "CentralSystemRootCertificate", "certificate": root * 12}, 422,
         "certificate_too_large"),
        (install, {"certificate_type": "CentralSystemRootCertificate", "certificate": root + root}, 422,
         "not_one_certificate"),
        (install, {"certificate_type": "CentralSystemRootCertificate", "certificate": leaf}, 422,
         "not_a_root_certificate"),
        ("/stations/NOBODY/certificates", {"certificate_type": "CentralSystemRootCertificate",
                                           "certificate": root}, 404, "station_not_found"),
        ("/stations/CP-INPUT/certificates/delete", {}, 422, "hash_data_or_certificate"),
        ("/stations/CP-INPUT/certificates/delete", {"certificate": root, "certificate_hash_data": {
            "hashAlgorithm": "SHA256", "issuerNameHash": "a", "issuerKeyHash": "b", "serialNumber": "1"}}, 422,
         "hash_data_or_certificate"),
        ("/stations/CP-INPUT/certificates/delete", {"certificate_hash_data": {
            "hashAlgorithm": "MD5", "issuerNameHash": "a", "issuerKeyHash": "b", "serialNumber": "1"}}, 422,
         "validation_failed"),
        ("/stations/CP-INPUT/certificates/query", {"certificate_type": "Nope"}, 422, "validation_failed"),
        ("/stations/CP-INPUT/extended-trigger", {"requested_message": "DiagnosticsStatusNotification"}, 422,
         "validation_failed"),
    ]
    for path, body, status, code in cases:
        got, answer = await api(csms, "POST", path, body)
        assert (got, error_of(answer)) == (status, code), (path, body)
    status, answer, _ = await within(csms.api("POST", install, data=b"{" + b" " * 70000 + b"}",
                                              headers={"Content-Type": "application/json"}))
    assert (status, error_of(answer)) == (413, "body_too_large")
    assert station.received_calls == []


@pytest_twisted.ensureDeferred
async def test_extended_trigger_sends_every_requested_message_and_answers_the_station_status(csms):
    from csms_plugins.security.api_certificates import EXTENDED_TRIGGER_MESSAGES

    station = await csms.connect_booted("CP-ETM")
    station.responses["ExtendedTriggerMessage"] = lambda request: {
        "status": "NotImplemented" if request["requestedMessage"] == "LogStatusNotification" else "Accepted"}
    for message in EXTENDED_TRIGGER_MESSAGES:
        status, body = await api(csms, "POST", "/stations/CP-ETM/extended-trigger",
                                 {"requested_message": message, "connector_id": 1})
        assert (status, body["status"]) == (200, "NotImplemented" if message == "LogStatusNotification"
                                            else "Accepted")
    assert calls(station, "ExtendedTriggerMessage") == [{"requestedMessage": m, "connectorId": 1}
                                                        for m in EXTENDED_TRIGGER_MESSAGES]
    status, body = await api(csms, "POST", "/stations/CP-OFFLINE-ETM/extended-trigger",
                             {"requested_message": "Heartbeat"})
    assert (status, error_of(body)) == (404, "station_not_found")
    await api(csms, "POST", "/stations", {"id": "CP-OFFLINE-ETM"})
    status, body = await api(csms, "POST", "/stations/CP-OFFLINE-ETM/extended-trigger",
                             {"requested_message": "Heartbeat"})
    assert (status, error_of(body)) == (409, "station_offline")


# -- the CSMS CA: files and start-up ------------------------------------------------------------------------------


def start_service(config_text: str, database_url: str, clock=None):
    """A Central System whose security plugin has loaded its CA as start-up does (its ``security-ca``
    service, the first plugin service to start); StartupError when the CA cannot be used."""
    config = load_config(text=config_text)
    config.enabled_plugins = ["core", "security"]
    config.database.url = database_url
    service = CSMSService(config, clock=clock)
    [ca_service] = [s for s in service.plugin_services if s.name == "security-ca"]
    ca_service.startService()
    return service


def test_generated_ca_is_private_and_reused(tmp_path):
    ca_dir = tmp_path / "ca"
    database = f"sqlite:///{tmp_path}/db.sqlite"
    first = start_service(f"[plugin:security]\nca_dir = {ca_dir}\n", database).app.pm.get_plugin("security")
    assert stat.S_IMODE(os.stat(ca_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(ca_dir / "csms-ca-key.pem").st_mode) == 0o600
    assert first.certificates.ca.certificate_path == str(ca_dir / "csms-ca.pem")
    second = start_service(f"[plugin:security]\nca_dir = {ca_dir}\n", database).app.pm.get_plugin("security")
    assert second.certificates.ca.certificate == first.certificates.ca.certificate


def test_generating_the_ca_says_where_its_trust_anchor_is_once(tmp_path, logged):  # noqa: F811 (the fixture)
    """The CA is made on first start: the operator is told where (tls_ca, stations' CentralSystemRootCertificate)."""
    ca_dir = tmp_path / "ca"
    database = f"sqlite:///{tmp_path}/db.sqlite"
    start_service(f"[plugin:security]\nca_dir = {ca_dir}\n", database)
    start_service(f"[plugin:security]\nca_dir = {ca_dir}\n", database)
    ends = x509.load_pem_x509_certificate((ca_dir / "csms-ca.pem").read_bytes()).not_valid_after_utc
    lines = [text for level, namespace, text in logged if "Generated" in text]
    assert lines == [f"Generated the CSMS CA (CN=CSMS Root CA, valid until {ends:%Y-%m-%dT%H:%M:%SZ}) in {ca_dir}: its "
                     f"certificate {ca_dir / 'csms-ca.pem'} is the trust anchor for station certificates "
                     "([plugin:security] tls_ca)"], lines


def test_operators_own_ca_is_used(tmp_path):
    root, key = make_root("Operator CA", make_key("rsa", 2048))
    (tmp_path / "ca.pem").write_text(root)
    (tmp_path / "ca.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    service = start_service(f"[plugin:security]\nca_certificate_file = {tmp_path}/ca.pem\n"
                            f"ca_key_file = {tmp_path}/ca.key\nca_dir = {tmp_path}/unused\n",
                            f"sqlite:///{tmp_path}/db.sqlite")
    assert service.app.pm.get_plugin("security").certificates.ca.certificate_pem == root
    assert not (tmp_path / "unused").exists()


def bad_ca_files(tmp_path) -> dict:
    root, key = make_root("Operator CA")
    _, other_key = make_root("Another CA")
    leaf_key = make_key("ec")

    def key_pem(k, encryption=serialization.NoEncryption()):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption) \
            if k is key else k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    now = datetime.now(timezone.utc)
    not_a_ca = (x509.CertificateBuilder().subject_name(subject("leaf")).issuer_name(subject("leaf"))
                .public_key(leaf_key.public_key()).serial_number(1).not_valid_before(now)
                .not_valid_after(now + timedelta(days=1)).sign(leaf_key, hashes.SHA256())
                ).public_bytes(serialization.Encoding.PEM).decode()
    files = {"root.pem": root, "key.pem": key_pem(key).decode(), "other.key": key_pem(other_key).decode(),
             "garbage.pem": "garbage", "leaf.pem": not_a_ca, "leaf.key": key_pem(leaf_key).decode(),
             "encrypted.key": key_pem(key, serialization.BestAvailableEncryption(b"secret")).decode()}
    for file_name, text in files.items():
        (tmp_path / file_name).write_text(text)
    return {
        "missing": (f"{tmp_path}/nope.pem", f"{tmp_path}/key.pem", "cannot read"),
        "garbage": (f"{tmp_path}/garbage.pem", f"{tmp_path}/key.pem", "is not a PEM X.509 certificate"),
        "mismatch": (f"{tmp_path}/root.pem", f"{tmp_path}/other.key", "is not the key of the CA certificate"),
        "not a CA": (f"{tmp_path}/leaf.pem", f"{tmp_path}/leaf.key", "is not a CA certificate"),
        "encrypted": (f"{tmp_path}/root.pem", f"{tmp_path}/encrypted.key", "is not an unencrypted PEM private key"),
        "only one": (f"{tmp_path}/root.pem", "", "go together"),
    }


def test_unusable_ca_files_stop_start_up_with_one_line(tmp_path):
    for label, (certificate, key, message) in bad_ca_files(tmp_path).items():
        with pytest.raises(StartupError, match=message) as caught:
            start_service(f"[plugin:security]\nca_certificate_file = {certificate}\nca_key_file = {key}\n",
                          f"sqlite:///{tmp_path}/db.sqlite")
        assert "\n" not in str(caught.value), label


def test_a_ca_directory_missing_its_key_or_unwritable_stops_start_up(tmp_path):
    ca_dir = tmp_path / "ca"
    start_service(f"[plugin:security]\nca_dir = {ca_dir}\n", f"sqlite:///{tmp_path}/db.sqlite")
    (ca_dir / "csms-ca-key.pem").unlink()
    with pytest.raises(StartupError, match="exists without its key"):
        start_service(f"[plugin:security]\nca_dir = {ca_dir}\n", f"sqlite:///{tmp_path}/db.sqlite")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StartupError, match="cannot create the CA"):
        start_service(f"[plugin:security]\nca_dir = {blocker}/ca\n", f"sqlite:///{tmp_path}/db.sqlite")


def test_configuring_the_plugin_creates_no_ca_its_start_or_first_use_does(tmp_path):
    """csms-admin builds the Central System (every plugin configured) to read the migration histories:
    that alone must not generate a CA. Starting (the security-ca service) does, and so does a first use."""
    ca_dir = tmp_path / "ca"
    config = load_config(text=f"[plugin:security]\nca_dir = {ca_dir}\n")
    config.enabled_plugins = ["core", "security"]
    config.database.url = f"sqlite:///{tmp_path}/db.sqlite"
    service = CSMSService(config)
    assert not ca_dir.exists()
    certificates = service.app.pm.get_plugin("security").certificates
    assert certificates.ca.certificate_path == str(ca_dir / "csms-ca.pem")  # the first use generates it
    assert (ca_dir / "csms-ca-key.pem").exists()


def operator_ca_config(tmp_path, ca: Credentials) -> str:
    files = ca.write(tmp_path, "operator-ca")
    return f"[plugin:security]\nca_certificate_file = {files['certificate']}\nca_key_file = {files['key']}\n"


def clock_at(moment: datetime):
    from twisted.internet import task

    clock = task.Clock()
    clock.advance(moment.timestamp())
    return clock


def test_an_expired_or_not_yet_valid_operator_ca_stops_start_up_saying_what_to_do(tmp_path):
    ca = make_ca("Operator CA", days=10)
    config = operator_ca_config(tmp_path, ca)
    certificate = tmp_path / "operator-ca.pem"
    ends = ca.certificate.not_valid_after_utc
    with pytest.raises(StartupError) as caught:
        start_service(config, f"sqlite:///{tmp_path}/db.sqlite", clock=clock_at(ends + timedelta(seconds=1)))
    assert str(caught.value) == (
        f"[plugin:security] ca_certificate_file: the CA certificate O=Test CPO,CN=Operator CA in {certificate} "
        f"expired on {ends:%Y-%m-%dT%H:%M:%SZ}: certificates it signs are refused; give a renewed CA certificate "
        "(and its key) in ca_certificate_file and ca_key_file")
    starts = ca.certificate.not_valid_before_utc
    with pytest.raises(StartupError, match=f"is not valid before {starts:%Y-%m-%dT%H:%M:%SZ}: .*check this "
                                           "machine's clock"):
        start_service(config, f"sqlite:///{tmp_path}/db.sqlite", clock=clock_at(starts - timedelta(days=1)))


def test_an_expired_generated_ca_stops_start_up_saying_to_move_it_away(tmp_path):
    ca_dir = tmp_path / "ca"
    config = f"[plugin:security]\nca_dir = {ca_dir}\n"
    start_service(config, f"sqlite:///{tmp_path}/db.sqlite")
    later = clock_at(datetime.now(timezone.utc) + timedelta(days=3651))
    with pytest.raises(StartupError, match=rf"\[plugin:security\] ca_dir: the CA certificate CN=CSMS Root CA in "
                                           rf"{ca_dir}/csms-ca.pem expired on .*; move csms-ca.pem and "
                                           rf"csms-ca-key.pem out of {ca_dir} to have a new CA generated"):
        start_service(config, f"sqlite:///{tmp_path}/db.sqlite", clock=later)


def test_a_ca_ending_within_30_days_is_warned_about_and_its_end_is_a_metric(tmp_path, logged):  # noqa: F811
    ca = make_ca("Operator CA", days=20)
    service = start_service(operator_ca_config(tmp_path, ca), f"sqlite:///{tmp_path}/db.sqlite")
    ends = ca.certificate.not_valid_after_utc
    warnings = [text for level, _, text in logged if "expires on" in text]
    assert warnings == [f"The CSMS CA certificate O=Test CPO,CN=Operator CA in {tmp_path / 'operator-ca.pem'} "
                        f"expires on {ends:%Y-%m-%dT%H:%M:%SZ} (in 19 days): station certificates it signed stop "
                        "verifying then; give a renewed CA certificate (and its key) in ca_certificate_file and "
                        "ca_key_file"], warnings
    assert service.app.metrics.registry.get_sample_value(
        "csms_security_ca_certificate_not_after_timestamp_seconds") == ends.timestamp()
    logged.clear()
    start_service(operator_ca_config(tmp_path, make_ca("Operator CA", days=31)), f"sqlite:///{tmp_path}/db.sqlite")
    assert [text for level, _, text in logged if "expires on" in text] == []


@pytest_twisted.ensureDeferred
async def test_twistd_with_an_expired_ca_exits_1_with_one_line(tmp_path):
    from test_startup import failed_start, run_twistd, sqlite_url, write_config

    key = make_key("ec")
    now, name = datetime.now(timezone.utc), subject("Operator CA", "Test CPO")
    expired = Credentials((x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                           .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=30))
                           .not_valid_after(now - timedelta(days=1))
                           .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                           .sign(key, hashes.SHA256())), key)
    config = write_config(tmp_path, sqlite_url(tmp_path), enabled="core, firmware, security",
                          extra=operator_ca_config(tmp_path, expired))
    await failed_start(run_twistd(config, str(tmp_path)), "[plugin:security] ca_certificate_file: the CA "
                       f"certificate O=Test CPO,CN=Operator CA in {tmp_path / 'operator-ca.pem'} expired on ")


@pytest_twisted.ensureDeferred
async def test_twistd_generates_the_ca_on_first_start(tmp_path):
    from test_startup import run_twistd, sqlite_url, write_config

    ca_dir = tmp_path / "var" / "security" / "ca"
    config = write_config(tmp_path, sqlite_url(tmp_path), enabled="core, security",
                          extra=f"[plugin:security]\nca_dir = {ca_dir}\n")
    process = run_twistd(config, str(tmp_path))
    log = await process.logged("Central System ready")
    assert log.index("Generated the CSMS CA") < log.index("Central System ready")
    assert (ca_dir / "csms-ca.pem").exists() and (ca_dir / "csms-ca-key.pem").exists()
    process.transport.signalProcess("TERM")
    assert await process.finished() == 0, process.stdout + process.stderr


# -- interop: the ocpp package's ChargePoint ----------------------------------------------------------------------


class RenewingChargePoint(ChargePoint):
    """Answers ExtendedTriggerMessage(SignChargePointCertificate) by sending a CSR for its own id, and
    keeps the chain CertificateSigned brings (whitepaper A02)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.csr_pem, self.key = make_csr(self.id, make_key("rsa", 2048))
        self.sign_answers: asyncio.Queue = asyncio.Queue()
        self.chains: asyncio.Queue = asyncio.Queue()
        self.installed: list = []

    @on(Action.extended_trigger_message)
    def on_extended_trigger_message(self, requested_message, connector_id=None, **_):
        return call_result.ExtendedTriggerMessage(status="Accepted")

    @after(Action.extended_trigger_message)
    async def send_csr(self, requested_message, connector_id=None, **_):
        if requested_message == "SignChargePointCertificate":
            response = await self.call(call.SignCertificate(csr=self.csr_pem))
            await self.sign_answers.put(response.status)

    @on(Action.certificate_signed)
    async def on_certificate_signed(self, certificate_chain, **_):
        await self.chains.put(certificate_chain)
        return call_result.CertificateSigned(status="Accepted")

    @on(Action.install_certificate)
    def on_install_certificate(self, certificate_type, certificate, **_):
        self.installed.append((certificate_type, certificate))
        return call_result.InstallCertificate(status="Accepted")

    async def next(self, queue):
        return await asyncio.wait_for(queue.get(), 10)


@pytest_twisted.ensureDeferred
async def test_ocpp_charge_point_renews_its_certificate_and_installs_a_root(csms):
    runner = AsyncioThread()
    try:
        charge_point, reader = await runner.run(open_charge_point(RenewingChargePoint, csms.port, "CP-INTEROP-SEC"))
        status, body = await api(csms, "POST", "/stations/CP-INTEROP-SEC/extended-trigger",
                                 {"requested_message": "SignChargePointCertificate"})
        assert (status, body["status"]) == (200, "Accepted")
        assert await runner.run(charge_point.next(charge_point.sign_answers)) == "Accepted"
        chain_pem = await runner.run(charge_point.next(charge_point.chains))
        verify_chain(chain_pem, await ca_pem(csms))
        leaf = x509.load_pem_x509_certificates(chain_pem.encode())[0]
        assert leaf.public_key().public_numbers() == charge_point.key.public_key().public_numbers()
        await within(security(csms).requests.settled())
        assert [r["status"] for r in await requests_of(csms, "CP-INTEROP-SEC")] == ["accepted"]

        # The CSMS CA as the station's CentralSystemRootCertificate: what it needs to trust the CSMS's CA.
        ca = await ca_pem(csms)
        status, body = await api(csms, "POST", "/stations/CP-INTEROP-SEC/certificates",
                                 {"certificate_type": "CentralSystemRootCertificate", "certificate": ca})
        assert (status, body["status"]) == (200, "Accepted")
        assert charge_point.installed == [("CentralSystemRootCertificate", ca)]
        await runner.run(close_charge_point(charge_point, reader))
    finally:
        runner.stop()


@pytest_twisted.ensureDeferred
async def test_twistd_with_a_mismatched_ca_key_exits_1_with_one_line(tmp_path):
    from test_startup import run_twistd, sqlite_url, write_config

    files = bad_ca_files(tmp_path)
    certificate, key, _ = files["mismatch"]
    config = write_config(tmp_path, sqlite_url(tmp_path), enabled="core, firmware, security",
                          extra=f"[plugin:security]\nca_certificate_file = {certificate}\nca_key_file = {key}\n")
    process = run_twistd(config, str(tmp_path))
    assert await process.finished() == 1
    assert process.stderr == f"csms: cannot start: [plugin:security] {key} is not the key of the CA certificate {certificate}\n"
    assert "Traceback" not in process.stdout


@pytest_twisted.ensureDeferred
async def test_a_signing_failure_is_recorded_and_nothing_is_sent(csms, monkeypatch):
    station = await csms.connect_booted("CP-NOSIGN")

    def broken(*args):
        raise RuntimeError("the CA key is on a disconnected HSM")
    monkeypatch.setattr(security(csms).ca, "sign", broken)
    csr_pem, _ = make_csr("CP-NOSIGN")
    assert await within(station.call("SignCertificate", {"csr": csr_pem})) == {"status": "Accepted"}
    await within(security(csms).requests.settled())
    [request] = await requests_of(csms, "CP-NOSIGN")
    assert (request["status"], request["reason"], request["certificate_chain"]) == ("send_failed", "signing failed",
                                                                                     None)
    assert calls(station, "CertificateSigned") == []


def test_a_station_certificate_ends_with_its_ca_at_the_latest():
    """A CA with 20 days left signs a certificate for 365: it gets the 20 (what verifies, and what the
    station certificate expiry reports); with a year left, the whole validity."""
    from csms_plugins.security.ca import CertificateAuthority

    station_key = make_key("ec")
    csr = (x509.CertificateSigningRequestBuilder().subject_name(subject("CP-1", None))
           .sign(station_key, hashes.SHA256()))
    for days_left, expected_days in ((20, 20), (400, 365)):
        root = make_ca("Short CA", days=days_left)
        ca = CertificateAuthority(root.certificate, root.key, "/unused/ca.pem")
        now = root.certificate.not_valid_before_utc + timedelta(hours=1)
        signed = ca.sign(csr, now, timedelta(days=365))
        if days_left < 365:
            assert signed.not_valid_after_utc == root.certificate.not_valid_after_utc
        else:
            assert signed.not_valid_after_utc == now + timedelta(days=expected_days)
        signed.verify_directly_issued_by(root.certificate)
