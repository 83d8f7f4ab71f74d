"""Security extension, signed firmware: OCTT TC_080 and TC_081, the signature checks, and bad input.

The operator uploads the image with the Firmware plugin's route, then gives its signature and signing
certificate (checked by the CSMS); SignedUpdateFirmware offers the Firmware plugin's download URL. The
test station downloads over real HTTP and checks the signature as a station would.
"""
from __future__ import annotations

import base64
import datetime

import pytest
import pytest_twisted
import treq
from conftest import error_of, table_contents
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from twisted.internet import reactor

FIRMWARE = b"signed firmware image " * 500


async def transfer_tables(csms) -> dict:
    """The security and firmware plugins' rows (the stations' own rows change as they disconnect)."""
    return {name: rows for name, rows in (await table_contents(csms)).items()
            if name.startswith(("security_", "firmware_"))}



def make_signer(kind: str):
    """(private key, PEM of a self-signed code signing certificate for it)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa" else \
        ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Firmware signer ({kind})"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Vendor")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365)).sign(key, hashes.SHA256()))
    return key, cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def sign(key, data: bytes) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        raw = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        raw = key.sign(data, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(raw).decode("ascii")


def station_verifies(firmware: dict, data: bytes) -> bool:
    """What a station does after downloading: check the signature with the signing certificate's key."""
    key = x509.load_pem_x509_certificate(firmware["signingCertificate"].encode()).public_key()
    raw = base64.b64decode(firmware["signature"])
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(raw, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            key.verify(raw, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


async def upload_firmware(csms, name="signed-fw-1.0.bin", data=FIRMWARE):
    status, body, _ = await csms.api("POST", f"/firmware-files?name={name}", data=data)
    assert status == 201, body
    return body


async def add_signed(csms, firmware_id, signature, certificate, **extra):
    return await csms.api("POST", "/signed-firmware", json={"firmware_id": firmware_id, "signature": signature,
                                                            "signing_certificate": certificate, **extra})


async def sfsn(station, status, request_id):
    assert await station.call("SignedFirmwareStatusNotification", {"status": status, "requestId": request_id}) == {}


async def download(url: str) -> bytes:
    response = await treq.get(url, reactor=reactor)
    assert response.code == 200
    return await treq.content(response)


async def signed_view(csms, station_id):
    status, body, _ = await csms.api("GET", f"/stations/{station_id}/signed-firmware")
    assert status == 200, body
    return body


# -- OCTT TC_080 / TC_081 --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "ec"])
@pytest_twisted.ensureDeferred
async def test_TC_080_CSMS_secure_firmware_update(csms, kind):
    hosted = await upload_firmware(csms)
    key, certificate = make_signer(kind)
    signature = sign(key, FIRMWARE)
    status, signed, _ = await add_signed(csms, hosted["id"], signature, certificate)
    assert status == 201, signed
    assert (signed["verified"], signed["verify_error"], signed["url"]) == (True, None, hosted["url"])

    station = await csms.connect_booted("SF-80", connectors=1)
    station.responses["SignedUpdateFirmware"] = {"status": "Accepted"}
    status, body, _ = await csms.api("POST", "/stations/SF-80/signed-firmware-update",
                                     json={"signed_firmware_id": signed["id"], "retries": 2, "retry_interval": 30,
                                           "install_date": "2030-01-02T03:04:05Z"})
    assert status == 200, body
    request = await station.wait_for_call("SignedUpdateFirmware")
    assert request == body["request"]
    firmware = request["firmware"]
    # OCTT: firmware.location, signature and signingCertificate = the configured ones.
    assert (firmware["location"], firmware["signature"], firmware["signingCertificate"]) == \
        (hosted["url"], signature, certificate)
    assert (request["retries"], request["retryInterval"], firmware["installDateTime"]) == \
        (2, 30, "2030-01-02T03:04:05Z")
    request_id = request["requestId"]
    assert body["status"] == "Accepted"
    assert (body["update"]["answer"], body["update"]["status"]) == ("Accepted", "Requested")

    await sfsn(station, "Downloading", request_id)
    data = await download(firmware["location"])
    assert data == FIRMWARE and station_verifies(firmware, data)
    await sfsn(station, "Downloaded", request_id)
    await sfsn(station, "SignatureVerified", request_id)
    await station.status(1, "Unavailable")
    await sfsn(station, "Installing", request_id)
    await sfsn(station, "InstallRebooting", request_id)
    boot = await station.call("BootNotification", {"chargePointVendor": "TestVendor", "chargePointModel": "TestModel"})
    assert boot["status"] == "Accepted"
    await station.status(1, "Available")
    await sfsn(station, "Installed", request_id)

    view = await signed_view(csms, "SF-80")
    [update] = view["requests"]
    assert (update["id"], update["request_id"], update["signed_firmware_id"]) == \
        (body["update"]["id"], request_id, signed["id"])
    assert (update["answer"], update["status"], update["location"]) == ("Accepted", "Installed", hosted["url"])
    assert [h["status"] for h in view["history"]] == ["Installed", "InstallRebooting", "Installing",
                                                     "SignatureVerified", "Downloaded", "Downloading"]
    assert {(h["request_id"], h["row_id"], h["known_request"]) for h in view["history"]} == \
        {(request_id, update["id"], True)}


@pytest_twisted.ensureDeferred
async def test_TC_081_CSMS_secure_firmware_update_invalid_signature(csms):
    hosted = await upload_firmware(csms)
    _, certificate = make_signer("rsa")
    other_key, _ = make_signer("rsa")
    invalid = sign(other_key, FIRMWARE)  # well-formed, made with a key that is not the certificate's

    status, body, _ = await add_signed(csms, hosted["id"], invalid, certificate)
    assert (status, error_of(body)) == (422, "signature_mismatch")
    assert (await csms.api("GET", "/signed-firmware"))[1]["total"] == 0
    # TC_081 needs exactly such a signature sent: the operator says so, and it is recorded.
    status, signed, _ = await add_signed(csms, hosted["id"], invalid, certificate, verify=False)
    assert status == 201, signed
    assert signed["verified"] is False and "does not verify" in signed["verify_error"]

    station = await csms.connect_booted("SF-81")
    station.responses["SignedUpdateFirmware"] = {"status": "Accepted"}
    status, body, _ = await csms.api("POST", "/stations/SF-81/signed-firmware-update",
                                     json={"signed_firmware_id": signed["id"], "request_id": 81})
    assert status == 200, body
    firmware = (await station.wait_for_call("SignedUpdateFirmware"))["firmware"]
    assert firmware["signature"] == invalid
    await sfsn(station, "Downloading", 81)
    data = await download(firmware["location"])
    assert data == FIRMWARE and not station_verifies(firmware, data)
    await sfsn(station, "Downloaded", 81)
    await sfsn(station, "InvalidSignature", 81)

    view = await signed_view(csms, "SF-81")
    assert view["requests"][0]["status"] == "InvalidSignature"
    assert [h["status"] for h in view["history"]] == ["InvalidSignature", "Downloaded", "Downloading"]


# -- the station's answers and failed calls ------------------------------------------------------------


@pytest.mark.parametrize("answer", ["Rejected", "AcceptedCanceled", "InvalidCertificate", "RevokedCertificate"])
@pytest_twisted.ensureDeferred
async def test_signed_update_firmware_answer_is_recorded(csms, answer):
    hosted = await upload_firmware(csms)
    key, certificate = make_signer("ec")
    signed = (await add_signed(csms, hosted["id"], sign(key, FIRMWARE), certificate))[1]
    station = await csms.connect_booted("SF-ANS")
    station.responses["SignedUpdateFirmware"] = {"status": answer}
    status, body, _ = await csms.api("POST", "/stations/SF-ANS/signed-firmware-update",
                                     json={"signed_firmware_id": signed["id"]})
    assert (status, body["status"], body["update"]["answer"]) == (200, answer, answer)


@pytest_twisted.ensureDeferred
async def test_a_call_error_answer_is_recorded_on_the_update(csms):
    hosted = await upload_firmware(csms)
    key, certificate = make_signer("rsa")
    signed = (await add_signed(csms, hosted["id"], sign(key, FIRMWARE), certificate))[1]
    station = await csms.connect_booted("SF-ERR")
    station.responses["SignedUpdateFirmware"] = ("CALLERROR", "NotSupported")
    status, body, _ = await csms.api("POST", "/stations/SF-ERR/signed-firmware-update",
                                     json={"signed_firmware_id": signed["id"]})
    assert (status, error_of(body)) == (502, "station_call_error")
    [update] = (await signed_view(csms, "SF-ERR"))["requests"]
    assert (update["answer"], update["call_error"], update["status"]) == (None, "CALLERROR NotSupported", "Requested")


@pytest_twisted.ensureDeferred
async def test_signed_update_to_an_offline_station_records_nothing(csms):
    hosted = await upload_firmware(csms)
    key, certificate = make_signer("rsa")
    signed = (await add_signed(csms, hosted["id"], sign(key, FIRMWARE), certificate))[1]
    await (await csms.connect_booted("SF-OFF")).close()
    before = await transfer_tables(csms)
    status, body, _ = await csms.api("POST", "/stations/SF-OFF/signed-firmware-update",
                                     json={"signed_firmware_id": signed["id"]})
    assert (status, error_of(body)) == (409, "station_offline")
    assert await transfer_tables(csms) == before
    assert csms.app.pm.get_plugin("security").transfers.pending == {}


@pytest_twisted.ensureDeferred
async def test_signed_update_sent_through_the_generic_call_route_is_tracked(csms):
    station = await csms.connect_booted("SF-GEN")
    station.responses["SignedUpdateFirmware"] = {"status": "Accepted"}
    _, certificate = make_signer("ec")
    payload = {"requestId": 7, "firmware": {"location": "https://firmware.example.com/fw.bin",
                                            "retrieveDateTime": "2030-01-01T00:00:00Z",
                                            "signingCertificate": certificate, "signature": "c2ln"}}
    status, body, _ = await csms.api("POST", "/stations/SF-GEN/calls/SignedUpdateFirmware", json=payload)
    assert status == 200, body
    await sfsn(station, "Downloading", 7)
    [update] = (await signed_view(csms, "SF-GEN"))["requests"]
    assert (update["request_id"], update["signed_firmware_id"], update["answer"], update["status"]) == \
        (7, None, "Accepted", "Downloading")


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signature, certificate, code", [
    ("!!! not base64 !!!", "good", "signature_not_base64"),
    ("c2ln=extra", "good", "signature_not_base64"),
    ("valid", "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n", "signing_certificate_not_pem"),
    ("valid", "not a certificate at all", "signing_certificate_not_pem"),
    ("valid", "ed25519", "unsupported_signing_key"),
])
@pytest_twisted.ensureDeferred
async def test_unusable_signature_or_certificate_is_refused_even_with_verify_false(csms, signature, certificate,
                                                                                  code):
    hosted = await upload_firmware(csms)
    key, good = make_signer("rsa")
    if certificate == "ed25519":
        from cryptography.hazmat.primitives.asymmetric import ed25519
        other = ed25519.Ed25519PrivateKey.generate()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed")])
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(other.public_key())
                       .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                       .sign(other, None).public_bytes(serialization.Encoding.PEM).decode())
    certificate = good if certificate == "good" else certificate
    signature = sign(key, FIRMWARE) if signature == "valid" else signature
    before = await transfer_tables(csms)
    for verify in (True, False):
        status, body, _ = await add_signed(csms, hosted["id"], signature, certificate, verify=verify)
        assert (status, error_of(body)) == (422, code), body
    assert await transfer_tables(csms) == before


