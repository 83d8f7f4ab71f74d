"""Prometheus metrics (/metrics) and health (/healthz, /readyz) over real loopback sockets.

The figures are read back with prometheus_client's own text parser, after real OCPP traffic.
"""
from __future__ import annotations

import json
import os
import re
import threading

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, threads
from zope.interface import implementer

from conftest import error_of, within
from csms.config import ConfigError, load_config
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from csms.metrics import OCPPMetrics
from csms.testing.pytest_plugin import TEST_API_TOKEN
from csms.testing.station import CallErrorFrame, StationRefused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(ROOT, "etc", "grafana-dashboard.json")
BOOT = {"chargePointVendor": "V", "chargePointModel": "M"}


async def get(csms, path: str, token: str | None = None, port: int | None = None, method: str = "GET"):
    """(status, body bytes, content type) of a request to the API port (or ``port``) at ``path``."""
    headers = {"Authorization": [f"Bearer {token}"]} if token else {}
    url = f"http://127.0.0.1:{port or csms.api_port}{path}"
    response = await treq.request(method, url, headers=headers, reactor=reactor, timeout=10)
    body = await treq.content(response)
    return response.code, body, (response.headers.getRawHeaders("content-type") or [""])[0]


async def scrape(csms, **kwargs) -> dict:
    """{(sample name, frozenset of labels): value} from /metrics."""
    status, body, content_type = await get(csms, "/metrics", **kwargs)
    assert status == 200, body
    assert content_type.startswith("text/plain"), content_type
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def refused(d) -> StationRefused:
    try:
        station = await d
    except StationRefused as exc:
        return exc
    station.dropConnection(abort=True)
    raise AssertionError("the handshake was accepted")


# -- /metrics after real traffic ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_metrics_count_real_ocpp_and_api_traffic(csms):
    station = await csms.connect("CP-METRICS-1")
    assert (await station.call("BootNotification", BOOT))["status"] == "Accepted"
    await station.call("Heartbeat", {})
    await station.call("Heartbeat", {})
    with pytest.raises(CallErrorFrame):  # a schema violation: TypeConstraintViolation
        await station.call("StatusNotification", {"connectorId": "one", "status": "Available", "errorCode": "NoError"})
    with pytest.raises(CallErrorFrame):  # an action nobody knows: counted under "unknown", never its own name
        await station.call("NoSuchAction-7f3a", {})
    station.responses["Reset"] = ("CALLERROR", "NotSupported", "no")
    with pytest.raises(Exception):
        await within(csms.app.call("CP-METRICS-1", "Reset", {"type": "Soft"}))
    station.responses["ClearCache"] = ("CALLERROR", "MadeUpCode", "")
    with pytest.raises(Exception):
        await within(csms.app.call("CP-METRICS-1", "ClearCache", {}))
    assert (await csms.api("GET", "/stations"))[0] == 200
    assert (await csms.api("GET", "/stations/CP-METRICS-1"))[0] == 200
    assert (await csms.api("GET", "/stations", token="wrong"))[0] == 401
    assert (await refused(csms.connect("CP-METRICS-2", protocols=()))).status == 400

    samples = await scrape(csms)

    assert value(samples, "csms_ocpp_stations_connected") == 1
    assert value(samples, "csms_ocpp_boots_total", status="Accepted") == 1
    assert value(samples, "csms_ocpp_calls_received_total", action="Heartbeat", outcome="result") == 2
    assert value(samples, "csms_ocpp_calls_received_total", action="BootNotification", outcome="result") == 1
    assert value(samples, "csms_ocpp_calls_received_total", action="StatusNotification", outcome="error") == 1
    assert value(samples, "csms_ocpp_calls_received_total", action="unknown", outcome="error") == 1
    assert value(samples, "csms_ocpp_callerrors_total", direction="sent", code="TypeConstraintViolation") == 1
    assert value(samples, "csms_ocpp_callerrors_total", direction="sent", code="NotImplemented") == 1
    assert value(samples, "csms_ocpp_callerrors_total", direction="received", code="NotSupported") == 1
    assert value(samples, "csms_ocpp_callerrors_total", direction="received", code="other") == 1
    assert value(samples, "csms_ocpp_calls_sent_total", action="Reset", outcome="error") == 1
    assert value(samples, "csms_ocpp_calls_sent_total", action="ClearCache", outcome="error") == 1
    assert value(samples, "csms_ocpp_pending_calls") == 0
    assert value(samples, "csms_ocpp_handler_duration_seconds_count", action="Heartbeat") == 2
    assert value(samples, "csms_ocpp_handler_duration_seconds_bucket", action="Heartbeat", le="+Inf") == 2
    assert value(samples, "csms_ocpp_handshakes_refused_total", reason="no_subprotocol", status="400") == 1
    assert value(samples, "csms_api_requests_total", method="GET", route="/stations", status="200") == 1
    assert value(samples, "csms_api_requests_total", method="GET", route="/stations/{station_id}", status="200") == 1
    assert value(samples, "csms_api_requests_total", method="GET", route="/stations", status="401") == 1
    assert value(samples, "csms_db_transactions_total") > 0
    assert value(samples, "csms_db_commit_seconds_count") > 0
    assert value(samples, "csms_db_batch_size_count") > 0
    assert ("csms_db_queue_depth", frozenset()) in samples
    # Bounded labels: neither a station id nor a raw path nor an unknown action name is ever a label value.
    labels = {v for (_, pairs) in samples for (_, v) in pairs}
    assert not {v for v in labels if "CP-METRICS" in v or "NoSuchAction" in v}, labels


