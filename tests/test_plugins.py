"""Plugins: found through the ``csms.plugins`` entry point group, checked when loaded, enabled by config.

The vendor plugin here is installed the way a real one is: a module plus a ``.dist-info`` directory
declaring its entry point, on ``sys.path``; nothing in the CSMS names it.
"""
from __future__ import annotations

import sys
import textwrap

import pytest
import pytest_twisted
from sqlalchemy import inspect
from twisted.internet import defer
from zope.interface import implementer

from csms.app import ActionUnavailable
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from csms.plugins import PluginError, available_plugins, make_plugin_manager
from csms.stations import metadata as framework_metadata
from csms_plugins.core.tables import metadata as core_metadata

WAIT = 5

ACME_PLUGIN = '''
"""ACME's vendor extension: answers DataTransfer for vendorId com.acme (OCTT TC_064)."""
from zope.interface import implementer

from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin


@implementer(ICSMSPlugin)
class AcmePlugin:
    name = "acme"
    profile = None
    inbound_actions = ()
    outbound_actions = ()
    shared_actions = ("DataTransfer",)

    @hookimpl
    def csms_handle_data_transfer(self, station, payload):
        if payload["vendorId"] != "com.acme":
            return None
        return {"status": "Accepted", "data": "acme:" + payload.get("data", "")}
'''


