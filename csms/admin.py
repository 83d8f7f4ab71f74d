"""``csms-admin``: operator tasks from the command line (API tokens).

    csms-admin token create --name billing      # prints a new token once
    csms-admin token list
    csms-admin token revoke 3
"""
from __future__ import annotations

import argparse
import sys

from csms.config import ConfigError, load_config
from csms.service import DEFAULT_CONFIG


def _engine(args):
    import os

    from sqlalchemy import create_engine

    from csms.stations import metadata
    from csms.api import tokens  # noqa: F401  (registers csms_api_tokens in the metadata)

    path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    config = load_config(path) if path else load_config()
    url = args.database or config.database.url
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        os.makedirs(os.path.dirname(os.path.abspath(url[len("sqlite:///"):])) or ".", exist_ok=True)
    engine = create_engine(url)
    metadata.create_all(engine)
    return engine


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="csms-admin", description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", help=f"config file (default {DEFAULT_CONFIG})")
    parser.add_argument("-d", "--database", help="database URL (overrides the config)")
    sub = parser.add_subparsers(dest="command", required=True)
    token = sub.add_parser("token", help="operator API bearer tokens").add_subparsers(dest="action", required=True)
    create = token.add_parser("create", help="create a token and print it (shown only once)")
    create.add_argument("--name", default="operator", help="what the token is for")
    token.add_parser("list", help="list tokens (never their values)")
    revoke = token.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("id", type=int)
    args = parser.parse_args(argv)

    from csms.api import tokens

    try:
        engine = _engine(args)
    except ConfigError as exc:
        print(f"csms-admin: {exc}", file=sys.stderr)
        return 2
    with engine.begin() as conn:
        if args.action == "create":
            token_id, value = tokens.create_token_thd(conn, args.name)
            print(value)
            print(f"token {token_id} ({args.name}) created; it is not shown again", file=sys.stderr)
        elif args.action == "list":
            for row in tokens.list_tokens_thd(conn):
                state = "revoked" if row["revoked"] else "active"
                print(f"{row['id']}\t{row['name']}\t{row['created_at']:%Y-%m-%dT%H:%M:%SZ}\t{state}")
        elif args.action == "revoke":
            if not tokens.revoke_token_thd(conn, args.id):
                print(f"csms-admin: no token {args.id}", file=sys.stderr)
                return 1
            print(f"token {args.id} revoked", file=sys.stderr)
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
