"""Webhooks: events from the outbox, delivered to a real twisted.web receiver on loopback, signed.

Delivery and its signature (computed here independently), retries after the receiver fails, undelivered
events surviving a restart, no event for a rolled-back change, dead-lettering, SSRF refusal (also after
DNS rebinding), pause, test-fire, meter values batching, and OCPP traffic going on beside a receiver
that does not answer.
"""
from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from alembic import command
from conftest import booted, clock_now, core_store, error_of, station_time, within
from sqlalchemy import create_engine, func, insert, select, text, update
from test_migrations import builtin_histories
from test_security_logs import get_log
from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostnameResolver
from twisted.web import resource, server
from zope.interface import implementer

from csms.migrations import prepare_schema
from csms_plugins.webhooks.delivery_db import history as delivery_history
from csms_plugins.webhooks.dispatcher import Job
from csms_plugins.webhooks.guard import AddressPolicy
from csms_plugins.webhooks.store import pack_body, unpack_body
from csms_plugins.webhooks.tables import deliveries, events, outbox

ALLOW_LOOPBACK = """
[plugin:webhooks]
allow_private_networks = 127.0.0.0/8, ::1
retry_initial_delay = 10
retry_max_delay = 60
"""


class Receiver(resource.Resource):
    """A webhook receiver: records each POST; answers with the next queued status (200 when none), or
    never when ``hang`` is set."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests: list[dict] = []
        self.statuses: list[int] = []
        self.hang = False
        self.arrived = defer.DeferredQueue()
        self.port = None

    def render_POST(self, request):
        body = request.content.read()
        received = {"headers": {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()},
                    "body": body, "json": json.loads(body)}
        self.requests.append(received)
        self.arrived.put(received)
        if self.hang:
            return server.NOT_DONE_YET
        request.setResponseCode(self.statuses.pop(0) if self.statuses else 200)
        return b"ok"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}/hook"

    def events(self, event_type: str | None = None) -> list[dict]:
        return [r["json"] for r in self.requests if event_type is None or r["json"]["type"] == event_type]


@pytest.fixture
def receiver():
    hook = Receiver()
    hook.port = reactor.listenTCP(0, server.Site(hook), interface="127.0.0.1")
    yield hook
    if hook.port.connected:
        pytest_twisted.blockon(defer.maybeDeferred(hook.port.stopListening))


class HTTP10Receiver(protocol.Protocol):
    """A receiver answering as an HTTP/1.0 server does (``HTTP/1.0 200``, no ``Connection`` header), which
    closes after its answer: here the close comes only when the next request arrives on the connection
    (the race, made certain). The requests answered go to ``answered``; those met by the close to ``cut``."""

    def __init__(self, answered: list, cut: list):
        self.answered, self.cut, self.buffer, self.served = answered, cut, b"", False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        head, found, rest = self.buffer.partition(b"\r\n\r\n")
        if not found:
            return
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        if len(rest) < length:
            return
        if self.served:
            self.cut.append(json.loads(rest[:length]))
            self.transport.loseConnection()
            return
        self.served, self.buffer = True, b""
        self.answered.append(json.loads(rest[:length]))
        self.transport.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")


def plugin_of(csms):
    return csms.app.pm.get_plugin("webhooks")


def drain(csms):
    return within(plugin_of(csms).dispatcher.drain())


async def subscribe(csms, url: str, event_types=("*",), **extra) -> dict:
    status, body, _ = await csms.api("POST", "/webhooks", json={"url": url, "event_types": list(event_types), **extra})
    assert status == 201, body
    return body


async def history(csms, subscription_id: int) -> list[dict]:
    status, body, _ = await csms.api("GET", f"/webhooks/{subscription_id}/deliveries")
    assert status == 200, body
    return body["items"]


def expected_signature(secret: str, headers: dict, body: bytes) -> str:
    signed = headers["webhook-timestamp"].encode() + b"." + body
    return "v1=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


async def charge(csms, station, id_tag: str = "TAG-1", meter_start: int = 1000, meter_stop: int = 13500,
                 seconds: int = 5400) -> int:
    now = clock_now(csms)
    from datetime import timedelta

    started = await station.call("StartTransaction", {"connectorId": 1, "idTag": id_tag, "meterStart": meter_start,
                                                      "timestamp": station_time(now)})
    transaction_id = started["transactionId"]
    await station.call("StopTransaction", {"transactionId": transaction_id, "meterStop": meter_stop,
                                           "timestamp": station_time(now + timedelta(seconds=seconds))})
    return transaction_id


def test_a_stop_below_its_meter_start_is_no_energy_in_the_event_as_in_the_export():
    """The event and the export say the same: a meter reading below the start's (a replaced meter) is 0 Wh, not
    a negative energy (the event said -500 before; found by schemathesis beside the export's 0)."""
    from types import SimpleNamespace

    from csms_plugins.core.exports import _transaction_row
    from csms_plugins.core.store import transaction_event

    started, stopped = datetime(2024, 5, 1, 10, tzinfo=timezone.utc), datetime(2024, 5, 1, 11, tzinfo=timezone.utc)
    row = dict(id=7, station_id="CP-1", connector_id=1, id_tag="T", id_tag_status="Accepted", parent_id_tag=None,
               reservation_id=None, started_at=started, stopped_at=stopped, meter_start=1000, meter_stop=500,
               stop_reason="Local", stop_id_tag=None, stopped_by="station")
    assert transaction_event(row)["energy_wh"] == _transaction_row(SimpleNamespace(**row))["energy_wh"] == 0
    row["meter_stop"] = 1500
    assert transaction_event(row)["energy_wh"] == _transaction_row(SimpleNamespace(**row))["energy_wh"] == 500


@pytest_twisted.ensureDeferred
async def test_a_post_on_a_connection_the_receiver_closed_is_sent_again_at_once_on_a_new_one(csms_factory):
    """Found by an integrator's walk through the docs: a receiver on Python's http.server (HTTP/1.0, a close
    after each answer) saw failed deliveries it never got, retried 10 s later: Twisted's pool keeps such a
    connection, and the next POST met the close."""
    answered, cut = [], []
    factory = protocol.Factory.forProtocol(lambda: HTTP10Receiver(answered, cut))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        csms = await csms_factory(ALLOW_LOOPBACK + "max_concurrent_per_subscription = 1\n")
        subscription = await subscribe(csms, f"http://127.0.0.1:{port.getHost().port}/hook")
        for _ in range(3):
            status, _, _ = await csms.api("POST", f"/webhooks/{subscription['id']}/test")
            assert status == 202
        await drain(csms)
    finally:
        await port.stopListening()
    assert len(cut) >= 1  # a POST did go out on a kept connection the receiver had done with
    assert sorted(event["id"] for event in answered) == sorted({event["id"] for event in answered})
    deliveries = await history(csms, subscription["id"])
    assert [(d["state"], d["attempts"], d["last_error"]) for d in deliveries] == [("delivered", 1, None)] * 3
    assert {d["event_id"] for d in deliveries} == {event["id"] for event in answered}


@pytest_twisted.ensureDeferred
async def test_transaction_events_are_delivered_signed(csms_factory, receiver):
    csms = await csms_factory(ALLOW_LOOPBACK)
    subscription = await subscribe(csms, receiver.url, ["transaction.started", "transaction.stopped"])
    await core_store(csms).put_id_tag("TAG-1")
    station = await booted(csms, "CP-1")
    transaction_id = await charge(csms, station)
    await drain(csms)

    # Up to max_concurrent_per_subscription POSTs are in flight at once: arrival order is not promised.
    assert sorted(event["type"] for event in receiver.events()) == ["transaction.started", "transaction.stopped"]
    for request in receiver.requests:
        headers = request["headers"]
        assert headers["webhook-signature"] == expected_signature(subscription["secret"], headers, request["body"])
        assert headers["webhook-id"] == request["json"]["id"]
        assert headers["content-type"] == "application/json"
    stopped = receiver.events("transaction.stopped")[0]["data"]
    assert stopped["transaction_id"] == transaction_id and stopped["station_id"] == "CP-1"
    assert stopped["energy_wh"] == 12500 and stopped["duration_seconds"] == 5400.0
    assert [d["state"] for d in await history(csms, subscription["id"])] == ["delivered", "delivered"]
    # Nothing else was subscribed to: the boot and status changes never reached the receiver.
    assert len(receiver.requests) == 2


@pytest_twisted.ensureDeferred
async def test_station_and_id_tag_events(csms_factory, receiver):
    csms = await csms_factory(ALLOW_LOOPBACK)
    await subscribe(csms, receiver.url)
    station = await booted(csms, "CP-1")
    status, _, _ = await csms.api("POST", "/id-tags", json={"id_tag": "TAG-9", "status": "Accepted"})
    assert status == 201
    station.dropConnection(abort=True)
    await station.closed
    await within(_until(lambda: "station.disconnected" in {e["type"] for e in receiver.events()}, csms))
    types = [event["type"] for event in receiver.events()]
    # Delivered concurrently: in no promised order.
    assert {"station.connected", "station.booted", "connector.status_changed", "id_tag.changed",
            "station.disconnected"} <= set(types)
    assert "meter_values.received" not in types  # opt-in only
    booted_event = receiver.events("station.booted")[0]["data"]
    assert booted_event["status"] == "Accepted" and booted_event["station_id"] == "CP-1"
    tag = receiver.events("id_tag.changed")[0]["data"]
    assert tag["id_tag"] == "TAG-9" and tag["change"] == "created" and tag["status"] == "Accepted"


async def _until(predicate, csms):
    """Drain until ``predicate()``: the disconnection is recorded after the socket closes."""
    while not predicate():
        await drain(csms)
        if not predicate():
            await csms.app.db.run(lambda conn: None, desc="test_wait")


@pytest_twisted.ensureDeferred
async def test_failed_delivery_is_retried_after_backoff_with_the_same_id(csms_factory, receiver):
    csms = await csms_factory(ALLOW_LOOPBACK)
    subscription = await subscribe(csms, receiver.url, ["id_tag.changed"])
    receiver.statuses = [500]
    await core_store(csms).put_id_tag("TAG-1")
    await drain(csms)
    [first] = await history(csms, subscription["id"])
    assert (first["state"], first["attempts"], first["last_status_code"]) == ("pending", 1, 500)
    assert first["last_error"].startswith("HTTP 500")

    await drain(csms)  # not due yet: nothing is sent
    assert len(receiver.requests) == 1
    csms.clock.advance(10)  # the first retry waits between 5 and 10 s (jitter)
    await drain(csms)
    assert len(receiver.requests) == 2
    [delivered] = await history(csms, subscription["id"])
    assert (delivered["state"], delivered["attempts"], delivered["last_status_code"]) == ("delivered", 2, 200)
    ids = {request["headers"]["webhook-id"] for request in receiver.requests}
    assert len(ids) == 1
    assert [r["headers"]["webhook-attempt"] for r in receiver.requests] == ["1", "2"]


@pytest_twisted.ensureDeferred
async def test_undelivered_events_are_delivered_after_a_restart(csms_factory, receiver):
    port = receiver.port.getHost().port
    first = await csms_factory(ALLOW_LOOPBACK)
    subscription = await subscribe(first, receiver.url, ["id_tag.changed"])
    await receiver.port.stopListening()  # the receiver is down
    await core_store(first).put_id_tag("TAG-1")
    await core_store(first).put_id_tag("TAG-2")
    await drain(first)
    assert {d["state"] for d in await history(first, subscription["id"])} == {"pending"}
    await first.stop()

    receiver.port = reactor.listenTCP(port, server.Site(receiver), interface="127.0.0.1")
    second = await csms_factory(ALLOW_LOOPBACK)  # the same database
    second.clock.advance(60)
    await drain(second)
    assert sorted(event["data"]["id_tag"] for event in receiver.events()) == ["TAG-1", "TAG-2"]
    assert {d["state"] for d in await history(second, subscription["id"])} == {"delivered"}


@pytest_twisted.ensureDeferred
async def test_event_of_a_rolled_back_change_is_never_sent(csms_factory, receiver):
    csms = await csms_factory(ALLOW_LOOPBACK)
    await subscribe(csms, receiver.url, ["id_tag.changed"])
    app = csms.app

    def failing(conn):
        app.outbox.add(conn, "id_tag.changed", {"id_tag": "ROLLED-BACK", "change": "created"})
        raise RuntimeError("the change fails after its event was written")

    def succeeding(conn):
        app.outbox.add(conn, "id_tag.changed", {"id_tag": "KEPT", "change": "created"})

    # Queued together, they share one group commit: only the failing function's work is undone.
    results = await defer.DeferredList([app.db.run(failing, desc="test_failing"),
                                        app.db.run(succeeding, desc="test_succeeding")], consumeErrors=True)
    assert [ok for ok, _ in results] == [False, True]
    await drain(csms)
    assert [event["data"]["id_tag"] for event in receiver.events()] == ["KEPT"]


@pytest_twisted.ensureDeferred
async def test_events_nobody_subscribes_to_are_not_written(csms_factory, receiver):
    csms = await csms_factory(ALLOW_LOOPBACK)
    await subscribe(csms, receiver.url, ["transaction.started"])
    await core_store(csms).put_id_tag("TAG-1")  # id_tag.changed: nobody wants it

    def rows(*tables):
        return lambda conn: sum(conn.execute(select(func.count()).select_from(table)).scalar_one() for table in tables)
    assert await csms.app.db.run(rows(outbox)) == 0
    await drain(csms)
    assert receiver.requests == []
    assert await plugin_of(csms).store.delivery_db.run(rows(events, deliveries)) == 0


@pytest_twisted.ensureDeferred
async def test_deliveries_are_dead_lettered_after_their_age(csms_factory, receiver):
    csms = await csms_factory(ALLOW_LOOPBACK + "dead_letter_after = 100\n")
    subscription = await subscribe(csms, receiver.url, ["id_tag.changed"])
    receiver.statuses = [500] * 100
    await core_store(csms).put_id_tag("TAG-1")
    for _ in range(6):
        await drain(csms)
        csms.clock.advance(60)
    await drain(csms)
    [dead] = await history(csms, subscription["id"])
    assert dead["state"] == "dead" and dead["next_attempt_at"] is None
    attempts = len(receiver.requests)
    assert 2 <= attempts == dead["attempts"]
    csms.clock.advance(3600)
    await drain(csms)
    assert len(receiver.requests) == attempts  # never tried again


@pytest_twisted.ensureDeferred
async def test_private_receivers_are_refused_unless_allowed(csms_factory, receiver):
    csms = await csms_factory()
    for url in (receiver.url, "http://localhost:9/hook", "http://[::1]:9/hook", "http://10.1.2.3/hook",
                "http://169.254.169.254/latest/meta-data", "http://0.0.0.0:9/", "http://224.0.0.1/"):
        status, body, _ = await csms.api("POST", "/webhooks", json={"url": url, "event_types": ["*"]})
        assert (status, error_of(body)) == (422, "receiver_address_refused"), url
    for url in ("ftp://example.com/hook", "file:///etc/passwd", "http:///nohost", "http://user:pw@example.com/"):
        status, body, _ = await csms.api("POST", "/webhooks", json={"url": url, "event_types": ["*"]})
        assert (status, error_of(body)) == (422, "invalid_url"), url
    status, body, _ = await csms.api("GET", "/webhooks")
    assert body["total"] == 0


@implementer(IHostnameResolver)
class RebindingResolver:
    """receiver.example: a public address the first time, then loopback (DNS rebinding)."""

    def __init__(self, port: int):
        self.answers = ["93.184.216.34", "127.0.0.1"]
        self.port = port

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        receiver.resolutionBegan(None)
        receiver.addressResolved(IPv4Address("TCP", self.answers.pop(0) if len(self.answers) > 1
                                             else self.answers[0], portNumber))
        receiver.resolutionComplete()


@pytest_twisted.ensureDeferred
async def test_dns_rebinding_to_loopback_is_refused_at_delivery(csms_factory, receiver):
    csms = await csms_factory()
    plugin = plugin_of(csms)
    plugin.guard.resolver = RebindingResolver(receiver.port.getHost().port)
    port = receiver.port.getHost().port
    subscription = await subscribe(csms, f"http://receiver.example:{port}/hook", ["id_tag.changed"])
    await core_store(csms).put_id_tag("TAG-1")
    await drain(csms)
    assert receiver.requests == []
    [refused] = await history(csms, subscription["id"])
    assert refused["state"] == "pending" and "127.0.0.1 (loopback)" in refused["last_error"]


@pytest_twisted.ensureDeferred
async def test_paused_subscription_keeps_its_events_until_resumed(csms_factory, receiver):
    csms = await csms_factory(ALLOW_LOOPBACK)
    subscription = await subscribe(csms, receiver.url, ["id_tag.changed"], paused=True)
    await core_store(csms).put_id_tag("TAG-1")
    await drain(csms)
    assert receiver.requests == []
    status, body, _ = await csms.api("PATCH", f"/webhooks/{subscription['id']}", json={"paused": False})
    assert status == 200 and body["paused"] is False
    await drain(csms)
    assert [event["data"]["id_tag"] for event in receiver.events()] == ["TAG-1"]


@pytest_twisted.ensureDeferred
async def test_test_fire_sends_a_test_event_and_shows_in_the_history(csms_factory, receiver):
    csms = await csms_factory(ALLOW_LOOPBACK)
    subscription = await subscribe(csms, receiver.url, ["transaction.started"], secret="s" * 32)
    status, body, _ = await csms.api("POST", f"/webhooks/{subscription['id']}/test")
    assert status == 202 and body["state"] == "pending" and body["event"]["type"] == "webhook.test"
    await drain(csms)
    [request] = receiver.requests
    assert request["json"]["type"] == "webhook.test"
    assert request["headers"]["webhook-signature"] == expected_signature("s" * 32, request["headers"],
                                                                         request["body"])
    [delivered] = await history(csms, subscription["id"])
    assert (delivered["state"], delivered["last_status_code"]) == ("delivered", 200)


@pytest_twisted.ensureDeferred
async def test_meter_values_are_opt_in_and_batched(csms_factory, receiver):
    csms = await csms_factory(ALLOW_LOOPBACK)
    everything = await subscribe(csms, receiver.url, ["*"])
    meters = await subscribe(csms, receiver.url + "?meters", ["meter_values.received"])
    station = await booted(csms, "CP-1")
    await drain(csms)
    receiver.requests.clear()
    await send_meter_values(station, csms, "100", "200", "300")
    await drain(csms)
    [batch] = receiver.requests
    assert batch["json"]["type"] == "meter_values.batch"
    events = batch["json"]["data"]["events"]
    assert [e["data"]["meter_value"][0]["sampledValue"][0]["value"] for e in events] == ["100", "200", "300"]
    assert all(e["type"] == "meter_values.received" for e in events)
    # The batch is the delivery: one row, its event the body sent.
    [delivery] = await history(csms, meters["id"])
    assert (delivery["event_type"], delivery["state"], delivery["attempts"]) == ("meter_values.batch", "delivered", 1)
    assert delivery["event_id"] == batch["json"]["id"] == batch["headers"]["webhook-id"]
    assert delivery["event"] == batch["json"]
    assert await history(csms, everything["id"]) != []  # boot events; no meter values among them
    assert all(d["event_type"] != "meter_values.received" for d in await history(csms, everything["id"]))


async def send_meter_values(station, csms, *values: str) -> None:
    """MeterValues of one sample each, each taken a second after the last one sent (a sample of the same
    time and measurand is one sample, stored once); the CSMS's clock does not move."""
    for wh in values:
        await station.call("MeterValues", {"connectorId": 1, "meterValue": [
            {"timestamp": station_time(clock_now(csms) + timedelta(seconds=next(_SAMPLE_SECONDS))),
             "sampledValue": [{"value": wh}]}]})


#: Seconds after the CSMS's time of the samples send_meter_values sends, one after another.
_SAMPLE_SECONDS = itertools.count()


def values_of(batch: dict) -> list[str]:
    return [e["data"]["meter_value"][0]["sampledValue"][0]["value"] for e in batch["data"]["events"]]


def stored_count(csms, table) -> defer.Deferred:
    store = plugin_of(csms).store
    return within(store.delivery_db.read(lambda conn: conn.execute(select(func.count()).select_from(table)).scalar()))


def meter_events(receiver) -> list[dict]:
    """The meter values events received, out of their batches, in the order sent."""
    return [event for batch in receiver.events("meter_values.batch") for event in batch["data"]["events"]]


def sampled(value: str, **given) -> dict:
    """A sampled value as stored: OCPP 1.6's defaults (§7.45) where the station gave none."""
    return {"value": value, "context": "Sample.Periodic", "format": "Raw", "measurand": "Energy.Active.Import.Register",
            "location": "Outlet", "unit": "Wh", **given}


@pytest_twisted.ensureDeferred
async def test_meter_values_events_are_the_samples_as_stored_one_per_meter_value(csms_factory, receiver):
    """Each meter value (a station's samples of one time, on one connector) is an event, its sampled values
    as stored, OCPP's defaults filled in; a StopTransaction's transactionData too. On an SQLite file they
    are read from the stored samples (no outbox row is written for them), elsewhere written into the outbox
    with the samples: the same events either way."""
    csms = await csms_factory(ALLOW_LOOPBACK)
    await subscribe(csms, receiver.url, ["meter_values.received"])
    station = await booted(csms, "CP-1")
    now = clock_now(csms)
    started = await station.call("StartTransaction", {"connectorId": 1, "idTag": "TAG-1", "meterStart": 0,
                                                      "timestamp": station_time(now)})
    transaction_id = started["transactionId"]
    await station.call("MeterValues", {"connectorId": 1, "transactionId": transaction_id, "meterValue": [
        {"timestamp": station_time(now + timedelta(seconds=60)), "sampledValue": [
            {"value": "1200"}, {"value": "16.2", "measurand": "Current.Import", "phase": "L1", "unit": "A"}]},
        {"timestamp": station_time(now + timedelta(seconds=120)), "sampledValue": [
            {"value": "2400", "context": "Sample.Clock"}]}]})
    await station.call("StopTransaction", {
        "transactionId": transaction_id, "meterStop": 3000, "timestamp": station_time(now + timedelta(seconds=180)),
        "transactionData": [{"timestamp": station_time(now + timedelta(seconds=180)), "sampledValue": [
            {"value": "3000", "context": "Transaction.End"}]}]})
    plugin = plugin_of(csms)
    written = await csms.app.db.run(lambda conn: conn.execute(
        select(func.count()).select_from(outbox).where(outbox.c.event_type == "meter_values.received")).scalar_one())
    on_sqlite_file = plugin.store.split
    assert written == (0 if on_sqlite_file else 3)
    assert plugin.read_from_rows == ({"meter_values.received"} if on_sqlite_file else frozenset())
    await drain(csms)

    def meter_value(seconds: int, *samples) -> dict:
        return {"station_id": "CP-1", "connector_id": 1, "transaction_id": transaction_id,
                "meter_value": [{"timestamp": station_time(now + timedelta(seconds=seconds)), "sampledValue": list(samples)}]}
    got = meter_events(receiver)
    assert [event["data"] for event in got] == [
        meter_value(60, sampled("1200"), sampled("16.2", measurand="Current.Import", phase="L1", unit="A")),
        meter_value(120, sampled("2400", context="Sample.Clock")),
        meter_value(180, sampled("3000", context="Transaction.End"))]
    assert all(event["type"] == "meter_values.received" for event in got)
    assert len({event["id"] for event in got}) == 3


def test_meter_value_events_are_made_per_station_connector_transaction_and_time():
    from csms_plugins.core.store import _Sample, meter_value_events

    t0, t1 = datetime(2026, 12, 1, 10, tzinfo=timezone.utc), datetime(2026, 12, 1, 10, 1, tzinfo=timezone.utc)

    def sample(station="CP-1", connector=1, tx=7, at=t0, value="1", phase=None):
        return _Sample(station, connector, tx, at, value, "Energy.Active.Import.Register", phase, "Wh",
                       "Sample.Periodic", "Outlet", "Raw")
    rows = [sample(value="1"), sample(value="2", phase="L1"), sample(at=t1), sample(station="CP-2"),
            sample(connector=2), sample(tx=None), sample(tx=None, value="3")]
    made = meter_value_events(rows)
    assert [index for index, _ in made] == [0, 2, 3, 4, 5]
    first = made[0][1]
    assert (first["station_id"], first["connector_id"], first["transaction_id"]) == ("CP-1", 1, 7)
    assert first["meter_value"] == [{"timestamp": "2026-12-01T10:00:00.000Z",
                                     "sampledValue": [sampled("1"), sampled("2", phase="L1")]}]
    assert [s["value"] for s in made[4][1]["meter_value"][0]["sampledValue"]] == ["1", "3"]
    assert meter_value_events([]) == []


@pytest_twisted.ensureDeferred
async def test_meter_values_stored_before_a_stop_are_delivered_after_the_restart(csms_factory, receiver):
    """Samples stored while nothing delivered (the CSMS stopped before its next pass) are delivered by the
    next CSMS on the same database: on an SQLite file they are read from where the last reading stopped."""
    first = await csms_factory(ALLOW_LOOPBACK)
    await subscribe(first, receiver.url, ["meter_values.received"])
    station = await booted(first, "CP-1")
    await send_meter_values(station, first, "1", "2")
    await first.stop()
    assert meter_events(receiver) == []

    second = await csms_factory(ALLOW_LOOPBACK)  # the same database
    await drain(second)
    assert [event["data"]["meter_value"][0]["sampledValue"][0]["value"] for event in meter_events(receiver)] == ["1", "2"]


@pytest_twisted.ensureDeferred
async def test_meter_values_of_a_rolled_back_transaction_are_never_sent(csms_factory, receiver):
    """Samples stored by a transaction that then fails are not stored: no event is made of them, whether
    it would have been read from the samples or written into the outbox beside them."""
    csms = await csms_factory(ALLOW_LOOPBACK)
    await subscribe(csms, receiver.url, ["meter_values.received"])
    station = await booted(csms, "CP-1")
    db = core_store(csms).db
    real_run, failing = db.run, []

    def run(thd, *args, desc: str = "", **kwargs):
        def then_fail(conn, *args, **kwargs):
            result = thd(conn, *args, **kwargs)  # the samples stored, and their outbox rows where written
            if failing:
                raise RuntimeError("the change fails after its samples were written")
            return result
        return real_run(then_fail if desc == "core_meter_values" else thd, *args, desc=desc, **kwargs)
    db.run = run
    try:
        await send_meter_values(station, csms, "good-1")
        failing.append(True)
        with pytest.raises(Exception):
            await send_meter_values(station, csms, "bad")
        failing.clear()
        await send_meter_values(station, csms, "good-2")
    finally:
        del db.run
    await drain(csms)
    assert [event["data"]["meter_value"][0]["sampledValue"][0]["value"] for event in meter_events(receiver)] == [
        "good-1", "good-2"]


@pytest_twisted.ensureDeferred
async def test_meter_values_outbox_rows_of_an_earlier_release_are_still_sent(csms_factory, receiver):
    """An upgrade on an SQLite file: meter values events an earlier release wrote into the outbox, not yet
    moved, are sent as written, beside those read from the samples stored since."""
    csms = await csms_factory(ALLOW_LOOPBACK)
    await subscribe(csms, receiver.url, ["meter_values.received"])
    store = plugin_of(csms).store
    await csms.app.db.run(lambda conn: store.write_event(conn, "meter_values.received", {
        "station_id": "CP-1", "connector_id": 1, "transaction_id": None,
        "meter_value": [{"timestamp": "2026-12-01T09:00:00.000Z", "sampledValue": [{"value": "as-sent"}]}]}))
    station = await booted(csms, "CP-1")
    await send_meter_values(station, csms, "stored")
    await drain(csms)
    assert sorted(event["data"]["meter_value"][0]["sampledValue"][0]["value"] for event in meter_events(receiver)) == [
        "as-sent", "stored"]


@pytest_twisted.ensureDeferred
async def test_a_subscription_gets_the_meter_values_stored_once_it_names_them(csms_factory, receiver):
    """Changed to name meter values, a subscription gets those stored from then on (on an SQLite file, where
    they are read from the samples, the samples stored before are not read for it); named all along, it
    keeps getting them through a change of its other types."""
    csms = await csms_factory(ALLOW_LOOPBACK)
    changed = await subscribe(csms, receiver.url + "?changed", ["transaction.started"])
    kept = await subscribe(csms, receiver.url + "?kept", ["meter_values.received"])
    station = await booted(csms, "CP-1")
    await send_meter_values(station, csms, "before")
    for subscription, types in ((changed, ["meter_values.received"]),
                                (kept, ["meter_values.received", "transaction.started"])):
        status, body, _ = await csms.api("PATCH", f"/webhooks/{subscription['id']}", json={"event_types": types})
        assert status == 200 and body["event_types"] == types and "derived_from" not in body, body
    await send_meter_values(station, csms, "after")
    await drain(csms)
    assert [values_of(d["event"]) for d in await history(csms, changed["id"])] == [["after"]]
    assert [values_of(d["event"]) for d in await history(csms, kept["id"])] == [["before", "after"]]


@pytest_twisted.ensureDeferred
async def test_meter_values_batches_are_made_once_shared_and_resent_alike(csms_factory, receiver):
    """Batches are made when the events are moved in: each subscription's in order, up to the batch size,
    one stored body for the subscriptions wanting the same events, and a retry sends the same batch (same
    Webhook-Id, same events) again."""
    csms = await csms_factory(ALLOW_LOOPBACK + "meter_values_batch_size = 2\n")
    subscriptions = [await subscribe(csms, f"{receiver.url}?{k}", ["meter_values.received"]) for k in (1, 2)]
    station = await booted(csms, "CP-1")
    await send_meter_values(station, csms, "1", "2", "3", "4", "5")
    receiver.statuses = [500] * 6  # every batch's first POST (3 per subscription, all in flight at once)
    await drain(csms)
    assert len(receiver.requests) == 6
    csms.clock.advance(10)  # the first retry waits between 5 and 10 s
    await drain(csms)
    assert len(receiver.requests) == 12

    by_id: dict[str, list] = {}
    for request in receiver.requests:
        assert request["headers"]["webhook-id"] == request["json"]["id"]
        by_id.setdefault(request["json"]["id"], []).append(request)
    assert sorted(len(sent) for sent in by_id.values()) == [4, 4, 4]  # 2 subscriptions x 2 attempts
    for sent in by_id.values():
        assert len({request["body"] for request in sent}) == 1
        assert sorted(request["headers"]["webhook-attempt"] for request in sent) == ["1", "1", "2", "2"]
    assert sorted(values_of(sent[0]["json"]) for sent in by_id.values()) == [["1", "2"], ["3", "4"], ["5"]]
    for subscription in subscriptions:
        made = await history(csms, subscription["id"])
        assert sorted(d["event_id"] for d in made) == sorted(by_id)
        assert {(d["state"], d["attempts"], d["event_type"]) for d in made} == {("delivered", 2, "meter_values.batch")}
    assert await stored_count(csms, events) == 3  # each batch's body once, for both subscriptions


@pytest_twisted.ensureDeferred
async def test_meter_values_batches_follow_each_subscriptions_own_events(csms_factory, receiver):
    """A subscription made, or deleted, while meter values arrive: each subscription's batch holds exactly
    the events written while it existed, and one deleted before the events were moved in gets none."""
    csms = await csms_factory(ALLOW_LOOPBACK)
    station = await booted(csms, "CP-1")
    early = await subscribe(csms, receiver.url + "?early", ["meter_values.received"])
    await send_meter_values(station, csms, "1")
    late = await subscribe(csms, receiver.url + "?late", ["meter_values.received"])
    await send_meter_values(station, csms, "2")
    gone = await subscribe(csms, receiver.url + "?gone", ["meter_values.received"])
    await send_meter_values(station, csms, "3")
    status, _, _ = await csms.api("DELETE", f"/webhooks/{gone['id']}")
    assert status == 204
    await drain(csms)
    got = {request["json"]["id"]: request for request in receiver.requests}
    assert sorted((r["json"]["type"], values_of(r["json"])) for r in got.values()) == [
        ("meter_values.batch", ["1", "2", "3"]), ("meter_values.batch", ["2", "3"])]
    assert {r["headers"]["webhook-id"] for r in receiver.requests} == set(got)
    assert [values_of(d["event"]) for d in await history(csms, early["id"])] == [["1", "2", "3"]]
    assert [values_of(d["event"]) for d in await history(csms, late["id"])] == [["2", "3"]]
    assert await stored_count(csms, deliveries) == 2


@pytest_twisted.ensureDeferred
async def test_meter_values_deliveries_of_an_earlier_release_are_sent_batched(csms_factory, receiver):
    """An earlier release fanned meter values out as a delivery per event and subscription: those still
    pending are sent as before, batched when sent, and each settles with the batch's outcome."""
    csms = await csms_factory(ALLOW_LOOPBACK)
    subscription = await subscribe(csms, receiver.url, ["meter_values.received"])
    store = plugin_of(csms).store
    now = clock_now(csms)
    bodies = [json.dumps({"id": f"legacy-{k}", "type": "meter_values.received", "created_at": "2026-12-01T10:00:00Z",
                          "data": {"k": k}}) for k in (1, 2)]

    def legacy(conn):
        for k, body in zip((1, 2), bodies):
            conn.execute(events.insert().values(event_id=f"legacy-{k}", body=body, created_at=now))
            conn.execute(deliveries.insert().values(
                subscription_id=subscription["id"], event_id=f"legacy-{k}", event_type="meter_values.received",
                state="pending", attempts=0, created_at=now, next_attempt_at=now))
    await within(store.delivery_db.run(legacy))
    await drain(csms)
    [batch] = receiver.requests
    assert batch["json"]["type"] == "meter_values.batch"
    assert [e["id"] for e in batch["json"]["data"]["events"]] == ["legacy-1", "legacy-2"]
    assert {(d["event_id"], d["state"]) for d in await history(csms, subscription["id"])} == {
        ("legacy-1", "delivered"), ("legacy-2", "delivered")}


@pytest_twisted.ensureDeferred
async def test_a_receiver_that_never_answers_does_not_slow_ocpp(csms_factory, receiver):
    csms = await csms_factory(ALLOW_LOOPBACK)
    subscription = await subscribe(csms, receiver.url, ["id_tag.changed"])
    receiver.hang = True
    station = await booted(csms, "CP-1")
    await core_store(csms).put_id_tag("TAG-1")
    plugin_of(csms).dispatcher.poke()
    await within(receiver.arrived.get())  # the POST is in flight and will not be answered
    for _ in range(20):
        assert "currentTime" in await within(station.call("Heartbeat", {}), 2)
    csms.clock.advance(10)  # request_timeout
    await drain(csms)
    [timed_out] = await history(csms, subscription["id"])
    assert timed_out["state"] == "pending" and "no answer within 10 s" in timed_out["last_error"]


@pytest_twisted.ensureDeferred
async def test_subscription_api_validation_and_secrecy(csms_factory, receiver):
    csms = await csms_factory(ALLOW_LOOPBACK)
    cases = [({"url": receiver.url, "event_types": ["no.such_type"]}, "unknown_event_type"),
             ({"url": receiver.url, "event_types": ["*"], "secret": "short"}, "validation_failed"),
             ({"url": receiver.url, "event_types": []}, "validation_failed")]
    for body, code in cases:
        status, answer, _ = await csms.api("POST", "/webhooks", json=body)
        assert (status, error_of(answer)) == (422, code), body
    created = await subscribe(csms, receiver.url)
    assert len(created["secret"]) >= 32
    status, listed, _ = await csms.api("GET", "/webhooks")
    assert listed["total"] == 1 and "secret" not in listed["items"][0]
    status, one, _ = await csms.api("GET", f"/webhooks/{created['id']}")
    assert status == 200 and "secret" not in one and one["event_types"] == ["*"]
    for method, path in (("GET", "/webhooks/999"), ("DELETE", "/webhooks/999"), ("POST", "/webhooks/999/test"),
                         ("GET", "/webhooks/999/deliveries"), ("GET", "/webhooks/abc")):
        status, answer, _ = await csms.api(method, path)
        assert (status, error_of(answer)) == (404, "webhook_not_found"), path
    status, types, _ = await csms.api("GET", "/webhook-event-types")
    names = {t["name"]: t for t in types["items"]}
    assert {"station.connected", "transaction.stopped", "meter_values.received"} <= set(names)
    assert names["meter_values.received"]["opt_in"] is True
    status, _, _ = await csms.api("DELETE", f"/webhooks/{created['id']}")
    assert status == 204
    assert csms.app.outbox.wanted("transaction.started") is False


def test_bad_allowed_network_stops_start_up():
    from csms.app import CentralSystem
    from csms.config import ConfigError, load_config

    config = load_config(text="[plugins]\nenabled = core, webhooks\n[plugin:webhooks]\n"
                              "allow_private_networks = 127.0.0.0/8, localhost\n")
    config.database.url = "sqlite:///:memory:"
    with pytest.raises(ConfigError, match="'localhost' is not an IP address or network"):
        CentralSystem(config)


def test_address_policy():
    policy = AddressPolicy()
    assert policy.refusal("93.184.216.34") is None
    assert policy.refusal("2606:2800:220:1:248:1893:25c8:1946") is None
    assert policy.refusal("127.0.0.1") == "loopback"
    assert policy.refusal("::ffff:10.0.0.1") == "private"
    assert policy.refusal("fe80::1") == "link-local"
    assert policy.refusal("100.64.0.1") is not None  # carrier-grade NAT: not public


def test_outbox_registry_and_writer():
    from csms.outbox import Outbox, UnknownEventType

    outbox = Outbox()
    outbox.register("acme.rebooted", "An ACME module rebooted.", {"module": 3}, owner="acme")
    with pytest.raises(ValueError, match="already registered by acme"):
        outbox.register("acme.rebooted", "again")
    with pytest.raises(ValueError, match="dotted lower-case"):
        outbox.register("AcmeRebooted", "not a name")
    outbox.add(None, "never.registered", {})  # no writer attached: nothing to check, nothing written
    written = []
    outbox.attach(lambda conn, event_type, data: written.append((conn, event_type, data)))
    outbox.add("conn", "acme.rebooted", {"module": 1})  # nobody wants it yet
    outbox.want({"acme.rebooted"})
    outbox.add("conn", "acme.rebooted", {"module": 2})
    assert written == [("conn", "acme.rebooted", {"module": 2})]
    with pytest.raises(UnknownEventType):
        outbox.add("conn", "acme.rebootd", {})


@pytest_twisted.ensureDeferred
async def test_backoff_doubles_up_to_the_maximum_with_jitter_from_the_injected_random(csms_factory):
    csms = await csms_factory(ALLOW_LOOPBACK)
    dispatcher = plugin_of(csms).dispatcher

    class Fixed:
        def __init__(self, value):
            self.value = value

        def random(self):
            return self.value
    dispatcher.random = Fixed(0.0)
    assert [dispatcher.backoff(attempt) for attempt in (1, 2, 3, 4, 5)] == [5, 10, 20, 30, 30]
    dispatcher.random = Fixed(1.0)
    assert [dispatcher.backoff(attempt) for attempt in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]


@pytest_twisted.ensureDeferred
async def test_firmware_and_diagnostics_status_events(csms_factory, receiver):
    csms = await csms_factory(ALLOW_LOOPBACK)
    await subscribe(csms, receiver.url, ["firmware.status", "diagnostics.status"])
    station = await booted(csms, "CP-1")
    assert await station.call("FirmwareStatusNotification", {"status": "Downloading"}) == {}
    assert await station.call("DiagnosticsStatusNotification", {"status": "Uploading"}) == {}
    await drain(csms)
    events = {event["type"]: event["data"] for event in receiver.events()}
    assert events["firmware.status"]["status"] == "Downloading" and events["firmware.status"]["station_id"] == "CP-1"
    assert events["diagnostics.status"]["status"] == "Uploading"


@pytest_twisted.ensureDeferred
async def test_log_and_signed_firmware_status_events(csms_factory, receiver):
    csms = await csms_factory(ALLOW_LOOPBACK)
    await subscribe(csms, receiver.url, ["log.status", "signed_firmware.status"])
    station, status, body = await get_log(csms, "CP-1", protocol="http")
    assert status == 200, body
    log_request = body["request"]
    assert await station.call("LogStatusNotification", {"status": "Uploading",
                                                        "requestId": log_request["request_id"]}) == {}
    # A requestId the CSMS never sent: stored unlinked, announced unlinked.
    assert await station.call("SignedFirmwareStatusNotification", {"status": "Downloading", "requestId": 77}) == {}
    await drain(csms)
    events = {event["type"]: event["data"] for event in receiver.events()}
    assert events["log.status"] == {"station_id": "CP-1", "status": "Uploading",
                                    "request_id": log_request["request_id"], "log_request_id": log_request["id"]}
    assert events["signed_firmware.status"] == {"station_id": "CP-1", "status": "Downloading", "request_id": 77,
                                                "signed_update_id": None}


@pytest_twisted.ensureDeferred
async def test_status_event_is_rolled_back_with_its_notification(csms_factory, receiver, monkeypatch):
    csms = await csms_factory(ALLOW_LOOPBACK)
    await subscribe(csms, receiver.url, ["log.status"])
    outbox = csms.app.pm.get_plugin("security").transfers.store.outbox
    real_add = outbox.add

    def add_then_fail(conn, event_type, data):
        real_add(conn, event_type, data)
        if event_type == "log.status":
            raise RuntimeError("the notification's transaction fails after its event was written")
    station = await booted(csms, "CP-1")
    monkeypatch.setattr(outbox, "add", add_then_fail)
    frame = await station.call_frame("LogStatusNotification", {"status": "Uploading"})
    assert frame[0] == 4 and frame[2] == "InternalError", frame
    monkeypatch.setattr(outbox, "add", real_add)
    assert await station.call("LogStatusNotification", {"status": "Uploaded"}) == {}
    await drain(csms)
    assert [event["data"]["status"] for event in receiver.events()] == ["Uploaded"]
    assert [row["status"] for row in (await csms.api("GET", "/stations/CP-1/logs"))[1]["history"]] == ["Uploaded"]


#: A delivery as webhooks_0001 kept it, body included.
LEGACY_BODY = '{"id":"legacy-1","type":"id_tag.changed","created_at":"2026-12-01T10:00:00.000Z","data":{"id_tag":"OLD"}}'
# An hour before the test's clock (which starts at the real time): a fixed date turns into a delivery
# older than dead_letter_after a day later, dead-lettered instead of sent.
LEGACY_AT = datetime.fromtimestamp(int(time.time()) - 3600, tz=timezone.utc)


@pytest_twisted.ensureDeferred
async def test_deliveries_pending_before_the_event_table_migration_are_delivered_after_it(
        csms_factory, receiver, database_url):
    """webhooks_0002 moves each event's body (one copy per subscription before) to one webhooks_events row;
    its downgrade puts the copies back. Deliveries pending then are delivered by the upgraded CSMS (on
    SQLite, after their move from the main file into the delivery file, which empties the main file's)."""
    found = builtin_histories()
    webhooks = next(history for history in found if history.name == "webhooks")
    engine = create_engine(database_url)
    copies = text("SELECT subscription_id, body FROM webhooks_deliveries ORDER BY 1")
    with engine.begin() as conn:
        prepare_schema(conn, found, auto_upgrade=True)
        command.downgrade(webhooks.config(conn), "webhooks_0001")
        for k in (1, 2):
            conn.execute(text("INSERT INTO webhooks_subscriptions (id, url, event_types, secret, paused, created_at, "
                              "updated_at) VALUES (:id, :url, '[\"id_tag.changed\"]', 'a-secret-of-16-chars', false, "
                              ":now, :now)"), {"id": k, "url": f"{receiver.url}?{k}", "now": LEGACY_AT})
            conn.execute(text("INSERT INTO webhooks_deliveries (subscription_id, event_id, event_type, body, state, "
                              "attempts, created_at, next_attempt_at) VALUES (:k, 'legacy-1', 'id_tag.changed', :body, "
                              "'pending', 0, :now, :now)"),
                         {"k": k, "body": LEGACY_BODY, "now": LEGACY_AT})
        command.upgrade(webhooks.config(conn), "webhooks_0002")
        assert conn.execute(select(events.c.event_id, events.c.body)).fetchall() == [("legacy-1", LEGACY_BODY)]
        command.downgrade(webhooks.config(conn), "webhooks_0001")
        assert conn.execute(copies).fetchall() == [(1, LEGACY_BODY), (2, LEGACY_BODY)]
    engine.dispose()
    csms = await csms_factory(ALLOW_LOOPBACK + "[database]\nauto_upgrade = true\n", migrate=True)
    await drain(csms)
    assert sorted(r["headers"]["webhook-id"] for r in receiver.requests) == ["legacy-1", "legacy-1"]
    assert {r["body"] for r in receiver.requests} == {LEGACY_BODY.encode()}
    [delivered] = await history(csms, 1)
    assert delivered["state"] == "delivered" and delivered["event"]["data"] == {"id_tag": "OLD"}
    await csms.stop()
    if csms.app.db.is_sqlite:
        engine = create_engine(database_url)
        with engine.begin() as conn:
            assert [conn.execute(select(func.count()).select_from(table)).scalar() for table in (deliveries, events)] \
                == [0, 0]
        engine.dispose()


@pytest_twisted.ensureDeferred
async def test_a_delivery_recorded_while_a_pass_reads_is_not_sent_again(csms_factory, monkeypatch):
    """The pass's read may have begun before an outcome committed (on SQLite it runs beside the writer):
    a delivery released meanwhile is left out of what it read, not sent a second time."""
    csms = await csms_factory(ALLOW_LOOPBACK)
    dispatcher = plugin_of(csms).dispatcher
    await drain(csms)
    row = {"id": 7, "subscription_id": 1, "url": "http://127.0.0.1:9/hook", "secret": "s" * 16, "attempts": 0,
           "created_at": clock_now(csms), "event_id": "e-7", "event_type": "id_tag.changed", "body": "{}"}
    reading = defer.Deferred()
    reads = iter([reading])
    monkeypatch.setattr(dispatcher.store, "due", lambda *args, **kwargs: next(reads, defer.succeed([])))
    monkeypatch.setattr(dispatcher.store, "expire", lambda *args, **kwargs: defer.succeed(0))
    dispatcher.claimed.add(7)  # its POST is over and its outcome being recorded
    dispatcher.poke()  # a pass starts reading
    dispatcher._release(Job([row]), None)  # the outcome committed: no longer claimed
    reading.callback([row])  # what the read saw: still pending
    assert dispatcher.queues == {} and dispatcher.posting == {} and 7 not in dispatcher.claimed


@pytest_twisted.ensureDeferred
async def test_an_idle_pass_writes_nothing(csms_factory, receiver, monkeypatch):
    """A pass over an empty outbox only reads (on SQLite beside the writer): it runs no write function,
    hence on SQLite takes no write transaction, and never the file's write lock the OCPP writer needs."""
    csms = await csms_factory(ALLOW_LOOPBACK)
    await subscribe(csms, receiver.url, ["id_tag.changed"])
    await core_store(csms).put_id_tag("TAG-1")
    await drain(csms)  # the event moved out of the outbox and delivered
    assert len(receiver.requests) == 1
    db = csms.app.db
    written = []
    run = db.run
    monkeypatch.setattr(db, "run", lambda thd, *args, desc="", **kwargs: (
        written.append(desc), run(thd, *args, desc=desc, **kwargs))[1])
    transactions, passes = db.stats["transactions"], plugin_of(csms).dispatcher.stats["passes"]
    for _ in range(3):
        await drain(csms)
    assert plugin_of(csms).dispatcher.stats["passes"] >= passes + 3
    assert "webhooks_fan_out" not in written and "webhooks_outcomes" not in written, written
    if db.is_sqlite:  # there reads go beside the writer, outside its transactions
        assert db.stats["transactions"] == transactions


@pytest_twisted.ensureDeferred
async def test_meter_values_nobody_wants_cost_a_pass_no_write(csms_factory, receiver, monkeypatch):
    """Samples stored while no subscription names meter values: passes read (on an SQLite file, that no
    subscription wants them) and write nothing, in either database; a subscription made later gets
    only the samples stored after it."""
    csms = await csms_factory(ALLOW_LOOPBACK)
    await subscribe(csms, receiver.url, ["id_tag.changed"])
    station = await booted(csms, "CP-1")
    await send_meter_values(station, csms, "1", "2", "3")
    store = plugin_of(csms).store
    written = []
    for db in {csms.app.db, store.delivery_db}:
        run = db.run
        monkeypatch.setattr(db, "run", lambda thd, *args, desc="", run=run, **kwargs: (
            written.append(desc), run(thd, *args, desc=desc, **kwargs))[1])
    for _ in range(3):
        await drain(csms)
    assert "webhooks_fan_out" not in written and "webhooks_outcomes" not in written, written
    monkeypatch.undo()
    meters = await subscribe(csms, receiver.url + "?meters", ["meter_values.received"])
    await send_meter_values(station, csms, "4")
    await drain(csms)
    assert [values_of(d["event"]) for d in await history(csms, meters["id"])] == [["4"]]


@pytest_twisted.ensureDeferred
async def test_a_pass_records_the_last_passes_outcomes_in_its_own_transaction(csms_factory, receiver, monkeypatch):
    """A POST's outcome is committed by the next pass, in the one transaction that also moves in the events
    that came meanwhile: no transaction of its own (one commit a pass, and the pages at the end of the
    deliveries table and its indexes written once for both)."""
    csms = await csms_factory(ALLOW_LOOPBACK)
    subscription = await subscribe(csms, receiver.url, ["id_tag.changed"])
    delivery_db = plugin_of(csms).dispatcher.store.delivery_db
    written = []
    run = delivery_db.run
    monkeypatch.setattr(delivery_db, "run", lambda thd, *args, desc="", **kwargs: (
        written.append(desc), run(thd, *args, desc=desc, **kwargs))[1])
    await core_store(csms).put_id_tag("TAG-1")
    await drain(csms)
    await core_store(csms).put_id_tag("TAG-2")
    await drain(csms)
    assert [event["data"]["id_tag"] for event in receiver.events()] == ["TAG-1", "TAG-2"]
    assert [d["state"] for d in await history(csms, subscription["id"])] == ["delivered", "delivered"]
    assert "webhooks_outcomes" not in written and written.count("webhooks_fan_out") >= 2, written


async def a_post_whose_outcome_waits_for_the_next_pass(csms, receiver) -> tuple[dict, defer.Deferred]:
    """A subscription, and one event POSTed to it whose outcome waits for the pass that comes 0.5 s later
    (real time; the test acts before): (the subscription, the Deferred fired once the outcome is written)."""
    subscription = await subscribe(csms, receiver.url, ["id_tag.changed"])
    dispatcher = plugin_of(csms).dispatcher
    await drain(csms)
    posted = dispatcher._posted
    await core_store(csms).put_id_tag("TAG-1")
    dispatcher.poke()
    await within(posted)  # the POST is over
    (_, committed), = dispatcher._outcomes
    return subscription, committed


@pytest_twisted.ensureDeferred
async def test_an_outcome_no_pass_recorded_yet_is_committed_when_the_csms_stops(csms_factory, receiver):
    """Stopping between a POST's end and the next pass: the outcome is written on the way out, and the event
    is not sent again after the restart."""
    first = await csms_factory(ALLOW_LOOPBACK)
    subscription, _ = await a_post_whose_outcome_waits_for_the_next_pass(first, receiver)
    await first.stop()

    second = await csms_factory(ALLOW_LOOPBACK)  # the same database
    second.clock.advance(3600)
    await drain(second)
    assert [event["data"]["id_tag"] for event in receiver.events()] == ["TAG-1"]
    assert [d["state"] for d in await history(second, subscription["id"])] == ["delivered"]


@pytest_twisted.ensureDeferred
async def test_subscriptions_sharing_a_receiver_reuse_their_connections(csms_factory, receiver):
    """Idle connections are kept per host and port, which subscriptions may share: as many as may be in
    flight there, so that a round of POSTs to three subscriptions of one receiver opens no new ones."""
    site, accepted = receiver.port.factory, []
    build = site.buildProtocol
    site.buildProtocol = lambda addr: (accepted.append(addr), build(addr))[1]
    csms = await csms_factory(ALLOW_LOOPBACK + "max_concurrent_per_subscription = 1\n")
    for _ in range(3):
        await subscribe(csms, receiver.url, ["id_tag.changed"])
    for n in range(3):
        await core_store(csms).put_id_tag(f"TAG-{n}")
        await drain(csms)
    assert len(receiver.requests) == 9
    assert len(accepted) == 3


@pytest_twisted.ensureDeferred
async def test_an_outcome_is_recorded_after_the_right_to_deliver_passed_to_another(csms_factory, receiver,
                                                                                   monkeypatch):
    """A POST made while this process delivered, whose pass had not come when another process took over
    delivery (the cluster's leadership, the worker's lock): its outcome is written all the same, or the
    other would send the event again."""
    csms = await csms_factory(ALLOW_LOOPBACK)
    subscription, committed = await a_post_whose_outcome_waits_for_the_next_pass(csms, receiver)
    dispatcher = plugin_of(csms).dispatcher
    recorded = defer.Deferred()  # (a timeout on ``committed`` itself would be swallowed by its own callbacks)
    committed.addBoth(lambda result: (recorded.callback(None), result)[1])
    monkeypatch.setattr(dispatcher, "may_deliver", lambda: False)
    dispatcher.poke()  # what the timer set when the POST ended does
    await within(recorded)
    assert [d["state"] for d in await history(csms, subscription["id"])] == ["delivered"]


@pytest_twisted.ensureDeferred
async def test_finished_deliveries_and_their_events_are_purged_after_the_retention(csms_factory, receiver):
    """history_retention after it ended, a delivery leaves the history, and its event goes with the last
    delivery that names it; a pending delivery (dead-lettered meanwhile) and its event are kept."""
    csms = await csms_factory(ALLOW_LOOPBACK + "dead_letter_after = 86400\nhistory_retention = 604800\n")
    first = await subscribe(csms, receiver.url + "?1", ["id_tag.changed"])
    second = await subscribe(csms, receiver.url + "?2", ["id_tag.changed"])
    await core_store(csms).put_id_tag("TAG-1")  # one event, a delivery to each
    await drain(csms)
    status, _, _ = await csms.api("PATCH", f"/webhooks/{second['id']}", json={"paused": True})
    assert status == 200
    await core_store(csms).put_id_tag("TAG-2")  # pending for the paused subscription
    await drain(csms)
    assert await stored_count(csms, events) == 2 and await stored_count(csms, deliveries) == 4

    csms.clock.advance(604800 - 3600)  # not yet
    await drain(csms)
    assert await stored_count(csms, deliveries) == 4
    csms.clock.advance(2 * 3600)  # the next hourly purge, past the retention
    await drain(csms)
    [kept] = await history(csms, second["id"])
    assert (kept["state"], kept["event"]["data"]["id_tag"]) == ("dead", "TAG-2")
    assert await history(csms, first["id"]) == []  # both delivered a week ago
    # TAG-1's event, shared by both its deliveries, went with them; TAG-2's stays with its dead delivery.
    assert await stored_count(csms, events) == 1


@pytest_twisted.ensureDeferred
async def test_the_purge_reads_the_history_through_indexes_not_whole(csms_factory):
    """Each statement of the hourly purge reaches the rows it deletes through an index (webhooks_0005):
    days of history are millions of rows, which the purge used to read in full every hour. PostgreSQL's
    planner may prefer a scan of a table this small, so there it is asked with sequential scans off:
    what is checked is that the index can serve (a partial index only serves a query whose condition
    implies the index's)."""
    from csms_plugins.webhooks.store import _PURGES

    csms = await csms_factory(ALLOW_LOOPBACK)
    delivery_db = plugin_of(csms).store.delivery_db
    dialect = delivery_db.dialect_name
    purge = _PURGES[dialect]
    expected = {"finished": "webhooks_deliveries_finished", "of_subscription": "webhooks_deliveries_of_subscription",
                "next_subscription": "webhooks_deliveries_of_subscription", "orphans": "webhooks_deliveries_of_event"}

    def plans(conn):
        found = {}
        if dialect == "postgresql":
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        params = {"before": datetime.now(timezone.utc), "chunk": 10, "subscription": 1, "after": 0, "ids": ["e-1"]}
        for name in expected:
            compiled = getattr(purge, name).compile(delivery_db.engine)
            if dialect == "postgresql":
                rows = conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.construct_params(params))
                found[name] = [row[0] for row in rows]
            else:  # EXPLAIN QUERY PLAN plans without the values
                sql = str(compiled)
                rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, (None,) * sql.count("?"))
                found[name] = [row[-1] for row in rows]
        return found

    found = await within(delivery_db.run(plans))
    for name, index in expected.items():
        assert any(index in step for step in found[name]), (name, found[name])
        assert not any(step.startswith("SCAN webhooks_deliveries") or "Seq Scan on webhooks_deliveries" in step
                       for step in found[name]), (name, found[name])


