"""Data retention: the operational history the framework and the plugins keep, pruned after ``[retention]`` days.

The framework and every plugin declare what they keep that may be pruned (:class:`Retention`, from the
``csms_retention`` hook; the framework's own are :data:`FRAMEWORK`); the operator sets one ``[retention]``
setting per declared name, a number of days (0: kept for ever, every default). :class:`RetentionService`
deletes what is older, once an hour, on the cluster's leader only, in bounded batches: each batch one
statement and one transaction of at most ``batch_size`` rows found through an index on the timestamp
column, so that a history of millions of rows is never scanned and no transaction grows with it.
See docs/retention.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import DateTime, Table, bindparam, delete, select
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from csms.config import ConfigError, Setting, no_such_setting

log = Logger(namespace="csms.retention")

#: What a declared name looks like: a config key.
NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
#: Seconds between two purges (the first comes CATCH_UP_INTERVAL after start-up).
INTERVAL = 3600.0
#: Seconds until the next purge when one stopped at its budget with more to delete (a backlog after a
#: retention was first set or made shorter).
CATCH_UP_INTERVAL = 60.0
#: Rows one statement (one transaction) deletes at most.
BATCH_SIZE = 1000
#: Rows one purge deletes at most per name; the rest goes at the next one, CATCH_UP_INTERVAL later.
RUN_BUDGET = 50_000


@dataclass(frozen=True)
class Retention:
    """A history that may be pruned: rows of ``table`` whose ``column`` (a timestamp the Central System
    wrote, on its own clock) is older than the operator's ``[retention] <name>`` days are deleted.

    ``name`` is the setting's name (lower case, digits, ``_``; a plugin's starts with its name and
    ``_``, as its tables do); ``description`` says what the rows are, for operators; ``default_days``
    applies when the config does not set it (0: kept for ever). ``table`` must have a one-column primary
    key, and ``column`` should have an index (the purge finds its rows through it).
    """

    name: str
    table: Table
    column: str
    description: str
    default_days: int = 0

    def setting(self) -> Setting:
        return Setting(self.name, int, self.default_days, self.description)


def _framework() -> tuple:
    from csms.api.audit import audit_log
    from csms.stations import connection_events

    return (
        Retention("connection_events", connection_events, "at",
                  "Days connection events (connected, disconnected, replaced, refused) are kept: "
                  "GET /api/v1/stations/{id}/events."),
        Retention("api_audit", audit_log, "at",
                  "Days the operator API's audit trail (who changed what) is kept: GET /api/v1/audit."),
    )


class RetentionError(ConfigError):
    """A declaration or a ``[retention]`` setting the Central System cannot use (start-up stops)."""


def collect(app) -> list[Retention]:
    """The framework's declarations and every enabled plugin's, checked: names unique and owned like
    table names, tables with a one-column primary key, timestamp columns that exist."""
    from csms.plugins import available_plugins, loaded_plugins, table_owner

    plugin_names = set(available_plugins()) | {plugin.name for plugin in loaded_plugins(app.pm)}
    declared: list[tuple[str | None, Retention]] = [(None, retention) for retention in _framework()]
    # Attributed by plugin, as check_table_names does with csms_tables: a declaration names its owner.
    for impl in app.pm.hook.csms_retention.get_hookimpls():
        for retention in impl.function(app=app) or ():
            declared.append((impl.plugin_name, retention))
    seen: dict[str, str] = {}
    for owner, retention in declared:
        who = f"plugin {owner!r}" if owner else "the framework"
        if not isinstance(retention, Retention):
            raise RetentionError(f"{who} declares retention {retention!r}: not a csms.retention.Retention")
        name = retention.name
        if not isinstance(name, str) or not NAME.match(name):
            raise RetentionError(f"{who} declares retention {name!r}: a name is lower case letters, digits and _")
        if owner is not None and table_owner(name, plugin_names) != owner:
            raise RetentionError(f"plugin {owner!r} declares retention {name!r}: its names start with {owner}_")
        if name in seen:
            raise RetentionError(f"{who} declares retention {name!r}, which {seen[name]} declares too")
        seen[name] = who
        table = retention.table
        if not isinstance(table, Table) or retention.column not in table.c:
            raise RetentionError(f"{who} declares retention {name!r}: column {retention.column!r} is not a column "
                                 f"of its table")
        if not isinstance(table.c[retention.column].type, DateTime):
            raise RetentionError(f"{who} declares retention {name!r}: {table.name}.{retention.column} is not a "
                                 "DateTime column")
        if len(table.primary_key.columns) != 1:
            raise RetentionError(f"{who} declares retention {name!r}: {table.name} needs a one-column primary key")
        if not isinstance(retention.default_days, int) or retention.default_days < 0:
            raise RetentionError(f"{who} declares retention {name!r}: default_days must be a whole number >= 0")
    return [retention for _, retention in declared]


def configured_days(config, declared: list[Retention], enabled, installed) -> dict[str, int]:
    """Name -> days, from ``[retention]``. A key no declaration has is refused like any typo, unless it
    names (by its prefix) an installed plugin that is not enabled: kept for when it is."""
    from csms.plugins import table_owner

    by_name = {retention.name: retention for retention in declared}
    values = config.retention
    for key in values:
        if key in by_name:
            continue
        owner = table_owner(key, installed)
        if owner is not None and owner != "csms" and owner not in enabled:
            continue
        raise RetentionError(no_such_setting("retention", key, by_name)
                             + " (`csms-admin config settings --retention` lists them with what each keeps)")
    days = {}
    for name, retention in by_name.items():
        raw = values.get(name)
        setting = retention.setting()
        value = setting.parse(raw, "retention")
        if value < 0:
            raise RetentionError(f"[retention] {name} = {raw.strip()} is negative: days to keep, 0 keeps for ever")
        days[name] = value
    return days


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


class _Purge:
    """One declaration's statement: delete up to ``limit`` rows older than ``before``, oldest first, found
    through the timestamp column's index (a range of it, never the whole table)."""

    def __init__(self, retention: Retention):
        self.retention = retention
        table = retention.table
        (key,) = table.primary_key.columns
        column = table.c[retention.column]
        oldest = (select(key).where(column < bindparam("before")).order_by(column)
                  .limit(bindparam("limit")).scalar_subquery())
        self.statement = delete(table).where(key.in_(oldest))

    def batch(self, conn, before: datetime, limit: int) -> int:
        return conn.execute(self.statement, {"before": before, "limit": limit}).rowcount


