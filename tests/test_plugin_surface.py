"""What a plugin author relies on (issue 13 parts 2-4), over real loopback sockets.

* admission: ``csms_admit_station`` admits, refuses or annotates a handshake; Core's implementation
  keeps the unknown-station and password rules; with Core disabled only another plugin admits;
* reaching a station: ``station.call`` on the session a hook got is ``app.call``, checks and events included;
* events go through pluggy: wrappers and tracing see them, and one failing listener silences no other.
"""
from __future__ import annotations

import datetime

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from zope.interface import implementer

from conftest import EventProbe, within
from csms.admission import AdmissionRefused
from csms.app import CallRefused
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from csms.passwords import hash_password
from csms.plugins import make_plugin_manager
from csms.rpc import CallErrorReceived
from csms.testing.pytest_plugin import builtin_plugins
from csms.testing.station import TestStationFactory as StationFactory
from test_admission import events_of, refused
from test_hardening_ws import logged  # noqa: F401  (fixture)

BOOT = {"chargePointVendor": "V", "chargePointModel": "M"}


@implementer(ICSMSPlugin)
class Gatekeeper:
    """Admits, refuses or annotates handshakes as a test tells it; keeps every request it saw."""

    name = "gatekeeper"
    profile = None
    inbound_actions = ()
    outbound_actions = ()

    def __init__(self, answer=None):
        #: request -> what to do: None, True, or an exception to raise
        self.answer = answer or (lambda request: None)
        self.requests: list = []

    @hookimpl
    def csms_admit_station(self, request):
        self.requests.append(request)
        request.annotations["gatekeeper_seen"] = request.station_id
        outcome = self.answer(request)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


@implementer(ICSMSPlugin)
class SlowRefuser:
    """Refuses every handshake, after the fact (a failing Deferred), as early as it can (tryfirst)."""

    name = "slowrefuser"
    profile = None
    inbound_actions = ()
    outbound_actions = ()

    @hookimpl(tryfirst=True)
    def csms_admit_station(self, request):
        return defer.fail(AdmissionRefused(451, "Unavailable For Legal Reasons", "sanctioned site"))


# -- admission ------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_admission_hook_gets_the_handshake_and_its_annotations_reach_the_session(csms_factory):
    gatekeeper, probe = Gatekeeper(), EventProbe()
    # Core alone besides the test's plugins: the annotations compared are Core's and the gatekeeper's.
    csms = await csms_factory(extra_plugins=[gatekeeper, probe], plugins=["core"])
    await csms.app.station_store.create("CP-1", password_hash=hash_password("s3cret-passw0rd!"))
    await csms.connect("CP-1", password="s3cret-passw0rd!")

    [request] = gatekeeper.requests
    assert (request.station_id, request.username, request.password) == ("CP-1", "CP-1", "s3cret-passw0rd!")
    assert request.peer.startswith("tcp4:127.0.0.1:")
    assert request.address.host == "127.0.0.1"
    assert request.headers["authorization"].startswith("Basic ")
    assert request.headers["host"] == f"127.0.0.1:{csms.port}"
    assert (request.certificate, request.tls, request.authenticated_by) == (None, False, None)  # plain TCP
    session = await probe.next("connected", "CP-1")
    assert session is csms.app.sessions["CP-1"]
    assert session.admission == {"gatekeeper_seen": "CP-1", "registration_status": "Accepted"}


@pytest_twisted.ensureDeferred
async def test_core_annotates_the_registration_status_it_admitted_with(csms_factory):
    csms = await csms_factory(config_text="[ocpp]\nunknown_stations = pending\n", plugins=["core"])
    await csms.connect("CP-NEW")
    assert csms.app.sessions["CP-NEW"].admission == {"registration_status": "Pending"}


@pytest_twisted.ensureDeferred
async def test_refusal_raised_at_once_wins_over_core_and_core_is_not_asked(csms_factory):
    def refuse(request):
        return AdmissionRefused(403, "Forbidden", "not on the allow list") if request.station_id == "CP-X" else None
    csms = await csms_factory(extra_plugins=[Gatekeeper(refuse)])
    exc = await refused(csms.connect("CP-X"))
    assert exc.status == 403
    assert await events_of(csms, "CP-X") == ["refused"]
    assert (await csms.app.station_store.events("CP-X"))[0]["detail"] == "not on the allow list"
    # unknown_stations = accept would have registered it: Core was never asked.
    assert await csms.app.station_store.get("CP-X") is None
    await csms.connect("CP-Y")


