"""Issue 12, operator API and HTTP listeners: hostile input on every route is a 4xx with a JSON error, a
form-encoded body stays a body, and slow clients (slowloris, slow bodies) or too many connections cannot
exhaust the API and firmware listeners.

The route sweep is generated from the route table, so a new route is covered without touching this file.
"""
from __future__ import annotations

import json
from urllib.parse import quote

import pytest
import pytest_twisted
from conftest import booted, core_store, db_settled, error_of, table_contents, within
from twisted.internet import defer, protocol, reactor
from twisted.logger import globalLogPublisher

# -- hostile values ------------------------------------------------------------------------------------

#: Date-times that overflow when converted to UTC (issue 12).
OVERFLOWING_DATES = ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00")
#: Valid date-times at the edges of what Python represents: 2xx or 4xx, never 500.
EDGE_DATES = ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z")
HUGE_INTEGERS = (10**23, 2**63, -(2**63) - 1)
HOSTILE_TEXT = ("\ud800", "a\u0000b")
DEEP_JSON = b"[" * 30000 + b"]" * 30000
DEEP_OBJECT = b'{"a":' * 30000 + b"1" + b"}" * 30000

#: A value for each path parameter that names something the sweep creates; others get "1".
NAMED = {"station_id": "CP-SWEEP", "id_tag": "TAG-SWEEP", "action": "DataTransfer", "key": "HeartbeatInterval"}
#: Path segments no identifier can hold (NUL, not UTF-8), and integers beyond 64 bits (a fine string id).
HOSTILE_SEGMENTS = ("%00", "CP%00X", "%ED%A0%80", "%FF")
HUGE_SEGMENTS = ("1" + "0" * 23, "-1" + "0" * 23)


def sample(schema: dict):
    """A plausible value for a JSON schema (enough to get past the other fields' checks)."""
    if "enum" in schema:
        return schema["enum"][0]
    if "oneOf" in schema:
        return sample(schema["oneOf"][-1])
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next(k for k in kind if k != "null")
    if kind == "object":
        return {name: sample(schema["properties"][name]) for name in schema.get("required", ())}
    if kind == "array":
        return [sample(schema.get("items", {"type": "string"}))] * schema.get("minItems", 0)
    if kind == "integer":
        return max(schema.get("minimum", 1), 1)
    if kind == "number":
        return 1.5
    if kind == "boolean":
        return False
    if schema.get("format") == "date-time":
        return "2030-01-01T00:00:00Z"
    return "x" * max(schema.get("minLength", 1), 1)


def is_date(name: str, schema: dict) -> bool:
    return schema.get("format") == "date-time" or "date" in name or "time" in name or name.endswith("_at")


def hostile_values(name: str, schema: dict):
    """(value, must_refuse) for one body field: hostile values must be refused; edge dates must not crash."""
    kind = schema.get("type", "object")
    kinds = set(kind) if isinstance(kind, list) else {kind}
    if "oneOf" in schema:
        kinds |= {k for alternative in schema["oneOf"] for k in ([alternative.get("type")]
                                                                 if isinstance(alternative.get("type"), str)
                                                                 else alternative.get("type", []))}
    if "string" in kinds:
        yield from ((text, True) for text in HOSTILE_TEXT)
        if is_date(name, schema):
            yield from ((date, True) for date in OVERFLOWING_DATES)
            yield from ((date, False) for date in EDGE_DATES)
    if kinds & {"integer", "number"}:
        yield from ((number, True) for number in HUGE_INTEGERS)
    if "array" in kinds:
        yield from (([text], True) for text in HOSTILE_TEXT)
    if "object" in kinds and not schema.get("properties"):
        yield from (({"key": text}, True) for text in HOSTILE_TEXT)
        yield {"\ud800": 1}, True
        yield {"key": 10**23}, True


def body_cases(schema: dict):
    """(description, raw body, must_refuse): a plausible body with one field made hostile at a time."""
    base = sample(schema)
    yield "30,000 nested arrays", DEEP_JSON, True
    yield "30,000 nested objects", DEEP_OBJECT, True
    yield from ((f"{text!r} as the whole body", json.dumps(text).encode(), True) for text in HOSTILE_TEXT)
    if not isinstance(base, dict):
        return
    for name, field_schema in (schema.get("properties") or {}).items():
        for value, must_refuse in hostile_values(name, field_schema):
            yield f"{name}={value!r}", json.dumps({**base, name: value}).encode(), must_refuse
        if field_schema.get("type") == "object" and field_schema.get("properties"):
            inner = sample(field_schema)
            for inner_name, inner_schema in field_schema["properties"].items():
                for value, must_refuse in hostile_values(inner_name, inner_schema):
                    yield (f"{name}.{inner_name}={value!r}",
                           json.dumps({**base, name: {**inner, inner_name: value}}).encode(), must_refuse)


