"""What a plugin may rely on, and what it may not do (issue 13, parts 5 and 7).

* Route templates are checked when a route is added: one the router cannot honour stops start-up with
  one line naming it.
* A plugin's tables are named ``<plugin name>_...``; ``csms_...`` and another plugin's prefix are refused.
* An OCPP action belongs to one plugin unless every plugin claiming it declares it in ``shared_actions``.
* Every event's payload has exactly the keys docs/hooks.md lists, in real scenarios over loopback.
"""
from __future__ import annotations

import inspect
import re
from datetime import datetime, timedelta

import pytest
import pytest_twisted
from sqlalchemy import Column, Integer, MetaData, Table
from zope.interface import implementer

from conftest import clock_now, station_time, within
from test_docs import HOOKS, documented_hooks
from test_plugins import install  # noqa: F401 - a fixture
from test_startup import failed_start, run_twistd, sqlite_url, write_config

from csms.api import Router
from csms.api.router import RouteError
from csms.config import load_config
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from csms.plugins import PluginError, make_plugin_manager
from csms.rpc import OCPPSession
from csms.session import StationSession
from csms.schemas import schemas


def handler(request):
    return {}


# -- route templates -------------------------------------------------------------------------------


@pytest.mark.parametrize("template, why", [
    ("/stations/{stationId}", "placeholder {stationId}: a path parameter name is snake_case"),
    ("/stations/{2nd}", "placeholder {2nd}: a path parameter name is snake_case"),
    ("/stations/{}", "placeholder {}: a path parameter name is snake_case"),
    ("/stations/{station_id", "segment '{station_id': a placeholder is a whole segment"),
    ("/stations/station_id}", "segment 'station_id}': a placeholder is a whole segment"),
    ("/stations/{{station_id}}", "segment '{{station_id}}': a placeholder is a whole segment"),
    ("/files/{name}.bin", "segment '{name}.bin': a placeholder is a whole segment"),
    ("/pairs/{a}{b}", "segment '{a}{b}': a placeholder is a whole segment"),
    ("/stations/{station_id}/peers/{station_id}", "placeholder {station_id} appears twice"),
    ("stations/{station_id}", "a route path starts with '/'"),
    ("", "a route path starts with '/'"),
    ("/stations?active=true", "a route path has no spaces, '?' or '#'"),
])
def test_a_template_the_router_cannot_honour_is_refused_naming_the_route(template, why):
    with pytest.raises(RouteError) as refused:
        Router().add("GET", template, handler, "A route")
    assert str(refused.value).startswith(f"operator API route GET {template!r} (from {__name__}): {why}")


def test_a_route_error_is_a_plugin_error_and_a_value_error():
    # PluginError: start-up reports it as one line; ValueError: what the router raised before.
    assert issubclass(RouteError, PluginError) and issubclass(RouteError, ValueError)


def test_two_routes_differing_only_in_parameter_names_are_one_route_defined_twice():
    router = Router()
    router.add("GET", "/things/{thing_id}", handler, "One thing")
    twice = r"route GET '/things/\{id\}' .*is defined twice \(as '/things/\{thing_id\}'\)"
    with pytest.raises(RouteError, match=twice):
        router.add("GET", "/things/{id}", handler, "The same thing")
    router.add("DELETE", "/things/{thing_id}", handler, "Another method is another route")


def test_snake_case_placeholders_with_digits_are_honoured():
    router = Router()
    router.add("GET", "/v2/{site_id}/{meter2}", handler, "Nested")
    route, params = router.match("GET", "/v2/north/m-7")
    assert params == {"site_id": "north", "meter2": "m-7"}


BAD_ROUTE_PLUGIN = '''
from zope.interface import implementer

from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin


def station_things(request):
    return []


@implementer(ICSMSPlugin)
class BadRoutePlugin:
    name = "badroute"
    profile = None
    inbound_actions = ()
    outbound_actions = ()
    settings = ()

    @hookimpl
    def csms_api_routes(self, app, router):
        router.add("GET", "/stations/{stationId}/things", station_things, "The station's things")
'''


