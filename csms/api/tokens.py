"""Bearer tokens for the operator API: random, shown once, stored only as a SHA-256 digest.

Tokens are 32 random bytes, so a plain digest is enough (no KDF needed). They are compared in
constant time and never logged.

Each token has a name (what the audit trail records: never the token) and a scope: ``read`` (GET
only), ``commands`` (also the routes that send a station a command) or ``admin`` (everything).
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timezone

from dataclasses import dataclass

from sqlalchemy import Boolean, Column, DateTime, Integer, String, Table, insert, select, update

from csms.stations import as_utc, metadata

api_tokens = Table(
    "csms_api_tokens", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(100), nullable=False),
    Column("token_sha256", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("scope", String(16), nullable=False, default="admin", server_default="admin"),
)

TOKEN_PREFIX = "csms_"
#: Scopes from the least to the most a token may do; each includes the ones before it.
SCOPES = ("read", "commands", "admin")


def scope_allows(held: str, needed: str) -> bool:
    return SCOPES.index(held) >= SCOPES.index(needed)


@dataclass(frozen=True)
class Caller:
    """Who made an API request: the token's name and scope (``token_id`` None for a configured token)."""

    name: str
    scope: str
    token_id: int | None = None


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def configured_caller(token: str, configured: list[str]) -> Caller | None:
    """The caller a configured token (``[api] tokens``, scope admin) stands for, named by its position
    in that list; compared in constant time against every one (no early exit)."""
    presented = digest(token).encode()
    found = None
    for position, candidate in enumerate(configured, start=1):
        if hmac.compare_digest(presented, digest(candidate).encode()) and found is None:
            found = Caller(f"[api] tokens #{position}", "admin")
    return found


def create_token_thd(conn, name: str, scope: str = "admin") -> tuple[int, str]:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    token = new_token()
    result = conn.execute(insert(api_tokens).values(
        name=name, token_sha256=digest(token), created_at=datetime.now(timezone.utc), revoked=False,
        scope=scope))
    return result.inserted_primary_key[0], token


def caller_thd(conn, token: str) -> Caller | None:
    """The caller a stored, unrevoked token stands for, or None."""
    wanted = digest(token)
    row = conn.execute(select(api_tokens.c.token_sha256, api_tokens.c.id, api_tokens.c.name, api_tokens.c.scope)
                       .where(api_tokens.c.token_sha256 == wanted, api_tokens.c.revoked.is_(False))).first()
    if row is None or not hmac.compare_digest(row.token_sha256.encode(), wanted.encode()):
        return None
    return Caller(row.name, row.scope if row.scope in SCOPES else "read", row.id)


def list_tokens_thd(conn) -> list[dict]:
    rows = conn.execute(select(api_tokens.c.id, api_tokens.c.name, api_tokens.c.scope, api_tokens.c.created_at,
                               api_tokens.c.revoked).order_by(api_tokens.c.id)).fetchall()
    return [{**dict(r._mapping), "created_at": as_utc(r.created_at)} for r in rows]


def revoke_token_thd(conn, token_id: int) -> bool:
    return conn.execute(update(api_tokens).where(api_tokens.c.id == token_id).values(revoked=True)).rowcount > 0
