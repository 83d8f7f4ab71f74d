"""The OCPP 1.6 Firmware Management profile (OCPP 1.6 §4.4, §4.5, §5.8, §5.16), as a plugin."""
from .plugin import FirmwarePlugin

plugin = FirmwarePlugin
