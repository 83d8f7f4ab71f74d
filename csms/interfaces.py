"""What a plugin provides, as a zope.interface checked when the plugin loads."""
from zope.interface import Attribute, Interface


class ICSMSPlugin(Interface):
    """A Central System plugin: one OCPP feature profile, or a vendor's extension.

    Its hook implementations are methods decorated with :data:`csms.hookspecs.hookimpl`. It declares
    the settings of its ``[plugin:NAME]`` section in a ``settings`` attribute, a sequence of
    :class:`csms.config.Setting` (``()`` for none). That attribute is not part of the interface, so
    that plugins written before it keep loading; their sections are then not checked.

    An OCPP action belongs to one plugin: two enabled plugins that both answer it (list it in
    ``inbound_actions`` or implement its ``csms_handle_*`` hook) or both offer it (``outbound_actions``)
    are refused at load, unless each lists it in an optional ``shared_actions`` attribute (e.g.
    ``("DataTransfer",)``, where each vendor answers its own vendorId and returns None for the others).
    """

    name = Attribute("Short name used in config (``[plugins] enabled``) and as its table prefix")
    profile = Attribute("The OCPP 1.6 feature profile it implements (see csms.ocpp16.PROFILES), or None")
    inbound_actions = Attribute("OCPP actions (CP->CS) this plugin answers")
    outbound_actions = Attribute("CSMS-initiated OCPP actions this plugin makes available to operators")
