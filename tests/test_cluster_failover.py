"""Three real ``twistd csms`` nodes on one PostgreSQL behind a real HAProxy (etc/haproxy.cfg): a node
killed with SIGKILL while its stations charge (issue 16, "Failover").

Stations connect through HAProxy only, as in production: the ``ocpp`` package's v16 ChargePoint and
light test stations. Each station reconnects by itself when its connection drops (bounded), to
whichever node HAProxy gives it. What must hold: every station is served again by a surviving node;
a transaction started on the dead node is closed by its StopTransaction; every MeterValues a station
saw confirmed before the kill is in the database; an API call sent during the failover gets a clear
answer (never a hang).
"""
from __future__ import annotations

import asyncio
import subprocess
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
import pytest_twisted
import treq
from ocpp.v16 import call
from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectError
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from csms.testing.asyncio_thread import AsyncioThread
from csms.testing.cluster import (TEMPLATE, TOKEN, Cluster, cluster_settings, haproxy_binary, haproxy_config, pids)
from csms.testing.station import StationRefused, connect_station
from test_interop_ocpp import LibraryChargePoint

#: Seconds a station keeps trying to reconnect, and a failover may take, on a loaded CI machine.
RECONNECT_DEADLINE = 60
#: An API call during the failover must be answered within the station response timeout plus this.
API_DEADLINE = 45
TAG = "FAILOVER-TAG"
#: The nodes' lease in this test, seconds.
LEASE = 5
CLEAR_ANSWERS = {200, 409, 502, 503, 504}


def test_haproxy_is_installed():
    """The cluster tests need HAProxy (Debian's package; .ci/run installs it): missing, they fail, not skip."""
    assert haproxy_binary() is not None, "install haproxy (apt-get install haproxy)"


