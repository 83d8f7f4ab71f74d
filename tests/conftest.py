"""Fixtures come from csms.testing (registered as a pytest plugin); helpers shared by the tests live here."""

import pytest


class PythonOperator:
    """Drives CSMS-initiated calls through the Python API (``CentralSystem.call``)."""

    kind = "python"

    def __init__(self, csms):
        self.csms = csms

    def call(self, station_id: str, action: str, payload: dict):
        return self.csms.app.call(station_id, action, payload)


@pytest.fixture
def operator(csms):
    """How a test plays the operator: ``await operator.call(station_id, action, payload)``."""
    return PythonOperator(csms)


def core_store(csms):
    """The Core plugin's store of a running CSMS (for test set-up such as id tags)."""
    return csms.app.pm.get_plugin("core").store
