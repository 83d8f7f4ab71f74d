"""Token scopes, the audit trail of change requests, and the streamed CSV / JSON lines exports.

Over a real listening port with treq, on SQLite and PostgreSQL; the exports with rows a real station
sent, read page by page (the page size shrunk so that several pages are crossed).
"""
from __future__ import annotations

import csv
import io
import json

import pytest
import pytest_twisted
import treq
from conftest import clock_now, error_of
from sqlalchemy import insert
from twisted.internet import threads

from csms.api.tokens import create_token_thd
from csms.testing.pytest_plugin import TEST_API_TOKEN
from csms_plugins.core import exports
from csms_plugins.core.tables import transactions


async def token(csms, name: str, scope: str) -> str:
    _, value = await csms.app.db.run(create_token_thd, name, scope, desc="test_token")
    return value


async def audit(csms, query: str = "") -> list[dict]:
    status, body, _ = await csms.api("GET", "/audit" + query)
    assert status == 200, body
    return body["items"]


# -- scopes ----------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_read_only_token_reads_and_gets_403_on_every_kind_of_change(csms):
    reader = await token(csms, "support desk", "read")
    assert (await csms.api("POST", "/stations", json={"id": "CP-1"}))[0] == 201
    status, body, _ = await csms.api("GET", "/stations/CP-1", token=reader)
    assert (status, body["id"]) == (200, "CP-1")
    for method, path, payload in (("POST", "/id-tags", {"id_tag": "TAG"}), ("PATCH", "/stations/CP-1",
                                  {"description": "x"}), ("DELETE", "/stations/CP-1", None),
                                  ("POST", "/stations/CP-1/reset", {}), ("POST", "/stations/CP-1/calls/Reset",
                                                                         {"type": "Soft"})):
        status, body, _ = await csms.api(method, path, json=payload, token=reader)
        assert (status, error_of(body)) == (403, "forbidden"), (method, path)
        assert body["error"]["details"] == {"scope": "read", "required": "commands" if "reset" in path.lower()
                                            else "admin"}
    # Nothing changed, and the audit trail (admin only) holds every refusal.
    assert (await csms.api("GET", "/id-tags/TAG"))[0] == 404
    assert (await csms.api("GET", "/audit", token=reader))[0] == 403
    refused = [(e["method"], e["route"], e["status"], e["outcome"], e["token_name"]) for e in await audit(csms)
               if e["token_name"] == "support desk"]
    assert len(refused) == 5 and all(r[2:4] == (403, "forbidden") for r in refused)
    # A refusal names its station as an answered request does, so a search by station finds it (found by an
    # integrator: refused before their parameters were read, these had no station).
    by_station = [(e["method"], e["route"]) for e in await audit(csms, "?station_id=CP-1&token_name=support%20desk")]
    assert sorted(by_station) == [("DELETE", "/stations/{station_id}"), ("PATCH", "/stations/{station_id}"),
                                  ("POST", "/stations/{station_id}/calls/{action}"),
                                  ("POST", "/stations/{station_id}/reset")]


@pytest_twisted.ensureDeferred
async def test_a_commands_token_sends_commands_but_does_not_manage_data(csms):
    operator = await token(csms, "night shift", "commands")
    assert (await csms.api("POST", "/stations", json={"id": "CP-1"}))[0] == 201
    station = await csms.connect("CP-1")
    await station.call("BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"})
    station.responses["Reset"] = {"status": "Accepted"}
    status, body, _ = await csms.api("POST", "/stations/CP-1/reset", json={"type": "Hard"}, token=operator)
    assert await station.wait_for_call("Reset") == {"type": "Hard"}
    assert (status, body) == (200, {"status": "Accepted"})
    status, body, _ = await csms.api("POST", "/id-tags", json={"id_tag": "TAG"}, token=operator)
    assert (status, error_of(body)) == (403, "forbidden")
    entries = await audit(csms, "?token_name=night%20shift")
    assert [(e["route"], e["station_id"], e["status"], e["outcome"]) for e in entries] == [
        ("/id-tags", None, 403, "forbidden"), ("/stations/{station_id}/reset", "CP-1", 200, "ok")]


@pytest_twisted.ensureDeferred
async def test_csms_admin_creates_a_scoped_token_and_refuses_an_unknown_scope(csms, database_url, capsys):
    from csms.admin import main

    capsys.readouterr()
    assert await threads.deferToThread(main, ["-d", database_url, "token", "create", "--name", "bi",
                                              "--scope", "read"]) == 0
    value = capsys.readouterr().out.strip()
    assert (await csms.api("GET", "/stations", token=value))[0] == 200
    assert (await csms.api("POST", "/stations", json={"id": "X"}, token=value))[0] == 403
    with pytest.raises(SystemExit):
        main(["-d", database_url, "token", "create", "--scope", "root"])
    assert await threads.deferToThread(main, ["-d", database_url, "token", "list"]) == 0
    assert "\tbi\tread\t" in capsys.readouterr().out


