"""The OCPP 1.6 Reservation profile (OCPP 1.6 §3.12, §5.3, §5.13), as a plugin."""
from .plugin import ReservationPlugin

plugin = ReservationPlugin
