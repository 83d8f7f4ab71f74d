"""Storage: one SQLAlchemy engine and one dedicated thread pool that every database call runs on.

Plugins never touch a connection on the reactor thread. They write ``thd(conn, ...)`` functions and
call :meth:`Database.run`, which runs the function on the pool and fires the returned Deferred only
after its work is committed. Functions return plain Python values, never live result objects.

Group commit: work queued while the pool is busy runs together in one database transaction, so many
confirmations share one commit (one fsync on SQLite). Should any function of the group fail, the
group is rolled back and run again with each function inside its own SAVEPOINT, so one function's
failure rolls back only its own work. A function may therefore be run more than once (also after a
transient error: a lock, a serialization failure), so it must not have effects outside the database.

A function that catches a statement's error and goes on must run that statement in its own
``with conn.begin_nested():``: PostgreSQL refuses every later statement of a transaction in which one
failed. One that does not fails with :class:`TransactionAborted` instead, alone; nothing is ever
reported committed that was not.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections import deque
from urllib.parse import quote

from sqlalchemy import BigInteger, Integer, bindparam, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import StaticPool
from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from csms.config import display_url

log = Logger(namespace="csms.db")

_TRANSIENT_MARKERS = ("database is locked", "could not serialize", "deadlock detected")
MAX_ATTEMPTS = 3
#: SQLite: seconds a writer waits for the write lock another process holds (the busy timeout's role).
SQLITE_LOCK_TIMEOUT = 30.0
#: SQLite: seconds between two checkpoints of the write-ahead log, on the checkpoint thread.
CHECKPOINT_INTERVAL = 1.0
#: SQLite: WAL pages after which a committing connection checkpoints by itself (SQLite's default is
#: 1,000), in case the checkpoint thread falls behind.
AUTOCHECKPOINT_PAGES = 20000
#: In a connection's ``info``: it is a pool thread's, whose transactions write (see _sqlite_begin).
_WRITER = "csms_writer"
#: Most functions committed together in one group commit.
MAX_BATCH = 200
#: Most rows in one multi-row INSERT of :meth:`Database.insert_many` (SQLite allows 32,766 variables).
BULK_ROWS = 256
#: PostgreSQL: most parameters in one statement combining several multi-row INSERTs (it allows 65,535).
COMBINED_PARAMETERS = 32766


def _combined(statements: list) -> list:
    """PostgreSQL: consecutive INSERTs ``(table, sql, parameters)`` joined into as few statements as the
    parameter limit allows, each earlier one a data-modifying WITH query of the last (``WITH w0 AS (INSERT
    ...) INSERT ...``): one round trip, parse and plan where a transaction wrote rows to several tables (a
    MeterValues: its samples and its webhook outbox row), not one per table. Every part runs whatever the
    others do, and the statement fails whole as the first of the separate ones would have failed the
    transaction. Foreign keys are checked at the end of the statement, so a row may come in a part before
    its parent's. A table's chunks stay in statements of their own, in order: the parts of one statement run
    in no given order, and with ON CONFLICT DO NOTHING the chunk written first keeps a duplicated key."""
    joined, parts, tables, count = [], [], set(), 0

    def close():
        if len(parts) == 1:
            joined.append(parts[0])
        elif parts:
            head = ", ".join(f"w{i} AS ({sql})" for i, (sql, _) in enumerate(parts[:-1]))
            joined.append((f"WITH {head} {parts[-1][0]}", [value for _, params in parts for value in params]))
    for table, sql, params in statements:
        if parts and (table in tables or count + len(params) > COMBINED_PARAMETERS):
            close()
            parts, tables, count = [], set(), 0
        parts.append((sql, params))
        tables.add(table)
        count += len(params)
    close()
    return joined


#: The type of an auto-increment key: BIGINT, because OCPP's integers have no bound and some keys are
#: handed to stations (transaction ids); INTEGER on SQLite, which autoincrements only an
#: ``INTEGER PRIMARY KEY`` (a 64-bit rowid there).
BIG_KEY = BigInteger().with_variant(Integer, "sqlite")


class TransactionAborted(Exception):
    """The database ended or poisoned the transaction (see :meth:`Database._check_usable`)."""


def _is_transient(exc: DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    text = str(exc.orig).lower() if exc.orig is not None else str(exc).lower()
    return isinstance(exc, OperationalError) and any(marker in text for marker in _TRANSIENT_MARKERS)


def _is_locked(exc: Exception) -> bool:
    text = str(getattr(exc, "orig", None) or exc).lower()
    return "locked" in text or "busy" in text


def _attach_readonly(cursor, schema: str, path: str) -> None:
    """ATTACH an SQLite file read only (a ``mode=ro`` URI): BEGIN IMMEDIATE takes the write lock of every
    attached database that can be written, and this one must never be. Refused if this SQLite did not
    read the name as a URI (it would have made a new file of that name)."""
    if not schema.isidentifier():
        raise ValueError(f"not a schema name: {schema!r}")
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cannot attach {path}: no such database file")
    cursor.execute(f"ATTACH DATABASE ? AS {schema}", ("file:" + quote(path) + "?mode=ro",))
    attached = {row[1]: row[2] for row in cursor.execute("PRAGMA database_list").fetchall()}
    if os.path.realpath(attached.get(schema) or "") != os.path.realpath(path):
        raise RuntimeError(f"SQLite did not attach {path} read only (URI filenames are not enabled)")


def _nothing(conn) -> None:
    return None


class DatabaseStopped(Exception):
    """Database work dropped because the Central System stopped before it could run (see discard_queued)."""


class Database:
    """An engine plus its thread pool. ``run(thd, *args)`` -> Deferred firing after commit."""

    def __init__(self, url: str, reactor, pool_size: int = 4, sqlite_synchronous: str = "FULL",
                 attach_readonly: dict | None = None, checkpoints: bool = True):
        """``attach_readonly`` (SQLite): {schema name: path} of database files every connection attaches
        read only. Their tables are then found by their plain names wherever this database has none of
        that name, and a write transaction here never takes their write lock. ``checkpoints`` (SQLite):
        whether this process checkpoints the file's WAL (see _checkpoint); a second process using the
        file (the webhook delivery worker) leaves that to its owner, the CSMS."""
        self.url = make_url(url)
        self.reactor = reactor
        self.dialect_name = self.url.get_backend_name()
        self.is_sqlite = self.dialect_name == "sqlite"
        kwargs: dict = {"future": True}
        threads_max = pool_size
        if self.is_sqlite:
            database = self.url.database or ""
            if database in ("", ":memory:"):
                # One shared in-memory database for every thread of the pool.
                kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
            elif not database.startswith("file:"):
                directory = os.path.dirname(os.path.abspath(database))
                os.makedirs(directory, exist_ok=True)
                kwargs.update(connect_args={"check_same_thread": False, "timeout": 30})
            # SQLite has one writer at a time: one thread avoids lock contention entirely.
            threads_max = 1
        else:
            # Each pool thread keeps one connection for good (see _connection); the overflow serves
            # everything else that opens one (run_sync at start-up, the admin tool, tests), which would
            # otherwise wait for a slot that never frees.
            kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
        self.engine = create_engine(self.url, **kwargs)
        if self.is_sqlite:
            synchronous = sqlite_synchronous.upper()

            @event.listens_for(self.engine, "connect")
            def _sqlite_pragmas(dbapi_connection, _record):
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.execute(f"PRAGMA synchronous={synchronous}")
                # Checkpoints run on a thread of their own (_checkpoint), not inside a commit that OCPP
                # calls wait for; this is only the safety net should that fall behind.
                cursor.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
                for schema, path in (attach_readonly or {}).items():
                    _attach_readonly(cursor, schema, path)
                cursor.close()
                # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin, so that
                # SAVEPOINTs (group commit) behave (SQLAlchemy's documented pysqlite recipe).
                dbapi_connection.isolation_level = None

            @event.listens_for(self.engine, "begin")
            def _sqlite_begin(conn):
                # The pool's writer takes the write lock at once (IMMEDIATE): another process writing the
                # same file (the webhook delivery worker) then makes it wait, where a deferred transaction
                # that had read first would fail at its first write (SQLITE_BUSY_SNAPSHOT, no waiting).
                # Readers and every other connection begin deferred.
                if conn.info.get(_WRITER):
                    self._begin_immediate(conn)
                else:
                    conn.exec_driver_sql("BEGIN")

        self.pool = ThreadPool(minthreads=1, maxthreads=threads_max, name="csms-db")
        # SQLite's one writer thread commits the OCPP traffic: reads that may take a while and need no
        # write (read()) get a thread and a connection of their own, which WAL lets read beside the writer.
        # Not for an in-memory database, whose one connection every thread shares.
        self._reader = None
        #: SQLite (a file): the thread checkpointing the WAL every CHECKPOINT_INTERVAL seconds, and its loop.
        self._checkpointer = None
        self._checkpoints = None
        if self.is_sqlite and kwargs.get("poolclass") is not StaticPool:
            self._reader = ThreadPool(minthreads=1, maxthreads=1, name="csms-db-read")
            if checkpoints:
                self._checkpointer = ThreadPool(minthreads=1, maxthreads=1, name="csms-db-checkpoint")
        self._started = False
        self._queue: deque = deque()
        # Drains scheduled on the pool and not yet finished: at most one per thread, so a busy
        # pool is handed work by the drains already running, not by one pool task per function.
        self._lock = threading.Lock()
        self._drains = 0
        self._max_drains = threads_max
        self._upserts: dict = {}
        self._bulk_inserts: dict = {}
        # Per pool thread: .pending, the rows insert_many holds for its transaction; .conn, its connection.
        self._local = threading.local()
        self._connections: list = []
        event.listen(self.engine, "before_cursor_execute", self._before_cursor_execute)
        #: Counters for the log and /metrics, updated by every pool thread (under ``_stats_lock``).
        self.stats = {"transactions": 0, "functions": 0, "retries": 0, "isolated": 0, "lock_waits": 0,
                      "lock_wait_ms": 0, "bulk_statements": 0}
        self._stats_lock = threading.Lock()
        #: Set by stop(): later work fails at once (DatabaseStopped) instead of waiting for threads that are gone.
        self._stopped = False
        #: ``observe_commit(seconds, functions)``, called on the pool thread after each commit (metrics).
        self.observe_commit = None

    def start(self) -> None:
        if not self._started:
            self.pool.start()
            if self._reader is not None:
                self._reader.start()
            if self._checkpointer is not None:
                from twisted.internet import task

                self._checkpointer.start()
                self._checkpoints = task.LoopingCall(self._checkpoint)
                self._checkpoints.clock = self.reactor
                self._checkpoints.start(CHECKPOINT_INTERVAL, now=False)
            self._started = True

    def stop(self) -> None:
        if self._started:
            stats = self.stats
            # Named: a process may have two (the webhook worker's, beside its SQLite delivery file).
            where = display_url(self.url.render_as_string(hide_password=False))
            if self.is_sqlite:
                log.info("Database {where}: {functions} functions in {transactions} transactions "
                         "({retries} retried, {isolated} rerun in savepoints; waited {lock_waits} times, "
                         "{lock_wait_ms} ms in all, for SQLite's write lock held by another process)",
                         where=where, **stats)
            else:
                # PostgreSQL locks rows, not the database: lock_waits stays 0 there (see _begin_immediate).
                log.info("Database {where}: {functions} functions in {transactions} transactions "
                         "({retries} retried, {isolated} rerun in savepoints)", where=where, **stats)
            self._started = False
            self._stopped = True
            # Work still queued would never run once the pool's threads are gone: fail it instead of
            # leaving its callers waiting for ever (a start-up that failed while a plugin service read).
            self.discard_queued()
            self.pool.stop()
            if self._reader is not None:
                self._reader.stop()
            if self._checkpoints is not None and self._checkpoints.running:
                self._checkpoints.stop()
            if self._checkpointer is not None:
                self._checkpointer.stop()
            # The pool's threads have ended: close the connections they kept.
            for conn in self._connections:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - closing at shutdown; nothing else to do with it
                    log.failure("Closing a database connection at shutdown failed")
            self._connections.clear()
            self.engine.dispose()

    def queued(self) -> int:
        """Functions waiting for a pool thread (for the metrics)."""
        return len(self._queue)

    def run(self, thd, *args, desc: str = "", **kwargs) -> defer.Deferred:
        """Run ``thd(conn, *args, **kwargs)`` on the pool; fires with its result after commit.

        Work queued while every pool thread is busy is taken by the drains already running, and
        shares their next commit.
        """
        if self._stopped:
            return defer.fail(DatabaseStopped("the Central System stopped before this database work ran"))
        d = defer.Deferred()
        with self._lock:
            self._queue.append((thd, args, kwargs, desc, d))
            if self._drains >= self._max_drains:
                return d  # a running drain will take it
            self._drains += 1
        self.pool.callInThread(self._drain)
        return d

    def read(self, thd, *args, desc: str = "", **kwargs) -> defer.Deferred:
        """Run a function that only reads, ``thd(conn, *args, **kwargs)``; fires with its result.

        On SQLite (a file) it runs on a thread and connection of its own, in a read transaction that sees
        what was committed before it began, beside the writer instead of inside its group commits, which
        the OCPP traffic waits for. Elsewhere it is :meth:`run` (PostgreSQL's pool has several threads).
        A function given here must not write.
        """
        if self._reader is None:
            return self.run(thd, *args, desc=desc, **kwargs)
        if not self._started:
            return defer.fail(DatabaseStopped("the Central System stopped before this database work ran"))

        def in_thread():
            conn = self._connection(writer=False)  # the reader thread's own
            with conn.begin():
                return thd(conn, *args, **kwargs)
        return threads.deferToThreadPool(self.reactor, self._reader, in_thread)

    def _begin_immediate(self, conn) -> None:
        """``BEGIN IMMEDIATE`` on a writer connection (busy timeout 0), waiting for the write lock while
        another process holds it: tries again after 0.2 ms, growing to 2 ms steps, for up to
        SQLITE_LOCK_TIMEOUT seconds. SQLite's own busy handler sleeps 1, 2, 5, 10 ms ... between tries,
        so that a lock held for 1.5 ms could cost an OCPP commit 8 ms. Time waited is in ``stats``."""
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # errors as SQLAlchemy reports them: a dead connection too
            return
        except OperationalError as exc:
            if not _is_locked(exc):
                raise
        raw = conn.connection.dbapi_connection
        started = time.perf_counter()
        deadline, delay, began = started + SQLITE_LOCK_TIMEOUT, 0.0002, False
        while not began and time.perf_counter() < deadline:
            time.sleep(delay)
            try:
                raw.execute("BEGIN IMMEDIATE")
                began = True
            except sqlite3.Error as exc:
                if not _is_locked(exc):
                    break
            delay = min(delay * 1.5, 0.002)
        if not began:
            # Locked past the timeout, or another error: raised as SQLAlchemy reports a statement's error.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            return
        self._count(lock_waits=1, lock_wait_ms=int((time.perf_counter() - started) * 1000))

    def _checkpoint(self) -> defer.Deferred:
        """Copy the WAL's committed pages into the database file (SQLite), beside the writer.

        SQLite's own automatic checkpoint runs inside the commit that crosses its threshold, and every
        call waiting for that group commit waits for the copy and its fsync too: with it, the slowest
        OCPP answers were mostly those. A PASSIVE checkpoint waits for nobody and blocks nobody: it
        copies what no reader still needs, and the WAL starts again from its beginning once all of it
        was copied. One at a time; a failure is logged and the next round tries again."""
        def in_thread():
            conn = getattr(self._local, "raw", None)
            if conn is None:
                conn = self._local.raw = self.engine.raw_connection()
                with self._lock:
                    self._connections.append(conn)
            cursor = conn.cursor()
            try:
                cursor.execute("PRAGMA main.wal_checkpoint(PASSIVE)")  # not the read-only attached ones
                cursor.fetchall()
            finally:
                cursor.close()

        def failed(failure):
            log.warn("WAL checkpoint failed (tried again in {interval:g} s): {error}", interval=CHECKPOINT_INTERVAL,
                     error=failure.getErrorMessage())
        return threads.deferToThreadPool(self.reactor, self._checkpointer, in_thread).addErrback(failed)

    def sync_to_disk(self) -> defer.Deferred:
        """SQLite (a file): make every transaction committed so far durable, whatever ``synchronous`` says;
        fires once the disk has it. With ``synchronous = NORMAL`` commits are written to the WAL but synced
        only at checkpoints, which sync the WAL before copying any of it into the database file and let
        the WAL be overwritten only after syncing that file: syncing the WAL file is then enough. Runs on
        the checkpoint thread (or the reader's), never the reactor's."""
        path = os.path.abspath(self.url.database or "")
        pool = self._checkpointer or self._reader
        if not self.is_sqlite or pool is None:
            return defer.succeed(None)

        def in_thread():
            try:
                fd = os.open(path + "-wal", os.O_RDONLY)
            except FileNotFoundError:  # no WAL: every commit is in the (synced) database file
                return
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return threads.deferToThreadPool(self.reactor, pool, in_thread)

    def barrier(self) -> defer.Deferred:
        """Fires once what was queued before it has been committed (or has failed); at once when stopped."""
        if not self._started:
            return defer.succeed(None)
        return self.run(_nothing, desc="barrier")

    def discard_queued(self) -> int:
        """Drop the functions still waiting for a transaction (shutdown, past its grace period); the
        ones being committed finish. Their Deferreds fail with :class:`DatabaseStopped`, so that nothing
        waits for them for ever. Returns how many were dropped. On the reactor thread."""
        with self._lock:
            dropped = list(self._queue)
            self._queue.clear()
        for *_, d in dropped:
            d.errback(DatabaseStopped("the Central System stopped before this database work ran"))
        return len(dropped)

    def _drain(self) -> None:
        """On a pool thread: commit what is queued, up to MAX_BATCH functions per transaction, until
        nothing is left."""
        queue = self._queue
        while True:
            with self._lock:
                if not queue:
                    self._drains -= 1
                    return
                batch = [queue.popleft() for _ in range(min(len(queue), MAX_BATCH))]
            self.reactor.callFromThread(self._fire, batch, self._commit(batch))

    @staticmethod
    def _fire(batch: list, outcomes: list) -> None:
        """On the reactor thread: fire each function's Deferred with its outcome."""
        for (*_, d), (ok, value) in zip(batch, outcomes):
            if ok:
                d.callback(value)
            else:
                d.errback(value)

    def _commit(self, batch: list) -> list:
        """[(ok, result or Failure)] for each function of ``batch``, after one commit.

        Optimistic first: the whole batch in one transaction with no SAVEPOINTs (two statements per
        function saved). If any function fails, or leaves the transaction unusable (a PostgreSQL
        statement error it caught itself), or rows it held fail to insert, that transaction is rolled
        back and the batch runs again with each function in its own SAVEPOINT, so only the failing
        function's work is lost. Nothing is reported committed unless the commit really happened.
        """
        attempt = 1
        isolate = len(batch) == 1
        while True:
            started = time.perf_counter()
            self._local.pending = {}
            self._local.held_rows_failed = None
            try:
                conn = self._connection()
                with conn.begin():
                    if len(batch) == 1:
                        thd, args, kwargs, _, _ = batch[0]
                        outcomes = [(True, thd(conn, *args, **kwargs))]
                    elif not isolate:
                        outcomes = []
                        for thd, args, kwargs, _, _ in batch:
                            outcomes.append((True, thd(conn, *args, **kwargs)))
                            if self._local.held_rows_failed is not None:
                                # An earlier function's held rows failed inside this one's statement:
                                # whatever this one made of that error, find out whose it is.
                                raise self._local.held_rows_failed
                    else:
                        outcomes = [self._in_savepoint(conn, work) for work in batch]
                    self._flush(conn)
                    self._check_usable(conn)
                self._count(transactions=1, functions=len(batch))
                if self.observe_commit is not None:
                    self.observe_commit(time.perf_counter() - started, len(batch))
                return outcomes
            except DBAPIError as exc:
                # A connection the server dropped is invalidated: _connection() replaces it on the retry.
                if not isolate and not _is_transient(exc):
                    isolate = True  # find out which function failed: rerun each in a SAVEPOINT
                    self._count(isolated=1)
                    continue
                if attempt >= MAX_ATTEMPTS or not _is_transient(exc):
                    failure = Failure()
                    return [(False, failure)] * len(batch)
                self._count(retries=1)
                log.warn("Transient database error in {desc}, retrying: {error}",
                         desc=", ".join(sorted({w[3] or w[0].__name__ for w in batch})), error=exc.orig)
                attempt += 1
                time.sleep(0.05 * attempt)  # on the pool thread, never on the reactor
            except Exception:
                if not isolate:
                    isolate = True
                    self._count(isolated=1)
                    continue
                # A lone function failed (or the commit did): its transaction is rolled back.
                failure = Failure()
                return [(False, failure)] * len(batch)
            finally:
                self._local.pending = None
                self._local.held_rows_failed = None

    def _count(self, **increments) -> None:
        # "+=" on a dict item is a read and a write: two pool threads in between would lose one.
        with self._stats_lock:
            for key, amount in increments.items():
                self.stats[key] += amount

    def _check_usable(self, conn) -> None:
        """Raise if the transaction can no longer commit: PostgreSQL turns COMMIT of a transaction in
        error into a silent ROLLBACK, and SQLite ends a transaction by itself on some errors."""
        raw = conn.connection.dbapi_connection
        if self.is_sqlite:
            if not raw.in_transaction:
                raise TransactionAborted("SQLite ended the transaction after an error")
            return
        info = getattr(raw, "info", None)
        status = getattr(info, "transaction_status", None)
        if status is not None and getattr(status, "name", "") == "INERROR":
            raise TransactionAborted("a statement failed and the transaction can no longer commit")

    def _connection(self, writer: bool = True):
        """This pool thread's own connection, kept across transactions: a pool checkout, its reset
        and its return cost more than a small transaction's own statements. One that was invalidated
        (the server went away) or closed is replaced."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and (conn.closed or conn.invalidated):
            with self._lock:
                self._connections.remove(conn)
            conn.close()
            conn = None
        if conn is None:
            conn = self._local.conn = self.engine.connect()
            conn.info[_WRITER] = writer
            if writer and self.is_sqlite:
                # _begin_immediate waits for the write lock itself, in steps far finer than SQLite's
                # busy handler (1, 2, 5, 10 ... ms); inside a write transaction nothing else waits.
                conn.connection.dbapi_connection.execute("PRAGMA busy_timeout = 0")
            with self._lock:
                self._connections.append(conn)
        return conn

    def _in_savepoint(self, conn, work):
        thd, args, kwargs, _, _ = work
        savepoint = conn.begin_nested()
        try:
            result = thd(conn, *args, **kwargs)
            self._flush(conn)  # its held rows fail (and roll back) with it
            self._check_usable(conn)  # it may have caught a statement error itself
            savepoint.commit()
            return True, result
        except DBAPIError as exc:
            self._roll_back(savepoint)
            if _is_transient(exc):
                raise  # the whole group is retried
            return False, Failure()
        except Exception:
            self._roll_back(savepoint)
            return False, Failure()

    @staticmethod
    def _roll_back(savepoint) -> None:
        """Back to the SAVEPOINT, which also clears PostgreSQL's transaction-in-error state; if even
        that fails, the whole group fails (and is not reported committed)."""
        if savepoint.is_active:
            savepoint.rollback()

    def run_sync(self, thd, *args, **kwargs):
        """Run ``thd`` in a transaction on the calling thread: for start-up and for tests only."""
        with self.engine.begin() as conn:
            return thd(conn, *args, **kwargs)

    def insert(self, table):
        """An INSERT that supports ``on_conflict_do_update`` on both SQLite and PostgreSQL."""
        return (sqlite.insert if self.is_sqlite else postgresql.insert)(table)

    def insert_many(self, conn, table, columns: tuple, rows: list, skip_duplicates: bool = False) -> None:
        """INSERT ``rows`` (tuples in ``columns`` order) into ``table``: the bulk path for hot inserts.

        With ``skip_duplicates``, a row that a unique index of the table already holds (or that an
        earlier row of the same batch brings) is left out (ON CONFLICT DO NOTHING), not an error.

        Inside :meth:`run` the rows are held and written, with every other function's rows for the same
        table, as multi-row INSERTs just before the next statement on the connection, the end of the
        function's SAVEPOINT or the commit, whichever comes first; what a function reads therefore
        always includes them. One statement for a whole group commit matters: the sqlite3 driver lets
        go of the GIL for every statement step, and taking it back from a busy reactor thread costs
        far more CPU than the insert itself (see docs/benchmarks.md). Values go through each column
        type's bind processor, as SQLAlchemy would apply them, so what is stored reads back the same.
        No SQL is compiled per call.
        """
        key = (table.name, columns, skip_duplicates)
        prepared = self._bulk_inserts.get(key)
        if prepared is None:
            prepared = self._bulk_inserts[key] = self._prepare_bulk_insert(table, columns, skip_duplicates)
        _, processors = prepared
        if processors:
            converted = []
            for row in rows:
                row = list(row)
                for i, process in processors:
                    if row[i] is not None:
                        row[i] = process(row[i])
                converted.append(row)
            rows = converted
        pending = getattr(self._local, "pending", None)
        if pending is None:  # outside run() (run_sync): write now
            self._write_rows(conn, {key: rows})
            return
        held = pending.get(key)
        if held is None:
            pending[key] = list(rows)
        else:
            held.extend(rows)

    def _prepare_bulk_insert(self, table, columns: tuple, skip_duplicates: bool):
        dialect = self.engine.dialect
        marker = "?" if dialect.paramstyle == "qmark" else "%s"
        preparer = dialect.identifier_preparer
        head = (f"INSERT INTO {preparer.format_table(table)} "
                f"({', '.join(preparer.quote(name) for name in columns)}) VALUES ")
        group = "(" + ", ".join([marker] * len(columns)) + ")"
        # The same words on SQLite and PostgreSQL; no conflict target, so every unique index counts.
        tail = " ON CONFLICT DO NOTHING" if skip_duplicates else ""
        statements: dict[int, str] = {}

        def sql_for(count: int) -> str:
            sql = statements.get(count)
            if sql is None:
                sql = statements[count] = head + ", ".join([group] * count) + tail
            return sql
        processors = [(i, p) for i, name in enumerate(columns)
                      if (p := table.c[name].type._cached_bind_processor(dialect)) is not None]
        return sql_for, processors

    def _write_rows(self, conn, pending: dict) -> None:
        dialect = self.engine.dialect
        raw = conn.connection.dbapi_connection
        cursor = raw.cursor()
        sql = None
        statements = []
        for key, rows in pending.items():
            sql_for, _ = self._bulk_inserts[key]
            for start in range(0, len(rows), BULK_ROWS):
                chunk = rows[start:start + BULK_ROWS]
                statements.append((key[0], sql_for(len(chunk)), [value for row in chunk for value in row]))
        statements = _combined(statements) if not self.is_sqlite else [part[1:] for part in statements]
        try:
            for sql, params in statements:
                cursor.execute(sql, params)
            self._count(bulk_statements=len(statements))
        except dialect.loaded_dbapi.Error as exc:
            # Report it as SQLAlchemy reports any statement's error (IntegrityError, OperationalError...),
            # so callers and the retry logic see one kind of exception whatever wrote the rows.
            disconnect = dialect.is_disconnect(exc, raw, cursor)
            if disconnect:
                conn.invalidate(exc)
            raise DBAPIError.instance(sql, None, exc, dialect.loaded_dbapi.Error, hide_parameters=True,
                                      connection_invalidated=disconnect, dialect=dialect) from exc
        finally:
            cursor.close()

    def _flush(self, conn) -> None:
        """Write the rows :meth:`insert_many` holds for this thread's transaction."""
        pending = getattr(self._local, "pending", None)
        if pending:
            self._local.pending = {}
            self._write_rows(conn, pending)

    def _before_cursor_execute(self, conn, cursor, statement, parameters, context, executemany):
        if getattr(self._local, "pending", None):
            try:
                self._flush(conn)
            except Exception as exc:
                # Rows held by an earlier function of the group: remember it, so the group is rerun in
                # savepoints even if the function whose statement this is catches the error.
                self._local.held_rows_failed = exc
                raise

    def upsert(self, conn, table, keys: dict, values: dict) -> None:
        """Insert ``keys | values`` into ``table``, or update ``values`` where ``keys`` already exist.

        The statement for each (table, columns) shape is built once and reused with bind parameters.
        """
        shape = (table.name, tuple(keys), tuple(values))
        stmt = self._upserts.get(shape)
        if stmt is None:
            insert = self.insert(table).values({name: bindparam(name) for name in (*keys, *values)})
            stmt = insert.on_conflict_do_update(index_elements=list(keys),
                                                set_={name: insert.excluded[name] for name in values})
            self._upserts[shape] = stmt
        conn.execute(stmt, {**keys, **values})
