"""The catalogue of OCPP actions: OCPP 1.6's own, and those plugins add (security extension, vendor).

A plugin lists the actions it answers in ``inbound_actions`` and those it offers operators in
``outbound_actions``. An action OCPP 1.6 does not define is *added* by the plugin: its schemas come from
the plugin's ``action_schemas`` (``{action: {"request": schema, "response": schema}}``, each schema a
dict or a JSON file path), or else from the ``ocpp`` package, which ships the OCPP 1.6 security
extension's. They are compiled when the Central System is built; a missing or broken one is a
:class:`csms.plugins.PluginError` at start-up.

Installed plugins that are not enabled are read too (not registered): an action one of them adds is
answered NotSupported, naming that plugin, rather than NotImplemented.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from twisted.logger import Logger

from csms import ocpp16
from csms.plugins import PluginError, available_plugins
from csms.schemas import SchemaRegistry

log = Logger(namespace="csms.actions")


def added_inbound(plugin) -> tuple[str, ...]:
    """The CP->CS actions ``plugin`` answers that OCPP 1.6 does not define."""
    return tuple(a for a in getattr(plugin, "inbound_actions", ()) if a not in ocpp16.INBOUND)


def added_outbound(plugin) -> tuple[str, ...]:
    """The CSMS-initiated actions ``plugin`` offers that OCPP 1.6 does not define."""
    return tuple(a for a in getattr(plugin, "outbound_actions", ()) if a not in ocpp16.OUTBOUND)


@dataclass
class ActionCatalogue:
    """Who provides each action. ``inbound`` / ``outbound``: action -> enabled plugin name (OCPP 1.6's
    own actions too); ``disabled_inbound`` / ``disabled_outbound``: action an installed but not enabled
    plugin adds -> that plugin's name; ``schemas``: the registry knowing every enabled plugin's schemas."""

    schemas: SchemaRegistry
    inbound: dict = field(default_factory=dict)
    outbound: dict = field(default_factory=dict)
    disabled_inbound: dict = field(default_factory=dict)
    disabled_outbound: dict = field(default_factory=dict)

    def added_inbound(self) -> dict:
        """Enabled plugins' added CP->CS actions -> their plugin's name."""
        return {action: name for action, name in self.inbound.items() if action not in ocpp16.INBOUND}


def build_catalogue(plugins: list, base: SchemaRegistry, enabled: list = (), blocked: list = ()) -> ActionCatalogue:
    """The catalogue of the loaded ``plugins``, their schemas registered on an extension of ``base``."""
    catalogue = ActionCatalogue(schemas=base.extended())
    sources: dict = {}
    for plugin in plugins:
        for action in plugin.inbound_actions:
            catalogue.inbound[action] = plugin.name
        for action in plugin.outbound_actions:
            catalogue.outbound[action] = plugin.name
        _register_schemas(plugin, catalogue.schemas, sources)
    for name, plugin in disabled_plugins(enabled, blocked):
        for action in added_inbound(plugin):
            catalogue.disabled_inbound.setdefault(action, name)
        for action in added_outbound(plugin):
            catalogue.disabled_outbound.setdefault(action, name)
    return catalogue


def _register_schemas(plugin, registry: SchemaRegistry, sources: dict) -> None:
    declared = getattr(plugin, "action_schemas", None) or {}
    if not isinstance(declared, Mapping):
        raise PluginError(f"plugin {plugin.name!r}: action_schemas must map action names to "
                          '{"request": schema, "response": schema}')
    added = set(added_inbound(plugin)) | set(added_outbound(plugin))
    strays = sorted(set(declared) - added)
    if strays:
        raise PluginError(f"plugin {plugin.name!r} has action_schemas for actions it neither answers nor "
                          f"offers, or that OCPP 1.6 defines: {strays}")
    for action in sorted(added):
        source = declared.get(action)
        if source is None:
            if not registry.has_request(action):
                raise PluginError(f"plugin {plugin.name!r} adds {action} without a schema: give it one in "
                                  "action_schemas (the ocpp package has none of that name)")
            continue
        if not isinstance(source, Mapping) or set(source) != {"request", "response"}:
            raise PluginError(f"plugin {plugin.name!r}: action_schemas[{action!r}] must be "
                              '{"request": schema, "response": schema}')
        owner = sources.get(action)
        if owner is not None and owner[1] != source:
            raise PluginError(f"plugins {owner[0]!r} and {plugin.name!r} give {action} different schemas")
        try:
            registry.register(action, source["request"], source["response"])
        except (OSError, ValueError, TypeError) as exc:
            raise PluginError(f"plugin {plugin.name!r}: {action}: {exc}") from None
        sources[action] = (plugin.name, source)


def disabled_plugins(enabled, blocked) -> list:
    """(entry point name, plugin) of the installed plugins neither enabled nor blocked, loaded to read their declarations (never
    registered). One that fails to load is logged and left out: it must not stop the Central System."""
    out = []
    for name, entry_point in sorted(available_plugins().items()):
        if name in enabled or name in blocked:
            continue
        try:
            obj = entry_point.load()
            plugin = obj() if isinstance(obj, type) else obj
            tuple(plugin.inbound_actions), tuple(plugin.outbound_actions)
        except Exception as exc:  # noqa: BLE001 - a broken disabled plugin is not this Central System's problem
            log.warn("Installed plugin {plugin} (not enabled) could not be read: {error}", plugin=name, error=exc)
            continue
        out.append((name, plugin))
    return out
