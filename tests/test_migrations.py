"""Schema migrations (docs/migrations.md): each plugin's Alembic history makes exactly its tables, start-up
refuses a database behind or ahead of the code unless told to upgrade, a database made before migrations
is adopted, and ``csms-admin db ...`` does the same from the command line."""
from __future__ import annotations

import os
import textwrap

import pytest
import pytest_twisted
from sqlalchemy import BigInteger, Column, Integer, MetaData, String, create_engine, inspect, text

from zope.interface import implementer

from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from csms.migrations import (FRAMEWORK_VERSIONS, SchemaError, create_from_metadata, current_revisions, differences,
                             histories, prepare_schema)
from csms.plugins import make_plugin_manager
from csms.service import StartupError
from csms.testing.pytest_plugin import builtin_plugins

AUTO_UPGRADE = "[database]\nauto_upgrade = true\n"


def delivery_history():
    from csms_plugins.webhooks.delivery_db import history

    return history()


def builtin_histories() -> list:
    return histories(make_plugin_manager(builtin_plugins()))


@pytest.fixture
def engine(database_url):
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


def table_names(engine) -> set:
    with engine.connect() as conn:
        return set(inspect(conn).get_table_names())


# -- the migrations make exactly what the MetaData declares -------------------------------------------------


def test_upgrade_heads_on_an_empty_database_makes_every_plugins_metadata(engine):
    found = builtin_histories()
    with engine.begin() as conn:
        done = prepare_schema(conn, found, auto_upgrade=True)
    assert len(done) == len([h for h in found if h.has_revisions]) > 6
    with engine.connect() as conn:
        for history in found:
            assert differences(conn, history) == [], history.name
            assert set(current_revisions(conn, history)) == set(history.script().get_heads()), history.name


def test_on_sqlite_the_migrated_schema_is_the_create_all_schema_statement_for_statement(tmp_path):
    """SQLite keeps each table's and index's CREATE statement: compared whole, expression indexes included."""
    def schema(url, make):
        engine = create_engine(url)
        with engine.begin() as conn:
            make(conn)
            rows = conn.exec_driver_sql("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE "
                                        "'%alembic_version%' AND sql IS NOT NULL ORDER BY name").fetchall()
        engine.dispose()
        return {(kind, name): " ".join(sql.split()) for kind, name, sql in rows}

    found = builtin_histories()
    migrated = schema(f"sqlite:///{tmp_path}/migrated.sqlite", lambda conn: prepare_schema(conn, found, True))
    created = schema(f"sqlite:///{tmp_path}/created.sqlite",
                     lambda conn: [h.metadata.create_all(conn) for h in found])
    assert migrated == created
    # The webhooks plugin's delivery file (SQLite only) has a history of its own.
    delivery = delivery_history()
    migrated = schema(f"sqlite:///{tmp_path}/delivery-migrated.sqlite",
                      lambda conn: prepare_schema(conn, [delivery], True))
    assert migrated == schema(f"sqlite:///{tmp_path}/delivery-created.sqlite", delivery.metadata.create_all)
    assert {name for _, name in migrated} >= {"webhooks_events", "webhooks_deliveries", "webhooks_delivery_state"}
    engine = create_engine(f"sqlite:///{tmp_path}/delivery-migrated.sqlite")
    with engine.connect() as conn:
        assert differences(conn, delivery) == []
        assert current_revisions(conn, delivery) == tuple(delivery.script().get_heads())
    engine.dispose()


def test_a_table_changed_without_a_migration_is_found(engine):
    """What the test above looks for: a column added to a table's definition, with no migration, is a difference."""
    found = builtin_histories()
    with engine.begin() as conn:
        prepare_schema(conn, found, auto_upgrade=True)
    core = next(h for h in found if h.name == "core")
    changed = MetaData()
    for table in core.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["core_id_tags"].append_column(Column("nickname", String(40)))
    with engine.connect() as conn:
        diffs = differences(conn, type(core)(core.name, changed, core.directory, core.plugin_names))
    assert [(d[0], d[2], d[3].name) for d in diffs] == [("add_column", "core_id_tags", "nickname")]


def test_every_builtin_plugin_with_tables_ships_its_migrations():
    without = [h.name for h in builtin_histories() if h.metadata.tables and not h.has_revisions]
    assert without == []


# -- start-up --------------------------------------------------------------------------------------------------


async def refused(csms_factory, **kwargs) -> str:
    with pytest.raises(StartupError) as caught:
        await csms_factory(migrate=True, **kwargs)
    return str(caught.value)


@pytest_twisted.ensureDeferred
async def test_a_fresh_database_is_refused_without_auto_upgrade(csms_factory, engine):
    message = await refused(csms_factory, plugins=["core"])
    assert message.endswith("the database schema is behind the code (csms at no schema, code at csms_0004; core at "
                            "no schema, code at core_0002): run `csms-admin db upgrade` with the same config, or set "
                            "[database] auto_upgrade = true")
    assert table_names(engine) == set()


