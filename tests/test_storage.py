"""Storage (csms.db): every transaction runs on the database pool, never on the reactor thread, and its
Deferred fires only after the commit. Runs once per backend (``database_url``: SQLite, and PostgreSQL
when ``CSMS_TEST_POSTGRES_URL`` is set)."""
from __future__ import annotations

import threading

import pytest
import pytest_twisted
from conftest import within
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, event, select
from sqlalchemy.exc import IntegrityError, OperationalError
from twisted.internet import defer, reactor, threads
from twisted.python import threadable

from csms.db import MAX_ATTEMPTS, Database

metadata = MetaData()
probe = Table(
    "storage_probe", metadata,
    Column("key", String(32), primary_key=True),
    Column("value", Integer, nullable=False),
    Column("note", String(64)),
)


@pytest.fixture
def db(database_url):
    database = Database(database_url, reactor)
    database.start()
    database.run_sync(metadata.create_all)
    yield database
    database.stop()


def read_from_another_connection(database_url: str):
    """Rows of the probe table as a separate engine (a second connection) sees them, read off the reactor."""
    def read():
        engine = create_engine(database_url)
        try:
            with engine.connect() as conn:
                return sorted(tuple(row) for row in conn.execute(select(probe)))
        finally:
            engine.dispose()
    return threads.deferToThread(read)


@pytest_twisted.ensureDeferred
async def test_work_runs_on_the_pool_and_not_on_the_reactor_thread(db):
    reactor_thread = threading.get_ident()
    assert threadable.isInIOThread()

    def thd(conn):
        return threading.get_ident(), threadable.isInIOThread(), threading.current_thread().name

    ident, in_io_thread, name = await db.run(thd, desc="which_thread")
    assert ident != reactor_thread
    assert in_io_thread is False
    assert "csms-db" in name  # the database pool, not the reactor's general thread pool


@pytest_twisted.ensureDeferred
async def test_result_is_committed_before_the_deferred_fires(db, database_url):
    def thd(conn):
        conn.execute(probe.insert().values(key="a", value=1))
        return "written"

    assert await db.run(thd, desc="insert") == "written"
    assert await read_from_another_connection(database_url) == [("a", 1, None)]


@pytest_twisted.ensureDeferred
async def test_arguments_are_passed_to_the_function(db):
    def thd(conn, key, value, note=None):
        conn.execute(probe.insert().values(key=key, value=value, note=note))
        return conn.execute(select(probe.c.note).where(probe.c.key == key)).scalar_one()

    assert await db.run(thd, "k", 7, note="seven", desc="args") == "seven"


@pytest_twisted.ensureDeferred
async def test_exception_rolls_back_the_whole_transaction(db, database_url):
    class Boom(Exception):
        pass

    def thd(conn):
        conn.execute(probe.insert().values(key="a", value=1))
        conn.execute(probe.insert().values(key="b", value=2))
        raise Boom("after two inserts")

    with pytest.raises(Boom):
        await db.run(thd, desc="fails")
    assert await read_from_another_connection(database_url) == []
    assert await db.run(lambda conn: conn.execute(select(probe)).fetchall()) == []


@pytest_twisted.ensureDeferred
async def test_constraint_violation_rolls_back_and_is_not_retried(db, database_url):
    attempts = []

    def thd(conn):
        attempts.append(1)
        conn.execute(probe.insert().values(key="dup", value=1))
        conn.execute(probe.insert().values(key="dup", value=2))

    with pytest.raises(IntegrityError):
        await db.run(thd, desc="duplicate")
    assert len(attempts) == 1
    assert await read_from_another_connection(database_url) == []


@pytest_twisted.ensureDeferred
async def test_transient_error_is_retried_in_a_fresh_transaction(db, database_url):
    attempts = []

    def thd(conn):
        attempts.append(1)
        conn.execute(probe.insert().values(key=f"try-{len(attempts)}", value=len(attempts)))
        if len(attempts) == 1:
            raise OperationalError("INSERT ...", {}, Exception("database is locked"))
        return len(attempts)

    assert await db.run(thd, desc="flaky") == 2
    assert db.stats["retries"] == 1
    # The first attempt's insert was rolled back with it.
    assert await read_from_another_connection(database_url) == [("try-2", 2, None)]


@pytest_twisted.ensureDeferred
async def test_transient_error_gives_up_after_max_attempts(db):
    attempts = []

    def thd(conn):
        attempts.append(1)
        raise OperationalError("INSERT ...", {}, Exception("could not serialize access"))

    with pytest.raises(OperationalError):
        await db.run(thd, desc="always_flaky")
    assert len(attempts) == MAX_ATTEMPTS


