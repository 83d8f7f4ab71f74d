"""Finding, checking and registering plugins.

Plugins are found through the ``csms.plugins`` entry point group; the built-in profiles are listed
there exactly like a third-party plugin. Only plugins named in ``[plugins] enabled`` are loaded, so a
disabled plugin registers no hooks and creates no tables. A plugin declares its ``[plugin:NAME]``
settings in a ``settings`` attribute (a sequence of :class:`csms.config.Setting`).

What a plugin owns is its own: its tables are named ``<name>_...`` (``csms_...`` is the framework's),
and an OCPP action has one plugin answering or offering it unless every plugin claiming it declares it
in ``shared_actions``.
"""
from __future__ import annotations

import difflib
import os
import sys
from importlib.metadata import entry_points

import pluggy
from twisted.logger import Logger
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from csms import hookspecs, ocpp16
from csms.config import Config, Setting, check_plugin_sections
from csms.interfaces import ICSMSPlugin

log = Logger(namespace="csms.plugins")

ENTRY_POINT_GROUP = "csms.plugins"
#: Table names starting with this belong to the framework (stations, connection events, API tokens).
FRAMEWORK_TABLE_PREFIX = "csms_"


class PluginError(Exception):
    """A plugin could not be loaded: not installed, not providing ICSMSPlugin, or misspelt hooks."""


def origin(plugin) -> str:
    """Where ``plugin`` (an object or a class) is defined, as an entry point names it: ``module:Class``."""
    cls = plugin if isinstance(plugin, type) else type(plugin)
    return f"{cls.__module__}:{cls.__qualname__}"


def available_plugins() -> dict:
    """Entry point name -> entry point, for every installed plugin."""
    key = _installation_state()
    if _available.get("key") != key:
        _available.update(key=key, plugins={ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)})
    return dict(_available["plugins"])


#: The last scan and what it depended on. Scanning reads every installed distribution's metadata (tens
#: of milliseconds) and a start asks several times; the test suite starts a CSMS per test.
_available: dict = {}


def _installation_state() -> tuple:
    """What the installed distributions depend on: the path searched and the modification time of each
    entry, which adding or removing a distribution there changes (importlib.metadata relies on the same)."""
    state = []
    for entry in sys.path:
        path = entry or os.getcwd()
        try:
            state.append((path, os.stat(path).st_mtime_ns))
        except OSError:
            state.append((path, None))
    return tuple(state)


def _instantiate(obj):
    return obj() if isinstance(obj, type) else obj


def check_plugin(plugin) -> None:
    try:
        verifyObject(ICSMSPlugin, plugin)
    except Invalid as exc:
        # zope writes a line per problem (a missing attribute, a wrong method) under a heading: one line
        # of them, since start-up says why it stopped in one line (and would keep only the heading).
        problems = [line.strip() for line in str(exc).splitlines() if line.strip()]
        if len(problems) > 1 and problems[0].endswith(":"):
            problems = problems[1:]
        raise PluginError(f"{plugin!r} does not provide ICSMSPlugin: {'; '.join(problems)}") from None
    unknown = [a for a in plugin.inbound_actions if a not in ocpp16.INBOUND]
    unknown += [a for a in plugin.outbound_actions if a not in ocpp16.OUTBOUND]
    if unknown and plugin.profile is not None:
        raise PluginError(f"plugin {plugin.name!r} lists actions OCPP 1.6 does not have: {unknown}")
    declared_settings(plugin)
    shared_actions(plugin)
    from csms.migrations import plugin_migrations

    plugin_migrations(plugin)


def shared_actions(plugin) -> frozenset:
    """The actions ``plugin`` declares it shares with other plugins (its ``shared_actions``, default none)."""
    shared = getattr(plugin, "shared_actions", ())
    if isinstance(shared, (str, bytes)) or not all(isinstance(action, str) for action in shared):
        raise PluginError(f"plugin {plugin.name!r}: shared_actions must be a sequence of action names, "
                          "e.g. (\"DataTransfer\",)")
    return frozenset(shared)


