"""Waiting, time and database helpers for tests of the CSMS and its plugins.

Nothing here imports the reactor at import time: pytest-twisted installs the reactor it is asked for
when pytest starts, after this module has been imported by the ``csms.testing`` pytest plugin.
"""
from __future__ import annotations

#: How long :func:`within` waits by default, in seconds of real time.
TIMEOUT = 10


def within(result, seconds: float = TIMEOUT):
    """A Deferred (or coroutine) that fails with TimeoutError unless it fires within ``seconds``."""
    from twisted.internet import defer, reactor

    return defer.ensureDeferred(result).addTimeout(seconds, reactor)


def clock_now(csms):
    """The running CSMS's time (its task.Clock) as an aware UTC datetime."""
    from csms.ocpp16 import utc_from_timestamp

    return utc_from_timestamp(csms.clock.seconds())


def station_time(moment) -> str:
    """A timestamp as a charge point writes it (UTC, milliseconds, Z): the CSMS's own format."""
    from csms.ocpp16 import format_datetime

    return format_datetime(moment)


def as_stored(moment):
    """``moment`` at the millisecond precision a station sends."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


async def booted(csms, station_id: str, connectors: int = 1):
    """Reusable state Booted (OCTT): BootNotification (Accepted), then Available for connector 0 and each
    connector, each answered as expected; returns the connected test station."""
    station = await csms.connect(station_id)
    response = await station.call("BootNotification", {"chargePointVendor": "OCTT", "chargePointModel": "OCTT-CP"})
    assert response["status"] == "Accepted", response
    for connector_id in range(connectors + 1):
        assert await station.status(connector_id, "Available") == {}
    return station


def table_contents(csms, exclude=("csms_connection_events", "csms_audit")):
    """Fires with {table name: sorted rows} for every table of the running CSMS's enabled plugins.

    Connection events and the API's audit trail are left out by default: they are logs, written on
    every connect and every change request (refused ones too).
    """
    from sqlalchemy import select

    tables = [table for metadata in csms.app.all_metadata() for table in metadata.sorted_tables
              if table.name not in exclude]

    def thd(conn):
        return {table.name: sorted((tuple(row) for row in conn.execute(select(table))), key=repr)
                for table in tables}
    return csms.app.db.run(thd, desc="test_table_contents")


def db_settled(app):
    """Fires once every database job queued before this call has finished.

    Some writes (connection events) are fire-and-forget. Occupying every thread of the database pool
    at the same moment proves that each job queued earlier has completed: the pool hands out jobs in
    order, and a thread only takes a new job after finishing its last.
    """
    import threading

    from twisted.internet import defer, threads

    pool = app.db.pool
    barrier = threading.Barrier(pool.max)
    return defer.gatherResults([threads.deferToThreadPool(app.reactor, pool, barrier.wait, 10)
                                for _ in range(pool.max)])
