"""The dashboard (/ui/) over plain HTTP: sign-in and sessions, CSRF on every form, scopes, escaping, the
audit trail, assets and the event stream's limits. Real loopback sockets with treq, SQLite and PostgreSQL.
"""
from __future__ import annotations

import json
import re
from datetime import timedelta
from types import SimpleNamespace
from urllib.parse import urlencode

import pytest
import pytest_twisted
import treq
from conftest import clock_now, station_time, within
from twisted.internet import defer, task

from csms.api import web_resources
from csms.api.tokens import Caller, create_token_thd
from csms.plugins import PluginError
from csms.testing.pytest_plugin import TEST_API_TOKEN
from csms_plugins.dashboard.events import EventBroker
from csms_plugins.dashboard.sessions import SessionStore, SignInThrottle

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


class UiClient:
    """A browser without JavaScript: keeps the /ui/ cookies, follows no redirect by itself."""

    def __init__(self, csms):
        self.csms = csms
        self.cookies: dict[str, str] = {}
        self.set_cookie_headers: list[str] = []

    async def request(self, method: str, path: str, form: dict | None = None, headers: dict | None = None,
                      unbuffered: bool = False, data: bytes | None = None):
        all_headers = dict(headers or {})
        if self.cookies:
            all_headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if form is not None:
            data = urlencode(form).encode()
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
        response = await treq.request(method, f"http://127.0.0.1:{self.csms.api_port}{path}", data=data,
                                      headers={k: [v] for k, v in all_headers.items()}, allow_redirects=False,
                                      unbuffered=unbuffered, reactor=self.csms.reactor, timeout=30)
        for raw in response.headers.getRawHeaders("set-cookie") or []:
            self.set_cookie_headers.append(raw)
            name, _, rest = raw.partition("=")
            value = rest.split(";", 1)[0]
            if "max-age=0" in raw.lower():
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        if unbuffered:
            return response.code, None, response
        return response.code, (await treq.content(response)).decode("utf-8"), response

    async def sign_in(self, token: str = TEST_API_TOKEN):
        _, page, _ = await self.request("GET", "/ui/login")
        login_token = re.search(r'name="login_token" value="([^"]+)"', page).group(1)
        return await self.request("POST", "/ui/login", form={"login_token": login_token, "token": token})

    async def csrf(self, path: str = "/ui/stations") -> str:
        status, page, _ = await self.request("GET", path)
        assert status == 200, page
        return CSRF.search(page).group(1)


def location(response) -> str:
    return response.headers.getRawHeaders("location")[0]


async def signed_in(csms, token: str = TEST_API_TOKEN) -> UiClient:
    client = UiClient(csms)
    status, _, response = await client.sign_in(token)
    assert (status, location(response)) == (303, "/ui/stations")
    return client


async def named_token(csms, name: str, scope: str) -> str:
    return (await csms.app.db.run(create_token_thd, name, scope, desc="test_token"))[1]


def dashboard(csms):
    return csms.app.pm.get_plugin("dashboard")


# -- sign-in and sessions --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pages_need_a_session_and_a_wrong_token_gets_the_sign_in_page(csms):
    client = UiClient(csms)
    status, _, response = await client.request("GET", "/ui/stations/CP-1")
    assert (status, location(response)) == (303, "/ui/login")
    status, page, _ = await client.sign_in("csms_not-a-token")
    assert status == 401 and "That token is not valid." in page and 'name="token"' in page
    assert "csms_ui_session" not in client.cookies
    # A sign-in form that did not come from the sign-in page is refused (login CSRF).
    status, page, _ = await client.request("POST", "/ui/login", form={"login_token": "forged", "token": TEST_API_TOKEN})
    assert status == 403 and "csms_ui_session" not in client.cookies


