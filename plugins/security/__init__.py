"""The OCPP 1.6 security extension ("Improved security for OCPP 1.6-J"), as a plugin.

Security profiles 2 and 3 (TLS, client certificates), certificate management with the CSMS as a
small CA, security event notifications, signed firmware updates and log uploads. It is built only on
the public plugin surface (action declarations, the admission hook, events), as a vendor's would be.
"""
from .plugin import SecurityPlugin

plugin = SecurityPlugin
