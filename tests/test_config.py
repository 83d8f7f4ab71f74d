"""Operator configuration: the INI file (csms.config) and the ``twistd csms`` options that override it."""
from __future__ import annotations

import os
import sys

import pytest
import pytest_twisted
from twisted.internet import reactor, utils
from twisted.python import usage
from zope.interface import implementer

from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin

from csms.config import DATABASE_URLS, Config, ConfigError, Setting, load_config
from csms.service import Options, StartupFailed, with_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the file ----------------------------------------------------------------------------------------


def test_empty_config_has_working_defaults():
    config = load_config(text="")
    assert config == Config()
    assert config.log_level == "info"
    assert config.ocpp.endpoint.split(":")[:2] == ["tcp", "9000"]
    assert config.ocpp.path_prefix == "/ocpp/"
    assert config.ocpp.unknown_stations == "accept"
    assert config.ocpp.require_password is False
    assert config.ocpp.response_timeout == 30.0
    assert config.ocpp.max_message_size == 65536
    assert config.ocpp.max_charge_point_id_length == 48
    assert config.database.url == "sqlite:///var/csms.sqlite"
    assert config.database.pool_size == 4
    assert config.api.tokens == []
    assert config.enabled_plugins == ["core"]
    assert config.blocked_plugins == []
    assert config.plugin_settings == {}


def test_no_file_and_no_text_gives_the_defaults():
    assert load_config() == Config()


def test_values_in_the_file_override_the_defaults_with_their_types():
    config = load_config(text="""
[csms]
log_level = DEBUG

[ocpp]
endpoint = tcp:9100:interface=127.0.0.1
path_prefix = /cs/
unknown_stations = pending
require_password = yes
response_timeout = 12.5
max_message_size = 4096
auto_ping_interval = 0

[database]
url = postgresql+psycopg://csms@localhost/csms
pool_size = 8

[api]
tokens = alpha, beta
    gamma

[plugins]
enabled = core, firmware
blocked = firmware

[plugin:core]
heartbeat_interval = 120
""")
    assert config.log_level == "debug"
    assert config.ocpp.endpoint == "tcp:9100:interface=127.0.0.1"
    assert config.ocpp.path_prefix == "/cs/"
    assert config.ocpp.unknown_stations == "pending"
    assert config.ocpp.require_password is True
    assert config.ocpp.response_timeout == 12.5
    assert config.ocpp.max_message_size == 4096 and isinstance(config.ocpp.max_message_size, int)
    assert config.ocpp.auto_ping_interval == 0
    assert config.ocpp.max_charge_point_id_length == 48  # untouched keys keep their default
    assert config.database.url == "postgresql+psycopg://csms@localhost/csms"
    assert config.database.pool_size == 8
    assert config.api.tokens == ["alpha", "beta", "gamma"]
    assert config.enabled_plugins == ["core", "firmware"]
    assert config.blocked_plugins == ["firmware"]
    assert config.plugin("core").getint("heartbeat_interval", 300) == 120
    assert config.plugin("core").getint("boot_retry_interval", 60) == 60


def test_shipped_config_file_loads():
    config = load_config(os.path.join(REPO, "etc", "csms.ini"))
    assert "core" in config.enabled_plugins


def test_plugin_settings_are_typed_at_each_read_with_the_callers_default():
    settings = load_config(text="[plugin:acme]\nretries = 3\nratio = 0.5\nenabled = off\nname = x\n").plugin("acme")
    assert settings.getint("retries", 1) == 3
    assert settings.getfloat("ratio", 1.0) == 0.5
    assert settings.getbool("enabled", True) is False
    assert settings.get("name", "y") == "x"
    assert settings.getint("missing", 7) == 7
    assert load_config(text="").plugin("acme").getbool("enabled", True) is True
    with pytest.raises(ConfigError, match=r"\[plugin:acme\] name"):
        settings.getint("name", 1)
    with pytest.raises(ConfigError, match="not a boolean"):
        settings.getbool("name", True)


