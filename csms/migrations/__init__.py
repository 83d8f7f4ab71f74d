"""Schema migrations with Alembic: one migration history for the framework and one per plugin.

Each history is an Alembic environment of its own: its revisions in its own versions directory (the
framework's in ``csms/migrations/versions``, a plugin's in the directory its ``migrations`` attribute
names) and its own version table, ``<name>_alembic_version``, so that enabling, disabling, adding or
removing a plugin never touches another's history. Every history shares this package's ``env.py`` and
``script.py.mako``. See docs/migrations.md.

Start-up (:func:`prepare_schema`) reads where each enabled history stands and refuses a database that is
behind the code (unless ``[database] auto_upgrade``) or ahead of it. A plugin whose history has no
revision yet gets its tables from its MetaData (``create_all``), as every plugin did before migrations.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import warnings
from dataclasses import dataclass, field

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy import BigInteger, Integer, MetaData, event, inspect, text

#: The framework's own history (``csms_`` tables).
FRAMEWORK = "csms"
VERSION_TABLE_SUFFIX = "_alembic_version"
ENVIRONMENT_DIR = os.path.dirname(os.path.abspath(__file__))
FRAMEWORK_VERSIONS = os.path.join(ENVIRONMENT_DIR, "versions")
UPGRADE_COMMAND = "csms-admin db upgrade"


class SchemaError(Exception):
    """The database's schema cannot be used or changed as asked; ``str()`` says why in one line."""


@dataclass(frozen=True)
class History:
    """One migration history: the framework's or a plugin's (``name``), its tables and its versions directory."""

    name: str
    metadata: MetaData
    #: The versions directory, or None for a plugin that ships no migrations.
    directory: str | None
    #: Names of the other plugins loaded, to tell whose a table is (see csms.plugins.table_owner); the
    #: installed ones count too.
    plugin_names: frozenset = field(default_factory=frozenset)

    @property
    def version_table(self) -> str:
        return self.name + VERSION_TABLE_SUFFIX

    def revision_files(self) -> list[str]:
        if self.directory is None or not os.path.isdir(self.directory):
            return []
        return sorted(f for f in os.listdir(self.directory) if f.endswith(".py") and not f.startswith("__"))

    @property
    def has_revisions(self) -> bool:
        return bool(self.revision_files())

    def owns(self, table_name: str) -> bool:
        """Whether ``table_name`` is one of this history's tables (its version table is not)."""
        from csms.plugins import table_owner

        if table_name.endswith(VERSION_TABLE_SUFFIX):
            return False
        return table_owner(table_name, self.plugin_names | _installed_plugin_names() | {self.name}) == self.name

    def script(self) -> ScriptDirectory:
        return _script_directory(self.directory, tuple(self.revision_files()))

    def config(self, connection=None) -> Config:
        """An Alembic config for this history; ``connection`` is the one env.py migrates."""
        # quiet: Alembic's own progress lines would mix with what csms-admin prints.
        config = Config(cmd_opts=argparse.Namespace(quiet=True))
        config.set_main_option("script_location", ENVIRONMENT_DIR.replace("%", "%%"))
        config.set_main_option("path_separator", "os")
        config.set_main_option("version_locations", (self.directory or "").replace("%", "%%"))
        config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
        config.attributes["csms_history"] = self
        config.attributes["connection"] = connection
        return config


@functools.lru_cache(maxsize=64)
def _script_directory(directory: str, _files: tuple) -> ScriptDirectory:
    # Parsed once per set of revision files (a new migration file makes a new one).
    return ScriptDirectory(ENVIRONMENT_DIR, version_locations=[directory])


@functools.lru_cache(maxsize=1)
def _installed_plugin_names() -> frozenset:
    # Read once: scanning every installed distribution's entry points costs tens of milliseconds, and
    # the CSMS starts once per test in the suite.
    from csms.plugins import available_plugins

    return frozenset(available_plugins())


def plugin_migrations(plugin) -> str | None:
    """The versions directory a plugin names in its ``migrations`` attribute (None: it ships none)."""
    from csms.plugins import PluginError

    directory = getattr(plugin, "migrations", None)
    if directory is None:
        return None
    if not isinstance(directory, (str, os.PathLike)):
        raise PluginError(f"plugin {plugin.name!r}: migrations must name its versions directory (a path), "
                          f"e.g. os.path.join(os.path.dirname(__file__), 'migrations')")
    return os.path.abspath(os.fspath(directory))


