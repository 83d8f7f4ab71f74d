"""Fixtures and helpers come from csms.testing (registered as a pytest plugin); project-specific bits live here.

The helpers are re-exported so that tests keep importing them from here (``from conftest import within``).
"""

from csms.testing import (TIMEOUT, EventProbe, HttpOperator, HttpOperatorError, PythonOperator, as_stored,  # noqa: F401
                          booted, clock_now, db_settled, station_time, table_contents, within)

# docs/testing.md's examples run in a pytester sandbox (tests/test_testing_kit.py).
pytest_plugins = ["pytester"]


def core_store(csms):
    """The Core plugin's store of a running CSMS (for test set-up such as id tags)."""
    return csms.app.pm.get_plugin("core").store


def error_of(body) -> str:
    """The code of the operator API's JSON error body, checking its shape on the way."""
    assert set(body) == {"error"}, body
    assert {"status", "code", "message"} <= set(body["error"]), body
    return body["error"]["code"]
