"""Caches and shortcuts on the hot path, and the bulk inserts behind them.

* :class:`IdTagCache` (unit, on a :class:`twisted.internet.task.Clock`).
* :class:`CoreStore`'s id tag cache on a real database: a repeated lookup costs no database function, a
  change made through the store is seen at once (also for case variants, also while queued), a change
  made behind the store's back is seen once the ttl has passed, and ConcurrentTx follows transactions.
* :meth:`Database.insert_many`: held rows are visible to what follows, survive chunking and type
  processing, fail alone in a group commit, and are written at once outside ``run``; a pool thread's
  broken connection is replaced.
* MeterValues skip the "is this transaction this station's" query for owners already seen.

Everything on a database runs once per backend (``database_url``: SQLite, and PostgreSQL when
``CSMS_TEST_POSTGRES_URL`` is set).
"""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, event, select, text, update
from sqlalchemy.exc import IntegrityError
from twisted.internet import defer, reactor, task

from csms.db import BULK_ROWS, Database, TransactionAborted
from csms_plugins.core import tables as core_tables
from csms_plugins.core.store import CoreStore, IdTagCache

TIMEOUT = 10
TTL = 60.0
T0 = 1_700_000_000.0
SNAPSHOT = ("Accepted", None, None)


def wait(d) -> defer.Deferred:
    return defer.ensureDeferred(d).addTimeout(TIMEOUT, reactor)


def new_clock(at: float = T0) -> task.Clock:
    clock = task.Clock()
    clock.advance(at)
    return clock


# -- A. IdTagCache ---------------------------------------------------------------------------------------


def test_cache_hit_after_put():
    cache = IdTagCache(new_clock(), TTL)
    assert cache.get("TAG", need_active=False) is None
    cache.put("TAG", SNAPSHOT, False, cache.generation)
    entry = cache.get("TAG", need_active=False)
    assert entry is not None and entry[0] == SNAPSHOT and entry[1] is False
    assert cache.get("TAG", need_active=True)[1] is False  # active known: ConcurrentTx can be answered
    assert cache.stats == {"hits": 2, "misses": 1}


def test_cache_entry_expires_after_ttl():
    clock = new_clock()
    cache = IdTagCache(clock, TTL)
    cache.put("TAG", SNAPSHOT, None, cache.generation)
    clock.advance(TTL - 0.5)
    assert cache.get("TAG", need_active=False) is not None
    clock.advance(0.5)
    assert cache.get("TAG", need_active=False) is None


def test_cache_put_ignored_when_invalidated_during_the_read():
    cache = IdTagCache(new_clock(), TTL)
    generation = cache.generation  # a lookup starts reading
    cache.invalidate("TAG")  # the tag changes while it reads
    cache.put("TAG", SNAPSHOT, False, generation)
    assert cache.get("TAG", need_active=False) is None
    # A change to another tag, or set_active, also makes an in-flight read's answer unusable.
    generation = cache.generation
    cache.set_active("OTHER", True)
    cache.put("TAG", SNAPSHOT, False, generation)
    assert cache.get("TAG", need_active=False) is None
    # A read that saw no change is kept.
    cache.put("TAG", SNAPSHOT, False, cache.generation)
    assert cache.get("TAG", need_active=False) is not None


def test_cache_invalidate_drops_every_case_variant():
    cache = IdTagCache(new_clock(), TTL)
    for variant in ("ABC", "Abc", "abc", "XYZ"):
        cache.put(variant, SNAPSHOT, False, cache.generation)
    cache.invalidate("abc")
    for variant in ("ABC", "Abc", "abc"):
        assert cache.get(variant, need_active=False) is None
    assert cache.get("XYZ", need_active=False) is not None
    # Stored again after the invalidation: found again (the case index was rebuilt too).
    cache.put("ABC", SNAPSHOT, False, cache.generation)
    assert cache.get("ABC", need_active=False) is not None
    cache.invalidate("aBc")
    assert cache.get("ABC", need_active=False) is None


def test_cache_set_active_keeps_the_snapshot_for_every_case_variant():
    cache = IdTagCache(new_clock(), TTL)
    snapshot = ("Blocked", datetime(2030, 1, 1, tzinfo=timezone.utc), "PARENT")
    cache.put("abc", snapshot, False, cache.generation)
    cache.put("ABC", snapshot, False, cache.generation)
    cache.set_active("Abc", True)
    assert cache.get("abc", need_active=True)[:2] == (snapshot, True)
    assert cache.get("ABC", need_active=True)[:2] == (snapshot, True)
    cache.set_active("ABC", None)
    assert cache.get("abc", need_active=False)[:2] == (snapshot, None)


def test_cache_active_unknown_is_a_miss_only_when_needed():
    cache = IdTagCache(new_clock(), TTL)
    cache.put("TAG", SNAPSHOT, None, cache.generation)
    assert cache.get("TAG", need_active=True) is None
    assert cache.get("TAG", need_active=False) is not None
    cache.set_active("TAG", False)
    assert cache.get("TAG", need_active=True) is not None


@pytest.mark.parametrize("ttl", [0, -1])
def test_cache_with_no_ttl_never_stores(ttl):
    cache = IdTagCache(new_clock(), ttl)
    cache.put("TAG", SNAPSHOT, False, cache.generation)
    assert cache.get("TAG", need_active=False) is None
    assert cache._entries == {}


