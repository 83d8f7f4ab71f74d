"""``csms-admin``: operator tasks from the command line (API tokens, schema migrations).

    csms-admin token create --name billing --scope read   # prints a new token once
    csms-admin token list
    csms-admin token revoke 3
    csms-admin db upgrade                        # every enabled plugin's schema to its head
    csms-admin db current                        # where each migration history stands
    csms-admin db history [--plugin core]
    csms-admin db revision --plugin acmehub -m "hello firmware version" --autogenerate
    csms-admin config settings [--plugin core]   # each plugin's [plugin:NAME] settings with their docs
    csms-admin config settings --retention       # the [retention] settings, with what each history keeps

It reads the server's configuration the way ``twistd csms`` does (``--config``, else etc/csms.ini when
it exists) and says which database it opened. It creates no database: a token written to a database
the server does not use would never be accepted, so a database that does not exist yet (or holds no
CSMS tables) is refused unless ``--create`` is given.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
import warnings

from csms.config import ConfigError, display_url, load_config, validate
from csms.service import DEFAULT_CONFIG, config_path, describe

#: A table every CSMS database has: its presence tells a CSMS database from an empty or foreign one.
MARKER_TABLE = "csms_stations"


class AdminError(Exception):
    """The command cannot go on; ``str()`` says why, in one line."""


def _config(args):
    """(config, config file read or None) as the server would have them."""
    path = config_path(args.config)
    config = load_config(path)
    if args.database:
        config.database.url = args.database
        validate(config)
    return config, path


def schema_histories(config) -> list:
    """The migration histories of the plugins ``config`` enables, found as the server finds them (each
    plugin configured first: a plugin may build its tables then)."""
    from csms.app import CentralSystem

    return CentralSystem(config).histories()


def _sqlite_file(url) -> str | None:
    """The file of a SQLite URL, absolute (relative paths are taken from the working directory, as the
    server takes them); None for another database. Raises AdminError for an in-memory one."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database in ("", ":memory:") or "mode=memory" in database:
        raise AdminError("an in-memory database is gone when csms-admin exits: give the server's database "
                         "(--config or --database)")
    if database.startswith("file:"):
        return None  # a URI: SQLite's to resolve (the table check still applies)
    return os.path.abspath(database)


class Opened:
    """The server's database as csms-admin opened it."""

    def __init__(self, engine, where: str, config, is_csms_database: bool):
        self.engine = engine
        self.where = where
        self.config = config
        self.is_csms_database = is_csms_database


def open_database(args, create: bool | None = None, migrate: bool = True) -> Opened:
    """The server's database, says which one on stderr.

    ``create``: a database without CSMS tables (a SQLite file that does not exist) is accepted
    (default: ``--create``). ``migrate``: its schema is brought to its head when it has none yet, and
    must be current otherwise (the token commands); ``db`` commands pass False and do their own.
    """
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from csms.migrations import SchemaError, framework_history, pending, prepare_schema

    create = args.create if create is None else create
    config, config_file = _config(args)
    parsed = make_url(config.database.url)
    sqlite_file = _sqlite_file(parsed)
    if sqlite_file is not None:
        parsed = parsed.set(database=sqlite_file)
        where = f"sqlite:///{sqlite_file}"
    else:
        where = display_url(config.database.url)
    # The server's plugins find the database by this URL too (an absolute SQLite path).
    config.database.url = parsed.render_as_string(hide_password=False)
    if args.database:
        read_from = "given with --database"
    elif config_file:
        read_from = f"from {config_file}"
    else:
        read_from = f"the built-in default: no {DEFAULT_CONFIG} here"
    if sqlite_file is not None and not os.path.exists(sqlite_file):
        if not create:
            raise AdminError(f"database {where} does not exist ({read_from}); give the server's database "
                             "with --config or --database, or pass --create to create it")
        os.makedirs(os.path.dirname(sqlite_file), exist_ok=True)
    engine = create_engine(parsed)
    try:
        with engine.connect() as conn:
            is_csms_database = inspect(conn).has_table(MARKER_TABLE)
        if not is_csms_database and not create:
            raise AdminError(f"database {where} holds no CSMS tables ({read_from}); give the server's database "
                             "with --config or --database, or pass --create to create them")
        if migrate and not is_csms_database:
            with engine.begin() as conn:
                prepare_schema(conn, schema_histories(config), auto_upgrade=True)
        elif migrate:
            with engine.connect() as conn:
                if pending(conn, [framework_history()]):
                    raise AdminError(f"database {where}: its schema is behind this code: run `csms-admin db upgrade`")
    except SchemaError as exc:
        engine.dispose()
        raise AdminError(f"database {where}: {exc}") from None
    except SQLAlchemyError as exc:
        engine.dispose()
        raise AdminError(f"database {where}: {describe(exc)}") from None
    except AdminError:
        engine.dispose()
        raise
    created = "" if is_csms_database or not migrate else ", created now"
    print(f"csms-admin: database {where} ({read_from}{created})", file=sys.stderr)
    return Opened(engine, where, config, is_csms_database)