@pytest_twisted.ensureDeferred
async def test_an_outbound_call_counts_as_pending_until_answered(csms):
    station = await csms.connect("CP-PENDING")
    station.responses["Reset"] = None  # silent: the call stays in flight
    call = csms.app.call("CP-PENDING", "Reset", {"type": "Soft"})
    await within(station.wait_for_call("Reset"))
    assert value(await scrape(csms), "csms_ocpp_pending_calls") == 1
    csms.clock.advance(csms.app.config.ocpp.response_timeout)
    with pytest.raises(Exception):
        await within(call)
    samples = await scrape(csms)
    assert value(samples, "csms_ocpp_pending_calls") == 0
    assert value(samples, "csms_ocpp_calls_sent_total", action="Reset", outcome="timeout") == 1


@pytest_twisted.ensureDeferred
async def test_connection_limit_refusals_are_counted(csms_factory):
    csms = await csms_factory("[ocpp]\nmax_connections = 1\n")
    await csms.connect("CP-A")
    with pytest.raises(Exception):
        await within(csms.connect("CP-B"))
    samples = await scrape(csms)
    assert value(samples, "csms_ocpp_handshakes_refused_total", reason="connection_limit", status="none") == 1


@pytest_twisted.ensureDeferred
async def test_plugin_metrics_firmware_uploads_and_charging_profiles(csms):
    status, body, _ = await csms.api("POST", "/firmware-files?name=fw-1.bin", data=b"firmware bytes")
    assert status == 201, body
    station = await csms.connect("CP-SC")
    await station.call("BootNotification", BOOT)
    profile = {"connectorId": 1, "csChargingProfiles": {
        "chargingProfileId": 1, "stackLevel": 0, "chargingProfilePurpose": "TxDefaultProfile",
        "chargingProfileKind": "Absolute", "chargingSchedule": {
            "chargingRateUnit": "A", "startSchedule": "2026-01-01T00:00:00Z",
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 16}]}}}
    station.responses["SetChargingProfile"] = {"status": "Accepted"}
    assert await within(csms.app.call("CP-SC", "SetChargingProfile", profile)) == {"status": "Accepted"}
    firmware = csms.app.pm.get_plugin("firmware")
    upload_url = f"{firmware.http_base_url()}/diagnostics/diagdeadbeef-0123456789abcdef/log.txt"
    response = await treq.put(upload_url, data=b"log", reactor=reactor, timeout=10)
    await treq.content(response)
    assert response.code == 401  # credentials no GetDiagnostics handed out
    samples = await scrape(csms)
    assert value(samples, "csms_firmware_files_uploaded_total") == 1
    assert value(samples, "csms_smartcharging_profiles_sent_total", status="Accepted") == 1
    assert value(samples, "csms_firmware_diagnostics_uploads_total", via="http", outcome="unknown_credentials") == 1