def haproxy_check(path) -> subprocess.CompletedProcess:
    return subprocess.run([haproxy_binary(), "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)


def test_shipped_haproxy_config_is_valid():
    checked = haproxy_check(TEMPLATE)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_generated_haproxy_config_is_the_template_with_other_addresses(tmp_path):
    from csms.testing.cluster import Node

    nodes = [Node(f"node{i}", "", "", ocpp_port=20000 + i, api_port=21000 + i) for i in (1, 2)]
    generated = haproxy_config(open(TEMPLATE).read(), 19000, 19001, nodes)
    path = tmp_path / "haproxy.cfg"
    path.write_text(generated)
    checked = haproxy_check(path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    lines = [line.strip() for line in generated.splitlines()]
    assert "bind 127.0.0.1:19000" in lines and "bind 127.0.0.1:19001" in lines
    assert "server node1 127.0.0.1:20001 port 21001" in lines and "server node2 127.0.0.1:21002 cookie node2" in lines
    assert not any(":900" in line or ":808" in line for line in lines if not line.startswith("#"))
    # What makes it WebSocket-aware and healthy is the template's, kept as is.
    for kept in ("timeout tunnel 1h", "option httpchk GET /readyz", "balance leastconn", "option redispatch",
                 "option http-server-close"):
        assert kept in lines


class ReconnectingStation:
    """A light test station that reconnects through HAProxy by itself and sends again a call whose
    answer it never got (what a charge point does after losing its connection)."""

    def __init__(self, cluster: Cluster, station_id: str):
        self.cluster = cluster
        self.station_id = station_id
        self.protocol = None
        self.connections = 0

    async def connect(self) -> None:
        deadline = reactor.seconds() + RECONNECT_DEADLINE
        while True:
            try:
                self.protocol = await connect_station(reactor, self.cluster.ocpp_port, self.station_id, timeout=5)
                self.connections += 1
                assert self.protocol.subprotocol == "ocpp1.6"  # HAProxy passed Sec-WebSocket-Protocol through
                return
            except (StationRefused, ConnectError, ConnectionError, defer.TimeoutError):
                if reactor.seconds() > deadline:
                    raise
            await task.deferLater(reactor, 0.2, lambda: None)  # a station's back-off between attempts

    async def call(self, action: str, payload: dict) -> dict:
        deadline = reactor.seconds() + RECONNECT_DEADLINE
        while True:
            if self.protocol is None or self.protocol.closed.called:
                await self.connect()
            try:
                return await self.protocol.call(action, payload, timeout=10)
            except (ConnectionError, defer.TimeoutError):
                self.protocol = None
                if reactor.seconds() > deadline:
                    raise

    async def close(self) -> None:
        if self.protocol is not None:
            await self.protocol.close().addTimeout(10, reactor)


class ReconnectingLibraryStation:
    """The ``ocpp`` package's ChargePoint on its own asyncio loop, reconnecting the same way."""

    def __init__(self, runner: AsyncioThread, cluster: Cluster, station_id: str):
        self.runner = runner
        self.url = f"{cluster.ocpp_url}{station_id}"
        self.station_id = station_id
        self.websocket = None
        self.serving = None
        self.connections = 0

    async def _connect(self) -> None:
        deadline = asyncio.get_running_loop().time() + RECONNECT_DEADLINE
        while True:
            try:
                self.websocket = await connect(self.url, subprotocols=["ocpp1.6"], open_timeout=5, close_timeout=5)
                assert self.websocket.subprotocol == "ocpp1.6"
                break
            except (OSError, InvalidHandshake, asyncio.TimeoutError):
                if asyncio.get_running_loop().time() > deadline:
                    raise
            await asyncio.sleep(0.2)  # a station's back-off between attempts
        self.connections += 1
        cp = LibraryChargePoint(self.station_id, self.websocket)
        self.cp = cp
        self.serving = asyncio.ensure_future(cp.start())

    async def _call(self, request):
        deadline = asyncio.get_running_loop().time() + RECONNECT_DEADLINE
        while True:
            if self.websocket is None or self.serving.done():
                await self._connect()
            try:
                return await self.cp.call(request, suppress=False)
            except (ConnectionClosed, asyncio.TimeoutError):
                self.websocket = None
                if asyncio.get_running_loop().time() > deadline:
                    raise

    def call(self, request) -> defer.Deferred:
        return self.runner.run(self._call(request), timeout=RECONNECT_DEADLINE + 15)

    async def _close(self):
        if self.serving is not None:
            self.serving.cancel()
        if self.websocket is not None:
            await self.websocket.close()

    def close(self) -> defer.Deferred:
        return self.runner.run(self._close())


def timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def meter_values(transaction_id: int, wh: int) -> dict:
    # A sample is told apart from another by its time, not its value (core_meter_values_sample): each
    # reading gets a time of its own, so that two quick readings are two samples.
    taken = (datetime(2026, 12, 1, tzinfo=timezone.utc) + timedelta(seconds=wh)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"connectorId": 1, "transactionId": transaction_id, "meterValue": [{"timestamp": taken, "sampledValue": [
        {"value": str(wh), "measurand": "Energy.Active.Import.Register", "unit": "Wh"}]}]}


class Session:
    """One station's charging session as the station saw it confirmed."""

    def __init__(self, station):
        self.station = station
        self.transaction_id = None
        self.confirmed_wh: list[int] = []
        self.wh = 1000

    async def send(self, action: str, payload: dict) -> dict:
        if isinstance(self.station, ReconnectingLibraryStation):
            request = {
                "BootNotification": lambda p: call.BootNotification(charge_point_model="LibModel",
                                                                    charge_point_vendor="LibVendor"),
                "StartTransaction": lambda p: call.StartTransaction(connector_id=1, id_tag=TAG,
                                                                    meter_start=p["meterStart"], timestamp=p["timestamp"]),
                "MeterValues": lambda p: call.MeterValues(connector_id=1, transaction_id=p["transactionId"],
                                                          meter_value=p["meterValue"]),
                "StopTransaction": lambda p: call.StopTransaction(transaction_id=p["transactionId"],
                                                                  meter_stop=p["meterStop"], timestamp=p["timestamp"],
                                                                  id_tag=TAG, reason="Local"),
            }[action](payload)
            result = await self.station.call(request)
            return {"transactionId": getattr(result, "transaction_id", None),
                    "status": getattr(result, "status", None)}
        return await self.station.call(action, payload)

    async def start(self) -> None:
        booted = await self.send("BootNotification", {"chargePointVendor": "Test", "chargePointModel": "Light"})
        assert booted["status"] == "Accepted"
        started = await self.send("StartTransaction", {"connectorId": 1, "idTag": TAG, "meterStart": self.wh,
                                                       "timestamp": timestamp()})
        self.transaction_id = started["transactionId"]
        await self.meter()
        await self.meter()

    async def meter(self) -> None:
        self.wh += 250
        await self.send("MeterValues", meter_values(self.transaction_id, self.wh))
        self.confirmed_wh.append(self.wh)

    async def stop(self) -> None:
        await self.send("StopTransaction", {"transactionId": self.transaction_id, "meterStop": self.wh,
                                            "timestamp": timestamp(), "idTag": TAG, "reason": "Local"})


async def node_reported_gone(cluster: Cluster, victim) -> None:
    """GET /nodes on a survivor lists the killed node as not alive once its lease ran out, with no station."""
    deadline = reactor.seconds() + RECONNECT_DEADLINE
    while True:
        code, body = await cluster.api("GET", "/nodes", node=cluster.alive_nodes()[0])
        assert code == 200, body
        listed = {node["name"]: node for node in body["items"]}
        gone = listed.get(victim.name)
        if gone is None or (not gone["alive"] and gone["stations"] == 0):
            assert sum(node["stations"] for node in listed.values()) == 6, listed
            return
        assert reactor.seconds() < deadline, f"{victim.name} still listed alive: {listed}"
        await task.deferLater(reactor, 0.5, lambda: None)  # another process's lease: nothing to wait on here


async def api_during_failover(cluster: Cluster, station_id: str):
    """An operator call for a station while its node is dead: a clear status within the deadline."""
    started = reactor.seconds()
    code, body = await cluster.api("POST", f"/stations/{station_id}/calls/GetConfiguration", json={},
                                   timeout=API_DEADLINE)
    return code, body, reactor.seconds() - started


@pytest.fixture
def asyncio_thread():
    runner = AsyncioThread()
    yield runner
    runner.stop()


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_killed_node_stations_reconnect_elsewhere_and_lose_nothing_confirmed(tmp_path, database_url,
                                                                                    asyncio_thread):
    # A short lease, so the dead node is declared gone within the test (the default is 15 s).
    cluster = Cluster(tmp_path, database_url, nodes=3,
                      extra_config=cluster_settings(f"lease_seconds = {LEASE}\nheartbeat_seconds = 1\n"))
    stations = []
    try:
        await cluster.start()
        assert (await cluster.api("POST", "/id-tags", json={"id_tag": TAG}))[0] == 201
        stations = [ReconnectingLibraryStation(asyncio_thread, cluster, "CP-LIB")]
        stations += [ReconnectingStation(cluster, f"CP-{i}") for i in range(1, 6)]
        sessions = {s.station_id: Session(s) for s in stations}
        for session in sessions.values():  # one at a time: leastconn spreads them over the three nodes
            await session.start()
        holders = {sid: await cluster.holder(sid) for sid in sessions}
        assert all(holders.values()), holders
        # leastconn spreads them (all three nodes unless one was slow to pass a health check)
        assert len({n.name for n in holders.values()}) >= 2, holders
        victim = holders["CP-LIB"]
        moved = [sid for sid, node in holders.items() if node is victim]
        stayed = [sid for sid in sessions if sid not in moved]

        assert await cluster.kill(victim) == -9
        during = [defer.ensureDeferred(api_during_failover(cluster, sid)) for sid in moved]

        # Each station notices (the library's on its own loop), reconnects through HAProxy, and goes on.
        for sid in sessions:
            await sessions[sid].meter()
        for sid in moved:
            new_holder = await cluster.holder(sid)
            assert new_holder is not None and new_holder is not victim and new_holder.alive, (sid, new_holder)
        for sid in stayed:
            assert await cluster.holder(sid) is holders[sid]  # the others were not disturbed
            assert sessions[sid].station.connections == 1
        for sid in moved:
            assert sessions[sid].station.connections == 2
        # Every surviving node reaches every station, wherever it is now (forwarded or local).
        for sid in sessions:
            for node in cluster.alive_nodes():
                code, body = await cluster.api("POST", f"/stations/{sid}/calls/GetConfiguration", json={},
                                               node=node, timeout=API_DEADLINE)
                assert code == 200, (sid, node.name, code, body)
        await node_reported_gone(cluster, victim)
        for session in sessions.values():
            await session.stop()

        for code, body, seconds in await defer.gatherResults(during):
            assert code in CLEAR_ANSWERS, (code, body)
            assert seconds < API_DEADLINE

        survivor = cluster.alive_nodes()[0]
        for sid, session in sessions.items():
            code, transaction = await cluster.api("GET", f"/transactions/{session.transaction_id}", node=survivor)
            assert code == 200, transaction
            assert transaction["station_id"] == sid
            assert transaction["active"] is False and transaction["meter_stop"] == session.wh
            stored = sorted(int(v["value"]) for v in transaction["meter_values"]
                            if v["measurand"] == "Energy.Active.Import.Register")
            assert stored == session.confirmed_wh, (sid, stored, session.confirmed_wh)
    finally:
        for station in stations:
            try:
                await station.close()
            except Exception:  # noqa: BLE001 - closing after a failure is best effort
                pass
        await cluster.stop()
    assert pids(cluster) == []


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_a_dashboard_browser_stays_on_the_node_that_signed_it_in(tmp_path, database_url):
    """Dashboard sessions live in the node that made them: through HAProxy, the cookie etc/haproxy.cfg
    sets keeps a browser on that node, so its pages stay signed in although the API is balanced round
    robin (without it, every other page lands on a node that never saw the session)."""
    from test_dashboard_http import UiClient, location

    cluster = Cluster(tmp_path, database_url, nodes=2, extra_config=cluster_settings(), plugins="core, dashboard")
    try:
        await cluster.start()
        browser = UiClient(SimpleNamespace(api_port=cluster.api_port, reactor=reactor))
        status, _, response = await browser.sign_in(TOKEN)
        assert (status, location(response)) == (303, "/ui/stations")
        assert "csms_node" in browser.cookies
        for _ in range(4):
            status, page, _ = await browser.request("GET", "/ui/stations")
            assert status == 200, page
        # An API client sending no cookie is still spread over the nodes.
        served = set()
        for _ in range(4):
            response = await treq.get(cluster.api_url + "/nodes", headers={"Authorization": [f"Bearer {TOKEN}"]},
                                      reactor=reactor, timeout=30)
            served.add(response.headers.getRawHeaders("set-cookie", [""])[0].split(";")[0])
            await treq.content(response)
        assert len(served) == 2, served

        # Its live updates show the whole cluster: a station on the other node shows on the page's event
        # stream. (HAProxy sends the second of two stations to the node with fewer: one is on the other
        # node.) That node relays once it has heard that this one listens, a few milliseconds after the
        # stream opens: the station tells its status again until the page has it.
        here = browser.cookies["csms_node"]
        status, _, stream = await browser.request("GET", "/ui/events", unbuffered=True)
        assert status == 200
        received, waiter = [], {}

        def collect(data):
            received.append(data)
            for needle, waiting in list(waiter.items()):
                if needle in b"".join(received) and not waiting.called:
                    waiting.callback(None)
        finished = treq.collect(stream, collect)
        stations = {}
        for station_id in ("CP-LIVE-1", "CP-LIVE-2"):
            stations[station_id] = await connect_station(reactor, cluster.ocpp_port, station_id, timeout=5)
            await stations[station_id].status(0, "Available")
        holders = {station_id: (await cluster.holder(station_id)).name for station_id in stations}
        elsewhere = next(station_id for station_id, node in holders.items() if node != here)
        for attempt in range(10):
            needle = b'"info":"attempt %d"' % attempt
            waiter[needle] = defer.Deferred()
            await stations[elsewhere].status(1, "Faulted", "GroundFailure", info=f"attempt {attempt}")
            try:
                await waiter[needle].addTimeout(2, reactor)
                break
            except defer.TimeoutError:
                assert attempt < 9, b"".join(received)
        assert b'"station_id":"%s","connector_id":1,"status":"Faulted"' % elsewhere.encode() in b"".join(received)
        assert not finished.called
        for station in stations.values():
            station.dropConnection(abort=True)
    finally:
        await cluster.stop()
    assert pids(cluster) == []