@pytest_twisted.ensureDeferred
async def test_a_long_history_is_purged_a_bounded_part_per_sweep(csms_factory, receiver, monkeypatch):
    """No purge transaction grows with the history: PURGE_MAX rows at most, PURGE_CHUNK per statement,
    and what is left goes at the next sweep (a minute later), not in an hour."""
    from csms_plugins.webhooks import store as store_module

    monkeypatch.setattr(store_module, "PURGE_CHUNK", 2)
    monkeypatch.setattr(store_module, "PURGE_MAX", 3)
    csms = await csms_factory(ALLOW_LOOPBACK + "history_retention = 3600\n")
    subscription = await subscribe(csms, receiver.url, ["id_tag.changed"])
    for k in range(7):
        await core_store(csms).put_id_tag(f"TAG-{k}")
    await drain(csms)
    assert len(await history(csms, subscription["id"])) == 7
    csms.clock.advance(2 * 3600)  # the next hourly purge: all 7 are past the retention
    await drain(csms)
    assert len(await history(csms, subscription["id"])) == 4
    assert plugin_of(csms).store.purge_unfinished
    csms.clock.advance(60)  # the next sweep goes on
    await drain(csms)
    assert len(await history(csms, subscription["id"])) == 1
    csms.clock.advance(60)
    await drain(csms)
    assert await history(csms, subscription["id"]) == [] and not plugin_of(csms).store.purge_unfinished
    assert await stored_count(csms, events) == 0 and await stored_count(csms, deliveries) == 0


