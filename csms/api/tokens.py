"""Bearer tokens for the operator API: random, shown once, stored only as a SHA-256 digest.

Tokens are 32 random bytes, so a plain digest is enough (no KDF needed). They are compared in
constant time and never logged.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timezone

from sqlalchemy import Boolean, Column, DateTime, Integer, String, Table, insert, select, update

from csms.stations import as_utc, metadata

api_tokens = Table(
    "csms_api_tokens", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(100), nullable=False),
    Column("token_sha256", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
)

TOKEN_PREFIX = "csms_"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def matches_any(token: str, configured: list[str]) -> bool:
    """Constant-time check of ``token`` against every configured token (no early exit)."""
    presented = digest(token).encode()
    found = False
    for candidate in configured:
        found |= hmac.compare_digest(presented, digest(candidate).encode())
    return found


def create_token_thd(conn, name: str) -> tuple[int, str]:
    token = new_token()
    result = conn.execute(insert(api_tokens).values(
        name=name, token_sha256=digest(token), created_at=datetime.now(timezone.utc), revoked=False))
    return result.inserted_primary_key[0], token


def token_known_thd(conn, token: str) -> bool:
    wanted = digest(token)
    row = conn.execute(select(api_tokens.c.token_sha256).where(
        api_tokens.c.token_sha256 == wanted, api_tokens.c.revoked.is_(False))).first()
    return row is not None and hmac.compare_digest(row[0].encode(), wanted.encode())


def list_tokens_thd(conn) -> list[dict]:
    rows = conn.execute(select(api_tokens.c.id, api_tokens.c.name, api_tokens.c.created_at,
                               api_tokens.c.revoked).order_by(api_tokens.c.id)).fetchall()
    return [{**dict(r._mapping), "created_at": as_utc(r.created_at)} for r in rows]


def revoke_token_thd(conn, token_id: int) -> bool:
    return conn.execute(update(api_tokens).where(api_tokens.c.id == token_id).values(revoked=True)).rowcount > 0