@pytest.mark.parametrize("field, value", [("signature", "A" * 801), ("signing_certificate", "A" * 5501),
                                          ("signature", ""), ("firmware_id", 0)])
@pytest_twisted.ensureDeferred
async def test_oversize_or_empty_fields_are_refused(csms, field, value):
    hosted = await upload_firmware(csms)
    key, certificate = make_signer("rsa")
    body = {"firmware_id": hosted["id"], "signature": sign(key, FIRMWARE), "signing_certificate": certificate,
            field: value}
    status, answer, _ = await csms.api("POST", "/signed-firmware", json=body)
    assert status == 422, answer
    assert (await csms.api("GET", "/signed-firmware"))[1]["total"] == 0


@pytest_twisted.ensureDeferred
async def test_unknown_firmware_and_signed_firmware_ids_are_404(csms):
    key, certificate = make_signer("rsa")
    status, body, _ = await add_signed(csms, 999, sign(key, FIRMWARE), certificate)
    assert (status, error_of(body)) == (404, "firmware_file_not_found")
    await csms.connect_booted("SF-404")
    status, body, _ = await csms.api("POST", "/stations/SF-404/signed-firmware-update", json={"signed_firmware_id": 5})
    assert (status, error_of(body)) == (404, "signed_firmware_not_found")
    status, body, _ = await csms.api("GET", "/signed-firmware/5")
    assert (status, error_of(body)) == (404, "signed_firmware_not_found")
    status, body, _ = await csms.api("POST", "/stations/NOPE/signed-firmware-update", json={"signed_firmware_id": 5})
    assert (status, error_of(body)) == (404, "station_not_found")