# -- the audit trail -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_every_change_is_recorded_with_the_token_name_never_the_token(csms):
    billing = await token(csms, "billing", "admin")
    assert (await csms.api("POST", "/stations", json={"id": "CP-9", "password": "s3cret-pass-word"},
                           token=billing))[0] == 201
    assert (await csms.api("POST", "/id-tags", json={"id_tag": "TAG-1"}, token=billing))[0] == 201
    assert (await csms.api("PATCH", "/id-tags/TAG-1", json={"status": "Blocked"}, token=billing))[0] == 200
    assert (await csms.api("DELETE", "/id-tags/NOPE", token=billing))[0] == 404
    assert (await csms.api("POST", "/stations/CP-9/reset", json={}, token=billing))[0] == 409  # offline
    # Reads, and requests without a valid token, are not recorded.
    assert (await csms.api("GET", "/stations", token=billing))[0] == 200
    assert (await csms.api("POST", "/id-tags", json={"id_tag": "T2"}, token="csms_wrong"))[0] == 401

    entries = await audit(csms, "?token_name=billing")
    assert [(e["method"], e["route"], e["station_id"], e["status"], e["outcome"]) for e in entries] == [
        ("POST", "/stations/{station_id}/reset", "CP-9", 409, "station_offline"),
        ("DELETE", "/id-tags/{id_tag}", None, 404, "id_tag_not_found"),
        ("PATCH", "/id-tags/{id_tag}", None, 200, "ok"),
        ("POST", "/id-tags", None, 201, "ok"),
        ("POST", "/stations", "CP-9", 201, "ok"),
    ]
    assert entries[2]["path"] == "/api/v1/id-tags/TAG-1" and entries[0]["scope"] == "admin"
    assert entries[0]["remote_address"] == "127.0.0.1"
    everything = json.dumps(await audit(csms, "?limit=1000"))
    assert billing not in everything and "s3cret-pass-word" not in everything
    # Filters: by station, route, status, outcome, time.
    assert [e["route"] for e in await audit(csms, "?station_id=CP-9")] == ["/stations/{station_id}/reset",
                                                                           "/stations"]
    assert len(await audit(csms, "?route=/id-tags/%7Bid_tag%7D")) == 2
    assert [e["status"] for e in await audit(csms, "?outcome=id_tag_not_found")] == [404]
    assert len(await audit(csms, "?status=201")) == 2
    first = entries[-1]["at"]
    assert len(await audit(csms, "?token_name=billing&since=" + first.replace("+", "%2B"))) == 5
    assert await audit(csms, "?token_name=billing&until=" + first.replace("+", "%2B")) == []
    status, body, _ = await csms.api("GET", "/audit?status=99")
    assert (status, error_of(body)) == (400, "invalid_query_parameter")


@pytest_twisted.ensureDeferred
async def test_configured_tokens_are_named_by_their_position(csms):
    await csms.api("POST", "/stations", json={"id": "CP-2"})
    [entry] = await audit(csms)
    assert entry["token_name"] == "[api] tokens #1" and entry["token_id"] is None


# -- exports ---------------------------------------------------------------------------------------------


async def charge(csms, station_id: str, sessions: int):
    station = await csms.connect(station_id)
    await station.call("BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"})
    ids = []
    for n in range(sessions):
        started = f"2024-05-01T10:{n:02d}:00Z"
        tx = (await station.call("StartTransaction", {"connectorId": 1, "idTag": f"TAG-{n}", "meterStart": 1000,
                                                      "timestamp": started}))["transactionId"]
        await station.call("MeterValues", {"connectorId": 1, "transactionId": tx, "meterValue": [
            {"timestamp": f"2024-05-01T10:{n:02d}:30Z", "sampledValue": [{"value": "1500", "unit": "Wh"}]}]})
        if n % 2 == 0:
            await station.call("StopTransaction", {"transactionId": tx, "meterStop": 1000 + 100 * n,
                                                   "timestamp": f"2024-05-01T11:{n:02d}:00Z"})
        ids.append(tx)
    return ids


async def download(csms, path: str):
    response = await treq.get(csms.api_url + path, headers={"Authorization": ["Bearer " + TEST_API_TOKEN]},
                              reactor=csms.reactor)
    return response, (await treq.content(response)).decode("utf-8")


