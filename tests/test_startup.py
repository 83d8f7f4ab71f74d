"""``twistd csms`` starting up, as a process supervisor (systemd, a container runtime) sees it.

Real processes: ``twistd -n --pidfile= csms --config <file>`` on loopback ports. A start-up that
cannot complete (a port taken, a bad port, a database that refuses, a bad config) ends the process
with status 1 and one line saying what failed, the last on stderr (``csms: cannot start: ...``),
without a traceback and without "Central System ready"; a good start serves until SIGTERM.
"""
from __future__ import annotations

import os
import socket
import textwrap

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor

from csms.service import CANNOT_START
from csms.testing.processes import (DEADLINE, TwistdProcess, listening_port,  # noqa: F401 - used by other tests
                                    run_twistd)

LOOPBACK = "tcp:0:interface=127.0.0.1"
#: How a listener whose port is taken says so, and what to do.
IN_USE = "address already in use (another process listens there: stop it, or choose another port)"


def head(history: str) -> str:
    """The latest revision of a built-in migration history."""
    import importlib

    from sqlalchemy import MetaData

    from csms.migrations import FRAMEWORK_VERSIONS, History

    if history == "csms":
        directory = FRAMEWORK_VERSIONS
    else:
        directory = os.path.join(os.path.dirname(importlib.import_module(f"csms_plugins.{history}").__file__),
                                 "migrations")
    return History(history, MetaData(), directory).script().get_current_head()


def write_config(tmp_path, database_url: str, *, ocpp: str = LOOPBACK, api: str = LOOPBACK,
                 http: str = LOOPBACK, ftp: str = LOOPBACK, enabled: str = "core, firmware", extra: str = "",
                 auto_upgrade: bool = True) -> str:
    path = tmp_path / "csms.ini"
    path.write_text(textwrap.dedent(f"""\
        [ocpp]
        endpoint = {ocpp}
        [api]
        endpoint = {api}
        [database]
        url = {database_url}
        auto_upgrade = {str(auto_upgrade).lower()}
        [plugins]
        enabled = {enabled}
        [plugin:firmware]
        http_endpoint = {http}
        ftp_endpoint = {ftp}
        firmware_dir = {tmp_path / "firmware"}
        diagnostics_dir = {tmp_path / "diagnostics"}
        """) + textwrap.dedent(extra), encoding="utf-8")
    return str(path)


def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'csms.sqlite'}"