@pytest_twisted.ensureDeferred
async def test_first_refusal_in_call_order_is_the_answer(csms_factory):
    # Core (trylast) refuses with 401 too; the tryfirst plugin's 451, called first, is what is sent.
    csms = await csms_factory(config_text="[ocpp]\nrequire_password = true\n", extra_plugins=[SlowRefuser()])
    exc = await refused(csms.connect("CP-1"))
    assert exc.status == 451
    assert [row["detail"] for row in await csms.app.station_store.events("CP-1")] == ["sanctioned site"]


@pytest_twisted.ensureDeferred
async def test_core_refusal_stands_when_another_plugin_admits(csms_factory):
    gatekeeper = Gatekeeper(lambda request: True)
    csms = await csms_factory(extra_plugins=[gatekeeper])
    await csms.app.station_store.create("CP-1", password_hash=hash_password("s3cret-passw0rd!"))
    exc = await refused(csms.connect("CP-1", password="wrong-password-123"))
    assert exc.status == 401
    assert [row["detail"] for row in await csms.app.station_store.events("CP-1")] == ["bad credentials"]


@pytest_twisted.ensureDeferred
async def test_with_core_disabled_only_a_plugin_that_admits_lets_a_station_in(csms_factory):
    gatekeeper = Gatekeeper(lambda request: True if request.station_id == "CP-OK" else None)
    csms = await csms_factory(plugins=[], extra_plugins=[gatekeeper])
    station = await csms.connect("CP-OK")
    assert csms.app.sessions["CP-OK"].admission == {"gatekeeper_seen": "CP-OK"}
    answer = await within(station.call_frame("Heartbeat", {}))
    assert answer[2] == "NotSupported"
    exc = await refused(csms.connect("CP-NO"))
    assert exc.status == 403
    assert [row["detail"] for row in await csms.app.station_store.events("CP-NO")] == [
        "no plugin admitted the station"]


@pytest.mark.parametrize("answer", [RuntimeError("the directory is down"), "yes"], ids=["raises", "not-a-bool"])
@pytest_twisted.ensureDeferred
async def test_admission_check_that_fails_refuses_with_500_and_is_logged(csms_factory, logged, answer):
    gatekeeper = Gatekeeper(lambda request: answer if request.station_id == "CP-1" else None)
    csms = await csms_factory(extra_plugins=[gatekeeper])
    exc = await refused(csms.connect("CP-1"))
    assert exc.status == 500
    assert any("csms_admit_station" in text for _, _, text in logged)
    assert not any("Unhandled" in text for _, _, text in logged)
    await csms.connect("CP-2")


def test_refusal_needs_an_error_status():
    with pytest.raises(ValueError):
        AdmissionRefused(200, "OK")
    assert AdmissionRefused(403, "Forbidden").detail == "Forbidden"


# -- admission over TLS: the client certificate ---------------------------------------------------------