@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install(dist_name, modules, entry_points)`` installs a distribution into a directory on sys.path:
    ``modules`` (name -> source) plus its ``.dist-info`` with METADATA and ``csms.plugins`` entry points
    (name -> ``module:attr``). The modules are forgotten again after the test."""
    imported: list[str] = []

    def install_distribution(dist_name: str, modules: dict[str, str], entry_points: dict[str, str]) -> None:
        for module, source in modules.items():
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
            imported.append(module)
        dist_info = tmp_path / f"{dist_name}-1.0.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n",
                                            encoding="utf-8")
        lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
        (dist_info / "entry_points.txt").write_text(f"[csms.plugins]\n{lines}", encoding="utf-8")
        monkeypatch.syspath_prepend(str(tmp_path))

    yield install_distribution
    for module in imported:
        sys.modules.pop(module, None)


@pytest.fixture
def acme_installed(install):
    install("acme_vendor", {"acme_vendor": ACME_PLUGIN}, {"acme": "acme_vendor:AcmePlugin"})


# -- an out-of-tree vendor plugin ---------------------------------------------------------------------


def test_installed_vendor_plugin_is_found_through_its_entry_point(acme_installed):
    installed = available_plugins()
    assert installed["acme"].value == "acme_vendor:AcmePlugin"
    assert {"core", "firmware", "localauth", "remotetrigger", "reservation", "smartcharging"} <= set(installed)


@pytest_twisted.ensureDeferred
async def test_TC_064_vendor_plugin_answers_data_transfer_for_its_vendor_id(acme_installed, csms_factory):
    csms = await csms_factory(plugins=["core", "acme"])
    assert [plugin.name for plugin in csms.app.plugins] == ["core", "acme"]
    station = await csms.connect_booted("CP-1")
    response = await station.call("DataTransfer", {"vendorId": "com.acme", "messageId": "m", "data": "ping"},
                                  timeout=WAIT)
    assert response == {"status": "Accepted", "data": "acme:ping"}


@pytest_twisted.ensureDeferred
async def test_TC_064_data_transfer_for_another_vendor_id_gets_unknown_vendor_id(acme_installed, csms_factory):
    csms = await csms_factory(plugins=["core", "acme"])
    station = await csms.connect_booted("CP-1")
    response = await station.call("DataTransfer", {"vendorId": "com.other", "data": "ping"}, timeout=WAIT)
    assert response == {"status": "UnknownVendorId"}


@pytest_twisted.ensureDeferred
async def test_installed_but_not_enabled_vendor_plugin_is_not_loaded(acme_installed, csms_factory):
    csms = await csms_factory(plugins=["core"])
    assert [plugin.name for plugin in csms.app.plugins] == ["core"]
    station = await csms.connect("CP-1")
    response = await station.call("DataTransfer", {"vendorId": "com.acme", "data": "ping"}, timeout=WAIT)
    assert response == {"status": "UnknownVendorId"}


# -- plugins that must not load -----------------------------------------------------------------------


def test_enabling_a_plugin_that_is_not_installed_raises_plugin_error():
    with pytest.raises(PluginError, match="'acme' is enabled in the config but not installed"):
        make_plugin_manager(["core", "acme"])


def test_plugin_not_providing_icsmsplugin_raises_plugin_error(install):
    source = '''
        class NotAPlugin:
            name = "bogus"
            profile = None
            inbound_actions = ()
            outbound_actions = ()
    '''
    install("bogus_vendor", {"bogus_vendor": source},
                         {"bogus": "bogus_vendor:NotAPlugin"})
    with pytest.raises(PluginError, match="does not provide ICSMSPlugin"):
        make_plugin_manager(["core", "bogus"])


def test_plugin_missing_an_interface_attribute_raises_plugin_error(install):
    source = '''
        from zope.interface import implementer
        from csms.interfaces import ICSMSPlugin

        @implementer(ICSMSPlugin)
        class Forgetful:
            name = "forgetful"
            profile = None
            inbound_actions = ()
    '''
    install("forgetful_vendor", {"forgetful_vendor": source},
                         {"forgetful": "forgetful_vendor:Forgetful"})
    with pytest.raises(PluginError, match="outbound_actions"):
        make_plugin_manager(["forgetful"])


def test_the_start_up_line_names_every_interface_attribute_a_plugin_lacks(install):
    # zope's message is a line per missing attribute: the one line start-up writes must keep them all.
    from csms.service import describe

    source = '''
        from zope.interface import implementer
        from csms.interfaces import ICSMSPlugin

        @implementer(ICSMSPlugin)
        class Sketch:
            name = "sketch"
    '''
    install("sketch_vendor", {"sketch_vendor": source}, {"sketch": "sketch_vendor:Sketch"})
    with pytest.raises(PluginError) as info:
        make_plugin_manager(["sketch"])
    line = describe(info.value)
    assert "\n" not in line
    for attribute in ("profile", "inbound_actions", "outbound_actions"):
        assert attribute in line, line


def test_plugin_with_a_misspelt_hook_name_raises_plugin_error(install):
    source = '''
        from zope.interface import implementer
        from csms.hookspecs import hookimpl
        from csms.interfaces import ICSMSPlugin

        @implementer(ICSMSPlugin)
        class Typo:
            name = "typo"
            profile = None
            inbound_actions = ()
            outbound_actions = ()

            @hookimpl
            def csms_handle_hartbeat(self, station, payload):
                return {}
    '''
    install("typo_vendor", {"typo_vendor": source},
                         {"typo": "typo_vendor:Typo"})
    with pytest.raises(PluginError, match="csms_handle_hartbeat"):
        make_plugin_manager(["core", "typo"])


def test_a_misspelt_hook_is_refused_naming_the_plugin_its_class_and_the_hook_meant(install):
    """The refusal says which plugin (its name, which is its [plugin:NAME] section, and where its class
    is), the misspelt hook, and the closest hook that exists; pluggy alone named the object's repr."""
    source = '''
        from zope.interface import implementer
        from csms.hookspecs import hookimpl
        from csms.interfaces import ICSMSPlugin

        @implementer(ICSMSPlugin)
        class Listener:
            name = "listener"
            profile = None
            inbound_actions = ()
            outbound_actions = ()

            @hookimpl
            def csms_on_staton_connected(self, station_id, station):
                pass
    '''
    install("listener_vendor", {"listener_vendor": source}, {"listener": "listener_vendor:Listener"})
    with pytest.raises(PluginError) as refused:
        make_plugin_manager(["core", "listener"])
    assert str(refused.value) == ("plugin 'listener' (listener_vendor:Listener) implements csms_on_staton_connected, "
                                  "which is not a hook: did you mean csms_on_station_connected?")


def test_a_hook_nothing_resembles_is_refused_pointing_to_the_hook_reference():
    @implementer(ICSMSPlugin)
    class Inventive:
        name = "inventive"
        profile = None
        inbound_actions = ()
        outbound_actions = ()

        @hookimpl
        def make_coffee(self):
            pass

    with pytest.raises(PluginError) as refused:
        make_plugin_manager(["core"], extra_plugins=[Inventive])
    assert str(refused.value) == (
        "plugin 'inventive' (test_plugins:test_a_hook_nothing_resembles_is_refused_pointing_to_the_hook_reference."
        "<locals>.Inventive) implements make_coffee, which is not a hook (every hook is in docs/hooks.md)")