# -- B. CoreStore's id tag cache on a database -------------------------------------------------------------


@pytest.fixture
def store_factory(database_url):
    made = []

    def make(ttl: float = TTL, concurrent_tx: bool = True, db: Database | None = None) -> CoreStore:
        if db is None:
            db = Database(database_url, reactor)
            db.start()
            db.run_sync(core_tables.metadata.create_all)
            made.append(db)
        return CoreStore(db, new_clock(), concurrent_tx=concurrent_tx, id_tag_cache_seconds=ttl)

    yield make
    for db in made:
        db.stop()


@pytest.fixture
def store(store_factory):
    return store_factory()


async def info(store: CoreStore, tag: str, check_concurrent: bool = False) -> dict:
    return await wait(store.id_tag_info(tag, check_concurrent))


async def functions_run_by(store: CoreStore, work) -> tuple:
    """(result of awaiting ``work()``, database functions it ran)."""
    before = store.db.stats["functions"]
    result = await work()
    return result, store.db.stats["functions"] - before


@pytest_twisted.ensureDeferred
async def test_repeated_lookup_runs_no_database_function(store):
    await wait(store.put_id_tag("TAG-1"))
    first, ran = await functions_run_by(store, lambda: info(store, "TAG-1"))
    assert (first, ran) == ({"status": "Accepted"}, 1)
    second, ran = await functions_run_by(store, lambda: info(store, "TAG-1"))
    assert (second, ran) == ({"status": "Accepted"}, 0)
    assert store.cached_id_tag_info("TAG-1", False) == {"status": "Accepted"}
    # An unknown tag is cached too (as Invalid).
    assert await functions_run_by(store, lambda: info(store, "NOPE")) == ({"status": "Invalid"}, 1)
    assert await functions_run_by(store, lambda: info(store, "NOPE")) == ({"status": "Invalid"}, 0)


@pytest_twisted.ensureDeferred
async def test_no_ttl_means_every_lookup_reads(store_factory):
    store = store_factory(ttl=0)
    await wait(store.put_id_tag("TAG-1"))
    for _ in range(2):
        assert await functions_run_by(store, lambda: info(store, "TAG-1")) == ({"status": "Accepted"}, 1)
    assert store.cached_id_tag_info("TAG-1", False) is None


def blocked_through(store: CoreStore, how: str, tag: str):
    if how == "put":
        return store.put_id_tag(tag, "Blocked")
    if how == "update":
        return store.update_id_tag(tag, status="Blocked")
    return store.delete_id_tag(tag)


EXPECTED = {"put": {"status": "Blocked"}, "update": {"status": "Blocked"}, "delete": {"status": "Invalid"}}


@pytest.mark.parametrize("how", ["put", "update", "delete"])
@pytest_twisted.ensureDeferred
async def test_store_change_is_seen_by_the_next_lookup(store, how):
    await wait(store.put_id_tag("TAG-1"))
    assert await info(store, "TAG-1") == {"status": "Accepted"}
    assert store.cached_id_tag_info("TAG-1", False) == {"status": "Accepted"}
    await wait(blocked_through(store, how, "TAG-1"))
    assert store.cached_id_tag_info("TAG-1", False) is None
    assert await info(store, "TAG-1") == EXPECTED[how]
    assert await info(store, "TAG-1") == EXPECTED[how]  # and that is what is cached now


@pytest.mark.parametrize("how", ["put", "update", "delete"])
@pytest_twisted.ensureDeferred
async def test_store_change_is_seen_while_it_is_still_queued(store, how):
    """The lookup right after the change is queued, before it commits, does not answer from the cache."""
    await wait(store.put_id_tag("TAG-1"))
    assert await info(store, "TAG-1") == {"status": "Accepted"}
    change = blocked_through(store, how, "TAG-1")
    assert not change.called
    assert store.cached_id_tag_info("TAG-1", False) is None
    lookup = store.id_tag_info("TAG-1", False)  # queued after the change: reads what it wrote
    assert await wait(lookup) == EXPECTED[how]
    await wait(change)
    assert await info(store, "TAG-1") == EXPECTED[how]


@pytest.mark.parametrize("how", ["put", "update", "delete"])
@pytest_twisted.ensureDeferred
async def test_lookup_in_flight_across_a_change_is_not_cached(store, how):
    await wait(store.put_id_tag("TAG-1"))
    lookup = store.id_tag_info("TAG-1", False)  # queued before the change: reads the old tag
    change = blocked_through(store, how, "TAG-1")
    assert await wait(lookup) == {"status": "Accepted"}
    await wait(change)
    assert await info(store, "TAG-1") == EXPECTED[how]