@pytest.mark.parametrize("text, message", [
    ("[csms]\nlevel = info\n", "[csms] has no setting 'level'"),
    ("[ocpp]\nendpont = tcp:9000\n", "[ocpp] has no setting 'endpont'"),
    ("[database]\nuri = sqlite://\n", "[database] has no setting 'uri'"),
    ("[api]\ntoken = x\n", "[api] has no setting 'token'"),
    ("[plugins]\nenable = core\n", "[plugins] has no setting 'enable'"),
    ("[ocp]\nendpoint = tcp:9000\n", "unknown section [ocp]"),
    ("[DEFAULT]\nendpoint = tcp:9000\n[ocpp]\n", "[DEFAULT] is not supported"),
], ids=["csms", "ocpp", "database", "api", "plugins", "section", "default-section"])
def test_unknown_settings_are_refused(text, message):
    with pytest.raises(ConfigError) as exc_info:
        load_config(text=text)
    assert message in str(exc_info.value)


@pytest.mark.parametrize("text, message", [
    ("[csms]\nlog_levle = info\n", "[csms] has no setting 'log_levle' (known: log_format, log_level, shutdown_grace): "
                                     "did you mean 'log_level'?"),
    ("[ocpp]\nendpont = tcp:9000\n", ": did you mean 'endpoint'?"),
    ("[database]\npoolsize = 3\n", "[database] has no setting 'poolsize' (known: auto_upgrade, pool_size, "
                                    "sqlite_synchronous, url): did you mean 'pool_size'?"),
    ("[plugins]\nenable = core\n", "[plugins] has no setting 'enable' (known: blocked, enabled): did you mean 'enabled'?"),
    ("[metricz]\nenabled = true\n", "unknown section [metricz] (known: csms, ocpp, database, api, metrics, cluster, "
                                     "plugins, retention, plugin:NAME): did you mean [metrics]?"),
], ids=["csms", "ocpp", "database", "plugins", "section"])
def test_a_misspelt_setting_or_section_is_refused_naming_the_one_meant(text, message):
    with pytest.raises(ConfigError) as exc_info:
        load_config(text=text)
    assert message in str(exc_info.value) and "\n" not in str(exc_info.value)


def test_an_unknown_setting_not_close_to_any_lists_them_without_a_guess():
    with pytest.raises(ConfigError) as exc_info:
        load_config(text="[api]\nzzz = 1\n")
    assert str(exc_info.value).startswith("[api] has no setting 'zzz' (known: endpoint, ")
    assert "did you mean" not in str(exc_info.value)


@pytest.mark.parametrize("text, message", [
    ("[ocpp]\nunknown_stations = maybe\n", "unknown_stations must be one of accept, pending, reject"),
    ("[csms]\nlog_level = loud\n", "log_level must be one of"),
    ("[ocpp]\nresponse_timeout = 0\n", "response_timeout must be positive"),
    ("[ocpp]\nresponse_timeout = soon\n", "response_timeout = 'soon' is not a valid float"),
    ("[ocpp]\nmax_message_size = 100\n", "max_message_size must be at least 1024"),
    ("[ocpp]\nmax_message_size = 64k\n", "max_message_size = '64k' is not a valid int"),
    ("[ocpp]\npath_prefix = ocpp\n", "path_prefix must start and end with '/'"),
    ("[ocpp]\nrequire_password = perhaps\n", "require_password = 'perhaps' is not a boolean"),
    ("[ocpp]\nmax_charge_point_id_length = 0\n", "max_charge_point_id_length must be between 1 and 255"),
    ("[database]\npool_size = 0\n", "pool_size must be at least 1"),
    ("[database]\nsqlite_synchronous = SOMETIMES\n", "sqlite_synchronous must be one of"),
    ("[ocpp]\nendpoint = a\nendpoint = b\n", "already exists"),
    ("endpoint = tcp:9000\n", "no section headers"),
], ids=["policy", "log-level", "timeout-zero", "timeout-text", "size-small", "size-text", "prefix", "bool",
        "id-length", "pool-size", "sqlite-synchronous", "duplicate-key", "no-section"])
def test_bad_values_are_refused(text, message):
    with pytest.raises(ConfigError) as exc_info:
        load_config(text=text)
    assert message in str(exc_info.value)


@pytest.mark.parametrize("problem", ["missing", "directory", "not-utf8"])
def test_unreadable_config_file_is_a_config_error_naming_it(tmp_path, problem):
    path = tmp_path / "csms.ini"
    if problem == "directory":
        path.mkdir()
    elif problem == "not-utf8":
        path.write_bytes(b"[ocpp]\n# caf\xe9\n")
    with pytest.raises(ConfigError) as exc_info:
        load_config(str(path))
    assert str(exc_info.value).startswith(f"cannot read the config file {path}: ")