def test_a_hook_implementation_with_an_argument_its_hook_lacks_is_a_plugin_error_naming_the_plugin():
    """pluggy refuses it at registration, with its own exception: a traceback at start-up, where every
    other refusal of a plugin is a PluginError in one line."""
    @implementer(ICSMSPlugin)
    class Listener:
        name = "listener"
        profile = None
        inbound_actions = ()
        outbound_actions = ()

        @hookimpl
        def csms_on_station_connected(self, sesion):
            pass

    with pytest.raises(PluginError) as refused:
        make_plugin_manager(["core"], extra_plugins=[Listener])
    message = str(refused.value)
    assert message.startswith("plugin 'listener' (test_plugins:") and "csms_on_station_connected" in message
    assert "'sesion'" in message and "\n" not in message


def test_plugin_whose_name_differs_from_its_entry_point_raises_plugin_error(install):
    install("acme_vendor", {"acme_vendor": ACME_PLUGIN},
                         {"acme-pro": "acme_vendor:AcmePlugin"})
    with pytest.raises(PluginError, match="loads a plugin named 'acme'"):
        make_plugin_manager(["acme-pro"])


def test_profile_plugin_listing_an_action_ocpp16_does_not_have_raises_plugin_error(install):
    source = '''
        from zope.interface import implementer
        from csms.interfaces import ICSMSPlugin

        @implementer(ICSMSPlugin)
        class Inventive:
            name = "inventive"
            profile = "Core"
            inbound_actions = ("MakeCoffee",)
            outbound_actions = ()
    '''
    install("inventive_vendor", {"inventive_vendor": source},
                         {"inventive": "inventive_vendor:Inventive"})
    with pytest.raises(PluginError, match="MakeCoffee"):
        make_plugin_manager(["inventive"])


def test_extra_plugin_object_is_checked_like_an_installed_one():
    class Anonymous:
        name = "anonymous"
        profile = None
        inbound_actions = ()
        outbound_actions = ()

    with pytest.raises(PluginError, match="does not provide ICSMSPlugin"):
        make_plugin_manager(["core"], extra_plugins=[Anonymous()])


# -- enabling, disabling, blocking ----------------------------------------------------------------------


def table_names(csms):
    return csms.app.db.run(lambda conn: set(inspect(conn).get_table_names()))


@pytest_twisted.ensureDeferred
async def test_disabled_plugins_create_no_tables(csms_factory):
    csms = await csms_factory(plugins=["core"])
    names = await table_names(csms)
    assert names == set(framework_metadata.tables) | set(core_metadata.tables) | {"csms_alembic_version",
                                                                                  "core_alembic_version"}
    assert all(name.startswith(("csms_", "core_")) for name in names)


@pytest_twisted.ensureDeferred
async def test_disabled_plugins_actions_answer_not_supported_and_cannot_be_called(csms_factory):
    csms = await csms_factory(plugins=["core"])
    station = await csms.connect("CP-1")
    answer = await station.call_frame("FirmwareStatusNotification", {"status": "Idle"}, timeout=WAIT)
    assert answer[:3] == [4, answer[1], "NotSupported"]
    with pytest.raises(ActionUnavailable, match="FirmwareManagement"):
        await csms.app.call("CP-1", "UpdateFirmware", {"location": "ftp://x/fw.bin",
                                                       "retrieveDate": "2024-01-01T00:00:00Z"})
    assert station.received_calls == []


@pytest_twisted.ensureDeferred
async def test_blocked_plugin_wins_over_enabled(csms_factory):
    csms = await csms_factory(config_text="[plugins]\nenabled = core, firmware\nblocked = firmware\n")
    assert [plugin.name for plugin in csms.app.plugins] == ["core"]
    assert csms.app.pm.get_plugin("firmware") is None
    station = await csms.connect("CP-1")
    answer = await station.call_frame("FirmwareStatusNotification", {"status": "Idle"}, timeout=WAIT)
    assert answer[2] == "NotSupported"


