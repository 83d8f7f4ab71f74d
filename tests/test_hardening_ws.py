"""Hardening of the WebSocket side (issue 12): what a station, or something pretending to be one, can no
longer do to the server over its OCPP connection.

* a connection that never shows a working station is closed after ``[ocpp] boot_timeout`` (on the app's
  clock), however many pings it answers;
* connections are limited per listener and per remote address, counted from TCP accept;
* a close without a status code, a lost TCP connection and a close with a code are told apart;
* a charge point id that cannot be an id is refused with 400 on every database;
* the WebSocket fast path falls back to the libraries' own path when what it relies on is missing.
"""
from __future__ import annotations

import pytest
import pytest_twisted
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from conftest import EventProbe, booted, db_settled, within
from csms import fastpath
from csms.admission import ConnectionLimits, RefusedConnection, charge_point_id_from_path, charge_point_id_problem
from csms.protocol import BOOT_TIMEOUT_REASON, CLOSE_POLICY_VIOLATION, OCPPServerProtocol
from csms.testing.station import CallErrorFrame
from test_admission import refused, with_password
from test_ws_fastpath import RawWebSocket

BOOT = {"chargePointVendor": "V", "chargePointModel": "M"}
BOOT_TIMEOUT = 30
CLOSED_FOR_NO_BOOT = f"closed by the Central System: code=1008 reason={BOOT_TIMEOUT_REASON}"


@pytest.fixture
def logged():
    """Every event logged while the test runs, as (level, namespace, text)."""
    events = []

    def observe(event):
        events.append((event.get("log_level"), event.get("log_namespace"), formatEvent(event)))
    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def warnings_in(events, words: str) -> list[str]:
    return [text for level, _, text in events if level is not None and level >= LogLevel.warn and words in text]


async def disconnect_detail(csms, station_id: str) -> str:
    """The detail of the station's (only) recorded disconnect."""
    await within(db_settled(csms.app))
    details = [row["detail"] for row in await csms.app.station_store.events(station_id)
               if row["event"] == "disconnected"]
    assert len(details) == 1, details
    return details[0]


def server_side(csms, station_id: str) -> OCPPServerProtocol:
    return csms.service.ocpp_factory.connections[station_id]


def is_open(csms, station_id: str) -> bool:
    protocol = csms.service.ocpp_factory.connections.get(station_id)
    return protocol is not None and protocol.state == WebSocketProtocol.STATE_OPEN


# -- boot timeout ----------------------------------------------------------------------------------------


async def started(csms_factory, config: str = "", probe: EventProbe | None = None):
    return await csms_factory(config_text=f"[ocpp]\nboot_timeout = {BOOT_TIMEOUT}\n{config}",
                              extra_plugins=[probe] if probe else ())


async def closed_for_no_boot(csms, probe: EventProbe, station, station_id: str) -> None:
    """The station got a 1008 close with the boot timeout's reason, and the disconnect says so."""
    was_clean, code, reason = await within(station.closed)
    assert (code, reason) == (CLOSE_POLICY_VIOLATION, BOOT_TIMEOUT_REASON)
    assert await probe.next("disconnected", station_id) == CLOSED_FOR_NO_BOOT
    assert await disconnect_detail(csms, station_id) == CLOSED_FOR_NO_BOOT
    assert not csms.app.is_connected(station_id)


@pytest_twisted.ensureDeferred
async def test_connection_that_never_boots_but_answers_pings_is_closed_1008_after_boot_timeout(csms_factory):
    probe = EventProbe()
    csms = await started(csms_factory, probe=probe)
    station = await csms.connect("CP-IDLE")
    await probe.next("connected", "CP-IDLE")
    # Traffic that is not OCPP does not count: a ping (answered), and a call answered with a CALLERROR.
    station.sendPing(b"still here")
    assert (await station.call_frame("Heartbeat", {"unexpected": 1}))[0] == 4
    csms.clock.advance(BOOT_TIMEOUT - 0.5)
    assert is_open(csms, "CP-IDLE")
    csms.clock.advance(0.5)
    await closed_for_no_boot(csms, probe, station, "CP-IDLE")


