"""Test support for the CSMS and its plugins: pytest fixtures, a scriptable OCPP-J test station, helpers.

Installed with ``pip install 'csms[test]'``, the ``csms.testing.pytest_plugin`` module is registered as
a pytest plugin (``pytest11`` entry point): every test in the environment gets the fixtures the
project's own tests use (``csms``, ``csms_factory``, ``database_url``, ``operator``). The helpers are
imported from here; docs/testing.md is the guide.

The names below are imported on first use, so that loading the pytest plugin into an unrelated
project's test run costs nothing and needs none of the test extras.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "EventProbe": "csms.testing.probe",
    "HttpOperator": "csms.testing.operators",
    "HttpOperatorError": "csms.testing.operators",
    "PythonOperator": "csms.testing.operators",
    "TIMEOUT": "csms.testing.helpers",
    "as_stored": "csms.testing.helpers",
    "booted": "csms.testing.helpers",
    "clock_now": "csms.testing.helpers",
    "db_settled": "csms.testing.helpers",
    "station_time": "csms.testing.helpers",
    "table_contents": "csms.testing.helpers",
    "within": "csms.testing.helpers",
    "CallErrorFrame": "csms.testing.station",
    "StationRefused": "csms.testing.station",
    "TestStationProtocol": "csms.testing.station",
    "RunningCSMS": "csms.testing.pytest_plugin",
    "TEST_API_TOKEN": "csms.testing.pytest_plugin",
    "untyped_operations": "csms.api.contract",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
