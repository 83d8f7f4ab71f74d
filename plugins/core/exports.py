"""Exports of transactions and meter values, as CSV or JSON lines, streamed whatever their size.

Rows are read in pages by ascending id (each page one short query on the pool, never one long
transaction holding the database) and written as they come, at the pace the client reads them. A row
added while an export runs is included if its id is above the page being read. The filters are those
of ``GET /transactions`` (and, for meter values, a transaction id and a time range on the sample).

CSV cells that a spreadsheet would run as a formula (text starting with ``=``, ``+``, ``-``, ``@``, tab
or carriage return, and not a number) get a leading ``'``: id tags and values come from stations.
"""
from __future__ import annotations

import csv
import io
from datetime import datetime

import orjson
from sqlalchemy import select

from csms.api.resource import Response
from csms.api.router import Query
from csms.ocpp16 import format_datetime
from csms.stations import as_utc

from .store import energy_wh, select_transactions
from .tables import meter_values, transactions

PAGE_SIZE = 2000
FORMATS = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}

TRANSACTION_COLUMNS = ("transaction_id", "station_id", "connector_id", "id_tag", "id_tag_status", "parent_id_tag",
                       "reservation_id", "started_at", "stopped_at", "duration_seconds", "meter_start", "meter_stop",
                       "energy_wh", "stop_reason", "stop_id_tag", "stopped_by")
METER_VALUE_COLUMNS = ("id", "station_id", "connector_id", "transaction_id", "timestamp", "measurand", "phase",
                       "value", "unit", "context", "location", "format")

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return format_datetime(value)
    text = str(value)
    if isinstance(value, str) and text.startswith(_FORMULA_START) and not _number(text):
        return "'" + text
    return text


def _transaction_row(row) -> dict:
    started, stopped = as_utc(row.started_at), as_utc(row.stopped_at)
    return {
        "transaction_id": row.id, "station_id": row.station_id, "connector_id": row.connector_id,
        "id_tag": row.id_tag, "id_tag_status": row.id_tag_status, "parent_id_tag": row.parent_id_tag,
        "reservation_id": row.reservation_id, "started_at": started, "stopped_at": stopped,
        "duration_seconds": None if stopped is None else round((stopped - started).total_seconds(), 3),
        "meter_start": row.meter_start, "meter_stop": row.meter_stop,
        "energy_wh": energy_wh(row.meter_start, row.meter_stop),
        "stop_reason": row.stop_reason, "stop_id_tag": row.stop_id_tag, "stopped_by": row.stopped_by,
    }


def _meter_value_row(row) -> dict:
    data = {column: getattr(row, column) for column in METER_VALUE_COLUMNS}
    data["timestamp"] = as_utc(data["timestamp"])
    return data


def transactions_query(station_id=None, id_tag=None, active=None, since=None, until=None):
    return select_transactions(station_id, id_tag, active, since, until), transactions.c.id, "transaction_id", \
        _transaction_row


def meter_values_query(station_id=None, transaction_id=None, since=None, until=None):
    query = select(meter_values)
    if station_id is not None:
        query = query.where(meter_values.c.station_id == station_id)
    if transaction_id is not None:
        query = query.where(meter_values.c.transaction_id == transaction_id)
    if since is not None:
        query = query.where(meter_values.c.timestamp >= since)
    if until is not None:
        query = query.where(meter_values.c.timestamp < until)
    return query, meter_values.c.id, "id", _meter_value_row


async def pages(db, query, key, key_field: str, convert, page_size: int = PAGE_SIZE, desc: str = "core_export"):
    """Every matching row as a dict, read ``page_size`` rows at a time by ascending ``key`` (the
    column), resuming after the last row's ``key_field``."""
    after = None

    def thd(conn, after):
        page = query if after is None else query.where(key > after)
        return [convert(row) for row in conn.execute(page.order_by(key).limit(page_size)).fetchall()]

    while True:
        rows = await db.run(thd, after, desc=desc)
        for row in rows:
            yield row
        if len(rows) < page_size:
            return
        after = rows[-1][key_field]


async def encode(rows, columns: tuple, fmt: str, rows_per_chunk: int = 200):
    """The rows as CSV (with a header line) or JSON lines, in chunks of about ``rows_per_chunk`` rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    if fmt == "csv":
        writer.writerow(columns)
    pending = 0
    async for row in rows:
        if fmt == "csv":
            writer.writerow([_cell(row[column]) for column in columns])
        else:
            buffer.write(orjson.dumps({column: (format_datetime(value) if isinstance(value, datetime) else value)
                                       for column, value in row.items()}).decode())
            buffer.write("\n")
        pending += 1
        if pending >= rows_per_chunk:
            yield buffer.getvalue().encode("utf-8")
            buffer.seek(0)
            buffer.truncate()
            pending = 0
    yield buffer.getvalue().encode("utf-8")


def add_routes(app, router, filters: tuple):
    fmt = Query("format", description="csv (default) or jsonl (one JSON object per line)", enum=tuple(FORMATS))

    def streamed(name: str, query_parts, columns, request):
        chosen = request.query.get("format", "csv")
        rows = pages(app.db, *query_parts, desc=f"core_export_{name}")
        stamp = app.now().strftime("%Y%m%dT%H%M%SZ")
        return Response(200, content_type=FORMATS[chosen], stream=encode(rows, columns, chosen), headers={
            "Content-Disposition": f'attachment; filename="{name}-{stamp}.{chosen}"'})

    async def export_transactions(request):
        q = request.query
        return streamed("transactions", transactions_query(
            station_id=q.get("station_id"), id_tag=q.get("id_tag"), active=q.get("active"), since=q.get("since"),
            until=q.get("until")), TRANSACTION_COLUMNS, request)

    async def export_meter_values(request):
        q = request.query
        return streamed("meter-values", meter_values_query(
            station_id=q.get("station_id"), transaction_id=q.get("transaction_id"), since=q.get("since"),
            until=q.get("until")), METER_VALUE_COLUMNS, request)

    tags = ("transactions",)
    router.add("GET", "/exports/transactions", export_transactions,
               "Every transaction matching the filters of GET /transactions, oldest first, as CSV or JSON lines "
               "(streamed: any number of rows)", tags=tags, query=(fmt,) + filters,
               response_type=tuple(kind.split(";")[0] for kind in FORMATS.values()),
               responses={"200": "The export"})
    router.add("GET", "/exports/meter-values", export_meter_values,
               "Every meter value sample matching the filters, oldest first, as CSV or JSON lines (streamed)",
               tags=tags, query=(fmt, Query("station_id"),
                                 Query("transaction_id", "integer", "Samples of this transaction", minimum=1),
                                 Query("since", "date-time", "Sampled at or after"),
                                 Query("until", "date-time", "Sampled before")),
               response_type=tuple(kind.split(";")[0] for kind in FORMATS.values()),
               responses={"200": "The export"})
