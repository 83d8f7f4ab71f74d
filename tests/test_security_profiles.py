"""Security profiles 1 to 3 (OCPP 1.6 Security whitepaper §2; OCTT TC_073, TC_083, TC_085-TC_088) over
real TLS on loopback, with certificates the tests generate (csms.testing.pki)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from conftest import error_of
from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLContextFactory, ISSLTransport
from twisted.logger import LogLevel
from zope.interface import implementer

from test_hardening_ws import disconnect_detail, logged  # noqa: F401  (logged: a fixture)

from csms.passwords import hash_password
from csms.service import StartupError
from csms.testing import StationRefused
from csms.testing.pki import make_ca, make_certificate
from csms.testing.station import connect_station
from csms_plugins.security.tls import TLSListener, tls_failure_kind

WAIT = 10
BOOT = {"chargePointVendor": "TestVendor", "chargePointModel": "TestModel"}
PASSWORD = "s3cret-passw0rd!"
ORGANIZATION = "Test CPO"


# -- the test PKI ---------------------------------------------------------------------------------


class PKI:
    """Every certificate the tests use, written once per module."""

    def __init__(self, directory):
        self.directory = directory
        self.ca = make_ca("CSMS Test Root CA", ORGANIZATION)
        self.foreign_ca = make_ca("Someone Else's CA", "Someone Else")
        self.files = {
            "ca": self.ca.write(directory, "ca"),
            "server_rsa": make_certificate(self.ca, "localhost", key_type="rsa", server=True).write(directory, "rsa"),
            "server_ec": make_certificate(self.ca, "localhost", key_type="ec", server=True).write(directory, "ec"),
        }
        self.trust_root = ssl.Certificate.loadPEM(self.ca.certificate_pem)

    def station(self, common_name: str, ca=None, organization: str | None = ORGANIZATION, **kwargs):
        return make_certificate(ca or self.ca, common_name, organization, **kwargs)

    def client_options(self, credentials=None, **extra):
        """Client TLS options trusting the test CA, presenting ``credentials`` (a station certificate) if given."""
        client_certificate = None
        if credentials is not None:
            client_certificate = ssl.PrivateCertificate.loadPEM(credentials.certificate_pem + credentials.key_pem)
        return ssl.optionsForClientTLS("localhost", trustRoot=self.trust_root, clientCertificate=client_certificate,
                                       extraCertificateOptions=extra or None)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


def tls_config(pki, key: str = "server_rsa", ca: bool = True, extra: str = "", ocpp: str = "") -> str:
    files = pki.files[key]
    text = (f"[plugin:security]\ntls_endpoint = tcp:0:interface=127.0.0.1\ntls_certificate = {files['chain']}\n"
            f"tls_private_key = {files['key']}\norganization_name = {ORGANIZATION}\n")
    if ca:
        text += f"tls_ca = {pki.files['ca']['certificate']}\n"
    return text + extra + (f"[ocpp]\n{ocpp}" if ocpp else "")


@pytest.fixture
def tls_csms(csms_factory, pki):
    return pytest_twisted.blockon(defer.ensureDeferred(csms_factory(config_text=tls_config(pki))))


def profiles_of(csms):
    return csms.app.pm.get_plugin("security").profiles


def tls_port(csms) -> int:
    return profiles_of(csms).port.getHost().port


def connect_tls(csms, station_id: str, tls, **kwargs):
    """A test station over TLS to the security plugin's listener (cleaned up with the CSMS)."""
    def keep(station):
        csms.stations.append(station)
        return station
    return connect_station(csms.reactor, tls_port(csms), station_id, tls=tls, **kwargs).addCallback(keep)


async def refused(d) -> StationRefused:
    with pytest.raises(StationRefused) as info:
        await d
    return info.value


async def with_password(csms, station_id: str, password: str = PASSWORD) -> None:
    if not await csms.app.station_store.create(station_id, password_hash=hash_password(password)):
        await csms.app.station_store.update(station_id, password_hash=hash_password(password))


async def booted(station) -> None:
    assert (await station.call("BootNotification", BOOT, timeout=WAIT))["status"] == "Accepted"


async def stored_profile(csms, station_id: str) -> dict:
    status, body, _ = await csms.api("GET", f"/stations/{station_id}/security-profile")
    assert status == 200, body
    return body


async def connected_at(csms, station_id: str, profile: int, floor: int | None = None):
    """Waits until the station's connection at ``profile`` is recorded (the floor is written after it
    opens): its floor ``floor`` if given, else at least ``profile``."""
    for _ in range(200):
        body = await stored_profile(csms, station_id)
        if body["online"] and body["connection_security_profile"] == profile and (
                body["security_profile"] == floor if floor is not None else body["security_profile"] >= profile):
            return body
        await deferLater(0.01)
    raise AssertionError(f"{station_id} never recorded at profile {profile}: {body}")


def deferLater(seconds: float):
    from twisted.internet import task
    return task.deferLater(reactor, seconds, lambda: None)


# -- a raw TLS client, to see what the handshake negotiates ---------------------------------------


@implementer(IHandshakeListener)
class HandshakeProbe(protocol.Protocol):
    """Fires ``done`` with (protocol version, cipher) once the handshake completes, or fails with why not."""

    def __init__(self):
        self.done = defer.Deferred()

    def handshakeCompleted(self):
        connection = self.transport.getHandle()
        self.done.callback((connection.get_protocol_version_name(), connection.get_cipher_name()))
        self.transport.loseConnection()

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.errback(reason)