@pytest_twisted.ensureDeferred
async def test_a_deleted_firmware_file_is_not_offered(csms):
    hosted = await upload_firmware(csms)
    key, certificate = make_signer("rsa")
    signed = (await add_signed(csms, hosted["id"], sign(key, FIRMWARE), certificate))[1]
    assert (await csms.api("DELETE", f"/firmware-files/{hosted['id']}"))[0] == 204
    station = await csms.connect_booted("SF-GONE")
    status, body, _ = await csms.api("POST", "/stations/SF-GONE/signed-firmware-update",
                                     json={"signed_firmware_id": signed["id"]})
    assert (status, error_of(body)) == (409, "firmware_file_gone")
    assert [frame for frame in station.received_calls if frame[2] == "SignedUpdateFirmware"] == []


@pytest_twisted.ensureDeferred
async def test_status_notification_for_an_unknown_request_id_is_kept_unlinked(csms):
    station = await csms.connect_booted("SF-UNK")
    await sfsn(station, "Downloading", 4242)
    assert await station.call("SignedFirmwareStatusNotification", {"status": "Idle"}) == {}
    view = await signed_view(csms, "SF-UNK")
    assert view["requests"] == []
    assert [(h["status"], h["request_id"], h["row_id"], h["known_request"]) for h in view["history"]] == \
        [("Idle", None, None, True), ("Downloading", 4242, None, False)]