@pytest.fixture
def taken_port():
    """A loopback port another socket listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def failed_start(process: TwistdProcess, what: str) -> None:
    """The run ended with status 1, its last line on stderr is ``csms: cannot start: `` and ``what`` (the
    only such line there; the log has it at most once), it never said it was ready, and showed no traceback."""
    status = await process.finished()
    output = process.stdout + process.stderr
    assert status == 1, output
    lines = process.stderr.splitlines()
    assert lines and lines[-1].startswith(CANNOT_START) and what in lines[-1], \
        f"expected {CANNOT_START}{what!r} last on stderr:\n{output}"
    assert process.stderr.count(CANNOT_START) == 1 and process.stdout.count(lines[-1]) <= 1, output
    assert "Central System ready" not in output
    assert "Traceback" not in output and "Unhandled" not in output, output


# -- a listener cannot listen ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ocpp_port_in_use_exits_1_with_one_line(tmp_path, taken_port):
    endpoint = f"tcp:{taken_port}:interface=127.0.0.1"
    process = run_twistd(write_config(tmp_path, sqlite_url(tmp_path), ocpp=endpoint), str(tmp_path))
    await failed_start(process, f"cannot listen on {endpoint} ([ocpp] endpoint): {IN_USE}")


def shipped_plugins() -> str:
    """The plugins etc/csms.ini enables, as shipped (all of them)."""
    import configparser

    shipped = configparser.ConfigParser(interpolation=None)
    shipped.read(os.path.join(os.path.dirname(__file__), os.pardir, "etc", "csms.ini"), encoding="utf-8")
    return shipped["plugins"]["enabled"]


@pytest_twisted.ensureDeferred
async def test_ocpp_port_in_use_exits_1_with_every_shipped_plugin_enabled(tmp_path, taken_port):
    """Found by an integrator following the README: with the shipped plugins (the webhooks' delivery worker
    and its file among them), a taken port logged its line and "Server Shut Down", and the process then
    waited for ever on the delivery file's database threads: a plugin service's stop needs the reactor,
    which the failure had stopped at once."""
    endpoint = f"tcp:{taken_port}:interface=127.0.0.1"
    config = write_config(tmp_path, sqlite_url(tmp_path), ocpp=endpoint, enabled=shipped_plugins(),
                          extra=f"[plugin:security]\nca_dir = {tmp_path / 'ca'}\n")
    process = run_twistd(config, str(tmp_path))
    await failed_start(process, f"cannot listen on {endpoint} ([ocpp] endpoint): {IN_USE}")
    assert "Server Shut Down." in process.stdout


@pytest_twisted.ensureDeferred
async def test_port_out_of_range_exits_1_with_one_line(tmp_path):
    endpoint = "tcp:70000:interface=127.0.0.1"
    process = run_twistd(write_config(tmp_path, sqlite_url(tmp_path), api=endpoint), str(tmp_path))
    await failed_start(process, f"cannot listen on {endpoint} ([api] endpoint): port must be 0-65535")


@pytest_twisted.ensureDeferred
async def test_malformed_endpoint_exits_1_with_one_line(tmp_path):
    process = run_twistd(write_config(tmp_path, sqlite_url(tmp_path), ocpp="tpc:9000"), str(tmp_path))
    await failed_start(process, "cannot listen on tpc:9000 ([ocpp] endpoint): not a usable endpoint "
                                "(ValueError: Unknown endpoint type: 'tpc')")


@pytest_twisted.ensureDeferred
async def test_firmware_port_in_use_exits_1_instead_of_running_half_started(tmp_path, taken_port):
    endpoint = f"tcp:{taken_port}:interface=127.0.0.1"
    process = run_twistd(write_config(tmp_path, sqlite_url(tmp_path), http=endpoint), str(tmp_path))
    await failed_start(process, f"cannot listen on {endpoint} ([plugin:firmware] http_endpoint): "
                                f"{IN_USE}")
    assert "OCPP 1.6J endpoint listening" not in process.stdout


@pytest_twisted.ensureDeferred
async def test_firmware_directory_it_cannot_write_in_exits_1_with_one_line(tmp_path):
    """The firmware plugin checks its directories as it starts (not when it is configured, which csms-admin
    does too): one it cannot write in stops start-up, with one line naming the setting, before its listeners."""
    config = write_config(tmp_path, sqlite_url(tmp_path))
    with open(config, encoding="utf-8") as f:
        text = f.read()
    with open(config, "w", encoding="utf-8") as f:
        f.write(text.replace(f"diagnostics_dir = {tmp_path / 'diagnostics'}", "diagnostics_dir = /proc/self"))
    process = run_twistd(config, str(tmp_path))
    await failed_start(process, "[plugin:firmware] diagnostics_dir: cannot write in /proc/self (")
    assert "listening" not in process.stdout


VENDOR_PLUGIN = '''
"""A vendor plugin whose listener decides where to listen only once the reactor runs."""
from twisted.application import service
from twisted.internet import protocol, reactor, task
from zope.interface import implementer

from csms.config import Setting
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from csms.service import listen


class LateListener(service.Service):
    name = "late-listener"

    def __init__(self, endpoint):
        self.endpoint = endpoint

    def startService(self):
        super().startService()
        d = task.deferLater(reactor, 0, lambda: None)
        return d.addCallback(lambda _: listen(reactor, self.endpoint, protocol.Factory(),
                                              "[plugin:latelistener] endpoint"))


@implementer(ICSMSPlugin)
class LateListenerPlugin:
    name = "latelistener"
    profile = None
    inbound_actions = ()
    outbound_actions = ()
    settings = (Setting("endpoint", str, "tcp:0", "Where it listens."),)

    @hookimpl
    def csms_configure(self, app):
        self.endpoint = app.config.plugin(self.name)["endpoint"]

    @hookimpl
    def csms_services(self, app):
        return [LateListener(self.endpoint)]
'''


@pytest_twisted.ensureDeferred
async def test_plugin_listener_failing_once_the_reactor_runs_exits_1_with_one_line(tmp_path, taken_port):
    site = vendor_site(tmp_path, "latelistener", VENDOR_PLUGIN, "LateListenerPlugin")
    endpoint = f"tcp:{taken_port}:interface=127.0.0.1"
    config = write_config(tmp_path, sqlite_url(tmp_path), enabled="core, latelistener",
                          extra=f"[plugin:latelistener]\nendpoint = {endpoint}\n")
    process = run_twistd(config, str(tmp_path), env={"PYTHONPATH": str(site)})
    await failed_start(process, f"cannot listen on {endpoint} ([plugin:latelistener] endpoint): "
                                f"{IN_USE}")
    assert "Server Shut Down." in process.stdout  # twistd cleaned up before the status was set


def vendor_site(tmp_path, name: str, module: str, entry_point: str = "Plugin", files: dict = ()) -> str:
    """A directory to put on PYTHONPATH holding the module ``name`` (text ``module``, and ``files`` beside
    it: relative path -> text) installed as the plugin ``name`` (its entry point: ``name:entry_point``)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / f"{name}.py").write_text(module, encoding="utf-8")
    for path, text in dict(files).items():
        (site / path).parent.mkdir(parents=True, exist_ok=True)
        (site / path).write_text(text, encoding="utf-8")
    dist_info = site / f"{name}-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n", encoding="utf-8")
    (dist_info / "entry_points.txt").write_text(f"[csms.plugins]\n{name} = {name}:{entry_point}\n", encoding="utf-8")
    return str(site)


