"""The Central System: configuration, plugins, storage and connected stations, wired together.

:class:`CentralSystem` is what plugins receive in ``csms_configure(app)``. Its :meth:`call` is the
Python API for every CSMS-initiated OCPP call (a station session's ``call`` is this one).
"""
from __future__ import annotations

import inspect
from datetime import datetime, timezone

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from csms import ocpp16
from csms.actions import build_catalogue
from csms.admission import AdmissionRequest, admission_outcome
from csms.cluster import make_cluster
from csms.config import Config
from csms.db import Database
from csms.health import Readiness, database_check
from csms.metrics import Metrics
from csms.outbox import Outbox, register_framework_types
from csms.plugins import available_plugins, check_settings, check_table_names, loaded_plugins, make_plugin_manager
from csms.retention import RetentionService, configured_days
from csms.retention import collect as collect_retention
from csms.rpc import CallError, StationOffline
from csms.schemas import schemas
from csms.stations import StationStore

log = Logger(namespace="csms.app")


class ActionUnavailable(Exception):
    """The action is not a CSMS-initiated OCPP 1.6 action, or no enabled plugin provides it."""


class CallRefused(Exception):
    """A ``csms_before_call`` listener refused a CSMS-initiated call; nothing was sent.

    ``code`` names the problem for the API's JSON error, ``details`` says where it is.
    """

    def __init__(self, message: str, code: str = "call_refused", details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = details or {}


def as_deferred(result) -> defer.Deferred:
    """Normalise a hook result (value, Deferred or coroutine) to a Deferred: the one place that does it."""
    if isinstance(result, defer.Deferred):
        return result
    if inspect.isawaitable(result):
        return defer.ensureDeferred(result)
    return defer.succeed(result)


class CentralSystem:
    def __init__(self, config: Config, reactor=None, clock=None, extra_plugins=()):
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.pm = make_plugin_manager(config.enabled_plugins, config.blocked_plugins, extra_plugins)
        self.hook = self.pm.hook
        #: OCPP action -> its handler hook's caller (pluggy keeps one caller per hook, whatever registers later).
        self._inbound_callers = {action: getattr(self.hook, ocpp16.hook_name(action)) for action in ocpp16.INBOUND}
        self.db = Database(config.database.url, reactor, pool_size=config.database.pool_size,
                           sqlite_synchronous=config.database.sqlite_synchronous)
        #: Events written in the transaction of their change (csms.outbox); a delivery plugin attaches to it.
        self.outbox = Outbox()
        register_framework_types(self.outbox)
        self.station_store = StationStore(self.db, self.clock, self.outbox)
        #: station id -> connected csms.session.StationSession (on this node; see ``cluster`` for the others)
        self.sessions: dict = {}
        #: Prometheus metrics (docs/metrics.md); plugins add theirs in csms_configure.
        self.metrics = Metrics(enabled=config.metrics.enabled)
        #: How this node sees the others (csms.cluster): publish/subscribe, presence, forwarding.
        self.cluster = make_cluster(self)
        #: The OCPP WebSocket factory (:class:`csms.protocol.OCPPServerFactory`) once the service made it:
        #: a plugin may serve it on a listener of its own (the security plugin's TLS one), sharing the
        #: connected stations and the ``[ocpp]`` connection limits with the plain listener.
        self.ocpp_factory = None
        self.plugins = loaded_plugins(self.pm)
        check_settings(config, self.plugins)
        #: Who provides each action, enabled or not; see :mod:`csms.actions`.
        self.actions = build_catalogue(self.plugins, schemas, config.enabled_plugins, config.blocked_plugins)
        #: The schemas of OCPP 1.6 and of every action the enabled plugins add.
        self.schemas = self.actions.schemas
        #: action -> the enabled plugin that answers it / offers it.
        self.inbound_actions: dict[str, str] = self.actions.inbound
        self.outbound_actions: dict[str, str] = self.actions.outbound
        #: Added inbound action -> ``csms_handle_call`` of the plugins declaring it, and of no other.
        self._added_callers = {action: self._owners_handle_call(action) for action in self.actions.added_inbound()}
        self.metrics.attach(self)
        #: The checks /readyz runs; see :meth:`add_readiness_check`.
        self.readiness = Readiness(self.clock, config.metrics.readiness_timeout)
        self.add_readiness_check("database", database_check(self.db))
        self.add_readiness_check("migrations", self._schema_check)
        self._histories = None
        self.hook.csms_configure(app=self)
        check_table_names(self.pm)  # after csms_configure: a plugin may build its tables there
        #: What may be pruned (csms.retention), and the days ``[retention]`` keeps each for (0: for ever).
        self.retention = collect_retention(self)
        self.retention_days = configured_days(config, self.retention, {p.name for p in self.plugins},
                                              available_plugins())
        self.retention_service = RetentionService(self, self.retention, self.retention_days)

    # -- lifecycle ---------------------------------------------------------------------------

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), tz=timezone.utc)

    def add_readiness_check(self, name: str, check) -> None:
        """Make ``/readyz`` answer 503 unless ``check()`` passes: it returns None (ready) or a short text
        saying what is wrong, or a Deferred or coroutine of that; raising means not ready. It runs with
        a timeout, at most once at a time however many requests arrive, so it may query the database."""
        self.readiness.add(name, check)

    def all_metadata(self) -> list:
        from csms.api import audit, tokens  # noqa: F401  (their tables live in the framework metadata)
        from csms.cluster import tables  # noqa: F401  (so do the cluster's)
        return [history.metadata for history in self.histories()]

    def histories(self) -> list:
        """The migration histories of the framework and of every enabled plugin (see :mod:`csms.migrations`)."""
        from csms.migrations import histories

        if self._histories is None:
            self._histories = histories(self.pm)
        return self._histories

    @defer.inlineCallbacks
    def start(self):
        """Start the database pool and bring every enabled plugin's schema to its head (or refuse to)."""
        self.db.start()
        # Compile every OCPP schema once, off the reactor thread, before the first station arrives.
        yield threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.schemas.compile_all)
        histories = self.histories()
        done = yield self.db.run(self.prepare_schema, histories, desc="prepare_schema")
        self._log_schema_changes(done)
        yield self.cluster.start()

    def start_blocking(self) -> None:
        """:meth:`start` on the calling thread, for ``twistd csms``: it starts services before the
        reactor runs, and only a failure raised then gives the process a non-zero exit status."""
        self.db.start()
        self.schemas.compile_all()
        self._log_schema_changes(self.db.run_sync(self.prepare_schema, self.histories()))
        self.cluster.start_blocking()

    def prepare_schema(self, conn, histories) -> list:
        from csms.migrations import prepare_schema

        return prepare_schema(conn, histories, self.config.database.auto_upgrade)

    @staticmethod
    def _log_schema_changes(done: list) -> None:
        for line in done:
            log.info("Schema: {change}", change=line)

    def _schema_check(self):
        """The readiness check: None when every schema is at its head, else which are behind or ahead."""
        from csms.migrations import pending, states

        return self.db.run(pending, self.histories(), desc="schema_pending").addCallback(
            lambda found: None if not found else ("schema not at the code's head: " + states(found))[:250])

    def schema_is_current(self) -> defer.Deferred:
        """Fires True when every enabled plugin's schema (and the framework's) is at its head: for readiness."""
        from csms.migrations import pending

        histories = self.histories()
        return self.db.run(pending, histories, desc="schema_pending").addCallback(lambda behind: not behind)

    def services(self) -> list:
        out = [self.retention_service]
        for services in self.hook.csms_services(app=self):
            out.extend(services or [])
        return out

    def stop(self) -> None:
        self.db.stop()

    # -- inbound dispatch --------------------------------------------------------------------

    def dispatch(self, station, action: str, payload: dict):
        """Route an inbound, schema-valid CALL to its plugin hook (see :mod:`csms.hookspecs`).

        Returns the handler's answer as it gave it (a dict, a Deferred or an awaitable): the RPC layer
        answers a plain dict at once, without wrapping it in a Deferred.
        """
        caller = self._inbound_callers.get(action)
        if caller is not None:
            result = caller(station=station, payload=payload)
            if result is None:
                if action in self.inbound_actions:
                    raise CallError("InternalError", f"No plugin answered {action}")
                raise CallError("NotSupported",
                                f"{action} belongs to the {ocpp16.INBOUND[action]} profile, "
                                "which is not enabled on this Central System")
            return result
        caller = self._added_callers.get(action)
        if caller is not None:
            result = caller(station=station, action=action, payload=payload)
            if result is None:
                raise CallError("InternalError", f"The {self.inbound_actions[action]} plugin did not answer {action}")
            return result
        if action in self.actions.disabled_inbound:
            raise CallError("NotSupported", f"{action} belongs to the {self.actions.disabled_inbound[action]} "
                                            "plugin, which is not enabled on this Central System")
        result = self.hook.csms_handle_call(station=station, action=action, payload=payload)
        if result is None:
            raise CallError("NotImplemented", f"Action {action!r} is not implemented by this Central System")
        return result

    def _owners_handle_call(self, action: str):
        others = [plugin for plugin in self.plugins if action not in plugin.inbound_actions]
        return self.pm.subset_hook_caller("csms_handle_call", remove_plugins=others)

    def listened(self, hook_name: str) -> bool:
        """Whether any plugin implements the event hook ``hook_name`` (to skip building a costly event)."""
        return bool(getattr(self.hook, hook_name).get_hookimpls())

    def fire(self, hook_name: str, **kwargs) -> defer.Deferred:
        """Call an event hook on every plugin; wait for returned Deferreds; log (never raise) failures.

        The call goes through pluggy (so ``wrapper=True`` implementations and ``pm.trace`` /
        ``pm.add_hookcall_monitoring`` see it). Each listener was guarded when it was registered
        (:class:`csms.plugins.CSMSPluginManager`): one that raises is logged there and the others
        are still called. With no listener at all, nothing is called and nothing is built.
        """
        caller = getattr(self.hook, hook_name)
        if not caller.get_hookimpls():
            return defer.succeed(None)
        try:
            results = caller(**kwargs)
        except Exception:  # only a wrapper can raise here: the listeners are guarded
            log.failure("Event {hook} failed", hook=hook_name, station=kwargs.get("station_id"))
            return defer.succeed(None)
        pending = [as_deferred(r) for r in results if r is not None]
        if not pending:
            return defer.succeed(None)

        def report(outcomes):
            for ok, value in outcomes:
                if not ok:
                    log.failure("Event {hook} listener failed", value, hook=hook_name,
                                station=kwargs.get("station_id"))
        return defer.DeferredList(pending, consumeErrors=True).addCallback(report)

    def admit(self, request: AdmissionRequest) -> defer.Deferred:
        """Ask every ``csms_admit_station`` implementation about a handshake; fires with the request's
        annotations when the station is admitted, fails with :class:`csms.admission.AdmissionRefused` when it is not.

        See :func:`csms.admission.admission_outcome` for how the answers combine. An implementation
        that raises at once ends the call there: the ones after it (Core's, last) are not called.
        """
        try:
            results = self.hook.csms_admit_station(request=request)
        except Exception:
            return defer.fail(admission_outcome([(False, Failure())]))

        def decide(outcomes):
            outcome = admission_outcome(outcomes)
            if outcome is not None:
                raise outcome
            return request.annotations
        return defer.DeferredList([as_deferred(result) for result in results],
                                  consumeErrors=True).addCallback(decide)

    def lookup(self, hook_name: str, default=None, **kwargs) -> defer.Deferred:
        """Call a firstresult lookup hook; fires with its (awaited) answer, or ``default``."""
        result = getattr(self.hook, hook_name)(**kwargs)
        if result is None:
            return defer.succeed(default)
        return as_deferred(result)

    # -- CSMS-initiated calls ----------------------------------------------------------------

    def action_profile(self, action: str) -> str:
        """The enabled plugin that provides a CSMS-initiated ``action``, or raise :class:`ActionUnavailable`."""
        if action in self.outbound_actions:
            return self.outbound_actions[action]
        if action in ocpp16.OUTBOUND:
            raise ActionUnavailable(f"{action} belongs to the {ocpp16.OUTBOUND[action]} profile, "
                                    "which is not enabled on this Central System")
        if action in self.actions.disabled_outbound:
            raise ActionUnavailable(f"{action} belongs to the {self.actions.disabled_outbound[action]} plugin, "
                                    "which is not enabled on this Central System")
        raise ActionUnavailable(f"{action!r} is not a Central System-initiated OCPP 1.6 action, nor one "
                                "an enabled plugin offers")

    def call(self, station_id: str, action: str, payload: dict) -> defer.Deferred:
        """Send ``action`` to a connected station; fires with its validated response payload.

        A station connected to another node of a cluster is called through that node (``csms.cluster``).

        Fails with ActionUnavailable, StationOffline, RequestInvalid (nothing sent), CallErrorReceived,
        ResponseInvalid or CallTimeout. A call that passed its checks fires ``csms_on_call_sending``
        (waited for) before it is queued, then ``csms_on_call_completed`` for a valid answer or
        ``csms_on_call_failed`` otherwise, so the plugins have recorded the outcome by the time the
        caller sees it.
        """
        try:
            self.action_profile(action)
        except ActionUnavailable as exc:
            return defer.fail(exc)
        if station_id not in self.sessions:
            holder = self.cluster.holder(station_id)
            if holder is not None and holder != self.cluster.node:
                # The holder runs its own checks and events, and its session keeps the station's order.
                return self.cluster.forward(holder, station_id, action, payload)

        def send(checked):
            session = self.sessions.get(station_id)
            if session is None:
                return defer.fail(StationOffline(f"{station_id} is not connected"))
            if not checked:
                return session._send_call(action, payload)  # fails with RequestInvalid: nothing is sent
            sending = self.fire("csms_on_call_sending", station_id=station_id, action=action, request=payload)
            return sending.addCallback(send_now).addCallbacks(completed, failed)

        def send_now(_):
            # The listeners may have waited on the database: the station may be gone, or back on a new session.
            session = self.sessions.get(station_id)
            if session is None:
                return defer.fail(StationOffline(f"{station_id} disconnected before the call was sent"))
            return session._send_call(action, payload)

        def completed(response):
            return self.fire("csms_on_call_completed", station_id=station_id, action=action,
                             request=payload, response=response).addCallback(lambda _: response)

        def failed(failure):
            return self.fire("csms_on_call_failed", station_id=station_id, action=action,
                             request=payload, error=failure.value).addCallback(lambda _: failure)
        return self.check_call(station_id, action, payload).addCallback(send)

    def check_call(self, station_id: str, action: str, payload: dict) -> defer.Deferred:
        """Run the ``csms_before_call`` checks; fires True when they passed, fails with :class:`CallRefused`
        when one refuses.

        A payload that does not match its schema is left to the RPC layer (RequestInvalid): it fires
        False without running the checks, so they only ever see schema-valid payloads.
        """
        from csms.schemas import SchemaViolation

        try:
            self.schemas.validate_request(action, payload)
        except SchemaViolation:
            return defer.succeed(False)
        try:
            results = self.hook.csms_before_call(station_id=station_id, action=action, payload=payload)
        except Exception as exc:  # noqa: BLE001 - a refusal (or a bug) in a check: nothing is sent
            return defer.fail(exc)
        pending = [as_deferred(r) for r in results if r is not None]
        if not pending:
            return defer.succeed(True)

        def first_failure(failure):
            return failure.value.subFailure
        return defer.gatherResults(pending, consumeErrors=True).addCallbacks(lambda _: True, first_failure)

    def is_connected(self, station_id: str) -> bool:
        """Whether the station is connected to this node or, in a cluster, to any other."""
        return station_id in self.sessions or self.cluster.holder(station_id) is not None

    def disconnect(self, station_id: str, reason: str) -> bool:
        """Close a station's connection (e.g. it was deleted), on whichever node it is; True when it was connected."""
        session = self.sessions.get(station_id)
        if session is None:
            holder = self.cluster.holder(station_id)
            if holder is None or holder == self.cluster.node:
                return False
            self.cluster.disconnect_remote(holder, station_id, reason).addErrback(
                lambda failure: log.failure("Could not ask node {node} to disconnect {station}", failure,
                                            node=holder, station=station_id))
            return True
        if getattr(session, "protocol", None) is None:
            return False
        session.protocol.sendClose(1000, reason[:120])
        return True
