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


def table_contents(csms, exclude=("csms_connection_events",)):
    """Fires with {table name: sorted rows} for every table of the running CSMS's enabled plugins.

    Connection events are left out by default: they are an audit log, written on every connect.
    """
    from sqlalchemy import select

    tables = [table for metadata in csms.app.all_metadata() for table in metadata.sorted_tables
              if table.name not in exclude]

    def thd(conn):
        return {table.name: sorted((tuple(row) for row in conn.execute(select(table))), key=repr)
                for table in tables}
    return csms.app.db.run(thd, desc="test_table_contents")