@implementer(IOpenSSLContextFactory)
class RawContext:
    """An old-style client context factory: pyOpenSSL's context as the test sets it up (any version, any suite)."""

    def __init__(self, min_version=SSL.TLS1_2_VERSION, max_version=SSL.TLS1_3_VERSION, ciphers: bytes | None = None):
        self.context = SSL.Context(SSL.TLS_METHOD)
        self.context.set_min_proto_version(min_version)
        self.context.set_max_proto_version(max_version)
        if ciphers is not None:
            self.context.set_cipher_list(ciphers)

    def getContext(self):
        return self.context


def handshake(csms, context) -> defer.Deferred:
    probe = HandshakeProbe()
    factory = protocol.ClientFactory.forProtocol(lambda: probe)
    factory.noisy = False  # no "Starting factory" lines in the logs the abuse tests count
    reactor.connectSSL("127.0.0.1", tls_port(csms), factory, context)
    return probe.done.addTimeout(WAIT, reactor)


def counted(csms, total: int = 1) -> defer.Deferred:
    """Fires with the listener's outcomes once it has counted ``total`` connections that never finished
    their handshake (fails after WAIT seconds)."""
    listener = profiles_of(csms).listener
    if sum(listener.outcomes.values()) >= total:
        return defer.succeed(dict(listener.outcomes))
    done = defer.Deferred()
    count = listener.outcome

    def counting(*args, **kwargs):
        count(*args, **kwargs)
        if sum(listener.outcomes.values()) >= total and not done.called:
            # On the reactor's next turn: the connection counted finishes closing first (and logs what it logs).
            reactor.callLater(0, lambda: done.called or done.callback(dict(listener.outcomes)))
    listener.outcome = counting
    return done.addTimeout(WAIT, reactor)


async def outcome_counted(csms, name: str, count: int = 1) -> None:
    outcomes = await counted(csms, count)
    assert outcomes.get(name, 0) >= count, outcomes


# -- TC_086: the TLS server side ------------------------------------------------------------------


def tls_lines(logged) -> list[str]:  # noqa: F811 (the fixture)
    return [text for _, namespace, text in logged if namespace == "csms.security.tls"]


@pytest_twisted.ensureDeferred
async def test_TC_086_CSMS_tls_1_1_client_is_refused(csms_factory, pki, logged):  # noqa: F811 (the fixture)
    # A suite TLS 1.1 has, at OpenSSL's lowest security level: only the CSMS's TLS 1.2 minimum refuses it.
    csms = await csms_factory(config_text=tls_config(pki, extra="tls_ciphers = AES128-SHA:@SECLEVEL=0\n"))
    with pytest.raises(SSL.Error):
        await handshake(csms, RawContext(SSL.TLS1_1_VERSION, SSL.TLS1_1_VERSION, b"AES128-SHA:@SECLEVEL=0"))
    await outcome_counted(csms, "tls_failed")
    assert profiles_of(csms).listener.tls_failures == {"protocol": 1}
    assert any("unsupported protocol" in line for line in tls_lines(logged)), tls_lines(logged)
    assert (await handshake(csms, RawContext(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION, b"AES128-SHA:@SECLEVEL=0"))
            ) == ("TLSv1.2", "AES128-SHA")


@pytest.mark.parametrize("key,cipher", [
    ("server_ec", "ECDHE-ECDSA-AES128-GCM-SHA256"), ("server_ec", "ECDHE-ECDSA-AES256-GCM-SHA384"),
    ("server_rsa", "AES128-GCM-SHA256"), ("server_rsa", "AES256-GCM-SHA384"),
    ("server_rsa", "ECDHE-RSA-AES128-GCM-SHA256"), ("server_rsa", "ECDHE-RSA-AES256-GCM-SHA384"),
])
@pytest_twisted.ensureDeferred
async def test_TC_086_CSMS_the_required_cipher_suites_are_offered_over_tls_1_2(csms_factory, pki, key, cipher):
    csms = await csms_factory(config_text=tls_config(pki, key=key))
    version, negotiated = await handshake(csms, RawContext(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION, cipher.encode()))
    assert (version, negotiated) == ("TLSv1.2", cipher)


@pytest.mark.parametrize("cipher", ["AES128-SHA256", "ECDHE-RSA-AES128-SHA", "ECDHE-RSA-CHACHA20-POLY1305",
                                    "DHE-RSA-AES128-GCM-SHA256"])
@pytest_twisted.ensureDeferred
async def test_TC_086_CSMS_other_tls_1_2_suites_are_refused(tls_csms, cipher):
    with pytest.raises(SSL.Error):
        await handshake(tls_csms, RawContext(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION,
                                             f"{cipher}:@SECLEVEL=0".encode()))
    await outcome_counted(tls_csms, "tls_failed")
    assert profiles_of(tls_csms).listener.tls_failures == {"protocol": 1}


@pytest_twisted.ensureDeferred
async def test_TC_086_CSMS_tls_1_3_is_accepted_unless_turned_off(csms_factory, pki):
    csms = await csms_factory(config_text=tls_config(pki))
    assert (await handshake(csms, RawContext()))[0] == "TLSv1.3"
    csms = await csms_factory(config_text=tls_config(pki, extra="tls13 = false\n"))
    assert (await handshake(csms, RawContext()))[0] == "TLSv1.2"


@pytest.mark.parametrize("key_type,size,accepted", [("rsa", 2048, True), ("rsa", 1024, False),
                                                    ("ec", 224, True), ("ec", 256, True)])
