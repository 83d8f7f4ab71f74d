"""Interoperability over TLS: the ``ocpp`` package's v16 ChargePoint on ``websockets`` with Python's ``ssl``
connects at security profile 2 (wss + Basic auth) and 3 (wss + client certificate)."""
from __future__ import annotations

import asyncio
import base64
import ssl
from contextlib import suppress

import pytest
import pytest_twisted
from ocpp.routing import on
from ocpp.v16 import ChargePoint, call, call_result
from ocpp.v16.enums import Action, ConfigurationStatus, RegistrationStatus, ResetStatus
from test_security_profiles import PASSWORD, PKI, connected_at, tls_config, tls_port, with_password
from twisted.internet import defer
from websockets.asyncio.client import connect

from csms.testing.asyncio_thread import AsyncioThread

TIMEOUT = 10


class SecureChargePoint(ChargePoint):
    """Answers what a profile upgrade sends (ChangeConfiguration, Reset) and remembers it."""

    def __init__(self, station_id, connection):
        super().__init__(station_id, connection, response_timeout=TIMEOUT)
        self.requests: list = []

    @on(Action.change_configuration)
    def on_change_configuration(self, key, value, **kwargs):
        self.requests.append(("ChangeConfiguration", key, value))
        return call_result.ChangeConfiguration(status=ConfigurationStatus.accepted)

    @on(Action.reset)
    def on_reset(self, type, **kwargs):
        self.requests.append(("Reset", type))
        return call_result.Reset(status=ResetStatus.accepted)


class Session:
    """One library charge point connection over wss, run on the asyncio thread."""

    charge_point_class = SecureChargePoint

    def __init__(self, runner: AsyncioThread):
        self.runner = runner
        self.websocket = None
        self.cp = None
        self._serving = None

    async def _open(self, url, station_id, context, headers):
        self.websocket = await connect(url, subprotocols=["ocpp1.6"], ssl=context, additional_headers=headers,
                                       open_timeout=TIMEOUT, close_timeout=TIMEOUT)
        self.cp = self.charge_point_class(station_id, self.websocket)
        self._serving = asyncio.ensure_future(self.cp.start())
        return self.websocket.subprotocol

    def open(self, url, station_id, context, headers=None) -> defer.Deferred:
        return self.runner.submit(self._open(url, station_id, context, headers or {}))

    def call(self, payload) -> defer.Deferred:
        return self.runner.submit(self.cp.call(payload, suppress=False))

    async def _close(self):
        if self._serving is not None:
            self._serving.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await self._serving
        if self.websocket is not None:
            await self.websocket.close()

    def close(self) -> defer.Deferred:
        return self.runner.submit(self._close())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def session():
    runner = AsyncioThread()
    session = Session(runner)
    yield session
    pytest_twisted.blockon(session.close())
    runner.stop()


def client_context(pki, station_credentials=None, directory=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.files["ca"]["certificate"])
    if station_credentials is not None:
        files = station_credentials.write(directory, "station")
        context.load_cert_chain(files["certificate"], files["key"])
    return context


async def boot(session) -> None:
    response = await session.call(call.BootNotification(charge_point_model="LibModel", charge_point_vendor="Lib"))
    assert response.status == RegistrationStatus.accepted


@pytest_twisted.ensureDeferred
async def test_library_charge_point_connects_at_profile_2(csms_factory, pki, session):
    csms = await csms_factory(config_text=tls_config(pki))
    await with_password(csms, "CP-LIB")
    token = base64.b64encode(f"CP-LIB:{PASSWORD}".encode()).decode()
    assert await session.open(f"wss://127.0.0.1:{tls_port(csms)}/ocpp/CP-LIB", "CP-LIB", client_context(pki),
                              {"Authorization": f"Basic {token}"}) == "ocpp1.6"
    await boot(session)
    assert (await connected_at(csms, "CP-LIB", 2))["connection_security_profile"] == 2


@pytest_twisted.ensureDeferred
async def test_library_charge_point_is_upgraded_from_profile_2_to_3(csms_factory, pki, session, tmp_path):
    csms = await csms_factory(config_text=tls_config(pki))
    await with_password(csms, "CP-LIB")
    url = f"wss://localhost:{tls_port(csms)}/ocpp/CP-LIB"
    token = base64.b64encode(f"CP-LIB:{PASSWORD}".encode()).decode()
    await session.open(url, "CP-LIB", client_context(pki), {"Authorization": f"Basic {token}"})
    await boot(session)
    await connected_at(csms, "CP-LIB", 2)
    status, body, _ = await csms.api("POST", "/stations/CP-LIB/security-profile/upgrade", json={"profile": 3})
    assert (status, body["change_configuration"], body["reset"]) == (200, "Accepted", "Accepted")
    assert session.cp.requests == [("ChangeConfiguration", "SecurityProfile", "3"), ("Reset", "Hard")]
    await session.close()
    # The station reboots at profile 3: its certificate (RSA here), no password.
    context = client_context(pki, pki.station("CP-LIB", key_type="rsa"), tmp_path)
    assert await session.open(url, "CP-LIB", context) == "ocpp1.6"
    await boot(session)
    assert (await connected_at(csms, "CP-LIB", 3))["connection_security_profile"] == 3