def token_command(args, opened: Opened) -> int:
    from csms.api import tokens

    with opened.engine.begin() as conn:
        if args.action == "create":
            token_id, value = tokens.create_token_thd(conn, args.name, args.scope)
            print(value)
            print(f"token {token_id} ({args.name}, scope {args.scope}) created; it is not shown again",
                  file=sys.stderr)
        elif args.action == "list":
            for row in tokens.list_tokens_thd(conn):
                state = "revoked" if row["revoked"] else "active"
                created = f"{row['created_at']:%Y-%m-%dT%H:%M:%SZ}"
                print(f"{row['id']}\t{row['name']}\t{row['scope']}\t{created}\t{state}")
        elif args.action == "revoke":
            if not tokens.revoke_token_thd(conn, args.id):
                print(f"csms-admin: no token {args.id}", file=sys.stderr)
                return 1
            print(f"token {args.id} revoked", file=sys.stderr)
    return 0


def chosen_histories(args, config) -> list:
    found = schema_histories(config)
    plugin = getattr(args, "plugin", None)
    if plugin is None:
        return found
    chosen = [history for history in found if history.name == plugin]
    if not chosen:
        names = ", ".join(history.name for history in found)
        raise AdminError(f"no migration history {plugin!r} among the enabled plugins' ({names})")
    return chosen


def db_command(args) -> int:
    """``db upgrade|downgrade|current|history|revision``: see docs/migrations.md."""
    from sqlalchemy.exc import SQLAlchemyError

    from csms.migrations import SchemaError, downgrade, prepare_schema, statuses

    if args.action in ("revision", "history"):
        config, _ = _config(args)
        # Neither reads the server's database: the Central System built to find the plugins' histories
        # gets one that leaves nothing behind (a SQLite file's directory would be created).
        config.database.url = "sqlite://"
    if args.action == "revision":
        return revision_command(args, config)
    if args.action == "history":
        for history in chosen_histories(args, config):
            print_history(history)
        return 0
    opened = open_database(args, create=args.action == "upgrade", migrate=False)
    try:
        histories = chosen_histories(args, opened.config)
        if args.action == "upgrade":
            with opened.engine.begin() as conn:
                done = prepare_schema(conn, histories, auto_upgrade=True)
            for line in done:
                print(line)
            print(f"schema current: {', '.join(h.name for h in histories)}", file=sys.stderr)
        elif args.action == "downgrade":
            (history,) = histories
            with opened.engine.begin() as conn:
                print(downgrade(conn, history, args.revision))
        else:
            with opened.engine.connect() as conn:
                found = statuses(conn, histories)
            for one in found:
                at = ", ".join(one.current) or ("(tables made before migrations)" if one.unversioned_tables else "-")
                print(f"{one.history.name}\t{at}\t{one.state}")
    except SchemaError as exc:
        raise AdminError(f"database {opened.where}: {exc}") from None
    except SQLAlchemyError as exc:
        raise AdminError(f"database {opened.where}: {describe(exc)}") from None
    finally:
        opened.engine.dispose()
    return 0


def print_history(history) -> None:
    if not history.has_revisions:
        print(f"{history.name}: no migrations (tables made from its MetaData)")
        return
    script = history.script()
    for revision in reversed(list(script.walk_revisions())):
        head = " (head)" if revision.is_head else ""
        print(f"{history.name}\t{revision.revision}{head}\t{revision.doc}")


def revision_command(args, config) -> int:
    """Write the next migration of one plugin's history into its versions directory.

    With ``--autogenerate`` the change is what Alembic finds between the plugin's MetaData and the schema
    its migrations make, on a scratch in-memory SQLite database, or on the database ``--against`` names
    (SQLite cannot reflect expression-based indexes; PostgreSQL can), where everything done is rolled
    back. The operations come out in batch mode, which SQLite needs and PostgreSQL runs as plain ALTERs.
    """
    from alembic import command
    from sqlalchemy import create_engine

    from csms.migrations import EXPRESSION_INDEX_WARNING, next_revision_id

    (history,) = chosen_histories(args, config)
    if history.directory is None:
        raise AdminError(f"plugin {history.name} names no versions directory: give it a `migrations` attribute "
                         "(docs/hooks.md)")
    os.makedirs(history.directory, exist_ok=True)
    revision_id = next_revision_id(history)
    engine = create_engine(args.against or "sqlite://")
    try:
        with engine.connect() as conn, warnings.catch_warnings(record=True) as said:
            warnings.filterwarnings("always", message=EXPRESSION_INDEX_WARNING)
            scratch = conn.begin()
            try:
                if history.has_revisions:
                    command.upgrade(history.config(conn), "heads")
                script = command.revision(history.config(conn), message=args.message,
                                          autogenerate=args.autogenerate, rev_id=revision_id)
            finally:
                scratch.rollback()
    finally:
        engine.dispose()
    skipped = sorted({m.group(1) for w in said if (m := re.search(r"index '([^']+)'", str(w.message)))})
    if skipped:
        print(f"csms-admin: SQLite cannot compare expression-based indexes ({', '.join(skipped)}): write changes "
              "to them by hand, or autogenerate --against an empty PostgreSQL database", file=sys.stderr)
    print(script.path)
    return 0