@pytest_twisted.ensureDeferred
async def test_TC_086_CSMS_server_key_size_is_checked_at_start_up(csms_factory, pki, tmp_path, key_type, size,
                                                                 accepted):
    files = make_certificate(pki.ca, "localhost", key_type=key_type, key_size=size, server=True).write(tmp_path, "k")
    config = tls_config(pki).replace(pki.files["server_rsa"]["chain"], files["chain"]).replace(
        pki.files["server_rsa"]["key"], files["key"])
    if accepted:
        csms = await csms_factory(config_text=config)
        if size > 224:  # P-224 is allowed, but no TLS 1.3 signature scheme (nor OpenSSL's default groups) has it
            assert (await handshake(csms, RawContext()))[0] == "TLSv1.3"
    else:
        with pytest.raises(StartupError, match=rf"has an RSA key of {size} bits \(at least 2048 are required\)"):
            await csms_factory(config_text=config)


@pytest.mark.parametrize("case,message", [
    ("expired", r"tls_certificate: the certificate CN=localhost in .* expired on \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"),
    ("not yet valid", r"tls_certificate: the certificate CN=localhost in .* is not valid before \d{4}-"),
])
@pytest_twisted.ensureDeferred
async def test_a_server_certificate_stations_would_refuse_as_expired_stops_start_up(csms_factory, pki, tmp_path,
                                                                                   case, message):
    """Stations refuse an expired (or not yet valid) server certificate in every handshake: starting with one
    would report ready while no station could connect over TLS."""
    now = datetime.now(timezone.utc)
    if case == "expired":
        dates = {"not_before": now - timedelta(days=400), "not_after": now - timedelta(days=1)}
    else:
        dates = {"not_before": now + timedelta(days=1), "not_after": now + timedelta(days=400)}
    files = make_certificate(pki.ca, "localhost", key_type="ec", server=True, **dates).write(tmp_path, case[:3])
    config = tls_config(pki).replace(pki.files["server_rsa"]["chain"], files["chain"]).replace(
        pki.files["server_rsa"]["key"], files["key"])
    with pytest.raises(StartupError, match=message) as info:
        await csms_factory(config_text=config)
    assert "\n" not in str(info.value) and "renew" in str(info.value)


@pytest_twisted.ensureDeferred
async def test_a_server_certificate_near_its_end_is_warned_about_and_its_end_is_a_metric(csms_factory, pki, tmp_path,
                                                                                        logged):  # noqa: F811
    now = datetime.now(timezone.utc).replace(microsecond=0)
    not_after = now + timedelta(days=10)
    files = make_certificate(pki.ca, "localhost", key_type="ec", server=True, not_after=not_after).write(tmp_path, "e")
    config = tls_config(pki).replace(pki.files["server_rsa"]["chain"], files["chain"]).replace(
        pki.files["server_rsa"]["key"], files["key"])
    csms = await csms_factory(config_text=config)
    warnings = [text for level, _, text in logged if level == LogLevel.warn and "CN=localhost" in text]
    assert len(warnings) == 1 and "in 9 days" in warnings[0] and files["chain"] in warnings[0], warnings
    registry = csms.app.metrics.registry
    assert registry.get_sample_value("csms_security_tls_certificate_not_after_timestamp_seconds") == \
        not_after.timestamp()


@pytest_twisted.ensureDeferred
async def test_without_a_tls_listener_the_server_certificate_end_metric_has_no_sample(csms_factory):
    # A sample of 0 would read as a certificate that expired in 1970: the documented alert
    # (csms_security_tls_certificate_not_after_timestamp_seconds - time() < 14 * 86400) would fire on
    # every Central System that serves no TLS, the shipped configuration's among them.
    csms = await csms_factory(config_text="[plugin:security]\ntls_endpoint =\n")
    registry = csms.app.metrics.registry
    assert registry.get_sample_value("csms_security_tls_certificate_not_after_timestamp_seconds") is None


def _replace_file(config: str, which: str, path: str, pki) -> str:
    return config.replace(pki.files["server_rsa"][which], path)


@pytest.mark.parametrize("case,message", [
    ("missing certificate", r"tls_certificate: cannot read the certificate .*: No such file or directory"),
    ("garbage certificate", r"tls_certificate: .* holds no PEM certificate"),
    ("key of another certificate", r"tls_private_key: .* is not the key of the certificate in"),
    ("garbage key", r"tls_private_key: cannot use .*: not an unencrypted PEM private key"),
    ("missing CA", r"tls_ca: cannot read the CA certificate"),
    ("ssl endpoint", r"tls_endpoint: give a tcp: endpoint"),
])
@pytest_twisted.ensureDeferred
async def test_unusable_tls_settings_fail_start_up_with_one_line(csms_factory, pki, tmp_path, case, message):
    config = tls_config(pki)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    if case == "missing certificate":
        config = _replace_file(config, "chain", str(tmp_path / "nowhere.pem"), pki)
    elif case == "garbage certificate":
        config = _replace_file(config, "chain", str(garbage), pki)
    elif case == "key of another certificate":
        config = _replace_file(config, "key", pki.files["server_ec"]["key"], pki)
    elif case == "garbage key":
        config = _replace_file(config, "key", str(garbage), pki)
    elif case == "missing CA":
        config = config.replace(pki.files["ca"]["certificate"], str(tmp_path / "no-ca.pem"))
    else:
        config = config.replace("tls_endpoint = tcp:0", "tls_endpoint = ssl:0")
    with pytest.raises(StartupError, match=message) as info:
        await csms_factory(config_text=config)
    assert "\n" not in str(info.value)


