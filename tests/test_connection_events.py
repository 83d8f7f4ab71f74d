"""A connection's end is always recorded, once, before the next connection of the station: also when
the process that held it died without closing it (``kill -9``, a power cut), when a newer connection
on another node took it over, and when the station reconnects while its close is still being written.

What integrators see of it: the station's connection events (``GET /stations/{id}/events``), the
``station.disconnected`` webhook event (written to the outbox with the record) and
``csms_on_station_disconnected``.
"""
from __future__ import annotations

import pytest
import pytest_twisted
import treq
from conftest import EventProbe, db_settled, within
from test_webhooks import ALLOW_LOOPBACK, _until, receiver, subscribe  # noqa: F401 - receiver: a fixture
from twisted.internet import defer, reactor

from csms.protocol import SHUTDOWN_REASON
from csms.stations import UNRECORDED_END
from csms.testing.processes import DEADLINE, listening_port, run_twistd, write_loopback_config
from csms.testing.station import connect_station

TOKEN = "kill-test-token-0123456789"


async def events(csms, station_id: str) -> list[tuple[str, str | None]]:
    """(event, detail) of the station's connection events, oldest first."""
    await db_settled(csms.app)
    status, body, _ = await csms.api("GET", f"/stations/{station_id}/events")
    assert status == 200, body
    return [(e["event"], e["detail"]) for e in reversed(body["items"])]


@pytest_twisted.ensureDeferred
async def test_a_connection_lost_with_the_process_is_recorded_ended_when_the_station_connects_again(
        csms_factory, receiver):
    probe = EventProbe()
    csms = await csms_factory(ALLOW_LOOPBACK, extra_plugins=[probe])
    await subscribe(csms, receiver.url, ["station.connected", "station.disconnected"])
    store = csms.app.station_store
    # What a process killed while the station was connected leaves behind: its start, no end.
    await store.create("CP-KILLED")
    await store.record_connected("CP-KILLED", "tcp4:127.0.0.1:40000")
    csms.clock.advance(5)
    station = await csms.connect("CP-KILLED")
    # Told as the end of that connection, before the new one.
    assert await within(probe.next("disconnected", "CP-KILLED")) == UNRECORDED_END
    await within(probe.next("connected", "CP-KILLED"))
    assert await events(csms, "CP-KILLED") == [("connected", None), ("disconnected", UNRECORDED_END),
                                                ("connected", None)]
    await within(_until(lambda: len(receiver.requests) >= 3, csms))
    # Delivered concurrently, in no promised order.
    assert sorted((e["type"], e["data"].get("reason")) for e in receiver.events()) == [
        ("station.connected", None), ("station.connected", None), ("station.disconnected", UNRECORDED_END)]

    # A connection that closes is recorded ended: the next one finds nothing lost.
    await station.close()
    assert (await within(probe.next("disconnected", "CP-KILLED"))).startswith("closed by the station")
    csms.clock.advance(5)
    await csms.connect("CP-KILLED")
    await within(probe.next("connected", "CP-KILLED"))
    recorded = await events(csms, "CP-KILLED")
    assert [event for event, _ in recorded[3:]] == ["disconnected", "connected"], recorded
    assert [detail for _, detail in recorded].count(UNRECORDED_END) == 1
    assert probe.unclaimed("disconnected", "CP-KILLED") == 0


@pytest_twisted.ensureDeferred
async def test_a_station_reconnecting_while_its_close_is_written_keeps_its_events_in_order(csms_factory):
    """The close of the old connection and the new connection, back to back: the new one is recorded
    after the old one's end (never taken for lost, never before it)."""
    probe = EventProbe()
    csms = await csms_factory(extra_plugins=[probe])
    first = await csms.connect("CP-QUICK")
    await within(probe.next("connected", "CP-QUICK"))
    recording = defer.Deferred()
    original = csms.app.station_store.record_event

    def held_back(*args, **kwargs):
        # The end is written only once the new connection has been opened (a slow commit).
        return recording.addCallback(lambda _: original(*args, **kwargs))
    csms.app.station_store.record_event = held_back
    await first.close()
    second = within(csms.connect("CP-QUICK", settled=False))
    csms.app.station_store.record_event = original
    await second
    recording.callback(None)
    assert await within(probe.next("disconnected", "CP-QUICK")) != UNRECORDED_END
    await within(probe.next("connected", "CP-QUICK"))
    assert [event for event, _ in await events(csms, "CP-QUICK")] == ["connected", "disconnected", "connected"]


def _config(tmp_path, database_url: str) -> str:
    return write_loopback_config(tmp_path, database_url, TOKEN)


async def _started(config: str, cwd: str):
    process = run_twistd(config, cwd)
    log = await process.logged("Central System ready")
    return process, listening_port(log, "OCPP 1.6J endpoint"), listening_port(log, "Operator API")


@pytest.mark.parametrize("signal, how_it_ended", [
    ("KILL", UNRECORDED_END),
    # A graceful stop closes the connection (1001) and records it before the process ends.
    ("TERM", f"closed by the Central System: code=1001 reason={SHUTDOWN_REASON}"),
])
@pytest_twisted.ensureDeferred
async def test_a_stop_while_a_station_is_connected_then_a_restart(tmp_path, database_url, signal, how_it_ended):
    """Real ``twistd csms`` processes: the first is stopped (SIGKILL, or SIGTERM) while the station is
    connected; the station connects to the next one."""
    config = _config(tmp_path, database_url)
    process, ocpp, _ = await _started(config, str(tmp_path))
    station = await connect_station(reactor, ocpp, "CP-STOP")
    await within(station.call("BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"}))
    process.signal(signal)
    assert await process.finished() == (-9 if signal == "KILL" else 0), process.stdout
    await within(station.closed)

    process, ocpp, api = await _started(config, str(tmp_path))
    try:
        station = await connect_station(reactor, ocpp, "CP-STOP")
        await within(station.call("Heartbeat", {}))  # answered: the new connection is recorded by now
        response = await treq.get(f"http://127.0.0.1:{api}/api/v1/stations/CP-STOP/events",
                                  headers={"Authorization": f"Bearer {TOKEN}"}, reactor=reactor).addTimeout(
            DEADLINE, reactor)
        body = await treq.json_content(response)
        assert response.code == 200, body
        assert [(e["event"], e["detail"]) for e in reversed(body["items"])] == [
            ("connected", None), ("disconnected", how_it_ended), ("connected", None)]
        await station.close()
    finally:
        assert await process.stop() == 0, process.stdout