def config_command(args) -> int:
    """``config settings``: the ``[plugin:NAME]`` settings of every enabled plugin (``--plugin``: of one
    installed plugin, enabled or not), each with its doc, type and default, as a config file holds them:
    the value is the config's where it gives one, else the default. Reads no database."""
    from csms.plugins import available_plugins, loaded_plugins, make_plugin_manager

    config, config_file = _config(args)
    if args.retention:
        return retention_command(config, config_file)
    if args.plugin is None:
        pm = make_plugin_manager(config.enabled_plugins, config.blocked_plugins)
        which = "the enabled plugins"
    else:
        installed = available_plugins()
        if args.plugin not in installed:
            raise AdminError(f"no plugin {args.plugin!r} is installed (installed: {', '.join(sorted(installed))})")
        pm = make_plugin_manager([args.plugin])
        which = f"plugin {args.plugin}"
    source = config_file or f"the built-in defaults (no {DEFAULT_CONFIG} here)"
    print(f"csms-admin: the settings of {which}, with the values of {source}", file=sys.stderr)
    blocks = [settings_block(plugin, config.plugin_settings.get(plugin.name, {})) for plugin in loaded_plugins(pm)]
    print("\n\n".join(blocks))
    return 0


def retention_command(config, config_file) -> int:
    """``config settings --retention``: ``[retention]`` as a config file holds it, each declared history
    under its description and ``(int, default N)``, with the config's value or else the default."""
    from csms.app import CentralSystem
    from csms.config import ini_value

    config.database.url = "sqlite://"  # reads no database: none is to be made (a SQLite file's directory)
    app = CentralSystem(config)  # refuses an unknown name, as start-up does
    source = config_file or f"the built-in defaults (no {DEFAULT_CONFIG} here)"
    print(f"csms-admin: the [retention] settings of the framework and the enabled plugins, in days (0: kept "
          f"for ever), with the values of {source}", file=sys.stderr)
    lines = ["[retention]"]
    for retention in app.retention:
        setting = retention.setting()
        lines += textwrap.wrap(" ".join(setting.doc.split()), width=100, initial_indent="# ", subsequent_indent="# ")
        lines.append(f"# ({setting.summary()}; {retention.table.name}.{retention.column})")
        lines.append(f"{setting.name} = {ini_value(app.retention_days[setting.name])}")
    print("\n".join(lines))
    return 0


def settings_block(plugin, values: dict) -> str:
    """One plugin's section as ``config settings`` prints it: each setting's doc and ``(type, default)``
    as comments above ``name = value``; keys of ``values`` it does not declare as comments too."""
    from csms.config import ini_value
    from csms.plugins import declared_settings

    settings = declared_settings(plugin)
    if settings is None:
        return f"# [plugin:{plugin.name}]: declares no settings (its section is read unchecked)"
    if not settings:
        return f"# [plugin:{plugin.name}]: no settings"
    lines = [f"[plugin:{plugin.name}]"]
    for setting in settings:
        lines += textwrap.wrap(" ".join(setting.doc.split()), width=100, initial_indent="# ", subsequent_indent="# ")
        lines.append(f"# ({setting.summary()})")
        given = values.get(setting.name)
        lines.append(f"{setting.name} = {ini_value(setting.default) if given is None else given}".rstrip())
    declared = {setting.name for setting in settings}
    for key in sorted(set(values) - declared):
        lines.append(f"# {key} = {values[key]}: not a setting of {plugin.name} (start-up refuses it)")
    return "\n".join(lines)


def tokens_scopes():
    from csms.api.tokens import SCOPES
    return SCOPES