# -- handshake abuse ------------------------------------------------------------------------------


class RawClient(protocol.Protocol):
    """A TCP client that writes ``data`` (nothing: it stays silent) and fires ``lost`` when the connection ends."""

    def __init__(self, data: bytes = b"", close: bool = False):
        self.data = data
        self.close = close
        self.lost = defer.Deferred()

    def connectionMade(self):
        if self.data:
            self.transport.write(self.data)
        if self.close:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.lost.callback(None)


async def raw_client(csms, data: bytes = b"", close: bool = False) -> RawClient:
    client = RawClient(data, close)
    await protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", tls_port(csms))
    return client


HTTP_UPGRADE = (b"GET /ocpp/CP-PLAIN HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Protocol: ocpp1.6\r\n\r\n")


async def bad_handshake(csms, pki, case: str) -> None:
    """One connection whose TLS handshake fails the way ``case`` says; returns once the client saw it end."""
    if case == "plain http":
        await (await raw_client(csms, HTTP_UPGRADE)).lost.addTimeout(WAIT, reactor)
        return
    context = {"untrusted certificate": lambda: pki.client_options(pki.station("CP-1", ca=pki.foreign_ca)),
               "no shared suite": lambda: RawContext(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION,
                                                     b"AES128-SHA256:@SECLEVEL=0")}[case]()
    # Over TLS 1.3 the client finishes its side before the CSMS refuses its certificate: either way is fine.
    await handshake(csms, context).addErrback(lambda _: None)


@pytest.mark.parametrize("reasons,kind", [
    ("http request", "not_tls"), ("https proxy request", "not_tls"), ("wrong version number", "not_tls"),
    ("data length too long; record layer failure", "not_tls"), ("unsupported protocol", "protocol"),
    ("no shared cipher", "protocol"), ("certificate verify failed", "certificate"),
    ("tlsv1 alert unknown ca", "certificate"), ("internal error", "other"),
])
def test_tls_failures_are_sorted_into_kinds_by_openssls_reasons(reasons, kind):
    assert tls_failure_kind(reasons) == kind


def past_every_deadline(csms) -> None:
    """Moves the CSMS's clock past the handshake deadline of every connection made so far, and a summary."""
    csms.clock.advance(profiles_of(csms).listener.handshake_timeout + TLSListener.SUMMARY_INTERVAL + 1)


def tls_failure_samples(csms) -> dict:
    return {(sample.labels["outcome"], sample.labels["kind"]): sample.value
            for family in csms.app.metrics.registry.collect() if family.name == "csms_security_tls_handshakes_failed"
            for sample in family.samples if sample.name.endswith("_total")}


@pytest.mark.parametrize("case,kind", [("plain http", "not_tls"), ("untrusted certificate", "certificate"),
                                       ("no shared suite", "protocol")])
@pytest_twisted.ensureDeferred
async def test_a_failed_tls_handshake_is_counted_once_as_tls_failed_with_its_kind(tls_csms, pki, case, kind):
    await bad_handshake(tls_csms, pki, case)
    await counted(tls_csms, 1)
    past_every_deadline(tls_csms)  # a failed handshake is not a timeout as well
    listener = profiles_of(tls_csms).listener
    assert (dict(listener.outcomes), dict(listener.tls_failures)) == ({"tls_failed": 1}, {kind: 1})
    assert tls_failure_samples(tls_csms) == {("tls_failed", kind): 1.0}


@pytest_twisted.ensureDeferred
async def test_a_client_speaking_no_tls_on_the_tls_port_is_closed_and_counted(tls_csms, logged):  # noqa: F811 (the fixture)
    exc = await refused(connect_station(reactor, tls_port(tls_csms), "CP-PLAIN"))
    assert exc.status is None  # no HTTP answer: the TLS layer closed the connection
    await outcome_counted(tls_csms, "tls_failed")
    assert not tls_csms.app.is_connected("CP-PLAIN")
    [line] = tls_lines(logged)
    assert "(tls_failed, not_tls): http request" in line, line
    assert not any("Unhandled" in text or "Traceback" in text for _, _, text in logged)


@pytest_twisted.ensureDeferred
async def test_a_stalled_handshake_is_closed_after_the_timeout_and_others_are_served(tls_csms, pki):
    silent = await raw_client(tls_csms)
    await with_password(tls_csms, "CP-1")
    station = await connect_tls(tls_csms, "CP-1", pki.client_options(), password=PASSWORD)
    assert not silent.lost.called
    tls_csms.clock.advance(9.9)
    assert not silent.lost.called
    tls_csms.clock.advance(0.1)
    await silent.lost.addTimeout(WAIT, reactor)
    assert await counted(tls_csms, 1) == {"handshake_timeout": 1}
    past_every_deadline(tls_csms)
    assert dict(profiles_of(tls_csms).listener.outcomes) == {"handshake_timeout": 1}  # counted once
    assert tls_failure_samples(tls_csms) == {("handshake_timeout", "none"): 1.0}
    await booted(station)  # the station that completed its handshake is not disturbed


@pytest_twisted.ensureDeferred
async def test_a_client_closing_mid_handshake_is_counted_as_abandoned_not_failed(tls_csms):
    # The start of a ClientHello record, then the client closes: no TLS error, no timeout.
    client = await raw_client(tls_csms, b"\x16\x03\x01\x02\x00\x01\x00", close=True)
    await client.lost.addTimeout(WAIT, reactor)
    await counted(tls_csms, 1)
    past_every_deadline(tls_csms)
    assert dict(profiles_of(tls_csms).listener.outcomes) == {"handshake_abandoned": 1}