@pytest_twisted.ensureDeferred
async def test_boot_answered_accepted_ends_the_boot_deadline(csms_factory):
    csms = await started(csms_factory)
    station = await booted(csms, "CP-1")
    csms.clock.advance(BOOT_TIMEOUT * 100)
    assert is_open(csms, "CP-1")
    assert set(await station.call("Heartbeat", {})) == {"currentTime"}


@pytest_twisted.ensureDeferred
async def test_accepted_station_that_reconnects_without_rebooting_keeps_its_connection(csms_factory):
    # OCPP 1.6 §4.2 asks for a BootNotification at each boot, not at each connection: a registered,
    # Accepted station that only lost its link carries on with its other messages.
    csms = await started(csms_factory, "unknown_stations = reject\n")
    await csms.app.station_store.create("CP-BACK")
    station = await csms.connect("CP-BACK")
    assert await station.status(1, "Available") == {}
    csms.clock.advance(BOOT_TIMEOUT * 100)
    assert is_open(csms, "CP-BACK")
    assert set(await station.call("Heartbeat", {})) == {"currentTime"}


@pytest_twisted.ensureDeferred
async def test_pending_station_that_only_heartbeats_is_closed_after_boot_timeout(csms_factory):
    probe = EventProbe()
    csms = await started(csms_factory, "unknown_stations = pending\n", probe)
    station = await csms.connect("CP-NEW")
    assert set(await station.call("Heartbeat", {})) == {"currentTime"}
    csms.clock.advance(BOOT_TIMEOUT)
    await closed_for_no_boot(csms, probe, station, "CP-NEW")


@pytest_twisted.ensureDeferred
async def test_boot_answered_pending_gives_the_retry_interval_on_top_then_closes(csms_factory):
    probe = EventProbe()
    csms = await started(csms_factory, "unknown_stations = pending\n", probe)
    station = await csms.connect("CP-NEW")
    csms.clock.advance(BOOT_TIMEOUT - 1)
    response = await station.call("BootNotification", BOOT)
    assert response["status"] == "Pending" and response["interval"] > 0
    csms.clock.advance(BOOT_TIMEOUT + response["interval"] - 0.5)
    assert is_open(csms, "CP-NEW")
    csms.clock.advance(0.5)
    await closed_for_no_boot(csms, probe, station, "CP-NEW")


@pytest_twisted.ensureDeferred
async def test_pending_station_accepted_by_the_operator_keeps_its_connection_once_it_boots_again(csms_factory):
    csms = await started(csms_factory, "unknown_stations = pending\n")
    station = await csms.connect("CP-NEW")
    response = await station.call("BootNotification", BOOT)
    assert response["status"] == "Pending"
    for _ in range(3):  # the operator takes a while: the station keeps retrying, and stays
        csms.clock.advance(response["interval"])
        assert is_open(csms, "CP-NEW")
        assert (await station.call("BootNotification", BOOT))["status"] == "Pending"
    await csms.app.station_store.update("CP-NEW", registration_status="Accepted")
    csms.clock.advance(response["interval"])
    assert (await station.call("BootNotification", BOOT))["status"] == "Accepted"
    csms.clock.advance(BOOT_TIMEOUT * 100)
    assert is_open(csms, "CP-NEW")


@pytest_twisted.ensureDeferred
async def test_boot_answered_rejected_also_restarts_the_deadline(csms_factory):
    probe = EventProbe()
    csms = await started(csms_factory, probe=probe)
    await csms.app.station_store.create("CP-NO", registration_status="Rejected")
    station = await csms.connect("CP-NO")
    response = await station.call("BootNotification", BOOT)
    assert response["status"] == "Rejected"
    csms.clock.advance(BOOT_TIMEOUT + response["interval"] - 0.5)
    assert is_open(csms, "CP-NO")
    csms.clock.advance(0.5)
    await closed_for_no_boot(csms, probe, station, "CP-NO")