@pytest_twisted.ensureDeferred
async def test_lookup_read_before_a_change_it_did_not_see_is_not_cached(store):
    """A lookup whose read is done, but not yet committed, when a change is queued must not store the
    old answer: between its Deferred firing and the change committing, nothing may answer from it."""
    from twisted.internet import threads

    await wait(store.put_id_tag("TAG-1"))
    started, release = threading.Event(), threading.Event()

    def hold(conn):
        started.set()
        release.wait(TIMEOUT)

    pool_release, pool_holds = await hold_the_pool(store.db)
    lookup = store.id_tag_info("TAG-1", False)
    held = store.db.run(hold)  # queued behind a busy pool: one group with the lookup, after its read
    await release_pool(pool_release, pool_holds)
    cached_when_read = []
    lookup.addCallback(lambda answer: cached_when_read.append(store.cached_id_tag_info("TAG-1", False)) or answer)
    assert await wait(threads.deferToThread(started.wait, TIMEOUT))
    change = store.put_id_tag("TAG-1", "Blocked")  # the lookup has read already; its batch is not committed
    release.set()
    assert await wait(lookup) == {"status": "Accepted"}
    await wait(held)
    await wait(change)
    assert cached_when_read == [None]
    assert await info(store, "TAG-1") == {"status": "Blocked"}


@pytest.mark.parametrize("how", ["put", "update", "delete"])
@pytest_twisted.ensureDeferred
async def test_store_change_reaches_cached_case_variants(store, how):
    await wait(store.put_id_tag("ABC"))
    assert await info(store, "abc") == {"status": "Accepted"}  # found ignoring case, cached as "abc"
    assert await info(store, "Abc") == {"status": "Accepted"}
    assert await functions_run_by(store, lambda: info(store, "abc")) == ({"status": "Accepted"}, 0)
    await wait(blocked_through(store, how, "ABC"))
    assert await info(store, "abc") == EXPECTED[how]
    assert await info(store, "Abc") == EXPECTED[how]


@pytest_twisted.ensureDeferred
async def test_change_behind_the_stores_back_is_seen_after_the_ttl(store):
    await wait(store.put_id_tag("TAG-1"))
    assert await info(store, "TAG-1") == {"status": "Accepted"}

    def block(conn):  # hand-written SQL, as another process would: the store knows nothing of it
        conn.execute(update(core_tables.id_tags).where(core_tables.id_tags.c.id_tag == "TAG-1")
                     .values(status="Blocked"))
    await wait(store.db.run(block))
    # Within the ttl the cache may (and does) serve the old answer, without asking the database.
    assert await functions_run_by(store, lambda: info(store, "TAG-1")) == ({"status": "Accepted"}, 0)
    store.clock.advance(TTL - 1)
    assert await functions_run_by(store, lambda: info(store, "TAG-1")) == ({"status": "Accepted"}, 0)
    store.clock.advance(1)
    assert await functions_run_by(store, lambda: info(store, "TAG-1")) == ({"status": "Blocked"}, 1)


def start_payload(tag: str, connector: int = 1, meter: int = 0) -> dict:
    return {"connectorId": connector, "idTag": tag, "meterStart": meter, "timestamp": "2024-01-01T00:00:00Z"}


def stop_payload(transaction_id: int, tag: str | None = None) -> dict:
    payload = {"transactionId": transaction_id, "meterStop": 10, "timestamp": "2024-01-01T01:00:00Z"}
    if tag is not None:
        payload["idTag"] = tag
    return payload


@pytest.mark.parametrize("stop_with_tag", [True, False], ids=["stop_with_idtag", "stop_without_idtag"])
@pytest_twisted.ensureDeferred
async def test_concurrent_tx_follows_start_and_stop(store, stop_with_tag):
    await wait(store.put_id_tag("TAG-1"))
    # Cached with "no open transaction" first, so a stale cache would keep answering Accepted.
    assert await info(store, "TAG-1", check_concurrent=True) == {"status": "Accepted"}
    assert await functions_run_by(store, lambda: info(store, "TAG-1", True)) == ({"status": "Accepted"}, 0)

    transaction, created = await wait(store.start_transaction("CP-1", start_payload("TAG-1"), {"status": "Accepted"}))
    assert created and transaction["active"]
    # Known from the start's commit: no query needed.
    assert await functions_run_by(store, lambda: info(store, "TAG-1", True)) == ({"status": "ConcurrentTx"}, 0)
    # Without the ConcurrentTx question (StartTransaction's own lookup) the tag is just Accepted.
    assert await info(store, "TAG-1", check_concurrent=False) == {"status": "Accepted"}

    stopped, newly = await wait(store.stop_transaction(
        "CP-1", stop_payload(transaction["transaction_id"], "TAG-1" if stop_with_tag else None)))
    assert newly and not stopped["active"]
    assert await info(store, "TAG-1", check_concurrent=True) == {"status": "Accepted"}


@pytest_twisted.ensureDeferred
async def test_concurrent_tx_reaches_cached_case_variants(store):
    await wait(store.put_id_tag("ABC"))
    for variant in ("ABC", "abc"):
        assert await info(store, variant, check_concurrent=True) == {"status": "Accepted"}
    transaction, _ = await wait(store.start_transaction("CP-1", start_payload("abc"), {"status": "Accepted"}))
    for variant in ("ABC", "abc"):
        assert await info(store, variant, check_concurrent=True) == {"status": "ConcurrentTx"}
    await wait(store.stop_transaction("CP-1", stop_payload(transaction["transaction_id"], "abc")))
    for variant in ("ABC", "abc"):
        assert await info(store, variant, check_concurrent=True) == {"status": "Accepted"}


@pytest_twisted.ensureDeferred
async def test_concurrent_tx_check_off_never_answers_concurrent_tx(store_factory):
    store = store_factory(concurrent_tx=False)
    await wait(store.put_id_tag("TAG-1"))
    await wait(store.start_transaction("CP-1", start_payload("TAG-1"), {"status": "Accepted"}))
    assert await info(store, "TAG-1", check_concurrent=True) == {"status": "Accepted"}
    assert await info(store, "TAG-1", check_concurrent=True) == {"status": "Accepted"}