@pytest_twisted.ensureDeferred
async def test_upsert_inserts_then_updates_on_this_backend(db, database_url):
    await db.run(db.upsert, probe, {"key": "a"}, {"value": 1, "note": "first"}, desc="upsert_insert")
    await db.run(db.upsert, probe, {"key": "b"}, {"value": 5, "note": None}, desc="upsert_insert")
    assert await read_from_another_connection(database_url) == [("a", 1, "first"), ("b", 5, None)]

    await db.run(db.upsert, probe, {"key": "a"}, {"value": 2, "note": "second"}, desc="upsert_update")
    assert await read_from_another_connection(database_url) == [("a", 2, "second"), ("b", 5, None)]


@pytest_twisted.ensureDeferred
async def test_many_concurrent_transactions_all_commit(db, database_url):
    from twisted.internet import defer

    def thd(conn, i):
        conn.execute(probe.insert().values(key=f"k{i:03d}", value=i))

    await defer.gatherResults([db.run(thd, i, desc="concurrent") for i in range(50)])
    rows = await read_from_another_connection(database_url)
    assert [row[1] for row in rows] == list(range(50))


def test_sqlite_uses_a_single_writer_thread(tmp_path):
    database = Database(f"sqlite:///{tmp_path}/one.sqlite", reactor, pool_size=8)
    assert database.pool.max == 1
    database.engine.dispose()


def test_sqlite_database_directory_is_created(tmp_path):
    database = Database(f"sqlite:///{tmp_path}/deeper/still/csms.sqlite", reactor)
    assert (tmp_path / "deeper" / "still").is_dir()
    database.engine.dispose()


@pytest_twisted.ensureDeferred
async def test_app_creates_every_enabled_plugins_tables_on_start(csms):
    from sqlalchemy import inspect

    names = await csms.app.db.run(lambda conn: set(inspect(conn).get_table_names()))
    expected = {table.name for metadata in csms.app.all_metadata() for table in metadata.sorted_tables}
    versions = {history.version_table for history in csms.app.histories() if history.has_revisions}
    assert names == expected | versions
    assert {"csms_stations", "csms_connection_events", "core_transactions"} <= names


async def occupy_every_pool_thread(db, release: threading.Event) -> list:
    """Hold each of the pool's threads until ``release`` is set; returns once every hold is running.

    One hold at a time, each queued only after the one before it began: a hold queued beside another
    could share its batch (and its commit) instead of taking a thread, and work queued before the
    first hold began would be batched with it rather than queued behind a busy pool."""
    holds = []
    for _ in range(db.pool.max):
        running = defer.Deferred()

        def hold(conn, running=running):
            reactor.callFromThread(running.callback, None)
            release.wait(10)
        holds.append(db.run(hold, desc="hold"))
        await running.addTimeout(10, reactor)
    return holds


@pytest_twisted.ensureDeferred
async def test_work_queued_together_shares_one_commit_and_a_failure_stays_its_own(db, database_url):
    """Group commit: functions queued while the pool is busy commit together; when one fails the group
    is rerun with each function in its own savepoint, so it rolls back alone and the others commit."""
    release = threading.Event()
    holds = await occupy_every_pool_thread(db, release)

    def insert(key):
        def thd(conn):
            conn.execute(probe.insert().values(key=key, value=1))
            return key
        return thd

    def insert_then_fail(conn):
        conn.execute(probe.insert().values(key="doomed", value=2))
        raise ValueError("refused")

    before, isolated_before = db.stats["transactions"], db.stats["isolated"]
    first, failing, last = db.run(insert("a")), db.run(insert_then_fail), db.run(insert("b"))
    release.set()
    for hold in holds:
        await hold.addTimeout(10, reactor)
    assert await first.addTimeout(10, reactor) == "a"
    with pytest.raises(ValueError, match="refused"):
        await failing.addTimeout(10, reactor)
    assert await last.addTimeout(10, reactor) == "b"
    assert await read_from_another_connection(database_url) == [("a", 1, None), ("b", 1, None)]
    if db.pool.max == 1:
        assert db.stats["transactions"] - before == 2  # the hold's, then one the three functions shared
        assert db.stats["isolated"] - isolated_before == 1  # found the failing one by rerunning in savepoints


@pytest_twisted.ensureDeferred
async def test_a_group_that_succeeds_commits_once_without_savepoints(db, database_url):
    release = threading.Event()
    holds = await occupy_every_pool_thread(db, release)
    statements = []

    def insert(key):
        def thd(conn):
            conn.execute(probe.insert().values(key=key, value=1))
            return key
        return thd

    before, isolated_before = db.stats["transactions"], db.stats["isolated"]
    listen = lambda conn, cursor, statement, *rest: statements.append(statement)  # noqa: E731
    event.listen(db.engine, "before_cursor_execute", listen)
    try:
        works = [db.run(insert(key)) for key in ("a", "b", "c")]
        release.set()
        for hold in holds:
            await hold.addTimeout(10, reactor)
        assert [await w.addTimeout(10, reactor) for w in works] == ["a", "b", "c"]
    finally:
        event.remove(db.engine, "before_cursor_execute", listen)
    assert await read_from_another_connection(database_url) == [("a", 1, None), ("b", 1, None), ("c", 1, None)]
    assert db.stats["isolated"] == isolated_before
    assert not [s for s in statements if "SAVEPOINT" in s.upper()]
    if db.pool.max == 1:
        assert db.stats["transactions"] - before == 2  # the hold's, then one for the three functions