@pytest_twisted.ensureDeferred
async def test_a_bad_route_template_stops_twistd_csms_with_one_line(tmp_path, install):  # noqa: F811
    install("badroute", {"badroute": BAD_ROUTE_PLUGIN}, {"badroute": "badroute:BadRoutePlugin"})
    config = write_config(tmp_path, sqlite_url(tmp_path), enabled="core, badroute")
    process = run_twistd(config, str(tmp_path), env={"PYTHONPATH": str(tmp_path)})
    await failed_start(process, "operator API route GET '/stations/{stationId}/things' (from badroute): "
                                "placeholder {stationId}: a path parameter name is snake_case "
                                "(a-z, 0-9 and _, not starting with a digit)")


# -- tables are reserved by plugin name ---------------------------------------------------------------


def plugin_with_tables(name: str, *table_names: str):
    metadata = MetaData()
    for table_name in table_names:
        Table(table_name, metadata, Column("id", Integer, primary_key=True))

    @implementer(ICSMSPlugin)
    class TablePlugin:
        profile = None
        inbound_actions = ()
        outbound_actions = ()
        settings = ()

        @hookimpl
        def csms_tables(self):
            return metadata

    plugin = TablePlugin()
    plugin.name = name
    return plugin


def central_system(*extra_plugins, enabled: str = "core"):
    from csms.app import CentralSystem

    config = load_config(text=f"[database]\nurl = sqlite://\n[plugins]\nenabled = {enabled}\n")
    return CentralSystem(config, extra_plugins=list(extra_plugins))


@pytest.mark.parametrize("table, why", [
    ("core_invoices", "that is plugin 'core''s prefix"),
    ("firmware_images", "that is plugin 'firmware''s prefix"),  # installed, even though not enabled
    ("csms_stations", "the csms_ prefix is the framework's"),
    ("csms_acme", "the csms_ prefix is the framework's"),
    ("invoices", "a plugin's tables are named acme_..."),
    ("acmeinvoices", "a plugin's tables are named acme_..."),
])
def test_a_table_not_named_after_its_plugin_is_refused_at_load(table, why):
    with pytest.raises(PluginError) as refused:
        central_system(plugin_with_tables("acme", "acme_sessions", table))
    assert str(refused.value) == f"plugin 'acme' declares table {table!r}: {why}"


def test_tables_named_after_their_plugin_load():
    app = central_system(plugin_with_tables("acme", "acme_sessions", "acme_invoices"))
    names = {table.name for metadata in app.all_metadata() for table in metadata.sorted_tables}
    assert {"acme_sessions", "acme_invoices", "core_transactions", "csms_stations"} <= names


def test_a_plugin_whose_name_extends_another_owns_its_longer_prefix():
    # core_billing's tables start with core_ too: the longest plugin name they start with decides.
    central_system(plugin_with_tables("core_billing", "core_billing_invoices"))
    with pytest.raises(PluginError, match="plugin 'core' declares table 'core_billing_x': that is plugin "
                                          "'core_billing''s prefix"):
        central_system(plugin_with_tables("core", "core_billing_x"), plugin_with_tables("core_billing"),
                       enabled="")


# -- actions belong to one plugin unless shared ---------------------------------------------------------


def vendor(name: str, *, inbound=(), outbound=(), shared=None, answers=()):
    """A vendor plugin listing ``inbound``/``outbound`` actions and implementing the handler hooks ``answers``."""
    namespace = {"name": name, "profile": None, "inbound_actions": tuple(inbound),
                 "outbound_actions": tuple(outbound), "settings": ()}
    if shared is not None:
        namespace["shared_actions"] = shared
    for hook in answers:
        namespace[hook] = hookimpl(lambda self, station, payload: None)
    return implementer(ICSMSPlugin)(type(name.title(), (), namespace))()