PLUGIN_HEAD = '''
from zope.interface import implementer

from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin


@implementer(ICSMSPlugin)
class Plugin:
    name = "{name}"
    profile = None
    inbound_actions = ()
    outbound_actions = ()
    settings = ()
'''


@pytest_twisted.ensureDeferred
async def test_plugin_missing_a_dependency_exits_1_with_one_line_naming_it(tmp_path):
    site = vendor_site(tmp_path, "needy", "import csms_test_no_such_dependency\n" + PLUGIN_HEAD.format(name="needy"))
    process = run_twistd(write_config(tmp_path, sqlite_url(tmp_path), enabled="core, needy"), str(tmp_path),
                         env={"PYTHONPATH": site})
    await failed_start(process, "plugin 'needy' cannot be imported: No module named 'csms_test_no_such_dependency' "
                                "(install what it needs, or take it out of [plugins] enabled)")
    assert process.stderr.count("\n") == 1  # before twistd's log began: the line alone


@pytest_twisted.ensureDeferred
async def test_plugin_bug_while_configuring_shows_its_traceback_then_one_line_last(tmp_path):
    module = PLUGIN_HEAD.format(name="buggy") + '''
    @hookimpl
    def csms_configure(self, app):
        return {}["missing"]
'''
    site = vendor_site(tmp_path, "buggy", module)
    process = run_twistd(write_config(tmp_path, sqlite_url(tmp_path), enabled="core, buggy"), str(tmp_path),
                         env={"PYTHONPATH": site})
    assert await process.finished() == 1, process.stderr
    lines = process.stderr.splitlines()
    assert "Traceback" in process.stderr  # a bug: where it is helps
    line = module.splitlines().index('        return {}["missing"]') + 1
    assert lines[-1] == (f"{CANNOT_START}KeyError: 'missing' at {os.path.join(site, 'buggy.py')}:{line} in "
                         "csms_configure (a bug? the traceback is above)"), process.stderr


