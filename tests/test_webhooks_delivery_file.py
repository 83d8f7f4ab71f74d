"""SQLite: webhook delivery state in a database file of its own (``<database>-webhooks.db``).

The deliverer's writes (moving events in from the outbox, outcomes, dead-lettering) go to that file and
never take the main file's write lock, which the OCPP transactions need; the main file is attached read
only. The outbox stays in the main file: rows moved in are deleted from it every PRUNE_INTERVAL seconds,
its last row never. These run on SQLite only (PostgreSQL keeps everything in one database).
"""
from __future__ import annotations

import os
import sqlite3

import pytest
import pytest_twisted
import sqlalchemy
from conftest import booted, core_store
from sqlalchemy import create_engine, func, insert, select
from test_webhooks import (ALLOW_LOOPBACK, drain, history, plugin_of, receiver, send_meter_values,  # noqa: F401, F811
                           subscribe, values_of)
from twisted.internet import reactor

from csms.db import Database
from csms_plugins.webhooks.delivery_db import delivery_path
from csms_plugins.webhooks.store import LEGACY_MOVED, OUTBOX_SEQ, PENDING, PRUNE_INTERVAL
from csms_plugins.webhooks.tables import deliveries, delivery_state, events, outbox


@pytest.fixture
def database_url(tmp_path):
    """SQLite only, in place of the suite's fixture parametrized by backend: PostgreSQL keeps the deliveries
    in the main database (tests/test_webhooks.py covers it there)."""
    return f"sqlite:///{tmp_path}/csms.sqlite"


def count(*tables):
    return lambda conn: [conn.execute(select(func.count()).select_from(table)).scalar_one() for table in tables]


def recording_writes(monkeypatch, db) -> list:
    """The desc of every function run on ``db``'s writer (write transactions) from now on."""
    written = []
    run = db.run
    monkeypatch.setattr(db, "run", lambda thd, *args, desc="", **kwargs: (
        written.append(desc), run(thd, *args, desc=desc, **kwargs))[1])
    return written


@pytest_twisted.ensureDeferred
async def test_delivery_writes_go_to_the_delivery_file_not_the_main_one(csms_factory, receiver, database_url,
                                                                        monkeypatch):
    csms = await csms_factory(ALLOW_LOOPBACK)
    store = plugin_of(csms).store
    assert store.split and os.path.isfile(delivery_path(csms.app.db))
    await subscribe(csms, receiver.url, ["id_tag.changed"])
    await subscribe(csms, receiver.url + "?2", ["id_tag.changed"])
    await core_store(csms).put_id_tag("TAG-1")
    main_writes = recording_writes(monkeypatch, csms.app.db)
    await drain(csms)
    assert len(receiver.requests) == 2
    # The first pass prunes the outbox (nothing to delete yet: its last row stays); then, within
    # PRUNE_INTERVAL, passes moving events in and recording outcomes write the delivery file only.
    assert main_writes == ["webhooks_outbox_prune"]
    for tag in ("TAG-2", "TAG-3"):
        await core_store(csms).put_id_tag(tag)
    main_writes.clear()
    await drain(csms)
    assert len(receiver.requests) == 6 and main_writes == []
    assert await store.delivery_db.run(count(events, deliveries)) == [3, 6]
    assert await csms.app.db.run(count(events, deliveries)) == [0, 0]
    assert [d["state"] for d in await history(csms, 1)] == ["delivered"] * 3


@pytest_twisted.ensureDeferred
async def test_the_outbox_is_pruned_but_for_its_last_row_and_seqs_go_on_after_a_restart(
        csms_factory, receiver, database_url):
    csms = await csms_factory(ALLOW_LOOPBACK)
    store = plugin_of(csms).store
    await subscribe(csms, receiver.url, ["id_tag.changed"])
    for tag in ("TAG-1", "TAG-2", "TAG-3"):
        await core_store(csms).put_id_tag(tag)
    await drain(csms)
    seqs = lambda conn: list(conn.execute(select(outbox.c.seq).order_by(outbox.c.seq)).scalars())  # noqa: E731
    assert await csms.app.db.run(seqs) == [3]  # the first pass pruned 1 and 2
    for tag in ("TAG-4", "TAG-5"):
        await core_store(csms).put_id_tag(tag)
    await drain(csms)
    assert await csms.app.db.run(seqs) == [3, 4, 5]  # within PRUNE_INTERVAL: not yet
    csms.clock.advance(PRUNE_INTERVAL)
    await core_store(csms).put_id_tag("TAG-6")
    await drain(csms)
    assert await csms.app.db.run(seqs) == [6]
    mark = select(delivery_state.c.value).where(delivery_state.c.name == OUTBOX_SEQ)
    assert await store.delivery_db.run(lambda conn: conn.execute(mark).scalar()) == 6
    await csms.stop()

    again = await csms_factory(ALLOW_LOOPBACK)  # the same files
    await core_store(again).put_id_tag("TAG-7")
    assert await again.app.db.run(seqs) == [6, 7]
    await drain(again)
    tags = [event["data"]["id_tag"] for event in receiver.events()]
    assert sorted(tags) == [f"TAG-{n}" for n in range(1, 8)]  # each once


