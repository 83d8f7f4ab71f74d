"""Data retention (docs/retention.md): every declared history pruned past its [retention] days, hourly, in
bounded batches, on the cluster's leader only; 0 keeps everything; an unknown name is refused."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
import pytest_twisted
from sqlalchemy import BigInteger, Boolean, Column, DateTime, Integer, MetaData, String, Table, Text, insert, select
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer

from csms.config import ConfigError, load_config
from csms.db import BIG_KEY
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from csms.retention import CATCH_UP_INTERVAL, INTERVAL, Retention, RetentionService
from csms.testing.pytest_plugin import builtin_plugins

DAY = 86400
#: Every built-in declaration: the framework's, then the plugins' (each plugin enabled in the tests).
BUILTIN = ("connection_events", "api_audit", "core_status_history", "security_events", "firmware_status_history",
           "reservation_events", "remotetrigger_requests", "localauth_updates")


@pytest.fixture
def logged():
    lines: list[str] = []

    def observe(event):
        if event.get("log_namespace") == "csms.retention":
            lines.append(formatEvent(event))
    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def service_of(csms) -> RetentionService:
    (found,) = [s for s in csms.service.plugin_services if isinstance(s, RetentionService)]
    return found


def declaration(csms, name: str) -> Retention:
    (found,) = [r for r in csms.app.retention if r.name == name]
    return found


def filler(column, at: datetime, index: int):
    """A value for a required column: ``at`` for a time, else something of its type."""
    if isinstance(column.type, DateTime):
        return at
    if isinstance(column.type, Boolean):
        return False
    if isinstance(column.type, (BigInteger, Integer)):
        return index
    if isinstance(column.type, (String, Text)):
        return f"x{index}"[:getattr(column.type, "length", None) or 40]
    raise AssertionError(f"no filler for {column}")


def add_rows(csms, retention: Retention, ages_in_days):
    """Rows of ``retention``'s table whose timestamp is that many days before the CSMS's clock."""
    table = retention.table
    now = csms.clock.seconds()
    rows = []
    for index, age in enumerate(ages_in_days):
        at = datetime.fromtimestamp(now - age * DAY, tz=timezone.utc)
        row = {column.name: filler(column, at, index) for column in table.columns
               if not column.nullable and not column.primary_key or isinstance(column.type, DateTime)}
        row[retention.column] = at
        rows.append(row)

    def thd(conn):
        conn.execute(insert(table), rows)
    return csms.app.db.run(thd, desc="test_rows")



def ages(csms, retention: Retention):
    """The age in whole days of every row of ``retention``'s table, sorted."""
    table = retention.table
    now = csms.clock.seconds()

    def thd(conn):
        return [row[0] for row in conn.execute(select(table.c[retention.column]))]

    def whole_days(times):
        return sorted(round((now - (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()) / DAY)
                      for t in times)
    return csms.app.db.run(thd, desc="test_ages").addCallback(whole_days)


def pruned(csms) -> dict:
    """name -> csms_retention_pruned_rows_total."""
    return {sample.labels["name"]: sample.value for family in csms.app.metrics.registry.collect()
            if family.name == "csms_retention_pruned_rows" for sample in family.samples
            if sample.name.endswith("_total")}


async def next_purge(csms, seconds: float):
    """Move the clock on by ``seconds`` and wait for the purge that starts then."""
    retention = service_of(csms)
    csms.clock.advance(seconds)
    assert retention.current is not None, "no purge started"
    await retention.current


def keep(days: int) -> str:
    return "[retention]\n" + "".join(f"{name} = {days}\n" for name in BUILTIN)


@pytest_twisted.ensureDeferred
async def test_every_builtin_history_is_pruned_past_its_retention_and_newer_rows_kept(csms_factory, logged):
    csms = await csms_factory(keep(30))
    assert {r.name for r in csms.app.retention} == set(BUILTIN)
    before = {}
    for name in BUILTIN:
        retention = declaration(csms, name)
        before[name] = await ages(csms, retention)  # what the CSMS wrote itself (the test token's audit...)
        await add_rows(csms, retention, [400, 31, 29, 1])
    await next_purge(csms, CATCH_UP_INTERVAL)  # the first purge, a minute after start-up
    for name in BUILTIN:
        assert await ages(csms, declaration(csms, name)) == sorted(before[name] + [29, 1]), name
    assert pruned(csms) == {name: 2.0 for name in BUILTIN}
    (line,) = logged
    assert line.startswith("Retention: pruned ") and all(f"{name} 2" in line for name in BUILTIN), line
    # Hourly from then on: a row turning 31 days old meanwhile goes at the next purge.
    await add_rows(csms, declaration(csms, "core_status_history"), [30.99])
    await next_purge(csms, INTERVAL)
    assert await ages(csms, declaration(csms, "core_status_history")) == [1, 29]


@pytest_twisted.ensureDeferred
async def test_retention_zero_or_unset_keeps_everything(csms_factory):
    csms = await csms_factory("[retention]\ncore_status_history = 0\nconnection_events = 0\n")
    assert set(csms.app.retention_days.values()) == {0}  # every default keeps for ever
    for name in ("core_status_history", "connection_events", "security_events"):
        await add_rows(csms, declaration(csms, name), [3650, 1])
    csms.clock.advance(INTERVAL * 2)
    assert service_of(csms).current is None  # nothing to purge: no purge at all
    assert await ages(csms, declaration(csms, "core_status_history")) == [1, 3650]
    assert 3650 in await ages(csms, declaration(csms, "connection_events"))
    assert await ages(csms, declaration(csms, "security_events")) == [1, 3650]
    assert pruned(csms) == {}


@pytest_twisted.ensureDeferred
async def test_a_purge_larger_than_a_batch_takes_bounded_transactions_and_finishes(csms_factory, monkeypatch):
    csms = await csms_factory("[retention]\ncore_status_history = 7\n", plugins=["core"])
    service = service_of(csms)
    service.batch_size, service.run_budget = 10, 25
    retention = declaration(csms, "core_status_history")
    await add_rows(csms, retention, [8 + i / 100 for i in range(60)] + [6, 5])
    batches = []
    run = csms.app.db.run

    def counting_run(thd, *args, desc="", **kwargs):
        d = run(thd, *args, desc=desc, **kwargs)
        if desc == "retention_core_status_history":
            d.addCallback(lambda count: batches.append((args[1], count)) or count)
        return d
    monkeypatch.setattr(csms.app.db, "run", counting_run)
    await next_purge(csms, CATCH_UP_INTERVAL)
    # At most batch_size rows a transaction, at most run_budget a purge; the rest a minute later.
    assert batches == [(10, 10), (10, 10), (5, 5)]
    assert len(await ages(csms, retention)) == 62 - 25
    await next_purge(csms, CATCH_UP_INTERVAL)
    assert len(await ages(csms, retention)) == 62 - 50
    await next_purge(csms, CATCH_UP_INTERVAL)
    assert batches[-2:] == [(10, 10), (10, 0)]
    assert await ages(csms, retention) == [5, 6]
    assert pruned(csms) == {"core_status_history": 60.0}
    # Done: the next purge is an hour later, not a minute.
    csms.clock.advance(CATCH_UP_INTERVAL)
    assert service.current is None


@pytest_twisted.ensureDeferred
async def test_a_failed_purge_is_logged_and_the_next_one_tries_again(csms_factory, logged, monkeypatch):
    csms = await csms_factory("[retention]\ncore_status_history = 7\n", plugins=["core"])
    retention = declaration(csms, "core_status_history")
    await add_rows(csms, retention, [8, 1])
    (purge,) = service_of(csms).purges

    def broken(conn, before, limit):
        raise RuntimeError("the database said no")
    monkeypatch.setattr(purge, "batch", broken)
    await next_purge(csms, CATCH_UP_INTERVAL)
    assert any("the purge failed" in line for line in logged)
    assert await ages(csms, retention) == [1, 8]
    monkeypatch.undo()
    await next_purge(csms, INTERVAL)
    assert await ages(csms, retention) == [1]


BASE = "[database]\nurl = sqlite://\n[plugins]\nenabled = core, security\n"


def start(text: str, extra_plugins=()):
    from csms.app import CentralSystem

    return CentralSystem(load_config(text=BASE + text), extra_plugins=extra_plugins)


@pytest.mark.parametrize("text, message", [
    ("[retention]\nconection_events = 30\n",
     r"^\[retention\] has no setting 'conection_events' \(known: .*connection_events.*\): did you mean "
     r"'connection_events'\? \(`csms-admin config settings --retention` lists them"),
    ("[retention]\ncore_status_histroy = 30\n", r"did you mean 'core_status_history'"),
    ("[retention]\ntransactions = 30\n", r"^\[retention\] has no setting 'transactions'"),
    ("[retention]\nsecurity_events = -1\n", r"^\[retention\] security_events = -1 is negative"),
    ("[retention]\napi_audit = a year\n", r"^\[retention\] api_audit = 'a year' is not a valid int"),
])
def test_an_unknown_or_bad_retention_setting_is_refused_with_one_line(text, message):
    with pytest.raises(ConfigError, match=message) as raised:
        start(text)
    assert "\n" not in str(raised.value)


def test_the_setting_of_an_installed_plugin_that_is_not_enabled_is_kept():
    app = start("[retention]\nfirmware_status_history = 90\napi_audit = 365\n")
    assert "firmware_status_history" not in app.retention_days
    assert app.retention_days["api_audit"] == 365


# -- a plugin's own declaration ----------------------------------------------------------------------

acme_metadata = MetaData()
acme_pings = Table("acmeret_pings", acme_metadata,
                   Column("id", BIG_KEY, primary_key=True, autoincrement=True),
                   Column("station_id", String(255), nullable=False),
                   Column("received_at", DateTime(timezone=True), nullable=False, index=True))


@implementer(ICSMSPlugin)
class AcmeRetentionPlugin:
    name = "acmeret"
    profile = None
    inbound_actions = ()
    outbound_actions = ()
    settings = ()

    def __init__(self, declared=None):
        self.declared = declared

    @hookimpl
    def csms_tables(self):
        return acme_metadata

    @hookimpl
    def csms_retention(self, app):
        if self.declared is not None:
            return self.declared
        return [Retention("acmeret_pings", acme_pings, "received_at", "Days ACME pings are kept.", default_days=14)]


@pytest_twisted.ensureDeferred
async def test_a_plugins_own_declaration_is_a_setting_with_its_default_and_is_pruned(csms_factory):
    csms = await csms_factory(extra_plugins=[AcmeRetentionPlugin()], plugins=["core"])
    assert csms.app.retention_days["acmeret_pings"] == 14
    retention = declaration(csms, "acmeret_pings")
    await add_rows(csms, retention, [15, 13])
    await next_purge(csms, CATCH_UP_INTERVAL)
    assert await ages(csms, retention) == [13]
    assert pruned(csms) == {"acmeret_pings": 1.0}


@pytest_twisted.ensureDeferred
async def test_the_operator_overrides_a_plugins_default(csms_factory):
    csms = await csms_factory("[retention]\nacmeret_pings = 0\n", extra_plugins=[AcmeRetentionPlugin()],
                              plugins=["core"])
    assert csms.app.retention_days["acmeret_pings"] == 0


@pytest.mark.parametrize("declared, message", [
    ([Retention("pings", acme_pings, "received_at", "?")], r"plugin 'acmeret' declares retention 'pings': its names "
                                                           r"start with acmeret_"),
    ([Retention("connection_events", acme_pings, "received_at", "?")], r"declares retention 'connection_events'"),
    ([Retention("acmeret_pings", acme_pings, "at", "?")], r"column 'at' is not a column of its table"),
    ([Retention("acmeret_pings", acme_pings, "station_id", "?")], r"is not a DateTime column"),
    ([Retention("acmeret_pings", acme_pings, "received_at", "?", default_days=-3)], r"default_days"),
    (["acmeret_pings"], r"not a csms.retention.Retention"),
])
def test_a_malformed_declaration_stops_start_up(declared, message):
    with pytest.raises(ConfigError, match=message):
        start("", extra_plugins=[AcmeRetentionPlugin(declared)])


# -- a cluster ---------------------------------------------------------------------------------------


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_only_the_clusters_leader_purges(csms_factory):
    from test_cluster import start_node

    a = await start_node(csms_factory, "A", extra="[retention]\ncore_status_history = 7\n")
    b = await start_node(csms_factory, "B", extra="[retention]\ncore_status_history = 7\n")
    assert (a.app.cluster.leads(), b.app.cluster.leads()) == (True, False)
    retention = declaration(a, "core_status_history")
    await add_rows(a, retention, [8, 9, 1])
    assert await service_of(b).purge() is False
    assert await ages(b, retention) == [1, 8, 9] and pruned(b) == {}
    await service_of(a).purge()
    assert await ages(b, retention) == [1]
    assert pruned(a) == {"core_status_history": 2.0}


def test_every_builtin_declaration_is_documented_and_shown_in_etc_csms_ini(tmp_path):
    import os

    from csms.testing.pytest_plugin import confine_plugin_settings

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "retention.md"), encoding="utf-8") as f:
        docs = f.read()
    with open(os.path.join(root, "etc", "csms.ini"), encoding="utf-8") as f:
        ini = f.read()
    config = load_config(text="[database]\nurl = sqlite://\n")
    config.enabled_plugins = builtin_plugins()
    confine_plugin_settings(config, tmp_path)
    from csms.app import CentralSystem

    app = CentralSystem(config)
    assert {r.name for r in app.retention} == set(BUILTIN)
    for retention in app.retention:
        assert f"`{retention.name}`" in docs, retention.name
        assert f"\n{retention.name} = {retention.default_days}\n" in ini, retention.name


def test_csms_admin_config_settings_retention_shows_every_declared_name_with_its_value(tmp_path, capsys):
    from csms.admin import main

    config = tmp_path / "csms.ini"
    config.write_text(f"[database]\nurl = sqlite:///{tmp_path}/csms.sqlite\n[plugins]\nenabled = core\n"
                      "[retention]\ncore_status_history = 90\n")
    assert main(["--config", str(config), "config", "settings", "--retention"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[retention]\n# Days connection events")
    assert "\nconnection_events = 0\n" in out and "\napi_audit = 0\n" in out
    assert "# (int, default 0; core_status_history.received_at)\ncore_status_history = 90\n" in out
    assert "security_events" not in out  # the security plugin is not enabled
