"""``twistd csms``: command-line options and the service tree (database, plugin services, OCPP and API listeners).

Start-up either brings everything up or stops the process with one line saying what failed, the last
line on stderr: ``csms: cannot start: <what failed>`` (the log has it too, at critical). twistd
gives a non-zero exit status to an exception raised by ``startService`` before its reactor runs (and
tells the parent waiting for a daemon), and to nothing once the reactor runs: it then exits 0 whatever
happened (Twisted #11335). So ``twistd csms`` opens the database and binds every listener inside
``startService``, synchronously; only a plugin service whose start is still pending then (an endpoint
that is not immediate, which no built-in one is) is waited for with the reactor running.
"""
from __future__ import annotations

import atexit
import errno
import os
import signal
import sys

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.python import usage

from csms.config import ConfigError, display_url, load_config, validate

log = Logger(namespace="csms.service")

DEFAULT_CONFIG = os.path.join("etc", "csms.ini")
SWITCH_INTERVAL = 0.0005


class StartupError(Exception):
    """Something the Central System needs could not be started; ``str()`` says what, in one line."""


#: How the line saying why a start failed begins, on stderr and in the log.
CANNOT_START = "csms: cannot start: "


class StartupFailed(SystemExit, Exception):
    """Stops ``twistd csms`` with exit status 1 and one line, ``csms: cannot start: <what failed>``.

    A SystemExit, so that Python prints the line alone (no traceback) and exits 1; an Exception too,
    so that twistd's handler for a service that fails to start still sees it (removes its pid file,
    reports it to the parent of a daemon). ``logged``: twistd's log has begun, and with it its hold on
    ``sys.stderr`` (what Python would print goes to the log): the line is logged, and written on the
    process's own stderr as it exits (:func:`say_at_exit`).
    """

    def __init__(self, message: str, logged: bool = False):
        from csms.logs import redact

        self.message = CANNOT_START + message
        if logged:  # the line on stderr as in the log, redacted the same way (both land in one journal)
            self.message = redact(self.message)
        super().__init__(1 if logged else self.message)

    def __str__(self):
        return self.message


#: What to do about a listener that cannot bind, by errno.
LISTEN_HINTS = {
    errno.EADDRINUSE: "another process listens there: stop it, or choose another port",
    errno.EACCES: "a port below 1024 needs CAP_NET_BIND_SERVICE: see etc/csms.service",
    errno.EADDRNOTAVAIL: "no interface of this host has that address",
}