@pytest.mark.parametrize("payload, code", [
    ({"status": "Exploded", "requestId": 1}, "PropertyConstraintViolation"),
    ({"requestId": 1}, "OccurenceConstraintViolation"),
    ({"status": "Downloading", "requestId": "one"}, "TypeConstraintViolation"),
])
@pytest_twisted.ensureDeferred
async def test_malformed_signed_firmware_status_notification_gets_a_call_error(csms, payload, code):
    station = await csms.connect_booted("SF-BAD")
    before = await transfer_tables(csms)
    frame = await station.call_frame("SignedFirmwareStatusNotification", payload)
    assert frame[0] == 4 and frame[2] == code, frame
    assert await transfer_tables(csms) == before


# -- interop: the ocpp package's v16 ChargePoint as the station ------------------------------------------


@pytest.fixture
def asyncio_thread():
    from csms.testing.asyncio_thread import AsyncioThread

    runner = AsyncioThread()
    yield runner
    runner.stop()


def secure_charge_point_class():
    from ocpp.routing import on
    from ocpp.v16 import ChargePoint, call_result
    from ocpp.v16.enums import Action, LogStatus, UpdateFirmwareStatus

    class SecureChargePoint(ChargePoint):
        """Checks the CSMS's calls against the ocpp package's security-extension schemas on the way in."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.firmware_requests: list = []
            self.log_requests: list = []

        @on(Action.signed_update_firmware)
        def on_signed_update_firmware(self, request_id, firmware, **kwargs):
            self.firmware_requests.append({"request_id": request_id, "firmware": firmware, **kwargs})
            return call_result.SignedUpdateFirmware(status=UpdateFirmwareStatus.accepted)

        @on(Action.get_log)
        def on_get_log(self, log_type, request_id, log, **kwargs):
            self.log_requests.append({"log_type": log_type, "request_id": request_id, "log": log, **kwargs})
            return call_result.GetLog(status=LogStatus.accepted, filename="interop-security.log")

    return SecureChargePoint


async def open_charge_point(port: int, station_id: str):
    import asyncio

    from ocpp.v16 import call
    from websockets.asyncio.client import connect

    connection = await connect(f"ws://127.0.0.1:{port}/ocpp/{station_id}", subprotocols=["ocpp1.6"])
    charge_point = secure_charge_point_class()(station_id, connection)
    reader = asyncio.ensure_future(charge_point.start())
    response = await charge_point.call(call.BootNotification(charge_point_vendor="Interop", charge_point_model="SEC"))
    assert response.status == "Accepted"
    return charge_point, reader


async def close_charge_point(charge_point, reader):
    reader.cancel()
    await charge_point._connection.close()


@pytest_twisted.ensureDeferred
async def test_ocpp_charge_point_takes_a_signed_firmware_update_and_uploads_its_security_log(csms, asyncio_thread):
    from ocpp.v16 import call
    from ocpp.v16.enums import FirmwareStatus, UploadLogStatus

    hosted = await upload_firmware(csms, name="interop-signed.bin")
    key, certificate = make_signer("ec")
    signed = (await add_signed(csms, hosted["id"], sign(key, FIRMWARE), certificate))[1]
    charge_point, reader = await asyncio_thread.run(open_charge_point(csms.port, "IOP-SEC"))
    try:
        status, body, _ = await csms.api("POST", "/stations/IOP-SEC/signed-firmware-update",
                                         json={"signed_firmware_id": signed["id"], "retries": 1,
                                               "retrieve_date": "2030-05-01T12:00:00Z"})
        assert (status, body["status"]) == (200, "Accepted"), body
        [request] = charge_point.firmware_requests
        firmware = {"location": request["firmware"]["location"], "signature": request["firmware"]["signature"],
                    "signingCertificate": request["firmware"]["signing_certificate"]}
        assert request["firmware"]["retrieve_date_time"] == "2030-05-01T12:00:00Z"
        data = await download(firmware["location"])
        assert station_verifies(firmware, data)
        request_id = request["request_id"]
        for firmware_status in (FirmwareStatus.downloading, FirmwareStatus.downloaded,
                                FirmwareStatus.signature_verified, FirmwareStatus.installing,
                                FirmwareStatus.installed):
            await asyncio_thread.run(charge_point.call(
                call.SignedFirmwareStatusNotification(status=firmware_status, request_id=request_id)))
        view = await signed_view(csms, "IOP-SEC")
        assert view["requests"][0]["status"] == "Installed" and len(view["history"]) == 5

        status, body, _ = await csms.api("POST", "/stations/IOP-SEC/logs",
                                         json={"log_type": "SecurityLog", "protocol": "http"})
        assert (status, body["filename"]) == (200, "interop-security.log"), body
        [log_request] = charge_point.log_requests
        assert log_request["log_type"] == "SecurityLog"
        location = log_request["log"]["remote_location"]
        await asyncio_thread.run(charge_point.call(
            call.LogStatusNotification(status=UploadLogStatus.uploading, request_id=log_request["request_id"])))
        log = b"interop security log\n" * 30
        response = await treq.put(location + "interop-security.log", data=log, reactor=reactor)
        assert response.code == 201, await treq.content(response)
        await asyncio_thread.run(charge_point.call(
            call.LogStatusNotification(status=UploadLogStatus.uploaded, request_id=log_request["request_id"])))
        status, _, response = await csms.api("GET", f"/log-requests/{body['request']['id']}/content")
        assert (status, await treq.content(response)) == (200, log)
    finally:
        await asyncio_thread.run(close_charge_point(charge_point, reader))
