"""Graceful shutdown: stop accepting, answer and commit what is in flight, close stations with 1001.

In the test's process (the service stopped directly, the grace on the test clock) and in a real
``twistd csms`` process stopped with SIGTERM while a StartTransaction's commit is under way.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import pytest_twisted
from sqlalchemy import create_engine, select
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from conftest import within
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from csms.testing.station import StationRefused, connect_station
from csms_plugins.core import tables as core_tables
from slow_commit_plugin import HOLDING, SlowCommit
from test_startup import DEADLINE, listening_port, run_twistd, write_config

GOING_AWAY = 1001


def start_payload(tag: str = "TAG-1") -> dict:
    return {"connectorId": 1, "idTag": tag, "meterStart": 1000, "timestamp": "2026-12-01T10:00:00Z"}


def stored_transaction_ids(database_url: str) -> set:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return set(conn.execute(select(core_tables.transactions.c.id)).scalars())
    finally:
        engine.dispose()


@implementer(ICSMSPlugin)
class Hanger:
    """Answers the vendor action ``Hang`` never; ``called`` fires when it is asked."""

    name = "hanger"
    profile = None
    inbound_actions = ()
    outbound_actions = ()
    settings = ()

    def __init__(self):
        self.called = defer.Deferred()

    @hookimpl
    def csms_handle_call(self, station, action, payload):
        if action != "Hang":
            return None
        self.called.callback(None)
        return defer.Deferred()


@pytest_twisted.ensureDeferred
async def test_stop_answers_and_commits_the_call_in_flight_then_closes_stations_with_1001(csms_factory,
                                                                                            database_url):
    slow = SlowCommit()
    csms = await csms_factory(extra_plugins=[slow])
    station = await csms.connect_booted("CP-1")
    idle = await csms.connect_booted("CP-2")
    held = defer.Deferred()
    slow.on_hold = lambda: held.callback(None)
    starting = station.call("StartTransaction", start_payload())
    await within(held)

    stopping = csms.service.stopService()
    assert not idle.closed.called and not station.closed.called
    # The idle station is not kept waiting for the other one's call.
    assert (await within(idle.closed))[1] == GOING_AWAY
    with pytest.raises(ConnectionRefusedError):  # no longer listening
        await within(TCP4ClientEndpoint(reactor, "127.0.0.1", csms.port).connect(Factory.forProtocol(Protocol)))
    assert not station.closed.called  # its call is still being handled
    # A call sent while the Central System stops is not taken: unanswered, the station sends it again later.
    late = station.call("Heartbeat", {})
    slow.release.set()
    confirmation = await within(starting)
    assert (await within(station.closed))[1:] == (GOING_AWAY, "The Central System is shutting down")
    with pytest.raises(ConnectionError):
        await within(late)
    await within(stopping)
    assert confirmation["transactionId"] in stored_transaction_ids(database_url)


@pytest_twisted.ensureDeferred
async def test_stop_abandons_what_is_left_after_the_grace_period(csms_factory):
    hanger = Hanger()
    csms = await csms_factory("[csms]\nshutdown_grace = 5\n", extra_plugins=[hanger])
    station = await csms.connect_booted("CP-1")
    hanging = station.call("Hang", {})
    await within(hanger.called)
    stopping = csms.service.stopService()
    csms.clock.advance(4.9)
    assert not stopping.called and not station.closed.called
    csms.clock.advance(0.1)
    await within(stopping)
    was_clean, code, _ = await within(station.closed)
    assert code != GOING_AWAY  # dropped, not closed: its call had not been answered
    with pytest.raises(ConnectionError):
        await within(hanging)


@implementer(ICSMSPlugin)
class SlowAdmission:
    """Takes its time over every handshake: ``asked`` fires when it is asked, ``answer`` decides."""

    name = "slowadmission"
    profile = None
    inbound_actions = ()
    outbound_actions = ()
    settings = ()

    def __init__(self):
        self.asked = defer.Deferred()
        self.answer = defer.Deferred()

    @hookimpl
    def csms_admit_station(self, request):
        self.asked.callback(None)
        return self.answer


@pytest_twisted.ensureDeferred
async def test_a_handshake_while_stopping_is_refused_503_one_admitted_meanwhile_closed_with_1001(csms_factory):
    admission = SlowAdmission()
    csms = await csms_factory(extra_plugins=[admission])
    connecting = connect_station(reactor, csms.port, "CP-LATE")
    await within(admission.asked)
    csms.service.ocpp_factory.shutting_down = True  # as once stopService has begun
    admission.answer.callback(None)
    station = await within(connecting)
    assert (await within(station.closed))[1] == GOING_AWAY
    with pytest.raises(StationRefused, match="503"):
        await within(connect_station(reactor, csms.port, "CP-NEXT"))


# -- a real twistd process -------------------------------------------------------------------------------


def install_test_plugin(tmp_path) -> str:
    """A directory for PYTHONPATH holding slow_commit_plugin as an installed distribution (entry point
    ``slowcommit``), so that ``twistd csms`` loads it like any plugin."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(os.path.join(os.path.dirname(__file__), "slow_commit_plugin.py"), site)
    dist_info = site / "csms_slowcommit_test-0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: csms-slowcommit-test\nVersion: 0\n")
    (dist_info / "entry_points.txt").write_text(
        "[csms.plugins]\nslowcommit = slow_commit_plugin:SlowCommitUntilShutdown\n")
    return str(site)


@pytest_twisted.ensureDeferred
async def test_sigterm_during_a_commit_loses_nothing_confirmed_and_exits_0(tmp_path, database_url):
    config = write_config(tmp_path, database_url, enabled="core, slowcommit", extra="""\
        [csms]
        log_format = json
        shutdown_grace = 30
        """)
    with open(config, encoding="utf-8") as f:
        text = f.read()
    with open(config, "w", encoding="utf-8") as f:
        f.write(text.replace("[ocpp]\n", "[ocpp]\ntrace_stations = CP-1\n", 1))
    site = install_test_plugin(tmp_path)
    process = run_twistd(config, str(tmp_path),
                         env={"PYTHONPATH": os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))})
    log = await process.logged("Central System ready")
    port = listening_port(log, "OCPP 1.6J endpoint")
    station = await within(connect_station(reactor, port, "CP-1"), DEADLINE)
    idle = await within(connect_station(reactor, port, "CP-2"), DEADLINE)
    await within(station.boot(), DEADLINE)
    await within(idle.boot(), DEADLINE)
    starting = station.call("StartTransaction", start_payload(), timeout=DEADLINE)
    await process.logged(HOLDING)

    process.transport.signalProcess("TERM")
    confirmation = await within(starting, DEADLINE)
    assert (await within(station.closed, DEADLINE))[1] == GOING_AWAY
    assert (await within(idle.closed, DEADLINE))[1] == GOING_AWAY
    assert await process.finished() == 0, process.stdout
    assert confirmation["transactionId"] in stored_transaction_ids(database_url)

    records = [json.loads(line) for line in process.stdout.splitlines()]  # every line is JSON
    assert process.stderr == "" and not any("Traceback" in r["message"] for r in records)
    trace = [r for r in records if r["namespace"] == "csms.trace"]
    # Traced at log_level info, for CP-1 alone; no other debug line.
    assert trace and {r["station_id"] for r in trace} == {"CP-1"}
    assert any(r.get("action") == "StartTransaction" for r in trace)
    assert {r["level"] for r in records if r["namespace"] != "csms.trace"} <= {"info", "warn", "error", "critical"}
    assert any(r["message"] == "Received SIGTERM: stopping" for r in records)