@pytest_twisted.ensureDeferred
async def test_a_replaced_main_database_has_its_outbox_moved_in_from_the_start(csms_factory, receiver, database_url):
    """A delivery file whose mark lies beyond every outbox row (the main file restored from a backup):
    the outbox is read from its beginning, not skipped for ever."""
    csms = await csms_factory(ALLOW_LOOPBACK)
    store = plugin_of(csms).store
    await subscribe(csms, receiver.url, ["id_tag.changed"])
    await drain(csms)
    await store.delivery_db.run(lambda conn: store.delivery_db.upsert(
        conn, delivery_state, {"name": OUTBOX_SEQ}, {"value": 1000}))
    store._pruned_to = 1000  # as in a process that had pruned the outbox that far
    await core_store(csms).put_id_tag("TAG-1")
    await drain(csms)
    assert [event["data"]["id_tag"] for event in receiver.events()] == ["TAG-1"]
    # From the new mark on, moved rows are pruned again (not only once seqs pass the old one).
    for tag in ("TAG-2", "TAG-3"):
        await core_store(csms).put_id_tag(tag)
    csms.clock.advance(PRUNE_INTERVAL)
    await drain(csms)
    assert sorted(event["data"]["id_tag"] for event in receiver.events()) == ["TAG-1", "TAG-2", "TAG-3"]
    assert await csms.app.db.run(count(outbox)) == [1]


@pytest_twisted.ensureDeferred
async def test_meter_values_are_read_on_from_a_main_file_restored_from_an_older_backup(csms_factory, receiver):
    """An SQLite main file older than the delivery file's mark (restored from a backup): the CSMS's start
    moves the mark back to its last sample, before anything is stored, so the samples stored from then on
    are all sent (not taken for read ones because their keys lie below the old mark)."""
    first = await csms_factory(ALLOW_LOOPBACK)
    await subscribe(first, receiver.url, ["meter_values.received"])
    station = await booted(first, "CP-1")
    await send_meter_values(station, first, "1", "2", "3")
    await drain(first)
    path = first.app.db.url.database
    await first.stop()
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:  # the backup had the first sample only
        conn.execute(sqlalchemy.text("DELETE FROM core_meter_values WHERE id > (SELECT min(id) FROM core_meter_values)"))
    engine.dispose()

    second = await csms_factory(ALLOW_LOOPBACK)  # the same files
    station = await booted(second, "CP-1")
    await send_meter_values(station, second, "4")
    await drain(second)
    assert [values_of(batch) for batch in receiver.events("meter_values.batch")] == [["1", "2", "3"], ["4"]]


def legacy_rows(event_id: str, subscription_id: int, now) -> tuple[dict, dict]:
    body = f'{{"id":"{event_id}","type":"id_tag.changed","created_at":"2026-12-01T10:00:00.000Z","data":{{}}}}'
    return ({"event_id": event_id, "body": body, "created_at": now},
            {"subscription_id": subscription_id, "event_id": event_id, "event_type": "id_tag.changed",
             "state": PENDING, "attempts": 0, "created_at": now, "next_attempt_at": now})


@pytest.mark.parametrize("copied_before", [False, True], ids=["fresh", "copied-then-interrupted"])
@pytest_twisted.ensureDeferred
async def test_deliveries_an_older_release_kept_in_the_main_file_are_moved_and_sent_once(
        csms_factory, receiver, database_url, copied_before):
    """Before the delivery file, SQLite kept the deliveries in the main file: the deliverer moves them in
    (once: a move whose deletion from the main file was cut short is not copied a second time)."""
    first = await csms_factory(ALLOW_LOOPBACK)
    await subscribe(first, receiver.url, ["id_tag.changed"])
    now = first.app.clock.seconds()
    await first.stop()
    from datetime import datetime, timezone
    event, delivery = legacy_rows("legacy-1", 1, datetime.fromtimestamp(now, tz=timezone.utc))
    for path in [database_url.split("///", 1)[1]] + ([delivery_path_of(database_url)] if copied_before else []):
        engine = create_engine(f"sqlite:///{path}")
        with engine.begin() as conn:
            conn.execute(insert(events).values(event))
            conn.execute(insert(deliveries).values(delivery))
            if path.endswith("-webhooks.db"):
                conn.execute(insert(delivery_state).values(name=LEGACY_MOVED, value=1))
        engine.dispose()

    csms = await csms_factory(ALLOW_LOOPBACK)
    await drain(csms)
    assert [r["headers"]["webhook-id"] for r in receiver.requests] == ["legacy-1"]
    assert await csms.app.db.run(count(events, deliveries)) == [0, 0]
    state = await plugin_of(csms).store.delivery_db.run(lambda conn: conn.execute(select(delivery_state.c.name)).all())
    assert [name for (name,) in state] == [OUTBOX_SEQ] or state == []