VENDOR_MIGRATION = '''"""{slug}

Revision ID: vendormig_{number}
Revises: {down}
"""
from alembic import op
import sqlalchemy as sa

revision = "vendormig_{number}"
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
    {body}


def downgrade() -> None:
    pass
'''


@pytest_twisted.ensureDeferred
async def test_failing_migration_exits_1_naming_its_plugin_and_revision(tmp_path):
    """The database's own reason alone ("no such function") left the operator to guess whose migration failed."""
    module = "import os\n" + PLUGIN_HEAD.format(name="vendormig") + '''
    migrations = os.path.join(os.path.dirname(__file__), "vendormig_migrations")
'''
    first = VENDOR_MIGRATION.format(slug="things", number="0001", down=None,
                                    body="op.create_table('vendormig_things', sa.Column('id', sa.Integer(), "
                                         "primary_key=True))")
    second = VENDOR_MIGRATION.format(slug="broken", number="0002", down="vendormig_0001",
                                     body="op.execute('SELECT csms_test_no_such_function()')")
    site = vendor_site(tmp_path, "vendormig", module, files={"vendormig_migrations/vendormig_0001_things.py": first,
                                                             "vendormig_migrations/vendormig_0002_broken.py": second})
    process = run_twistd(write_config(tmp_path, sqlite_url(tmp_path), enabled="core, vendormig"), str(tmp_path),
                         env={"PYTHONPATH": site})
    await failed_start(process, f"database {sqlite_url(tmp_path)}: plugin vendormig's migration vendormig_0002 "
                                "failed: no such function: csms_test_no_such_function; nothing was changed (the "
                                "upgrade is one transaction): fix the cause and start again, or restore a backup")
    import sqlite3

    with sqlite3.connect(tmp_path / "csms.sqlite") as db:  # nothing was changed, as the line says
        assert db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == []


# -- the database cannot be used ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unreachable_database_exits_1_with_one_line(tmp_path):
    port = closed_port()
    url = f"postgresql+psycopg://csms:secret@127.0.0.1:{port}/csms"
    process = run_twistd(write_config(tmp_path, url), str(tmp_path))
    await failed_start(process, f"database postgresql+psycopg://csms:***@127.0.0.1:{port}/csms: connection failed")
    assert "secret" not in process.stdout + process.stderr


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_wrong_database_password_exits_1_with_one_line(tmp_path, database_url):
    from sqlalchemy.engine import make_url

    url = make_url(database_url).set(password="not-the-password")
    process = run_twistd(write_config(tmp_path, url.render_as_string(hide_password=False)), str(tmp_path))
    await failed_start(process, "password authentication failed")
    assert "not-the-password" not in process.stdout + process.stderr


@pytest_twisted.ensureDeferred
async def test_database_behind_the_code_exits_1_naming_the_command(tmp_path, database_url):
    from csms.service import display_url

    process = run_twistd(write_config(tmp_path, database_url, auto_upgrade=False), str(tmp_path))
    await failed_start(process, f"database {display_url(database_url)}: the database schema is behind the "
                                f"code (csms at no schema, code at {head('csms')}; core at no schema, code at {head('core')}; "
                                f"firmware at no schema, code at {head('firmware')}): run `csms-admin db upgrade` with the "
                                "same config, or set [database] auto_upgrade = true")


@pytest_twisted.ensureDeferred
async def test_database_ahead_of_the_code_exits_1_even_with_auto_upgrade(tmp_path, database_url):
    from sqlalchemy import create_engine

    from csms.service import display_url

    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE core_alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO core_alembic_version VALUES ('core_0999')")
    engine.dispose()
    process = run_twistd(write_config(tmp_path, database_url), str(tmp_path))
    await failed_start(process, f"database {display_url(database_url)}: the database schema is ahead of this "
                                f"code (core at core_0999, code at {head('core')}): run the CSMS release that upgraded "
                                "it, "
                                "or restore a backup taken before")