@pytest_twisted.ensureDeferred
async def test_boot_timeout_0_leaves_a_silent_connection_open(csms_factory):
    csms = await csms_factory(config_text="[ocpp]\nboot_timeout = 0\n")
    station = await csms.connect("CP-IDLE")
    csms.clock.advance(365 * 24 * 3600)
    assert is_open(csms, "CP-IDLE")
    assert set(await station.call("Heartbeat", {})) == {"currentTime"}


@pytest_twisted.ensureDeferred
async def test_the_boot_deadline_of_a_replaced_connection_does_not_touch_the_new_one(csms_factory):
    csms = await started(csms_factory)
    first = await csms.connect("CP-1")
    second = await csms.connect("CP-1")
    await within(first.closed)
    csms.clock.advance(BOOT_TIMEOUT - 1)
    assert (await second.call("BootNotification", BOOT))["status"] == "Accepted"
    csms.clock.advance(BOOT_TIMEOUT * 10)
    assert is_open(csms, "CP-1")


# -- connection limits -----------------------------------------------------------------------------------


class AcceptWatcher:
    """Records what the OCPP listener made of each TCP connection it accepted ('accepted' or 'refused')."""

    def __init__(self, csms):
        self.outcomes: list[str] = []
        self._waiters: list = []
        factory = csms.service.ocpp_factory
        original = factory.buildProtocol

        def build(addr):
            protocol = original(addr)
            self.outcomes.append("refused" if isinstance(protocol, RefusedConnection) else "accepted")
            for count, d in list(self._waiters):
                if len(self.outcomes) >= count:
                    self._waiters.remove((count, d))
                    d.callback(list(self.outcomes))
            return protocol
        factory.buildProtocol = build  # instance attribute: the listening port calls factory.buildProtocol

    def until(self, count: int):
        """Fires with the outcomes once ``count`` connections have been accepted (or refused)."""
        if len(self.outcomes) >= count:
            return defer.succeed(list(self.outcomes))
        d = defer.Deferred()
        self._waiters.append((count, d))
        return within(d)


class TCPClient(Protocol):
    """A TCP connection that sends nothing: a WebSocket handshake that has not even started."""

    def __init__(self):
        self.lost = defer.Deferred()

    def connectionLost(self, reason):
        self.lost.callback(None)


async def tcp_connect(csms, source: str = "127.0.0.1") -> TCPClient:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", csms.port, timeout=5, bindAddress=(source, 0))
    return await within(connectProtocol(endpoint, TCPClient()))


@pytest_twisted.ensureDeferred
async def test_connection_over_the_per_address_limit_is_refused_while_the_others_are_served(csms_factory, logged):
    probe = EventProbe()
    csms = await csms_factory(config_text="[ocpp]\nmax_connections_per_address = 3\n", extra_plugins=[probe])
    watcher = AcceptWatcher(csms)
    serving = await booted(csms, "CP-1")
    leaving = await csms.connect("CP-2")
    handshaking = await tcp_connect(csms)  # counts from accept, before any byte of its handshake
    assert await watcher.until(3) == ["accepted"] * 3

    for attempt in range(3):
        exc = await refused(csms.connect(f"CP-EXTRA-{attempt}"))
        assert exc.status is None  # aborted at accept: no HTTP answer at all
    assert watcher.outcomes[3:] == ["refused"] * 3
    assert not any(csms.app.is_connected(f"CP-EXTRA-{attempt}") for attempt in range(3))
    assert set(await serving.call("Heartbeat", {})) == {"currentTime"}

    await leaving.close()
    await probe.next("disconnected", "CP-2")
    newcomer = await csms.connect("CP-3")
    assert (await newcomer.call("BootNotification", BOOT))["status"] == "Accepted"
    assert set(await serving.call("Heartbeat", {})) == {"currentTime"}
    assert not handshaking.lost.called

    # Three refusals, one line; the rest is summed up once a minute.
    assert len(warnings_in(logged, "Refused a connection from 127.0.0.1")) == 1
    csms.clock.advance(60)
    assert len(warnings_in(logged, "Refused 2 more connections")) == 1
    csms.clock.advance(60)
    assert len(warnings_in(logged, "Refused")) == 2
    assert len(warnings_in(logged, "")) == 2  # and nothing else went wrong


