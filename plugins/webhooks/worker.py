"""The delivery worker: the dispatcher in a process of its own, beside the OCPP process.

Delivering webhooks costs CPU (signing, POSTs, reading answers, recording outcomes) and, in the CSMS
process, it would take that from the reactor thread and the GIL that OCPP traffic needs. With
``[plugin:webhooks] delivery = worker`` (the default) the CSMS only writes events into the outbox, in
the transactions of their changes, and this process sends them: the CSMS starts it
(:class:`WorkerProcess`), restarts it when it dies and stops it when it stops; the worker stops by
itself when the CSMS goes away (its standard input closes), even after a ``kill -9``.

One process delivers for a database at a time: the holder of the delivery lock (a PostgreSQL advisory
lock on a connection of its own, or an exclusive ``flock`` beside an SQLite file). In a cluster every
node starts a worker; the others stand by and one takes over within :data:`LOCK_RETRY` seconds of the
holder's end. With ``delivery = external`` the CSMS starts none, and the operator runs
``csms-admin webhooks deliver`` (the same worker, from the config file) where they like.

The pipe between the two carries little: ``poke`` lines to the worker (a test-fire, a resumed
subscription: look at the outbox now), and JSON lines back (log events, delivery counts for the
metrics, whether it holds the lock).
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
from collections import Counter

from sqlalchemy import event
from twisted.application import service
from twisted.internet import defer, error, protocol, task, threads
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger, LogLevel, PredicateResult, formatEvent, globalLogBeginner
from twisted.python import threadable

from zope.interface import implementer

from csms.db import DatabaseStopped
from csms.logs import level_predicate, redact

log = Logger(namespace="csms.webhooks")

#: The environment variable carrying the worker's settings (JSON) from the CSMS.
SPEC_VARIABLE = "CSMS_WEBHOOKS_WORKER"
#: Seconds between two tries for the delivery lock while another process holds it, and between two
#: checks that the lock's connection is still there while holding it.
LOCK_RETRY = 2.0
#: Seconds between two reports of the delivery counts to the CSMS.
REPORT_INTERVAL = 1.0
#: The advisory lock's first key on PostgreSQL (any fixed 32-bit number; this one reads "cswh"); the
#: second is a hash of the schema, so that CSMS installations sharing a database in schemas of their
#: own each have their delivery lock.
ADVISORY_CLASS = 0x63737768
#: Restarts of a worker that died: first after this many seconds, doubling up to RESTART_MAX.
RESTART_FIRST, RESTART_MAX = 1.0, 30.0
#: A worker that ran this long before dying is restarted after RESTART_FIRST again.
RESTART_RESET_AFTER = 60.0
#: Seconds a stopping worker has to end before it is killed.
STOP_TIMEOUT = 10.0


def worker_spec(config, settings: dict) -> dict:
    """What the CSMS hands its worker: the database, the webhooks settings and the log level (from the
    configuration as resolved, command-line overrides included)."""
    return {"database": {"url": config.database.url, "sqlite_synchronous": config.database.sqlite_synchronous},
            "settings": settings, "log_level": config.log_level}


# -- the CSMS's side ----------------------------------------------------------------------------------


class WorkerProcess(service.Service):
    """Starts the worker after the database is ready, restarts it when it dies, stops it at shutdown.

    Restarts wait :data:`RESTART_FIRST` seconds, doubling up to :data:`RESTART_MAX` while it keeps dying
    soon after starting (a worker that cannot reach its database does not spin).
    """

    name = "webhooks-worker"

    def __init__(self, plugin, reactor, clock, spec: dict, executable: str = sys.executable):
        self.plugin = plugin
        self.reactor = reactor
        self.clock = clock
        self.spec = spec
        self.executable = executable
        self.protocol: _WorkerProtocol | None = None
        self._delay = RESTART_FIRST
        self._restart = None
        self._started_at = None

    def startService(self):
        service.Service.startService(self)
        self._spawn()

    def _spawn(self) -> None:
        self._restart = None
        env = dict(os.environ)
        env[SPEC_VARIABLE] = json.dumps(self.spec)
        protocol = _WorkerProtocol(self)
        self._started_at = self.clock.seconds()
        try:
            self.reactor.spawnProcess(protocol, self.executable, [self.executable, "-m", "csms_plugins.webhooks"],
                                      env=env, childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as exc:  # no process could be made (a limit, memory): try again later
            log.error("Webhook delivery worker could not be started: {error}; trying again in {delay:g} s",
                      error=exc, delay=self._delay)
            self._restart = self.clock.callLater(self._delay, self._spawn)
            self._delay = min(self._delay * 2, RESTART_MAX)
            return
        self.protocol = protocol
        self.plugin.worker_state(True, False)
        log.info("Webhook delivery worker started (pid {pid})", pid=protocol.transport.pid)

    def poke(self) -> None:
        """Ask the worker to look at the outbox now (it also looks every ``poll_interval`` seconds)."""
        if self.protocol is not None and self.protocol.transport is not None and self.protocol.alive:
            self.protocol.transport.write(b"poke\n")

    def ended(self, worker, reason) -> None:
        if worker is not self.protocol:
            return
        self.protocol = None
        self.plugin.worker_state(False)
        if not self.running:
            return
        ran = self.clock.seconds() - self._started_at
        if ran >= RESTART_RESET_AFTER:
            self._delay = RESTART_FIRST
        self.plugin.worker_restarted()
        log.warn("Webhook delivery worker ended ({reason}); restarting it in {delay:g} s",
                 reason=reason.getErrorMessage(), delay=self._delay)
        self._restart = self.clock.callLater(self._delay, self._spawn)
        self._delay = min(self._delay * 2, RESTART_MAX)

    def stopService(self):
        service.Service.stopService(self)
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        worker = self.protocol
        if worker is None or not worker.alive:
            return None
        worker.transport.closeStdin()  # the worker's cue to finish and exit
        killer = self.reactor.callLater(STOP_TIMEOUT, _kill, worker.transport)
        return worker.gone.addBoth(lambda _: killer.cancel() if killer.active() else None)


def _kill(transport) -> None:
    log.warn("Webhook delivery worker did not stop within {timeout:g} s: killed", timeout=STOP_TIMEOUT)
    try:
        transport.signalProcess("KILL")
    except error.ProcessExitedAlready:
        pass


class _WorkerProtocol(protocol.ProcessProtocol):
    """The CSMS's end of the pipes: relays the worker's log lines and counts."""

    def __init__(self, owner: WorkerProcess):
        self.owner = owner
        self.alive = True
        self.gone = defer.Deferred()
        self._out = b""
        self._err = b""

    def outReceived(self, data: bytes) -> None:
        self._out += data
        *lines, self._out = self._out.split(b"\n")
        for line in lines:
            self._line(line)
        if len(self._out) > 1 << 20:  # a line this long is no message of ours
            self._out = b""

    def errReceived(self, data: bytes) -> None:
        # What the worker wrote before its logging was set up (an import error, a crash): logged as is.
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            if line.strip():
                log.error("Webhook delivery worker: {line}", line=line.decode("utf-8", "replace"))
        if len(self._err) > 1 << 16:
            self._err = b""

    def _line(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            if line.strip():
                log.info("Webhook delivery worker: {line}", line=line.decode("utf-8", "replace"))
            return
        if not isinstance(message, dict):
            return
        if "log" in message:
            level = LogLevel.levelWithName(message["log"]) if message["log"] in _LEVELS else LogLevel.info
            Logger(namespace=str(message.get("ns") or "csms.webhooks")).emit(level, "[webhook worker] {text}",
                                                                              text=message.get("text", ""))
        elif "count" in message:
            for outcome, n in message["count"].items():
                self.owner.plugin.count(outcome, int(n))
        elif "delivering" in message:
            self.owner.plugin.worker_state(True, bool(message["delivering"]))

    def processEnded(self, reason) -> None:
        if self._err.strip():
            self.errReceived(b"\n")
        self.alive = False
        self.owner.ended(self, reason)
        self.gone.callback(None)


_LEVELS = {level.name for level in LogLevel.iterconstants()}


# -- the worker's side --------------------------------------------------------------------------------


class FileLock:
    """The delivery lock beside an SQLite file: an exclusive ``flock`` the kernel drops with the process."""

    def __init__(self, path: str):
        self.path = path
        self.fd = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def try_acquire(self) -> defer.Deferred:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return defer.succeed(False)
        self.fd = fd
        return defer.succeed(True)

    def check(self) -> defer.Deferred:
        return defer.succeed(self.held)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class AdvisoryLock:
    """The delivery lock on PostgreSQL: a session advisory lock on a connection of its own, which the
    server drops with the connection (a dead worker, a lost network) and another worker then takes."""

    def __init__(self, db):
        self.db = db
        self.conn = None
        self.pool = None

    @property
    def held(self) -> bool:
        return self.conn is not None

    def _in_thread(self, f):
        from twisted.python.threadpool import ThreadPool

        if self.pool is None:
            self.pool = ThreadPool(minthreads=1, maxthreads=1, name="csms-webhooks-lock")
            self.pool.start()
        return threads.deferToThreadPool(self.db.reactor, self.pool, f)

    def try_acquire(self) -> defer.Deferred:
        from sqlalchemy import text

        def acquire():
            conn = self.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            try:
                got = conn.execute(text("SELECT pg_try_advisory_lock(:class, hashtext(current_schema()))"),
                                   {"class": ADVISORY_CLASS}).scalar()
            except Exception:
                conn.close()
                raise
            if not got:
                conn.close()
                return None
            return conn

        def acquired(conn):
            self.conn = conn
            return conn is not None
        return self._in_thread(acquire).addCallback(acquired)

    def check(self) -> defer.Deferred:
        from sqlalchemy import text

        conn = self.conn

        def ping():
            conn.execute(text("SELECT 1"))

        def lost(failure):
            log.warn("Webhook delivery lock lost with its connection: {error}", error=failure.getErrorMessage())
            self._drop(conn)
            return False
        return self._in_thread(ping).addCallbacks(lambda _: True, lost)

    def _drop(self, conn) -> None:
        if self.conn is conn:
            self.conn = None
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - a broken connection; closing it is all that is left to do
            pass

    def release(self) -> defer.Deferred:
        """Close the lock's connection (the server then releases the lock) on the lock's thread, not the
        reactor's: closing waits for the server."""
        conn, pool = self.conn, self.pool
        self.pool = None

        def stop_pool(result):
            if pool is not None:
                pool.stop()
            return result
        if conn is None or pool is None:
            if conn is not None:
                self._drop(conn)
            return defer.succeed(None).addBoth(stop_pool)
        self.conn = None
        return threads.deferToThreadPool(self.db.reactor, pool, self._drop, conn).addBoth(stop_pool)


