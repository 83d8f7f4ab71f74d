"""The OCPP 1.6 Local Auth List Management profile (OCPP 1.6 §3.5, §5.9, §5.14), as a plugin."""
from .plugin import LocalAuthListPlugin

plugin = LocalAuthListPlugin