# -- database URLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "sqlite:///var/csms.sqlite", "sqlite:////var/lib/csms/csms.sqlite", "sqlite:///:memory:", "sqlite://",
    "sqlite+pysqlite:///var/csms.sqlite", "postgresql+psycopg://csms:secret@db.example.com:5432/csms",
])
def test_database_urls_the_csms_works_with_are_kept(url):
    assert load_config(text=f"[database]\nurl = {url}\n").database.url == url


@pytest.mark.parametrize("url", ["postgres://csms:secret@db/csms", "postgresql://csms:secret@db:5433/csms?sslmode=require",
                                 "POSTGRES://csms@db/csms"])
def test_postgres_and_postgresql_urls_mean_psycopg(url):
    rest = url.partition("://")[2]
    assert load_config(text=f"[database]\nurl = {url}\n").database.url == f"postgresql+psycopg://{rest}"


@pytest.mark.parametrize("url, shown", [
    ("mysql://csms:secret@db/csms", "mysql://csms:***@db/csms"),
    ("mariadb+pymysql://csms@db/csms", "mariadb+pymysql://csms@db/csms"),
    ("postgresql+psycopg2://csms:secret@db/csms", "postgresql+psycopg2://csms:***@db/csms"),
    ("postgresql+asyncpg://csms@db/csms", "postgresql+asyncpg://csms@db/csms"),
    ("sqlite+aiosqlite:///x.sqlite", "sqlite+aiosqlite:///x.sqlite"),
    ("oracle://scott:tiger@db", "oracle://scott:***@db"),
    ("var/csms.sqlite", "'var/csms.sqlite' is not a database URL"),
    ("localhost:5432/csms", "'localhost:5432/csms' is not a database URL"),
], ids=["mysql", "mariadb", "psycopg2", "asyncpg", "aiosqlite", "oracle", "a-path", "no-scheme"])
def test_database_url_the_csms_cannot_use_gets_one_line_naming_those_that_work(url, shown):
    with pytest.raises(ConfigError) as exc_info:
        load_config(text=f"[database]\nurl = {url}\n")
    message = str(exc_info.value)
    assert "\n" not in message and message.startswith("[database] url ")
    assert shown in message and message.endswith(f"use {DATABASE_URLS}")
    assert "secret" not in message and "tiger" not in message


def test_database_option_is_checked_like_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse("--database", "postgres://csms@db/csms").config.database.url == "postgresql+psycopg://csms@db/csms"
    with pytest.raises(StartupFailed) as exc_info:
        parse("--database", "mysql://csms:secret@db/csms")
    assert str(exc_info.value) == f"csms: cannot start: [database] url mysql://csms:***@db/csms: the CSMS stores its data in " \
                                  f"SQLite or PostgreSQL; use {DATABASE_URLS}"


# -- [plugin:NAME] settings, declared by each plugin ------------------------------------------------------


@implementer(ICSMSPlugin)
class Acme:
    """A vendor plugin with its own settings, declared the same way as the built-in profiles'."""

    name = "acme"
    profile = None
    inbound_actions = ()
    outbound_actions = ()
    settings = (
        Setting("greeting", str, "hello", "What DataTransfer answers."),
        Setting("retries", int, 3, "How often to retry."),
        Setting("ratio", float, 0.5, "A ratio."),
        Setting("loud", bool, False, "Shout."),
        Setting("unit", str, "A", "A unit.", choices=("A", "W")),
    )

    @hookimpl
    def csms_configure(self, app):
        settings = app.config.plugin(self.name)
        self.read = {setting.name: settings[setting.name] for setting in self.settings}


@implementer(ICSMSPlugin)
class Undeclared:
    """A plugin written before settings were declared: it reads them with a default at each read."""

    name = "undeclared"
    profile = None
    inbound_actions = ()
    outbound_actions = ()

    @hookimpl
    def csms_configure(self, app):
        self.retries = app.config.plugin(self.name).getint("retries", 1)


def central_system(text: str, plugins=("core",), extra_plugins=()):
    from csms.app import CentralSystem

    config = load_config(text=f"[database]\nurl = sqlite://\n[plugins]\nenabled = {', '.join(plugins)}\n" + text)
    return CentralSystem(config, extra_plugins=extra_plugins)