BAD_HANDSHAKES = 50


#: Namespaces of HTTP clients and servers (treq's pool, the API and file servers' channels): what an
#: earlier test of the same worker left behind logs there (a pool's factory stopping, an idle channel
#: timed out), never a TLS handshake to the OCPP listener.
HTTP_NAMESPACES = ("twisted.web", "csms.httplimits")


class OwnLines:
    """The lines of a ``logged`` list but those of HTTP clients and servers (:data:`HTTP_NAMESPACES`),
    read whenever it is looked at."""

    def __init__(self, lines: list):
        self.lines = lines

    def _own(self) -> list:
        return [line for line in self.lines if not (line[1] or "").startswith(HTTP_NAMESPACES)]

    def __iter__(self):
        return iter(self._own())

    def __len__(self):
        return len(self._own())

    def __getitem__(self, index):
        return self._own()[index]

    def __repr__(self):
        return repr(self._own())


@pytest_twisted.ensureDeferred
async def test_a_flood_of_bad_tls_handshakes_costs_a_bounded_number_of_log_lines(tls_csms, pki, logged):  # noqa: F811 (the fixture)
    logged = OwnLines(logged)
    cases = ("plain http", "untrusted certificate", "no shared suite")
    for number in range(BAD_HANDSHAKES):
        await bad_handshake(tls_csms, pki, cases[number % len(cases)])
        await counted(tls_csms, number + 1)
    assert not any("Unhandled" in text or "Traceback" in text for _, _, text in logged), logged
    assert not [text for level, _, text in logged if level is not None and level >= LogLevel.warn], logged
    assert len(logged) <= 2, logged  # the first failure, on its own: not one line per connection
    before_summary = len(logged)
    past_every_deadline(tls_csms)
    summary = [text for _, _, text in logged[before_summary:]]
    assert len(summary) == 1 and "49 tls_failed (17 certificate, 16 not_tls, 16 protocol)" in summary[0], summary
    assert dict(profiles_of(tls_csms).listener.outcomes) == {"tls_failed": BAD_HANDSHAKES}
    # A good station connects afterwards as if nothing had happened.
    station = await connect_tls(tls_csms, "CP-1", pki.client_options(pki.station("CP-1")))
    await booted(station)
    await connected_at(tls_csms, "CP-1", 3)


@pytest_twisted.ensureDeferred
async def test_a_tls_error_after_the_handshake_ends_the_station_without_an_error_line(tls_csms, pki, logged):  # noqa: F811 (the fixture)
    await with_password(tls_csms, "CP-1")
    station = await connect_tls(tls_csms, "CP-1", pki.client_options(), password=PASSWORD)
    await booted(station)
    station.transport.transport.write(b"\x17\x03\x03\x00\x20" + bytes(32))  # a record under no key of theirs
    await station.closed.addTimeout(WAIT, reactor)
    assert "TLS error: " in await disconnect_detail(tls_csms, "CP-1")
    server_side = [(level, text) for level, namespace, text in logged if "Client" not in (namespace or "")]
    assert not [text for level, text in server_side if level is not None and level >= LogLevel.warn], server_side
    assert dict(profiles_of(tls_csms).listener.outcomes) == {}  # its handshake had finished


@pytest_twisted.ensureDeferred
async def test_connection_limits_count_tls_connections_with_plain_ones(csms_factory, pki):
    csms = await csms_factory(config_text=tls_config(pki, ocpp="max_connections_per_address = 1\n"))
    await with_password(csms, "CP-1")
    first = await connect_tls(csms, "CP-1", pki.client_options(), password=PASSWORD)
    assert (await refused(connect_tls(csms, "CP-2", pki.client_options()))).status is None
    assert (await refused(csms.connect("CP-3"))).status is None
    await booted(first)
    assert not csms.app.is_connected("CP-2") and not csms.app.is_connected("CP-3")


@pytest_twisted.ensureDeferred
async def test_a_station_moving_from_ws_to_wss_replaces_its_plain_connection(tls_csms, pki):
    await with_password(tls_csms, "CP-1")
    plain = await tls_csms.connect("CP-1", password=PASSWORD)
    secure = await connect_tls(tls_csms, "CP-1", pki.client_options(), password=PASSWORD)
    was_clean, code, reason = await plain.closed.addTimeout(WAIT, reactor)
    assert code == 4000
    assert ISSLTransport.providedBy(tls_csms.app.sessions["CP-1"].protocol.transport)  # the TLS one
    await booted(secure)
    assert (await connected_at(tls_csms, "CP-1", 2))["connection_security_profile"] == 2


# -- TC_085 and TC_088 over TLS (profile 2) -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_085_CSMS_basic_auth_over_tls_is_profile_2(tls_csms, pki):
    await with_password(tls_csms, "CP-1")
    assert (await refused(connect_tls(tls_csms, "CP-1", pki.client_options(), password="wrong-password-123"))
            ).status == 401
    station = await connect_tls(tls_csms, "CP-1", pki.client_options(), password=PASSWORD)
    await booted(station)
    body = await connected_at(tls_csms, "CP-1", 2)
    assert (body["security_profile"], body["connection_security_profile"]) == (2, 2)