def _commit_without_waiting(dbapi_connection, _record) -> None:
    """PostgreSQL: the worker's commits return before the server has flushed them to disk
    (``synchronous_commit = off``; the server flushes within a fraction of a second, and any later commit
    of the CSMS's waits for everything before it in the log). Its transactions then do not wait for the
    disk the CSMS's commits need, nor make those wait behind theirs. A server crash may undo the
    worker's last ones, each whole and in order: events moved out of the outbox are moved again (the move
    and the deletion are one transaction), outcomes lost are sent again (at least once)."""
    dbapi_connection.execute("SET synchronous_commit = off")
    dbapi_connection.commit()


def delivery_lock(db):
    if db.is_sqlite:
        return FileLock(os.path.abspath(db.url.database) + "-webhooks.lock")
    return AdvisoryLock(db)


class Worker:
    """The delivery worker: the dispatcher, the lock it delivers under, and the pipe to the CSMS."""

    def __init__(self, reactor, spec: dict, report=None):
        from csms.db import Database

        from .delivery_db import open_delivery_database, unsynced
        from .dispatcher import Dispatcher
        from .guard import AddressPolicy, ReceiverGuard, parse_networks
        from .store import WebhookStore

        self.reactor = reactor
        settings = spec["settings"]
        database = spec["database"]
        synchronous = database.get("sqlite_synchronous", "FULL")
        # The main database: read, and written only to prune the outbox (SQLite) or to deliver (PostgreSQL).
        # Its WAL is the CSMS's to checkpoint: two processes checkpointing one file only take turns.
        # SQLite: a prune deletes rows already moved into the (synced) delivery file, so its commit need not
        # wait for the disk while holding the file's write lock, which the OCPP transactions wait for (a
        # prune undone by a power cut is done again); the CSMS's next commit syncs it all the same.
        self.db = Database(database["url"], reactor, pool_size=2, sqlite_synchronous=unsynced(synchronous),
                           checkpoints=False)
        if not self.db.is_sqlite:
            event.listen(self.db.engine, "connect", _commit_without_waiting)
        #: SQLite: the delivery file, where this worker's writes go (delivery_db.py); None on PostgreSQL.
        self.delivery_db = open_delivery_database(self.db, reactor, synchronous=synchronous)
        self.lock = delivery_lock(self.db)
        #: ``report(message)``: a JSON-able message to the CSMS (None: nobody listens).
        self.report = report or (lambda message: None)
        self.counts: Counter = Counter()
        store = WebhookStore(self.db, reactor, self.delivery_db)
        guard = ReceiverGuard(AddressPolicy(parse_networks(settings["allow_private_networks"],
                                                           "allow_private_networks")), reactor.nameResolver)
        self.dispatcher = Dispatcher(store, settings, reactor, reactor, guard, lambda: self.lock.held,
                                     count=self._count)
        self._lock_loop = task.LoopingCall(self._look_at_lock)
        self._report_loop = task.LoopingCall(self._report_counts)
        self._stopping = None
        self._said_standby = False
        self._last_lock_error = None

    def _count(self, outcome: str, n: int) -> None:
        self.counts[outcome] += n

    def _report_counts(self) -> None:
        if self.counts:
            counts, self.counts = dict(self.counts), Counter()
            self.report({"count": counts})

    def start(self) -> defer.Deferred:
        """Open the databases (and bring the delivery file's schema to its head), then look for the lock."""
        from .delivery_db import prepare

        self.db.start()
        if self.delivery_db is None:
            ready = defer.succeed(None)
        else:
            self.delivery_db.start()
            ready = prepare(self.delivery_db)

        def go(_):
            if self._stopping is not None:
                return
            self.dispatcher.startService()
            self._lock_loop.start(LOCK_RETRY, now=True)
            self._report_loop.start(REPORT_INTERVAL, now=False)
        return ready.addCallback(go)

    @defer.inlineCallbacks
    def _look_at_lock(self):
        held_before = self.lock.held
        try:
            held = yield (self.lock.check() if held_before else self.lock.try_acquire())
        except Exception as exc:  # noqa: BLE001 - the database is away: try again at the next round
            error = str(exc).splitlines()[0] if str(exc) else repr(exc)
            if error != self._last_lock_error:  # once per kind of trouble, not every round
                log.warn("Webhook delivery lock: {error} (trying again every {every:g} s)", error=error,
                         every=LOCK_RETRY)
            self._last_lock_error = error
            return
        self._last_lock_error = None
        if held and not held_before:
            log.info("Webhook delivery worker holds the delivery lock: delivering")
            self.report({"delivering": True})
            self.dispatcher.poke()
        elif held_before and not held:
            log.warn("Webhook delivery worker lost the delivery lock: standing by")
            self.report({"delivering": False})
        elif not held and not held_before and not self._said_standby:
            self._said_standby = True
            log.info("Another process holds the webhook delivery lock: standing by")
            self.report({"delivering": False})

    def poke(self) -> None:
        self.dispatcher.poke()

    def stop(self) -> defer.Deferred:
        """Finish: POSTs in flight are cancelled (their deliveries stay pending), the lock is let go."""
        if self._stopping is None:
            self._stopping = self._stop()
        return self._stopping

    @defer.inlineCallbacks
    def _stop(self):
        for loop in (self._lock_loop, self._report_loop):
            if loop.running:
                loop.stop()
        try:
            yield self.dispatcher.stopService()
        finally:
            self._report_counts()
            if self.delivery_db is not None:
                self.delivery_db.stop()
            try:
                yield defer.maybeDeferred(self.lock.release)
            finally:
                self.db.stop()