def certificate_authority():
    """(issue(common_name, server=False) -> (key PEM, certificate PEM), the CA's certificate PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(common_name, key, issuer_name, issuer_key, ca=False, server=False):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")])
    ca_cert = build("Test CA", ca_key, ca_name, ca_key, ca=True)

    def issue(common_name, server=False):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build(common_name, key, ca_name, ca_key, server=server)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return key_pem, cert.public_bytes(serialization.Encoding.PEM)
    return issue, ca_cert.public_bytes(serialization.Encoding.PEM)


# Twisted's CertificateOptions hands pyOpenSSL objects to pyOpenSSL, which now prefers cryptography's.
@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_tls_client_certificate_reaches_the_admission_hook(csms_factory):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID
    from twisted.internet import ssl

    issue, ca_pem = certificate_authority()
    authority = ssl.Certificate.loadPEM(ca_pem)
    server_key, server_cert = issue("localhost", server=True)
    client_key, client_cert = issue("CP-TLS")

    def certificate_names_the_station(request):
        names = request.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return True if [name.value for name in names] == [request.station_id] else None
    gatekeeper = Gatekeeper(certificate_names_the_station)
    csms = await csms_factory(plugins=[], extra_plugins=[gatekeeper])
    # The OCPP factory behind a TLS listener that asks for a client certificate signed by the CA.
    server_options = ssl.PrivateCertificate.loadPEM(server_key + server_cert).options(authority)
    port = reactor.listenSSL(0, csms.service.ocpp_factory, server_options, interface="127.0.0.1")
    try:
        url = f"wss://localhost:{port.getHost().port}/ocpp/CP-TLS"
        factory = StationFactory(url, protocols=["ocpp1.6"], reactor=reactor)
        factory.reactor = reactor
        factory.opened = defer.Deferred()
        client_certificate = ssl.PrivateCertificate.loadPEM(client_key + client_cert)
        client_options = ssl.optionsForClientTLS("localhost", trustRoot=authority, clientCertificate=client_certificate)
        reactor.connectSSL("127.0.0.1", port.getHost().port, factory, client_options)
        station = await within(factory.opened)

        [request] = gatekeeper.requests
        assert isinstance(request.certificate, x509.Certificate)
        assert request.certificate.public_bytes(Encoding.PEM) == client_cert
        assert csms.app.is_connected("CP-TLS")
        station.dropConnection(abort=True)
        await within(station.closed)
    finally:
        await port.stopListening()


# -- reaching a station: the session's call is app.call -------------------------------------------------


@implementer(ICSMSPlugin)
class CallWatcher:
    """Keeps the station sessions hooks hand it, and what the call hooks told it."""

    name = "callwatcher"
    profile = None
    inbound_actions = ()
    outbound_actions = ()

    def __init__(self):
        self.sessions: dict = {}
        self.connected: list = []
        self.handler_stations: list = []
        self.seen: list = []
        self.refuse: set = set()

    @hookimpl
    def csms_on_station_connected(self, station_id, station):
        self.connected.append(station_id)
        self.sessions[station_id] = station

    @hookimpl
    def csms_handle_call(self, station, action, payload):
        if action == "WhoAmI":
            self.handler_stations.append(station)
            return {}
        return None

    @hookimpl
    def csms_before_call(self, station_id, action, payload):
        self.seen.append(("before", station_id, action))
        if action in self.refuse:
            raise CallRefused(f"{action} is not allowed here")

    @hookimpl
    def csms_on_call_sending(self, station_id, action, request):
        self.seen.append(("sending", station_id, action))

    @hookimpl
    def csms_on_call_completed(self, station_id, action, request, response):
        self.seen.append(("completed", station_id, action))

    @hookimpl
    def csms_on_call_failed(self, station_id, action, request, error):
        self.seen.append(("failed", station_id, action))


@pytest_twisted.ensureDeferred
async def test_station_call_from_a_hook_fires_the_call_hooks_like_app_call(csms_factory):
    # pluggy calls the plugin registered last first: the probe hears of the connection after the watcher.
    watcher, probe = CallWatcher(), EventProbe()
    csms = await csms_factory(extra_plugins=[probe, watcher])
    station = await csms.connect("CP-1")
    await probe.next("connected", "CP-1")
    assert await within(station.call("WhoAmI", {})) == {}
    [session] = watcher.handler_stations
    assert watcher.connected == ["CP-1"] and watcher.sessions["CP-1"] is session

    assert await within(session.call("Reset", {"type": "Soft"})) == {"status": "Accepted"}
    assert watcher.seen == [("before", "CP-1", "Reset"), ("sending", "CP-1", "Reset"), ("completed", "CP-1", "Reset")]

    watcher.seen.clear()
    station.responses["ClearCache"] = ("CALLERROR", "InternalError", "cache stuck")
    with pytest.raises(CallErrorReceived):
        await within(session.call("ClearCache", {}))
    assert watcher.seen == [("before", "CP-1", "ClearCache"), ("sending", "CP-1", "ClearCache"),
                            ("failed", "CP-1", "ClearCache")]

    watcher.seen.clear()
    watcher.refuse.add("UnlockConnector")
    with pytest.raises(CallRefused):
        await within(session.call("UnlockConnector", {"connectorId": 1}))
    assert watcher.seen == [("before", "CP-1", "UnlockConnector")]
    assert [frame[2] for frame in station.received_calls] == ["Reset", "ClearCache"]


@pytest_twisted.ensureDeferred
async def test_an_older_session_reaches_the_station_on_its_new_connection(csms_factory):
    watcher, probe = CallWatcher(), EventProbe()
    csms = await csms_factory(extra_plugins=[probe, watcher])
    await csms.connect("CP-1")
    old_session = await probe.next("connected", "CP-1")
    newer = await csms.connect("CP-1")
    assert await probe.next("connected", "CP-1") is not old_session
    assert old_session.connected is False
    assert await within(old_session.call("ClearCache", {})) == {"status": "Accepted"}
    assert [frame[2] for frame in newer.received_calls] == ["ClearCache"]


# -- events through pluggy ------------------------------------------------------------------------------


@implementer(ICSMSPlugin)
class Listener:
    """Remembers the stations that connected and booted; answers each event with a value."""

    name = "listener"
    profile = None
    inbound_actions = ()
    outbound_actions = ()

    def __init__(self):
        self.connected: list = []
        self.boots: list = []

    @hookimpl
    def csms_on_station_connected(self, station_id, station):
        self.connected.append(station_id)

    @hookimpl
    def csms_on_boot(self, station_id, request, status):
        self.boots.append(station_id)
        return defer.succeed(f"booted {station_id}")


@implementer(ICSMSPlugin)
class BrokenListener:
    name = "brokenlistener"
    profile = None
    inbound_actions = ()
    outbound_actions = ()

    @hookimpl
    def csms_on_station_connected(self, station_id, station):
        raise RuntimeError("this listener is broken")

    @hookimpl
    def csms_on_boot(self, station_id, request, status):
        raise RuntimeError("this listener is broken")


@implementer(ICSMSPlugin)
class EventWrapper:
    """A pluggy ``wrapper=True`` implementation around two events: it sees every listener's result."""

    name = "eventwrapper"
    profile = None
    inbound_actions = ()
    outbound_actions = ()

    def __init__(self):
        self.results: list = []

    @hookimpl(wrapper=True)
    def csms_on_station_connected(self, station_id, station):
        results = yield
        self.results.append(("connected", station_id, len(results)))
        return results

    @hookimpl(wrapper=True)
    def csms_on_boot(self, station_id, request, status):
        results = yield
        self.results.append(("boot", station_id, len(results)))
        return results


