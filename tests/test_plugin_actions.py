"""Issue 13 part 1: a plugin adds OCPP actions (the security extension's from the ocpp package, or a
vendor's with its own schemas), validated, dispatched, sent and documented like OCPP 1.6's own."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import pytest_twisted
from zope.interface import implementer

from csms import actions
from csms.app import ActionUnavailable
from csms.config import load_config
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from csms.plugins import PluginError
from csms.testing.pytest_plugin import builtin_plugins
from csms.testing.station import CallErrorFrame
from conftest import within

HELLO = {
    "request": {"type": "object", "additionalProperties": False, "required": ["serial"],
                "properties": {"serial": {"type": "string", "maxLength": 20}, "slots": {"type": "integer"}}},
    "response": {"type": "object", "additionalProperties": False, "required": ["status"],
                 "properties": {"status": {"type": "string", "enum": ["Accepted", "Rejected"]}}},
}
REBOOT = {
    "request": {"type": "object", "additionalProperties": False, "required": ["delay"],
                "properties": {"delay": {"type": "integer", "minimum": 0}}},
    "response": {"type": "object", "required": ["done"], "properties": {"done": {"type": "boolean"}}},
}


@implementer(ICSMSPlugin)
class SecurityAndVendor:
    """The security extension's SecurityEventNotification / ExtendedTriggerMessage (schemas from the
    ocpp package) and a vendor's VendorHello / VendorReboot (schemas of its own). It stands for a vendor's
    own security plugin, so the built-in one is disabled wherever it runs (``WITHOUT_SECURITY``)."""

    name = "secvendor"
    profile = None
    settings = ()
    inbound_actions = ("SecurityEventNotification", "VendorHello")
    outbound_actions = ("ExtendedTriggerMessage", "VendorReboot")
    action_schemas = {"VendorHello": HELLO, "VendorReboot": REBOOT}

    def __init__(self):
        self.received = []

    @hookimpl
    def csms_handle_call(self, station, action, payload):
        self.received.append((station.station_id, action, payload))
        if action == "SecurityEventNotification":
            return {}
        if action == "VendorHello":
            return {"status": "Accepted"} if payload["serial"] != "broken" else {"status": "Maybe"}
        return None


@implementer(ICSMSPlugin)
class Greedy:
    """Answers every CALL it is offered: it must not be offered another plugin's action."""

    name = "greedy"
    profile = None
    settings = ()
    inbound_actions = ()
    outbound_actions = ()

    @hookimpl
    def csms_handle_call(self, station, action, payload):
        return {"status": "Rejected"}


TIMESTAMP = "2026-01-01T00:00:00Z"


def without_security():
    return [name for name in builtin_plugins() if name != "security"]


async def started(csms_factory, *plugins):
    return await csms_factory(plugins=without_security(), extra_plugins=list(plugins) or [SecurityAndVendor()])


async def call_error(station, action, payload) -> CallErrorFrame:
    with pytest.raises(CallErrorFrame) as caught:
        await within(station.call(action, payload))
    return caught.value


@pytest_twisted.ensureDeferred
async def test_inbound_plugin_actions_are_validated_and_answered_by_their_plugin(csms_factory):
    plugin = SecurityAndVendor()
    # pluggy calls the last registered first: Greedy would answer, were it offered the action.
    csms = await csms_factory(plugins=without_security(), extra_plugins=[plugin, Greedy()])
    station = await csms.connect_booted("CP-SEC")

    assert await within(station.call("SecurityEventNotification",
                                     {"type": "FirmwareUpdated", "timestamp": TIMESTAMP})) == {}
    assert await within(station.call("VendorHello", {"serial": "SN-1"})) == {"status": "Accepted"}
    assert plugin.received == [
        ("CP-SEC", "SecurityEventNotification", {"type": "FirmwareUpdated", "timestamp": TIMESTAMP}),
        ("CP-SEC", "VendorHello", {"serial": "SN-1"})]

    assert (await call_error(station, "SecurityEventNotification", {"type": "X"})).code == \
        "OccurenceConstraintViolation"
    assert (await call_error(station, "VendorHello", {"serial": 7})).code == "TypeConstraintViolation"
    assert (await call_error(station, "VendorHello", {"serial": "x" * 21})).code == "PropertyConstraintViolation"
    assert (await call_error(station, "VendorHello", {"serial": "SN", "colour": "red"})).code == "FormationViolation"
    assert len(plugin.received) == 2
    # The plugin's answer is checked against the response schema like a built-in handler's.
    assert (await call_error(station, "VendorHello", {"serial": "broken"})).code == "InternalError"


