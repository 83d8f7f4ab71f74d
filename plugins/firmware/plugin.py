"""The Firmware Management profile (OCPP 1.6 §4.4, §4.5, §5.8, §5.16)."""
from __future__ import annotations

from zope.interface import implementer

from csms import ocpp16
from csms.interfaces import ICSMSPlugin


@implementer(ICSMSPlugin)
class FirmwarePlugin:
    name = "firmware"
    profile = ocpp16.FIRMWARE
    inbound_actions = tuple(a for a, p in ocpp16.INBOUND.items() if p == ocpp16.FIRMWARE)
    outbound_actions = tuple(a for a, p in ocpp16.OUTBOUND.items() if p == ocpp16.FIRMWARE)