@implementer(ICSMSPlugin)
class CountingPlugin:
    """A vendor plugin with a metric of its own, registered through app.metrics."""

    name = "counting"
    profile = None
    inbound_actions = outbound_actions = ()
    settings = ()

    @hookimpl
    def csms_configure(self, app):
        self.things = app.metrics.counter("csms_counting_things", "Things counted", ("kind",))
        self.things.labels("apple").inc(3)


@pytest_twisted.ensureDeferred
async def test_a_plugin_registers_its_own_metric_through_app_metrics(csms_factory):
    csms = await csms_factory(extra_plugins=[CountingPlugin()], plugins=["core"])
    assert value(await scrape(csms), "csms_counting_things_total", kind="apple") == 3


def test_a_metric_name_taken_twice_is_a_plugin_error():
    from csms.metrics import Metrics
    from csms.plugins import PluginError

    metrics = Metrics()
    metrics.counter("csms_acme_things", "Things")
    with pytest.raises(PluginError, match="metric 'csms_acme_things' cannot be registered: Duplicated"):
        metrics.gauge("csms_acme_things", "Things again")
    with pytest.raises(PluginError, match="metric 'csms_api_requests' cannot be registered"):
        metrics.counter("csms_api_requests", "A framework metric's name")


# -- who may scrape ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_metrics_from_outside_the_allowed_networks_need_the_api_token(csms_factory):
    csms = await csms_factory("[metrics]\nallowed_networks = 10.0.0.0/8\n", plugins=["core"])
    status, body, _ = await get(csms, "/metrics")
    assert status == 401
    assert error_of(json.loads(body)) == "unauthorized"
    assert (await get(csms, "/metrics", token="not-the-token"))[0] == 401
    assert (await get(csms, "/metrics", token=TEST_API_TOKEN))[0] == 200
    # Health needs no credentials; why a check failed is not told outside the allowed networks.
    assert (await get(csms, "/healthz"))[0] == 200
    status, body, _ = await get(csms, "/readyz")
    assert status == 200 and json.loads(body)["checks"]["database"] == "ok"
    csms.app.add_readiness_check("secretive", lambda: "database at db.internal.example refused")
    status, body, _ = await get(csms, "/readyz")
    assert status == 503
    assert b"db.internal.example" not in body
    assert json.loads(body)["error"]["details"]["checks"]["secretive"] == "failed"


@pytest_twisted.ensureDeferred
async def test_metrics_are_served_on_their_own_endpoint_when_configured(csms_factory):
    csms = await csms_factory("[metrics]\nendpoint = tcp:0:interface=127.0.0.1\n", plugins=["core"])
    port = csms.service.ports["metrics"].getHost().port
    status, body, _ = await get(csms, "/metrics", port=port)
    assert status == 200 and b"csms_ocpp_stations_connected" in body
    assert (await get(csms, "/healthz", port=port))[0] == 200
    assert (await get(csms, "/readyz", port=port))[0] == 200
    status, body, _ = await get(csms, "/api/v1/stations", port=port, token=TEST_API_TOKEN)
    assert status == 404 and error_of(json.loads(body)) == "route_not_found"


