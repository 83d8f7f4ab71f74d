"""``csms-admin`` works on the server's database or on none: it reads the server's config, says which
database it opened, and creates one only when asked (``--create``)."""
from __future__ import annotations

import os
import shutil

import pytest
import pytest_twisted
from twisted.internet import threads

from csms.admin import main
from csms.config import DATABASE_URLS


def _framework_head() -> str:
    from csms.migrations import framework_history
    return framework_history().script().get_current_head()


#: The framework history's latest revision (it grows with every framework migration).
FRAMEWORK_HEAD = _framework_head()


def admin(capsys, *argv) -> tuple[int, str, str]:
    """Run ``csms-admin argv``: (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def write_server_config(directory, url: str) -> str:
    (directory / "etc").mkdir(parents=True, exist_ok=True)
    path = directory / "etc" / "csms.ini"
    path.write_text(f"[database]\nurl = {url}\n", encoding="utf-8")
    return str(path)


def test_outside_the_checkout_it_refuses_to_create_a_database(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, out, err = admin(capsys, "token", "create")
    assert status == 1 and out == ""
    assert err == (f"csms-admin: database sqlite:///{tmp_path}/var/csms.sqlite does not exist (the built-in default: "
                   f"no {os.path.join('etc', 'csms.ini')} here); give the server's database with --config or "
                   "--database, or pass --create to create it\n")
    assert not (tmp_path / "var").exists()


def test_create_makes_the_database_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, out, err = admin(capsys, "--create", "token", "create", "--name", "first")
    assert status == 0 and out.startswith("csms_")
    assert err.splitlines()[0] == (f"csms-admin: database sqlite:///{tmp_path}/var/csms.sqlite (the built-in "
                                   f"default: no {os.path.join('etc', 'csms.ini')} here, created now)")
    status, out, err = admin(capsys, "token", "list")
    assert status == 0 and "\tfirst\t" in out
    assert err == (f"csms-admin: database sqlite:///{tmp_path}/var/csms.sqlite (the built-in default: "
                   f"no {os.path.join('etc', 'csms.ini')} here)\n")


def test_it_reads_the_servers_config_like_twistd_csms(tmp_path, monkeypatch, capsys):
    server = tmp_path / "server"
    config = write_server_config(server, f"sqlite:///{server / 'data' / 'csms.sqlite'}")
    monkeypatch.chdir(server)
    assert admin(capsys, "--create", "token", "create")[0] == 0  # the server's first run would do the same

    # From the checkout: etc/csms.ini is found as twistd csms finds it.
    status, out, err = admin(capsys, "token", "list")
    assert status == 0 and len(out.splitlines()) == 1
    assert err == f"csms-admin: database sqlite:///{server}/data/csms.sqlite (from {os.path.join('etc', 'csms.ini')})\n"
    # From anywhere else: --config.
    monkeypatch.chdir(tmp_path)
    status, out, err = admin(capsys, "--config", config, "token", "list")
    assert status == 0 and len(out.splitlines()) == 1
    assert err == f"csms-admin: database sqlite:///{server}/data/csms.sqlite (from {config})\n"


def test_an_existing_file_that_is_no_csms_database_is_refused(tmp_path, capsys):
    other = tmp_path / "other.sqlite"
    import sqlite3

    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE unrelated (x INTEGER)")
    status, out, err = admin(capsys, "--database", f"sqlite:///{other}", "token", "list")
    assert status == 1
    assert err.startswith(f"csms-admin: database sqlite:///{other} holds no CSMS tables (given with --database); ")


def test_an_in_memory_database_is_refused(capsys):
    status, _, err = admin(capsys, "--database", "sqlite:///:memory:", "--create", "token", "create")
    assert status == 1 and "in-memory database is gone when csms-admin exits" in err


@pytest.mark.parametrize("url, shown", [("mysql://csms:secret@db/csms", "mysql://csms:***@db/csms"),
                                        ("var/csms.sqlite", "'var/csms.sqlite' is not a database URL")])
def test_a_database_url_it_cannot_use_gets_one_line(url, shown, capsys):
    status, _, err = admin(capsys, "--database", url, "token", "list")
    assert status == 2
    assert err.count("\n") == 1 and shown in err and err.rstrip().endswith(DATABASE_URLS)
    assert "secret" not in err


def test_an_unreachable_database_gets_one_line(capsys):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    status, _, err = admin(capsys, "--database", f"postgres://csms:secret@127.0.0.1:{port}/csms", "token", "list")
    assert status == 1
    assert err.count("\n") == 1
    assert err.startswith(f"csms-admin: database postgresql+psycopg://csms:***@127.0.0.1:{port}/csms: connection failed")
    assert "secret" not in err


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_postgresql_schema_without_csms_tables_needs_create(database_url, capsys):
    # The database_url fixture gives an empty schema: a database the server has never started on.
    status = await threads.deferToThread(main, ["--database", database_url, "token", "list"])
    assert status == 1
    assert "holds no CSMS tables (given with --database)" in capsys.readouterr().err
    status = await threads.deferToThread(main, ["--database", database_url, "--create", "token", "create"])
    assert status == 0


@pytest_twisted.ensureDeferred
async def test_token_made_on_the_servers_database_is_accepted_by_the_server(csms, database_url, capsys):
    capsys.readouterr()
    status = await threads.deferToThread(main, ["--database", database_url, "token", "create", "--name", "ops"])
    out, err = capsys.readouterr()
    assert status == 0 and "created now" not in err
    assert (await csms.api("GET", "/stations", token=out.strip()))[0] == 200


# -- db: schema migrations -------------------------------------------------------------------------------------


def core_only_config(tmp_path, url: str | None = None) -> str:
    path = tmp_path / "csms.ini"
    path.write_text(f"[database]\nurl = {url or f'sqlite:///{tmp_path}/csms.sqlite'}\n[plugins]\nenabled = core, reservation\n",
                    encoding="utf-8")
    return str(path)


def test_db_upgrade_makes_the_schema_and_current_says_where_each_history_stands(tmp_path, capsys):
    config = core_only_config(tmp_path)
    status, out, err = admin(capsys, "--config", config, "db", "current")
    assert status == 1 and "does not exist" in err

    status, out, err = admin(capsys, "--config", config, "db", "upgrade")
    assert status == 0, err
    assert out.splitlines() == [f"csms: upgraded from an empty schema to {FRAMEWORK_HEAD}",
                                "core: upgraded from an empty schema to core_0002",
                                "reservation: upgraded from an empty schema to reservation_0002"]
    assert err.splitlines()[-1] == "schema current: csms, core, reservation"

    status, out, err = admin(capsys, "--config", config, "db", "current")
    assert status == 0
    assert out.splitlines() == [f"csms\t{FRAMEWORK_HEAD}\tcurrent", "core\tcore_0002\tcurrent",
                                "reservation\treservation_0002\tcurrent"]
    status, out, _ = admin(capsys, "--config", config, "db", "upgrade")
    assert (status, out) == (0, "")  # nothing left to do


def test_token_commands_refuse_a_database_behind_the_code(tmp_path, capsys):
    config = core_only_config(tmp_path)
    assert admin(capsys, "--config", config, "db", "upgrade")[0] == 0
    import sqlite3

    with sqlite3.connect(tmp_path / "csms.sqlite") as conn:
        conn.execute("DELETE FROM csms_alembic_version")
    status, out, err = admin(capsys, "--config", config, "token", "list")
    assert status == 1
    assert err.endswith("its schema is behind this code: run `csms-admin db upgrade`\n")


def test_db_history_lists_each_plugins_migrations(tmp_path, capsys):
    status, out, _ = admin(capsys, "--config", core_only_config(tmp_path), "db", "history", "--plugin", "core")
    assert status == 0
    assert out.splitlines() == ["core\tcore_0001\tbaseline: the tables as create_all made them before migrations",
                                "core\tcore_0002 (head)\tan index for the retention purge"]
    status, _, err = admin(capsys, "--config", core_only_config(tmp_path), "db", "history", "--plugin", "firmware")
    assert status == 1 and err == ("csms-admin: no migration history 'firmware' among the enabled plugins' "
                                   "(csms, core, reservation)\n")


def test_db_revision_autogenerate_writes_the_plugins_next_migration(tmp_path, capsys, monkeypatch):
    """A column added to a plugin's table: one command writes the migration, in batch mode, into the
    plugin's versions directory; upgrading a database with rows in it applies it."""
    from sqlalchemy import Column, MetaData, String, create_engine, text

    from csms.hookspecs import hookimpl
    from csms.migrations import differences, histories
    from csms.plugins import make_plugin_manager
    from csms_plugins.core.plugin import CorePlugin
    from csms_plugins.core.tables import metadata as core_metadata

    versions = tmp_path / "core-versions"
    shutil.copytree(CorePlugin.migrations, versions)
    changed = MetaData()
    for table in core_metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["core_id_tags"].append_column(Column("nickname", String(40)))

    @hookimpl
    def csms_tables(self):
        return changed

    monkeypatch.setattr(CorePlugin, "migrations", str(versions))
    monkeypatch.setattr(CorePlugin, "csms_tables", csms_tables)
    config = core_only_config(tmp_path)
    assert admin(capsys, "--config", config, "db", "upgrade")[0] == 0  # at core_0002
    import sqlite3

    with sqlite3.connect(tmp_path / "csms.sqlite") as conn:
        conn.execute("INSERT INTO core_id_tags (id_tag, status, created_at, updated_at) "
                     "VALUES ('TAG-1', 'Accepted', '2026-01-01', '2026-01-01')")

    status, out, err = admin(capsys, "--config", config, "db", "revision", "--plugin", "core", "-m", "tag nicknames",
                             "--autogenerate")
    assert status == 0, err
    written = versions / "core_0003_tag_nicknames.py"
    assert out.strip() == str(written)
    assert err.endswith("csms-admin: SQLite cannot compare expression-based indexes (core_id_tags_id_tag_ci, "
                        "core_meter_values_sample, core_transactions_id_tag_ci_open): write changes to them by "
                        "hand, or autogenerate --against an empty PostgreSQL database\n")
    script = written.read_text()
    assert "down_revision = 'core_0002'" in script
    assert "with op.batch_alter_table('core_id_tags'" in script and "add_column(sa.Column('nickname'" in script

    status, out, err = admin(capsys, "--config", config, "db", "upgrade")
    assert (status, out) == (0, "core: upgraded from core_0002 to core_0003\n"), err
    engine = create_engine(f"sqlite:///{tmp_path}/csms.sqlite")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id_tag, nickname FROM core_id_tags")).fetchall() == [("TAG-1", None)]
        (core,) = [h for h in histories(make_plugin_manager(["core"])) if h.name == "core"]
        assert differences(conn, core) == []
    engine.dispose()