def test_two_plugins_answering_one_action_are_refused():
    with pytest.raises(PluginError) as refused:
        make_plugin_manager(["core"], extra_plugins=[vendor("acme", answers=["csms_handle_heartbeat"])])
    assert str(refused.value) == (
        "plugins 'core', 'acme' all answer Heartbeat: an action belongs to one plugin unless each of them "
        "declares it shared (shared_actions = ('Heartbeat',)); not shared by 'core', 'acme'")


def test_an_action_listed_by_two_plugins_is_refused_inbound_and_outbound():
    with pytest.raises(PluginError, match=r"plugins 'core', 'acme' all answer StatusNotification"):
        make_plugin_manager(["core"], extra_plugins=[vendor("acme", inbound=["StatusNotification"])])
    with pytest.raises(PluginError, match=r"plugins 'core', 'acme' all offer Reset"):
        make_plugin_manager(["core"], extra_plugins=[vendor("acme", outbound=["Reset"])])


def test_data_transfer_is_shared_only_by_plugins_that_declare_it():
    with pytest.raises(PluginError, match=r"all answer DataTransfer: .*not shared by 'acme'$"):
        make_plugin_manager(["core"], extra_plugins=[vendor("acme", answers=["csms_handle_data_transfer"])])
    make_plugin_manager(["core"], extra_plugins=[
        vendor("acme", answers=["csms_handle_data_transfer"], shared=("DataTransfer",)),
        vendor("globex", answers=["csms_handle_data_transfer"], shared=["DataTransfer"])])


def test_an_action_nobody_else_claims_needs_no_declaration():
    # Core disabled: a plugin may answer Heartbeat its own way.
    make_plugin_manager(["firmware"], extra_plugins=[vendor("acme", answers=["csms_handle_heartbeat"])])


def test_shared_actions_must_be_a_sequence_of_names():
    with pytest.raises(PluginError, match="shared_actions must be a sequence of action names"):
        make_plugin_manager([], extra_plugins=[vendor("acme", shared="DataTransfer")])


# -- every event's payload is what docs/hooks.md lists ------------------------------------------------------

EVENT_HOOKS = sorted(name for name in HOOKS if name.startswith("csms_on_"))
_TABLE_HEADER = re.compile(r"^\| (?:argument|`(\w+)`(?: and `(\w+)`)? key) \| type \| meaning \|$")
_TABLE_ROW = re.compile(r"^\| `(\w+)` \| ([^|]+?) \| .+ \|$")
_TYPES = {"str": str, "int": int, "bool": bool, "list": list, "dict": dict, "datetime": datetime,
          "None": type(None), "Exception": Exception, "OCPPSession": OCPPSession, "StationSession": StationSession}


def documented_payload(hook: str) -> dict:
    """{None: {argument: type text}, argument name: {key: type text}} from the tables of ``hook``'s section."""
    tables: dict = {}
    current = None
    for line in documented_hooks()[hook][1].splitlines():
        header = _TABLE_HEADER.match(line)
        if header is not None:
            names = [name for name in header.groups() if name] or [None]
            current = {}
            for name in names:
                assert name not in tables, f"{hook}: two tables for {name or 'the arguments'}"
                tables[name] = current
            continue
        row = _TABLE_ROW.match(line)
        if row is not None and current is not None:
            current[row.group(1)] = row.group(2)
        elif not line.startswith("|"):
            current = None
    return tables


def has_type(value, documented: str) -> bool:
    """Whether ``value`` is of the documented type (``int or None``...); bool is not an int here."""
    for name in documented.split(" or "):
        assert name in _TYPES, f"docs/hooks.md uses a type the contract does not know: {name!r}"
        expected = _TYPES[name]
        if expected in (int, bool):
            if type(value) is expected:
                return True
        elif expected is datetime:
            if isinstance(value, datetime) and value.utcoffset() == timedelta(0):
                return True
        elif isinstance(value, expected):
            return True
    return False