def query_cases(query_spec):
    """(description, query string, must_refuse) for each declared query parameter."""
    for spec in query_spec:
        raw = ["%00", "a%00b", "%ED%A0%80"]
        if spec.kind == "integer":
            raw += [str(n) for n in HUGE_INTEGERS]
        for value in raw:
            yield f"?{spec.name}={value}", f"{spec.name}={value}", True
        if spec.kind == "date-time":
            for date in OVERFLOWING_DATES:
                yield f"?{spec.name}={date}", f"{spec.name}={quote(date)}", True
            for date in EDGE_DATES:
                yield f"?{spec.name}={date}", f"{spec.name}={quote(date)}", False


def route_cases(route):
    """Every hostile request for one route: (description, path, raw body or None, must_refuse)."""
    def path(**hostile):
        values = {name: hostile.get(name, quote(NAMED.get(name, "1"), safe="")) for name in route.params}
        return route.template.format(**values)

    body = json.dumps(sample(route.body)).encode() if route.body is not None else None
    for name in route.params:
        for segment in HOSTILE_SEGMENTS:
            yield f"path {name}={segment}", path(**{name: segment}), body, True
        for segment in HUGE_SEGMENTS:
            yield f"path {name}={segment}", path(**{name: segment}), body, False
    for description, query, must_refuse in query_cases(route.query):
        yield description, f"{path()}?{query}", body, must_refuse
    if route.body is not None:
        for description, raw, must_refuse in body_cases(route.body):
            yield f"body {description}", path(), raw, must_refuse


