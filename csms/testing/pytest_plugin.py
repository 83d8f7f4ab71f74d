"""pytest fixtures for the CSMS and its plugins: a running Central System on loopback, per database backend.

* ``database_url``: a fresh SQLite file, and (when ``CSMS_TEST_POSTGRES_URL`` is set) a fresh
  PostgreSQL schema: every test using it runs once per backend (``postgresql_only`` marks a test that
  means something on PostgreSQL alone).
* ``csms_factory``: ``await csms_factory(config_text="", extra_plugins=())`` starts a Central System
  listening on ephemeral loopback ports, with a :class:`twisted.internet.task.Clock` for its time.
  Every operator API answer it gives must match the OpenAPI document (a status code the route lists,
  a body valid for the schema declared for it: :mod:`csms.api.contract`), or the test fails. The
  schema is made from the plugins' MetaData and stamped at their migrations' heads (one ``create_all``
  instead of every migration, which tests/test_migrations.py proves equal); ``migrate=True`` leaves the
  database to the start-up's own migration path.
* ``csms``: one started with every built-in plugin enabled.
* ``operator``: plays the operator through the Python API, then (a second run) the HTTP API.

This module is loaded into every pytest run of an environment where csms is installed, so it imports
nothing beyond csms's own dependencies: the test extras (pytest-twisted, treq) are imported when a
fixture needs them, and their absence is reported there, naming what to install.
"""
from __future__ import annotations

import functools
import os
import time
import uuid
from importlib import import_module

import pytest

# Helpers assert (booted); pytest explains a failing assert only in modules it rewrites.
pytest.register_assert_rewrite("csms.testing.helpers")

POSTGRES_ENV = "CSMS_TEST_POSTGRES_URL"
#: The operator API bearer token every test CSMS accepts.
TEST_API_TOKEN = "test-token-0123456789abcdef"
#: What the fixtures need beyond csms's own dependencies: import name -> distribution.
TEST_EXTRAS = {"pytest_twisted": "pytest-twisted", "treq": "treq", "jsonschema": "jsonschema"}


def require_test_extras(*modules: str) -> list:
    """The ``modules`` imported, or the test fails with one line saying what to install."""
    imported, missing = [], []
    for name in modules:
        try:
            imported.append(import_module(name))
        except ImportError:
            missing.append(TEST_EXTRAS.get(name, name))
    if missing:
        pytest.fail(f"the csms test fixtures need {', '.join(missing)}: pip install 'csms[test]'", pytrace=False)
    return imported


def blockon(d):
    """Wait for a Deferred from a synchronous fixture, on pytest-twisted's reactor."""
    (pytest_twisted,) = require_test_extras("pytest_twisted")
    return pytest_twisted.blockon(d)


def database_backends() -> list[str]:
    return ["sqlite", "postgresql"] if os.environ.get(POSTGRES_ENV) else ["sqlite"]


def builtin_plugins() -> list[str]:
    return list(_builtin_plugins())


@functools.lru_cache(maxsize=1)
def _builtin_plugins() -> tuple[str, ...]:
    # The csms distribution's own entry points cannot change during a run; reading them costs a scan
    # of every installed distribution, and every test starting a CSMS asks.
    from csms.plugins import available_plugins

    return tuple(sorted(name for name, ep in available_plugins().items() if ep.dist and ep.dist.name == "csms"))


@pytest.fixture(params=database_backends())
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/csms.sqlite"
        return
    base = os.environ[POSTGRES_ENV]
    # Unique across pytest-xdist workers and concurrent runs sharing the database.
    schema = "test_" + uuid.uuid4().hex[:12]
    engine = _schema_engine(base)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    yield base + ("&" if "?" in base else "?") + f"options=-csearch_path%3D{schema}%20{NO_COMMIT_WAIT}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")


#: A test's commits need not wait for the server's WAL flush: what they check is what other sessions
#: see, which is the same; only a crash of the PostgreSQL server could lose them. Every test writes,
#: and waiting for each flush was a large part of a PostgreSQL run.
NO_COMMIT_WAIT = "-csynchronous_commit%3Doff"