def _claims(pm: pluggy.PluginManager, plugins: list) -> dict:
    """(direction, action) -> names of the plugins claiming it: listing it, or implementing its handler hook."""
    claims: dict = {}
    for plugin in plugins:
        for direction, actions in (("inbound", plugin.inbound_actions), ("outbound", plugin.outbound_actions)):
            for action in actions:
                claims.setdefault((direction, action), []).append(plugin.name)
    for action in ocpp16.INBOUND:
        for impl in getattr(pm.hook, ocpp16.hook_name(action)).get_hookimpls():
            claimants = claims.setdefault(("inbound", action), [])
            if impl.plugin_name not in claimants:
                claimants.append(impl.plugin_name)
    return claims


def check_action_ownership(pm: pluggy.PluginManager) -> None:
    """Refuse two plugins answering (or offering) one action, unless each of them declares it shared.

    A shared inbound action's handlers answer in turn until one returns something (DataTransfer: each
    vendor its own vendorId, Core last with UnknownVendorId).
    """
    plugins = {plugin.name: plugin for plugin in loaded_plugins(pm)}
    for (direction, action), names in sorted(_claims(pm, list(plugins.values())).items()):
        if len(names) < 2:
            continue
        exclusive = [name for name in names if action not in shared_actions(plugins[name])]
        if exclusive:
            verb = "answer" if direction == "inbound" else "offer"
            raise PluginError(
                f"plugins {', '.join(repr(n) for n in names)} all {verb} {action}: an action belongs to one "
                f"plugin unless each of them declares it shared (shared_actions = ({action!r},)); "
                f"not shared by {', '.join(repr(n) for n in exclusive)}")


def table_owner(table_name: str, plugin_names) -> str | None:
    """Whose prefix ``table_name`` has: ``csms`` (the framework), the plugin whose ``<name>_`` is its
    longest matching prefix, or None."""
    if table_name.startswith(FRAMEWORK_TABLE_PREFIX):
        return "csms"
    owners = [name for name in plugin_names if table_name.startswith(name + "_")]
    return max(owners, key=len) if owners else None


def check_table_names(pm: pluggy.PluginManager) -> None:
    """Refuse a plugin table not named ``<plugin name>_...``, or named like another plugin's or the framework's.

    Other plugins are every installed or loaded one, so that enabling one later cannot collide.
    """
    names = set(available_plugins()) | {plugin.name for plugin in loaded_plugins(pm)}
    for impl in pm.hook.csms_tables.get_hookimpls():
        metadata = impl.function()
        if metadata is None:
            continue
        name = impl.plugin_name
        for table in metadata.tables.values():
            owner = table_owner(table.name, names)
            if owner == name:
                continue
            if owner == "csms":
                why = "the csms_ prefix is the framework's"
            elif owner is not None:
                why = f"that is plugin {owner!r}'s prefix"
            else:
                why = f"a plugin's tables are named {name}_..."
            raise PluginError(f"plugin {name!r} declares table {table.name!r}: {why}")


def declared_settings(plugin) -> tuple | None:
    """The settings ``plugin`` declares, or None when it has no ``settings`` attribute at all."""
    settings = getattr(plugin, "settings", None)
    if settings is None:
        return None
    if isinstance(settings, (str, bytes)) or not all(isinstance(s, Setting) for s in settings):
        raise PluginError(f"plugin {plugin.name!r}: settings must be a sequence of csms.config.Setting")
    names = [setting.name for setting in settings]
    if len(set(names)) != len(names):
        raise PluginError(f"plugin {plugin.name!r} declares a setting twice: {sorted(names)}")
    return tuple(settings)


def check_settings(config: Config, plugins: list) -> None:
    """Check every ``[plugin:NAME]`` section against the loaded ``plugins`` (see check_plugin_sections)."""
    declared = {plugin.name: declared_settings(plugin) for plugin in plugins}
    for name, settings in declared.items():
        if settings is None and config.plugin_settings.get(name):
            # Plugins written before settings were declared keep working; their typos go unnoticed.
            log.warn("Plugin {plugin} declares no settings: [plugin:{plugin}] is not checked", plugin=name)
    check_plugin_sections(config, declared, available_plugins())


#: Event hooks: every listener is told, and one that raises must not keep the others uninformed.
EVENT_PREFIX = "csms_on_"


