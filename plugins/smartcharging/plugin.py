"""The Smart Charging profile (OCPP 1.6 §3.13, §5.5, §5.7, §5.15)."""
from __future__ import annotations

from zope.interface import implementer

from csms import ocpp16
from csms.interfaces import ICSMSPlugin


@implementer(ICSMSPlugin)
class SmartChargingPlugin:
    name = "smartcharging"
    profile = ocpp16.SMART_CHARGING
    inbound_actions = tuple(a for a, p in ocpp16.INBOUND.items() if p == ocpp16.SMART_CHARGING)
    outbound_actions = tuple(a for a, p in ocpp16.OUTBOUND.items() if p == ocpp16.SMART_CHARGING)