@pytest_twisted.ensureDeferred
async def test_blocked_tag_with_open_transaction_is_blocked_not_concurrent_tx(store):
    await wait(store.put_id_tag("TAG-1"))
    await wait(store.start_transaction("CP-1", start_payload("TAG-1"), {"status": "Accepted"}))
    assert await info(store, "TAG-1", check_concurrent=True) == {"status": "ConcurrentTx"}
    await wait(store.put_id_tag("TAG-1", "Blocked"))
    assert await info(store, "TAG-1", check_concurrent=True) == {"status": "Blocked"}


# -- the cache through the running CSMS (plugin wiring, id_tag_cache_seconds) ------------------------------


def statements_on(engine, needle: str):
    seen: list[str] = []

    def listen(conn, cursor, statement, *rest):
        if needle in statement:
            seen.append(statement)
    event.listen(engine, "before_cursor_execute", listen)
    return seen, lambda: event.remove(engine, "before_cursor_execute", listen)


@pytest.mark.parametrize("seconds, reads", [(None, 1), (0, 3)], ids=["default_ttl", "cache_off"])
@pytest_twisted.ensureDeferred
async def test_authorize_through_the_csms_uses_the_cache(csms_factory, seconds, reads):
    config = "" if seconds is None else f"[plugin:core]\nid_tag_cache_seconds = {seconds}\n"
    csms = await csms_factory(config_text=config)
    store = csms.app.pm.get_plugin("core").store
    await wait(store.put_id_tag("AUTH-1"))
    station = await wait(csms.connect_booted("CP-AUTH"))
    seen, stop = statements_on(csms.app.db.engine, "core_id_tags")
    try:
        for _ in range(3):
            assert await wait(station.call("Authorize", {"idTag": "AUTH-1"})) == {"idTagInfo": {"status": "Accepted"}}
    finally:
        stop()
    # An Authorize reads the tag (one statement, exact match) and then nothing when cached.
    assert len(seen) == reads
    await wait(store.put_id_tag("AUTH-1", "Blocked"))
    assert await wait(station.call("Authorize", {"idTag": "AUTH-1"})) == {"idTagInfo": {"status": "Blocked"}}


# -- C. Database.insert_many -------------------------------------------------------------------------------


bulk_metadata = MetaData()
bulk = Table(
    "cache_bulk_probe", bulk_metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("at", DateTime(timezone=True)),
    Column("value", String(32), nullable=False),
    Column("note", String(64)),
)
# The same columns, filled through SQLAlchemy's own INSERT: what insert_many must read back like.
twin = Table(
    "cache_bulk_twin", bulk_metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("at", DateTime(timezone=True)),
    Column("value", String(32), nullable=False),
    Column("note", String(64)),
)
COLUMNS = ("id", "at", "value", "note")


@pytest.fixture
def db(database_url):
    database = Database(database_url, reactor)
    database.start()
    database.run_sync(bulk_metadata.create_all)
    yield database
    database.stop()


def rows_of(table, ids=None):
    def thd(conn):
        query = select(table).order_by(table.c.id)
        if ids is not None:
            query = query.where(table.c.id.in_(ids))
        return [tuple(row) for row in conn.execute(query)]
    return thd


async def hold_the_pool(db: Database):
    """Occupy every pool thread; work queued meanwhile runs as one group. Returns (release, holds).

    One hold at a time, each running before the next is queued: a drain takes everything queued
    when it starts, so holds queued together would run one after the other on one thread.
    """
    from twisted.internet import threads

    release = threading.Event()
    holds = []
    for _ in range(db.pool.max):
        started = threading.Event()

        def hold(conn, started=started):
            started.set()
            release.wait(TIMEOUT)
        holds.append(db.run(hold, desc="hold"))
        assert await wait(threads.deferToThread(started.wait, TIMEOUT))
    return release, holds


async def release_pool(release, holds):
    release.set()
    for hold in holds:
        await wait(hold)


def as_utc(value):
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc)
    return value


@pytest_twisted.ensureDeferred
async def test_held_rows_are_read_later_in_the_same_function(db):
    def thd(conn):
        db.insert_many(conn, bulk, COLUMNS, [(1, None, "one", None), (2, None, "two", "n")])
        assert db._local.pending  # held, not written yet
        return [tuple(row) for row in conn.execute(select(bulk.c.id, bulk.c.value).order_by(bulk.c.id))]

    assert await wait(db.run(thd)) == [(1, "one"), (2, "two")]
    assert await wait(db.run(rows_of(bulk))) == [(1, None, "one", None), (2, None, "two", "n")]


@pytest_twisted.ensureDeferred
async def test_held_rows_are_read_by_the_next_function_of_the_group(db):
    release, holds = await hold_the_pool(db)
    before = db.stats["transactions"]

    def write(conn):
        db.insert_many(conn, bulk, COLUMNS, [(1, None, "one", None)])
        return "written"

    def write_more(conn):
        db.insert_many(conn, bulk, COLUMNS, [(2, None, "two", None)])
        return "written"

    def count(conn):
        return conn.execute(select(bulk.c.id).order_by(bulk.c.id)).scalars().all()

    works = [db.run(write), db.run(write_more), db.run(count)]
    await release_pool(release, holds)
    assert [await wait(w) for w in works] == ["written", "written", [1, 2]]
    if db.pool.max == 1:
        assert db.stats["transactions"] - before == 2  # the hold's own, then one for the whole group
    assert await wait(db.run(rows_of(bulk))) == [(1, None, "one", None), (2, None, "two", None)]


