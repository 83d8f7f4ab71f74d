"""The built-in OCPP 1.6 feature profiles, one package each (installed as ``csms_plugins``)."""