def framework_history(plugin_names=frozenset()) -> History:
    from csms.api import audit, tokens  # noqa: F401  (their tables live in the framework metadata)
    from csms.cluster import tables  # noqa: F401  (so do the cluster's)
    from csms.stations import metadata

    return History(FRAMEWORK, metadata, FRAMEWORK_VERSIONS, frozenset(plugin_names))


def histories(pm) -> list[History]:
    """The framework's history, then each loaded plugin's that has tables or migrations, in loading order."""
    from csms.plugins import loaded_plugins

    plugins = loaded_plugins(pm)
    names = frozenset(plugin.name for plugin in plugins)
    tables = {impl.plugin_name: impl.function() for impl in pm.hook.csms_tables.get_hookimpls()}
    out = [framework_history(names)]
    for plugin in plugins:
        metadata = tables.get(plugin.name)
        directory = plugin_migrations(plugin)
        if metadata is None and directory is None:
            continue
        out.append(History(plugin.name, metadata if metadata is not None else MetaData(), directory, names))
    return out


# -- what Alembic's environment (env.py) does ------------------------------------------------------------


def context_options(history: History, dialect_name: str) -> dict:
    """How Alembic runs and compares a history: its version table, its own tables only; new migrations are
    written in batch mode, which SQLite needs (it alters a table by copying it) and PostgreSQL runs as ALTERs."""
    def include_name(name, type_, _parents):
        return history.owns(name) if type_ == "table" else True

    return {"target_metadata": history.metadata, "version_table": history.version_table,
            "render_as_batch": True, "include_name": include_name,
            "compare_type": True, "compare_server_default": True}


def run_environment(context) -> None:
    """The body of env.py: migrate the connection :meth:`History.config` was given."""
    config = context.config
    history = config.attributes["csms_history"]
    connection = config.attributes.get("connection")
    if connection is None or context.is_offline_mode():
        raise SchemaError("migrations run on a database connection (csms-admin db ...); SQL scripts are not offered")
    applied = config.attributes.get("applied")

    def record(*, step, **_kw):
        if applied is not None:
            applied.extend(step.up_revision_ids if step.is_upgrade else step.down_revision_ids)
    context.configure(connection=connection, on_version_apply=record,
                      **context_options(history, connection.dialect.name))
    with context.begin_transaction():
        context.run_migrations()


# -- where a database stands --------------------------------------------------------------------------------


@dataclass
class Status:
    history: History
    #: "current", "behind", "ahead" (a revision this code does not know) or "unmigrated" (no revisions shipped).
    state: str
    current: tuple = ()
    heads: tuple = ()
    #: Tables of this history present with no version table: a database made before migrations.
    unversioned_tables: bool = False

    def describe(self) -> str:
        at = ", ".join(self.current) or ("tables made before migrations" if self.unversioned_tables else "no schema")
        return f"{self.history.name} at {at}, code at {', '.join(self.heads) or 'no revision'}"


def current_revisions(conn, history: History) -> tuple:
    context = MigrationContext.configure(conn, opts={"version_table": history.version_table})
    return tuple(sorted(context.get_current_heads()))