# -- the config cannot be used (before twistd's log begins: the line goes to stderr alone) ----------------


@pytest.mark.parametrize("case", ["missing-file", "not-utf8", "plugin-section-typo", "mysql-url", "cluster-on-sqlite",
                                  "setting-typo"])
@pytest_twisted.ensureDeferred
async def test_unusable_config_exits_1_with_one_line_on_stderr(tmp_path, case):
    config = write_config(tmp_path, sqlite_url(tmp_path))
    if case == "missing-file":
        config, expected = str(tmp_path / "nope.ini"), f"cannot read the config file {tmp_path / 'nope.ini'}"
    elif case == "not-utf8":
        with open(config, "ab") as f:
            f.write(b"# caf\xe9\n")
        expected = f"cannot read the config file {config}: it is not UTF-8 text"
    elif case == "plugin-section-typo":
        with open(config, "a", encoding="utf-8") as f:
            f.write("[plugin:firmwre]\nhttp_endpoint = tcp:8090\n")
        expected = "[plugin:firmwre] names no installed plugin"
    elif case == "cluster-on-sqlite":
        with open(config, "a", encoding="utf-8") as f:
            f.write("[cluster]\nenabled = true\n")
        expected = "[cluster] enabled needs PostgreSQL"
    elif case == "setting-typo":
        with open(config, "a", encoding="utf-8") as f:
            f.write("[csms]\nlog_levle = debug\n")
        expected = "[csms] has no setting 'log_levle' (known: log_format, log_level, shutdown_grace): did you mean 'log_level'?"
    else:
        write_config(tmp_path, "mysql://csms:secret@127.0.0.1/csms")
        expected = "[database] url mysql://csms:***@127.0.0.1/csms: the CSMS stores its data in SQLite or PostgreSQL"
    process = run_twistd(config, str(tmp_path))
    status = await process.finished()
    assert status == 1
    assert process.stderr.count("\n") == 1 and process.stderr.startswith(CANNOT_START), process.stderr
    assert expected in process.stderr
    assert "Usage:" not in process.stdout and "Traceback" not in process.stdout + process.stderr


# -- a good start ------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_good_start_says_ready_once_everything_listens_serves_and_stops_on_sigterm(tmp_path, database_url):
    import treq

    process = run_twistd(write_config(tmp_path, database_url), str(tmp_path))
    log = await process.logged("Central System ready")
    ready_at = log.index("Central System ready")
    for listener in ("OCPP 1.6J endpoint", "Operator API", "Firmware/diagnostics file server",
                     "Diagnostics FTP upload server"):
        assert log.index(f"{listener} listening") < ready_at, log
    api = listening_port(log, "Operator API")
    response = await treq.get(f"http://127.0.0.1:{api}/api/v1/openapi.json", reactor=reactor).addTimeout(
        DEADLINE, reactor)
    assert response.code in (200, 401)  # served (whether this route wants a token is the API's business)
    await treq.content(response)
    files = listening_port(log, "Firmware/diagnostics file server")
    response = await treq.get(f"http://127.0.0.1:{files}/firmware/none.bin", reactor=reactor).addTimeout(
        DEADLINE, reactor)
    assert response.code == 404
    await treq.content(response)

    process.transport.signalProcess("TERM")
    status = await process.finished()
    # A graceful stop is a success (twistd alone would end by the signal again: Twisted #7225).
    assert status == 0, process.stdout
    assert "Server Shut Down." in process.stdout
    assert "Traceback" not in process.stdout + process.stderr and process.stderr == ""