@functools.lru_cache(maxsize=None)
def _schema_engine(url: str):
    """One engine per run creating and dropping the tests' schemas (a connection each test would cost
    a PostgreSQL backend start)."""
    from sqlalchemy import create_engine

    return create_engine(url, pool_size=1, connect_args={"options": "-csynchronous_commit=off"})


class RunningCSMS:
    """A started :class:`csms.service.CSMSService` plus what a test needs to talk to it."""

    def __init__(self, service, clock, reactor):
        self.service = service
        self.app = service.app
        self.clock = clock
        self.reactor = reactor
        self.port = service.ports["ocpp"].getHost().port
        api = service.ports.get("api")
        self.api_port = api.getHost().port if api is not None else None
        self.stations: list = []

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}/api/v1"

    async def api(self, method: str, path: str, json=None, data: bytes | None = None, token: str | None = TEST_API_TOKEN,
                  headers: dict | None = None, timeout: float = 30):
        """One operator API request with treq: returns (status, parsed JSON body or None, response)."""
        import json as jsonlib

        (treq,) = require_test_extras("treq")

        all_headers = {}
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        if json is not None:
            data = jsonlib.dumps(json).encode()
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        response = await treq.request(method, self.api_url + path, data=data,
                                      headers={k: [v] for k, v in all_headers.items()},
                                      timeout=timeout, reactor=self.reactor)
        content = await treq.content(response)
        body = None
        if content and (response.headers.getRawHeaders("content-type") or [""])[0].startswith("application/json"):
            body = jsonlib.loads(content)
        return response.code, body, response

    def connect(self, station_id: str, settled: bool = True, **kwargs):
        """Fires with a connected :class:`csms.testing.station.TestStationProtocol`; with ``settled`` (the
        default), once the CSMS has recorded the connection and every ``csms_on_station_connected``
        listener is done with it, so that what they write is committed when the test looks (a plugin
        storing the station's security profile, say). ``settled=False``: as soon as the handshake is done."""
        from csms.testing.station import connect_station

        d = connect_station(self.reactor, self.port, station_id, **kwargs)

        def keep(station):
            self.stations.append(station)
            protocol = self.service.ocpp_factory.connections.get(station_id) if settled else None
            if protocol is None:
                return station
            return protocol.announced().addCallback(lambda _: station)
        return d.addCallback(keep)

    async def connect_booted(self, station_id: str, connectors: int = 1, **kwargs):
        """Fires with a station that has sent BootNotification and StatusNotification(Available) for
        connector 0 and each of ``connectors`` (see TestStationProtocol.boot; the answers are not checked);
        ``settled`` and the other keywords as :meth:`connect` takes them."""
        station = await self.connect(station_id, **kwargs)
        await station.boot(connectors)
        return station

    async def stop(self):
        for station in self.stations:
            if not station.closed.called:
                station.dropConnection(abort=True)
        # At once, as the test is over: the graceful stop (1001, waiting for handlers) has its own tests.
        self.service.ocpp_factory.abandon()
        await self.service.stopService()


def confine_plugin_settings(config, tmp_path, extra_plugins=()) -> None:
    """Keep the plugins' own listeners and directories inside the test.

    A plugin class may list ``loopback_settings`` (endpoint settings: set to an ephemeral loopback
    port) and ``directory_settings`` (set to a fresh directory under ``tmp_path``), and give
    ``in_test_settings``, a dict of values for a CSMS running inside the test process on the test's
    clock (the webhooks plugin's ``delivery = in-process``); a value the test's config text gives is
    kept. Enabled installed plugins and ``extra_plugins`` alike.
    """
    from csms.plugins import available_plugins

    installed = available_plugins()
    plugins = [installed[name].load() for name in config.enabled_plugins if name in installed]
    for plugin in [*plugins, *extra_plugins]:
        name = plugin.name
        settings = config.plugin_settings.setdefault(name, {})
        for key in getattr(plugin, "loopback_settings", ()):
            settings.setdefault(key, "tcp:0:interface=127.0.0.1")
        for key in getattr(plugin, "directory_settings", ()):
            settings.setdefault(key, str(tmp_path / f"plugin-{name}" / key))
        for key, value in getattr(plugin, "in_test_settings", {}).items():
            settings.setdefault(key, value)