@pytest_twisted.ensureDeferred
async def test_outbound_plugin_actions_go_through_app_call_station_call_and_the_api(csms_factory):
    csms = await started(csms_factory)
    station = await csms.connect_booted("CP-OUT")
    station.responses["ExtendedTriggerMessage"] = {"status": "Accepted"}
    station.responses["VendorReboot"] = lambda payload: {"done": payload["delay"] == 0}
    app = csms.app

    assert await within(app.call("CP-OUT", "ExtendedTriggerMessage", {"requestedMessage": "Heartbeat"})) == \
        {"status": "Accepted"}
    assert await within(app.sessions["CP-OUT"].call("VendorReboot", {"delay": 0})) == {"done": True}
    status, body, _ = await csms.api("POST", "/stations/CP-OUT/calls/VendorReboot", json={"delay": 5})
    assert (status, body) == (200, {"done": False})
    status, body, _ = await csms.api("POST", "/stations/CP-OUT/calls/ExtendedTriggerMessage",
                                     json={"requestedMessage": "StatusNotification", "connectorId": 1})
    assert (status, body) == (200, {"status": "Accepted"})
    assert [frame[2:] for frame in station.received_calls[-4:]] == [
        ["ExtendedTriggerMessage", {"requestedMessage": "Heartbeat"}], ["VendorReboot", {"delay": 0}],
        ["VendorReboot", {"delay": 5}], ["ExtendedTriggerMessage", {"requestedMessage": "StatusNotification",
                                                                  "connectorId": 1}]]

    status, body, _ = await csms.api("POST", "/stations/CP-OUT/calls/VendorReboot", json={"delay": -1})
    assert status == 422 and body["error"]["code"] == "invalid_ocpp_payload"
    assert body["error"]["details"]["ocpp_error_code"] == "PropertyConstraintViolation"
    station.responses["VendorReboot"] = {"done": "yes"}
    status, body, _ = await csms.api("POST", "/stations/CP-OUT/calls/VendorReboot", json={"delay": 1})
    assert status == 502 and body["error"]["code"] == "station_invalid_response"


@pytest_twisted.ensureDeferred
async def test_openapi_document_lists_plugin_actions_with_their_schemas(csms_factory):
    csms = await started(csms_factory)
    status, document, _ = await csms.api("GET", "/openapi.json", token=None)
    assert status == 200
    operation = document["paths"]["/stations/{station_id}/calls/{action}"]["post"]
    action = next(p for p in operation["parameters"] if p["name"] == "action")
    assert {"VendorReboot", "ExtendedTriggerMessage", "Reset"} <= set(action["schema"]["enum"])
    assert operation["x-ocpp-actions"]["VendorReboot"]["plugin"] == "secvendor"
    components = document["components"]["schemas"]
    assert components["VendorRebootRequest"] == REBOOT["request"]
    assert components["VendorRebootResponse"] == REBOOT["response"]
    # The ocpp package's draft-06 schema, its definitions inlined: one self-contained component.
    trigger = components["ExtendedTriggerMessageRequest"]
    assert "$schema" not in trigger and "definitions" not in trigger
    assert "SignChargePointCertificate" in trigger["properties"]["requestedMessage"]["enum"]
    assert {"$ref": "#/components/schemas/VendorRebootRequest"} in \
        operation["requestBody"]["content"]["application/json"]["schema"]["anyOf"]
    assert "VendorHelloRequest" not in components  # inbound only: not something an operator sends


