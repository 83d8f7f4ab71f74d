"""``twistd csms`` starting up, as a process supervisor (systemd, a container runtime) sees it.

Real processes: ``twistd -n --pidfile= csms --config <file>`` on loopback ports. A start-up that
cannot complete (a port taken, a bad port, a database that refuses, a bad config) ends the process
with status 1 and one line saying what failed, without a traceback and without "Central System
ready"; a good start serves until SIGTERM.
"""
from __future__ import annotations

import os
import socket
import textwrap

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor

from csms.testing.processes import (DEADLINE, TwistdProcess, listening_port,  # noqa: F401 - used by other tests
                                    run_twistd)

LOOPBACK = "tcp:0:interface=127.0.0.1"


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


async def failed_start(process: TwistdProcess, line: str) -> None:
    """The run ended with status 1, logged ``line`` exactly once, never said it was ready, and showed
    no traceback."""
    status = await process.finished()
    output = process.stdout + process.stderr
    assert status == 1, output
    assert output.count(line) == 1, f"expected {line!r} once in:\n{output}"
    assert "Central System ready" not in output
    assert "Traceback" not in output and "Unhandled" not in output, output


# -- a listener cannot listen ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ocpp_port_in_use_exits_1_with_one_line(tmp_path, taken_port):
    endpoint = f"tcp:{taken_port}:interface=127.0.0.1"
    process = run_twistd(write_config(tmp_path, sqlite_url(tmp_path), ocpp=endpoint), str(tmp_path))
    await failed_start(process, f"csms: cannot listen on {endpoint} ([ocpp] endpoint): address already in use")


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
    await failed_start(process, f"csms: cannot listen on {endpoint} ([ocpp] endpoint): address already in use")
    assert "Server Shut Down." in process.stdout


@pytest_twisted.ensureDeferred
async def test_port_out_of_range_exits_1_with_one_line(tmp_path):
    endpoint = "tcp:70000:interface=127.0.0.1"
    process = run_twistd(write_config(tmp_path, sqlite_url(tmp_path), api=endpoint), str(tmp_path))
    await failed_start(process, f"csms: cannot listen on {endpoint} ([api] endpoint): port must be 0-65535")


@pytest_twisted.ensureDeferred
async def test_malformed_endpoint_exits_1_with_one_line(tmp_path):
    process = run_twistd(write_config(tmp_path, sqlite_url(tmp_path), ocpp="tpc:9000"), str(tmp_path))
    await failed_start(process, "csms: cannot listen on tpc:9000 ([ocpp] endpoint): not a usable endpoint "
                                "(ValueError: Unknown endpoint type: 'tpc')")


@pytest_twisted.ensureDeferred
async def test_firmware_port_in_use_exits_1_instead_of_running_half_started(tmp_path, taken_port):
    endpoint = f"tcp:{taken_port}:interface=127.0.0.1"
    process = run_twistd(write_config(tmp_path, sqlite_url(tmp_path), http=endpoint), str(tmp_path))
    await failed_start(process, f"csms: cannot listen on {endpoint} ([plugin:firmware] http_endpoint): "
                                "address already in use")
    assert "OCPP 1.6J endpoint listening" not in process.stdout


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
    site = tmp_path / "site"
    site.mkdir()
    (site / "latelistener.py").write_text(VENDOR_PLUGIN, encoding="utf-8")
    dist_info = site / "latelistener-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: latelistener\nVersion: 1.0\n", encoding="utf-8")
    (dist_info / "entry_points.txt").write_text("[csms.plugins]\nlatelistener = latelistener:LateListenerPlugin\n",
                                                encoding="utf-8")
    endpoint = f"tcp:{taken_port}:interface=127.0.0.1"
    config = write_config(tmp_path, sqlite_url(tmp_path), enabled="core, latelistener",
                          extra=f"[plugin:latelistener]\nendpoint = {endpoint}\n")
    process = run_twistd(config, str(tmp_path), env={"PYTHONPATH": str(site)})
    await failed_start(process, f"csms: cannot listen on {endpoint} ([plugin:latelistener] endpoint): "
                                "address already in use")
    assert "Server Shut Down." in process.stdout  # twistd cleaned up before the status was set


# -- the database cannot be used ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unreachable_database_exits_1_with_one_line(tmp_path):
    port = closed_port()
    url = f"postgresql+psycopg://csms:secret@127.0.0.1:{port}/csms"
    process = run_twistd(write_config(tmp_path, url), str(tmp_path))
    status = await process.finished()
    assert status == 1, process.stdout
    lines = [line for line in process.stdout.splitlines() if "csms: database" in line]
    assert len(lines) == 1, process.stdout
    assert f"csms: database postgresql+psycopg://csms:***@127.0.0.1:{port}/csms: connection failed" in lines[0]
    assert "secret" not in process.stdout + process.stderr
    assert "Traceback" not in process.stdout + process.stderr
    assert "Central System ready" not in process.stdout


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_wrong_database_password_exits_1_with_one_line(tmp_path, database_url):
    from sqlalchemy.engine import make_url

    url = make_url(database_url).set(password="not-the-password")
    process = run_twistd(write_config(tmp_path, url.render_as_string(hide_password=False)), str(tmp_path))
    status = await process.finished()
    assert status == 1, process.stdout
    lines = [line for line in process.stdout.splitlines() if "csms: database" in line]
    assert len(lines) == 1 and "password authentication failed" in lines[0], process.stdout
    assert "not-the-password" not in process.stdout + process.stderr
    assert "Traceback" not in process.stdout + process.stderr
    assert "Central System ready" not in process.stdout


@pytest_twisted.ensureDeferred
async def test_database_behind_the_code_exits_1_naming_the_command(tmp_path, database_url):
    from csms.service import display_url

    process = run_twistd(write_config(tmp_path, database_url, auto_upgrade=False), str(tmp_path))
    await failed_start(process, f"csms: database {display_url(database_url)}: the database schema is behind the "
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
    await failed_start(process, f"csms: database {display_url(database_url)}: the database schema is ahead of this "
                                "code (core at core_0999, code at core_0001): run the CSMS release that upgraded it, "
                                "or restore a backup taken before")


# -- the config cannot be used (before twistd's log begins: the line goes to stderr alone) ----------------


@pytest.mark.parametrize("case", ["missing-file", "not-utf8", "plugin-section-typo", "mysql-url", "cluster-on-sqlite"])
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
    else:
        write_config(tmp_path, "mysql://csms:secret@127.0.0.1/csms")
        expected = "[database] url mysql://csms:***@127.0.0.1/csms: the CSMS stores its data in SQLite or PostgreSQL"
    process = run_twistd(config, str(tmp_path))
    status = await process.finished()
    assert status == 1
    assert process.stderr.count("\n") == 1 and process.stderr.startswith("csms: "), process.stderr
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
                                   "address already in use")
    assert csms.ports == {}
