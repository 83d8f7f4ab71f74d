"""Fixtures come from csms.testing (registered as a pytest plugin); helpers shared by the tests live here."""

from collections import defaultdict, deque

import pytest
from zope.interface import implementer

from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin


def error_of(body) -> str:
    """The code of the operator API's JSON error body, checking its shape on the way."""
    assert set(body) == {"error"}, body
    assert {"status", "code", "message"} <= set(body["error"]), body
    return body["error"]["code"]


class PythonOperator:
    """Drives CSMS-initiated calls through the Python API (``CentralSystem.call``)."""

    kind = "python"

    def __init__(self, csms):
        self.csms = csms

    def call(self, station_id: str, action: str, payload: dict):
        return self.csms.app.call(station_id, action, payload)


class HttpOperatorError(Exception):
    """The operator API answered a call with something other than 200 (``status``, JSON ``error`` body)."""

    def __init__(self, status: int, error: dict | None):
        super().__init__(f"HTTP {status}: {error}")
        self.status = status
        self.error = error or {}


class HttpOperator:
    """Drives CSMS-initiated calls through the operator HTTP API (``POST /stations/{id}/calls/{action}``).

    Same interface as :class:`PythonOperator`. A non-200 answer raises the exception the Python API
    raises for the same outcome (so a test expecting e.g. CallErrorReceived works with both), or
    :class:`HttpOperatorError` for anything else.
    """

    kind = "http"

    def __init__(self, csms):
        self.csms = csms

    async def call(self, station_id: str, action: str, payload: dict):
        from urllib.parse import quote

        from csms.app import ActionUnavailable
        from csms.rpc import CallErrorReceived, CallTimeout, RequestInvalid, ResponseInvalid, StationOffline

        status, body, _ = await self.csms.api("POST", f"/stations/{quote(station_id, safe='')}/calls/{action}",
                                              json=payload)
        if status == 200:
            return body
        error = (body or {}).get("error") or {}
        details = error.get("details") or {}
        code = error.get("code")
        if code == "station_call_error":
            raise CallErrorReceived(details.get("code"), details.get("description", ""), details.get("details"))
        if code == "station_invalid_response":
            raise ResponseInvalid(action, details.get("code"), error.get("message", ""), details.get("response"))
        if code == "station_timeout":
            raise CallTimeout(error.get("message"))
        if code == "station_offline":
            raise StationOffline(error.get("message"))
        if code == "invalid_ocpp_payload":
            raise RequestInvalid(action, details.get("ocpp_error_code"), error.get("message", ""))
        if code == "action_unavailable":
            raise ActionUnavailable(error.get("message"))
        if status == 422 and code != "validation_failed":
            from csms.app import CallRefused  # a csms_before_call listener said no

            raise CallRefused(error.get("message", ""), code, details)
        raise HttpOperatorError(status, error)


@pytest.fixture(params=["python", "http"], ids=["python", "http"])
def operator(request, csms):
    """How a test plays the operator: ``await operator.call(station_id, action, payload)``.

    Every test using it runs twice: through the Python API and through the operator HTTP API.
    """
    return {"python": PythonOperator, "http": HttpOperator}[request.param](csms)


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



@implementer(ICSMSPlugin)
class EventProbe:
    """A test plugin (``extra_plugins=[EventProbe()]``) turning connection events into Deferreds to wait on."""

    name = "probe"
    profile = None
    inbound_actions = ()
    outbound_actions = ()

    def __init__(self):
        self._seen = defaultdict(deque)
        self._waiters = defaultdict(deque)

    def _record(self, key, value):
        if self._waiters[key]:
            self._waiters[key].popleft().callback(value)
        else:
            self._seen[key].append(value)

    def next(self, event: str, station_id: str, timeout: float = 5):
        """Fires with the next ``event`` ('connected': the session, 'disconnected': the reason) of a station."""
        from twisted.internet import defer, reactor

        key = (event, station_id)
        if self._seen[key]:
            return defer.succeed(self._seen[key].popleft())
        d = defer.Deferred()
        self._waiters[key].append(d)
        return d.addTimeout(timeout, reactor)

    def unclaimed(self, event: str, station_id: str) -> int:
        """How many ``event``s of ``station_id`` happened that no :meth:`next` has taken yet."""
        return len(self._seen[(event, station_id)])

    @hookimpl
    def csms_on_station_connected(self, station):
        self._record(("connected", station.station_id), station)

    @hookimpl
    def csms_on_station_disconnected(self, station_id, reason):
        self._record(("disconnected", station_id), reason)


def pytest_collection_modifyitems(config, items):
    """A test marked ``postgresql_only`` exists for PostgreSQL alone: its SQLite variant is deselected
    (not skipped: there is nothing on SQLite for it to check)."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.get_closest_marker("postgresql_only") and params.get("database_url") == "sqlite":
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# -- helpers shared by the profile tests ---------------------------------------------------------------

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
    """Reusable state Booted: BootNotification (Accepted), then Available for connector 0 and each connector."""
    station = await csms.connect(station_id)
    response = await station.call("BootNotification", {"chargePointVendor": "OCTT", "chargePointModel": "OCTT-CP"})
    assert response["status"] == "Accepted"
    for connector_id in range(connectors + 1):
        assert await station.status(connector_id, "Available") == {}
    return station