@pytest_twisted.ensureDeferred
async def test_sign_in_attempts_are_limited_per_address_and_in_size(csms_factory):
    csms = await csms_factory("[plugin:dashboard]\nsign_in_failures_per_minute = 3\n")
    client = UiClient(csms)
    for _ in range(3):
        assert (await client.sign_in("csms_guess"))[0] == 401
    status, page, response = await client.sign_in()  # even the right token: the address waits first
    assert status == 429 and "Too many failed sign-ins" in page and "csms_ui_session" not in client.cookies
    assert response.headers.getRawHeaders("retry-after") == ["60"]
    csms.clock.advance(61)
    assert (await client.sign_in())[0] == 303
    status, _, _ = await UiClient(csms).request("POST", "/ui/login", data=b"token=" + b"x" * 70_000,
                                                headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 413


@pytest_twisted.ensureDeferred
async def test_sign_in_issues_a_fresh_session_id_with_strict_cookie_flags(csms):
    client = UiClient(csms)
    client.cookies["csms_ui_session"] = "chosen-by-an-attacker"
    status, _, response = await client.sign_in()
    assert (status, location(response)) == (303, "/ui/stations")
    first = client.cookies["csms_ui_session"]
    assert first != "chosen-by-an-attacker" and len(first) >= 40
    cookie = [h for h in client.set_cookie_headers if h.startswith("csms_ui_session=" + first)][0]
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/ui/"} <= flags and "secure" not in flags  # plain HTTP here
    assert (await client.request("GET", "/ui/stations"))[0] == 200
    # Signing in again (same browser) gives another id; the one before no longer works.
    await client.sign_in()
    assert client.cookies["csms_ui_session"] != first
    stale = UiClient(csms)
    stale.cookies["csms_ui_session"] = first
    assert (await stale.request("GET", "/ui/stations"))[0] == 303


@pytest_twisted.ensureDeferred
async def test_an_idle_session_expires_and_sign_out_ends_one(csms):
    client = await signed_in(csms)
    token = await client.csrf()
    csms.clock.advance(dashboard(csms).sessions.idle_timeout + 1)
    status, _, response = await client.request("GET", "/ui/stations")
    assert (status, location(response)) == (303, "/ui/login")
    status, _, response = await client.request("POST", "/ui/id-tags", form={"csrf_token": token, "id_tag": "T1"})
    assert (status, location(response)) == (303, "/ui/login")
    assert (await csms.api("GET", "/id-tags/T1"))[0] == 404

    client = await signed_in(csms)
    status, _, response = await client.request("POST", "/ui/logout", form={"csrf_token": await client.csrf()})
    assert (status, location(response)) == (303, "/ui/login")
    assert "csms_ui_session" not in client.cookies
    assert len(dashboard(csms).sessions) == 0


@pytest_twisted.ensureDeferred
async def test_every_form_refuses_a_missing_or_wrong_csrf_token(csms):
    assert (await csms.api("POST", "/stations", json={"id": "CP-1"}))[0] == 201
    assert (await csms.api("POST", "/id-tags", json={"id_tag": "T1"}))[0] == 201
    client = await signed_in(csms)
    good = await client.csrf()
    forms = [(method, "/ui/" + "/".join({"{station_id}": "CP-1", "{command}": "reset", "{id_tag}": "T1"}.get(s, s)
                                        for s in pattern))
             for method, pattern, _, signed in dashboard(csms).resource.routes if method == "POST" and signed]
    assert {"/ui/logout", "/ui/id-tags", "/ui/id-tags/T1", "/ui/stations/CP-1/commands/reset"} <= {p for _, p in forms}
    for _, path in forms:
        for form in ({"action": "block"}, {"action": "block", "csrf_token": good + "x"}, {"csrf_token": ""}):
            status, page, response = await client.request("POST", path, form=form)
            assert status == 403, (path, form)
            assert "did not come from this dashboard" in page
            assert response.headers.getRawHeaders("content-type")[0].startswith("text/html")
    # Nothing changed: the tag is not blocked, the session is still there, nothing reached the API.
    assert (await csms.api("GET", "/id-tags/T1"))[1]["status"] == "Accepted"
    assert (await client.request("GET", "/ui/stations"))[0] == 200
    assert (await csms.api("GET", "/audit"))[1]["total"] == 2  # the two set-up requests
    # The right token in a header works as well as in the form (for scripts using fetch).
    status, _, _ = await client.request("POST", "/ui/id-tags/T1", form={"action": "block"},
                                        headers={"X-CSRF-Token": good})
    assert status == 303 and (await csms.api("GET", "/id-tags/T1"))[1]["status"] == "Blocked"


# -- scopes, audit, escaping ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_read_scope_token_sees_no_command_and_is_refused_when_it_posts_one(csms):
    assert (await csms.api("POST", "/stations", json={"id": "CP-1"}))[0] == 201
    client = await signed_in(csms, await named_token(csms, "support desk", "read"))
    status, page, _ = await client.request("GET", "/ui/stations/CP-1")
    assert status == 200 and "cmd-reset" not in page and "Commands" not in page
    token = CSRF.search(page).group(1)  # the sign-out form's
    status, page, _ = await client.request("POST", "/ui/stations/CP-1/commands/reset", form={"csrf_token": token})
    assert status == 403 and "does not allow this route" in page
    status, page, _ = await client.request("POST", "/ui/id-tags", form={"csrf_token": token, "id_tag": "T9"})
    assert status == 403
    refused = [e for e in (await csms.api("GET", "/audit"))[1]["items"] if e["token_name"] == "support desk"]
    assert {(e["route"], e["status"]) for e in refused} == {("/stations/{station_id}/reset", 403), ("/id-tags", 403)}


@pytest_twisted.ensureDeferred
async def test_a_dashboard_action_runs_the_api_route_and_is_audited_under_the_token_name(csms):
    client = await signed_in(csms, await named_token(csms, "alice", "admin"))
    token = await client.csrf("/ui/id-tags")
    status, _, response = await client.request("POST", "/ui/id-tags", form={
        "csrf_token": token, "id_tag": "NEW-1", "status": "Accepted", "expiry_date": "2031-01-02",
        "return_to": "/ui/id-tags?search=new"})
    assert (status, location(response)) == (303, "/ui/id-tags?search=new")
    status, body, _ = await csms.api("GET", "/id-tags/NEW-1")
    assert status == 200 and body["expiry_date"].startswith("2031-01-02T00:00:00")
    status, page, _ = await client.request("GET", "/ui/id-tags")
    assert "Add id tag NEW-1: answered" in page  # the answer, shown once
    assert "Add id tag NEW-1" not in (await client.request("GET", "/ui/id-tags"))[1]
    # An answer the API refuses is shown with the API's message.
    await client.request("POST", "/ui/id-tags", form={"csrf_token": token, "id_tag": "NEW-1"})
    assert "already exists" in (await client.request("GET", "/ui/id-tags"))[1]
    entries = (await csms.api("GET", "/audit?token_name=alice"))[1]["items"]
    assert [(e["method"], e["route"], e["path"], e["status"]) for e in entries] == [
        ("POST", "/id-tags", "/api/v1/id-tags", 409), ("POST", "/id-tags", "/api/v1/id-tags", 201)]
    # After a form, back to the page it came from, never elsewhere.
    for elsewhere in ("//evil.example/", "https://evil.example/ui/", "/api/v1/id-tags"):
        status, _, response = await client.request("POST", "/ui/id-tags", form={
            "csrf_token": token, "id_tag": "NEW-2", "return_to": elsewhere})
        assert (status, location(response)) == (303, "/ui/id-tags")


@pytest_twisted.ensureDeferred
async def test_station_supplied_text_is_shown_as_text(csms):
    station = await csms.connect("CP-<b>1</b>")
    answer = await station.call("BootNotification", {"chargePointVendor": "<script>x()</script>",
                                                     "chargePointModel": "<img src=x>"})
    assert answer["status"] == "Accepted"
    client = await signed_in(csms)
    for path in ("/ui/stations", "/ui/stations/CP-%3Cb%3E1%3C%2Fb%3E"):
        status, page, response = await client.request("GET", path)
        assert status == 200, page
        assert "&lt;script&gt;x()&lt;/script&gt;" in page and "<script>x()" not in page
        assert "&lt;img src=x&gt;" in page and "<img" not in page
        assert "CP-&lt;b&gt;1&lt;/b&gt;" in page and "<b>1</b>" not in page
        assert "script-src 'self'" in response.headers.getRawHeaders("content-security-policy")[0]


# -- pages ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_station_list_pages_searches_and_filters_on_the_server(csms_factory):
    csms = await csms_factory("[plugin:dashboard]\npage_size = 3\n")
    for number in range(1, 8):
        assert (await csms.api("POST", "/stations", json={"id": f"CP-{number:02d}", "registration_status":
                                                          "Pending" if number == 5 else "Accepted"}))[0] == 201
    await csms.connect_booted("CP-03")
    client = await signed_in(csms)
    _, page, _ = await client.request("GET", "/ui/stations?page=2")
    assert re.findall(r'<tr data-station="([^"]+)"', page) == ["CP-04", "CP-05", "CP-06"]
    assert "7 stations · page 2 of 3" in page
    _, page, _ = await client.request("GET", "/ui/stations?search=p-0&registration_status=Pending")
    assert re.findall(r'<tr data-station="([^"]+)"', page) == ["CP-05"]
    _, page, _ = await client.request("GET", "/ui/stations?online=true")
    assert re.findall(r'<tr data-station="([^"]+)"', page) == ["CP-03"]
    _, page, _ = await client.request("GET", "/ui/stations?connector_status=Available")
    assert re.findall(r'<tr data-station="([^"]+)"', page) == ["CP-03"]
    status, page, _ = await client.request("GET", "/ui/stations/NOPE")
    assert status == 404 and "NOPE" in page


@pytest_twisted.ensureDeferred
async def test_transactions_export_is_served_through_the_session(csms):
    client = await signed_in(csms)
    status, page, response = await client.request("GET", "/ui/transactions.csv?active=false&since=2020-01-01")
    assert status == 200, page
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/csv")
    assert page.splitlines()[0].startswith("transaction_id,")
    assert (await UiClient(csms).request("GET", "/ui/transactions.csv"))[0] == 303


@pytest_twisted.ensureDeferred
async def test_assets_are_served_with_their_type_and_cached_by_hash(csms):
    client = UiClient(csms)
    _, page, _ = await client.request("GET", "/ui/login")
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        url = re.search(rf'/ui/static/{re.escape(name)}\?v=[0-9a-f]+', page).group(0)
        status, _, response = await client.request("GET", url)
        assert status == 200 and response.headers.getRawHeaders("content-type")[0].startswith(kind)
        assert "immutable" in response.headers.getRawHeaders("cache-control")[0]
        status, _, response = await client.request("GET", f"/ui/static/{name}")
        assert response.headers.getRawHeaders("cache-control")[0] == "no-cache"
    assert (await client.request("GET", "/ui/static/nope.js"))[0] == 404
    assert (await client.request("GET", "/ui/static/..%2Fweb.py"))[0] == 404
    # The API is untouched beside it.
    assert (await csms.api("GET", "/stations"))[0] == 200


# -- live events ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_event_stream_needs_a_session_pushes_station_events_and_is_bounded(csms):
    assert (await UiClient(csms).request("GET", "/ui/events"))[0] == 303
    client = await signed_in(csms)
    broker = dashboard(csms).broker
    broker.max_per_session = 1
    assert (await client.request("HEAD", "/ui/events"))[0] == 200 and broker.streams == []
    status, _, response = await client.request("GET", "/ui/events", unbuffered=True)
    assert status == 200 and response.headers.getRawHeaders("content-type")[0].startswith("text/event-stream")
    received = []
    got_event = defer.Deferred()

    def collect(data):
        received.append(data)
        if b"event: station" in b"".join(received) and not got_event.called:
            got_event.callback(None)
    done = treq.collect(response, collect)
    status, body, _ = await client.request("GET", "/ui/events")
    assert status == 429 and "event streams open" in body
    await csms.connect("CP-LIVE")
    await within(got_event)
    assert b'"station_id":"CP-LIVE","online":true' in b"".join(received)
    # Sign-out closes the session's streams.
    await client.request("POST", "/ui/logout", form={"csrf_token": broker.streams[0].session.csrf_token})
    await within(done)
    assert broker.streams == []


@pytest_twisted.ensureDeferred
async def test_meter_values_go_only_to_the_event_stream_of_their_transaction(csms):
    client = await signed_in(csms)
    for bad in ("x", "-1", "1e3", "%EF%BC%91", str(2 ** 63)):  # %EF%BC%91: a full-width digit one
        status, body, _ = await client.request("GET", f"/ui/events?transaction={bad}")
        assert (status, body) == (400, "transaction must be a transaction id"), bad
    assert dashboard(csms).broker.streams == []
    station = await csms.connect_booted("CP-M")
    started = await station.call("StartTransaction", {"connectorId": 1, "idTag": "ANY", "meterStart": 0,
                                                      "timestamp": station_time(clock_now(csms))})
    transaction_id = started["transactionId"]
    streams = {}
    for name, path in (("all", "/ui/events"), ("chart", f"/ui/events?transaction={transaction_id}"),
                       ("other", f"/ui/events?transaction={transaction_id + 1}")):
        status, _, response = await client.request("GET", path, unbuffered=True)
        assert status == 200
        streams[name] = ([], response)
    # The status event comes after the meter values on every stream: once each has it, each has whatever
    # meter values it was sent.
    status_seen = {name: defer.Deferred() for name in streams}

    def collector(name):
        def collect(data):
            streams[name][0].append(data)
            if b'"status":"SuspendedEV"' in b"".join(streams[name][0]) and not status_seen[name].called:
                status_seen[name].callback(None)
        return collect
    done = [treq.collect(response, collector(name)) for name, (_, response) in streams.items()]
    await station.call("MeterValues", {"connectorId": 1, "transactionId": transaction_id, "meterValue": [{
        "timestamp": station_time(clock_now(csms)),
        "sampledValue": [{"value": "2.5", "measurand": "Energy.Active.Import.Register", "unit": "kWh"}]}]})
    await station.status(1, "SuspendedEV")
    await within(defer.gatherResults(list(status_seen.values())))
    assert b'"transaction_id":%d,"energy":[[' % transaction_id in b"".join(streams["chart"][0])
    assert b",2500.0]]" in b"".join(streams["chart"][0])
    for name in ("all", "other"):  # the status event reached every stream, the meter values only the chart's
        assert b"event: meter" not in b"".join(streams[name][0])
    session = dashboard(csms).broker.streams[0].session
    await client.request("POST", "/ui/logout", form={"csrf_token": session.csrf_token})
    await within(defer.gatherResults(done))


class StreamRequest:
    """The part of a twisted.web request an event stream uses (DummyRequest pulls from a push producer)."""

    def __init__(self):
        self.written, self.finished, self._disconnected, self.producer = [], False, False, None
        self.finishing = defer.Deferred()

    def setHeader(self, name, value):
        pass

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def notifyFinish(self):
        return self.finishing

    def write(self, data):
        self.written.append(data)

    def finish(self):
        self.finished = True
        self.finishing.callback(None)


def test_a_stream_that_does_not_read_is_dropped_not_buffered():
    clock = task.Clock()
    sessions = SessionStore(clock, 60, 3600, 10)
    session = sessions.create(Caller("x", "read"))
    broker = EventBroker(clock, sessions, max_streams=5, max_per_session=5, max_queued=3, keepalive=10)
    request = StreamRequest()
    stream = broker.open(request, session)
    stream.pauseProducing()  # the client's socket stopped draining
    for number in range(3):
        broker.publish("station", {"n": number})
    assert len(stream.queued) == 3 and not request.finished
    broker.publish("station", {"n": 3})
    assert request.finished and broker.streams == [] and session.streams == 0
    # Keepalives go out on the clock; an expired session's stream is closed at the next one.
    request = StreamRequest()
    broker.open(request, session)
    broker.max_streams = 1
    other = sessions.create(Caller("y", "read"))
    assert "as many event streams as it may" in broker.refusal(other)  # the limit over all sessions
    broker.max_streams = 5
    clock.advance(10)
    assert request.written[-1] == b": keepalive\n\n"
    clock.advance(60)
    assert request.finished and broker.streams == []


# -- optional profiles -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_enabled_profiles_show_their_controls_and_act_through_their_routes(csms):
    station = await csms.connect_booted("CP-P")
    client = await signed_in(csms)
    status, page, _ = await client.request("GET", "/ui/stations/CP-P")
    assert status == 200
    for section in ("h-firmware", "h-diagnostics", "h-smart", "h-local-list", "h-reservations", "cmd-trigger"):
        assert section in page, section
    token = CSRF.search(page).group(1)
    profile = {"chargingProfileId": 7, "stackLevel": 0, "chargingProfilePurpose": "TxDefaultProfile",
               "chargingProfileKind": "Absolute", "chargingSchedule": {"chargingRateUnit": "A",
                                                                      "chargingSchedulePeriod": [
                                                                          {"startPeriod": 0, "limit": 16},
                                                                          {"startPeriod": 3600, "limit": 10}]}}
    status, _, _ = await client.request("POST", "/ui/stations/CP-P/commands/charging-profile-set", form={
        "csrf_token": token, "connector_id": "1", "charging_profile": json.dumps(profile)})
    assert status == 303
    assert station.received_calls[-1][2] == "SetChargingProfile"
    _, page, _ = await client.request("GET", "/ui/stations/CP-P")
    assert "Set charging profile: answered" in page
    series = json.loads(re.search(r'<script type="application/json" id="series">(.*?)</script>', page).group(1))
    assert [limit for _, limit in series["schedule"]] == [16, 10, 10]
    # A firmware file goes up as the raw body, the CSRF token in the header (the page's script does that).
    status, _, _ = await client.request("POST", "/ui/firmware-files?name=fw-1.bin", data=b"\x00firmware")
    assert status == 403
    status, body, _ = await client.request("POST", "/ui/firmware-files?name=fw-1.bin", data=b"\x00firmware",
                                           headers={"X-CSRF-Token": token})
    assert status == 204, body
    _, page, _ = await client.request("GET", "/ui/firmware")
    assert "fw-1.bin" in page and "Upload fw-1.bin: answered" in page
    assert (await csms.api("GET", "/firmware-files"))[1]["items"][0]["size"] == 9
    assert (await client.request("GET", "/ui/diagnostics-files/99"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_a_disabled_profile_has_no_page_and_no_control(csms_factory):
    csms = await csms_factory(plugins=["core", "dashboard"])
    await csms.connect_booted("CP-C")
    client = await signed_in(csms)
    status, page, _ = await client.request("GET", "/ui/stations/CP-C")
    assert status == 200 and "cmd-reset" in page
    for absent in ("h-firmware", "h-diagnostics", "h-smart", "h-local-list", "h-reservations", "cmd-trigger",
                   "/ui/firmware"):
        assert absent not in page, absent
    assert (await client.request("GET", "/ui/firmware"))[0] == 404
    status, page, _ = await client.request("POST", "/ui/stations/CP-C/commands/trigger", form={
        "csrf_token": CSRF.search(page).group(1), "requested_message": "Heartbeat"})
    assert status == 303
    assert "No API route" in (await client.request("GET", "/ui/stations/CP-C"))[1]


def test_sessions_end_at_their_maximum_age_and_the_least_recently_used_goes_first_when_full():
    clock = task.Clock()
    sessions = SessionStore(clock, idle_timeout=60, max_age=180, max_sessions=2)
    first, second = sessions.create(Caller("a", "read")), sessions.create(Caller("b", "read"))
    clock.advance(50)
    assert sessions.get(first.id) is first  # used: second is now the least recently used
    third = sessions.create(Caller("c", "read"))
    assert sessions.get(second.id) is None and len(sessions) == 2
    for _ in range(2):
        clock.advance(50)
        assert sessions.get(first.id) is first and sessions.get(third.id) is third
    clock.advance(51)  # 201 s after first's sign-in, used every 50 s: too old all the same
    assert sessions.get(first.id) is None and sessions.get(third.id) is third
    assert not first.csrf_matches(None) and not first.csrf_matches("") and first.csrf_matches(first.csrf_token)


def test_the_sign_in_throttle_remembers_a_bounded_number_of_addresses():
    clock = task.Clock()
    throttle = SignInThrottle(clock, limit=2, window=60, max_addresses=3)
    for address in ("a", "a", "b", "c", "d"):
        throttle.failed(address)
    assert not throttle.refused("a")  # forgotten: the oldest went when d came
    assert len(throttle._failures) == 3
    throttle.failed("d")
    assert throttle.refused("d")
    clock.advance(61)
    assert not throttle.refused("d") and "d" not in throttle._failures


@pytest.mark.parametrize("offers, refusal", [
    ([{"api": object()}], "/api/ is already served"),
    ([{"ui": object()}, {"ui": object()}], "/ui/ is already served"),
    ([{"a/b": object()}], "'a/b' is not a path segment"),
    ([{"": object()}], "'' is not a path segment"),
])
def test_a_plugin_mounts_a_resource_only_at_a_free_path_segment(offers, refusal):
    app = SimpleNamespace(hook=SimpleNamespace(csms_web_resources=lambda app: offers))
    with pytest.raises(PluginError, match=re.escape(refusal)):
        web_resources(app)


@pytest_twisted.ensureDeferred
async def test_each_station_command_form_sends_its_call_and_shows_the_answer(csms):
    station = await csms.connect_booted("CP-K", connectors=2)
    assert (await csms.api("POST", "/id-tags", json={"id_tag": "K-TAG"}))[0] == 201
    client = await signed_in(csms)
    token = await client.csrf("/ui/stations/CP-K")
    # Typed as the form asks (UTC), without the Z the API needs: the page adds it.
    until = (clock_now(csms) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")
    for command, form, title, action in (
            ("unlock", {"connector_id": "2"}, "Unlock connector", "UnlockConnector"),
            ("availability", {"connector_id": "1", "type": "Inoperative"}, "Change availability",
             "ChangeAvailability"),
            ("clear-cache", {}, "Clear cache", "ClearCache"),
            ("trigger", {"requested_message": "Heartbeat"}, "Trigger message", "TriggerMessage"),
            ("configuration-fetch", {}, "Read configuration", "GetConfiguration"),
            ("configuration-change", {"key": "HeartbeatInterval", "value": "60"}, "Change HeartbeatInterval",
             "ChangeConfiguration"),
            ("local-list-version", {}, "Read local list version", "GetLocalListVersion"),
            ("local-list-sync", {"update_type": "Full"}, "Sync local list", "SendLocalList"),
            ("reserve", {"connector_id": "1", "id_tag": "K-TAG", "expiry_date": until}, "Reserve", "ReserveNow")):
        status, _, response = await client.request("POST", f"/ui/stations/CP-K/commands/{command}",
                                                   form={"csrf_token": token, **form})
        assert (status, location(response)) == (303, "/ui/stations/CP-K"), command
        _, page, _ = await client.request("GET", "/ui/stations/CP-K")
        assert f"{title}: answered" in page, (command, re.findall(r'<pre class="answer">(.*?)</pre>', page, re.S))
        assert station.received_calls[-1][2] == action
    assert ["ChangeConfiguration", {"key": "HeartbeatInterval", "value": "60"}] in [c[2:] for c in
                                                                                 station.received_calls]
    reservation_id = station.received_calls[-1][3]["reservationId"]
    await client.request("POST", "/ui/stations/CP-K/commands/cancel-reservation",
                         form={"csrf_token": token, "reservation_id": str(reservation_id)})
    assert station.received_calls[-1][2:] == ["CancelReservation", {"reservationId": reservation_id}]
    # A station's refusal or a bad value is an answer too, shown as failed; an unknown command is a 404 page.
    await client.request("POST", "/ui/stations/CP-K/commands/remote-stop", form={"csrf_token": token})
    assert "Remote stop: failed" in (await client.request("GET", "/ui/stations/CP-K"))[1]
    status, page, _ = await client.request("POST", "/ui/stations/CP-K/commands/unlock",
                                           form={"csrf_token": token, "connector_id": "one"})
    assert status == 400 and "whole number" in page
    assert (await client.request("POST", "/ui/stations/CP-K/commands/explode", form={"csrf_token": token}))[0] == 404