# -- config settings: what each plugin's [plugin:NAME] settings are for --------------------------------------


def plugins_config(tmp_path, text: str) -> str:
    path = tmp_path / "csms.ini"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_config_settings_shows_each_enabled_plugins_settings_with_doc_type_default_and_value(tmp_path, capsys):
    """The config's value where it gives one (else the default), and a key the plugin does not declare."""
    config = plugins_config(tmp_path, "[plugins]\nenabled = core, acmehub\n"
                                      "[plugin:core]\nheartbeat_interval = 120\nheartbeat_intervall = 60\n")
    status, out, err = admin(capsys, "--config", config, "config", "settings")
    assert status == 0
    assert err == f"csms-admin: the settings of the enabled plugins, with the values of {config}\n"
    assert out == """[plugin:core]
# Heartbeat interval handed to Accepted stations, in seconds.
# (int, default 300)
heartbeat_interval = 120
# Interval handed to Pending or Rejected stations before they boot again, in seconds.
# (int, default 60)
boot_retry_interval = 60
# Answer ConcurrentTx for an id tag that already has a transaction running.
# (bool, default true)
concurrent_tx_check = true
# Seconds Authorize answers from memory per id tag (0: always ask the database).
# (float, default 60.0)
id_tag_cache_seconds = 60.0
# heartbeat_intervall = 60: not a setting of core (start-up refuses it)

# [plugin:acmehub]: no settings
"""