@implementer(IHalfCloseableProtocol)
class _Pipe(protocol.Protocol):
    """The worker's standard input and output: ``poke`` lines in, JSON lines out; the end of its input
    means the CSMS is gone (or stopping), and the output stays open for the last lines of the worker."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.worker: Worker | None = None
        self.done = None
        self._buffer = b""
        self._closed = defer.Deferred()

    def close(self) -> defer.Deferred:
        """Fires once what was written has reached the CSMS and the pipes are closed (at most 5 s)."""
        if self.transport is not None and not self._closed.called:
            self.transport.loseConnection()  # writes what is buffered first
        if not self._closed.called:
            self._closed.addTimeout(5, self.reactor)
        return self._closed

    def send(self, message: dict) -> None:
        """Write one JSON line to the CSMS, from any thread (a database thread may log)."""
        line = json.dumps(message).encode() + b"\n"
        if threadable.isInIOThread():
            self._write(line)
        else:
            self.reactor.callFromThread(self._write, line)

    def _write(self, line: bytes) -> None:
        if self.transport is not None and not getattr(self.transport, "disconnected", False):
            self.transport.write(line)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if self.worker is not None and any(line.strip() == b"poke" for line in lines):
            self.worker.poke()
        self._buffer = self._buffer[-64:]

    def readConnectionLost(self) -> None:
        if self.done is not None:
            self.done()

    def writeConnectionLost(self) -> None:
        pass  # nobody reads any more: the lines written from now on are dropped

    def connectionLost(self, reason=None) -> None:
        if not self._closed.called:
            self._closed.callback(None)
        if self.done is not None:
            self.done()


def json_log_observer(send, log_level: str):
    """Log events as JSON lines for the CSMS to log (level, namespace, redacted text)."""
    predicate = level_predicate(log_level)

    def observe(event):
        if predicate(event) == PredicateResult.no:
            return
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        level = event.get("log_level")
        send({"log": level.name if level is not None else "info", "ns": event.get("log_namespace"),
              "text": redact(text)})
    return observe


def lower_priority(settings: dict) -> str:
    """Give this process (before it starts threads, which inherit it) a lower CPU priority than the CSMS's,
    so that when both want a CPU, OCPP answers come first: ``worker_nice``, and with ``worker_policy =
    idle`` Linux's SCHED_IDLE, under which any waking process of the normal policy preempts the worker at
    once. Under nice alone the scheduler (EEVDF) may let the worker finish its slice first, and a slice
    is about as long as an OCPP answer's p99. What was applied: "idle" or "normal"."""
    os.nice(int(settings.get("worker_nice", 0)))
    if settings.get("worker_policy", "normal") != "idle":
        return "normal"
    sched_idle = getattr(os, "SCHED_IDLE", None)
    if sched_idle is None:  # not Linux: nice only
        return "normal"
    try:
        os.sched_setscheduler(0, sched_idle, os.sched_param(0))
    except OSError:  # a sandbox refusing it: nice still applies
        return "normal"
    return "idle"