@pytest.fixture
def installed_but_disabled(monkeypatch):
    """SecurityAndVendor installed under the entry point name "secvendor", not enabled (in place of the
    built-in security plugin, as a vendor's distribution might ship it)."""
    entry_point = SimpleNamespace(name="secvendor", load=lambda: SecurityAndVendor)
    installed = {name: ep for name, ep in actions.available_plugins().items() if name != "security"}
    monkeypatch.setattr(actions, "available_plugins", lambda: {**installed, "secvendor": entry_point})


@pytest_twisted.ensureDeferred
async def test_a_disabled_plugins_actions_answer_not_supported(csms_factory, installed_but_disabled):
    csms = await csms_factory(plugins=without_security())
    station = await csms.connect_booted("CP-OFF")
    error = await call_error(station, "VendorHello", {"serial": "SN-1"})
    assert error.code == "NotSupported" and "secvendor plugin" in error.frame[3]
    assert (await call_error(station, "VendorUnheardOf", {})).code == "NotImplemented"

    status, body, _ = await csms.api("POST", "/stations/CP-OFF/calls/VendorReboot", json={"delay": 1})
    assert status == 404 and body["error"]["code"] == "action_unavailable"
    assert "secvendor plugin, which is not enabled" in body["error"]["message"]
    with pytest.raises(ActionUnavailable, match="secvendor plugin"):
        await within(csms.app.call("CP-OFF", "ExtendedTriggerMessage", {"requestedMessage": "Heartbeat"}))


def central_system(*plugins):
    from csms.app import CentralSystem

    config = load_config(text="[database]\nurl = sqlite://\n[plugins]\nenabled = core\n")
    return CentralSystem(config, extra_plugins=plugins)


def vendor(**attributes):
    plugin = SecurityAndVendor()
    for key, value in attributes.items():
        setattr(plugin, key, value)
    return plugin


@pytest.mark.parametrize("attributes, message", [
    ({"action_schemas": {}}, "adds VendorHello without a schema"),
    ({"action_schemas": {"VendorHello": HELLO, "VendorReboot": REBOOT, "VendorOther": HELLO}},
     r"neither answers nor offers.*VendorOther"),
    ({"action_schemas": {"VendorHello": HELLO, "VendorReboot": REBOOT, "Reset": HELLO}}, r"OCPP 1.6 defines.*Reset"),
    ({"action_schemas": {"VendorHello": HELLO["request"], "VendorReboot": REBOOT}}, r'\{"request": schema'),
    ({"action_schemas": {"VendorHello": {"request": {"type": "nonsense"}, "response": {}}, "VendorReboot": REBOOT}},
     "VendorHello schema does not compile"),
    ({"action_schemas": {"VendorHello": {"request": "/nonexistent/VendorHello.json", "response": {}},
                         "VendorReboot": REBOOT}}, "No such file"),
])
def test_plugin_action_declaration_mistakes_stop_the_start(attributes, message):
    with pytest.raises(PluginError, match=message):
        central_system(vendor(**attributes))


def test_plugin_schemas_belong_to_their_central_system():
    with_plugin = central_system(SecurityAndVendor())
    without = central_system()
    assert with_plugin.schemas.has_request("VendorHello")
    assert not without.schemas.has_request("VendorHello")
    assert without.schemas.has_request("SignCertificate")  # the ocpp package ships the security extension's


def test_schema_files_load_from_a_directory(tmp_path):
    import json

    from csms.schemas import schemas_in

    (tmp_path / "VendorHello.json").write_text(json.dumps(HELLO["request"]))
    (tmp_path / "VendorHelloResponse.json").write_text(json.dumps(HELLO["response"]))
    app = central_system(vendor(action_schemas={**schemas_in(str(tmp_path), "VendorHello"), "VendorReboot": REBOOT}))
    assert app.schemas.schema("VendorHello") == HELLO["request"]