class RetentionService(service.Service):
    """Purges every history with a retention set, every ``interval`` seconds of ``app.clock``.

    Only the cluster's leader purges (``app.cluster.leads()``; a single node always leads). Each batch
    is its own ``app.db.run``: the OCPP work queued meanwhile runs before the next batch. A purge that
    fails is logged; the next one tries again.
    """

    name = "retention"

    def __init__(self, app, declared: list[Retention], days: dict[str, int]):
        self.app = app
        self.purges = [_Purge(retention) for retention in declared if days.get(retention.name)]
        self.days = days
        self.interval = INTERVAL
        self.catch_up_interval = CATCH_UP_INTERVAL
        self.batch_size = BATCH_SIZE
        self.run_budget = RUN_BUDGET
        self.pruned = app.metrics.counter("csms_retention_pruned_rows", "Rows the retention purge deleted",
                                          ("name",))
        self._call = None
        #: The purge under way (a Deferred), or None.
        self.current = None

    def startService(self):
        super().startService()
        if self.purges:
            # The first a minute after start-up: after the reconnections of a restart, and once a node of a
            # cluster knows whether it leads.
            self._schedule(self.catch_up_interval)

    def stopService(self):
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return self.current  # a batch in flight ends before the database stops

    def _schedule(self, delay: float) -> None:
        self._call = self.app.clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._call = None
        self.current = self.purge()

        def again(more):
            self.current = None
            if self.running:
                self._schedule(self.catch_up_interval if more else self.interval)
        self.current.addCallback(again)

    @defer.inlineCallbacks
    def purge(self):
        """One purge of every history with a retention set; fires with whether one stopped at its budget
        (more left). Never fails: a failure is logged."""
        if not self.app.cluster.leads():
            return False
        now = self.app.clock.seconds()
        counts: dict[str, int] = {}
        more = False
        try:
            for purge in self.purges:
                name = purge.retention.name
                before = _utc(now - self.days[name] * 86400)
                deleted = 0
                while deleted < self.run_budget and self.running:
                    limit = min(self.batch_size, self.run_budget - deleted)
                    count = yield self.app.db.run(purge.batch, before, limit, desc=f"retention_{name}")
                    deleted += count
                    if count:
                        self.pruned.labels(name).inc(count)
                    if count < limit:
                        break
                else:  # the budget spent (or the service stopping: then nothing is scheduled or logged)
                    more = more or self.running
                if deleted:
                    counts[name] = deleted
        except Exception:  # noqa: BLE001 - a database outage, a lock: the next purge tries again
            log.failure("Retention: the purge failed; the next one, in {interval:.0f} s, tries again",
                        interval=self.interval)
            more = False
        if counts:
            log.info("Retention: pruned {counts}{more}",
                     counts=", ".join(f"{name} {count}" for name, count in counts.items()),
                     more=" (more left: going on in a minute)" if more else "")
        return more