@pytest_twisted.ensureDeferred
async def test_many_rows_in_chunks_read_back_as_sqlalchemy_writes_them(db):
    count = 2 * BULK_ROWS + 88
    base = datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
    plus_two = timezone(timedelta(hours=2))
    rows = []
    for i in range(count):
        if i % 7 == 0:
            at = None
        elif i % 11 == 0:
            at = (base + timedelta(seconds=i)).astimezone(plus_two)  # an aware datetime not in UTC
        else:
            at = base + timedelta(seconds=i, microseconds=i)
        rows.append((i, at, f"value-{i}", None if i % 3 else f"note-{i}"))

    def thd(conn):
        db.insert_many(conn, bulk, COLUMNS, rows)
        conn.execute(twin.insert(), [dict(zip(COLUMNS, row)) for row in rows])
    await wait(db.run(thd))

    stored = await wait(db.run(rows_of(bulk)))
    assert len(stored) == count
    assert stored == await wait(db.run(rows_of(twin)))  # exactly what SQLAlchemy's own INSERT stores
    utc_rows = [(i, at, value, note) for i, at, value, note in rows if at is None or at.tzinfo is timezone.utc]
    by_id = {row[0]: row for row in stored}
    assert [(i, as_utc(at), value, note) for i, at, value, note in (by_id[r[0]] for r in utc_rows)] == utc_rows


@pytest_twisted.ensureDeferred
async def test_rows_held_for_several_tables_go_in_one_statement_on_postgresql(db, monkeypatch):
    """PostgreSQL: the held rows of several tables are written by as few statements as its parameter limit
    allows, each part a WITH query of the last, and every row is stored; a table's second chunk starts a
    statement of its own. SQLite, which has no data-modifying WITH, writes one statement per chunk."""
    import csms.db

    async def write(rows) -> int:
        """``rows`` into bulk, the first three of them into twin, in one function: the statements used."""
        def thd(conn):
            db.insert_many(conn, bulk, COLUMNS, rows)
            db.insert_many(conn, twin, COLUMNS, rows[:3])
        before = db.stats["bulk_statements"]
        await wait(db.run(thd))
        return db.stats["bulk_statements"] - before

    few = [(i, None, f"value-{i}", None) for i in range(10)]
    assert await write(few) == (2 if db.is_sqlite else 1)
    many = [(i, None, f"value-{i}", None) for i in range(100, 100 + BULK_ROWS + 10)]  # two chunks
    assert await write(many) == (3 if db.is_sqlite else 2)  # bulk's first chunk, then its second with twin's
    # Past the parameter limit a new statement begins: bulk's 40 parameters fill it, twin's 12 go apart.
    monkeypatch.setattr(csms.db, "COMBINED_PARAMETERS", 40)
    last = [(i, None, "last", None) for i in range(1000, 1010)]
    assert await write(last) == 2
    assert await wait(db.run(rows_of(bulk))) == few + many + last
    assert await wait(db.run(rows_of(twin))) == few[:3] + many[:3] + last[:3]


@pytest_twisted.ensureDeferred
async def test_the_first_of_duplicated_rows_skipped_is_kept_across_chunks(db):
    """skip_duplicates keeps the row written first, also when the copy comes in a later chunk: a table's
    chunks are written in order, never as parts of one statement (which run in no given order)."""
    rows = [(i, None, "first", None) for i in range(BULK_ROWS)] + [(0, None, "copy", None)]

    def thd(conn):
        db.insert_many(conn, bulk, COLUMNS, rows, skip_duplicates=True)
        db.insert_many(conn, twin, COLUMNS, [(1, None, "other", None)])
    await wait(db.run(thd))
    stored = await wait(db.run(rows_of(bulk, [0])))
    assert stored == [(0, None, "first", None)]


@pytest_twisted.ensureDeferred
async def test_rows_written_with_another_tables_read_back_as_sqlalchemy_writes_them(db):
    """Rows written with another table's (PostgreSQL: in one statement) read back as SQLAlchemy's own
    INSERT stores them (datetimes, NULLs), also after a function that wrote both was rolled back."""
    base = datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
    rows = [(i, None if i % 2 else base + timedelta(seconds=i), f"value-{i}", None if i % 3 else "note")
            for i in range(6)]

    def failing(conn):
        db.insert_many(conn, bulk, COLUMNS, rows[:2])
        db.insert_many(conn, twin, COLUMNS, rows[:1])
        conn.execute(select(bulk.c.id)).all()  # the held rows are written here
        raise ValueError("rolled back")
    with pytest.raises(ValueError):
        await wait(db.run(failing))
    assert await wait(db.run(rows_of(bulk))) == []

    def thd(conn):
        db.insert_many(conn, bulk, COLUMNS, rows)
        db.insert_many(conn, twin, COLUMNS, rows[:3])
    await wait(db.run(thd))
    stored = await wait(db.run(rows_of(bulk)))
    assert await wait(db.run(rows_of(twin))) == stored[:3]
    assert [(i, as_utc(at), value, note) for i, at, value, note in stored] == rows