@pytest_twisted.ensureDeferred
async def test_listener_limit_counts_connections_from_every_address(csms_factory):
    csms = await csms_factory(config_text="[ocpp]\nmax_connections = 3\nmax_connections_per_address = 2\n")
    watcher = AcceptWatcher(csms)
    first = [await tcp_connect(csms), await tcp_connect(csms)]
    assert await watcher.until(2) == ["accepted", "accepted"]
    over_address = await tcp_connect(csms)
    await within(over_address.lost)
    other = await tcp_connect(csms, source="127.0.0.2")
    assert (await watcher.until(4))[2:] == ["refused", "accepted"]
    over_listener = await tcp_connect(csms, source="127.0.0.2")
    await within(over_listener.lost)
    assert watcher.outcomes[4:] == ["refused"]
    assert not any(client.lost.called for client in first + [other])
    # One closes: there is room on the listener again.
    first[0].transport.loseConnection()
    await within(first[0].lost)
    station = await csms.connect("CP-1")
    assert set(await station.call("Heartbeat", {})) == {"currentTime"}


def test_connection_limits_count_per_address_and_release():
    limits = ConnectionLimits(task.Clock(), max_total=3, max_per_address=2)
    assert [limits.admit("10.0.0.1") for _ in range(3)] == [True, True, False]
    assert limits.admit("10.0.0.2") and not limits.admit("10.0.0.3")
    limits.release("10.0.0.1")
    assert limits.admit("10.0.0.3")
    assert (limits.total, limits.per_address) == (3, {"10.0.0.1": 1, "10.0.0.2": 1, "10.0.0.3": 1})
    for address in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        limits.release(address)
    assert (limits.total, limits.per_address) == (0, {})
    unlimited = ConnectionLimits(task.Clock(), max_total=0, max_per_address=0)
    assert all(unlimited.admit("10.0.0.1") for _ in range(20000))
    assert unlimited.per_address == {}


# -- a peer that leaves during its admission -------------------------------------------------------------


