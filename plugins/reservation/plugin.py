"""The Reservation profile (OCPP 1.6 §3.12, §5.3, §5.13)."""
from __future__ import annotations

from zope.interface import implementer

from csms import ocpp16
from csms.interfaces import ICSMSPlugin


@implementer(ICSMSPlugin)
class ReservationPlugin:
    name = "reservation"
    profile = ocpp16.RESERVATION
    inbound_actions = tuple(a for a, p in ocpp16.INBOUND.items() if p == ocpp16.RESERVATION)
    outbound_actions = tuple(a for a, p in ocpp16.OUTBOUND.items() if p == ocpp16.RESERVATION)