def schema_from_metadata(app, reactor):
    """Fires once every enabled plugin's tables exist, made from its MetaData and stamped at its head."""
    from twisted.internet import threads

    from csms.migrations import create_from_metadata

    histories = app.histories()
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), app.db.run_sync, create_from_metadata,
                                     histories)


@pytest.fixture
def csms_factory(database_url, tmp_path):
    """``await csms_factory(config_text="", extra_plugins=(), clock=None, plugins=None)``: a started
    :class:`RunningCSMS`, stopped after the test.

    ``config_text`` is an INI text as in etc/csms.ini (its endpoints and database are replaced by
    loopback ports and ``database_url``); without a ``[plugins]`` section, ``plugins`` (default: every
    built-in plugin) are enabled. ``extra_plugins`` are plugin objects or classes registered besides.
    """
    require_test_extras(*TEST_EXTRAS)
    from twisted.internet import reactor, task

    from csms.config import load_config
    from csms.service import CSMSService

    running: list[RunningCSMS] = []

    async def start(config_text: str = "", extra_plugins=(), clock=None, plugins=None,
                    migrate: bool = False) -> RunningCSMS:
        config = load_config(text=config_text)
        if "[plugins]" not in config_text:
            config.enabled_plugins = list(plugins) if plugins is not None else builtin_plugins()
        config.ocpp.endpoint = "tcp:0:interface=127.0.0.1"
        config.api.endpoint = "tcp:0:interface=127.0.0.1"
        config.database.url = database_url
        config.api.tokens = list(config.api.tokens) + [TEST_API_TOKEN]
        confine_plugin_settings(config, tmp_path, extra_plugins)
        if clock is None:
            clock = task.Clock()
            clock.advance(time.time())
        service = CSMSService(config, reactor=reactor, clock=clock, extra_plugins=extra_plugins)
        if not migrate:
            await schema_from_metadata(service.app, reactor)
        service.startService()
        await service.ready.addTimeout(30, reactor)
        instance = RunningCSMS(service, clock, reactor)
        running.append(instance)
        if getattr(service.app, "api_resource", None) is not None:
            contract = ResponseContract(service.app.api_router)
            service.app.api_resource.response_check = contract
            contracts.append(contract)
        return instance

    from csms.api.contract import ResponseContract

    contracts: list = []
    yield start
    from twisted.internet import defer

    for instance in running:
        blockon(defer.ensureDeferred(instance.stop()))
    problems = [problem for contract in contracts for problem in contract.problems]
    if problems:
        pytest.fail("operator API answers that break the OpenAPI document:\n" + "\n".join(dict.fromkeys(problems)),
                    pytrace=False)


@pytest.fixture
def csms(csms_factory):
    """A started :class:`RunningCSMS` with every built-in plugin enabled."""
    from twisted.internet import defer

    return blockon(defer.ensureDeferred(csms_factory()))


@pytest.fixture(params=["python", "http"])
def operator(request, csms):
    """How a test plays the operator: ``await operator.call(station_id, action, payload)``.

    Every test using it runs twice: through the Python API and through the operator HTTP API.
    """
    from csms.testing.operators import OPERATORS

    return OPERATORS[request.param](csms)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "postgresql_only: a test that only means something on PostgreSQL (deselected for SQLite)")


def pytest_collection_modifyitems(config, items):
    """A test marked ``postgresql_only`` exists for PostgreSQL alone: its SQLite variant is deselected
    (not skipped: there is nothing on SQLite for it to check)."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.get_closest_marker("postgresql_only") and params.get("database_url") == "sqlite":
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
