"""The Local Auth List Management profile (OCPP 1.6 §3.5, §5.9, §5.14)."""
from __future__ import annotations

from zope.interface import implementer

from csms import ocpp16
from csms.interfaces import ICSMSPlugin


@implementer(ICSMSPlugin)
class LocalAuthListPlugin:
    name = "localauth"
    profile = ocpp16.LOCAL_AUTH
    inbound_actions = tuple(a for a, p in ocpp16.INBOUND.items() if p == ocpp16.LOCAL_AUTH)
    outbound_actions = tuple(a for a, p in ocpp16.OUTBOUND.items() if p == ocpp16.LOCAL_AUTH)