@pytest.mark.parametrize("broken_first", [True, False], ids=["broken-registered-first", "broken-registered-last"])
@pytest_twisted.ensureDeferred
async def test_with_a_wrapper_one_failing_listener_silences_no_other(csms_factory, logged, broken_first):
    listener, wrapper = Listener(), EventWrapper()
    plugins = [BrokenListener(), listener] if broken_first else [listener, BrokenListener()]
    probe = EventProbe()  # registered first, so told last (pluggy calls the latest registered first)
    # Core alone besides the test's plugins: the results the wrapper counts are the test's listeners'.
    csms = await csms_factory(extra_plugins=[probe, *plugins, wrapper], plugins=["core"])
    station = await csms.connect("CP-W")
    await probe.next("connected", "CP-W")
    assert listener.connected == ["CP-W"]
    assert (await within(station.call("BootNotification", BOOT)))["status"] == "Accepted"
    assert listener.boots == ["CP-W"]
    # The wrapper saw the call and each result: the listener's Deferred (the others answer None).
    assert wrapper.results == [("connected", "CP-W", 0), ("boot", "CP-W", 1)]
    failures = [text for _, _, text in logged if "listener brokenlistener failed" in text]
    assert len(failures) == 2


@pytest_twisted.ensureDeferred
async def test_pluggy_hookcall_monitoring_and_tracing_see_events(csms_factory):
    listener = Listener()
    # The dashboard listens to meter values (for its live charts): without it, nobody does.
    csms = await csms_factory(extra_plugins=[listener], plugins=[p for p in builtin_plugins() if p != "dashboard"])
    calls, traced = [], []
    undo = csms.app.pm.add_hookcall_monitoring(
        lambda name, impls, kwargs: calls.append((name, kwargs.get("station_id"))), lambda *args: None)
    csms.app.pm.trace.root.setwriter(traced.append)
    undo_tracing = csms.app.pm.enable_tracing()
    try:
        station = await csms.connect("CP-T")
        await within(station.call("BootNotification", BOOT))
        await within(station.call("MeterValues", {"connectorId": 1, "meterValue": [
            {"timestamp": "2024-01-01T00:00:00Z", "sampledValue": [{"value": "1"}]}]}))
    finally:
        undo_tracing()
        undo()
    assert ("csms_on_boot", "CP-T") in calls
    assert ("csms_on_station_connected", "CP-T") in calls
    assert any("csms_on_boot" in line for line in traced)
    # Nobody listens to MeterValues: nothing is called for it at all.
    assert "csms_on_meter_values" not in [name for name, _ in calls]


def test_a_listener_registered_at_any_time_is_guarded(logged):
    pm = make_plugin_manager([])
    listener = Listener()
    pm.register(BrokenListener())
    pm.register(listener)
    results = pm.hook.csms_on_station_connected(station_id="CP-L", station=None)
    assert results == [] and listener.connected == ["CP-L"]
    # Calling the plugin's own method is not affected: the guard lives in the hook registry only.
    with pytest.raises(RuntimeError):
        BrokenListener().csms_on_station_connected("CP-L", None)