@pytest_twisted.ensureDeferred
async def test_auto_upgrade_migrates_a_fresh_database(csms_factory, engine):
    csms = await csms_factory(AUTO_UPGRADE, migrate=True, plugins=["core", "reservation"])
    assert await csms.app.schema_is_current() is True
    names = table_names(engine)
    assert {"csms_alembic_version", "core_alembic_version", "reservation_alembic_version",
            "core_transactions", "reservation_reservations"} <= names
    assert not any(name.startswith(("firmware_", "smartcharging_")) for name in names)


@pytest_twisted.ensureDeferred
async def test_schema_is_current_says_false_once_a_history_is_behind(csms_factory, engine):
    csms = await csms_factory(plugins=["core"])
    assert await csms.app.schema_is_current() is True
    status, body = await readyz(csms)
    assert status == 200 and body["checks"]["migrations"] == "ok"
    await csms.app.db.run(lambda conn: conn.execute(text("DELETE FROM core_alembic_version")), desc="test")
    assert await csms.app.schema_is_current() is False
    status, body = await readyz(csms)
    assert status == 503 and "migrations" in body["error"]["details"]["failed"], body
    assert body["error"]["details"]["checks"]["migrations"] == "schema not at the code's head: core behind", body
    # Ahead (a newer release's revision) is said as such, as `csms-admin db current` says it (found by an
    # operator's walk through the docs: it read "behind").
    await csms.app.db.run(lambda conn: conn.execute(
        text("INSERT INTO core_alembic_version (version_num) VALUES ('core_0099')")), desc="test")
    status, body = await readyz(csms)
    assert (status, body["error"]["details"]["checks"]["migrations"]) == (503, "schema not at the code's head: core ahead"), body


async def readyz(csms):
    import json

    import treq

    response = await treq.get(f"http://127.0.0.1:{csms.api_port}/readyz", reactor=csms.reactor, timeout=10)
    return response.code, json.loads(await treq.content(response))


@pytest_twisted.ensureDeferred
async def test_a_database_ahead_of_the_code_is_refused_even_with_auto_upgrade(csms_factory, engine):
    with engine.begin() as conn:
        create_from_metadata(conn, builtin_histories())
        conn.execute(text("UPDATE core_alembic_version SET version_num = 'core_0999'"))
    message = await refused(csms_factory, config_text=AUTO_UPGRADE, plugins=["core"])
    assert message.endswith("the database schema is ahead of this code (core at core_0999, code at core_0002): run "
                            "the CSMS release that upgraded it, or restore a backup taken before")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM core_alembic_version")).scalar_one() == "core_0999"


@pytest_twisted.ensureDeferred
async def test_enabling_a_plugin_later_creates_its_tables_and_disabling_leaves_them(csms_factory, engine):
    first = await csms_factory(AUTO_UPGRADE, migrate=True, plugins=["core"])
    await first.stop()
    assert not any(name.startswith("reservation_") for name in table_names(engine))

    second = await csms_factory(AUTO_UPGRADE, migrate=True, plugins=["core", "reservation"])
    await second.app.db.run(lambda conn: conn.execute(text(
        "INSERT INTO reservation_id_counter (name, last_id) VALUES ('kept', 41)")), desc="test")
    await second.stop()

    third = await csms_factory(migrate=True, plugins=["core"])  # no auto_upgrade needed: core is current
    await third.stop()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT last_id FROM reservation_id_counter")).scalar_one() == 41
        assert conn.execute(text("SELECT version_num FROM reservation_alembic_version")).scalar_one() == "reservation_0002"


# -- a database made before migrations -----------------------------------------------------------------------


def create_all_as_before_migrations(conn, histories_, integer_columns: bool = False) -> None:
    """What every release before migrations made: each history's baseline schema (its first revision, which
    reproduces it), no version table; ``integer_columns``: as before issue 12, INTEGER where BIGINT is
    declared now (PostgreSQL; SQLite stores 64 bits either way)."""
    from alembic import command

    for history in histories_:
        if not history.has_revisions:
            history.metadata.create_all(conn)
            continue
        (base,) = history.script().get_bases()
        command.upgrade(history.config(conn), base)
        conn.exec_driver_sql(f"DROP TABLE {history.version_table}")
        if integer_columns and conn.dialect.name == "postgresql":
            found = inspect(conn)
            for table in found.get_table_names():
                if not history.owns(table):
                    continue
                for column in found.get_columns(table):
                    if isinstance(column["type"], BigInteger):
                        conn.exec_driver_sql(f'ALTER TABLE {table} ALTER COLUMN "{column["name"]}" TYPE INTEGER')