class CSMSPluginManager(pluggy.PluginManager):
    """pluggy's manager, with each event listener guarded as it is registered.

    pluggy stops calling a hook's implementations at the first exception. For an event
    (``csms_on_*``) that would leave the listeners after a failing one uninformed, so each listener's
    function is replaced, in its ``pluggy.HookImpl``, by one that logs an exception and returns None.
    Events are then called through pluggy itself: ``wrapper=True`` implementations see every
    listener's result, and tracing (``pm.trace``, ``pm.add_hookcall_monitoring``) sees the call.
    Wrappers are not guarded: they are told of exceptions by design.
    """

    def register(self, plugin, name=None):
        name = super().register(plugin, name)
        if name is not None:
            for caller in self.get_hookcallers(plugin) or ():
                if caller.name.startswith(EVENT_PREFIX):
                    for impl in caller.get_hookimpls():
                        if impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper):
                            impl.function = _guarded_listener(caller.name, impl.plugin_name, impl.function)
        return name


def _guarded_listener(hook_name: str, plugin_name: str, function):
    def listener(*args):
        try:
            return function(*args)
        except Exception:
            log.failure("Event {hook} listener {plugin} failed", hook=hook_name, plugin=plugin_name)
            return None
    listener.__wrapped__ = function
    return listener


def make_plugin_manager(enabled: list[str], blocked: list[str] = (), extra_plugins=()) -> pluggy.PluginManager:
    """A plugin manager with every enabled (and not blocked) installed plugin registered and checked.

    ``extra_plugins`` are registered too (objects, not entry points): for tests and embedding.
    """
    pm = CSMSPluginManager("csms")
    pm.add_hookspecs(hookspecs)
    installed = available_plugins()
    for name in enabled:
        if name in blocked:
            continue
        if name not in installed:
            raise PluginError(
                f"plugin {name!r} is enabled in the config but not installed "
                f"(installed: {', '.join(sorted(installed)) or 'none'})")
        try:
            loaded = installed[name].load()
        except ImportError as exc:  # a dependency the plugin's package did not bring (a bug raises as it is)
            raise PluginError(f"plugin {name!r} cannot be imported: {exc} (install what it needs, or take it "
                              "out of [plugins] enabled)") from None
        plugin = _instantiate(loaded)
        check_plugin(plugin)
        if plugin.name != name:
            raise PluginError(f"entry point {name!r} loads a plugin named {plugin.name!r}")
        register(pm, plugin, name)
    for plugin in extra_plugins:
        plugin = _instantiate(plugin)
        check_plugin(plugin)
        register(pm, plugin, plugin.name)
    try:  # the net under check_hook_names: a hook implemented by anything else registered
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from None
    check_action_ownership(pm)
    return pm


def register(pm: pluggy.PluginManager, plugin, name: str) -> None:
    """Register ``plugin`` as ``name``; a hook implementation pluggy refuses, or one of a hook that does
    not exist, is a PluginError naming the plugin, where it is defined and the hook."""
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:  # e.g. an argument the hookspec does not have
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise PluginError(f"plugin {name!r} ({origin(plugin)}): {'; '.join(lines)}") from None
    check_hook_names(pm, plugin, name)


def hook_names(pm: pluggy.PluginManager) -> list[str]:
    """Every hook the Central System declares (csms.hookspecs)."""
    return sorted(name for name, caller in vars(pm.hook).items()
                  if not name.startswith("_") and caller.spec is not None)


def check_hook_names(pm: pluggy.PluginManager, plugin, name: str) -> None:
    """Refuse a hook implementation of ``plugin`` whose name no hookspec has (a misspelt
    ``csms_on_staton_connected`` would never be called), naming the closest hook that exists.

    pluggy's ``check_pending`` finds the same, but names the plugin by its ``repr`` only.
    """
    for caller in pm.get_hookcallers(plugin) or ():
        if caller.spec is not None:
            continue
        if not any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls()):
            continue
        close = difflib.get_close_matches(caller.name, hook_names(pm), n=1)
        hint = f": did you mean {close[0]}?" if close else " (every hook is in docs/hooks.md)"
        raise PluginError(f"plugin {name!r} ({origin(plugin)}) implements {caller.name}, which is not a hook{hint}")


def loaded_plugins(pm: pluggy.PluginManager) -> list:
    return [plugin for name, plugin in pm.list_name_plugin() if plugin is not None]
