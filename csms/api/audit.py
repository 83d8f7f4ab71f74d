"""The audit trail: who changed what through the operator API, and how it ended.

Every request that may change something (any method but GET and HEAD) from an authenticated caller is
recorded once answered: the token's name (never the token), the method, the route as declared (its
template, so that a search by route finds every station's), the path, the station it concerns, the HTTP
status and the error code, if any. Requests refused before a caller is known (401) are not recorded: they
carry no name, and anyone can send them.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, DateTime, Index, String, Table, func, insert, select

from csms.db import BIG_KEY
from csms.stations import as_utc, metadata

audit_log = Table(
    "csms_audit", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("token_name", String(100), nullable=False),
    Column("token_id", BigInteger),
    Column("scope", String(16), nullable=False),
    Column("method", String(8), nullable=False),
    Column("route", String(255), nullable=False),
    Column("path", String(2048), nullable=False),
    Column("station_id", String(255)),
    Column("status", BigInteger, nullable=False),
    # "ok" for a 2xx answer, else the error body's code (not_found, station_offline, ...).
    Column("outcome", String(64), nullable=False),
    Column("remote_address", String(64)),
    Index("csms_audit_at", "at"),
    Index("csms_audit_station", "station_id", "at"),
    Index("csms_audit_token", "token_name", "at"),
)

#: Methods that only read: not recorded.
READ_METHODS = ("GET", "HEAD")


def record_thd(conn, entry: dict) -> None:
    conn.execute(insert(audit_log).values(**entry))


def list_thd(conn, limit: int, offset: int, token_name: str | None = None, station_id: str | None = None,
             method: str | None = None, route: str | None = None, status: int | None = None,
             outcome: str | None = None, since: datetime | None = None, until: datetime | None = None):
    """(total, entries newest first) matching every filter given; ``since`` inclusive, ``until`` exclusive."""
    query = select(audit_log)
    for column, value in ((audit_log.c.token_name, token_name), (audit_log.c.station_id, station_id),
                          (audit_log.c.method, method), (audit_log.c.route, route),
                          (audit_log.c.status, status), (audit_log.c.outcome, outcome)):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(audit_log.c.at >= since)
    if until is not None:
        query = query.where(audit_log.c.at < until)
    total = conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
    rows = conn.execute(query.order_by(audit_log.c.id.desc()).limit(limit).offset(offset)).fetchall()
    return total, [{**dict(row._mapping), "at": as_utc(row.at)} for row in rows]


def outcome_of(status: int, body) -> str:
    if 200 <= status < 300:
        return "ok"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("code", "error"))[:64]
    return "error"


def add_routes(app, router):
    from csms.api.resource import paginated
    from csms.api.router import PAGINATION, Query
    from csms.api.types import columns, page

    async def list_audit(request):
        limit, offset = request.page()
        q = request.query
        total, items = await app.db.run(
            list_thd, limit, offset, token_name=q.get("token_name"), station_id=q.get("station_id"),
            method=q.get("method"), route=q.get("route"), status=q.get("status"), outcome=q.get("outcome"),
            since=q.get("since"), until=q.get("until"), desc="api_audit_list")
        return paginated(items, total, limit, offset)

    router.add("GET", "/audit", list_audit, "The audit trail: every change request an operator token made, newest "
               "first", tags=("audit",), scope="admin",
               query=PAGINATION + (Query("token_name", description="The token's name"), Query("station_id"),
                                   Query("method", enum=("POST", "PUT", "PATCH", "DELETE")),
                                   Query("route", description="A route template, e.g. /stations/{station_id}/reset"),
                                   Query("status", "integer", "HTTP status answered", minimum=100, maximum=599),
                                   Query("outcome", description="ok, or the error code answered"),
                                   Query("since", "date-time", "At or after"),
                                   Query("until", "date-time", "Before")),
               response=page(columns(audit_log, *[c.name for c in audit_log.columns]), title="AuditPage"),
               responses={"200": "OK"})
