"""Webhook delivery in a process of its own (``[plugin:webhooks] delivery = worker``, the default).

Real processes throughout: ``twistd csms`` starting its delivery worker, a twisted.web receiver on
loopback in the test, stations over real sockets, ``csms-admin webhooks deliver`` for ``delivery =
external``, on SQLite and on PostgreSQL. The worker is restarted when it dies, ends with the CSMS
(even after a ``kill -9`` of the CSMS), and only one process delivers for a database at a time: the
others stand by and take over when it ends.
"""
from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import textwrap

import pytest
import pytest_twisted
import treq
from test_webhooks import expected_signature, receiver  # noqa: F401, F811 (a fixture)
from twisted.internet import defer, reactor, task

from csms.testing.processes import WatchedProcess, die_with_parent, listening_port, run_twistd, write_loopback_config
from csms.testing.station import connect_station

TOKEN = "worker-test-token-0123456789"
TIMEOUT = 60


def write_config(tmp_path, database_url: str, delivery: str = "worker") -> str:
    return write_loopback_config(tmp_path, database_url, TOKEN, "core, webhooks", f"""\
        [plugin:webhooks]
        delivery = {delivery}
        allow_private_networks = 127.0.0.0/8
        poll_interval = 0.2
        """)


class Node:
    """A ``twistd csms`` process and its ports."""

    def __init__(self, process: WatchedProcess, output: str):
        self.process = process
        self.ocpp_port = listening_port(output, "OCPP 1.6J endpoint")
        self.api_port = listening_port(output, "Operator API")

    async def api(self, method: str, path: str, json=None):
        response = await treq.request(method, f"http://127.0.0.1:{self.api_port}{path}", json=json,
                                      headers={"Authorization": f"Bearer {TOKEN}"})
        body = await response.text()
        return response.code, body

    async def metric(self, line_start: str) -> float | None:
        code, body = await self.api("GET", "/metrics")
        assert code == 200, body
        for line in body.splitlines():
            if line.startswith(line_start + " "):
                return float(line.split()[-1])
        return None

    def worker_pids(self) -> list[int]:
        return [int(pid) for pid in re.findall(r"Webhook delivery worker started \(pid (\d+)\)", self.process.stdout)]


async def start_node(tmp_path, database_url: str, delivery: str = "worker") -> Node:
    process = run_twistd(write_config(tmp_path, database_url, delivery), str(tmp_path))
    output = await process.logged("Central System ready")
    return Node(process, output)


async def subscribe(node: Node, url: str, event_types=("station.booted", "station.connected")) -> dict:
    import json

    code, body = await node.api("POST", "/api/v1/webhooks", {"url": url, "event_types": list(event_types)})
    assert code == 201, body
    return json.loads(body)


async def boot(node: Node, station_id: str):
    station = await connect_station(reactor, node.ocpp_port, station_id)
    answer = await station.call("BootNotification", {"chargePointVendor": "Acme", "chargePointModel": "W1"})
    assert answer["status"] == "Accepted", answer
    return station


def next_event(hook, seconds: float = TIMEOUT):
    return hook.arrived.get().addTimeout(seconds, reactor)


async def until(check, seconds: float = TIMEOUT, every: float = 0.1):
    """Awaits ``check()`` (a coroutine function) until it is truthy; bounded. For what another process
    reports through its pipes and the metrics, which no Deferred here fires for."""
    for _ in range(int(seconds / every)):
        value = await check()
        if value:
            return value
        await task.deferLater(reactor, every, lambda: None)
    raise AssertionError(f"not true within {seconds} s: {check}")