@pytest_twisted.ensureDeferred
async def test_deliveries_left_by_a_deleted_subscription_are_purged_with_their_events(csms_factory, receiver):
    """A delivery naming a subscription that no longer exists (its event moved in while the subscription
    was being deleted) goes at the next purge, and its event with it unless another delivery names it."""
    csms = await csms_factory(ALLOW_LOOPBACK)
    kept = await subscribe(csms, receiver.url + "?kept", ["id_tag.changed"])
    gone = await subscribe(csms, receiver.url + "?gone", ["id_tag.changed"])
    receiver.statuses = [500, 500]  # both stay pending
    await core_store(csms).put_id_tag("TAG-1")  # one event, both subscriptions
    await drain(csms)
    store = plugin_of(csms).store
    [shared] = await within(store.delivery_db.read(
        lambda conn: conn.execute(select(events.c.event_id)).scalars().all()))

    def orphan_delivery(conn):  # as the fan-out leaves it when the deletion came in between
        conn.execute(insert(deliveries).values(subscription_id=999, event_id="left-1", event_type="id_tag.changed",
                                               state="pending", attempts=0, created_at=LEGACY_AT,
                                               next_attempt_at=LEGACY_AT + timedelta(days=30)))
        conn.execute(insert(events).values(event_id="left-1", body=LEGACY_BODY, created_at=LEGACY_AT))
        conn.execute(update(deliveries).where(deliveries.c.subscription_id == gone["id"]).values(subscription_id=998))
    await within(store.delivery_db.run(orphan_delivery))
    status, _, _ = await csms.api("DELETE", f"/webhooks/{gone['id']}")
    assert status == 204
    assert await stored_count(csms, deliveries) == 3  # the deletion's own purge found none of its own

    csms.clock.advance(3600)  # the hourly purge
    await drain(csms)
    names = await within(store.delivery_db.read(lambda conn: conn.execute(
        select(deliveries.c.subscription_id, deliveries.c.event_id)).all()))
    assert [tuple(row) for row in names] == [(kept["id"], shared)]
    assert await within(store.delivery_db.read(lambda conn: conn.execute(
        select(events.c.event_id)).scalars().all())) == [shared]