def is_expected(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure start-up foresees (a setting, a file, a port, the database), which
    :func:`describe` says all there is to say about; anything else is a bug, whose traceback helps."""
    from twisted.internet.error import CannotListenError

    from csms.migrations import SchemaError
    from csms.plugins import PluginError

    return (isinstance(exc, (ConfigError, PluginError, SchemaError, StartupError, CannotListenError, OSError,
                             OverflowError))
            or getattr(exc, "orig", None) is not None)


def where_raised(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame of ``exc``'s traceback (empty without one)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
    if not frames:
        return ""
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


def first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "; ".join(lines) if len(lines) <= 3 else lines[0]


def describe(exc: BaseException) -> str:
    """One line for an operator: what went wrong, without a traceback."""
    from twisted.internet.error import CannotListenError

    from csms.migrations import SchemaError
    from csms.plugins import PluginError

    if isinstance(exc, CannotListenError):
        return f"cannot listen on {exc.interface or '*'}:{exc.port}: {why_not_bound(exc.socketError)}"
    orig = getattr(exc, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's own error
    if orig is not None:
        return first_line(orig) or type(orig).__name__
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror[:1].lower() + exc.strerror[1:]
        return f"{exc.filename}: {reason}" if exc.filename else reason
    if isinstance(exc, OverflowError):  # bind() with a port outside 0-65535
        return first_line(str(exc).replace("bind(): ", "")).rstrip(".")
    if isinstance(exc, (ConfigError, PluginError, SchemaError, StartupError)):
        return first_line(exc)
    return f"{type(exc).__name__}: {first_line(exc)}" if str(exc) else type(exc).__name__


def why_not_bound(exc: BaseException) -> str:
    """Why a listener could not bind, and what to do when that is plain (a port taken, a privileged port)."""
    hint = LISTEN_HINTS.get(getattr(exc, "errno", None))
    return f"{describe(exc)} ({hint})" if hint else describe(exc)


def listen(reactor, endpoint: str, factory, setting: str) -> defer.Deferred:
    """Listen on the Twisted endpoint string ``endpoint``; fires with the port, or fails with a
    StartupError naming the endpoint, the ``setting`` it comes from and why (one line).

    Plugins use it for their own listeners, so that a port already taken stops start-up with a line
    the operator can act on: ``cannot listen on tcp:8090 ([plugin:firmware] http_endpoint): address
    already in use``.
    """
    from twisted.internet.endpoints import serverFromString

    def refused(reason: str) -> StartupError:
        return StartupError(f"cannot listen on {endpoint} ({setting}): {reason}")

    try:
        d = serverFromString(reactor, endpoint).listen(factory)
    except Exception as exc:  # noqa: BLE001 - a malformed string, an unknown type, a missing key file
        return defer.fail(refused(f"not a usable endpoint ({describe(exc)})"))

    def failed(failure):
        from twisted.internet.error import CannotListenError

        cause = failure.value.socketError if failure.check(CannotListenError) else failure.value
        raise refused(why_not_bound(cause))
    return d.addErrback(failed)


class Options(usage.Options):
    """Options given to ``twistd csms`` override the config file."""

    synopsis = "[options]"
    optParameters = [
        ["config", "c", None, f"Config file (default: {DEFAULT_CONFIG} when it exists)"],
        ["port", "p", None, "OCPP WebSocket port (overrides [ocpp] endpoint's port)", int],
        ["ocpp-endpoint", None, None, "OCPP listening endpoint, e.g. tcp:9000 or ssl:9443:privateKey=... "
                                      "(overrides [ocpp] endpoint)"],
        ["api-endpoint", None, None, "Operator HTTP API endpoint (overrides [api] endpoint)"],
        ["database", "d", None, "Database URL, e.g. sqlite:///var/csms.sqlite or "
                                "postgresql+psycopg://user:pw@host/db (overrides [database] url)"],
        ["log-level", "l", None, "debug, info, warn, error or critical (overrides [csms] log_level)"],
    ]

    def postOptions(self):
        try:
            config = load_config(config_path(self["config"]))
            if self["ocpp-endpoint"]:
                config.ocpp.endpoint = self["ocpp-endpoint"]
            if self["port"] is not None:
                config.ocpp.endpoint = with_port(config.ocpp.endpoint, self["port"])
            if self["api-endpoint"]:
                config.api.endpoint = self["api-endpoint"]
            if self["database"]:
                config.database.url = self["database"]
            if self["log-level"]:
                config.log_level = self["log-level"].lower()
            validate(config)
        except ConfigError as exc:
            # One line, not twistd's usage text: nothing is wrong with how the command was typed.
            raise StartupFailed(str(exc)) from None
        self.config = config


def config_path(given: str | None) -> str | None:
    """The config file to read: the one given, else etc/csms.ini when it exists, else none (defaults)."""
    if given is not None:
        return given
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None


def with_port(endpoint: str, port: int) -> str:
    """Replace the port of a ``tcp:PORT[:...]`` / ``ssl:PORT[:...]`` endpoint string."""
    kind, _, rest = endpoint.partition(":")
    params = [p for p in rest.split(":") if p and ("=" in p)] if rest else []
    return ":".join([kind or "tcp", str(port)] + params)


class CSMSService(service.Service):
    """Starts the Central System: database and tables, plugin services, then the OCPP and API listeners.

    ``ready`` fires with this service once all of them are up, or fails with a :class:`StartupError`
    saying what failed, once what had started is stopped again.

    A plugin service (``csms_services``) may return a Deferred from ``startService``, as it may from
    ``stopService``: start-up waits for it, and its failure fails start-up (listeners use it).
    """

    def __init__(self, config, reactor=None, clock=None, extra_plugins=()):
        from csms.app import CentralSystem
        from csms.protocol import OCPPServerFactory

        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.app = CentralSystem(config, reactor=reactor, clock=clock, extra_plugins=extra_plugins)
        self.ocpp_factory = OCPPServerFactory(self.app, reactor)
        self.app.ocpp_factory = self.ocpp_factory
        self.ocpp_endpoint = config.ocpp.endpoint
        self.ready: defer.Deferred = defer.Deferred()
        self.ports: dict[str, object] = {}
        self.plugin_services = list(self.app.services())
        self._started_services: list = []
        self.app.add_readiness_check("listeners", self._listeners_problem)

    def startService(self):
        service.Service.startService(self)
        # The reactor thread gives the GIL away on every socket call; with the database threads busy
        # in Python it then waits a whole switch interval (5 ms by default) to get it back, which
        # caps throughput and inflates latency. A shorter interval hands it back sooner.
        sys.setswitchinterval(SWITCH_INTERVAL)
        self._start().addCallbacks(self._started, self._failed)

    @defer.inlineCallbacks
    def _start(self):
        # inlineCallbacks goes on at once past a Deferred that has already fired: when every step is
        # immediate, start-up is over (or has failed) by the time startService returns.
        yield _labelled(self._start_database(), f"database {display_url(self.app.config.database.url)}")
        for plugin_service in self.plugin_services:
            self._started_services.append(plugin_service)
            yield _labelled(defer.maybeDeferred(_start_plugin_service, plugin_service),
                            f"plugin service {plugin_service.name or type(plugin_service).__name__}")
        self.ports["ocpp"] = yield listen(self.reactor, self.ocpp_endpoint, self.ocpp_factory, "[ocpp] endpoint")
        log.info("OCPP 1.6J endpoint listening on {where} (path {prefix}<chargePointId>)",
                 where=self.ports["ocpp"].getHost(), prefix=self.app.config.ocpp.path_prefix)
        api_factory = self.api_site()
        if api_factory is not None:
            self.ports["api"] = yield listen(self.reactor, self.app.config.api.endpoint, api_factory, "[api] endpoint")
            log.info("Operator API listening on {where}", where=self.ports["api"].getHost())
        if self.app.config.metrics.endpoint:
            from csms.api.ops import make_operations_site

            self.ports["metrics"] = yield listen(self.reactor, self.app.config.metrics.endpoint,
                                                 make_operations_site(self.app), "[metrics] endpoint")
            log.info("Metrics and health endpoint listening on {where}", where=self.ports["metrics"].getHost())

    def _start_database(self) -> defer.Deferred:
        return self.app.start()

    def _listeners_problem(self) -> str | None:
        """Readiness: start-up is over and the OCPP listener is up (and not being stopped)."""
        if not self.ready.called or not self.running:
            return "starting" if self.running else "stopped"
        if "ocpp" not in self.ports:
            return "the OCPP listener is not listening"
        return None

    def api_site(self):
        """The operator HTTP API site, or None when the framework has no API module."""
        try:
            from csms.api import make_site
        except ImportError:
            return None
        return make_site(self.app)

    def _started(self, _):
        self._say_ready()
        self.ready.callback(self)

    def _say_ready(self) -> None:
        log.info("Central System ready: plugins {plugins}; database {dialect}",
                 plugins=", ".join(p.name for p in self.app.plugins) or "none", dialect=self.app.db.dialect_name)

    def _failed(self, failure):
        error = failure.value if failure.check(StartupError) else StartupError(describe(failure.value))
        cause = failure.value.__cause__ if failure.check(StartupError) else failure.value
        if cause is not None and not is_expected(cause):
            # Not a setting, a file, a port or the database: a bug, whose traceback says where.
            log.failure("Start-up failed on an unexpected error", Failure(cause, type(cause), cause.__traceback__),
                        level=LogLevel.error)
            error = StartupError(f"{error} (a bug? its traceback is in the log)")
        else:
            log.failure("Start-up failed", failure, level=LogLevel.debug)
        stopping = self._stop_started()
        self.app.cluster.stop_listening()
        if self.reactor.running:
            # The plugin services may still use the database while they stop.
            stopping.addBoth(lambda result: (self.app.stop(), result)[1])
        else:
            # Nothing runs the stops that wait for the reactor before the process exits: the database's
            # threads are stopped now, or they would keep it from exiting.
            self.app.stop()
        self._stopped_after_failure(stopping).addCallback(lambda _: self.ready.errback(error))

    def _stopped_after_failure(self, stopping: defer.Deferred) -> defer.Deferred:
        """Fires when ``ready`` may fail: once what had started has stopped."""
        return stopping

    def _stop_started(self) -> defer.Deferred:
        """Stop the listeners, then the plugin services in reverse order; fires when they have stopped."""
        stopping = [defer.maybeDeferred(port.stopListening) for port in self.ports.values()]
        self.ports.clear()
        d = defer.DeferredList(stopping, consumeErrors=True)
        started, self._started_services = self._started_services, []
        for plugin_service in reversed(started):
            d.addCallback(lambda _, s=plugin_service: defer.maybeDeferred(s.stopService))
        return d.addErrback(lambda failure: log.failure("Stopping a plugin service failed", failure))

    @defer.inlineCallbacks
    def stopService(self):
        """Stop gracefully: no new connections, the calls being handled answered and committed, every
        station closed with 1001; what is left after ``[csms] shutdown_grace`` seconds is abandoned."""
        if not self.running:
            return
        service.Service.stopService(self)
        listeners = [self.ports.pop(name) for name in ("ocpp", "api") if name in self.ports]
        not_listening = defer.DeferredList([defer.maybeDeferred(port.stopListening) for port in listeners],
                                           consumeErrors=True)
        stations_gone = self._let_stations_go(self.app.config.shutdown_grace)  # the grace counts from now
        yield not_listening
        yield stations_gone
        yield self._stop_started()
        yield self.app.cluster.stop()  # after the stations' own presence rows went with their disconnection
        self.app.stop()

    def _let_stations_go(self, grace: float) -> defer.Deferred:
        """Fires once every station connection is closed and what their handlers wrote is committed, or
        once ``grace`` seconds (of the app's clock) have passed, whichever comes first."""
        stations = len(self.ocpp_factory.protocols)
        if stations:
            log.info("Stopping: closing {count} station connection(s) once their calls are answered "
                     "(at most {grace:g} s)", count=stations, grace=grace)
        settled = self.ocpp_factory.shut_down().addCallback(lambda _: self.app.db.barrier())

        def grace_over(_result, _timeout):
            dropped = self.ocpp_factory.abandon()
            discarded = self.app.db.discard_queued()
            log.warn("Stopping: the {grace:g} s shutdown grace is over; abandoned {dropped} connection(s) and "
                     "{discarded} queued database function(s)", grace=grace, dropped=dropped, discarded=discarded)
        return settled.addTimeout(grace, self.app.clock, onTimeoutCancel=grace_over)


def _start_plugin_service(plugin_service):
    # Both halves, as MultiService starts a child added while it runs (strports services listen in the first).
    plugin_service.privilegedStartService()
    return plugin_service.startService()


def _labelled(d: defer.Deferred, label: str) -> defer.Deferred:
    """Failures of ``d`` become a StartupError saying ``label: <why>`` (one that already says it is kept)."""
    def label_failure(failure):
        if failure.check(StartupError):
            return failure
        raise StartupError(f"{label}: {describe(failure.value)}") from failure.value
    return d.addErrback(label_failure)


def makeService(options) -> service.IService:
    from csms.plugins import PluginError

    from csms.logs import CSMSLogObserver, twistd_log_file

    config = options.config
    try:
        csms_service = TwistdCSMSService(config)
        server_options = getattr(options, "parent", None)  # twistd's own options
        out_file = twistd_log_file(server_options) if server_options is not None else None
    except (ConfigError, PluginError, OSError) as exc:  # OSError: a directory that cannot be created
        raise StartupFailed(describe(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a bug (a plugin's csms_configure, say): its traceback, then the line
        import traceback

        traceback.print_exc()
        raise StartupFailed(f"{describe(exc)} at {where_raised(exc)} (a bug? the traceback is above)") from None
    if out_file is not None:
        csms_service.log_observer = CSMSLogObserver(out_file, config.log_level, config.log_format)
    return csms_service


class TwistdCSMSService(CSMSService):
    """The service ``twistd csms`` runs: starts before the reactor, so that a failure is the process's exit status.

    Its ``log_observer`` (``[csms] log_level`` and ``log_format`` on twistd's log file) becomes the
    application's log observer, which twistd uses from its first line on.
    """

    log_observer = None

    def setServiceParent(self, parent):
        application = parent  # twistd's Application: a Componentized, adapted to a collection below
        super().setServiceParent(parent)
        if self.log_observer is not None and hasattr(application, "setComponent"):
            from twisted.logger import ILogObserver

            application.setComponent(ILogObserver, self.log_observer)

    def startService(self):
        from twisted.logger import globalLogPublisher

        from csms.logs import install

        install(globalLogPublisher, self.app.config.log_level, self.app.config.log_format)
        self.reactor.callWhenRunning(self._take_sigterm)
        super().startService()
        if not self.ready.called:
            self.ready.addErrback(self._failed_late)
            return
        failures: list = []
        self.ready.addErrback(failures.append)
        if failures:
            failed = StartupFailed(str(failures[0].value), logged=True)
            log.critical("{line}", line=failed.message)
            say_at_exit(failed.message, status=1)
            raise failed

    def _start_database(self) -> defer.Deferred:
        # Blocking, but the reactor is not running yet: there is nothing to keep waiting.
        return defer.maybeDeferred(self.app.start_blocking)

    #: Whether SIGTERM stops gracefully yet (:meth:`_take_sigterm` has run), and whether start-up was
    #: over before it did, with "Central System ready" still to be said.
    _sigterm_taken = False
    _ready_unsaid = False

    def _say_ready(self) -> None:
        # Start-up is usually over before the reactor runs; until it runs, and until the handler below
        # replaces Twisted's own, a SIGTERM ends the process by the signal (status 143). Whoever acts
        # on the ready line (a supervisor, a test, a deployment script) may stop the process at once:
        # it is said only once that stop is the graceful one.
        if self._sigterm_taken:
            super()._say_ready()
        else:
            self._ready_unsaid = True

    def _take_sigterm(self) -> None:
        """SIGTERM stops the reactor (and so this service, gracefully) and the process exits 0.

        Twisted's own handler (installed as the reactor starts, just before this runs) makes twistd
        end by raising the signal again (status -15, 143 in a shell: Twisted #7225), which container
        runtimes and scripts read as a failure. A stop that did what it was asked is a success.
        """
        signal.signal(signal.SIGTERM, lambda _number, _frame: self.reactor.callFromThread(self._stop_reactor))
        self._sigterm_taken = True
        if self._ready_unsaid:
            self._ready_unsaid = False
            super()._say_ready()

    def _stop_reactor(self) -> None:
        from twisted.internet.error import ReactorNotRunning

        log.info("Received SIGTERM: stopping")
        try:
            self.reactor.stop()
        except ReactorNotRunning:  # a second SIGTERM while stopping
            pass

    def _stopped_after_failure(self, stopping: defer.Deferred) -> defer.Deferred:
        if not self.reactor.running:
            # At once: ports close only once the reactor runs, and startService must raise before it
            # does (the process exits, which closes them).
            return defer.succeed(None)
        # Once the reactor runs (a plugin service's start was still pending when startService returned),
        # what had started stops first: a plugin service's stop may need the reactor (a worker process
        # to end, a database pool to stop), and one left running keeps the process from exiting (its
        # threads). At most the shutdown grace, as a stop on SIGTERM.
        grace = self.app.config.shutdown_grace

        def late(_result, _timeout):
            log.warn("Stopping what had started took over {grace:g} s; stopping anyway", grace=grace)
        return stopping.addTimeout(grace, self.reactor, onTimeoutCancel=late)

    def _failed_late(self, failure) -> None:
        """A plugin service failed once the reactor ran: stop, then exit 1 after twistd has cleaned up."""
        line = StartupFailed(str(failure.value), logged=True).message
        log.critical("{line}", line=line)
        say_at_exit(line, status=1)
        self.reactor.stop()


def say_at_exit(line: str, status: int) -> None:
    """End the process with ``status``, ``line`` the last thing it writes on its stderr.

    Run as the process exits (the first exit handler to run, being the last registered), once twistd has
    logged its own last lines ("Main loop terminated.", "Server Shut Down.") and removed its pid file.
    The process's own stderr (``sys.__stderr__``): twistd's log took ``sys.stderr`` over. With ``-n`` and
    both streams on one terminal or journal, the line is there twice, once in the log and once last.
    """
    atexit.register(_exit_with_status, status, line)


def _exit_with_status(status: int, line: str | None = None) -> None:
    # The last thing the process does: left to itself, twistd would exit 0 after a failure once the
    # reactor ran, and what other exit handlers write could come after the line.
    for stream in (sys.stdout, sys.stderr, sys.__stdout__):
        if stream is not None:
            stream.flush()
    if line is not None and sys.__stderr__ is not None:
        try:
            sys.__stderr__.write(line + "\n")
        except (OSError, ValueError):  # stderr closed (a daemon's /dev/null is not): nothing more to say
            pass
    if sys.__stderr__ is not None:
        try:
            sys.__stderr__.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