@pytest_twisted.ensureDeferred
async def test_a_failing_part_of_a_combined_write_fails_the_whole_function(db):
    """A duplicate in one table's rows fails the function, and no other table's rows of it are kept."""
    await wait(db.run(lambda conn: db.insert_many(conn, twin, COLUMNS, [(7, None, "first", None)])))

    def thd(conn):
        db.insert_many(conn, bulk, COLUMNS, [(1, None, "kept?", None)])
        db.insert_many(conn, twin, COLUMNS, [(7, None, "duplicate", None)])
    with pytest.raises(IntegrityError):
        await wait(db.run(thd))
    assert await wait(db.run(rows_of(bulk))) == []
    assert await wait(db.run(rows_of(twin))) == [(7, None, "first", None)]


@pytest_twisted.ensureDeferred
async def test_failing_held_rows_fail_their_function_alone(db):
    release, holds = await hold_the_pool(db)
    isolated = db.stats["isolated"]

    def good(first):
        def thd(conn):
            db.insert_many(conn, bulk, COLUMNS, [(first, None, "ok", None), (first + 1, None, "ok", None)])
            return first
        return thd

    def bad(conn):  # NULL into a NOT NULL column: fails only when the held rows are written
        db.insert_many(conn, bulk, COLUMNS, [(100, None, "fine", None), (101, None, None, None)])
        return "should not commit"

    first, failing, last = db.run(good(1)), db.run(bad), db.run(good(3))
    await release_pool(release, holds)
    assert await wait(first) == 1
    with pytest.raises(Exception) as caught:
        await wait(failing)
    assert await wait(last) == 3
    dbapi_integrity = db.engine.dialect.loaded_dbapi.IntegrityError
    assert isinstance(caught.value, (IntegrityError, dbapi_integrity)), repr(caught.value)
    assert [row[0] for row in await wait(db.run(rows_of(bulk)))] == [1, 2, 3, 4]
    if db.pool.max == 1:
        assert db.stats["isolated"] - isolated == 1


@pytest_twisted.ensureDeferred
async def test_failing_held_rows_raise_sqlalchemys_integrity_error(db):
    """What a caller can catch does not depend on whether a statement followed the held rows."""
    def bad(conn):
        db.insert_many(conn, bulk, COLUMNS, [(1, None, None, None)])

    def bad_then_read(conn):
        db.insert_many(conn, bulk, COLUMNS, [(1, None, None, None)])
        conn.execute(select(bulk.c.id)).all()

    with pytest.raises(IntegrityError):
        await wait(db.run(bad_then_read))
    with pytest.raises(IntegrityError):
        await wait(db.run(bad))


@pytest_twisted.ensureDeferred
async def test_a_failing_duplicate_key_in_held_rows_rolls_back_its_savepoint_only(db):
    release, holds = await hold_the_pool(db)

    def dup(conn):
        conn.execute(bulk.insert().values(id=50, value="own statement"))
        db.insert_many(conn, bulk, COLUMNS, [(60, None, "a", None), (60, None, "b", None)])

    def good(conn):
        db.insert_many(conn, bulk, COLUMNS, [(70, None, "ok", None)])
        return conn.execute(select(bulk.c.id).where(bulk.c.id >= 50).order_by(bulk.c.id)).scalars().all()

    failing, after = db.run(dup), db.run(good)
    await release_pool(release, holds)
    with pytest.raises(Exception) as caught:
        await wait(failing)
    assert isinstance(caught.value, (IntegrityError, db.engine.dialect.loaded_dbapi.IntegrityError))
    assert await wait(after) == [70]  # the failing function's own statement rolled back with its rows
    assert [row[0] for row in await wait(db.run(rows_of(bulk)))] == [70]


def test_insert_many_outside_run_writes_at_once(db, database_url):
    from sqlalchemy import create_engine

    def thd(conn):
        db.insert_many(conn, bulk, COLUMNS, [(1, datetime(2024, 1, 1, tzinfo=timezone.utc), "now", None)])
        assert not getattr(db._local, "pending", None)
        # Written already: the raw DB-API cursor sees it before any SQLAlchemy statement runs.
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            cursor.execute("SELECT count(*) FROM cache_bulk_probe")
            return cursor.fetchone()[0]
        finally:
            cursor.close()

    assert db.run_sync(thd) == 1
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            assert [(r[0], as_utc(r[1]), r[2]) for r in conn.execute(select(bulk.c.id, bulk.c.at, bulk.c.value))] \
                == [(1, datetime(2024, 1, 1, tzinfo=timezone.utc), "now")]
    finally:
        engine.dispose()


# -- C. a pool thread's broken connection is replaced -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connection_invalidated_by_a_function_is_replaced(db):
    class Gone(Exception):
        pass

    def breaks(conn):
        conn.execute(bulk.insert().values(id=1, value="lost"))
        conn.invalidate()
        raise Gone("connection invalidated")

    with pytest.raises(Gone):
        await wait(db.run(breaks))

    def works(conn):
        db.insert_many(conn, bulk, COLUMNS, [(2, None, "bulk", None)])
        conn.execute(bulk.insert().values(id=3, value="plain"))
        return conn.execute(select(bulk.c.id).order_by(bulk.c.id)).scalars().all()

    for _ in range(3):  # whichever pool thread takes it
        assert await wait(db.run(works)) == [2, 3]
        await wait(db.run(lambda conn: conn.execute(bulk.delete())))