def payload_mismatches(hook: str, arguments: dict) -> list[str]:
    """What differs between one event's actual arguments and docs/hooks.md: names, types, dict keys."""
    documented = documented_payload(hook)
    problems = []
    if list(documented.get(None, {})) != list(arguments):
        return [f"{hook}: documented arguments {list(documented.get(None, {}))}, passed {list(arguments)}"]
    for name, value in arguments.items():
        if not has_type(value, documented[None][name]):
            problems.append(f"{hook}: {name}={value!r} is not {documented[None][name]}")
        if name not in documented or value is None:
            continue
        keys = documented[name]
        if set(value) != set(keys):
            problems.append(f"{hook}: {name} has keys {sorted(value)}, docs/hooks.md lists {sorted(keys)}")
        problems += [f"{hook}: {name}[{key!r}]={value[key]!r} is not {keys[key]}"
                     for key in keys if key in value and not has_type(value[key], keys[key])]
    return problems


@implementer(ICSMSPlugin)
class PayloadRecorder:
    """Listens to every event hook of csms/hookspecs.py and records the arguments it is called with."""

    name = "payloadrecorder"
    profile = None
    inbound_actions = ()
    outbound_actions = ()
    settings = ()

    def __init__(self):
        self.seen: list[tuple[str, dict]] = []
        self._waiting: dict = {}
        for hook in EVENT_HOOKS:
            setattr(self, hook, self._recorder(hook))

    def _recorder(self, hook: str):
        names = list(inspect.signature(HOOKS[hook]).parameters)

        def record(*args):
            self.seen.append((hook, dict(zip(names, args))))
            for d in self._waiting.pop(hook, []):
                d.callback(None)
        record.__wrapped__ = HOOKS[hook]  # pluggy reads the argument names through it
        return hookimpl(record)

    def wait(self, hook: str):
        """A Deferred firing once ``hook`` has been recorded."""
        from twisted.internet import defer

        if self.of(hook):
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting.setdefault(hook, []).append(d)
        return d

    def of(self, hook: str) -> list[dict]:
        return [arguments for name, arguments in self.seen if name == hook]


def test_every_event_argument_and_dict_key_is_documented_with_a_known_type():
    for hook in EVENT_HOOKS:
        documented = documented_payload(hook)
        assert list(documented.get(None, {})) == list(inspect.signature(HOOKS[hook]).parameters), hook
        for table in documented.values():
            for type_text in table.values():
                for name in type_text.split(" or "):
                    assert name in _TYPES, f"{hook}: unknown type {name!r}"


async def api_ok(csms, method: str, path: str, json=None) -> dict:
    status, body, _ = await within(csms.api(method, path, json=json))
    assert status in (200, 201, 204), (method, path, status, body)
    return body