@pytest_twisted.ensureDeferred
async def test_disabled_metrics_answer_404_and_count_nothing(csms_factory):
    csms = await csms_factory("[metrics]\nenabled = false\n", plugins=["core"])
    station = await csms.connect("CP-OFF")
    await station.call("BootNotification", BOOT)
    assert csms.app.sessions["CP-OFF"]._metrics is None
    status, body, _ = await get(csms, "/metrics")
    assert status == 404 and error_of(json.loads(body)) == "metrics_disabled"
    assert (await get(csms, "/healthz"))[0] == 200
    assert (await get(csms, "/readyz"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_operations_paths_refuse_other_methods_and_subpaths(csms):
    status, body, _ = await get(csms, "/metrics", method="POST")
    assert status == 405 and error_of(json.loads(body)) == "method_not_allowed"
    status, body, _ = await get(csms, "/healthz/extra")
    assert status == 404 and error_of(json.loads(body)) == "route_not_found"
    assert (await get(csms, "/healthz", method="HEAD"))[0] == 200


# -- health --------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_healthz_and_readyz_answer_json(csms):
    status, body, content_type = await get(csms, "/healthz")
    assert (status, json.loads(body), content_type) == (200, {"status": "alive"}, "application/json")
    status, body, _ = await get(csms, "/readyz")
    assert status == 200
    assert json.loads(body) == {"status": "ready", "checks": {"database": "ok", "migrations": "ok",
                                                                 "listeners": "ok"}}


@pytest_twisted.ensureDeferred
async def test_readyz_fails_while_a_readiness_check_fails_and_recovers(csms):
    problem = ["schema is behind the code: run csms-admin db upgrade"]
    csms.app.add_readiness_check("schema", lambda: problem[0])
    status, body, _ = await get(csms, "/readyz")
    assert status == 503
    error = json.loads(body)["error"]
    assert error["code"] == "not_ready" and error["details"]["failed"] == ["schema"]
    assert error["details"]["checks"] == {"database": "ok", "migrations": "ok", "listeners": "ok",
                                          "schema": problem[0]}
    problem[0] = None
    assert (await get(csms, "/readyz"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_readyz_fails_when_a_check_raises(csms):
    def broken():
        raise RuntimeError("boom")
    csms.app.add_readiness_check("broken", broken)
    status, body, _ = await get(csms, "/readyz")
    assert status == 503
    assert json.loads(body)["error"]["details"]["checks"]["broken"] == "RuntimeError: boom"


@pytest_twisted.ensureDeferred
async def test_readyz_fails_while_the_database_does_not_answer_and_recovers(csms_factory):
    # One pool thread (SQLite always has one), held by a function that waits: the database is not answering.
    csms = await csms_factory("[database]\npool_size = 1\n", plugins=["core"])
    holding, release = threading.Event(), threading.Event()

    def hold(conn):
        holding.set()
        release.wait(10)
    held = csms.app.db.run(hold, desc="test_hold")
    assert await threads.deferToThread(holding.wait, 10)
    asked = defer.Deferred()
    csms.app.add_readiness_check("probe", lambda: asked.callback(None))
    answer = defer.ensureDeferred(get(csms, "/readyz"))
    await within(asked)  # the request is in: its checks run, the database one waits behind `hold`
    csms.clock.advance(csms.app.config.metrics.readiness_timeout)
    status, body, _ = await within(answer)
    assert status == 503
    checks = json.loads(body)["error"]["details"]["checks"]
    assert checks["database"] == "no answer within 2 s" and checks["listeners"] == "ok"
    release.set()
    await within(held)
    csms.app.readiness.checks.pop("probe")
    assert (await get(csms, "/readyz"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_concurrent_readyz_requests_share_one_run_of_the_checks(csms):
    """/readyz is unauthenticated: a burst of requests runs each check once, not once per request."""
    calls, gate = [], defer.Deferred()

    def slow():
        calls.append(1)
        return gate
    csms.app.add_readiness_check("slow", slow)
    arrived, all_in = [], defer.Deferred()
    run = csms.app.readiness.run

    def counting_run():
        waiting = run()
        arrived.append(1)
        if len(arrived) == 20:
            all_in.callback(None)
        return waiting
    csms.app.readiness.run = counting_run
    answers = [defer.ensureDeferred(get(csms, "/readyz")) for _ in range(20)]
    await within(all_in)
    gate.callback(None)
    statuses = [status for status, _, _ in await within(defer.gatherResults(answers))]
    assert statuses == [200] * 20
    assert calls == [1]


@pytest_twisted.ensureDeferred
async def test_readyz_fails_once_the_service_stops_listening(csms):
    await csms.service.ports.pop("ocpp").stopListening()
    status, body, _ = await get(csms, "/readyz")
    assert status == 503
    assert json.loads(body)["error"]["details"]["checks"]["listeners"] == "the OCPP listener is not listening"


# -- bounded labels, config, dashboard ------------------------------------------------------------------


def test_unknown_actions_and_error_codes_collapse_to_fixed_labels():
    metrics = OCPPMetrics({"Heartbeat"}, {"Reset"})
    metrics.call_answered("Heartbeat", {})
    metrics.error_sent("Whatever-1", "FormationViolation")
    metrics.error_sent("Whatever-2", "SomethingElse")
    metrics.error_sent(None, "ProtocolError")
    metrics.error_sent("Heartbeat", ["a plugin's", "odd code"])  # never raises: the station still gets its answer
    metrics.call_queued()
    metrics.call_ended("Vendor-X", "error", "Weird")
    assert metrics.unknown.errors == 3
    assert metrics.errors_sent["other"] == 2
    assert metrics.errors_received["other"] == 1
    assert metrics.sent == {("unknown", "error"): 1}


@pytest.mark.parametrize("text, message", [
    ("[metrics]\nallowed_networks = 127.0.0.0/8, localhost\n", "allowed_networks: 'localhost'"),
    ("[metrics]\nreadiness_timeout = 0\n", "readiness_timeout must be"),
    ("[metrics]\nenabeld = true\n", "[metrics] has no setting 'enabeld'"),
])
def test_bad_metrics_settings_are_refused(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(text=text)


def exported_names(app) -> set:
    """Every sample name the Central System can export (a histogram's _bucket, _count, _sum too)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",)}
    return {family.name + suffix for family in app.metrics.registry.collect()
            for suffix in suffixes.get(family.type, ("",))}


@pytest_twisted.ensureDeferred
async def test_grafana_dashboard_queries_only_metrics_the_csms_exports(csms):
    with open(DASHBOARD, encoding="utf-8") as f:
        dashboard = json.load(f)
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ())]
    assert len(expressions) >= 12
    exported = exported_names(csms.app)
    for expr in expressions:
        referenced = set(re.findall(r"\bcsms_[a-z0-9_]+", expr))
        assert referenced, expr
        assert referenced <= exported, (expr, referenced - exported)
    shown = {name for expr in expressions for name in re.findall(r"\bcsms_[a-z0-9_]+", expr)}
    for family in ("csms_ocpp_stations_connected", "csms_ocpp_boots_total", "csms_ocpp_calls_received_total",
                   "csms_ocpp_calls_sent_total", "csms_ocpp_callerrors_total", "csms_ocpp_handler_duration_seconds_bucket",
                   "csms_db_commit_seconds_bucket", "csms_db_queue_depth", "csms_db_batch_size_bucket",
                   "csms_api_requests_total", "csms_ocpp_pending_calls", "csms_ocpp_handshakes_refused_total"):
        assert family in shown, f"the dashboard shows no panel for {family}"


def test_every_exported_metric_is_documented(tmp_path):
    from csms.app import CentralSystem

    config = load_config(text=f"[database]\nurl = sqlite:///{tmp_path}/x.sqlite\n"
                              "[plugins]\nenabled = core, firmware, smartcharging\n"
                              f"[plugin:firmware]\nfirmware_dir = {tmp_path}/fw\ndiagnostics_dir = {tmp_path}/dg\n")
    app = CentralSystem(config, reactor=reactor)
    with open(os.path.join(ROOT, "docs", "metrics.md"), encoding="utf-8") as f:
        documented = f.read()
    for family in app.metrics.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}`" in documented, f"docs/metrics.md does not document {name}"