@pytest_twisted.ensureDeferred
async def test_TC_088_CSMS_subprotocol_negotiation_over_tls(tls_csms, pki):
    assert (await refused(connect_tls(tls_csms, "CP-1", pki.client_options(), protocols=("ocpp0.1",)))).status == 400
    station = await connect_tls(tls_csms, "CP-1", pki.client_options(), protocols=("ocpp0.1", "ocpp1.6"))
    assert station.subprotocol == "ocpp1.6"


# -- TC_087: client certificates (profile 3) ------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
@pytest_twisted.ensureDeferred
async def test_TC_087_CSMS_a_station_certificate_from_the_ca_connects_at_profile_3(tls_csms, pki, key_type):
    await with_password(tls_csms, "CP-1")  # a profile 3 station sends no password: its certificate is enough
    station = await connect_tls(tls_csms, "CP-1", pki.client_options(pki.station("CP-1", key_type=key_type)))
    await booted(station)
    body = await connected_at(tls_csms, "CP-1", 3)
    assert (body["security_profile"], body["connection_security_profile"]) == (3, 3)
    status, details, _ = await tls_csms.api("GET", "/stations/CP-1")
    assert (status, details["security_profile"], details["connection_security_profile"]) == (200, 3, 3)


@pytest.mark.parametrize("case", ["expired", "foreign CA", "not yet valid"])
@pytest_twisted.ensureDeferred
async def test_TC_087_CSMS_a_certificate_the_ca_does_not_vouch_for_fails_the_handshake(tls_csms, pki, case):
    now = datetime.now(timezone.utc)
    credentials = {
        "expired": lambda: pki.station("CP-1", not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)),
        "foreign CA": lambda: pki.station("CP-1", ca=pki.foreign_ca),
        "not yet valid": lambda: pki.station("CP-1", not_before=now + timedelta(days=1)),
    }[case]()
    exc = await refused(connect_tls(tls_csms, "CP-1", pki.client_options(credentials)))
    assert exc.status is None
    await outcome_counted(tls_csms, "tls_failed")
    assert profiles_of(tls_csms).listener.tls_failures == {"certificate": 1}
    assert not tls_csms.app.is_connected("CP-1")


@pytest.mark.parametrize("case", ["another station's", "wrong organization", "no organization"])
@pytest_twisted.ensureDeferred
async def test_TC_087_CSMS_a_certificate_naming_someone_else_is_refused_with_403(tls_csms, pki, case):
    credentials = {"another station's": lambda: pki.station("CP-2"),
                   "wrong organization": lambda: pki.station("CP-1", organization="Other CPO"),
                   "no organization": lambda: pki.station("CP-1", organization=None)}[case]()
    await with_password(tls_csms, "CP-1")
    exc = await refused(connect_tls(tls_csms, "CP-1", pki.client_options(credentials), password=PASSWORD))
    assert exc.status == 403
    assert not tls_csms.app.is_connected("CP-1")


@pytest_twisted.ensureDeferred
async def test_TC_087_CSMS_a_profile_3_station_without_a_certificate_is_refused(tls_csms, pki):
    station = await connect_tls(tls_csms, "CP-1", pki.client_options(pki.station("CP-1")))
    await connected_at(tls_csms, "CP-1", 3)
    await station.close()
    await with_password(tls_csms, "CP-1")
    exc = await refused(connect_tls(tls_csms, "CP-1", pki.client_options(), password=PASSWORD))
    assert exc.status == 403


@pytest_twisted.ensureDeferred
async def test_without_tls_ca_no_certificate_is_asked_and_profile_3_cannot_be_reached(csms_factory, pki):
    csms = await csms_factory(config_text=tls_config(pki, ca=False))
    station = await connect_tls(csms, "CP-1", pki.client_options(pki.station("CP-1")))
    body = await connected_at(csms, "CP-1", 0)
    assert body["connection_security_profile"] == 0
    assert body["client_certificates"] is False
    await station.close()


# -- profiles 0 and 1; the floor -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_plain_connections_are_profile_0_without_a_password_and_1_with_one(tls_csms):
    station = await tls_csms.connect("CP-0")
    assert (await connected_at(tls_csms, "CP-0", 0))["connection_security_profile"] == 0
    await with_password(tls_csms, "CP-1")
    await tls_csms.connect("CP-1", password=PASSWORD)
    assert (await connected_at(tls_csms, "CP-1", 1))["connection_security_profile"] == 1
    await station.close()


@pytest_twisted.ensureDeferred
async def test_removing_the_password_takes_a_profile_1_station_back_to_profile_0(tls_csms):
    await with_password(tls_csms, "CP-1")
    station = await tls_csms.connect("CP-1", password=PASSWORD)
    await connected_at(tls_csms, "CP-1", 1)
    await station.close()
    assert (await tls_csms.api("DELETE", "/stations/CP-1/password"))[0] == 200
    station = await tls_csms.connect("CP-1")
    await connected_at(tls_csms, "CP-1", 0, floor=0)


@pytest_twisted.ensureDeferred
async def test_removing_the_password_does_not_lower_a_tls_profile(tls_csms, pki):
    await with_password(tls_csms, "CP-1")
    station = await connect_tls(tls_csms, "CP-1", pki.client_options(), password=PASSWORD)
    await connected_at(tls_csms, "CP-1", 2)
    await station.close()
    assert (await tls_csms.api("DELETE", "/stations/CP-1/password"))[0] == 200
    assert (await refused(connect_tls(tls_csms, "CP-1", pki.client_options()))).status == 403