def test_blocking_a_plugin_that_is_not_installed_is_not_an_error():
    pm = make_plugin_manager(["core", "acme"], blocked=["acme"])
    assert [name for name, _ in pm.list_name_plugin()] == ["core"]


def test_no_plugins_enabled_means_every_ocpp_action_is_not_supported():
    from csms.app import CentralSystem
    from csms.config import Config
    from csms.rpc import CallError

    config = Config(enabled_plugins=[])
    config.database.url = "sqlite://"
    app = CentralSystem(config)
    with pytest.raises(CallError) as exc_info:
        app.dispatch(object(), "Heartbeat", {})
    assert exc_info.value.code == "NotSupported"
    with pytest.raises(CallError) as exc_info:
        app.dispatch(object(), "MakeCoffee", {})
    assert exc_info.value.code == "NotImplemented"


# -- hook results and failures -------------------------------------------------------------------------


@implementer(ICSMSPlugin)
class AsyncVendor:
    """Answers with a coroutine, and has an event listener that always fails."""

    name = "asyncvendor"
    profile = None
    inbound_actions = ()
    outbound_actions = ()
    shared_actions = ("DataTransfer",)

    def __init__(self):
        self.boots: list = []

    @hookimpl
    def csms_handle_data_transfer(self, station, payload):
        if payload["vendorId"] != "org.async":
            return None
        return self._answer(payload)

    async def _answer(self, payload):
        await defer.succeed(None)
        return {"status": "Accepted", "data": payload["data"].upper()}

    @hookimpl
    def csms_handle_call(self, station, action, payload):
        if action == "AsyncPing":
            return defer.succeed({"pong": payload.get("n", 0)})
        return None

    @hookimpl
    def csms_on_boot(self, station_id, request, status):
        self.boots.append((station_id, status))
        raise RuntimeError("this listener is broken")


@pytest_twisted.ensureDeferred
async def test_hook_answering_with_a_coroutine_is_awaited(csms_factory):
    csms = await csms_factory(plugins=["core"], extra_plugins=[AsyncVendor()])
    station = await csms.connect("CP-1")
    response = await station.call("DataTransfer", {"vendorId": "org.async", "data": "hi"}, timeout=WAIT)
    assert response == {"status": "Accepted", "data": "HI"}


@pytest_twisted.ensureDeferred
async def test_vendor_action_answered_through_csms_handle_call(csms_factory):
    csms = await csms_factory(plugins=["core"], extra_plugins=[AsyncVendor()])
    station = await csms.connect("CP-1")
    assert await station.call("AsyncPing", {"n": 3}, timeout=WAIT) == {"pong": 3}
    answer = await station.call_frame("AsyncPong", {}, timeout=WAIT)
    assert answer[2] == "NotImplemented"


@pytest_twisted.ensureDeferred
async def test_failing_event_listener_does_not_break_the_confirmation(csms_factory):
    vendor = AsyncVendor()
    csms = await csms_factory(plugins=["core"], extra_plugins=[vendor])
    station = await csms.connect("CP-1")
    response = await station.call("BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"},
                                  timeout=WAIT)
    assert response["status"] == "Accepted"
    assert vendor.boots == [("CP-1", "Accepted")]


@implementer(ICSMSPlugin)
class BootListener:
    name = "bootlistener"
    profile = None
    inbound_actions = ()
    outbound_actions = ()

    def __init__(self):
        self.boots: list = []

    @hookimpl
    def csms_on_boot(self, station_id, request, status):
        self.boots.append((station_id, status))


@pytest.mark.parametrize("broken_first", [True, False], ids=["broken-registered-first", "broken-registered-last"])
@pytest_twisted.ensureDeferred
async def test_every_listener_is_told_even_when_another_one_fails(csms_factory, broken_first):
    broken, listener = AsyncVendor(), BootListener()
    plugins = [broken, listener] if broken_first else [listener, broken]
    csms = await csms_factory(plugins=["core"], extra_plugins=plugins)
    station = await csms.connect("CP-1")
    response = await station.call("BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"},
                                  timeout=WAIT)
    assert response["status"] == "Accepted"
    assert broken.boots == [("CP-1", "Accepted")]
    assert listener.boots == [("CP-1", "Accepted")]
