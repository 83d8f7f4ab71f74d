"""Operator configuration: the INI file (csms.config) and the ``twistd csms`` options that override it."""
from __future__ import annotations

import os
import sys

import pytest
import pytest_twisted
from twisted.internet import reactor, utils
from twisted.python import usage

from csms.config import Config, ConfigError, load_config
from csms.service import Options, with_port

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


def test_missing_config_file_raises_os_error(tmp_path):
    with pytest.raises(OSError):
        load_config(str(tmp_path / "nope.ini"))


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


@pytest.mark.parametrize("argv, message", [
    (["--log-level", "chatty"], "log_level must be one of"),
    (["--port", "ninety"], "ninety"),
    (["--config", "/nonexistent/csms.ini"], "No such file"),
], ids=["log-level", "port", "missing-file"])
def test_bad_options_are_usage_errors(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(usage.UsageError) as exc_info:
        parse(*argv)
    assert message in str(exc_info.value)


def test_bad_config_file_is_a_usage_error(tmp_path):
    path = tmp_path / "bad.ini"
    path.write_text("[ocpp]\nunknown_stations = sometimes\n", encoding="utf-8")
    with pytest.raises(usage.UsageError, match="unknown_stations"):
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
