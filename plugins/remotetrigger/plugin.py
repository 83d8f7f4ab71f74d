"""The Remote Trigger profile (OCPP 1.6 §5.17)."""
from __future__ import annotations

from zope.interface import implementer

from csms import ocpp16
from csms.interfaces import ICSMSPlugin


@implementer(ICSMSPlugin)
class RemoteTriggerPlugin:
    name = "remotetrigger"
    profile = ocpp16.REMOTE_TRIGGER
    inbound_actions = tuple(a for a, p in ocpp16.INBOUND.items() if p == ocpp16.REMOTE_TRIGGER)
    outbound_actions = tuple(a for a, p in ocpp16.OUTBOUND.items() if p == ocpp16.REMOTE_TRIGGER)
