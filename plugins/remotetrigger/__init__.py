"""The OCPP 1.6 Remote Trigger profile (OCPP 1.6 §5.17), as a plugin."""
from .plugin import RemoteTriggerPlugin

plugin = RemoteTriggerPlugin