class LoggedFailures:
    """Collects what the process logs as a failure (tracebacks) while a test runs."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        if "log_failure" in event or "Unhandled" in str(event.get("log_format", "")):
            self.events.append(event)

    def __enter__(self):
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self)


async def sweep_state(csms):
    """A registered, booted and connected station and a known id tag, so handlers get past their 404s."""
    await csms.api("POST", "/stations", json={"id": NAMED["station_id"]})
    station = await booted(csms, NAMED["station_id"])
    await core_store(csms).put_id_tag(NAMED["id_tag"], status="Accepted")
    # The connection's own write (last_connected_at) is not awaited by anything: let it land before a
    # test takes its "before" snapshot of the tables.
    await db_settled(csms.app)
    return station


async def sweep(csms, cases) -> list[str]:
    """Send each case; what was answered wrongly (a 5xx, a hostile value accepted, a 4xx not in JSON)."""
    wrong = []
    for route, description, path, raw, must_refuse in cases:
        status, body, response = await csms.api(route.method, path, data=raw,
                                                headers={"Content-Type": "application/json"})
        content_type = (response.headers.getRawHeaders("content-type") or [""])[0]
        if status >= 500 or (must_refuse and status < 400):
            wrong.append(f"{route.method} {route.template} {description}: {status} {body}")
        elif status >= 400 and (content_type != "application/json" or "error" not in (body or {})):
            wrong.append(f"{route.method} {route.template} {description}: {status} without a JSON error")
    return wrong


@pytest_twisted.ensureDeferred
async def test_every_route_answers_hostile_input_with_a_4xx_json_error_and_writes_nothing(csms):
    await sweep_state(csms)
    cases = [(route, *case) for route in csms.app.api_router.routes for case in route_cases(route)]
    before = await table_contents(csms)
    with LoggedFailures() as failures:
        assert await sweep(csms, [case for case in cases if case[-1]]) == []
        assert await table_contents(csms) == before
        # Values at the edges (year 9999, a 24-digit configuration key) may be taken, but never crash.
        assert await sweep(csms, [case for case in cases if not case[-1]]) == []
    assert failures.events == []
    assert (await csms.api("GET", f"/stations/{NAMED['station_id']}"))[0] == 200


# -- the issue's reproductions, one by one ------------------------------------------------------------------

RESERVE = {"connector_id": 1, "id_tag": NAMED["id_tag"]}
REPRODUCTIONS = [
    # (method, path, JSON body or raw bytes, expected status, expected error code)
    ("GET", "/transactions?since=0001-01-01T00:00:00%2B01:00", None, 400, "invalid_query_parameter"),
    ("GET", "/transactions?until=9999-12-31T23:59:59-01:00", None, 400, "invalid_query_parameter"),
    ("GET", "/stations/CP-SWEEP/composite-schedule/preview?start=9999-12-31T23:59:59-01:00", None, 400,
     "invalid_query_parameter"),
    ("GET", "/stations/CP-SWEEP/composite-schedule/preview?start=9999-12-31T23:59:59Z", None, 400,
     "invalid_query_parameter"),
    ("POST", "/id-tags", {"id_tag": "T-1", "expiry_date": "0001-01-01T00:00:00+01:00"}, 422, "validation_failed"),
    ("PATCH", "/id-tags/TAG-SWEEP", {"expiry_date": "9999-12-31T23:59:59-01:00"}, 422, "validation_failed"),
    ("POST", "/stations/CP-SWEEP/reservations", {**RESERVE, "expiry_date": "9999-12-31T23:59:59-01:00"}, 422,
     "validation_failed"),
    ("POST", "/stations/CP-SWEEP/calls/ReserveNow", {"connectorId": 1, "idTag": "T", "reservationId": 1,
                                                      "expiryDate": "0001-01-01T00:00:00+01:00"}, 422,
     "invalid_ocpp_payload"),
    ("GET", "/transactions/100000000000000000000000", None, 404, "transaction_not_found"),
    ("GET", "/firmware-files/100000000000000000000000", None, 404, "firmware_file_not_found"),
    ("GET", "/diagnostics-requests/100000000000000000000000", None, 404, "diagnostics_request_not_found"),
    ("DELETE", "/stations/CP-SWEEP/charging-profiles/100000000000000000000000", None, 404,
     "charging_profile_not_found"),
    ("GET", "/transactions?offset=100000000000000000000000", None, 400, "invalid_query_parameter"),
    ("GET", "/diagnostics-files?request_id=9223372036854775808", None, 400, "invalid_query_parameter"),
    ("POST", "/stations/CP-SWEEP/firmware-update", {"firmware_id": 10**23}, 422, "validation_failed"),
    ("POST", "/transactions/1/stop", {"meter_stop": 10**23}, 422, "validation_failed"),
    ("POST", "/stations", DEEP_JSON, 400, "json_too_deep"),
    ("POST", "/stations/CP-SWEEP/calls/DataTransfer", b'{"vendorId":' + DEEP_OBJECT + b"}", 400, "json_too_deep"),
    ("POST", "/stations", b'{"id": "CP-\\ud800"}', 422, "validation_failed"),
    ("POST", "/stations/CP-SWEEP/calls/DataTransfer", b'{"vendorId": "V", "data": "\\ud800"}', 422,
     "validation_failed"),
    ("POST", "/stations", b'{"id": "CP-\\u0000"}', 422, "validation_failed"),
    ("POST", "/stations", b'{"id": "CP-1", "description": 1e400}', 400, "invalid_json"),
    ("GET", "/stations/%00", None, 400, "invalid_path_parameter"),
    ("GET", "/stations/CP%00SWEEP/events", None, 400, "invalid_path_parameter"),
    ("GET", "/id-tags/%ED%A0%80", None, 400, "invalid_path_parameter"),
    ("GET", "/transactions?station_id=%00", None, 400, "invalid_query_parameter"),
    ("GET", "/reservations?station_id=CP%00", None, 400, "invalid_query_parameter"),
    # Found by schemathesis (2026-12): a window that holds nothing is refused before anything is sent or
    # an upload location made; the station ids the OCPP endpoint refuses cannot be registered.
    ("POST", "/stations/CP-SWEEP/diagnostics", {"start_time": "2024-05-02T00:00:00Z",
                                                "stop_time": "2024-05-01T23:59:59+23:00"}, 422, "reversed_time_window"),
    ("POST", "/stations/CP-SWEEP/logs", {"log_type": "DiagnosticsLog", "oldest_timestamp": "2024-05-02T00:00:00Z",
                                         "latest_timestamp": "2024-05-01T00:00:00Z"}, 422, "reversed_time_window"),
    ("POST", "/stations", {"id": "CP-\u200b"}, 422, "invalid_station_id"),
    # An operator's date-time says where its clock is (found by an integrator: these were read as UTC).
    ("GET", "/transactions?since=2026-12-03T04:08:00", None, 400, "invalid_query_parameter"),
    ("GET", "/audit?since=2026-12-03", None, 400, "invalid_query_parameter"),
    ("POST", "/id-tags", {"id_tag": "T-2", "expiry_date": "2030-12-31T23:59:59"}, 422, "validation_failed"),
    ("POST", "/stations/CP-SWEEP/composite-schedule", {"connector_id": 1, "duration": 253000000000}, 422,
     "validation_failed"),
]


@pytest.mark.parametrize("method,path,body,expected_status,expected_code", REPRODUCTIONS,
                         ids=[f"{m} {p[:60]} {s}" for m, p, _, s, _ in REPRODUCTIONS])
@pytest_twisted.ensureDeferred
async def test_issue_12_operator_inputs_are_a_4xx_json_error(csms, method, path, body, expected_status,
                                                             expected_code):
    await sweep_state(csms)
    before = await table_contents(csms)
    raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    with LoggedFailures() as failures:
        status, answer, _ = await csms.api(method, path, data=raw, headers={"Content-Type": "application/json"})
    assert (status, error_of(answer)) == (expected_status, expected_code), answer
    assert failures.events == []
    assert await table_contents(csms) == before


# -- a form-encoded body is a body --------------------------------------------------------------------------

#: Bytes a form parser would split into "parameters": '=' and '&' among arbitrary binary.
FORM_LOOKING_FIRMWARE = b"\x00\x01name=evil&\xff\xfe=\x80&limit=5&" + bytes(range(256)) * 4


@pytest_twisted.ensureDeferred
async def test_upload_with_curls_default_form_content_type_stores_the_raw_body(csms):
    import treq

    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, body, _ = await csms.api("POST", "/firmware-files?name=fw.bin", data=FORM_LOOKING_FIRMWARE,
                                     headers=form)
    assert status == 201, body
    assert body["size"] == len(FORM_LOOKING_FIRMWARE)
    response = await within(treq.get(body["url"], reactor=reactor))
    assert await within(treq.content(response)) == FORM_LOOKING_FIRMWARE
    # A JSON body sent as curl sends `-d '{...}'` is read as JSON, not as a form field.
    status, body, _ = await csms.api("POST", "/stations", data=b'{"id": "CP-FORM"}', headers=form)
    assert (status, body["id"]) == (201, "CP-FORM")


@pytest_twisted.ensureDeferred
async def test_a_station_id_the_ocpp_endpoint_would_refuse_cannot_be_registered(csms):
    """Found by schemathesis: such ids were registered (201), and their stations could never connect."""
    too_long = "C" * (csms.app.config.ocpp.max_charge_point_id_length + 1)
    for station_id in ("CTRL\u0001ID", "ZW\u200bSP", too_long):
        status, body, _ = await csms.api("POST", "/stations", json={"id": station_id})
        assert (status, body["error"]["code"]) == (422, "invalid_station_id"), station_id
    status, body, _ = await csms.api("GET", "/stations")
    assert body["total"] == 0
    # Any script's letters, punctuation and spaces are ids a station may have, and connect with.
    for station_id in ("CP-1", "Ladesäule Süd 7", "充电桩-2"):
        status, body, _ = await csms.api("POST", "/stations", json={"id": station_id})
        assert (status, body["id"]) == (201, station_id)
    await booted(csms, "充电桩-2")  # its BootNotification is answered Accepted


@pytest_twisted.ensureDeferred
async def test_a_whole_number_written_with_a_fraction_is_the_integer_the_station_is_sent(csms):
    """JSON Schema (the document's dialect) counts 1.0 as an integer, OCPP's draft 4 schemas do not: 1.0 used
    to pass the route's check and fail OCPP's (422 invalid_ocpp_payload). It is decoded as 1."""
    station = await booted(csms, "CP-WHOLE", connectors=2)
    station.responses["ChangeAvailability"] = {"status": "Accepted"}
    status, body, _ = await csms.api("POST", "/stations/CP-WHOLE/availability",
                                     data=b'{"type": "Inoperative", "connector_id": 2.0}')
    assert status == 200, body
    payload = await station.wait_for_call("ChangeAvailability")
    assert payload == {"connectorId": 2, "type": "Inoperative"} and type(payload["connectorId"]) is int
    # 1e0 too; a real fraction is still refused by the route's check, with nothing sent.
    status, body, _ = await csms.api("POST", "/stations/CP-WHOLE/availability",
                                     data=b'{"type": "Operative", "connector_id": 1e0}')
    assert status == 200, body
    assert await station.wait_for_call("ChangeAvailability") == {"connectorId": 1, "type": "Operative"}
    calls = len(station.received_calls)
    status, body, _ = await csms.api("POST", "/stations/CP-WHOLE/availability",
                                     data=b'{"type": "Operative", "connector_id": 1.5}')
    assert (status, body["error"]["code"]) == (422, "validation_failed")
    assert len(station.received_calls) == calls


# -- slow and piled-up clients on every HTTP listener ----------------------------------------------------------

LISTENERS = ("api", "firmware")
#: A request line each listener answers quickly once complete (a JSON 200 or 404).
REQUEST_LINE = {"api": b"GET /api/v1/nowhere HTTP/1.1\r\n", "firmware": b"GET /firmware/none.bin HTTP/1.1\r\n"}
#: Where a body goes on each listener (answered 4xx once complete: no credentials, or an unknown station).
BODY_TARGET = {"api": b"POST /api/v1/stations HTTP/1.1\r\n", "firmware": b"PUT /diagnostics/none.log HTTP/1.1\r\n"}
#: The config text setting one limit on a listener: [api] name = value, or [plugin:firmware] http_name = value.
SECTION = {"api": ("[api]", ""), "firmware": ("[plugin:firmware]", "http_")}


def limits_config(listener: str, **values) -> str:
    section, prefix = SECTION[listener]
    return section + "\n" + "".join(f"{prefix}{name} = {value}\n" for name, value in values.items())


def listening_port(csms, listener: str):
    if listener == "api":
        return csms.service.ports["api"]
    return csms.app.pm.get_plugin("firmware").servers.http_port


class RawClient(protocol.Protocol):
    """A TCP client that sends what the test says, when it says, and keeps everything it receives."""

    def __init__(self):
        self.received = b""
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed.callback(self.received)


async def raw_connection(csms, listener: str, source: str = "127.0.0.1") -> RawClient:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    port = listening_port(csms, listener).getHost().port
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
    return await within(connectProtocol(endpoint, RawClient()))


async def until(condition, what: str, seconds: float = 10):
    """Let the reactor turn until ``condition()`` holds: bytes a test client wrote reached the server (no
    event tells that), or the server saw a close."""
    from twisted.internet.task import deferLater

    give_up_at = reactor.seconds() + seconds
    while not condition():
        if reactor.seconds() > give_up_at:
            raise TimeoutError(what)
        await deferLater(reactor, 0, lambda: None)


def address_of(side, which: str = "getHost") -> tuple:
    """(host, port) of a connection's end: clients bind to several loopback addresses, each with its own
    ports, so that a port alone may be two connections'."""
    address = getattr(side.transport if isinstance(side, RawClient) else side, which)()
    return address.host, address.port


async def server_channel(csms, listener: str, client: RawClient):
    """The server's HTTP channel for ``client``'s connection."""
    factory = listening_port(csms, listener).factory
    client_address = address_of(client)

    def find():
        return next((wrapper.wrappedProtocol for wrapper in factory.protocols
                     if address_of(wrapper, "getPeer") == client_address), None)
    await until(lambda: find() is not None, "the server accepted the connection")
    return find()


async def send(channel, client: RawClient, data: bytes) -> None:
    """Send ``data`` and wait until the server has received it."""
    expected = channel.request_bytes + len(data)
    client.transport.write(data)
    await until(lambda: channel.request_bytes >= expected, "the server received the bytes")


def responses(received: bytes) -> list[tuple[int, dict]]:
    """The complete responses in what a raw client received: (status, JSON body), in order."""
    complete = []
    while b"\r\n\r\n" in received:
        head, _, rest = received.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        if len(rest) < length:
            break
        complete.append((int(head.split(b" ")[1]), json.loads(rest[:length])))
        received = rest[length:]
    return complete


def timed_out(received: bytes) -> bool:
    """The last answer is a 408 with the JSON error body."""
    status, body = responses(received)[-1]
    return (status, body["error"]["code"]) == (408, "request_timeout")


async def answered_normally(csms, listener: str) -> bool:
    """A well-behaved request on a new connection gets its answer."""
    if listener == "api":
        return (await csms.api("GET", "/stations"))[0] == 200
    import treq

    url = f"http://127.0.0.1:{listening_port(csms, listener).getHost().port}/firmware/none.bin"
    response = await within(treq.get(url, reactor=reactor, persistent=False))
    await within(treq.content(response))
    return response.code == 404


@pytest.mark.parametrize("listener", LISTENERS)
@pytest_twisted.ensureDeferred
async def test_headers_trickled_a_byte_at_a_time_are_cut_off_at_the_header_deadline(csms_factory, listener):
    csms = await csms_factory(config_text=limits_config(listener, request_header_timeout=20))
    client = await raw_connection(csms, listener)
    channel = await server_channel(csms, listener, client)
    await send(channel, client, REQUEST_LINE[listener])
    for header in (b"X-Slow: 1\r\n", b"X-Slow: 2\r\n", b"X-Slow: 3\r\n"):
        csms.clock.advance(5)  # a byte every 5 s restarted the old idle timeout for ever
        await send(channel, client, header)
        assert not client.closed.called
    csms.clock.advance(4.9)
    assert not client.closed.called
    csms.clock.advance(0.1)
    assert timed_out(await within(client.closed))
    assert await answered_normally(csms, listener)


@pytest.mark.parametrize("listener", LISTENERS)
@pytest_twisted.ensureDeferred
async def test_a_connection_that_sends_nothing_is_closed_at_the_header_deadline_without_an_answer(
        csms_factory, listener):
    csms = await csms_factory(config_text=limits_config(listener, request_header_timeout=20))
    client = await raw_connection(csms, listener)
    await server_channel(csms, listener, client)
    csms.clock.advance(19.9)
    assert not client.closed.called
    csms.clock.advance(0.1)
    assert await within(client.closed) == b""


@pytest.mark.parametrize("listener", LISTENERS)
@pytest_twisted.ensureDeferred
async def test_a_kept_alive_connection_gets_a_new_header_deadline_from_its_next_request(csms_factory, listener):
    csms = await csms_factory(config_text=limits_config(listener, request_header_timeout=20))
    client = await raw_connection(csms, listener)
    channel = await server_channel(csms, listener, client)
    client.transport.write(REQUEST_LINE[listener] + b"Host: x\r\n\r\n")
    await until(lambda: responses(client.received), "the first answer")
    csms.clock.advance(60)  # idle between requests: not this deadline's business (nor a race with reuse)
    assert not client.closed.called
    await send(channel, client, REQUEST_LINE[listener])
    csms.clock.advance(19.9)
    assert not client.closed.called
    csms.clock.advance(0.1)
    assert [status for status, _ in responses(await within(client.closed))] == [404, 408]


@pytest.mark.parametrize("listener", LISTENERS)
@pytest_twisted.ensureDeferred
async def test_a_body_slower_than_the_minimum_rate_is_cut_off_and_a_fair_one_finishes(csms_factory, listener):
    csms = await csms_factory(config_text=limits_config(listener, request_body_timeout=20,
                                                        request_body_min_rate=500))
    head = BODY_TARGET[listener] + b"Host: x\r\nContent-Type: application/json\r\nContent-Length: 20001\r\n\r\n"

    # A trickle: 100 bytes now, 100 more after 19 s; 20 s + 200 B / 500 B/s = 20.4 s is all it gets.
    slow = await raw_connection(csms, listener)
    channel = await server_channel(csms, listener, slow)
    await send(channel, slow, head + b" " * 100)
    csms.clock.advance(19)
    await send(channel, slow, b" " * 100)
    csms.clock.advance(1.3)
    assert not slow.closed.called
    csms.clock.advance(0.2)
    assert timed_out(await within(slow.closed))

    # 1,000 bytes/s for 20 s, past the 20 s a total limit would allow: it finishes and gets its answer.
    fair = await raw_connection(csms, listener)
    channel = await server_channel(csms, listener, fair)
    await send(channel, fair, head)
    for _ in range(20):
        await send(channel, fair, b" " * 1000)
        csms.clock.advance(1)
    assert not fair.closed.called
    fair.transport.write(b"x")  # not JSON, no credentials: a 4xx, but an answer
    await until(lambda: responses(fair.received), "the answer")
    assert responses(fair.received)[0][0] in (400, 401), fair.received


async def held_connections(csms, listener: str, count: int, source: str = "127.0.0.1") -> list[RawClient]:
    """``count`` connections the server has accepted (and that send nothing)."""
    clients = []
    for _ in range(count):
        client = await raw_connection(csms, listener, source)
        await server_channel(csms, listener, client)
        clients.append(client)
    return clients


async def refused(csms, listener: str, source: str = "127.0.0.1") -> bool:
    """A new connection from ``source`` is closed at once, before anything is said (else it is accepted)."""
    client = await raw_connection(csms, listener, source)
    factory = listening_port(csms, listener).factory
    client_address = address_of(client)
    await until(lambda: client.closed.called or any(address_of(wrapper, "getPeer") == client_address
                                                    for wrapper in factory.protocols), "refused or accepted")
    if not client.closed.called:
        client.transport.loseConnection()
        return False
    return await client.closed == b""


class RefusalLog:
    """The lines the listeners log about refused connections."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        if event.get("log_namespace") == "csms.http" and "refused" in event.get("log_format", ""):
            self.events.append(event)

    def __enter__(self):
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self)


@pytest.mark.parametrize("listener", LISTENERS)
@pytest_twisted.ensureDeferred
async def test_connections_beyond_the_per_address_cap_are_closed_at_once_until_others_close(
        csms_factory, listener):
    from twisted.web._newclient import ResponseNeverReceived

    csms = await csms_factory(config_text=limits_config(listener, max_connections_per_address=3))
    held = await held_connections(csms, listener, 3)
    assert await refused(csms, listener)
    if listener == "api":
        with pytest.raises(ResponseNeverReceived):
            await csms.api("GET", "/stations")
    # Another address is still served.
    assert not await refused(csms, listener, "127.0.0.2")

    factory = listening_port(csms, listener).factory
    open_before = factory.open_connections()
    held[0].transport.loseConnection()
    await until(lambda: factory.open_connections() < open_before, "the server saw the close")
    assert await answered_normally(csms, listener)


@pytest.mark.parametrize("listener", LISTENERS)
@pytest_twisted.ensureDeferred
async def test_connections_beyond_the_listener_cap_are_closed_at_once_and_logged_once_a_minute(
        csms_factory, listener):
    csms = await csms_factory(config_text=limits_config(listener, max_connections=4, max_connections_per_address=2,
                                                        request_header_timeout=600))
    await held_connections(csms, listener, 2, "127.0.0.1")
    await held_connections(csms, listener, 2, "127.0.0.2")
    with RefusalLog() as log:
        for source in ("127.0.0.3", "127.0.0.1", "127.0.0.3", "127.0.0.4", "127.0.0.5"):
            assert await refused(csms, listener, source)
        assert [event["count"] for event in log.events] == [1]
        csms.clock.advance(60)
        assert await refused(csms, listener, "127.0.0.6")
        assert [event["count"] for event in log.events] == [1, 5]
        assert log.events[-1]["address"] == "127.0.0.6"


# -- the limits' settings ---------------------------------------------------------------------------------------


def test_the_shipped_config_shows_every_listener_limit_at_its_default():
    import os
    from dataclasses import fields

    from csms.config import load_config
    from csms.httplimits import HTTPLimits

    config = load_config(os.path.join(os.path.dirname(__file__), "..", "etc", "csms.ini"))
    defaults = HTTPLimits()
    firmware = config.plugin_settings["firmware"]
    for field in fields(HTTPLimits):
        assert getattr(config.api, field.name) == getattr(defaults, field.name)
        assert float(firmware["http_" + field.name]) == getattr(defaults, field.name)


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("setting, value, message", [
    ("request_header_timeout", 0, "request_header_timeout must be positive"),
    ("request_body_timeout", -1, "request_body_timeout must be positive"),
    ("request_body_min_rate", -1, "request_body_min_rate cannot be negative"),
    ("max_connections", -1, "max_connections cannot be negative"),
    ("max_connections_per_address", "many", "max_connections_per_address = 'many' is not a valid int"),
])
@pytest_twisted.ensureDeferred
async def test_unusable_listener_limits_are_refused_naming_the_setting(csms_factory, listener, setting, value,
                                                                      message):
    from csms.config import ConfigError

    section, prefix = SECTION[listener]
    with pytest.raises(ConfigError) as raised:
        await csms_factory(config_text=limits_config(listener, **{setting: value}))
    assert f"{section} {prefix}{message}" in str(raised.value)
