"""``csms-admin``: operator tasks from the command line (API tokens).

    csms-admin token create --name billing --scope read   # prints a new token once
    csms-admin token list
    csms-admin token revoke 3

It reads the server's configuration the way ``twistd csms`` does (``--config``, else etc/csms.ini when
it exists) and says which database it opened. It creates no database: a token written to a database
the server does not use would never be accepted, so a database that does not exist yet (or holds no
CSMS tables) is refused unless ``--create`` is given.
"""
from __future__ import annotations

import argparse
import os
import sys

from csms.config import ConfigError, display_url, load_config, validate
from csms.service import DEFAULT_CONFIG, config_path, describe

#: A table every CSMS database has: its presence tells a CSMS database from an empty or foreign one.
MARKER_TABLE = "csms_stations"


class AdminError(Exception):
    """The command cannot go on; ``str()`` says why, in one line."""


def _database_url(args) -> tuple[str, str | None]:
    """(database URL, config file read or None) as the server would have them."""
    path = config_path(args.config)
    config = load_config(path)
    if args.database:
        config.database.url = args.database
        validate(config)
    return config.database.url, path


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


def open_database(args):
    """An engine on the server's database, with the framework tables; says which one on stderr."""
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from csms.api import audit, tokens  # noqa: F401  (their tables live in the framework metadata)
    from csms.stations import metadata

    url, config_file = _database_url(args)
    parsed = make_url(url)
    sqlite_file = _sqlite_file(parsed)
    if sqlite_file is not None:
        url = parsed.set(database=sqlite_file)
        where = f"sqlite:///{sqlite_file}"
    else:
        where = display_url(url)
    if args.database:
        read_from = "given with --database"
    elif config_file:
        read_from = f"from {config_file}"
    else:
        read_from = f"the built-in default: no {DEFAULT_CONFIG} here"
    if sqlite_file is not None and not os.path.exists(sqlite_file):
        if not args.create:
            raise AdminError(f"database {where} does not exist ({read_from}); give the server's database "
                             "with --config or --database, or pass --create to create it")
        os.makedirs(os.path.dirname(sqlite_file), exist_ok=True)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            is_csms_database = inspect(conn).has_table(MARKER_TABLE)
        if not is_csms_database and not args.create:
            raise AdminError(f"database {where} holds no CSMS tables ({read_from}); give the server's database "
                             "with --config or --database, or pass --create to create them")
        metadata.create_all(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        raise AdminError(f"database {where}: {describe(exc)}") from None
    except AdminError:
        engine.dispose()
        raise
    created = "" if is_csms_database else ", created now"
    print(f"csms-admin: database {where} ({read_from}{created})", file=sys.stderr)
    return engine


def tokens_scopes():
    from csms.api.tokens import SCOPES
    return SCOPES


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
    args = parser.parse_args(argv)

    from csms.api import tokens

    try:
        engine = open_database(args)
    except ConfigError as exc:
        print(f"csms-admin: {exc}", file=sys.stderr)
        return 2
    except AdminError as exc:
        print(f"csms-admin: {exc}", file=sys.stderr)
        return 1
    try:
        with engine.begin() as conn:
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
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
