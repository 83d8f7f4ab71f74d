"""OCTT TC_074 end to end over mutual TLS: a station gets a certificate from the CSMS CA
(ExtendedTriggerMessage SignChargePointCertificate, SignCertificate, CertificateSigned), then connects
to the TLS listener at security profile 3 presenting it. The listener trusts the CSMS CA's own file,
as etc/csms.ini advises for it (``tls_ca = <ca_dir>/csms-ca.pem``).

With the test station (csms.testing) and with the ``ocpp`` package's v16 ChargePoint on ``websockets``.
"""
from __future__ import annotations

import base64

import pytest
import pytest_twisted
from conftest import within
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from ocpp.routing import on
from ocpp.v16 import call, call_result
from ocpp.v16.enums import Action, CertificateSignedStatus, TriggerMessageStatus
from OpenSSL import crypto
from test_security_certificates import renew, security
from test_security_profiles import (ORGANIZATION, PASSWORD, booted, connect_tls, connected_at, refused, tls_config,
                                    tls_port, with_password)
from test_security_tls_interop import SecureChargePoint, Session, boot, client_context
from test_security_tls_interop import pki  # noqa: F401  (fixture)
from twisted.internet import defer, reactor

from csms.testing.asyncio_thread import AsyncioThread
from csms.testing.pki import Credentials, make_csr

#: The file name the generated CA is written under in ca_dir (etc/csms.ini's tls_ca names it).
CA_FILE = "csms-ca.pem"


async def csms_trusting_its_own_ca(csms_factory, pki, tmp_path):
    ca_dir = tmp_path / "ca"
    return await csms_factory(config_text=tls_config(pki, ca=False, extra=f"ca_dir = {ca_dir}\n"
                                                                          f"tls_ca = {ca_dir / CA_FILE}\n"))


def signed_credentials(chain_pem: str, key) -> Credentials:
    leaf, *issuers = x509.load_pem_x509_certificates(chain_pem.encode())
    return Credentials(leaf, key, issuers)


def assert_fit_for_tls_client_authentication(chain_pem: str, ca_path: str) -> None:
    """What OpenSSL wants of a client certificate (the handshake checks its purpose, sslclient) and of
    its trust anchor: the CA file as pyOpenSSL loads it verifies the leaf."""
    leaf = x509.load_pem_x509_certificates(chain_pem.encode())[0]
    assert ExtendedKeyUsageOID.CLIENT_AUTH in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    store = crypto.X509Store()
    store.load_locations(ca_path)
    crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf)).verify_certificate()


@pytest_twisted.ensureDeferred
async def test_TC_074_CSMS_the_certificate_the_csms_signed_admits_the_station_at_profile_3(csms_factory, pki,
                                                                                             tmp_path):
    csms = await csms_trusting_its_own_ca(csms_factory, pki, tmp_path)
    ca_path = security(csms).ca.certificate_path
    assert ca_path == str(tmp_path / "ca" / CA_FILE)
    # A certificate from any other CA is not one the listener trusts now.
    assert (await refused(connect_tls(csms, "CP-74", pki.client_options(pki.station("CP-74"))))).status is None

    await with_password(csms, "CP-74")
    station = await connect_tls(csms, "CP-74", pki.client_options(), password=PASSWORD)
    await booted(station)
    await connected_at(csms, "CP-74", 2)
    station.responses["CertificateSigned"] = {"status": "Accepted"}
    csr, key = make_csr("CP-74", ORGANIZATION, key_type="rsa")
    chain_pem = await renew(csms, station, "CP-74", csr.public_bytes(serialization.Encoding.PEM).decode())
    assert_fit_for_tls_client_authentication(chain_pem, ca_path)
    await station.close()

    # The station reconnects with its new certificate, and no password: profile 3.
    credentials = signed_credentials(chain_pem, key)
    station = await connect_tls(csms, "CP-74", pki.client_options(credentials))
    await booted(station)
    body = await connected_at(csms, "CP-74", 3)
    assert (body["security_profile"], body["connection_security_profile"]) == (3, 3)
    # The same certificate is no other station's: its CN names CP-74.
    await with_password(csms, "CP-75")
    assert (await refused(connect_tls(csms, "CP-75", pki.client_options(credentials), password=PASSWORD))
            ).status == 403
    assert not csms.app.is_connected("CP-75")


class RenewingChargePoint(SecureChargePoint):
    """Answers ExtendedTriggerMessage(SignChargePointCertificate) with a SignCertificate of a fresh CSR,
    and keeps the chain CertificateSigned brings."""

    def __init__(self, station_id, connection):
        super().__init__(station_id, connection)
        self.csr, self.key = make_csr(station_id, ORGANIZATION, key_type="ec")
        #: Fires (on the reactor thread) with the chain CertificateSigned brought.
        self.signed = defer.Deferred()

    @on(Action.extended_trigger_message)
    def on_extended_trigger_message(self, requested_message, **kwargs):
        self.requests.append(("ExtendedTriggerMessage", requested_message))
        return call_result.ExtendedTriggerMessage(status=TriggerMessageStatus.accepted)

    @on(Action.certificate_signed)
    def on_certificate_signed(self, certificate_chain, **kwargs):
        reactor.callFromThread(self.signed.callback, certificate_chain)
        return call_result.CertificateSigned(status=CertificateSignedStatus.accepted)


class RenewingSession(Session):
    charge_point_class = RenewingChargePoint


@pytest.fixture
def renewing_session():
    runner = AsyncioThread()
    session = RenewingSession(runner)
    yield session
    pytest_twisted.blockon(session.close())
    runner.stop()


@pytest_twisted.ensureDeferred
async def test_library_charge_point_connects_at_profile_3_with_the_certificate_the_csms_signed(
        csms_factory, pki, renewing_session, tmp_path):
    session = renewing_session
    csms = await csms_trusting_its_own_ca(csms_factory, pki, tmp_path)
    await with_password(csms, "CP-LIB")
    url = f"wss://localhost:{tls_port(csms)}/ocpp/CP-LIB"
    token = base64.b64encode(f"CP-LIB:{PASSWORD}".encode()).decode()
    await session.open(url, "CP-LIB", client_context(pki), {"Authorization": f"Basic {token}"})
    await boot(session)
    await connected_at(csms, "CP-LIB", 2)

    status, body, _ = await csms.api("POST", "/stations/CP-LIB/extended-trigger",
                                     json={"requested_message": "SignChargePointCertificate"})
    assert (status, body["status"]) == (200, "Accepted")
    cp = session.cp
    csr_pem = cp.csr.public_bytes(serialization.Encoding.PEM).decode()
    response = await session.call(call.SignCertificate(csr=csr_pem))
    assert response.status == "Accepted"
    chain_pem = await within(cp.signed)
    await within(security(csms).requests.settled())
    await session.close()

    context = client_context(pki, signed_credentials(chain_pem, cp.key), tmp_path)
    assert await session.open(url, "CP-LIB", context) == "ocpp1.6"
    await boot(session)
    assert (await connected_at(csms, "CP-LIB", 3))["connection_security_profile"] == 3