def niceness(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def policies(pid: int) -> set:
    """The scheduling policies (SCHED_OTHER 0, SCHED_IDLE 5 ...) of every thread of a process."""
    found = set()
    for task_id in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task_id}/stat") as f:
                found.add(int(f.read().rsplit(")", 1)[1].split()[38]))  # field 41, policy
        except OSError:
            pass  # a thread that ended meanwhile
    return found


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A child of ours that ended but was not reaped yet is gone too.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest_twisted.ensureDeferred
async def test_the_csms_starts_its_worker_which_delivers_is_restarted_and_ends_with_it(tmp_path, database_url,
                                                                                       receiver):
    node = await start_node(tmp_path, database_url)
    try:
        await node.process.logged("holds the delivery lock: delivering")
        subscription = await subscribe(node, receiver.url)
        station = await boot(node, "CP-W1")
        event = await next_event(receiver)
        assert event["json"]["type"] in ("station.connected", "station.booted")
        assert event["headers"]["webhook-signature"] == expected_signature(
            subscription["secret"], event["headers"], event["body"])
        assert await node.metric("csms_webhook_worker_up") == 1
        assert await node.metric("csms_webhook_worker_delivering") == 1
        await until(lambda: node.metric('csms_webhook_deliveries_total{outcome="delivered"}'))
        # The CSMS's own reactor sent nothing: the worker process did.
        [first_worker] = node.worker_pids()
        assert first_worker != node.process.transport.pid
        # ... at a lower CPU priority (worker_nice, 10 by default): OCPP answers get the CPU first.
        assert niceness(first_worker) == min(niceness(node.process.transport.pid) + 10, 19)
        # ... and under SCHED_IDLE (worker_policy = idle, the default), every thread of it: a waking OCPP
        # process preempts it at once. The CSMS keeps the normal policy.
        assert policies(first_worker) == {os.SCHED_IDLE}
        assert policies(node.process.transport.pid) == {os.SCHED_OTHER}
        assert "CPU policy idle, nice" in node.process.stdout

        # The worker dies: the CSMS restarts it, and delivery goes on.
        os.kill(first_worker, 9)
        await node.process.logged("restarting it in 1 s")
        await until(lambda: defer.succeed(len(node.worker_pids()) == 2))
        second_worker = node.worker_pids()[1]
        await until(lambda: defer.succeed(node.process.stdout.count("holds the delivery lock: delivering") == 2))
        assert await node.metric("csms_webhook_worker_restarts_total") == 1
        while receiver.arrived.pending:
            receiver.arrived.pending.pop()
        await station.close()
        await boot(node, "CP-W2")
        event = await next_event(receiver)
        assert event["json"]["data"]["station_id"] in ("CP-W1", "CP-W2")

        # The CSMS is killed: its worker notices its pipe close and ends by itself.
        node.process.signal("KILL")
        await node.process.finished()
        await until(lambda: defer.succeed(gone(second_worker)))
    finally:
        await node.process.stop()


@pytest_twisted.ensureDeferred
async def test_a_stopping_csms_stops_its_worker_which_says_what_it_did(tmp_path, receiver):
    node = await start_node(tmp_path, f"sqlite:///{tmp_path}/csms.sqlite")
    await node.process.logged("holds the delivery lock: delivering")
    await subscribe(node, receiver.url)
    station = await boot(node, "CP-S1")
    await next_event(receiver)
    await station.close()
    [worker] = node.worker_pids()
    assert await node.process.stop() == 0
    output = node.process.stdout
    assert re.search(r"\[webhook worker\] Webhooks: \d+ deliveries made", output), output
    assert "Traceback" not in output and "Unhandled" not in output, output
    assert gone(worker)


def run_deliver(tmp_path, config: str) -> WatchedProcess:
    """``csms-admin webhooks deliver``, watched."""
    process = WatchedProcess(reactor, TIMEOUT)
    admin = os.path.join(os.path.dirname(sys.executable), "csms-admin")
    argv = die_with_parent([admin, "--config", config, "webhooks", "deliver"])
    reactor.spawnProcess(process, argv[0], argv, env=dict(os.environ), path=str(tmp_path))
    return process


@pytest_twisted.ensureDeferred
async def test_external_delivery_by_csms_admin_with_one_deliverer_and_a_standby_taking_over(tmp_path, database_url,
                                                                                            receiver):
    node = await start_node(tmp_path, database_url, delivery="external")
    first = second = None
    try:
        assert node.worker_pids() == []
        await subscribe(node, receiver.url)
        # Meter values: on an SQLite file read from the stored samples, by code the deliverer imports.
        await subscribe(node, receiver.url + "?meters", ["meter_values.received"])
        station = await boot(node, "CP-E1")
        await station.call("MeterValues", {"connectorId": 1, "meterValue": [
            {"timestamp": "2026-12-01T10:00:00.000Z", "sampledValue": [{"value": "1500"}]}]})
        await station.close()
        assert receiver.requests == []  # written to the outbox, or stored; nobody here delivers

        config = str(tmp_path / "csms.ini")
        first = run_deliver(tmp_path, config)
        await first.logged("holds the delivery lock: delivering")
        # What waited: the station's two events, and a batch of its meter values.
        waited = [await next_event(receiver) for _ in range(3)]
        by_type = {event["json"]["type"]: event["json"] for event in waited}
        assert sorted(by_type) == ["meter_values.batch", "station.booted", "station.connected"]
        assert by_type["station.booted"]["data"]["station_id"] == "CP-E1"
        [meter_value] = by_type["meter_values.batch"]["data"]["events"]
        assert meter_value["data"]["meter_value"][0]["sampledValue"][0]["value"] == "1500"

        second = run_deliver(tmp_path, config)
        await second.logged("Another process holds the webhook delivery lock: standing by")

        first.signal("KILL")  # its lock goes with it (the flock with the process, the advisory lock
        await first.finished()  # with its connection)
        await second.logged("holds the delivery lock: delivering")
        while receiver.arrived.pending:
            receiver.arrived.pending.pop()
        station = await boot(node, "CP-E2")
        event = await next_event(receiver)
        assert event["json"]["data"]["station_id"] == "CP-E2"
        await station.close()
        assert await second.stop() == 0
        assert "Traceback" not in second.stdout + second.stderr
    finally:
        for process in (first, second):
            if process is not None:
                await process.stop()
        await node.process.stop()