def test_declared_plugin_settings_are_read_typed_with_their_defaults():
    plugin = Acme()
    central_system("[plugin:acme]\ngreeting = hi\nretries = 5\nloud = yes\nunit = w\n", extra_plugins=[plugin])
    assert plugin.read == {"greeting": "hi", "retries": 5, "ratio": 0.5, "loud": True, "unit": "W"}
    plugin = Acme()
    central_system("", extra_plugins=[plugin])
    assert plugin.read == {"greeting": "hello", "retries": 3, "ratio": 0.5, "loud": False, "unit": "A"}


@pytest.mark.parametrize("text, message", [
    ("[plugin:acme]\ngreting = hi\n", "[plugin:acme] has no setting 'greting': did you mean greeting (str, "
                                       "default hello: \"What DataTransfer answers.\")? Its settings: greeting, loud, "
                                       "ratio, retries, unit"),
    ("[plugin:acme]\nretries = many\n", "[plugin:acme] retries = 'many' is not a valid int"),
    ("[plugin:acme]\nloud = very\n", "[plugin:acme] loud = 'very' is not a boolean"),
    ("[plugin:acme]\nunit = kW\n", "[plugin:acme] unit must be one of A, W, not 'kW'"),
    ("[plugin:acme]\n[plugin:acmee]\ngreeting = hi\n", "[plugin:acmee] names no installed plugin (installed: "),
    ("[plugin:core]\nheartbeat_intervall = 60\n", "[plugin:core] has no setting 'heartbeat_intervall'"),
    ("[plugin:firmware]\nhttp_endpont = tcp:8090\n", "[plugin:firmware] has no setting 'http_endpont'"),
], ids=["vendor-key", "vendor-int", "vendor-bool", "vendor-choice", "section", "core-key", "firmware-key"])
def test_unknown_or_bad_plugin_settings_are_refused_with_one_line(text, message):
    with pytest.raises(ConfigError) as exc_info:
        central_system(text, plugins=("core", "firmware"), extra_plugins=[Acme()])
    assert message in str(exc_info.value) and "\n" not in str(exc_info.value)


def test_a_misspelt_setting_is_refused_with_the_closest_ones_doc_and_where_to_read_the_others():
    """The operator learns what the setting meant is for and where every setting of the plugin is
    described; the command is named for installed plugins only (csms-admin finds no other)."""
    with pytest.raises(ConfigError) as refused:
        central_system("[plugin:core]\nheartbeat_intervall = 60\n")
    assert str(refused.value) == (
        "[plugin:core] has no setting 'heartbeat_intervall': did you mean heartbeat_interval (int, default 300: "
        "\"Heartbeat interval handed to Accepted stations, in seconds.\")? Its settings: boot_retry_interval, "
        "concurrent_tx_check, heartbeat_interval, id_tag_cache_seconds; `csms-admin config settings --plugin core` "
        "shows each with its doc")
    with pytest.raises(ConfigError) as refused:
        central_system("[plugin:acme]\nspeed = 3\n", extra_plugins=[Acme()])
    assert str(refused.value) == ("[plugin:acme] has no setting 'speed'. Its settings: greeting, loud, ratio, "
                                  "retries, unit")


@pytest.mark.parametrize("text, message", [
    ("[plugin:acme]\nretries = many\n", "[plugin:acme] retries = 'many' is not a valid int "
                                        "(retries: int, default 3: \"How often to retry.\")"),
    ("[plugin:acme]\nunit = kW\n", "[plugin:acme] unit must be one of A, W, not 'kW' "
                                   "(unit: str, one of A, W, default A: \"A unit.\")"),
], ids=["int", "choice"])
def test_a_bad_value_is_refused_with_what_the_setting_is_for(text, message):
    with pytest.raises(ConfigError) as refused:
        central_system(text, extra_plugins=[Acme()])
    assert str(refused.value) == message


def test_a_bad_value_is_refused_at_start_up_even_if_the_plugin_never_reads_it():
    class Lazy(Acme):
        @hookimpl
        def csms_configure(self, app):
            pass

    with pytest.raises(ConfigError, match="ratio = 'half' is not a valid float"):
        central_system("[plugin:acme]\nratio = half\n", extra_plugins=[Lazy()])


def test_section_of_an_installed_but_disabled_plugin_is_kept_unchecked():
    app = central_system("[plugin:firmware]\nsome_future_key = 1\n[plugin:smartcharging]\nvoltage = 110\n",
                         plugins=("core",))
    assert [plugin.name for plugin in app.plugins] == ["core"]
    assert app.config.plugin("smartcharging").getfloat("voltage", 230) == 110