@pytest_twisted.ensureDeferred
async def test_sigterm_sent_as_ready_is_said_stops_gracefully(tmp_path):
    """"Central System ready" was said before the reactor ran, so before SIGTERM stopped gracefully: a
    supervisor or script stopping the process as soon as it read the line ended it by the signal (status
    -15) in 17 runs of 20. A few runs, each stopped the moment the line arrives."""
    config = write_config(tmp_path, sqlite_url(tmp_path), enabled="core")
    for _ in range(3):
        process = run_twistd(config, str(tmp_path))
        await process.logged("Central System ready")
        process.transport.signalProcess("TERM")  # at once: in the same turn as the line's arrival
        status = await process.finished()
        assert status == 0, process.stdout + process.stderr
        assert "Received SIGTERM: stopping" in process.stdout and process.stderr == ""


@pytest_twisted.ensureDeferred
async def test_start_creates_the_firmware_directories_and_removes_unfinished_uploads(tmp_path):
    """What a crash left in the firmware plugin's directories goes as ``twistd csms`` starts, with a warning,
    before the file servers listen; a directory that does not exist yet is created."""
    (tmp_path / "diagnostics" / "7").mkdir(parents=True)
    (tmp_path / "diagnostics" / ".upload-def456").write_bytes(b"half a log")
    (tmp_path / "diagnostics" / "7" / "diag.zip").write_bytes(b"a stored upload")
    process = run_twistd(write_config(tmp_path, sqlite_url(tmp_path)), str(tmp_path))
    log = await process.logged("Central System ready")
    removed = log.index(f"Removed 1 unfinished upload(s) from {tmp_path / 'diagnostics'}")
    assert removed < log.index("Firmware/diagnostics file server listening"), log
    assert (tmp_path / "firmware").is_dir()
    assert sorted(p.name for p in (tmp_path / "diagnostics").iterdir()) == ["7"]
    assert (tmp_path / "diagnostics" / "7" / "diag.zip").read_bytes() == b"a stored upload"
    process.transport.signalProcess("TERM")
    assert await process.finished() == 0, process.stdout + process.stderr


# -- the service inside a running reactor (tests, embedding) -----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_embedded_service_fails_ready_and_stops_what_had_started(tmp_path, database_url, taken_port):
    from csms.config import load_config
    from csms.service import CSMSService, StartupError

    config = load_config(write_config(tmp_path, database_url, ocpp=f"tcp:{taken_port}:interface=127.0.0.1"))
    csms = CSMSService(config, reactor=reactor)
    csms.startService()
    with pytest.raises(StartupError, match=r"\(\[ocpp\] endpoint\): address already in use"):
        await csms.ready.addTimeout(DEADLINE, reactor)
    servers = csms.app.pm.get_plugin("firmware").servers
    assert servers.http_port is None and servers.ftp_port is None and not servers.running
    assert csms.ports == {} and not csms.app.db._started
    await csms.stopService()  # a supervisor's stop after a failed start is harmless


@pytest_twisted.ensureDeferred
async def test_plugin_service_that_raises_while_starting_fails_start_up_with_its_name(tmp_path, taken_port):
    """A plain Twisted listening service (strports) raises from its start: start-up fails, naming it."""
    from twisted.application import strports
    from zope.interface import implementer

    from csms.config import load_config
    from csms.hookspecs import hookimpl
    from csms.interfaces import ICSMSPlugin
    from csms.service import CSMSService, StartupError

    @implementer(ICSMSPlugin)
    class StrportsListener:
        name = "strportslistener"
        profile = None
        inbound_actions = ()
        outbound_actions = ()
        settings = ()

        @hookimpl
        def csms_services(self, app):
            listener = strports.service(f"tcp:{taken_port}:interface=127.0.0.1", protocol.Factory())
            listener.setName("vendor-listener")
            return [listener]

    config = load_config(write_config(tmp_path, sqlite_url(tmp_path), enabled="core"))
    csms = CSMSService(config, reactor=reactor, extra_plugins=[StrportsListener()])
    csms.startService()
    with pytest.raises(StartupError) as exc_info:
        await csms.ready.addTimeout(DEADLINE, reactor)
    assert str(exc_info.value) == (f"plugin service vendor-listener: cannot listen on 127.0.0.1:{taken_port}: "
                                   f"{IN_USE}")
    assert csms.ports == {}