@pytest_twisted.ensureDeferred
async def test_TC_085_CSMS_a_password_left_out_is_asked_for_with_401_whatever_the_floor(tls_csms, pki):
    """A station with a password that connects without it is refused with 401 (docs/api.md, connections.md),
    also once it has a floor: sending its password is what it lacks. 403 stays for a connection that its
    password would not lift to the floor (plain ws below profile 2, TLS without a certificate below 3)."""
    await with_password(tls_csms, "CP-1")
    station = await tls_csms.connect("CP-1", password=PASSWORD)
    await connected_at(tls_csms, "CP-1", 1)
    await station.close()
    assert (await refused(tls_csms.connect("CP-1"))).status == 401
    station = await connect_tls(tls_csms, "CP-1", pki.client_options(), password=PASSWORD)
    await connected_at(tls_csms, "CP-1", 2)
    await station.close()
    assert (await refused(connect_tls(tls_csms, "CP-1", pki.client_options()))).status == 401
    assert (await refused(tls_csms.connect("CP-1"))).status == 403
    assert (await refused(tls_csms.connect("CP-1", password=PASSWORD))).status == 403
    status, body, _ = await tls_csms.api("GET", "/stations/CP-1/events")
    refusals = [event["detail"] for event in body["items"] if event["event"] == "refused"]
    assert {"no password sent (the station's security profile 1 requires it)",
            "no password sent (the station's security profile 2 requires it)",
            "security profile 0, below the station's profile 2"} <= set(refusals), refusals


@pytest_twisted.ensureDeferred
async def test_an_operator_sets_the_floor_and_may_lower_it(tls_csms, pki):
    await with_password(tls_csms, "CP-1")
    status, body, _ = await tls_csms.api("PUT", "/stations/CP-1/security-profile", json={"profile": 2})
    assert (status, body["security_profile"]) == (200, 2)
    assert (await refused(tls_csms.connect("CP-1", password=PASSWORD))).status == 403
    status, body, _ = await tls_csms.api("PUT", "/stations/CP-1/security-profile", json={"profile": 1})
    assert status == 200
    await tls_csms.connect("CP-1", password=PASSWORD)
    status, body, _ = await tls_csms.api("PUT", "/stations/CP-1/security-profile", json={"profile": 4})
    assert (status, error_of(body)) == (422, "validation_failed")
    status, body, _ = await tls_csms.api("GET", "/stations/NOPE/security-profile")
    assert (status, error_of(body)) == (404, "station_not_found")


# -- TC_083: security profile upgrade --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_TC_083_CSMS_upgrade_security_profile_accepted(tls_csms, pki):
    await with_password(tls_csms, "CP-1")
    station = await tls_csms.connect("CP-1", password=PASSWORD)
    await booted(station)
    await connected_at(tls_csms, "CP-1", 1)
    status, body, _ = await tls_csms.api("POST", "/stations/CP-1/security-profile/upgrade", json={"profile": 2})
    assert status == 200, body
    assert body == {"station_id": "CP-1", "profile": 2, "change_configuration": "Accepted", "reset": "Accepted"}
    assert [call[2:] for call in station.received_calls] == [
        ["ChangeConfiguration", {"key": "SecurityProfile", "value": "2"}], ["Reset", {"type": "Hard"}]]
    await station.close()
    # The station reboots and reconnects at profile 2: Boot, Status, accepted ...
    station = await connect_tls(tls_csms, "CP-1", pki.client_options(), password=PASSWORD)
    await booted(station)
    assert (await station.status(0, "Available")) == {}
    await connected_at(tls_csms, "CP-1", 2)
    await station.close()
    # ... and a reconnect at the old profile is refused.
    assert (await refused(tls_csms.connect("CP-1", password=PASSWORD))).status == 403


@pytest_twisted.ensureDeferred
async def test_TC_083_CSMS_upgrade_to_profile_3(tls_csms, pki):
    await with_password(tls_csms, "CP-1")
    station = await connect_tls(tls_csms, "CP-1", pki.client_options(), password=PASSWORD)
    await connected_at(tls_csms, "CP-1", 2)
    status, body, _ = await tls_csms.api("POST", "/stations/CP-1/security-profile/upgrade", json={"profile": 3})
    assert (status, body["reset"]) == (200, "Accepted")
    await station.close()
    station = await connect_tls(tls_csms, "CP-1", pki.client_options(pki.station("CP-1")))
    await booted(station)
    await connected_at(tls_csms, "CP-1", 3)
    await station.close()
    assert (await refused(connect_tls(tls_csms, "CP-1", pki.client_options(), password=PASSWORD))).status == 403


@pytest_twisted.ensureDeferred
async def test_TC_083_CSMS_rejected_upgrade_sends_no_reset_and_keeps_the_profile(tls_csms):
    await with_password(tls_csms, "CP-1")
    station = await tls_csms.connect("CP-1", password=PASSWORD)
    await connected_at(tls_csms, "CP-1", 1)
    station.responses["ChangeConfiguration"] = {"status": "Rejected"}
    status, body, _ = await tls_csms.api("POST", "/stations/CP-1/security-profile/upgrade", json={"profile": 2})
    assert (status, body["change_configuration"], body["reset"]) == (200, "Rejected", None)
    assert [call[2] for call in station.received_calls] == ["ChangeConfiguration"]
    assert (await stored_profile(tls_csms, "CP-1"))["security_profile"] == 1