def test_config_settings_prints_every_default_as_a_config_file_reads_it(tmp_path, capsys):
    """Each printed line, read back as the server reads the file, gives the setting's default: types,
    booleans, empty strings and choices included."""
    import configparser

    from csms.plugins import available_plugins, declared_settings

    names = [name for name, entry in sorted(available_plugins().items())
             if declared_settings(entry.load()) and name != "acmehub"]
    config = plugins_config(tmp_path, f"[plugins]\nenabled = {', '.join(names)}\n")
    status, out, _ = admin(capsys, "--config", config, "config", "settings")
    assert status == 0
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(out)
    assert parser.sections() == [f"plugin:{name}" for name in names]
    for name in names:
        settings = declared_settings(available_plugins()[name].load())
        assert parser.options(f"plugin:{name}") == [setting.name for setting in settings]
        for setting in settings:
            assert setting.parse(parser.get(f"plugin:{name}", setting.name), name) == setting.default, setting


def test_config_settings_of_one_installed_plugin_enabled_or_not(tmp_path, capsys):
    config = plugins_config(tmp_path, "[plugins]\nenabled = core\n")
    status, out, err = admin(capsys, "--config", config, "config", "settings", "--plugin", "smartcharging")
    assert status == 0 and err.startswith("csms-admin: the settings of plugin smartcharging, ")
    assert out.startswith("[plugin:smartcharging]\n# ")
    status, out, err = admin(capsys, "--config", config, "config", "settings", "--plugin", "smartcharge")
    assert status == 1 and out == ""
    assert err.startswith("csms-admin: no plugin 'smartcharge' is installed (installed: acmehub, core, ")