def test_plugin_that_declares_no_settings_keeps_reading_them_the_old_way():
    plugin = Undeclared()
    central_system("[plugin:undeclared]\nretries = 4\nanything = goes\n", extra_plugins=[plugin])
    assert plugin.retries == 4


def test_old_accessors_still_read_keys_a_plugin_has_not_declared_yet():
    app = central_system("[plugin:core]\nheartbeat_interval = 120\n")
    settings = app.config.plugin("core")
    assert settings["heartbeat_interval"] == 120
    assert settings.getint("heartbeat_interval", 300) == 120
    assert settings.getfloat("some_new_limit", 2.5) == 2.5  # the way a setting is read before it is declared
    with pytest.raises(KeyError):
        settings["some_new_limit"]


@pytest.mark.parametrize("settings, message", [
    (("greeting",), "settings must be a sequence of csms.config.Setting"),
    ((Setting("a", int, 1, "."), Setting("a", int, 2, ".")), "declares a setting twice"),
], ids=["not-settings", "twice"])
def test_a_malformed_declaration_stops_loading(settings, message):
    from csms.plugins import PluginError

    class Broken(Acme):
        pass

    Broken.settings = settings
    with pytest.raises(PluginError, match=message):
        central_system("", extra_plugins=[Broken()])


@pytest.mark.parametrize("args, message", [
    (("x", list, [], "."), "type must be one of str, int, float, bool"),
    (("x", int, "3", "."), "default '3' is not a int"),
    (("x", str, "B", ".", ("A", "W")), "default 'B' is not one of its choices"),
])
def test_a_setting_declared_with_a_default_of_another_type_is_a_type_error(args, message):
    with pytest.raises(TypeError, match=message):
        Setting(*args)


def builtin_plugin_classes() -> dict:
    from csms.plugins import available_plugins

    return {name: entry_point.load() for name, entry_point in available_plugins().items()
            if entry_point.dist is not None and entry_point.dist.name == "csms"}


@pytest.mark.parametrize("name", sorted(builtin_plugin_classes()))
def test_every_builtin_plugin_declares_its_settings_as_etc_csms_ini_shows_them(name):
    """etc/csms.ini shows every declared setting with its default, and nothing a plugin does not declare."""
    import configparser

    plugin = builtin_plugin_classes()[name]
    assert isinstance(plugin.settings, tuple)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.path.join(REPO, "etc", "csms.ini"), encoding="utf-8")
    shown = dict(parser.items(f"plugin:{name}")) if parser.has_section(f"plugin:{name}") else {}
    assert sorted(shown) == sorted(setting.name for setting in plugin.settings)
    for setting in plugin.settings:
        assert setting.parse(shown[setting.name], f"plugin:{name}") == setting.default, setting.name
        assert setting.doc.strip()


# -- twistd csms options ---------------------------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "csms.ini"
    path.write_text("""
[csms]
log_level = warn
[ocpp]
endpoint = tcp:9000:interface=127.0.0.1
response_timeout = 20
[database]
url = sqlite:///from-file.sqlite
""", encoding="utf-8")
    return str(path)


def parse(*argv) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_options_read_the_config_file(config_file):
    config = parse("--config", config_file).config
    assert config.log_level == "warn"
    assert config.ocpp.endpoint == "tcp:9000:interface=127.0.0.1"
    assert config.ocpp.response_timeout == 20
    assert config.database.url == "sqlite:///from-file.sqlite"


def test_command_line_options_override_the_file(config_file):
    config = parse("--config", config_file, "--port", "9200", "--database", "sqlite:///from-cli.sqlite",
                   "--log-level", "DEBUG").config
    assert config.ocpp.endpoint == "tcp:9200:interface=127.0.0.1"
    assert config.database.url == "sqlite:///from-cli.sqlite"
    assert config.log_level == "debug"
    assert config.ocpp.response_timeout == 20  # what the command line does not say comes from the file


def test_short_options_override_the_file(config_file):
    config = parse("-c", config_file, "-p", "9300", "-d", "sqlite:///short.sqlite", "-l", "error").config
    assert config.ocpp.endpoint == "tcp:9300:interface=127.0.0.1"
    assert config.database.url == "sqlite:///short.sqlite"
    assert config.log_level == "error"