def kill_kept_connections(db: Database) -> int:
    """Close the DB-API connection under every connection the pool threads keep (the server went away)."""
    killed = 0
    for conn in list(db._connections):
        if not conn.closed and not conn.invalidated:
            conn.connection.dbapi_connection.close()
            killed += 1
    return killed


@pytest.mark.parametrize("first_statement", ["sqlalchemy", "held_rows"])
@pytest_twisted.ensureDeferred
async def test_dead_connection_is_replaced_and_the_work_retried(db, first_statement):
    # Let every pool thread make its connection first (each busy at once, so each is used).
    release, holds = await hold_the_pool(db)
    await release_pool(release, holds)
    assert kill_kept_connections(db) >= 1
    await assert_work_is_retried_on_a_new_connection(db, first_statement)


async def assert_work_is_retried_on_a_new_connection(db: Database, first_statement: str) -> None:
    """After the kept connections died: the next work is retried and succeeds, and so does later work on
    whichever thread. Its first statement is SQLAlchemy's, or the writing of rows insert_many held."""
    retries = db.stats["retries"]

    def work(conn):
        if first_statement == "sqlalchemy":
            conn.execute(bulk.insert().values(id=1, value="plain"))
        else:
            db.insert_many(conn, bulk, COLUMNS, [(1, None, "bulk", None)])
        return "done"

    assert await wait(db.run(work)) == "done"
    assert db.stats["retries"] > retries
    results = await wait(defer.gatherResults([db.run(rows_of(bulk)) for _ in range(2 * db.pool.max)]))
    assert all(len(r) == 1 for r in results)


# -- D. MeterValues: the owner shortcut -------------------------------------------------------------------


def meter_payload(transaction_id, connector: int = 1, value: str = "10") -> dict:
    """One sample, taken at minute ``value`` (the same sample at the same time would be stored once)."""
    payload = {"connectorId": connector, "meterValue": [
        {"timestamp": f"2024-01-01T00:{int(value):02d}:00Z", "sampledValue": [{"value": value}]}]}
    if transaction_id is not None:
        payload["transactionId"] = transaction_id
    return payload


def meter_rows(store, station_id):
    mv = core_tables.meter_values

    def thd(conn):
        return [(r.station_id, r.transaction_id, r.value) for r in
                conn.execute(select(mv).where(mv.c.station_id == station_id).order_by(mv.c.id))]
    return store.db.run(thd)


@pytest_twisted.ensureDeferred
async def test_meter_values_of_a_known_owner_skip_the_ownership_query(store, store_factory):
    transaction, _ = await wait(store.start_transaction("CP-1", start_payload("TAG-1"), {"status": "Accepted"}))
    tx = transaction["transaction_id"]
    seen, stop = statements_on(store.db.engine, "core_transactions")
    try:
        assert await wait(store.record_meter_values("CP-1", meter_payload(tx, value="11"))) == tx
        assert seen == []  # owner known from the start: no ownership query
        assert await wait(store.record_meter_values("CP-2", meter_payload(tx, value="22"))) is None
        assert len(seen) == 1  # another station quoting the id is checked
        assert await wait(store.record_meter_values("CP-2", meter_payload(tx, value="23"))) is None
        assert len(seen) == 2  # and checked again: a refusal is not remembered as ownership
        assert await wait(store.record_meter_values("CP-1", meter_payload(tx, value="12"))) == tx
        assert len(seen) == 2  # the foreign station did not take the transaction over

        # A store that has not seen the start (another process) asks once, then remembers.
        other = store_factory(db=store.db)
        assert await wait(other.record_meter_values("CP-1", meter_payload(tx, value="13"))) == tx
        assert len(seen) == 3
        assert await wait(other.record_meter_values("CP-1", meter_payload(tx, value="14"))) == tx
        assert len(seen) == 3
    finally:
        stop()
    assert await wait(meter_rows(store, "CP-1")) == [("CP-1", tx, v) for v in ("11", "12", "13", "14")]
    assert await wait(meter_rows(store, "CP-2")) == [("CP-2", None, "22"), ("CP-2", None, "23")]


@pytest_twisted.ensureDeferred
async def test_meter_values_for_an_unknown_transaction_are_stored_unlinked(store):
    seen, stop = statements_on(store.db.engine, "core_transactions")
    try:
        assert await wait(store.record_meter_values("CP-1", meter_payload(4242))) is None
        assert len(seen) == 1
    finally:
        stop()
    assert await wait(meter_rows(store, "CP-1")) == [("CP-1", None, "10")]