def test_db_downgrade_takes_one_history_down_and_upgrade_brings_it_back(tmp_path, capsys):
    """Going back a release: the newer release's csms-admin takes its schema down to the older release's
    revision (the CSMS stopped), the older release then starts on it."""
    from sqlalchemy import create_engine, inspect

    config = core_only_config(tmp_path)
    assert admin(capsys, "--config", config, "db", "upgrade")[0] == 0
    framework = [line.split("\t")[1] for line in admin(capsys, "--config", config, "db", "history",
                                                         "--plugin", "csms")[1].splitlines()]
    previous = framework[-2]
    status, out, err = admin(capsys, "--config", config, "db", "downgrade", "--plugin", "csms", previous)
    assert (status, out) == (0, f"csms: downgraded from {FRAMEWORK_HEAD} to {previous}\n"), err
    status, out, _ = admin(capsys, "--config", config, "db", "current")
    assert out.splitlines()[0] == f"csms\t{previous}\tbehind"

    # What cannot be done is refused in one line, and changes nothing.
    for revision, why in ((FRAMEWORK_HEAD, f"csms cannot go from {previous} down to {FRAMEWORK_HEAD}: "),
                          ("csms_9999", "csms has no revision 'csms_9999' (its revisions: `csms-admin db history "
                                        "--plugin csms`)")):
        status, out, err = admin(capsys, "--config", config, "db", "downgrade", "--plugin", "csms", revision)
        assert (status, out) == (1, ""), err
        assert err.splitlines()[-1].startswith(f"csms-admin: database sqlite:///{tmp_path}/csms.sqlite: {why}"), err
    with pytest.raises(SystemExit) as usage:  # argparse: one history at a time, named
        admin(capsys, "--config", config, "db", "downgrade", "csms_0001")
    assert usage.value.code == 2 and "--plugin" in capsys.readouterr().err

    # base: none of its tables left; the other histories are not touched.
    status, out, err = admin(capsys, "--config", config, "db", "downgrade", "--plugin", "reservation", "base")
    assert (status, out) == (0, "reservation: downgraded from reservation_0002 to base (its tables dropped)\n"), err
    engine = create_engine(f"sqlite:///{tmp_path}/csms.sqlite")
    with engine.connect() as conn:
        names = set(inspect(conn).get_table_names())
    engine.dispose()
    assert not any(name.startswith("reservation_") and name != "reservation_alembic_version" for name in names)
    assert "core_transactions" in names
    status, out, _ = admin(capsys, "--config", config, "db", "downgrade", "--plugin", "reservation", "base")
    assert status == 1

    status, out, err = admin(capsys, "--config", config, "db", "upgrade")
    assert status == 0, err
    assert out.splitlines() == [f"csms: upgraded from {previous} to {FRAMEWORK_HEAD}",
                                "reservation: upgraded from an empty schema to reservation_0002"]