def webhooks_command(args) -> int:
    """``webhooks deliver``: the delivery worker in the foreground, from the config file (see
    csms_plugins.webhooks.worker); logs as the server does, exits 0 once stopped."""
    from sqlalchemy.exc import SQLAlchemyError

    from csms.config import PluginSettings, unknown_setting
    from csms.migrations import pending, states

    opened = open_database(args, create=False, migrate=False)
    config = opened.config
    try:
        if "webhooks" not in config.enabled_plugins:
            raise AdminError("the webhooks plugin is not enabled in [plugins] enabled")
        try:
            with opened.engine.connect() as conn:
                behind = pending(conn, schema_histories(config))
        except SQLAlchemyError as exc:
            raise AdminError(f"database {opened.where}: {describe(exc)}") from None
        if behind:
            raise AdminError(f"database {opened.where}: its schema is not at this code's head ({states(behind)}): "
                             "start the CSMS once or run `csms-admin db upgrade`")
    finally:
        opened.engine.dispose()
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from csms.logs import CSMSLogObserver
    from csms_plugins.webhooks.plugin import WebhooksPlugin
    from csms_plugins.webhooks.worker import run, worker_spec

    declared = {setting.name for setting in WebhooksPlugin.settings}
    given = config.plugin_settings.get("webhooks", {})
    unknown = sorted(set(given) - declared)
    if unknown:
        raise unknown_setting("webhooks", unknown[0], WebhooksPlugin.settings)
    settings = WebhooksPlugin.read_settings(PluginSettings("webhooks", given, WebhooksPlugin.settings))
    globalLogBeginner.beginLoggingTo([CSMSLogObserver(sys.stdout, config.log_level, config.log_format)],
                                     redirectStandardIO=False)
    return run(reactor, worker_spec(config, settings))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="csms-admin", description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", help=f"config file (default {DEFAULT_CONFIG} when it exists)")
    parser.add_argument("-d", "--database", help="database URL (overrides the config)")
    parser.add_argument("--create", action="store_true",
                        help="create the database (its CSMS tables) when it does not exist yet")
    sub = parser.add_subparsers(dest="command", required=True)
    token = sub.add_parser("token", help="operator API bearer tokens").add_subparsers(dest="action", required=True)
    create = token.add_parser("create", help="create a token and print it (shown only once)")
    create.add_argument("--name", default="operator", help="what the token is for (the audit trail shows it)")
    create.add_argument("--scope", choices=tokens_scopes(), default="admin",
                        help="read: GET only; commands: also send stations commands; admin: everything (default)")
    token.add_parser("list", help="list tokens (never their values)")
    revoke = token.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("id", type=int)
    db = sub.add_parser("db", help="schema migrations (docs/migrations.md)").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", help="bring every enabled plugin's schema to its head (creates the database)")
    lower = db.add_parser("downgrade", help="take one plugin's schema down to an earlier revision, with the CSMS "
                                            "stopped, before starting the release that revision belongs to")
    lower.add_argument("--plugin", required=True, help="whose schema (csms: the framework's)")
    lower.add_argument("revision", help="a revision of its history (csms-admin db history), or base: none, "
                                        "its tables and their rows dropped")
    db.add_parser("current", help="where each enabled plugin's schema stands")
    history = db.add_parser("history", help="the migrations of every enabled plugin, or of one")
    history.add_argument("--plugin", help="one plugin's (or csms, the framework's)")
    revision = db.add_parser("revision", help="write a plugin's next migration into its versions directory")
    revision.add_argument("--plugin", required=True, help="whose migration (csms: the framework's)")
    revision.add_argument("-m", "--message", required=True, help="what it changes")
    revision.add_argument("--autogenerate", action="store_true",
                          help="fill it with what the plugin's tables changed since its last migration")
    revision.add_argument("--against", metavar="URL",
                          help="autogenerate on this database (rolled back) instead of an in-memory SQLite one")
    config = sub.add_parser("config", help="the configuration (docs/hooks.md, Settings)").add_subparsers(
        dest="action", required=True)
    settings = config.add_parser("settings", help="every enabled plugin's [plugin:NAME] settings: doc, type, "
                                                  "default, and the value the config gives")
    settings.add_argument("--plugin", help="one installed plugin's, enabled or not")
    settings.add_argument("--retention", action="store_true",
                          help="the [retention] settings instead: each history the framework and the enabled "
                               "plugins declare, with what it keeps (docs/retention.md)")
    webhooks = sub.add_parser("webhooks", help="webhook delivery (docs/webhooks.md)").add_subparsers(
        dest="action", required=True)
    webhooks.add_parser("deliver", help="deliver the outbox's webhook events until stopped (SIGTERM, Ctrl-C); "
                                        "for [plugin:webhooks] delivery = external")
    args = parser.parse_args(argv)

    from csms.plugins import PluginError

    try:
        if args.command == "db":
            return db_command(args)
        if args.command == "webhooks":
            return webhooks_command(args)
        if args.command == "config":
            return config_command(args)
        opened = open_database(args)
    except (ConfigError, PluginError) as exc:
        print(f"csms-admin: {exc}", file=sys.stderr)
        return 2
    except AdminError as exc:
        print(f"csms-admin: {exc}", file=sys.stderr)
        return 1
    try:
        return token_command(args, opened)
    finally:
        opened.engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