def test_event_ids_are_version_7_uuids_that_sort_by_their_time():
    import uuid

    from csms_plugins.webhooks.store import time_ordered_uuid

    ids = [time_ordered_uuid(ms) for ms in (1_764_657_000_000, 1_764_657_000_001, 1_764_657_000_001, 2 ** 48 - 1)]
    parsed = [uuid.UUID(i) for i in ids]
    assert [str(p) for p in parsed] == ids  # canonical form: lower-case hex, dashes at 8-4-4-4-12
    assert {p.version for p in parsed} == {7} and {p.variant for p in parsed} == {uuid.RFC_4122}
    assert [p.int >> 80 for p in parsed] == [1_764_657_000_000, 1_764_657_000_001, 1_764_657_000_001, 2 ** 48 - 1]
    assert ids[0] < ids[1] and ids[1] != ids[2] and max(ids) == ids[3]


def test_event_bodies_of_2_kib_or_more_are_stored_compressed_and_read_back_as_they_were():
    small = '{"id":"e-1","data":{}}'
    assert pack_body(small) == small and unpack_body(small) == small
    large = '{"id":"e-2","data":{"text":"' + "é, 1 kWh; " * 300 + '"}}'
    packed = pack_body(large)
    assert packed.startswith("z1:") and len(packed) * 4 < len(large.encode())
    assert unpack_body(packed) == large