def test_db_upgrade_with_the_shipped_config_creates_no_ca(tmp_path, monkeypatch, capsys):
    """Found by an operator: building the Central System to read the plugins' migration histories configured
    the security plugin, which generated the CSMS CA under var/security/ca. A migration command creates the
    database and nothing of the server's (``twistd csms`` generates the CA on its first start)."""
    (tmp_path / "etc").mkdir()
    shutil.copy(os.path.join(os.path.dirname(__file__), os.pardir, "etc", "csms.ini"), tmp_path / "etc" / "csms.ini")
    monkeypatch.chdir(tmp_path)
    for argv in (("db", "upgrade"), ("db", "current"), ("db", "history")):
        status, out, err = admin(capsys, *argv)
        assert status == 0, err
    assert (tmp_path / "var" / "csms.sqlite").exists()
    assert not (tmp_path / "var" / "security").exists()


def shipped_config_here(tmp_path, monkeypatch) -> None:
    """etc/csms.ini as shipped, in ``tmp_path``, which becomes the working directory (its var/ paths land there)."""
    (tmp_path / "etc").mkdir()
    shutil.copy(os.path.join(os.path.dirname(__file__), os.pardir, "etc", "csms.ini"), tmp_path / "etc" / "csms.ini")
    monkeypatch.chdir(tmp_path)


def test_admin_commands_with_the_shipped_config_leave_the_firmware_directories_alone(tmp_path, monkeypatch, capsys):
    """Found in review: building the Central System to read the plugins' migration histories configured the
    firmware plugin, which created var/firmware and var/diagnostics (and cleaned them: see the next test).
    Only ``twistd csms`` prepares them, as it starts."""
    shipped_config_here(tmp_path, monkeypatch)
    for argv in (("--create", "token", "create", "--name", "first"), ("db", "upgrade"), ("db", "current"),
                 ("db", "history"), ("config", "settings"), ("config", "settings", "--retention"),
                 ("token", "create", "--name", "second"), ("token", "list")):
        status, out, err = admin(capsys, *argv)
        assert status == 0, (argv, err)
    assert (tmp_path / "var" / "csms.sqlite").exists()
    assert not (tmp_path / "var" / "firmware").exists()
    assert not (tmp_path / "var" / "diagnostics").exists()


def test_db_current_beside_a_serving_csms_keeps_its_uploads_in_progress(tmp_path, monkeypatch, capsys):
    """An operator checking ``csms-admin db current`` while the CSMS serves: the hidden file a firmware or
    diagnostics upload is being spooled to is not a crash's leftover, and must survive."""
    shipped_config_here(tmp_path, monkeypatch)
    status, _, err = admin(capsys, "db", "upgrade")
    assert status == 0, err
    # What the serving CSMS has: its directories, an upload being spooled in each, a stored file.
    uploading = [tmp_path / "var" / "firmware" / ".upload-k3x9q1", tmp_path / "var" / "diagnostics" / ".upload-7fz2p0"]
    for path in uploading:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"the first half of an upload")
    (tmp_path / "var" / "firmware" / "fw-1.2.bin").write_bytes(b"an image")
    for argv in (("db", "current"), ("db", "upgrade"), ("db", "history"), ("token", "list")):
        status, out, err = admin(capsys, *argv)
        assert status == 0, (argv, err)
        for path in uploading:
            assert path.read_bytes() == b"the first half of an upload", argv
    assert (tmp_path / "var" / "firmware" / "fw-1.2.bin").read_bytes() == b"an image"


def test_config_settings_reads_no_database_and_makes_none(tmp_path, monkeypatch, capsys):
    """Printing the settings reads the config, not the server's database: nothing appears beside it."""
    shipped_config_here(tmp_path, monkeypatch)
    for argv in (("config", "settings"), ("config", "settings", "--retention")):
        status, out, err = admin(capsys, *argv)
        assert status == 0, (argv, err)
        assert not (tmp_path / "var").exists(), argv