@pytest_twisted.ensureDeferred
async def test_every_event_passes_exactly_the_arguments_and_keys_docs_hooks_md_lists(csms_factory):
    recorder = PayloadRecorder()
    csms = await csms_factory(extra_plugins=[recorder])
    now = station_time(clock_now(csms))
    await api_ok(csms, "POST", "/id-tags", {"id_tag": "TAG-1", "description": "fleet card"})
    await api_ok(csms, "PATCH", "/id-tags/TAG-1", {"status": "Blocked"})
    await api_ok(csms, "PATCH", "/id-tags/TAG-1", {"status": "Accepted", "expiry_date": "2099-01-01T00:00:00Z"})

    station = await within(csms.connect("CP-EVENTS"))
    boot = {"chargePointVendor": "V", "chargePointModel": "M", "firmwareVersion": "1.0"}
    await within(station.call("BootNotification", boot))
    status = {"connectorId": 1, "status": "Available", "errorCode": "NoError", "timestamp": now}
    await within(station.call("StatusNotification", status))
    await within(station.call("StatusNotification", dict(status, status="Preparing", info="plugged in")))
    start = {"connectorId": 1, "idTag": "TAG-1", "meterStart": 100, "timestamp": now, "reservationId": 7}
    tx = (await within(station.call("StartTransaction", start)))["transactionId"]
    meter_values = {"connectorId": 1, "transactionId": tx,
                    "meterValue": [{"timestamp": now, "sampledValue": [{"value": "150"}]}]}
    await within(station.call("MeterValues", meter_values))
    outside = {"connectorId": 0, "meterValue": [{"timestamp": now, "sampledValue": [{"value": "5", "unit": "kWh"}]}]}
    await within(station.call("MeterValues", outside))
    stop = {"transactionId": tx, "idTag": "TAG-1", "meterStop": 200, "timestamp": now, "reason": "EVDisconnected",
            "transactionData": meter_values["meterValue"]}
    await within(station.call("StopTransaction", stop))
    # Closed by the CSMS: an operator's stop, and a boot closing a start that was refused.
    operator_tx = (await within(station.call("StartTransaction", dict(start, connectorId=1, meterStart=300))))
    await api_ok(csms, "POST", f"/transactions/{operator_tx['transactionId']}/stop", {})
    await within(station.call("StartTransaction", dict(start, connectorId=2, idTag="NOBODY")))
    await within(station.call("BootNotification", boot))
    # The security plugin's: one the station reports, one the CSMS finds (a CSR it rejects).
    security_event = {"type": "TamperDetectionActivated", "timestamp": now, "techInfo": "cover opened"}
    await within(station.call("SecurityEventNotification", security_event))
    await within(station.call("SignCertificate", {"csr": "not a CSR"}))

    await api_ok(csms, "POST", "/stations/CP-EVENTS/calls/GetConfiguration", {"key": ["HeartbeatInterval"]})
    station.responses["ClearCache"] = ("CALLERROR", "InternalError", "cache is busy")
    status_code, _, _ = await within(csms.api("POST", "/stations/CP-EVENTS/calls/ClearCache", json={}))
    assert status_code == 502
    await api_ok(csms, "DELETE", "/id-tags/TAG-1")
    await api_ok(csms, "DELETE", "/stations/CP-EVENTS")
    await within(recorder.wait("csms_on_station_disconnected"))

    assert sorted({hook for hook, _ in recorder.seen}) == EVENT_HOOKS, "an event the scenario does not fire"
    problems = [problem for hook, arguments in recorder.seen for problem in payload_mismatches(hook, arguments)]
    assert problems == []
    # A station's payload reaches listeners as the station sent it.
    assert [e["request"] for e in recorder.of("csms_on_boot")] == [boot, boot]
    assert recorder.of("csms_on_status_changed")[1]["request"] == dict(status, status="Preparing", info="plugged in")
    assert recorder.of("csms_on_transaction_started")[0]["request"] == start
    assert recorder.of("csms_on_transaction_stopped")[0]["request"] == stop
    assert [e["meter_values"] for e in recorder.of("csms_on_meter_values")] == [meter_values["meterValue"],
                                                                                outside["meterValue"]]
    assert [(e["event"]["type"], e["event"]["origin"]) for e in recorder.of("csms_on_security_event")] == [
        ("TamperDetectionActivated", "station"), ("CertificateSigningRequestRejected", "csms")]
    sending = recorder.of("csms_on_call_sending")
    assert [e["request"] for e in sending] == [{"key": ["HeartbeatInterval"]}, {}]
    assert recorder.of("csms_on_call_completed")[0]["request"] is sending[0]["request"]
    assert recorder.of("csms_on_call_failed")[0]["request"] is sending[1]["request"]


# -- a stopped transaction's request is a StopTransaction payload, whoever closed it ----------------------