@pytest_twisted.ensureDeferred
async def test_a_large_batch_is_stored_compressed_and_sent_signed_and_shown_as_json(csms_factory, receiver):
    """A batch of meter values (up to 100 events, tens of KiB of JSON) is kept compressed, in the delivery
    queue and for as long as its history is kept; what is POSTed, signed, resent and shown is the JSON."""
    csms = await csms_factory(ALLOW_LOOPBACK)
    subscription = await subscribe(csms, receiver.url, ["meter_values.received"], secret="s" * 32)
    station = await booted(csms, "CP-1")
    values = [str(100 * k) for k in range(30)]
    await send_meter_values(station, csms, *values)
    receiver.statuses = [500]
    await drain(csms)
    csms.clock.advance(10)  # the retry
    await drain(csms)
    first, retry = receiver.requests
    assert first["body"] == retry["body"] and values_of(first["json"]) == values
    for request in (first, retry):
        assert request["headers"]["webhook-signature"] == expected_signature("s" * 32, request["headers"],
                                                                             request["body"])
    [delivery] = await history(csms, subscription["id"])
    assert (delivery["state"], delivery["attempts"]) == ("delivered", 2) and delivery["event"] == first["json"]
    store = plugin_of(csms).store
    [stored] = await within(store.delivery_db.read(lambda conn: conn.execute(select(events.c.body)).scalars().all()))
    assert stored.startswith("z1:") and len(stored) * 4 < len(first["body"])


