"""``csms-admin`` works on the server's database or on none: it reads the server's config, says which
database it opened, and creates one only when asked (``--create``)."""
from __future__ import annotations

import os

import pytest
import pytest_twisted
from twisted.internet import threads

from csms.admin import main
from csms.config import DATABASE_URLS


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