@pytest_twisted.ensureDeferred
async def test_every_stopped_request_is_a_valid_stop_transaction_with_a_meter_reading(csms_factory):
    recorder = PayloadRecorder()
    csms = await csms_factory(extra_plugins=[recorder])
    now = station_time(clock_now(csms))
    await api_ok(csms, "POST", "/id-tags", {"id_tag": "TAG-1"})
    station = await within(csms.connect_booted("CP-STOPS", connectors=4))

    async def start(connector_id: int, id_tag: str = "TAG-1", meter_start: int = 1000) -> int:
        answer = await within(station.call("StartTransaction", {"connectorId": connector_id, "idTag": id_tag,
                                                                "meterStart": meter_start, "timestamp": now}))
        return answer["transactionId"]

    by_station, metered, given = await start(1), await start(2), await start(3)
    refused = await start(4, id_tag="NOBODY", meter_start=77)

    def sampled(value: str, **sample) -> dict:
        return {"value": value, "measurand": "Energy.Active.Import.Register", **sample}
    await within(station.call("MeterValues", {"connectorId": 2, "transactionId": metered, "meterValue": [
        {"timestamp": now, "sampledValue": [sampled("1500", unit="Wh"), sampled("9999", phase="L1"),
                                            sampled("8888", unit="Wh", location="Inlet"),
                                            {"value": "7200", "measurand": "Power.Active.Import", "unit": "W"}]},
        {"timestamp": station_time(clock_now(csms) + timedelta(minutes=1)),
         "sampledValue": [sampled("2.5", unit="kWh"), sampled("not a number", unit="Wh", context="Other")]}]}))

    await within(station.call("StopTransaction", {"transactionId": by_station, "meterStop": 1200, "timestamp": now,
                                                  "idTag": "TAG-1", "reason": "Local"}))
    await api_ok(csms, "POST", f"/transactions/{metered}/stop", {"reason": "PowerLoss"})
    await api_ok(csms, "POST", f"/transactions/{given}/stop", {"meter_stop": 4200})
    await within(station.call("BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"}))

    stopped = {event["transaction"]["transaction_id"]: event for event in recorder.of("csms_on_transaction_stopped")}
    assert sorted(stopped) == sorted([by_station, metered, given, refused])
    for event in stopped.values():
        schemas.validate_request("StopTransaction", event["request"])  # raises SchemaViolation if not
        assert event["request"]["meterStop"] == event["transaction"]["meter_stop"]
        assert event["request"]["meterStop"] - event["transaction"]["meter_start"] >= 0
    summary = {tx: (stopped[tx]["transaction"]["stopped_by"], stopped[tx]["request"]["meterStop"],
                    stopped[tx]["transaction"]["meter_stop_estimated"], stopped[tx]["request"].get("reason"))
               for tx in stopped}
    assert summary == {
        by_station: ("station", 1200, False, "Local"),
        metered: ("operator", 2500, True, "PowerLoss"),  # the highest register reading, 2.5 kWh
        given: ("operator", 4200, False, "Other"),
        refused: ("boot", 77, True, "Reboot"),  # no reading at all: meterStart
    }
    assert set(stopped[metered]["request"]) == {"transactionId", "meterStop", "timestamp", "reason"}
    # What is stored (and shown) stays what was given: no reading.
    assert (await api_ok(csms, "GET", f"/transactions/{metered}"))["meter_stop"] is None


def test_the_route_example_of_docs_hooks_md_registers_and_matches():
    section = documented_hooks()["csms_api_routes"][1]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "docs/hooks.md", "exec"), namespace)  # noqa: S102 - our own documentation
    router = Router()
    namespace["add_routes"](app=None, router=router)
    route, params = router.match("GET", "/acme/stations/CP-1/sessions")
    assert params == {"station_id": "CP-1"} and [q.name for q in route.query] == ["limit", "offset", "since"]