def main() -> int:
    """``python -m csms_plugins.webhooks``, as the CSMS starts it (settings in the environment)."""
    from twisted.internet import reactor, stdio

    raw = os.environ.get(SPEC_VARIABLE)
    if not raw:
        print(f"{SPEC_VARIABLE} is not set: the CSMS starts this worker itself "
              "(or run `csms-admin webhooks deliver`)", file=sys.stderr)
        return 2
    spec = json.loads(raw)
    policy = lower_priority(spec["settings"])
    pipe = _Pipe(reactor)
    stdio.StandardIO(pipe, reactor=reactor)
    globalLogBeginner.beginLoggingTo([json_log_observer(pipe.send, spec.get("log_level", "info"))],
                                     redirectStandardIO=False)
    wanted = spec["settings"].get("worker_policy", "normal")
    if policy != wanted:
        log.warn("Webhook delivery worker: this system refused the {wanted} CPU policy; running at nice {nice} "
                 "only", wanted=wanted, nice=os.nice(0))
    else:
        log.info("Webhook delivery worker: CPU policy {policy}, nice {nice}", policy=policy, nice=os.nice(0))
    return run(reactor, spec, pipe)


def run(reactor, spec: dict, pipe: _Pipe | None = None) -> int:
    """Deliver until told to stop: the pipe from the CSMS closes, or SIGTERM/SIGINT. The exit status."""
    from csms.service import SWITCH_INTERVAL

    # As in the CSMS: the database thread gets the GIL back within 0.5 ms, not 5, when the reactor thread
    # is busy with HTTP; here it matters most inside a write transaction on SQLite, whose lock the
    # CSMS's writer waits for meanwhile.
    sys.setswitchinterval(SWITCH_INTERVAL)
    worker = Worker(reactor, spec, pipe.send if pipe is not None else None)
    status = {"code": 0}

    def finish():
        if not reactor.running:
            return
        status["stopping"] = True
        d = worker.stop()

        def failed(failure):
            status["code"] = 1
            log.failure("Webhook delivery worker: stopping failed", failure)
        d.addErrback(failed)
        if pipe is not None:
            d.addBoth(lambda _: pipe.close())  # the last log lines reach the CSMS before the exit
        d.addBoth(lambda _: reactor.stop() if reactor.running else None)

    def started():
        def failed(failure):  # one clear line and a non-zero exit, not a traceback
            if status.get("stopping") and failure.check(DatabaseStopped):
                log.info("Webhook delivery worker: told to stop before it had started")
                return
            status["code"] = 1
            text = str(failure.value).splitlines()
            log.critical("Webhook delivery worker could not start: {error}",
                         error=text[0] if text else repr(failure.value))
            finish()
        defer.maybeDeferred(worker.start).addErrback(failed)

    if pipe is not None:
        pipe.worker, pipe.done = worker, finish
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: reactor.callFromThread(finish))
    reactor.callWhenRunning(started)
    reactor.run(installSignalHandlers=False)
    return status["code"]

