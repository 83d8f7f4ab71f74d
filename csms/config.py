"""Operator configuration: an INI file (``etc/csms.ini``) read into one object per section.

Every value has a default here, so an empty file is a working configuration; command-line
options given to ``twistd csms`` override the file.
"""
from __future__ import annotations

import configparser
from dataclasses import dataclass, field

DEFAULT_PLUGINS = ("core",)
UNKNOWN_STATION_POLICIES = ("accept", "pending", "reject")
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
KNOWN_SECTIONS = ("csms", "ocpp", "database", "api", "plugins")


class ConfigError(ValueError):
    """The configuration file holds a value that cannot be used."""


@dataclass
class OCPPConfig:
    """``[ocpp]``: the WebSocket endpoint stations connect to and the OCPP-J RPC limits."""

    endpoint: str = "tcp:9000:backlog=4096"
    path_prefix: str = "/ocpp/"
    unknown_stations: str = "accept"
    require_password: bool = False
    response_timeout: float = 30.0
    handler_timeout: float = 60.0
    auto_ping_interval: float = 60.0
    auto_ping_timeout: float = 30.0
    max_message_size: int = 65536
    max_charge_point_id_length: int = 48
    open_handshake_timeout: float = 30.0


@dataclass
class DatabaseConfig:
    """``[database]``: where everything is stored."""

    url: str = "sqlite:///var/csms.sqlite"
    pool_size: int = 4
    sqlite_synchronous: str = "FULL"


@dataclass
class APIConfig:
    """``[api]``: the operator HTTP API."""

    endpoint: str = "tcp:8080:interface=127.0.0.1"
    tokens: list[str] = field(default_factory=list)
    max_body_size: int = 1048576
    public_url: str = ""


@dataclass
class Config:
    """The whole configuration; ``plugin_settings`` keeps each ``[plugin:NAME]`` section raw."""

    log_level: str = "info"
    ocpp: OCPPConfig = field(default_factory=OCPPConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    api: APIConfig = field(default_factory=APIConfig)
    enabled_plugins: list[str] = field(default_factory=lambda: list(DEFAULT_PLUGINS))
    blocked_plugins: list[str] = field(default_factory=list)
    plugin_settings: dict[str, dict[str, str]] = field(default_factory=dict)

    def plugin(self, name: str) -> "PluginSettings":
        return PluginSettings(name, self.plugin_settings.get(name, {}))


class PluginSettings:
    """Typed access to one ``[plugin:NAME]`` section, with the default given at each read."""

    def __init__(self, name: str, values: dict[str, str]):
        self.name = name
        self._values = values

    def get(self, key: str, default: str) -> str:
        return self._values.get(key, default)

    def getint(self, key: str, default: int) -> int:
        return _as(int, self._values.get(key), default, f"plugin:{self.name}", key)

    def getfloat(self, key: str, default: float) -> float:
        return _as(float, self._values.get(key), default, f"plugin:{self.name}", key)

    def getbool(self, key: str, default: bool) -> bool:
        raw = self._values.get(key)
        if raw is None:
            return default
        return _parse_bool(raw, f"plugin:{self.name}", key)


def _as(kind, raw, default, section, key):
    if raw is None or raw.strip() == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"[{section}] {key} = {raw!r} is not a valid {kind.__name__}") from None


def _parse_bool(raw: str, section: str, key: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise ConfigError(f"[{section}] {key} = {raw!r} is not a boolean")


def _list(raw: str) -> list[str]:
    return [item.strip() for item in raw.replace("\n", ",").split(",") if item.strip()]


def _fill(target, parser: configparser.ConfigParser, section: str) -> None:
    if not parser.has_section(section):
        return
    for key, raw in parser.items(section):
        if not hasattr(target, key):
            raise ConfigError(f"[{section}] has no setting {key!r}")
        current = getattr(target, key)
        if isinstance(current, bool):
            setattr(target, key, _parse_bool(raw, section, key))
        elif isinstance(current, list):
            setattr(target, key, _list(raw))
        elif isinstance(current, (int, float)):
            setattr(target, key, _as(type(current), raw, current, section, key))
        else:
            setattr(target, key, raw.strip())


def load_config(path: str | None = None, text: str | None = None) -> Config:
    """Read a configuration file (or text); missing sections and keys keep their defaults."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        if path is not None:
            with open(path, encoding="utf-8") as f:
                parser.read_file(f, source=path)
        if text is not None:
            parser.read_string(text)
    except configparser.Error as exc:  # duplicate keys, a line outside any section ...
        raise ConfigError(str(exc)) from None
    if parser.defaults():
        raise ConfigError(f"[{parser.default_section}] is not supported: put each setting in its own section")
    # A misspelt section would otherwise be ignored and its settings silently left at their defaults.
    unknown = [s for s in parser.sections() if s not in KNOWN_SECTIONS and not s.startswith("plugin:")]
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}] (known: {', '.join(KNOWN_SECTIONS)}, plugin:NAME)")
    config = Config()
    if parser.has_section("csms"):
        for key, raw in parser.items("csms"):
            if key != "log_level":
                raise ConfigError(f"[csms] has no setting {key!r}")
            config.log_level = raw.strip().lower()
    _fill(config.ocpp, parser, "ocpp")
    _fill(config.database, parser, "database")
    _fill(config.api, parser, "api")
    if parser.has_section("plugins"):
        for key in parser.options("plugins"):
            if key not in ("enabled", "blocked"):
                raise ConfigError(f"[plugins] has no setting {key!r}")
        config.enabled_plugins = _list(parser.get("plugins", "enabled", fallback=",".join(DEFAULT_PLUGINS)))
        config.blocked_plugins = _list(parser.get("plugins", "blocked", fallback=""))
    for section in parser.sections():
        if section.startswith("plugin:"):
            config.plugin_settings[section[len("plugin:"):]] = dict(parser.items(section))
    validate(config)
    return config


def validate(config: Config) -> None:
    """Refuse values that would only fail later, far from the line that set them."""
    if config.ocpp.unknown_stations not in UNKNOWN_STATION_POLICIES:
        raise ConfigError(
            f"[ocpp] unknown_stations must be one of {', '.join(UNKNOWN_STATION_POLICIES)}, "
            f"not {config.ocpp.unknown_stations!r}"
        )
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"[csms] log_level must be one of {', '.join(LOG_LEVELS)}")
    if config.ocpp.response_timeout <= 0:
        raise ConfigError("[ocpp] response_timeout must be positive")
    if not 0 < config.ocpp.handler_timeout < float("inf"):  # NaN fails this too
        raise ConfigError("[ocpp] handler_timeout must be a positive number of seconds")
    if config.ocpp.max_message_size < 1024:
        raise ConfigError("[ocpp] max_message_size must be at least 1024 bytes")
    if not config.ocpp.path_prefix.startswith("/") or not config.ocpp.path_prefix.endswith("/"):
        raise ConfigError("[ocpp] path_prefix must start and end with '/'")
    if not 1 <= config.ocpp.max_charge_point_id_length <= 255:
        # csms_stations.id holds at most 255 characters.
        raise ConfigError("[ocpp] max_charge_point_id_length must be between 1 and 255")
    if config.database.pool_size < 1:
        raise ConfigError("[database] pool_size must be at least 1")
    # Interpolated into a PRAGMA statement: only the four values SQLite knows.
    if config.database.sqlite_synchronous.upper() not in SQLITE_SYNCHRONOUS:
        raise ConfigError(f"[database] sqlite_synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS)}")