def delivery_path_of(url: str) -> str:
    return os.path.abspath(url.split("///", 1)[1]) + "-webhooks.db"


def test_an_attached_read_only_file_is_not_locked_by_a_write_transaction(tmp_path):
    """BEGIN IMMEDIATE takes the write lock of every attached database that can be written: the main
    file is attached read only, so that the deliverer's transactions never hold the lock the CSMS needs."""
    main = tmp_path / "main.sqlite"
    with sqlite3.connect(main) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x)")
    delivery = Database(f"sqlite:///{tmp_path}/delivery.sqlite", reactor, attach_readonly={"csms": str(main)})
    try:
        with delivery.engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            raw.execute("BEGIN IMMEDIATE")
            raw.execute("CREATE TABLE mine (y)")
            assert raw.execute("SELECT count(*) FROM t").fetchone() == (0,)  # the main file, by its plain name
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                raw.execute("INSERT INTO t VALUES (1)")
            writer = sqlite3.connect(main, timeout=0)  # no waiting: a held lock fails at once
            writer.execute("INSERT INTO t VALUES (2)")
            writer.commit()
            writer.close()
            raw.execute("COMMIT")
    finally:
        delivery.engine.dispose()


def test_attaching_a_missing_file_is_refused(tmp_path):
    delivery = Database(f"sqlite:///{tmp_path}/delivery.sqlite", reactor,
                        attach_readonly={"csms": str(tmp_path / "absent.sqlite")})
    try:
        with pytest.raises(FileNotFoundError, match="no such database file"):
            delivery.engine.connect()
        assert not (tmp_path / "absent.sqlite").exists()
    finally:
        delivery.engine.dispose()


def test_the_worker_leaves_the_main_files_checkpoints_to_the_csms(tmp_path):
    """Two processes checkpointing one WAL only take turns (and the worker's turn wrote tens of MB per
    minute in the benchmark); the worker checkpoints the delivery file, which it writes, alone."""
    from test_webhooks_worker import default_settings

    from csms_plugins.webhooks.worker import Worker

    main = tmp_path / "csms.sqlite"
    sqlite3.connect(main).close()
    worker = Worker(reactor, {"database": {"url": f"sqlite:///{main}"}, "settings": default_settings()})
    try:
        assert worker.db._checkpointer is None
        assert worker.delivery_db is not None and worker.delivery_db._checkpointer is not None
    finally:
        worker.db.engine.dispose()
        worker.delivery_db.engine.dispose()


@pytest_twisted.ensureDeferred
async def test_the_delivery_file_commits_unsynced_and_is_synced_before_the_outbox_is_pruned(
        csms_factory, receiver, database_url, monkeypatch):
    """With [database] sqlite_synchronous = FULL, the delivery file commits with NORMAL (its syncs would
    share the disk with the OCPP commits'); moved outbox rows are deleted only after it was synced."""
    csms = await csms_factory(ALLOW_LOOPBACK)
    store = plugin_of(csms).store
    synchronous = await store.delivery_db.run(lambda conn: conn.exec_driver_sql("PRAGMA synchronous").scalar())
    main = await csms.app.db.run(lambda conn: conn.exec_driver_sql("PRAGMA synchronous").scalar())
    assert (synchronous, main) == (1, 2)  # NORMAL, FULL
    steps = []
    sync, run = store.delivery_db.sync_to_disk, csms.app.db.run
    monkeypatch.setattr(store.delivery_db, "sync_to_disk", lambda: (steps.append("sync"), sync())[1])
    monkeypatch.setattr(csms.app.db, "run", lambda thd, *args, desc="", **kwargs: (
        steps.append(desc), run(thd, *args, desc=desc, **kwargs))[1])
    await subscribe(csms, receiver.url, ["id_tag.changed"])
    for tag in ("TAG-1", "TAG-2"):
        await core_store(csms).put_id_tag(tag)
    steps.clear()
    await drain(csms)
    assert steps == ["sync", "webhooks_outbox_prune"]
    assert await csms.app.db.run(count(outbox)) == [1]


@pytest_twisted.ensureDeferred
async def test_the_due_read_walks_the_index_of_pending_deliveries_without_a_sort(csms_factory, database_url):
    """The partial index holds the pending deliveries alone; SQLite uses it only when the query's condition
    says ``state = 'pending'`` as a literal (IS_PENDING), and then reads them in order: no sort of the backlog,
    and none of the history is looked at."""
    from csms_plugins.webhooks.store import _statements

    csms = await csms_factory(ALLOW_LOOPBACK)
    delivery_db = plugin_of(csms).store.delivery_db
    statement = _statements("sqlite")[0].compile(delivery_db.engine)

    def plan(conn):
        params = tuple("[]" if name in ("busy", "skip") else 1 for name in statement.positiontup)
        return [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(statement), params)]
    steps = await delivery_db.read(plan)
    assert any("webhooks_deliveries USING INDEX webhooks_deliveries_pending" in step for step in steps), steps
    assert not any("TEMP B-TREE" in step for step in steps), steps
