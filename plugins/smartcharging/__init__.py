"""The OCPP 1.6 Smart Charging profile (OCPP 1.6 §3.13, §5.5, §5.7, §5.15), as a plugin."""
from .plugin import SmartChargingPlugin

plugin = SmartChargingPlugin