def test_csms_admin_deliver_refuses_a_config_without_webhooks_and_typos(tmp_path):
    import subprocess

    admin = os.path.join(os.path.dirname(sys.executable), "csms-admin")
    url = f"sqlite:///{tmp_path}/csms.sqlite"
    config = write_config(tmp_path, url, delivery="external")
    created = subprocess.run([admin, "--config", config, "--create", "db", "upgrade"], capture_output=True,
                             text=True, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    text = (tmp_path / "csms.ini").read_text()
    (tmp_path / "typo.ini").write_text(text.replace("poll_interval", "pol_interval"))
    (tmp_path / "off.ini").write_text(text.replace("enabled = core, webhooks", "enabled = core"))
    for name, expected in (("typo.ini", "[plugin:webhooks] has no setting 'pol_interval'"),
                           ("off.ini", "the webhooks plugin is not enabled")):
        run = subprocess.run([admin, "--config", str(tmp_path / name), "webhooks", "deliver"], capture_output=True,
                             text=True, cwd=tmp_path, timeout=TIMEOUT)
        assert run.returncode != 0
        assert expected in run.stderr, run.stderr
        assert "Traceback" not in run.stderr


@pytest_twisted.ensureDeferred
async def test_an_unknown_delivery_mode_stops_start_up_with_one_line(tmp_path):
    from test_startup import failed_start

    path = write_config(tmp_path, f"sqlite:///{tmp_path}/csms.sqlite", delivery="sideways")
    process = run_twistd(path, str(tmp_path))
    await failed_start(process, "[plugin:webhooks] delivery must be one of worker, in-process, external, "
                                "not 'sideways'")


def test_worker_delivery_needs_a_database_another_process_can_open():
    from csms.config import ConfigError, load_config
    from csms.service import CSMSService

    config = load_config(text="[plugins]\nenabled = core, webhooks\n")
    config.database.url = "sqlite:///:memory:"
    with pytest.raises(ConfigError, match="delivery = worker needs a database another process can open"):
        CSMSService(config)
    config = load_config(text="[plugins]\nenabled = core, webhooks\n[plugin:webhooks]\ndelivery = in-process\n")
    config.database.url = "sqlite:///:memory:"
    CSMSService(config)  # in-process needs no other process


@pytest_twisted.ensureDeferred
async def test_the_file_lock_is_held_by_one_holder_at_a_time(tmp_path):
    from csms_plugins.webhooks.worker import FileLock

    path = str(tmp_path / "csms.sqlite-webhooks.lock")
    one, other = FileLock(path), FileLock(path)
    assert await one.try_acquire() is True
    assert await other.try_acquire() is False
    assert not other.held
    one.release()
    assert await other.try_acquire() is True
    other.release()


@pytest_twisted.ensureDeferred
async def test_the_sqlite_writer_takes_the_write_lock_when_its_transaction_begins(tmp_path):
    """Another process writing the same file (the worker) must make the CSMS's writer wait, never fail
    it: a deferred transaction that read first, then met a write committed meanwhile, would fail at
    its own first write (SQLITE_BUSY_SNAPSHOT) instead of waiting."""
    from sqlalchemy import text

    from csms.db import Database

    path = tmp_path / "lock.sqlite"
    db = Database(f"sqlite:///{path}", reactor)
    db.run_sync(lambda conn: conn.execute(text("CREATE TABLE t (n INTEGER)")))
    db.start()
    try:
        def read_then_write(conn):
            conn.execute(text("SELECT count(*) FROM t")).scalar()
            other = sqlite3.connect(str(path), timeout=0.05, isolation_level=None)
            try:
                other.execute("INSERT INTO t VALUES (2)")  # another process's write, meanwhile
                others_write = "committed"
            except sqlite3.OperationalError as exc:
                others_write = str(exc)
            finally:
                other.close()
            conn.execute(text("INSERT INTO t VALUES (1)"))
            return others_write
        outcome = await db.run(read_then_write).addTimeout(TIMEOUT, reactor)
        assert outcome == "database is locked"  # it waited for our writer, which held the lock from BEGIN
        assert db.stats["retries"] == 0
    finally:
        db.stop()


@pytest_twisted.ensureDeferred
async def test_the_sqlite_writer_waits_for_a_lock_another_process_holds_and_counts_it(tmp_path):
    import threading

    from sqlalchemy import text

    from csms.db import Database

    path = tmp_path / "wait.sqlite"
    db = Database(f"sqlite:///{path}", reactor)
    db.run_sync(lambda conn: conn.execute(text("CREATE TABLE t (n INTEGER)")))
    db.start()
    other = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process's write transaction, under way
        other.execute("INSERT INTO t VALUES (2)")
        holder = threading.Timer(0.2, other.execute, ("COMMIT",))  # it commits a moment later
        holder.start()
        written = db.run(lambda conn: conn.execute(text("INSERT INTO t VALUES (1)")).rowcount)
        assert await written.addTimeout(TIMEOUT, reactor) == 1
        holder.join()
        assert db.stats["lock_waits"] == 1 and db.stats["lock_wait_ms"] >= 100, db.stats
        assert db.stats["retries"] == 0  # it waited; nothing failed and was retried
        rows = db.run_sync(lambda conn: sorted(conn.execute(text("SELECT n FROM t")).scalars()))
        assert rows == [1, 2]
    finally:
        other.close()
        db.stop()


def default_settings() -> dict:
    """The webhooks plugin's settings as an operator who set none gets them."""
    from csms_plugins.webhooks.plugin import WebhooksPlugin

    return {setting.name: setting.default for setting in WebhooksPlugin.settings}


@pytest.mark.postgresql_only
def test_on_postgresql_the_workers_commits_do_not_wait_for_the_servers_flush(database_url):
    """Its transactions are redone or resent after a server crash (at least once), so they need not wait
    for the disk the CSMS's commits wait for."""
    from sqlalchemy import text

    from csms_plugins.webhooks.worker import Worker

    worker = Worker(reactor, {"database": {"url": database_url}, "settings": default_settings()})
    try:
        with worker.db.engine.connect() as conn:
            assert conn.execute(text("SHOW synchronous_commit")).scalar() == "off"
    finally:
        worker.db.engine.dispose()


def test_on_sqlite_the_workers_prunes_of_the_main_file_do_not_wait_for_the_disk(tmp_path):
    """Its only writes to the main file delete outbox rows already synced in the delivery file, so with
    [database] sqlite_synchronous = FULL its connections there still commit NORMAL: a prune holds the main
    file's write lock, which the OCPP transactions wait for, without an fsync inside it."""
    from sqlalchemy import text

    from csms_plugins.webhooks.worker import Worker

    url = f"sqlite:///{tmp_path}/csms.sqlite"
    worker = Worker(reactor, {"database": {"url": url, "sqlite_synchronous": "FULL"},
                              "settings": default_settings()})
    try:
        with worker.db.engine.connect() as conn:
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL
    finally:
        worker.db.engine.dispose()
        worker.delivery_db.engine.dispose()


@pytest.mark.parametrize("policy, expected", [("idle", "SCHED_IDLE"), ("normal", "SCHED_OTHER")])
def test_the_worker_policy_setting_chooses_sched_idle_or_nice_alone(policy, expected):
    # In a process of its own: a lower priority cannot be undone, and this test process runs other tests.
    script = textwrap.dedent(f"""
        import os
        from csms_plugins.webhooks.worker import lower_priority
        before = os.nice(0)
        applied = lower_priority({{"worker_nice": 3, "worker_policy": "{policy}"}})
        print(applied, os.sched_getscheduler(0), os.nice(0) - before)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    applied, scheduler, raised = done.stdout.split()
    assert (applied, int(scheduler), int(raised)) == (policy, getattr(os, expected), 3)


def test_an_unknown_worker_policy_is_refused():
    from csms.config import ConfigError
    from csms_plugins.webhooks.plugin import WebhooksPlugin

    setting = next(s for s in WebhooksPlugin.settings if s.name == "worker_policy")
    assert setting.parse("IDLE", "plugin:webhooks") == "idle"
    with pytest.raises(ConfigError, match="worker_policy"):
        setting.parse("realtime", "plugin:webhooks")