@pytest_twisted.ensureDeferred
async def test_a_database_made_before_migrations_is_adopted_with_its_rows(csms_factory, engine):
    with engine.begin() as conn:
        create_all_as_before_migrations(conn, builtin_histories())
        conn.execute(text("INSERT INTO reservation_id_counter (name, last_id) VALUES ('reservation', 7)"))
    message = await refused(csms_factory, plugins=["core", "reservation"])
    assert "(csms at tables made before migrations, code at csms_0004; core at tables made" in message

    csms = await csms_factory(AUTO_UPGRADE, migrate=True, plugins=["core", "reservation"])
    assert await csms.app.schema_is_current() is True
    with engine.connect() as conn:
        assert conn.execute(text("SELECT last_id FROM reservation_id_counter")).scalar_one() == 7
        assert conn.execute(text("SELECT version_num FROM core_alembic_version")).scalar_one() == "core_0002"


@pytest_twisted.ensureDeferred
async def test_integer_columns_from_before_issue_12_are_widened_to_bigint(csms_factory, engine, database_url):
    with engine.begin() as conn:
        create_all_as_before_migrations(conn, builtin_histories(), integer_columns=True)
    csms = await csms_factory(AUTO_UPGRADE, migrate=True, plugins=["core"])
    big = 2 ** 40
    await csms.app.db.run(lambda conn: conn.execute(text(
        "INSERT INTO core_unmatched_stops (station_id, transaction_id, meter_stop, timestamp, received_at) "
        "VALUES ('CP-1', :big, :big, '2026-01-01', '2026-01-01')"), {"big": big}), desc="test")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT transaction_id FROM core_unmatched_stops")).scalar_one() == big
        if database_url.startswith("postgresql"):
            types = {c["name"]: str(c["type"]) for c in inspect(conn).get_columns("core_unmatched_stops")}
            assert types["id"] == types["transaction_id"] == "BIGINT"
            # The serial key's sequence was widened with its column.
            conn.execute(text("SELECT setval(pg_get_serial_sequence('core_unmatched_stops', 'id'), :big)"),
                         {"big": big})