@pytest_twisted.ensureDeferred
async def test_held_rows_failing_under_the_next_functions_statement_are_not_blamed_on_it(db):
    """A function's held rows are written just before the NEXT function's first statement; should they
    fail there, the error must not pass for that statement's own (a function that handles its own
    IntegrityError, like the firmware store's insert, must not swallow another function's failure)."""
    await wait(db.run(lambda conn: conn.execute(bulk.insert().values(id=1, value="existing"))))
    release, holds = await hold_the_pool(db)

    def bad(conn):  # a duplicate of the existing row: fails when written
        db.insert_many(conn, bulk, COLUMNS, [(2, None, "new", None), (1, None, "duplicate", None)])
        return "stored"

    def careful(conn):
        try:
            conn.execute(bulk.insert().values(id=3, value="careful"))
        except IntegrityError:
            return "taken"
        return "inserted"

    failing, other = db.run(bad), db.run(careful)
    await release_pool(release, holds)
    outcome = await wait(other)
    try:
        bad_result = await wait(failing)
    except Exception as exc:  # noqa: BLE001 - any failure is the right outcome for it
        bad_result = exc
    stored = [row[0] for row in await wait(db.run(rows_of(bulk)))]
    assert (outcome, stored) == ("inserted", [1, 3]), (outcome, bad_result, stored)
    assert isinstance(bad_result, Exception), f"bad() reported {bad_result!r} but its rows are not stored"



@pytest_twisted.ensureDeferred
async def test_a_function_handling_its_own_integrity_error_does_not_undo_its_group(db):
    """The firmware store's pattern: ``try: insert except IntegrityError: return None``. In a group commit
    on PostgreSQL the failed statement aborts the shared transaction; the other functions must still
    either commit or fail, never report success for work that was rolled back."""
    await wait(db.run(lambda conn: conn.execute(bulk.insert().values(id=1, value="existing"))))
    release, holds = await hold_the_pool(db)

    def plain(key):
        def thd(conn):
            conn.execute(bulk.insert().values(id=key, value="plain"))
            return key
        return thd

    def careful(conn):
        try:
            with conn.begin_nested():  # the documented way to catch a statement's error and go on
                conn.execute(bulk.insert().values(id=1, value="duplicate"))
        except IntegrityError:
            return "taken"
        return "inserted"

    works = [db.run(plain(10)), db.run(careful), db.run(plain(11))]
    await release_pool(release, holds)
    outcomes = []
    for work in works:
        try:
            outcomes.append(await wait(work))
        except Exception as exc:  # noqa: BLE001
            outcomes.append(exc)
    stored = [row[0] for row in await wait(db.run(rows_of(bulk)))]
    assert outcomes == [10, "taken", 11] and stored == [1, 10, 11], (outcomes, stored)


@pytest_twisted.ensureDeferred
async def test_a_function_catching_a_statement_error_without_a_savepoint_fails_alone(db):
    """Without its own SAVEPOINT a caught statement error poisons a PostgreSQL transaction: that
    function fails (TransactionAborted) instead of the group silently rolling back at COMMIT; SQLite
    rolls back only the statement, so there the function's own answer stands. The others commit."""
    await wait(db.run(lambda conn: conn.execute(bulk.insert().values(id=1, value="existing"))))
    release, holds = await hold_the_pool(db)

    def plain(key):
        def thd(conn):
            conn.execute(bulk.insert().values(id=key, value="plain"))
            return key
        return thd

    def careless(conn):
        try:
            conn.execute(bulk.insert().values(id=1, value="duplicate"))
        except IntegrityError:
            return "taken"
        return "inserted"

    works = [db.run(plain(10)), db.run(careless), db.run(plain(11))]
    await release_pool(release, holds)
    outcomes = []
    for work in works:
        try:
            outcomes.append(await wait(work))
        except Exception as exc:  # noqa: BLE001
            outcomes.append(exc)
    stored = [row[0] for row in await wait(db.run(rows_of(bulk)))]
    assert outcomes[0] == 10 and outcomes[2] == 11 and stored == [1, 10, 11], (outcomes, stored)
    if db.is_sqlite:
        assert outcomes[1] == "taken"
    else:
        assert isinstance(outcomes[1], TransactionAborted), outcomes


@pytest.mark.postgresql_only  # a server to lose is PostgreSQL's (deselected on SQLite, see conftest)
@pytest.mark.parametrize("first_statement", ["sqlalchemy", "held_rows"])
@pytest_twisted.ensureDeferred
async def test_postgresql_backend_terminated_is_replaced_and_the_work_retried(db, database_url, first_statement):
    from sqlalchemy import create_engine
    from twisted.internet import threads

    # Let every pool thread make its connection first (each busy at once, so each is used).
    release, holds = await hold_the_pool(db)
    await release_pool(release, holds)
    pids = [conn.connection.dbapi_connection.info.backend_pid for conn in db._connections
            if not conn.closed and not conn.invalidated]
    assert pids

    def terminate():
        engine = create_engine(database_url)
        try:
            with engine.begin() as conn:
                return [conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
                        for pid in pids]
        finally:
            engine.dispose()
    assert all(await wait(threads.deferToThread(terminate)))
    await assert_work_is_retried_on_a_new_connection(db, first_statement)


@pytest_twisted.ensureDeferred
async def test_a_connection_outside_the_pool_threads_is_still_available(db):
    """Every pool thread keeps a connection for good; run_sync (start-up, the admin tool) must still get one
    at once instead of waiting for a pool slot that never frees."""
    release, holds = await hold_the_pool(db)
    await release_pool(release, holds)
    assert len([conn for conn in db._connections if not conn.closed]) == db.pool.max
    assert db.run_sync(lambda conn: conn.execute(text("SELECT 1")).scalar()) == 1
