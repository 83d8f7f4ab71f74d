"""ACME's CSMS plugin: a worked example of a vendor plugin (see the CSMS's docs/hooks.md, "Worked example").

ACME stations are modular. After booting, each sends ``AcmeHello`` (its serial number and how many
power modules it has), which the plugin records in its table ``acmehub_hellos``. Operators reboot one
module with ``POST /api/v1/acmehub/stations/{station_id}/reboot`` (the vendor's ``AcmeReboot``) and read
what the stations said with ``GET /api/v1/acmehub/stations/{station_id}/hellos``. When an operator deletes
a station, the plugin forgets its hellos (the ``csms_on_station_deleted`` event).
"""
from acme_csms.plugin import AcmePlugin

__all__ = ["AcmePlugin"]
