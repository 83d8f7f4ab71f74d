"""Operator configuration: an INI file (``etc/csms.ini``) read into one object per section.

Every value has a default here, so an empty file is a working configuration; command-line
options given to ``twistd csms`` override the file. ``[plugin:NAME]`` sections hold the settings each
plugin declares (:class:`Setting`); they are checked once the plugins are loaded
(:func:`check_plugin_sections`).
"""
from __future__ import annotations

import configparser
import difflib
from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_PLUGINS = ("core",)
UNKNOWN_STATION_POLICIES = ("accept", "pending", "reject")
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
LOG_FORMATS = ("text", "json")
#: The settings of ``[csms]``, read onto :class:`Config` itself.
CSMS_SETTINGS = ("log_level", "log_format", "shutdown_grace")
SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
KNOWN_SECTIONS = ("csms", "ocpp", "database", "api", "metrics", "cluster", "plugins", "retention")
#: The database URLs the CSMS works with, as operators are told when they give another one.
DATABASE_URLS = "sqlite:///path/to/file.sqlite, sqlite:///:memory: or postgresql+psycopg://user:password@host/db"
#: Schemes taken to mean PostgreSQL through psycopg 3, the driver the CSMS is built and tested with.
POSTGRESQL_ALIASES = ("postgres", "postgresql")


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
    boot_timeout: float = 600.0
    max_connections: int = 10000
    max_connections_per_address: int = 1000
    #: Stations whose every frame is logged (namespace ``csms.trace``), whatever ``log_level`` says.
    trace_stations: list[str] = field(default_factory=list)


@dataclass
class DatabaseConfig:
    """``[database]``: where everything is stored."""

    url: str = "sqlite:///var/csms.sqlite"
    pool_size: int = 4
    sqlite_synchronous: str = "FULL"
    #: Apply pending schema migrations at start-up instead of refusing to start (see docs/migrations.md).
    auto_upgrade: bool = False


@dataclass
class APIConfig:
    """``[api]``: the operator HTTP API."""

    endpoint: str = "tcp:8080:interface=127.0.0.1"
    tokens: list[str] = field(default_factory=list)
    max_body_size: int = 1048576
    public_url: str = ""
    # Slow and piled-up clients (csms.httplimits): deadlines in seconds, rate in bytes/s, caps in connections.
    request_header_timeout: float = 20.0
    request_body_timeout: float = 20.0
    request_body_min_rate: int = 500
    max_connections: int = 256
    max_connections_per_address: int = 32


@dataclass
class MetricsConfig:
    """``[metrics]``: Prometheus metrics (``/metrics``) and the health endpoints (``/healthz``, ``/readyz``)."""

    enabled: bool = True
    #: Its own listener besides the API port (a Twisted endpoint string); empty: the API port only.
    endpoint: str = ""
    #: Clients that scrape /metrics without a bearer token (and see why /readyz failed).
    allowed_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    #: Seconds /readyz waits for each check (the database query among them) before calling it failed.
    readiness_timeout: float = 2.0


@dataclass
class ClusterConfig:
    """``[cluster]``: several nodes sharing one PostgreSQL database (docs/cluster.md)."""

    enabled: bool = False
    #: This node's name, unique in the cluster; empty: host name and OCPP port.
    node_name: str = ""
    #: Seconds a node counts as alive after its last heartbeat.
    lease_seconds: float = 15.0
    heartbeat_seconds: float = 5.0
    #: Seconds a node waits for the answer to a call it forwarded; 0: [ocpp] response_timeout + 5.
    forward_timeout: float = 0.0

    def forward_deadline(self, response_timeout: float) -> float:
        return self.forward_timeout or response_timeout + 5.0