@pytest.mark.parametrize("who", ["station", "central-system"])
@pytest_twisted.ensureDeferred
async def test_a_handshake_whose_connection_ended_during_admission_never_opens(csms_factory, logged, who,
                                                                              monkeypatch):
    """Admission takes database lookups; the connection can end meanwhile (the station gave up, or the
    Central System dropped it). Autobahn would still complete the handshake once admission answers: a
    station recorded as connected on a dead connection, and an AlreadyCalledError when the TCP loss is
    reported after the drop. Neither: nothing opens, nothing is logged as an error, the next station is
    served."""
    probe = EventProbe()
    csms = await csms_factory(extra_plugins=[probe])
    admit, asked = csms.app.admit, defer.Deferred()

    def slow_admit(request):  # the first admission waits for the test; later ones are the real thing
        if asked.called:
            return admit(request)
        answer = defer.Deferred()
        asked.callback((request, answer))
        return answer
    monkeypatch.setattr(csms.app, "admit", slow_admit)
    raw = RawWebSocket("/ocpp/CP-GONE")
    await within(connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", csms.port), raw))
    request, answer = await within(asked)
    (server,) = csms.service.ocpp_factory.protocols
    if who == "station":
        raw.transport.abortConnection()
        await within(server.is_closed)  # the server saw the connection go
    else:
        server.dropConnection(abort=True)  # its connectionLost comes on a later turn of the reactor
    answer.callback(request.annotations)  # admitted: the handshake goes on, to the protocol's onOpen
    await within(raw.closed)
    await within(task.deferLater(reactor, 0, lambda: None))  # let the drop's connectionLost run
    assert server.state == WebSocketProtocol.STATE_CLOSED
    assert not csms.app.is_connected("CP-GONE") and "CP-GONE" not in csms.service.ocpp_factory.connections
    assert probe.unclaimed("connected", "CP-GONE") == 0
    assert not csms.service.ocpp_factory.protocols
    assert not [text for level, _, text in logged if level is not None and level >= LogLevel.error]
    station = await within(csms.connect_booted("CP-NEXT"))
    assert csms.app.is_connected("CP-NEXT")
    station.dropConnection(abort=True)


# -- how a connection ended ------------------------------------------------------------------------------


@pytest.mark.parametrize("how, expected", [
    ("close-without-code", "closed by the station without a status code (1005)"),
    ("tcp-lost", "connection lost (1006): "),
    ("close-with-code", "closed by the station: code=1000 reason=bye"),
    ("close-with-unprintable-reason", "closed by the station: code=4001 reason=bye\\x00\\n"),
])
@pytest_twisted.ensureDeferred
async def test_how_a_connection_ended_is_recorded_distinctly(csms_factory, how, expected):
    probe = EventProbe()
    csms = await csms_factory(extra_plugins=[probe])
    station = await csms.connect("CP-1")
    await probe.next("connected", "CP-1")
    if how == "close-without-code":
        station.sendClose()  # a close frame with an empty body
    elif how == "tcp-lost":
        station.dropConnection(abort=True)
    elif how == "close-with-code":
        station.sendClose(1000, "bye")
    else:
        station.sendClose(4001, "bye\x00\n")  # valid UTF-8, but PostgreSQL cannot store the NUL
    reason = await probe.next("disconnected", "CP-1")
    assert reason.startswith(expected) if how == "tcp-lost" else reason == expected
    assert await disconnect_detail(csms, "CP-1") == reason


@pytest_twisted.ensureDeferred
async def test_close_sent_by_the_central_system_is_recorded_with_its_own_code(csms_factory):
    probe = EventProbe()
    csms = await csms_factory(extra_plugins=[probe])
    station = await csms.connect("CP-1")
    await probe.next("connected", "CP-1")
    assert csms.app.disconnect("CP-1", "station deleted")
    await within(station.closed)
    assert await probe.next("disconnected", "CP-1") == "closed by the Central System: code=1000 reason=station deleted"


@pytest_twisted.ensureDeferred
async def test_protocol_error_close_is_recorded_as_closed_by_the_central_system(csms_factory):
    probe = EventProbe()
    csms = await csms_factory(config_text="[ocpp]\nmax_message_size = 1024\n", extra_plugins=[probe])
    station = await csms.connect("CP-1")
    await probe.next("connected", "CP-1")
    station.send_raw(b"[" + b" " * 2000 + b"]")
    _, code, _ = await within(station.closed)
    assert code == 1009
    reason = await probe.next("disconnected", "CP-1")
    assert reason.startswith("closed by the Central System: code=1009 reason="), reason


# -- the charge point id ---------------------------------------------------------------------------------


BAD_IDS = {
    "nul": "%00",
    "nul-inside": "CP%001",
    "control": "CP%01",
    "newline": "CP%0D%0ASet-Cookie:x",
    "delete": "CP%7F",
    "c1-control": "CP%C2%85",
    "bidi-override": "CP%E2%80%AE1",
    "zero-width": "C%E2%80%8BP",
    "line-separator": "CP%E2%80%A8",
    "private-use": "CP%EE%80%80",
    "surrogate": "%ED%A0%80",
    "invalid-utf8": "%FF",
    "truncated-utf8": "CP%C3",
    "overlong-utf8": "%C0%AF",
}


@pytest_twisted.ensureDeferred
async def test_a_refused_handshake_is_logged_once_at_info_and_autobahn_adds_no_warning(csms, logged):
    """Anyone can have a handshake refused at will (a wrong password, a missing subprotocol): the Central
    System logs each once, at info, and records it. Autobahn's own lines for it ("failing WebSocket opening
    handshake", and "dropping connection ... : Unauthorized" at warn) go to debug."""
    await with_password(csms, "CP-PW", "s3cret-passw0rd!")
    assert (await refused(csms.connect("CP-PW", password="wrong-password!"))).status == 401
    assert (await refused(csms.connect("CP-PW", password="s3cret-passw0rd!", protocols=("ocpp2.0.1",)))).status == 400
    # (The test station is an Autobahn client: its own lines about the refusal are not the server's.)
    server = [(level, text) for level, namespace, text in logged
              if level is not None and level >= LogLevel.info and "Client" not in (namespace or "")]
    assert [text for level, text in server if level >= LogLevel.warn] == []
    assert [text for level, text in server if "WebSocket opening handshake" in text or "dropping" in text] == []
    ours = [text for level, namespace, text in logged if level == LogLevel.info and namespace == "csms.protocol"
            and text.startswith("Refused CP-PW")]
    assert len(ours) == 2, ours
    await csms.connect("CP-PW", password="s3cret-passw0rd!")  # and the next one is served


@pytest.mark.parametrize("segment", list(BAD_IDS.values()), ids=list(BAD_IDS))
@pytest_twisted.ensureDeferred
async def test_charge_point_id_that_cannot_be_an_id_is_refused_with_400(csms, segment, logged):
    client = RawWebSocket(f"/ocpp/{segment}")
    await within(connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", csms.port, timeout=5), client))
    head = await within(client.handshake)
    status_line = head.split("\r\n")[0]
    assert status_line.startswith("HTTP/1.1 400 chargePointId "), head
    assert "Set-Cookie" not in head
    await within(client.closed)
    total, _ = await csms.app.station_store.list()
    assert total == 0
    assert csms.app.sessions == {}
    assert warnings_in(logged, "Unexpected exception") == []  # in onConnect: what answered HTTP 500
    # The server is fine: the next station is served.
    station = await csms.connect("CP-1")
    assert set(await station.call("Heartbeat", {})) == {"currentTime"}


@pytest_twisted.ensureDeferred
async def test_two_undecodable_ids_do_not_become_one_station(csms):
    for segment in ("%FF", "%FE"):  # both would be U+FFFD with a lenient decoder
        client = RawWebSocket(f"/ocpp/{segment}")
        await within(connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", csms.port, timeout=5), client))
        assert (await within(client.handshake)).startswith("HTTP/1.1 400 ")
    assert await csms.app.station_store.get("\ufffd") is None


@pytest.mark.parametrize("station_id", ["CP-1", "CP 1", "Ladesäule-Ü7", "充电桩-1", "borne n°3", "CP/1", "a" * 48,
                                        "CP:1@site.example+x|y=z*"])
def test_ids_of_any_script_and_punctuation_are_kept(station_id):
    assert charge_point_id_problem(station_id, 48) is None


@pytest.mark.parametrize("station_id", ["", "a" * 49, "CP\x00", "CP\t1", "CP\u200b", "CP\u202e", "\ud800", "CP\x85"])
def test_ids_with_control_invisible_or_surrogate_characters_are_not(station_id):
    assert charge_point_id_problem(station_id, 48) is not None


def test_charge_point_id_is_decoded_from_the_last_segment_as_strict_utf8():
    assert charge_point_id_from_path("/ocpp/site/CP%2F1/", "/ocpp/") == "CP/1"
    assert charge_point_id_from_path("/ocpp/Lades%C3%A4ule", "/ocpp/") == "Ladesäule"
    # Autobahn hands over the request line as ISO-8859-1 text: raw UTF-8 bytes come back as sent.
    assert charge_point_id_from_path("/ocpp/" + "Ladesäule".encode().decode("latin-1"), "/ocpp/") == "Ladesäule"
    assert charge_point_id_from_path("/other/CP-1", "/ocpp/") is None
    for bad in ("/ocpp/%FF", "/ocpp/%ED%A0%80", "/ocpp/%C3"):
        with pytest.raises(ValueError):
            charge_point_id_from_path(bad, "/ocpp/")


# -- the fast path's guard -------------------------------------------------------------------------------


@pytest.fixture
def fast_frames_seen(monkeypatch):
    """Counts the reads the fast path parsed (``OCPPServerProtocol._fast_frames`` calls)."""
    seen = []
    original = OCPPServerProtocol._fast_frames

    def counting(self, data):
        seen.append(len(data))
        return original(self, data)
    monkeypatch.setattr(OCPPServerProtocol, "_fast_frames", counting)
    return seen


async def serve_two_stations(csms) -> None:
    """Two stations boot, heartbeat, and answer a CSMS-initiated call: everything works either way."""
    for station_id in ("CP-1", "CP-2"):
        station = await booted(csms, station_id)
        assert set(await station.call("Heartbeat", {})) == {"currentTime"}
        assert await within(csms.app.call(station_id, "ClearCache", {})) == {"status": "Accepted"}
        with pytest.raises(CallErrorFrame) as error:
            await station.call("Heartbeat", {"unexpected": 1})
        assert error.value.code in ("OccurenceConstraintViolation", "PropertyConstraintViolation",
                                    "FormationViolation")


@pytest_twisted.ensureDeferred
async def test_fast_path_is_taken_when_everything_it_relies_on_is_there(csms_factory, logged, fast_frames_seen):
    csms = await csms_factory()
    await serve_two_stations(csms)
    assert csms.service.ocpp_factory.fast_path.usable is True
    assert all(server_side(csms, station_id).fast_path for station_id in ("CP-1", "CP-2"))
    assert fast_frames_seen
    assert warnings_in(logged, "fast path") == []


@pytest_twisted.ensureDeferred
async def test_missing_autobahn_method_takes_the_library_path_with_one_warning(csms_factory, logged, monkeypatch,
                                                                               fast_frames_seen):
    # As if a new Autobahn release had renamed a private method the fast path calls.
    monkeypatch.delattr(WebSocketProtocol, "_cancelAutoPingTimeoutCall")
    csms = await csms_factory()
    assert csms.service.ocpp_factory.fast_path.usable is False
    await serve_two_stations(csms)
    assert not any(server_side(csms, station_id).fast_path for station_id in ("CP-1", "CP-2"))
    assert fast_frames_seen == []
    warnings = warnings_in(logged, "fast path")
    assert len(warnings) == 1 and "_cancelAutoPingTimeoutCall" in warnings[0]


@pytest_twisted.ensureDeferred
async def test_missing_connection_state_takes_the_library_path_with_one_warning(csms_factory, logged, monkeypatch,
                                                                                fast_frames_seen):
    # Per-connection state exists only once a connection is open: it is checked on the first one.
    monkeypatch.setattr(fastpath, "PROTOCOL_STATE", fastpath.PROTOCOL_STATE + ("renamed_in_a_new_release",))
    csms = await csms_factory()
    assert csms.service.ocpp_factory.fast_path.usable is None
    await serve_two_stations(csms)
    assert csms.service.ocpp_factory.fast_path.usable is False
    assert fast_frames_seen == []
    warnings = warnings_in(logged, "fast path")
    assert len(warnings) == 1 and "renamed_in_a_new_release" in warnings[0]


@pytest_twisted.ensureDeferred
async def test_untested_library_release_takes_the_library_path_with_one_warning(csms_factory, logged, monkeypatch,
                                                                                fast_frames_seen):
    monkeypatch.setattr(fastpath, "TESTED_VERSIONS", dict(fastpath.TESTED_VERSIONS, autobahn=((1, 0), (2,))))
    csms = await csms_factory()
    await serve_two_stations(csms)
    assert fast_frames_seen == []
    warnings = warnings_in(logged, "fast path")
    assert len(warnings) == 1 and "autobahn" in warnings[0] and "not a tested release" in warnings[0]


def test_release_numbers_are_read_from_the_installed_distributions():
    assert fastpath.release("autobahn") >= (23, 1)
    assert fastpath.release("twisted") >= (23, 10)
    assert fastpath.release("no-such-distribution-here") is None