@pytest_twisted.ensureDeferred
async def test_a_table_and_indexes_missing_from_a_database_made_before_migrations_are_created(csms_factory, engine):
    """An older release's database: create_all made every table it knew, and never an index of a table that
    already existed (the unique sample index came with issue 12)."""
    with engine.begin() as conn:
        create_all_as_before_migrations(conn, builtin_histories())
        conn.exec_driver_sql("DROP TABLE core_unmatched_stops")
        conn.exec_driver_sql("DROP INDEX core_meter_values_sample")
        conn.exec_driver_sql("DROP INDEX core_id_tags_id_tag_ci")
    await csms_factory(AUTO_UPGRADE, migrate=True, plugins=["core"])
    with engine.connect() as conn:
        assert "core_unmatched_stops" in inspect(conn).get_table_names()
        (core,) = [h for h in builtin_histories() if h.name == "core"]
        assert differences(conn, core) == []
        if conn.dialect.name == "sqlite":  # where the comparison cannot see expression-based indexes
            names = set(conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'index'").scalars())
            assert {"core_meter_values_sample", "core_id_tags_id_tag_ci"} <= names


@pytest_twisted.ensureDeferred
async def test_a_database_made_before_migrations_that_differs_is_refused_and_left_alone(csms_factory, engine):
    with engine.begin() as conn:
        create_all_as_before_migrations(conn, builtin_histories())
        conn.exec_driver_sql("ALTER TABLE core_boot_info DROP COLUMN imsi")
    message = await refused(csms_factory, config_text=AUTO_UPGRADE, plugins=["core"])
    assert message.endswith("the core tables made before migrations differ from its baseline core_0001: add_column "
                            "core_boot_info.imsi; upgrade them by hand or start from a new database")
    assert not {"csms_alembic_version", "core_alembic_version"} & table_names(engine)  # all or nothing


# -- a plugin's own history, step by step ---------------------------------------------------------------------

GADGET_0001 = '''
from alembic import op
import sqlalchemy as sa

revision = "gadget_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("gadget_things", sa.Column("id", sa.Integer(), primary_key=True),
                    sa.Column("name", sa.String(20), nullable=False))
'''

GADGET_0002 = '''
from alembic import op
import sqlalchemy as sa

revision = "gadget_0002"
down_revision = "gadget_0001"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("gadget_things") as batch_op:
        batch_op.add_column(sa.Column("colour", sa.String(10)))
'''


def gadget_plugin(versions, with_colour: bool):
    metadata = MetaData()
    from sqlalchemy import Table

    Table("gadget_things", metadata, Column("id", Integer, primary_key=True), Column("name", String(20), nullable=False),
          *([Column("colour", String(10))] if with_colour else []))

    @implementer(ICSMSPlugin)
    class Gadget:
        name = "gadget"
        profile = None
        inbound_actions = ()
        outbound_actions = ()
        migrations = str(versions)

        @hookimpl
        def csms_tables(self):
            return metadata
    return Gadget()


@pytest_twisted.ensureDeferred
async def test_a_plugin_behind_is_refused_then_upgraded_keeping_its_rows(csms_factory, engine, tmp_path):
    versions = tmp_path / "gadget-versions"
    versions.mkdir()
    (versions / "gadget_0001_things.py").write_text(textwrap.dedent(GADGET_0001))
    first = await csms_factory(AUTO_UPGRADE, migrate=True, plugins=["core"],
                               extra_plugins=[gadget_plugin(versions, with_colour=False)])
    await first.app.db.run(lambda conn: conn.execute(text("INSERT INTO gadget_things (name) VALUES ('kept')")),
                           desc="test")
    await first.stop()

    (versions / "gadget_0002_colour.py").write_text(textwrap.dedent(GADGET_0002))
    message = await refused(csms_factory, plugins=["core"], extra_plugins=[gadget_plugin(versions, with_colour=True)])
    assert "(gadget at gadget_0001, code at gadget_0002)" in message
    second = await csms_factory(AUTO_UPGRADE, migrate=True, plugins=["core"],
                                extra_plugins=[gadget_plugin(versions, with_colour=True)])
    assert await second.app.schema_is_current() is True
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name, colour FROM gadget_things")).fetchall() == [("kept", None)]


@pytest_twisted.ensureDeferred
async def test_a_plugin_without_migrations_gets_its_tables_from_its_metadata(csms_factory, engine):
    plugin = gadget_plugin("unused", with_colour=False)
    type(plugin).migrations = None
    await csms_factory(migrate=True, config_text=AUTO_UPGRADE, plugins=["core"], extra_plugins=[plugin])
    assert "gadget_things" in table_names(engine) and "gadget_alembic_version" not in table_names(engine)


def test_a_plugin_naming_no_path_for_its_migrations_is_refused():
    from csms.plugins import PluginError

    plugin = gadget_plugin("unused", with_colour=False)
    type(plugin).migrations = 42
    with pytest.raises(PluginError, match="'gadget': migrations must name its versions directory"):
        make_plugin_manager(["core"], extra_plugins=[plugin])


def test_framework_versions_are_packaged_beside_the_environment():
    assert os.path.isfile(os.path.join(os.path.dirname(FRAMEWORK_VERSIONS), "script.py.mako"))
    assert os.path.isfile(os.path.join(FRAMEWORK_VERSIONS, "csms_0001_baseline.py"))


def test_schema_error_is_one_line():
    assert "\n" not in str(SchemaError("x"))



def test_every_builtin_history_is_package_data():
    """A wheel holds only the package data setup.cfg names: a history left out would be missing once installed."""
    import configparser

    setup = configparser.ConfigParser()
    setup.read(os.path.join(os.path.dirname(__file__), "..", "setup.cfg"))
    package_data = setup["options.package_data"]
    assert "versions/*.py" in package_data["csms.migrations"] and "script.py.mako" in package_data["csms.migrations"]
    for history in builtin_histories()[1:]:
        assert "migrations/*.py" in package_data.get(f"csms_plugins.{history.name}", "").split(", "), history.name
    assert "delivery_migrations/*.py" in package_data["csms_plugins.webhooks"].split(", ")
    assert os.path.basename(delivery_history().directory) == "delivery_migrations"


# -- downgrades ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["builtin", "delivery file"])
def test_every_builtin_migration_downgrades_and_upgrades_again_to_the_same_schema(engine, tmp_path, which):
    """Each history walked down one revision at a time to its base (its tables gone), then up again: every
    shipped downgrade() runs, and what the upgrades make afterwards is still exactly the MetaData. (The
    webhook delivery file's history has a database of its own.)"""
    from alembic import command

    if which == "builtin":
        found = builtin_histories()
    else:
        found = [delivery_history()]
        engine = create_engine(f"sqlite:///{tmp_path / 'deliveries.sqlite'}")
    with engine.begin() as conn:
        prepare_schema(conn, found, auto_upgrade=True)
    for history in (h for h in found if h.has_revisions):
        revisions = [r.revision for r in reversed(list(history.script().walk_revisions()))]
        for below in reversed([None] + revisions[:-1]):
            with engine.begin() as conn:
                command.downgrade(history.config(conn), below or "base")
                assert current_revisions(conn, history) == ((below,) if below else ()), history.name
        with engine.connect() as conn:
            assert not [name for name in inspect(conn).get_table_names() if history.owns(name)], history.name
        with engine.begin() as conn:
            command.upgrade(history.config(conn), "heads")
        with engine.connect() as conn:
            assert differences(conn, history) == [], history.name