@pytest_twisted.ensureDeferred
async def test_a_read_runs_beside_a_busy_writer_and_sees_only_what_was_committed(db):
    """Database.read: on SQLite on a connection of its own, not queued behind the one writer thread (whose
    group commits the OCPP traffic waits for); PostgreSQL's pool has threads to spare."""
    await db.run(lambda conn: conn.execute(probe.insert().values(key="committed", value=1)), desc="first")
    writing_started, release = threading.Event(), threading.Event()

    def busy_writer(conn):
        conn.execute(probe.insert().values(key="in-progress", value=2))
        writing_started.set()
        release.wait(10)
    writing = db.run(busy_writer, desc="busy_writer")
    try:
        await within(threads.deferToThread(writing_started.wait, 10))
        keys = await within(db.read(lambda conn: [row.key for row in conn.execute(select(probe.c.key))],
                                    desc="read_beside"), 5)
    finally:
        release.set()
    await writing
    assert keys == ["committed"]


def test_work_given_after_stop_fails_at_once_instead_of_waiting_for_ever(database_url):
    """A plugin service still reading while a failed start stops the database: its work fails with
    DatabaseStopped (it used to wait for pool threads that were gone, and hung the start-up's failure)."""
    from csms.db import DatabaseStopped

    database = Database(database_url, reactor)
    database.start()
    database.stop()
    outcomes = []
    database.run(lambda conn: 1, desc="late").addBoth(outcomes.append)
    assert len(outcomes) == 1 and outcomes[0].check(DatabaseStopped)


@pytest_twisted.ensureDeferred
async def test_the_statistics_logged_at_stop_speak_of_the_database_in_use(db):
    """SQLite's line counts the waits for its file's write lock; PostgreSQL's has no such lock to wait for,
    and its line said it waited 0 times for SQLite's."""
    from twisted.logger import capturedLogs, formatEvent

    await db.run(lambda conn: conn.execute(probe.insert().values(key="k", value=1)), desc="one")
    with capturedLogs() as events:
        db.stop()
    (line,) = [formatEvent(event) for event in events if event.get("log_namespace") == "csms.db"]
    from csms.config import display_url

    where = display_url(db.url.render_as_string(hide_password=False))
    assert "***" in where or db.url.password is None  # never the password
    assert line.startswith(f"Database {where}: 1 functions in 1 transactions (0 retried, 0 rerun in savepoints")
    if db.is_sqlite:
        assert line.endswith("; waited 0 times, 0 ms in all, for SQLite's write lock held by another process)")
    else:
        assert line.endswith("rerun in savepoints)") and "SQLite" not in line


@pytest_twisted.ensureDeferred
async def test_sqlite_checkpoints_run_beside_the_writer_not_in_its_commits(tmp_path):
    """The writer's connections leave the WAL to the checkpoint thread (a commit that checkpoints makes
    every call waiting for it wait for the copy and its fsync), which copies it all back each round."""
    import os

    from sqlalchemy import text
    from twisted.internet import reactor

    from csms.db import AUTOCHECKPOINT_PAGES, Database

    path = tmp_path / "wal.sqlite"
    db = Database(f"sqlite:///{path}", reactor)
    db.run_sync(lambda conn: conn.execute(text("CREATE TABLE t (n INTEGER, pad TEXT)")))
    db.start()
    db._checkpoints.stop()  # rounds only when this test says (its writes may take longer than one interval)
    try:
        def write(conn, start):
            for n in range(start, start + 500):
                conn.execute(text("INSERT INTO t VALUES (:n, :pad)"), {"n": n, "pad": "x" * 2000})
            return conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar()
        for start in range(0, 3000, 500):  # ~6 MB: past SQLite's default threshold of 1,000 pages
            assert await db.run(write, start).addTimeout(30, reactor) == AUTOCHECKPOINT_PAGES
        # Nothing has checkpointed yet: the rows are in the WAL, the database file has not grown.
        assert os.path.getsize(f"{path}-wal") > 5_000_000
        assert os.path.getsize(path) < 100_000
        await db._checkpoint().addTimeout(30, reactor)
        assert os.path.getsize(path) > 5_000_000
    finally:
        db.stop()