def test_endpoint_options_override_the_file(config_file):
    config = parse("--config", config_file, "--ocpp-endpoint", "tcp:9400", "--api-endpoint", "tcp:8181").config
    assert config.ocpp.endpoint == "tcp:9400"
    assert config.api.endpoint == "tcp:8181"


def test_without_config_option_and_without_default_file_the_defaults_apply(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = parse("--port", "9500").config
    assert config.ocpp.endpoint == with_port(Config().ocpp.endpoint, 9500)
    assert config.ocpp.endpoint.startswith("tcp:9500")
    assert config.database.url == Config().database.url


def test_without_config_option_the_default_file_is_read(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "csms.ini").write_text("[ocpp]\nunknown_stations = reject\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert parse().config.ocpp.unknown_stations == "reject"


def test_option_that_is_not_what_it_should_be_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(usage.UsageError, match="ninety"):
        parse("--port", "ninety")


@pytest.mark.parametrize("argv, message", [
    (["--log-level", "chatty"], "csms: cannot start: [csms] log_level must be one of"),
    (["--config", "/nonexistent/csms.ini"], "csms: cannot start: cannot read the config file /nonexistent/csms.ini: No such file"),
], ids=["log-level", "missing-file"])
def test_unusable_values_stop_with_one_line_not_the_usage_text(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StartupFailed) as exc_info:
        parse(*argv)
    assert str(exc_info.value).startswith(message)
    assert exc_info.value.code == str(exc_info.value)  # Python prints it alone and exits 1


def test_bad_config_file_stops_with_one_line(tmp_path):
    path = tmp_path / "bad.ini"
    path.write_text("[ocpp]\nunknown_stations = sometimes\n", encoding="utf-8")
    with pytest.raises(StartupFailed, match="unknown_stations"):
        parse("--config", str(path))


@pytest.mark.parametrize("endpoint, port, expected", [
    ("tcp:9000", 9100, "tcp:9100"),
    ("tcp:9000:interface=127.0.0.1", 9100, "tcp:9100:interface=127.0.0.1"),
    ("ssl:9443:privateKey=key.pem:certKey=cert.pem", 443, "ssl:443:privateKey=key.pem:certKey=cert.pem"),
    ("tcp", 9100, "tcp:9100"),
])
def test_port_option_replaces_only_the_endpoints_port(endpoint, port, expected):
    assert with_port(endpoint, port) == expected


@pytest_twisted.ensureDeferred
async def test_twistd_csms_help_lists_the_options():
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    out, err, code = await utils.getProcessOutputAndValue(
        twistd, ["csms", "--help"], env=dict(os.environ), path=REPO, reactor=reactor).addTimeout(60, reactor)
    text = out.decode()
    assert code == 0, err.decode()
    for option in ("--config=", "--port=", "--database=", "--log-level=", "--ocpp-endpoint=", "--api-endpoint="):
        assert option in text
    assert "-c, --config=" in text and "-p, --port=" in text


def start_firmware_directories(text: str):
    """Configure a Central System (no error: csms-admin configures the plugin too, and must not touch its
    directories), then start its ``firmware-directories`` service as start-up does; StartupError if refused."""
    from csms.service import CSMSService

    config = load_config(text="[database]\nurl = sqlite://\n[plugins]\nenabled = core, firmware\n" + text)
    csms = CSMSService(config)
    [directories] = [s for s in csms.plugin_services if s.name == "firmware-directories"]
    directories.startService()


def test_firmware_directory_that_cannot_be_created_is_refused_at_start_naming_the_setting(tmp_path):
    from csms.service import StartupError

    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    with pytest.raises(StartupError) as exc_info:
        start_firmware_directories(f"[plugin:firmware]\nfirmware_dir = {blocker / 'firmware'}\n")
    assert str(exc_info.value) == f"[plugin:firmware] firmware_dir: cannot create {blocker / 'firmware'} (not a directory)"


def test_firmware_directory_the_csms_cannot_write_in_is_refused_at_start_naming_the_setting():
    """Found by an operator's walk through the docs: an existing directory it could not write in was taken,
    and the first upload was a 500. /proc/self refuses a new file even to root (CI runs as root)."""
    from csms.service import StartupError

    with pytest.raises(StartupError) as exc_info:
        start_firmware_directories("[plugin:firmware]\ndiagnostics_dir = /proc/self\n")
    assert str(exc_info.value).startswith("[plugin:firmware] diagnostics_dir: cannot write in /proc/self (")