def _known(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except (RevisionError, CommandError):
        return False


def status(conn, history: History) -> Status:
    if not history.has_revisions:
        return Status(history, "unmigrated")
    script = history.script()
    heads = tuple(sorted(script.get_heads()))
    current = current_revisions(conn, history)
    if any(not _known(script, revision) for revision in current):
        return Status(history, "ahead", current, heads)
    if current == heads:
        return Status(history, "current", current, heads)
    unversioned = not current and any(history.owns(name) for name in inspect(conn).get_table_names())
    return Status(history, "behind", current, heads, unversioned)


def statuses(conn, histories_: list[History]) -> list[Status]:
    return [status(conn, history) for history in histories_]


def pending(conn, histories_: list[History]) -> list[Status]:
    """The statuses of the histories the database is not at the head of, behind or ahead (empty: the schema
    is current). A ``thd`` for the pool."""
    return [s for s in statuses(conn, histories_) if s.state not in ("current", "unmigrated")]


def states(found: list[Status]) -> str:
    """Which histories are off their head, and which way: ``core behind; security ahead``."""
    return "; ".join(f"{s.history.name} {s.state}" for s in found)


# -- changing it ------------------------------------------------------------------------------------------------


def prepare_schema(conn, histories_: list[History], auto_upgrade: bool) -> list[str]:
    """Bring every history to its head, or raise SchemaError; returns what was done, one line each.

    Refuses a database ahead of the code, and one behind it unless ``auto_upgrade``. Runs in the caller's
    transaction: nothing is changed unless everything succeeds.
    """
    found = statuses(conn, histories_)
    ahead = [s for s in found if s.state == "ahead"]
    if ahead:
        raise SchemaError(f"the database schema is ahead of this code ({'; '.join(s.describe() for s in ahead)}): "
                          "run the CSMS release that upgraded it, or restore a backup taken before")
    behind = [s for s in found if s.state == "behind"]
    if behind and not auto_upgrade:
        raise SchemaError(f"the database schema is behind the code ({'; '.join(s.describe() for s in behind)}): "
                          f"run `{UPGRADE_COMMAND}` with the same config, or set [database] auto_upgrade = true")
    done = []
    for found_status in found:
        history = found_status.history
        if found_status.state == "unmigrated":
            existing = set(inspect(conn).get_table_names())
            missing = [name for name in history.metadata.tables if name not in existing]
            if missing:
                history.metadata.create_all(conn)
                done.append(f"{history.name}: ships no migrations; tables {', '.join(sorted(missing))} "
                            "created from its MetaData")
        elif found_status.state == "behind":
            done.append(upgrade(conn, found_status))
    return done


def owner(history: History) -> str:
    """Whose history it is, for an operator: ``plugin firmware`` or ``the framework (csms)``."""
    return f"the framework ({history.name})" if history.name == FRAMEWORK else f"plugin {history.name}"


def upgrade_to_heads(conn, history: History, current: tuple) -> None:
    """``alembic upgrade heads`` for one history; a revision that fails raises SchemaError naming the
    history's plugin and the revision (the caller's transaction then changes nothing)."""
    config = history.config(conn)
    applied: list = []
    config.attributes["applied"] = applied
    try:
        command.upgrade(config, "heads")
    except SchemaError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a revision's code raises, said with whose it is
        revision = failed_revision(history, current, applied)
        raise SchemaError(f"{owner(history)}'s migration {revision} failed: {_reason(exc)}; nothing was "
                          "changed (the upgrade is one transaction): fix the cause and start again, or "
                          "restore a backup") from exc


def failed_revision(history: History, current: tuple, applied: list) -> str:
    """The revision an upgrade from ``current`` was applying when it failed: the first on its way to the
    heads that it had not applied (``applied``, in the order they were)."""
    script = history.script()
    try:
        on_the_way = [rev.revision for rev in script.iterate_revisions("heads", current or "base")]
    except (RevisionError, CommandError):
        on_the_way = []
    for revision in reversed(on_the_way):  # oldest first, as an upgrade applies them
        if revision not in applied:
            return revision
    return "(unknown revision)"


def _reason(exc: BaseException) -> str:
    """One line on why a revision failed: the database's own message, or the exception's."""
    orig = getattr(exc, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's own error
    text_ = str(orig if orig is not None else exc).strip().splitlines()
    first = text_[0].strip() if text_ else ""
    if orig is not None:
        return first or type(orig).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def upgrade(conn, found: Status) -> str:
    history = found.history
    if found.unversioned_tables:
        baseline = adopt(conn, history)
    upgrade_to_heads(conn, history, (baseline,) if found.unversioned_tables else found.current)
    heads = ", ".join(found.heads)
    if not found.unversioned_tables:
        return f"{history.name}: upgraded from {', '.join(found.current) or 'an empty schema'} to {heads}"
    repaired = widen_integer_columns(conn, history)
    repaired += create_missing(conn, history)
    left = differences(conn, history)
    if left:
        raise SchemaError(f"the {history.name} tables made before migrations differ from its baseline {baseline}: "
                          f"{describe_differences(left)}; upgrade them by hand or start from a new database")
    return (f"{history.name}: tables made before migrations adopted as {baseline}"
            + (f" (repaired: {', '.join(repaired)})" if repaired else "") + f", upgraded to {heads}")


def downgrade(conn, history: History, revision: str) -> str:
    """Take ``history`` down to ``revision`` (one of its revisions; ``base``: none, its tables dropped) in
    the caller's transaction; returns what was done, or raises SchemaError."""
    found = status(conn, history)
    if found.state == "unmigrated":
        raise SchemaError(f"{history.name} ships no migrations: its tables are made from its MetaData, there is "
                          "nothing to downgrade")
    if found.state == "ahead":
        raise SchemaError(f"the database schema is ahead of this code ({found.describe()}): downgrade it with the "
                          "csms-admin of the release that upgraded it")
    if not found.current:
        raise SchemaError(f"{history.name} has no schema in this database: nothing to downgrade")
    if revision != "base" and not _known(history.script(), revision):
        raise SchemaError(f"{history.name} has no revision {revision!r} (its revisions: `csms-admin db history "
                          f"--plugin {history.name}`)")
    if (revision,) == found.current:
        return f"{history.name}: already at {revision}"
    try:
        command.downgrade(history.config(conn), revision)
    except (CommandError, RevisionError) as exc:  # e.g. a revision above the current one
        raise SchemaError(f"{history.name} cannot go from {', '.join(found.current)} down to {revision}: "
                          f"{str(exc).splitlines()[0]}") from None
    return (f"{history.name}: downgraded from {', '.join(found.current)} to "
            f"{revision if revision != 'base' else 'base (its tables dropped)'}")


def adopt(conn, history: History) -> str:
    """Stamp a database made by ``create_all`` before migrations at the history's first revision, which
    reproduces that schema; what comes after it is then applied as to any database."""
    bases = history.script().get_bases()
    if len(bases) != 1:
        raise SchemaError(f"plugin {history.name}'s migrations have {len(bases)} first revisions: cannot tell "
                          "which one its tables made before migrations match")
    context = MigrationContext.configure(conn, opts={"version_table": history.version_table})
    context.stamp(history.script(), bases[0])
    return bases[0]


def _column_changes(diffs: list):
    for diff in diffs:
        for change in diff if isinstance(diff, list) else [diff]:
            yield change


def _int_to_bigint(change) -> bool:
    return (change[0] == "modify_type" and isinstance(change[6], BigInteger)
            and isinstance(change[5], Integer) and not isinstance(change[5], BigInteger))


def widen_integer_columns(conn, history: History) -> list[str]:
    """INTEGER columns that the code declares BIGINT (databases made before issue 12) become BIGINT.

    Widening loses nothing. On PostgreSQL the column (and a serial column's sequence) is altered; SQLite
    stores every integer in 64 bits whatever the declared type, so there is nothing to change there (and
    :func:`differences` does not count it).
    """
    if conn.dialect.name == "sqlite":
        return []
    widened = []
    quote = conn.dialect.identifier_preparer.quote
    for change in _column_changes(differences(conn, history, widen=False)):
        if not _int_to_bigint(change):
            continue
        table, column = change[2], change[3]
        conn.exec_driver_sql(f"ALTER TABLE {quote(table)} ALTER COLUMN {quote(column)} TYPE BIGINT")
        sequence = conn.execute(text("SELECT pg_get_serial_sequence(:t, :c)"),
                                {"t": quote(table), "c": column}).scalar()
        if sequence:
            conn.exec_driver_sql(f"ALTER SEQUENCE {sequence} AS BIGINT")
        widened.append(f"{table}.{column}")
    return widened


#: What Alembic and SQLAlchemy say about each expression-based index on SQLite, which cannot reflect them.
EXPRESSION_INDEX_WARNING = ".*expression-based index"


def create_missing(conn, history: History) -> list[str]:
    """The tables and indexes of the baseline that a database made before migrations lacks, created as an
    older release's start-up would have (``create_all`` made missing tables, never an index of an existing
    table), once the later revisions are applied: the MetaData is then the schema the database should have,
    and a later revision that needed what is missing has failed the adoption already. A unique index
    that the rows already break fails, and with it the whole adoption."""
    created = []
    for change in _column_changes(differences(conn, history)):
        if change[0] == "add_table":
            # The MetaData's own table, with its indexes (the comparison hands over a copy without them).
            history.metadata.tables[change[1].name].create(conn)
            created.append(change[1].name)
        elif change[0] == "add_index" and change[1].table.name not in created:
            change[1].create(conn)
            created.append(change[1].name)
    if conn.dialect.name == "sqlite":
        # SQLite cannot reflect expression-based indexes, so the comparison does not see them: look them up.
        present = set(conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'index'").scalars())
        for table in history.metadata.tables.values():
            for index in table.indexes:
                if index.name not in present and table.name not in created:
                    index.create(conn)
                    created.append(index.name)
    return created


def differences(conn, history: History, widen: bool = True) -> list:
    """What Alembic's autogenerate finds between the database and the history's MetaData (empty: they match)."""
    context = MigrationContext.configure(conn, opts=context_options(history, conn.dialect.name))
    with warnings.catch_warnings():
        # SQLite cannot reflect expression-based indexes: Alembic skips them there, saying so each time
        # (PostgreSQL compares them; the test suite runs on both).
        warnings.filterwarnings("ignore", message=EXPRESSION_INDEX_WARNING)
        diffs = compare_metadata(context, history.metadata)
    if widen and conn.dialect.name == "sqlite":
        diffs = [d for d in diffs if not (isinstance(d, list) and all(_int_to_bigint(c) for c in d))]
    return diffs


def describe_differences(diffs: list, most: int = 3) -> str:
    words = []
    for change in list(_column_changes(diffs))[:most]:
        kind = change[0]
        if kind in ("add_table", "remove_table"):
            words.append(f"{kind} {change[1].name}")
        elif kind in ("add_index", "remove_index", "add_constraint", "remove_constraint"):
            words.append(f"{kind} {change[1].name}")
        elif kind in ("add_column", "remove_column"):
            words.append(f"{kind} {change[2]}.{change[3].name}")
        else:
            words.append(f"{kind} {change[2]}.{change[3]}")
    more = len(list(_column_changes(diffs))) - most
    return ", ".join(words) + (f" and {more} more" if more > 0 else "")


def create_from_metadata(conn, histories_: list[History]) -> None:
    """The schema of every history made from its MetaData, each stamped at its head: what migrations make
    (tests/test_migrations.py proves it), at the cost of one ``create_all``. For test harnesses only.

    A test suite makes the same schema in a fresh, empty database or PostgreSQL schema again and again.
    The first time, in an empty one, the statements that made it are recorded; later in an empty one
    they are sent again as they were, on PostgreSQL in one round trip, instead of compiling them again
    and asking whether each table exists (most of a PostgreSQL test's start). A database with any table
    in it takes the whole path."""
    key = (conn.dialect.name, tuple((history.name, history.metadata, len(history.metadata.tables))
                                    for history in histories_))
    empty = not inspect(conn).get_table_names()
    recorded = _SCHEMA_SCRIPTS.get(key) if empty else None
    if recorded is not None:
        _replay(conn, recorded)
        return
    statements: list = []

    def record(conn_, cursor, statement, parameters, context, executemany):
        if not statement.lstrip().upper().startswith(("SELECT", "PRAGMA", "WITH")):
            statements.append((statement, parameters))
    event.listen(conn, "before_cursor_execute", record)
    try:
        for history in histories_:
            history.metadata.create_all(conn)
            if history.has_revisions and not current_revisions(conn, history):
                MigrationContext.configure(conn, opts={"version_table": history.version_table}).stamp(
                    history.script(), "heads")
    finally:
        event.remove(conn, "before_cursor_execute", record)
    if empty:
        _SCHEMA_SCRIPTS[key] = statements


#: (dialect, the histories with their MetaData) -> the statements that made their schema in an empty
#: database (create_from_metadata). Holding the MetaData keeps its id from being reused by another.
_SCHEMA_SCRIPTS: dict = {}


def _replay(conn, statements: list) -> None:
    if conn.dialect.name == "postgresql" and not any(parameters for _, parameters in statements):
        conn.exec_driver_sql(";\n".join(statement for statement, _ in statements))
        return
    for statement, parameters in statements:
        conn.exec_driver_sql(statement, parameters)


def next_revision_id(history: History) -> str:
    """``<name>_0001``, ``<name>_0002`` ...: revision ids that say whose they are and in which order they come."""
    numbers = [int(m.group(1)) for f in history.revision_files()
               if (m := re.match(re.escape(history.name) + r"_(\d+)", f))]
    return f"{history.name}_{max(numbers, default=0) + 1:04d}"