@dataclass
class Config:
    """The whole configuration; ``plugin_settings`` keeps each ``[plugin:NAME]`` section raw."""

    log_level: str = "info"
    log_format: str = "text"
    #: Seconds a SIGTERM'd CSMS gives in-flight handlers and their commits before it abandons them.
    shutdown_grace: float = 10.0
    ocpp: OCPPConfig = field(default_factory=OCPPConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    api: APIConfig = field(default_factory=APIConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    enabled_plugins: list[str] = field(default_factory=lambda: list(DEFAULT_PLUGINS))
    blocked_plugins: list[str] = field(default_factory=list)
    plugin_settings: dict[str, dict[str, str]] = field(default_factory=dict)
    #: ``[retention]`` as written: name -> days, checked against what the framework and the plugins
    #: declare once they are loaded (csms.retention.configured_days).
    retention: dict[str, str] = field(default_factory=dict)
    #: Plugin name -> the settings it declares, once the plugins are loaded (see check_plugin_sections).
    declared_settings: dict[str, tuple] = field(default_factory=dict, compare=False, repr=False)

    def plugin(self, name: str) -> "PluginSettings":
        return PluginSettings(name, self.plugin_settings.get(name, {}), self.declared_settings.get(name))


@dataclass(frozen=True)
class Setting:
    """One setting a plugin declares for its ``[plugin:NAME]`` section.

    ``type`` is ``str``, ``int``, ``float`` or ``bool``; ``default`` is what an absent key means (an
    empty one too, except for a ``str``, where empty is a value); ``doc`` says what it is for. With ``choices``, the value must be one of them (compared
    without regard to case; the value read is the choice as declared).
    """

    name: str
    type: type
    default: Any
    doc: str
    choices: tuple = ()

    TYPES = (str, int, float, bool)

    def __post_init__(self):
        if self.type not in self.TYPES:
            raise TypeError(f"setting {self.name!r}: type must be one of str, int, float, bool")
        if not isinstance(self.default, self.type) and not (self.type is float and type(self.default) is int):
            raise TypeError(f"setting {self.name!r}: default {self.default!r} is not a {self.type.__name__}")
        if self.choices and self.default not in self.choices:
            raise TypeError(f"setting {self.name!r}: default {self.default!r} is not one of its choices")

    def summary(self) -> str:
        """Its type, choices and default as an operator is shown them: ``int, default 300``."""
        kind = self.type.__name__
        if self.choices:
            kind += f", one of {', '.join(ini_value(choice) for choice in self.choices)}"
        return f"{kind}, default {ini_value(self.default) or 'empty'}"

    def described(self) -> str:
        """``type, default ...: "doc"``, on one line: what an error about this setting quotes."""
        return f"{self.summary()}: \"{' '.join(self.doc.split())}\""

    def parse(self, raw: str | None, section: str):
        """The typed value of ``raw`` (None: the key is absent), or ConfigError naming the line."""
        if raw is None:
            return self.default
        if self.type is str:
            value = raw.strip()  # empty is a value: "empty disables it" is how several settings read
        elif raw.strip() == "":
            return self.default
        elif self.type is bool:
            return _parse_bool(raw, section, self.name)
        else:
            value = _as(self.type, raw, self.default, section, self.name)
        if self.choices:
            for choice in self.choices:
                if str(choice).lower() == str(value).strip().lower():
                    return choice
            raise ConfigError(f"[{section}] {self.name} must be one of {', '.join(map(str, self.choices))}, "
                              f"not {raw!r}")
        return value


def ini_value(value) -> str:
    """``value`` as a config file writes it (``true``/``false`` for a bool)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


#: Where an operator reads every setting of an installed plugin with its doc (csms.admin).
SETTINGS_COMMAND = "csms-admin config settings --plugin {name}"


def unknown_setting(name: str, key: str, settings, installed: bool = True) -> ConfigError:
    """The error for ``key`` in ``[plugin:NAME]``, which the plugin does not declare: its settings, the
    closest one with its doc (difflib), and, for an installed plugin, the command listing all with theirs."""
    known = sorted(setting.name for setting in settings)
    message = f"[plugin:{name}] has no setting {key!r}"
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        (setting,) = [setting for setting in settings if setting.name == close[0]]
        message += f": did you mean {setting.name} ({setting.described()})? "
    else:
        message += ". "
    message += f"Its settings: {', '.join(known) or 'none'}"
    if installed and known:
        message += f"; `{SETTINGS_COMMAND.format(name=name)}` shows each with its doc"
    return ConfigError(message)


class PluginSettings:
    """One ``[plugin:NAME]`` section: ``settings[key]`` reads a declared setting, typed.

    ``get/getint/getfloat/getbool(key, default)`` read any key with the caller's default (the way
    plugins read settings before they declared them; still working for undeclared keys).
    """

    def __init__(self, name: str, values: dict[str, str], declared: tuple | None = None):
        self.name = name
        self._values = values
        self._declared = {setting.name: setting for setting in declared} if declared is not None else None

    @property
    def section(self) -> str:
        return f"plugin:{self.name}"

    def __getitem__(self, key: str):
        setting = (self._declared or {}).get(key)
        if setting is None:
            raise KeyError(f"plugin {self.name!r} declares no setting {key!r}")
        return setting.parse(self._values.get(key), self.section)

    def get(self, key: str, default: str) -> str:
        return self._values.get(key, default)

    def getint(self, key: str, default: int) -> int:
        return _as(int, self._values.get(key), default, self.section, key)

    def getfloat(self, key: str, default: float) -> float:
        return _as(float, self._values.get(key), default, self.section, key)

    def getbool(self, key: str, default: bool) -> bool:
        raw = self._values.get(key)
        if raw is None:
            return default
        return _parse_bool(raw, self.section, key)


def check_plugin_sections(config: Config, declared: dict, installed) -> None:
    """Refuse ``[plugin:NAME]`` sections the loaded plugins cannot use, as the core sections are refused.

    ``declared``: each loaded plugin's name -> its settings (a tuple of :class:`Setting`), or None for
    a plugin that declares none at all (its section is then taken as it is). ``installed``: every
    plugin name that could be enabled. A section naming no installed plugin is a typo; a section of
    an installed plugin that is not loaded (disabled, blocked) is kept for when it is enabled. Every
    declared value of a loaded plugin is parsed now, so a bad one stops start-up even if it is read late.
    """
    for name in config.plugin_settings:
        if name not in installed and name not in declared:
            raise ConfigError(f"[plugin:{name}] names no installed plugin "
                              f"(installed: {', '.join(sorted(set(installed) | set(declared))) or 'none'})")
    for name, settings in declared.items():
        if settings is None:
            continue
        known = {setting.name for setting in settings}
        values = config.plugin_settings.get(name, {})
        for key in values:
            if key not in known:
                raise unknown_setting(name, key, settings, installed=name in installed)
        for setting in settings:
            try:
                setting.parse(values.get(setting.name), f"plugin:{name}")
            except ConfigError as exc:  # what the value is for, beside why it cannot be
                raise ConfigError(f"{exc} ({setting.name}: {setting.described()})") from None
        config.declared_settings[name] = tuple(settings)


def no_such_setting(section: str, key: str, known) -> str:
    """Why ``key`` is refused in ``[section]``, with the settings it has and, for a typo, the one meant."""
    message = f"[{section}] has no setting {key!r} (known: {', '.join(sorted(known)) or 'none'})"
    close = difflib.get_close_matches(key, list(known), n=1)
    return message + (f": did you mean {close[0]!r}?" if close else "")


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
            raise ConfigError(no_such_setting(section, key, [f.name for f in fields(target)]))
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
    except OSError as exc:  # missing, unreadable, a directory
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read the config file {path}: it is not UTF-8 text ({exc.reason} "
                          f"at byte {exc.start})") from None
    if parser.defaults():
        raise ConfigError(f"[{parser.default_section}] is not supported: put each setting in its own section")
    # A misspelt section would otherwise be ignored and its settings silently left at their defaults.
    unknown = [s for s in parser.sections() if s not in KNOWN_SECTIONS and not s.startswith("plugin:")]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(KNOWN_SECTIONS), n=1)
        raise ConfigError(f"unknown section [{unknown[0]}] (known: {', '.join(KNOWN_SECTIONS)}, plugin:NAME)"
                          + (f": did you mean [{close[0]}]?" if close else ""))
    config = Config()
    if parser.has_section("csms"):
        for key, raw in parser.items("csms"):
            if key not in CSMS_SETTINGS:
                raise ConfigError(no_such_setting("csms", key, CSMS_SETTINGS))
            if key == "shutdown_grace":
                config.shutdown_grace = _as(float, raw, config.shutdown_grace, "csms", key)
            else:
                setattr(config, key, raw.strip().lower())
    _fill(config.ocpp, parser, "ocpp")
    _fill(config.database, parser, "database")
    _fill(config.api, parser, "api")
    _fill(config.metrics, parser, "metrics")
    _fill(config.cluster, parser, "cluster")
    if parser.has_section("plugins"):
        for key in parser.options("plugins"):
            if key not in ("enabled", "blocked"):
                raise ConfigError(no_such_setting("plugins", key, ("enabled", "blocked")))
        config.enabled_plugins = _list(parser.get("plugins", "enabled", fallback=",".join(DEFAULT_PLUGINS)))
        config.blocked_plugins = _list(parser.get("plugins", "blocked", fallback=""))
    if parser.has_section("retention"):
        config.retention = dict(parser.items("retention"))
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
    if config.log_format not in LOG_FORMATS:
        raise ConfigError(f"[csms] log_format must be one of {', '.join(LOG_FORMATS)}, not {config.log_format!r}")
    if not 0 <= config.shutdown_grace < float("inf"):
        raise ConfigError("[csms] shutdown_grace must be 0 or a number of seconds")
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
    if not 0 <= config.ocpp.boot_timeout < float("inf"):
        raise ConfigError("[ocpp] boot_timeout must be 0 (off) or a number of seconds")
    if config.ocpp.max_connections < 0 or config.ocpp.max_connections_per_address < 0:
        raise ConfigError("[ocpp] max_connections and max_connections_per_address must be 0 (no limit) or more")
    config.database.url = database_url(config.database.url)
    from csms.httplimits import HTTPLimits
    HTTPLimits.read(lambda name, default: getattr(config.api, name)).check("api")
    if not 0 < config.metrics.readiness_timeout < float("inf"):
        raise ConfigError("[metrics] readiness_timeout must be a positive number of seconds")
    from csms.netaddr import parse_networks
    parse_networks(config.metrics.allowed_networks, "[metrics] allowed_networks")
    _validate_cluster(config)
    if config.database.pool_size < 1:
        raise ConfigError("[database] pool_size must be at least 1")
    # Interpolated into a PRAGMA statement: only the four values SQLite knows.
    if config.database.sqlite_synchronous.upper() not in SQLITE_SYNCHRONOUS:
        raise ConfigError(f"[database] sqlite_synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS)}")


def _validate_cluster(config: Config) -> None:
    cluster = config.cluster
    if not 0 < cluster.heartbeat_seconds < float("inf"):
        raise ConfigError("[cluster] heartbeat_seconds must be a positive number of seconds")
    if not cluster.heartbeat_seconds < cluster.lease_seconds < float("inf"):
        raise ConfigError("[cluster] lease_seconds must be a number of seconds above heartbeat_seconds")
    if not 0 <= cluster.forward_timeout < float("inf"):
        raise ConfigError("[cluster] forward_timeout must be 0 (response_timeout + 5) or a number of seconds")
    if len(cluster.node_name) > 255 or not cluster.node_name.isprintable():
        raise ConfigError("[cluster] node_name must be at most 255 printable characters")


def check_cluster_database(config: Config) -> None:
    """Cluster mode needs PostgreSQL: checked once the command line had its say on the database URL."""
    if config.cluster.enabled and not config.database.url.startswith("postgresql"):
        raise ConfigError("[cluster] enabled needs PostgreSQL: the nodes share its database and talk through "
                          "LISTEN/NOTIFY; set [database] url to postgresql+psycopg://...")


def database_url(url: str) -> str:
    """``url`` as the CSMS opens it, or ConfigError naming the URLs that work.

    ``postgres://`` and ``postgresql://`` are taken to mean ``postgresql+psycopg://`` (libpq and most
    hosting services write them so; SQLAlchemy would otherwise pick whatever driver its version prefers).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    scheme, separator, rest = url.strip().partition("://")
    if separator and scheme.lower() in POSTGRESQL_ALIASES:
        url = f"postgresql+psycopg://{rest}"
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ConfigError(f"[database] url {url if '@' not in url else '(not shown)'!r} is not a database URL; "
                          f"use {DATABASE_URLS}") from None
    where = display_url(url)
    if (parsed.get_backend_name(), parsed.get_driver_name()) not in (("sqlite", "pysqlite"), ("postgresql", "psycopg")):
        raise ConfigError(f"[database] url {where}: the CSMS stores its data in SQLite or PostgreSQL; "
                          f"use {DATABASE_URLS}")
    if parsed.get_backend_name() == "postgresql":
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ConfigError(f"[database] url {where} needs the psycopg package: "
                              "pip install 'csms[postgresql]'") from None
    return url


def display_url(url: str) -> str:
    """A database URL fit for a log line: its password replaced by ``***``."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return "(a URL that cannot be parsed)"
    if parsed.password is None:
        return url
    return parsed.render_as_string(hide_password=True)