@pytest.mark.parametrize("config,profile,code", [
    ("tls", 1, "not_an_upgrade"), ("no-tls", 2, "tls_not_configured"), ("no-ca", 3, "client_certificates_not_configured"),
])
@pytest_twisted.ensureDeferred
async def test_an_upgrade_the_csms_cannot_serve_is_refused_with_409(csms_factory, pki, config, profile, code):
    text = {"tls": tls_config(pki), "no-tls": "", "no-ca": tls_config(pki, ca=False)}[config]
    csms = await csms_factory(config_text=text)
    await with_password(csms, "CP-1")
    station = await csms.connect("CP-1", password=PASSWORD)
    await connected_at(csms, "CP-1", 1)
    status, body, _ = await csms.api("POST", "/stations/CP-1/security-profile/upgrade", json={"profile": profile})
    assert (status, error_of(body)) == (409, code)
    assert station.received_calls == []


# -- TC_073: AuthorizationKey ---------------------------------------------------------------------


NEW_PASSWORD = "n3w-passw0rd-0123"


@pytest_twisted.ensureDeferred
async def test_TC_073_CSMS_update_the_basic_auth_password(tls_csms, pki):
    await with_password(tls_csms, "CP-1")
    station = await connect_tls(tls_csms, "CP-1", pki.client_options(), password=PASSWORD)
    status, body, _ = await tls_csms.api("POST", "/stations/CP-1/authorization-key", json={"password": NEW_PASSWORD})
    assert (status, body) == (200, {"station_id": "CP-1", "change_configuration": "Accepted", "stored": True})
    [change] = [call[3] for call in station.received_calls]
    assert change == {"key": "AuthorizationKey", "value": NEW_PASSWORD.encode().hex()}
    assert len(change["value"]) <= 40
    await station.close()
    assert (await refused(connect_tls(tls_csms, "CP-1", pki.client_options(), password=PASSWORD))).status == 401
    await booted(await connect_tls(tls_csms, "CP-1", pki.client_options(), password=NEW_PASSWORD))
    # A secret: not kept in the configuration the API shows.
    status, body, _ = await tls_csms.api("GET", "/stations/CP-1/configuration")
    assert all(item["key"] != "AuthorizationKey" for item in body["items"])


@pytest.mark.parametrize("answer", [{"status": "Rejected"}, {"status": "NotSupported"},
                                    ("CALLERROR", "InternalError"), None])
@pytest_twisted.ensureDeferred
async def test_TC_073_CSMS_a_key_the_station_does_not_apply_leaves_the_old_password(tls_csms, answer):
    await with_password(tls_csms, "CP-1")
    station = await tls_csms.connect("CP-1", password=PASSWORD)
    station.responses["ChangeConfiguration"] = answer
    request = defer.ensureDeferred(tls_csms.api("POST", "/stations/CP-1/authorization-key",
                                                json={"password": NEW_PASSWORD}))
    if answer is None:
        await station.wait_for_call("ChangeConfiguration")
        tls_csms.clock.advance(tls_csms.app.config.ocpp.response_timeout + 1)
    status, body, _ = await request
    if answer is None:
        assert (status, error_of(body)) == (504, "station_timeout")
    elif isinstance(answer, tuple):
        assert (status, error_of(body)) == (502, "station_call_error")
    else:
        assert (status, body["stored"], body["change_configuration"]) == (200, False, answer["status"])
    await station.close()
    assert (await refused(tls_csms.connect("CP-1", password=NEW_PASSWORD))).status == 401
    await tls_csms.connect("CP-1", password=PASSWORD)


@pytest.mark.parametrize("password", ["fifteen-bytes-!", "twenty-one-bytes-long", "sixteen-bytes\n!!"])
@pytest_twisted.ensureDeferred
async def test_TC_073_CSMS_a_password_of_the_wrong_size_is_refused_and_nothing_sent(tls_csms, password):
    await with_password(tls_csms, "CP-1")
    station = await tls_csms.connect("CP-1", password=PASSWORD)
    status, body, _ = await tls_csms.api("POST", "/stations/CP-1/authorization-key", json={"password": password})
    assert status == 422 and error_of(body) in ("invalid_password", "validation_failed")
    assert station.received_calls == []


@pytest_twisted.ensureDeferred
async def test_TC_073_CSMS_a_generated_password_is_shown_once_and_works(tls_csms):
    await with_password(tls_csms, "CP-1")
    station = await tls_csms.connect("CP-1", password=PASSWORD)
    status, body, _ = await tls_csms.api("POST", "/stations/CP-1/authorization-key")
    assert status == 200 and body["stored"] and len(body["password"]) == 20
    assert station.received_calls[0][3]["value"] == body["password"].encode().hex()
    await station.close()
    await tls_csms.connect("CP-1", password=body["password"])


@pytest_twisted.ensureDeferred
async def test_twistd_with_a_weak_server_key_exits_1_with_one_line(pki, tmp_path):
    from test_startup import failed_start, run_twistd, sqlite_url, write_config

    files = make_certificate(pki.ca, "localhost", key_type="rsa", key_size=1024, server=True).write(tmp_path, "weak")
    config = write_config(tmp_path, sqlite_url(tmp_path), enabled="core, security", extra=f"""
        [plugin:security]
        tls_endpoint = tcp:0:interface=127.0.0.1
        tls_certificate = {files['chain']}
        tls_private_key = {files['key']}
        """)
    await failed_start(run_twistd(config, str(tmp_path)), f"[plugin:security] tls_certificate: {files['chain']} "
                                                          "has an RSA key of 1024 bits (at least 2048 are required)")