@pytest_twisted.ensureDeferred
async def test_transactions_export_as_csv_and_json_lines_crosses_pages_and_applies_filters(csms, monkeypatch):
    monkeypatch.setattr(exports, "PAGE_SIZE", 3)
    ids = await charge(csms, "CP-E", 7)
    await charge(csms, "CP-F", 1)

    response, text = await download(csms, "/exports/transactions?station_id=CP-E")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/csv; charset=utf-8"]
    assert 'filename="transactions-' in response.headers.getRawHeaders("content-disposition")[0]
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [int(r["transaction_id"]) for r in rows] == ids
    assert tuple(rows[0]) == exports.TRANSACTION_COLUMNS
    assert (rows[0]["stopped_at"], rows[0]["energy_wh"], rows[0]["duration_seconds"]) == (
        "2024-05-01T11:00:00.000Z", "0", "3600.0")
    assert (rows[1]["stopped_at"], rows[1]["energy_wh"]) == ("", "")
    assert rows[2]["energy_wh"] == "200"

    _, text = await download(csms, "/exports/transactions?format=jsonl&active=true&station_id=CP-E")
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["transaction_id"] for line in lines] == ids[1::2]
    assert lines[0]["started_at"] == "2024-05-01T10:01:00.000Z" and lines[0]["stopped_at"] is None

    _, text = await download(csms, "/exports/transactions?format=jsonl&since=2024-05-01T10:05:00Z")
    assert len(text.splitlines()) == 2

    response, text = await download(csms, "/exports/meter-values?transaction_id=%d" % ids[3])
    [sample] = list(csv.DictReader(io.StringIO(text)))
    assert (sample["value"], sample["unit"], sample["measurand"], sample["timestamp"]) == (
        "1500", "Wh", "Energy.Active.Import.Register", "2024-05-01T10:03:30.000Z")
    _, text = await download(csms, "/exports/meter-values?format=jsonl")
    assert len(text.splitlines()) == 8

    status, body, _ = await csms.api("GET", "/exports/transactions?format=xlsx")
    assert (status, error_of(body)) == (400, "invalid_query_parameter")


@pytest_twisted.ensureDeferred
async def test_csv_cells_a_spreadsheet_would_run_are_neutralised(csms):
    station = await csms.connect("CP-X")
    await station.call("BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"})
    for tag in ("=1+1", "-12", "@SUM(A1)"):
        await station.call("StartTransaction", {"connectorId": 1, "idTag": tag, "meterStart": -5,
                                                "timestamp": "2024-05-01T10:00:00Z"})
    _, text = await download(csms, "/exports/transactions")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["id_tag"], r["meter_start"]) for r in rows] == [("'=1+1", "-5"), ("-12", "-5"),
                                                              ("'@SUM(A1)", "-5")]


@pytest_twisted.ensureDeferred
async def test_a_client_that_hangs_up_mid_export_leaves_nothing_logged_and_the_api_serving(csms, monkeypatch):
    from test_hardening_http import LoggedFailures
    from twisted.internet import defer, protocol
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    monkeypatch.setattr(exports, "PAGE_SIZE", 7)
    await csms.app.db.run(lambda conn: conn.execute(insert(transactions), [
        {"station_id": "CP-H", "connector_id": 1, "id_tag": f"T{n}", "id_tag_status": "Accepted", "meter_start": 0,
         "started_at": clock_now(csms), "received_at": clock_now(csms)} for n in range(300)]), desc="test_rows")

    class HangUp(protocol.Protocol):
        def __init__(self):
            self.first_bytes = defer.Deferred()

        def dataReceived(self, data):
            if not self.first_bytes.called:
                self.transport.abortConnection()
                self.first_bytes.callback(data)

    with LoggedFailures() as failures:
        client = HangUp()
        await connectProtocol(TCP4ClientEndpoint(csms.reactor, "127.0.0.1", csms.api_port), client)
        client.transport.write(b"GET /api/v1/exports/transactions HTTP/1.1\r\nHost: x\r\n"
                               b"Authorization: Bearer " + TEST_API_TOKEN.encode() + b"\r\n\r\n")
        assert (await client.first_bytes.addTimeout(10, csms.reactor)).startswith(b"HTTP/1.1 200")
        assert (await csms.api("GET", "/transactions"))[0] == 200
    assert failures.events == []


class FakeRequest:
    """What _StreamPump uses of a twisted.web request."""

    def __init__(self):
        from twisted.internet import defer
        self.written, self.finished, self.producer = [], False, None
        self.gone = defer.Deferred()

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def notifyFinish(self):
        return self.gone

    def write(self, data):
        self.written.append(data)

    def finish(self):
        self.finished = True


@pytest_twisted.ensureDeferred
async def test_the_stream_pump_waits_while_paused_and_stops_reading_when_the_client_is_gone():
    from twisted.internet import defer
    from twisted.python.failure import Failure

    from csms.api.resource import _StreamPump

    read, closed = [], []
    more = [defer.Deferred() for _ in range(6)]

    async def chunks():
        try:
            for n in range(6):
                await more[n]
                read.append(n)
                yield b"%d" % n
        finally:
            closed.append(True)

    request = FakeRequest()
    pump = _StreamPump(request, chunks())
    done = defer.ensureDeferred(pump.run())
    more[0].callback(None)
    assert request.written == [b"0"]
    request.producer.pauseProducing()          # the client's connection is not draining
    more[1].callback(None)
    assert request.written == [b"0", b"1"] and read == [0, 1]
    more[2].callback(None)
    assert read == [0, 1]                      # nothing more is read while paused
    request.producer.resumeProducing()
    assert read == [0, 1, 2] and request.written[-1] == b"2"
    request.gone.errback(Failure(ConnectionError("client hung up")))
    more[3].callback(None)
    from twisted.internet import reactor
    await done.addTimeout(10, reactor)
    assert read == [0, 1, 2, 3] and request.written[-1] == b"2"
    assert closed == [True] and not request.finished and request.producer is None
