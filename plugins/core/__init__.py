"""The OCPP 1.6 Core profile, shipped as a plugin like any other."""
from .plugin import CorePlugin

plugin = CorePlugin