def test_the_downgrade_stores_compressed_bodies_as_json_again(database_url, tmp_path):
    """webhooks_0005 (and webhooks_delivery_0003 in the delivery file) changes no column for compressed
    bodies; going back before it turns every compressed body into JSON again, as an older release reads
    it."""
    batch = '{"id":"b-1","type":"meter_values.batch","data":{"events":[' + ",".join(['{"v":1}'] * 400) + "]}}"
    rows = [{"event_id": "b-1", "body": pack_body(batch), "created_at": LEGACY_AT},
            {"event_id": "legacy-1", "body": LEGACY_BODY, "created_at": LEGACY_AT}]
    assert rows[0]["body"].startswith("z1:")
    main = next(history for history in builtin_histories() if history.name == "webhooks")
    for url, history_of_file, before, after in (
            (database_url, main, "webhooks_0004", "webhooks_0005"),
            (f"sqlite:///{tmp_path / 'csms.db-webhooks.db'}", delivery_history(), "webhooks_delivery_0002",
             "webhooks_delivery_0003")):
        engine = create_engine(url)
        with engine.begin() as conn:
            prepare_schema(conn, [history_of_file] if history_of_file is not main else builtin_histories(),
                           auto_upgrade=True)
            conn.execute(insert(events), rows)
            command.downgrade(history_of_file.config(conn), before)
            assert dict(conn.execute(select(events.c.event_id, events.c.body)).fetchall()) == {
                "b-1": batch, "legacy-1": LEGACY_BODY}
            # Going up again removes, once, the events no delivery names (from here on the purge looks
            # for them only among those whose deliveries it deletes).
            conn.execute(insert(deliveries).values(subscription_id=1, event_id="b-1", event_type="meter_values.batch",
                                                   state="pending", attempts=0, created_at=LEGACY_AT,
                                                   next_attempt_at=LEGACY_AT))
            command.upgrade(history_of_file.config(conn), after)
            assert conn.execute(select(events.c.event_id)).scalars().all() == ["b-1"]
        engine.dispose()
