"""``twistd csms``: command-line options and the service tree (OCPP listener, API listener, plugin services)."""
from __future__ import annotations

import os
import sys

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from csms.config import ConfigError, load_config, validate

log = Logger(namespace="csms.service")

DEFAULT_CONFIG = os.path.join("etc", "csms.ini")
SWITCH_INTERVAL = 0.0005


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
        path = self["config"]
        if path is None and os.path.exists(DEFAULT_CONFIG):
            path = DEFAULT_CONFIG
        try:
            config = load_config(path) if path else load_config()
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
        except (ConfigError, OSError) as exc:
            raise usage.UsageError(str(exc)) from None
        self.config = config


def with_port(endpoint: str, port: int) -> str:
    """Replace the port of a ``tcp:PORT[:...]`` / ``ssl:PORT[:...]`` endpoint string."""
    kind, _, rest = endpoint.partition(":")
    params = [p for p in rest.split(":") if p and ("=" in p)] if rest else []
    return ":".join([kind or "tcp", str(port)] + params)


class CSMSService(service.MultiService):
    """Starts the Central System (database, tables), then its listeners and plugin services."""

    def __init__(self, config, reactor=None, clock=None, extra_plugins=()):
        super().__init__()
        from csms.app import CentralSystem
        from csms.protocol import OCPPServerFactory

        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.app = CentralSystem(config, reactor=reactor, clock=clock, extra_plugins=extra_plugins)
        self.ocpp_factory = OCPPServerFactory(self.app, reactor)
        self.ocpp_endpoint = config.ocpp.endpoint
        self.ready: defer.Deferred = defer.Deferred()
        self.ports: dict[str, object] = {}
        self._children_pending = list(self.app.services())

    def startService(self):
        service.Service.startService(self)
        # The reactor thread gives the GIL away on every socket call; with the database threads busy
        # in Python it then waits a whole switch interval (5 ms by default) to get it back, which
        # caps throughput and inflates latency. A shorter interval hands it back sooner.
        sys.setswitchinterval(SWITCH_INTERVAL)
        d = self.app.start()
        d.addCallback(lambda _: self._listen())
        d.addCallbacks(self.ready.callback, self._failed)

    @defer.inlineCallbacks
    def _listen(self):
        from twisted.internet.endpoints import serverFromString

        for child in self._children_pending:
            child.setServiceParent(self)
        self._children_pending = []
        endpoint = serverFromString(self.reactor, self.ocpp_endpoint)
        self.ports["ocpp"] = yield endpoint.listen(self.ocpp_factory)
        log.info("OCPP 1.6J endpoint listening on {where} (path {prefix}<chargePointId>)",
                 where=self.ports["ocpp"].getHost(), prefix=self.app.config.ocpp.path_prefix)
        api_factory = self.api_site()
        if api_factory is not None:
            self.ports["api"] = yield serverFromString(self.reactor, self.app.config.api.endpoint).listen(api_factory)
            log.info("Operator API listening on {where}", where=self.ports["api"].getHost())
        return self

    def api_site(self):
        """The operator HTTP API site, or None when the framework has no API module."""
        try:
            from csms.api import make_site
        except ImportError:
            return None
        return make_site(self.app)

    def _failed(self, failure):
        log.failure("The Central System failed to start", failure)
        self.ready.errback(failure)
        if self.reactor.running:
            self.reactor.stop()

    @defer.inlineCallbacks
    def stopService(self):
        for port in self.ports.values():
            yield port.stopListening()
        self.ports.clear()
        for protocol in list(self.ocpp_factory.connections.values()):
            protocol.dropConnection(abort=True)
        yield service.MultiService.stopService(self)
        self.app.stop()


def makeService(options) -> service.IService:
    return TwistdCSMSService(options.config)


class TwistdCSMSService(CSMSService):
    """The service ``twistd csms`` runs: applies ``log_level`` once twistd's logging has begun."""

    def startService(self):
        _install_level_filter(self.app.config.log_level)
        super().startService()


def _install_level_filter(level_name: str) -> None:
    """Filter everything twistd logs below ``level_name`` (twistd itself has no level option)."""
    from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogPublisher

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level_name))
    observers = list(globalLogPublisher._observers)
    for observer in observers:
        globalLogPublisher.removeObserver(observer)
        globalLogPublisher.addObserver(FilteringLogObserver(observer, [predicate]))
