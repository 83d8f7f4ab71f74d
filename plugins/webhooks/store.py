"""The webhooks plugin's store: the outbox writer, claiming of due deliveries, subscriptions."""
from __future__ import annotations

import base64
import os
import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone

import orjson
from twisted.internet import defer
from twisted.logger import Logger
from sqlalchemy import (BigInteger, String, all_, and_, any_, bindparam, cast, delete, exists, func, insert, literal,
                        literal_column, select, update)
from sqlalchemy.dialects.postgresql import ARRAY

from csms.ocpp16 import format_datetime
from csms.outbox import load_stored_rows
from csms.stations import as_utc

from .tables import deliveries, events, delivery_state, outbox, row_sources, subscriptions

log = Logger(namespace="csms.webhooks")

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
STATES = (PENDING, DELIVERED, DEAD)
#: ``state = 'pending'`` as a literal, which lets the planners use the partial index of pending deliveries
#: (a bound parameter could be any state, so neither SQLite nor a generic PostgreSQL plan could).
IS_PENDING = deliveries.c.state == literal_column(f"'{PENDING}'")
#: In a subscription's event_types: every event type except the opt-in ones.
ALL_TYPES = "*"
#: The event type sent in batches (opt-in), and the type of its batches.
METER_VALUES = "meter_values.received"
METER_VALUES_BATCH = "meter_values.batch"
#: uuid5 namespace of batch ids: the same events in the same batch get the same id.
BATCH_NAMESPACE = uuid.UUID("6f1d3f0c-5b7e-4d55-9a8e-0f5c2f3b9e41")
#: uuid5 namespace of the ids of events read from stored rows: "<table>:<key of the event's first row>".
ROWS_NAMESPACE = uuid.UUID("0b6c9a52-7d0e-4f5e-8a3b-2c41d7e9f183")
DELIVERY_COLUMNS = ("subscription_id", "event_id", "event_type", "state", "attempts", "created_at",
                    "next_attempt_at")
EVENT_COLUMNS = ("event_id", "body", "created_at")
OUTBOX_COLUMNS = ("event_id", "event_type", "subscribers", "body", "created_at")
#: A stored event body (``webhooks_events.body``) this long or longer is kept compressed: zlib (level 1,
#: about 0.2 ms for a batch of 100 meter values, a tenth of its size, a seventh as base64), as base64 text after
#: COMPRESSED, the same on SQLite and PostgreSQL. Batches of meter values are, for as long as the
#: delivery history keeps them (a week of them at 1,000 events/s is tens of GB as JSON). A body as JSON
#: starts with "{", never with COMPRESSED. (Migrations webhooks_0005, webhooks_delivery_0003.)
COMPRESS_FROM = 2048
COMPRESSED = "z1:"
#: The longest error text kept for a delivery attempt.
MAX_ERROR_LENGTH = 500
#: Seconds (on the store's clock) between two deletions of moved rows from the outbox (split layout):
#: each is a write of the main file, whose lock the OCPP transactions wait for meanwhile.
PRUNE_INTERVAL = 10.0

#: Rows the purge of the history deletes per statement, and at most per sweep (more left: the next
#: sweep, a minute later, goes on), so that no transaction of it grows with the history's size.
PURGE_CHUNK = 2000
PURGE_MAX = 50_000


def _ids(name: str, dialect: str, of=BigInteger):
    """A list of ids as ONE parameter: a PostgreSQL array, or a JSON array SQLite's json_each reads. An
    expanding IN renders a placeholder per id into the SQL at every execution (hundreds of ids: the
    claimed deliveries), which cost the deliverer more CPU than the statement itself."""
    if dialect == "postgresql":
        return bindparam(name, type_=ARRAY(of))
    return select(func.json_each(bindparam(name, type_=String)).table_valued("value").c.value).scalar_subquery()


def _in(column, name: str, dialect: str, of=BigInteger):
    ids = _ids(name, dialect, of)
    return column == any_(ids) if dialect == "postgresql" else column.in_(ids)


def _not_in(column, name: str, dialect: str):
    return column != all_(_ids(name, dialect)) if dialect == "postgresql" else column.not_in(_ids(name, dialect))


def _due(dialect: str):
    return (select(deliveries.c.id, deliveries.c.subscription_id, deliveries.c.event_id, deliveries.c.event_type,
                   events.c.body, deliveries.c.attempts, deliveries.c.created_at)
            .join(subscriptions, subscriptions.c.id == deliveries.c.subscription_id)
            .join(events, events.c.event_id == deliveries.c.event_id)
            .where(IS_PENDING, deliveries.c.next_attempt_at <= bindparam("now"),
                   subscriptions.c.paused.is_(False), _not_in(deliveries.c.id, "busy", dialect),
                   _not_in(deliveries.c.subscription_id, "skip", dialect))
            .order_by(deliveries.c.next_attempt_at, deliveries.c.id).limit(bindparam("limit")))


# One statement for every delivery of a POST (a batch of meter values shares one outcome): the sqlite3
# driver lets go of the GIL at every statement, which costs the reactor thread far more than the update.
def _outcome(dialect: str):
    return update(deliveries).where(_in(deliveries.c.id, "deliveries", dialect)).values(
        state=bindparam("b_state"), attempts=deliveries.c.attempts + 1, next_attempt_at=bindparam("b_next"),
        last_attempt_at=bindparam("b_at"), last_status_code=bindparam("b_code"), last_error=bindparam("b_error"),
        finished_at=bindparam("b_finished"))


#: dialect name -> (due, outcome), built once each.
_STATEMENTS: dict[str, tuple] = {}


def _statements(dialect: str) -> tuple:
    built = _STATEMENTS.get(dialect)
    if built is None:
        built = _STATEMENTS[dialect] = (_due(dialect), _outcome(dialect))
    return built


def _id_values(ids, dialect: str, of=int):
    """``ids`` as the value of an :func:`_ids` parameter."""
    ids = [of(i) for i in ids]
    return ids if dialect == "postgresql" else orjson.dumps(ids).decode()


#: An outbox row names a subscription: ",1,4," has ",4," in it (subscribers is "1,4").
_NAMES_SUBSCRIPTION = (literal(",") + outbox.c.subscribers + literal(",")).like(
    literal("%,") + cast(subscriptions.c.id, String) + literal(",%"))
#: The seq of the last outbox row a fan-out of ``limit`` rows takes.
_FAN_OUT_LAST = select(func.max(literal_column("seq"))).select_from(
    select(outbox.c.seq).order_by(outbox.c.seq).limit(bindparam("limit")).subquery())

def _move_mark(conn, event_type: str, key: int) -> None:
    conn.execute(update(row_sources).where(row_sources.c.event_type == event_type).values(mark=key))


def wants(event_types: list, event_type: str, opt_in: bool) -> bool:
    """Whether a subscription's ``event_types`` name ``event_type`` (``"*"``: every type not opt-in)."""
    return event_type in event_types or (not opt_in and ALL_TYPES in event_types)


@dataclass(frozen=True)
class _OutboxLike:
    """An event read from stored rows, as :func:`_move_in_batches` takes an outbox row."""

    event_id: str
    subscribers: str
    body: str
    created_at: datetime


#: Deliveries with their event's body (the delivery history).
_HISTORY = select(deliveries, events.c.body).join(events, events.c.event_id == deliveries.c.event_id)


#: ``state <> 'pending'`` as a literal, which lets the planners use the partial index of finished ones.
NOT_PENDING = deliveries.c.state != literal_column(f"'{PENDING}'")


class _Purge:
    """The purge's statements for one dialect, built once. Each reads only what it deletes, through an
    index (webhooks_0005): a scan of every delivery, as the purge made before, reads days of history
    (millions of rows) every hour."""

    def __init__(self, dialect: str):
        self.dialect = dialect
        #: Up to ``chunk`` finished deliveries that ended before ``before``, oldest first; their event ids.
        self.finished = delete(deliveries).where(deliveries.c.id.in_(
            select(deliveries.c.id).where(NOT_PENDING, deliveries.c.finished_at < bindparam("before"))
            .order_by(deliveries.c.finished_at).limit(bindparam("chunk")))).returning(deliveries.c.event_id)
        #: Up to ``chunk`` deliveries of ``subscription``; their event ids.
        self.of_subscription = delete(deliveries).where(deliveries.c.id.in_(
            select(deliveries.c.id).where(deliveries.c.subscription_id == bindparam("subscription"))
            .limit(bindparam("chunk")))).returning(deliveries.c.event_id)
        #: The smallest subscription id deliveries name above ``after``: one index seek.
        self.next_subscription = select(func.min(deliveries.c.subscription_id)).where(
            deliveries.c.subscription_id > bindparam("after"))
        #: Of the events ``ids``, those no delivery names any more.
        self.orphans = delete(events).where(_in(events.c.event_id, "ids", dialect, of=String),
                                            ~exists().where(deliveries.c.event_id == events.c.event_id))

    def run(self, conn, statement, params: dict, budget: int) -> tuple[int, bool]:
        """Delete deliveries with ``statement`` a chunk at a time, and the events left without any, until
        a chunk comes back short or ``budget`` rows went: (how many, whether some may be left)."""
        deleted = 0
        while deleted < budget:
            chunk = min(PURGE_CHUNK, budget - deleted)
            event_ids = conn.execute(statement, {**params, "chunk": chunk}).scalars().all()
            deleted += len(event_ids)
            if event_ids:
                conn.execute(self.orphans, {"ids": _id_values(sorted(set(event_ids)), self.dialect, of=str)})
            if len(event_ids) < chunk:
                return deleted, False
        return deleted, True


_PURGES = {dialect: _Purge(dialect) for dialect in ("sqlite", "postgresql")}


#: Names in ``webhooks_delivery_state`` (the delivery file) and the main file's name there.
OUTBOX_SEQ, LEGACY_MOVED, MAIN = "outbox_seq", "legacy_moved", "csms"
_MARK = select(delivery_state.c.value).where(delivery_state.c.name == OUTBOX_SEQ)
#: The seq of the last outbox row after the mark a fan-out of ``limit`` rows takes.
_FAN_OUT_LAST_AFTER = select(func.max(literal_column("seq"))).select_from(
    select(outbox.c.seq).where(outbox.c.seq > bindparam("mark")).order_by(outbox.c.seq)
    .limit(bindparam("limit")).subquery())


_TOP = select(func.max(outbox.c.seq))
#: Whether an outbox row lies after the mark, or at all.
_AFTER_MARK = select(outbox.c.seq).where(outbox.c.seq > bindparam("mark")).limit(1)
_ANY_ROW = select(outbox.c.seq).limit(1)
#: PostgreSQL: the seqs of the rows a fan-out of ``limit`` rows takes (see WebhookStore.fan_out).
_LOCKED_SEQS = select(outbox.c.seq).order_by(outbox.c.seq).limit(bindparam("limit")).with_for_update(skip_locked=True)
_SUBSCRIPTION_IDS = select(subscriptions.c.id)
#: Where the subscriptions ``ids`` are sent, and their secrets.
_TARGETS = select(subscriptions.c.id, subscriptions.c.url, subscriptions.c.secret).where(
    subscriptions.c.id.in_(bindparam("ids", expanding=True)))


def _replaced(conn, mark: int) -> bool:
    """Whether the outbox has rows and all lie below ``mark`` (its last row is never deleted)."""
    top = conn.execute(_TOP).scalar()
    return top is not None and top < mark


class _Move:
    """The statements moving outbox rows into events and deliveries, for one way of choosing the rows
    (``kind``), each built once: a statement built anew at every pass cost the deliverer more CPU in
    SQLAlchemy (its cache key, computed each time) than the database took to run it.

    ``split``: the rows after ``mark`` up to ``last``, into the delivery file (known events skipped:
    see WebhookStore._fan_out_split); ``sqlite``: the rows up to ``last``; ``postgresql``: the rows
    whose seq is in ``seqs`` (an array: the same SQL whatever their number)."""

    def __init__(self, kind: str):
        if kind == "split":
            chosen = and_(outbox.c.seq > bindparam("mark"), outbox.c.seq <= bindparam("last"))
        elif kind == "postgresql":
            chosen = outbox.c.seq == any_(bindparam("seqs", type_=ARRAY(BigInteger)))
        else:
            chosen = outbox.c.seq <= bindparam("last")
        self.skip_known_events = kind == "split"
        single = and_(chosen, outbox.c.event_type != METER_VALUES)
        statement = insert(events)
        if self.skip_known_events:
            statement = statement.prefix_with("OR IGNORE", dialect="sqlite")
        self.events = statement.from_select(
            list(EVENT_COLUMNS), select(outbox.c.event_id, outbox.c.body, outbox.c.created_at)
            .where(single, exists().where(_NAMES_SUBSCRIPTION)))
        self.deliveries = insert(deliveries).from_select(
            list(DELIVERY_COLUMNS), select(subscriptions.c.id, outbox.c.event_id, outbox.c.event_type,
                                           literal(PENDING), literal(0), outbox.c.created_at, outbox.c.created_at)
            .select_from(outbox.join(subscriptions, _NAMES_SUBSCRIPTION)).where(single))
        self.meter_values = select(outbox.c.event_id, outbox.c.subscribers, outbox.c.body, outbox.c.created_at) \
            .where(chosen, outbox.c.event_type == METER_VALUES).order_by(outbox.c.seq)
        self.count = select(func.count()).select_from(outbox).where(chosen)
        self.delete = delete(outbox).where(chosen)

    def move_in(self, db, conn, chosen: dict, batch_size: int) -> None:
        """The rows ``chosen`` (the statements' parameters) into ``webhooks_events``, with a pending
        delivery per subscription each names that still exists: events of most types in SQL statements
        only, the rows never coming up into Python; meter values in batches (:func:`_move_in_batches`)."""
        conn.execute(self.events, chosen)
        conn.execute(self.deliveries, chosen)
        meter_values = conn.execute(self.meter_values, chosen).all()
        if meter_values:
            _move_in_batches(db, conn, meter_values, batch_size, self.skip_known_events)


_MOVES = {kind: _Move(kind) for kind in ("split", "sqlite", "postgresql")}


def _move_in_batches(db, conn, rows, batch_size: int, skip_known_events: bool) -> None:
    """Meter values events (outbox ``rows``, in order) as batch events (``meter_values.batch``, see
    :func:`batch_body`): each subscription's events, in order, in batches of up to ``batch_size``, each
    batch a delivery. A batch is one row to write, claim and settle, not one per event and subscription
    (at 1,000 meter values a second, those rows were most of the deliverer's work); the subscriptions
    that want the same events (as they do but while subscriptions change) share its stored body. A batch
    is made once, here, so its id and its events stay the same through every retry."""
    existing = set(conn.execute(_SUBSCRIPTION_IDS).scalars())
    wanted: dict[int, list] = {}
    for row in rows:
        for part in row.subscribers.split(","):
            if part and int(part) in existing:
                wanted.setdefault(int(part), []).append(row)
    made: dict[str, tuple] = {}
    batch_deliveries = []
    for subscription_id, events_wanted in wanted.items():
        for start in range(0, len(events_wanted), batch_size):
            chunk = events_wanted[start:start + batch_size]
            batch_id = batch_event_id([row.event_id for row in chunk])
            if batch_id not in made:
                created_at = min(as_utc(row.created_at) for row in chunk)
                body = pack_body(batch_body(batch_id, created_at, [row.body for row in chunk]))
                made[batch_id] = (batch_id, body, created_at)
            created_at = made[batch_id][2]
            batch_deliveries.append((subscription_id, batch_id, METER_VALUES_BATCH, PENDING, 0, created_at, created_at))
    db.insert_many(conn, events, EVENT_COLUMNS, list(made.values()), skip_duplicates=skip_known_events)
    db.insert_many(conn, deliveries, DELIVERY_COLUMNS, batch_deliveries)


def batch_event_id(event_ids: list[str]) -> str:
    """A batch's id, from its events' ids: the same events in the same order make the same id."""
    return str(uuid.uuid5(BATCH_NAMESPACE, ",".join(event_ids)))


def batch_body(batch_id: str, created_at: datetime, bodies: list[str]) -> str:
    """The JSON a batch of meter values events is delivered as: ``{"id", "type": "meter_values.batch",
    "created_at" (its oldest event's), "data": {"events": [<event>, ...]}}``, the events spliced in as
    stored (no re-encoding)."""
    head = orjson.dumps({"id": batch_id, "type": METER_VALUES_BATCH, "created_at": format_datetime(created_at)})
    return head[:-1].decode() + ',"data":{"events":[' + ",".join(bodies) + "]}}"


def pack_body(body: str) -> str:
    """``body`` as stored: compressed from COMPRESS_FROM characters on, else as it is."""
    if len(body) < COMPRESS_FROM:
        return body
    return COMPRESSED + base64.b64encode(zlib.compress(body.encode(), 1)).decode("ascii")


def unpack_body(stored: str) -> str:
    """A stored body as the JSON it is delivered as (see :func:`pack_body`)."""
    if stored.startswith(COMPRESSED):
        return zlib.decompress(base64.b64decode(stored[len(COMPRESSED):])).decode()
    return stored


def time_ordered_uuid(now_ms: int) -> str:
    """A version 7 UUID (RFC 9562): 48 bits of Unix milliseconds, then random bits. Ids written one after
    another sort one after another, so the event table's key and the deliveries' event index grow at
    their end (a few pages per transaction) instead of at random places (a page per event), which is
    what the OCPP transactions writing them pay for. (Python 3.14's uuid.uuid7 makes the same.)"""
    value = (now_ms & ((1 << 48) - 1)) << 80 | int.from_bytes(os.urandom(10), "big") & ((1 << 80) - 1)
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # variant 10
    digits = f"{value:032x}"  # (uuid.UUID's constructor and str() took most of the time of an event's write)
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def event_body(event_id: str, event_type: str, created_at: datetime, data_json: str) -> str:
    """The JSON an event is delivered as; ``data_json`` is spliced in as stored (no re-encoding)."""
    head = orjson.dumps({"id": event_id, "type": event_type, "created_at": format_datetime(created_at)}).decode()
    return head[:-1] + ',"data":' + data_json + "}"


def subscription_dict(row) -> dict:
    data = dict(row._mapping)
    data.pop("secret", None)
    data.pop("derived_from", None)
    data["event_types"] = orjson.loads(data["event_types"])
    for key in ("created_at", "updated_at"):
        data[key] = as_utc(data[key])
    return data


def delivery_dict(row) -> dict:
    data = dict(row._mapping)
    data["event"] = orjson.loads(unpack_body(data.pop("body")))
    for key in ("created_at", "next_attempt_at", "last_attempt_at", "finished_at"):
        data[key] = as_utc(data[key])
    if data["state"] != PENDING:
        data["next_attempt_at"] = None
    return data


class WebhookStore:
    """The webhooks plugin's database work. ``db`` is the main database (subscriptions, the outbox);
    ``delivery_db``, when given, a database of its own for the events and deliveries (SQLite: see
    delivery_db.py), which attaches ``db`` read only; without it they live in ``db`` too."""

    def __init__(self, db, clock, delivery_db=None):
        self.db = db
        self.clock = clock
        #: Where the events and deliveries are: the delivery file's Database, or the main one.
        self.delivery_db = delivery_db if delivery_db is not None else db
        self.split = delivery_db is not None
        #: Split layout: the outbox seq moved in up to (as last committed here), the one up to which the
        #: outbox was last pruned, and when (the store's clock).
        self._moved_to = None
        self._pruned_to = 0
        self._pruned_at = None
        self._legacy_checked = False
        #: Whether the last purge (expire) stopped at PURGE_MAX with more to delete.
        self.purge_unfinished = False
        #: event type -> ids of the subscriptions wanting it. Replaced whole on the reactor thread when
        #: subscriptions change, read by the database threads writing events.
        self.subscribers: dict[str, tuple] = {}
        #: The CSMS's: event type -> (StoredRows, opt_in), the types whose events can be read from stored
        #: rows (csms.outbox.StoredRows). Read so only in the split layout, once the CSMS has named them in
        #: ``webhooks_row_sources`` (:meth:`read_rows_from_now`), where any deliverer finds them; written
        #: as outbox rows everywhere else.
        self.derived: dict[str, tuple] = {}
        #: The StoredRows loaded by path, and the paths that could not be (said once).
        self._sources: dict[str, object] = {}
        self._unloadable: set[str] = set()

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), tz=timezone.utc)

    # -- the outbox writer (runs inside other stores' thd functions) --------------------------------

    def write_event(self, conn, event_type: str, data: dict) -> None:
        """``app.outbox``'s writer: one ``webhooks_outbox`` row naming the subscriptions that want the event,
        held and written with the other rows of its transaction (multi-row INSERTs per group commit)."""
        wanting = self.subscribers.get(event_type)
        if not wanting:
            return
        now = self.now()
        event_id = time_ordered_uuid(int(self.clock.seconds() * 1000))
        body = event_body(event_id, event_type, now,
                          orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS).decode())
        self.db.insert_many(conn, outbox, OUTBOX_COLUMNS,
                            [(event_id, event_type, ",".join(map(str, wanting)), body, now)])

    # -- the dispatcher's work ------------------------------------------------------------------

    def fan_out(self, limit: int, outcomes: list[tuple] = (), batch_size: int = 100):
        """Move up to ``limit`` events from the outbox, oldest first: each into ``webhooks_events`` with a
        pending delivery per subscription it names that still exists (meter values: in batches of up to
        ``batch_size`` events, each a delivery), in one transaction that deletes them from the outbox
        (rerun whole, or not at all). Fires with how many were moved.

        ``outcomes`` (as :meth:`record_outcomes` takes them) are written in the same transaction, first:
        a delivery pass commits once, and the pages the new deliveries go to (the ends of the table and
        its indexes) are the ones the outcomes of the last pass's deliveries change, written once.

        In SQL statements, but for the meter values batched: on SQLite this transaction holds the
        database's one write lock, which the OCPP writer of the CSMS waits for meanwhile. (Unless the
        deliveries have a file of their own, as an SQLite file's do: :meth:`_fan_out_split`.)"""
        record = self._outcome_writer(outcomes)
        if self.split:
            return self._fan_out_split(limit, record, batch_size)

        def thd(conn):
            record(conn)
            if self.db.is_sqlite:
                # One writer at a time, and a row's seq is given when it is written: the rows up to the
                # limit's are exactly those committed, and no other can come in below it meanwhile.
                last = conn.execute(_FAN_OUT_LAST, {"limit": limit}).scalar()
                if last is None:
                    return 0
                move, chosen = _MOVES["sqlite"], {"last": last}
            else:
                # PostgreSQL hands out seqs at INSERT and commits in any order: exactly the rows read
                # (and locked: a second deliverer, in a lock hand-over, skips them).
                seqs = list(conn.execute(_LOCKED_SEQS, {"limit": limit}).scalars())
                if not seqs:
                    return 0
                move, chosen = _MOVES["postgresql"], {"seqs": seqs}
            move.move_in(self.delivery_db, conn, chosen, batch_size)
            return conn.execute(move.delete, chosen).rowcount

        def anything(conn):
            return conn.execute(_ANY_ROW).first() is not None
        if outcomes:
            return self.db.run(thd, desc="webhooks_fan_out")
        # A look first, beside the writer: an idle pass takes no write lock (on SQLite, the file's).
        return self.db.read(anything, desc="webhooks_outbox_waiting").addCallback(
            lambda waiting: self.db.run(thd, desc="webhooks_fan_out") if waiting else 0)

    def _fan_out_split(self, limit: int, record, batch_size: int):
        """:meth:`fan_out` into the delivery file: the outbox rows after its mark, up to ``limit``, become
        events and deliveries there, and the mark moves past them, in one transaction of that file's (the
        main file, attached read only, is only read). The main file's write lock is taken only by the
        deletion of moved rows, every PRUNE_INTERVAL seconds at most (:meth:`prune_outbox`).

        SQLite has one writer at a time and gives a row its seq when writing it, so every row up to the
        last one a read sees has been committed: the mark never passes a row still to come. The outbox's
        last row is never deleted, so that the next seq is always above it (SQLite gives the largest + 1)."""
        def look(conn):
            mark = conn.execute(_MARK).scalar() or 0
            after = conn.execute(_AFTER_MARK, {"mark": mark}).first()
            return after is not None or _replaced(conn, mark) or self._rows_waiting(conn)

        def thd(conn):
            record(conn)
            mark = replaced = conn.execute(_MARK).scalar() or 0
            if _replaced(conn, mark):
                # Every row lies below the mark: the main file is not the one this file was moving from
                # (restored from a backup, made anew). Its rows are all new here; any already moved is
                # moved again (its event is kept once), as at-least-once delivery allows.
                mark = 0
            else:
                replaced = None
            moved = 0
            last = conn.execute(_FAN_OUT_LAST_AFTER, {"mark": mark, "limit": limit}).scalar()
            if last is None:
                last = mark
            else:
                move, chosen = _MOVES["split"], {"mark": mark, "last": last}
                move.move_in(self.delivery_db, conn, chosen, batch_size)
                moved = conn.execute(move.count, chosen).scalar_one()
                self.delivery_db.upsert(conn, delivery_state, {"name": OUTBOX_SEQ}, {"value": last})
            return last, moved + self._move_in_rows(conn, limit, batch_size), replaced

        def moved_in(result):
            self._moved_to, moved, replaced = result
            if replaced is not None:  # logged here: the function above may run more than once
                log.warn("Webhooks: the outbox's rows all lay below the delivery file's mark ({mark}): the "
                         "database was replaced; its events were moved in from the start", mark=replaced)
                self._pruned_to = 0
            return self.prune_outbox().addCallback(lambda _: moved)

        def run(waiting):
            return self.delivery_db.run(thd, desc="webhooks_fan_out").addCallback(moved_in) if waiting else 0
        d = self._move_legacy() if not self._legacy_checked else defer.succeed(None)
        if record.writes:
            return d.addCallback(lambda _: run(True))
        # A look first, beside the writer: an idle pass takes no write lock.
        return d.addCallback(lambda _: self.delivery_db.read(look, desc="webhooks_outbox_waiting")).addCallback(run)

    # -- events read from stored rows (split layout: csms.outbox.StoredRows) --------------------------

    def read_rows_from_now(self):
        """Split layout: from now on, read the events of the ``derived`` types from their stored rows,
        after the last row stored now (``webhooks_row_sources``; a type's mark is kept if it has one: the
        rows a stopped CSMS stored are still to be read), and no longer those of types no plugin here
        provides. Fires with the types; the CSMS's writer stops writing their events as outbox rows
        (WebhooksPlugin.refresh_wanted) only then, so that none falls between the two."""
        if not self.split:
            return defer.succeed(frozenset())

        def thd(conn):
            conn.execute(delete(row_sources).where(row_sources.c.event_type.not_in(list(self.derived))))
            replaced = {}
            for event_type, (source, opt_in) in self.derived.items():
                top = conn.execute(select(func.max(source.key))).scalar() or 0
                mark = conn.execute(select(row_sources.c.mark).where(row_sources.c.event_type == event_type)).scalar()
                if mark is None:
                    conn.execute(insert(row_sources).values(event_type=event_type, path=source.path, opt_in=opt_in,
                                                            mark=top))
                    continue
                if mark > top:
                    # The main file is older than this one's mark (restored from a backup, made anew): its
                    # rows were read before, from the file it was a copy of; read on from its last one,
                    # before anything is stored in it (the CSMS serves no station yet).
                    replaced[event_type] = (mark, top)
                conn.execute(update(row_sources).where(row_sources.c.event_type == event_type).values(
                    path=source.path, opt_in=opt_in, mark=min(mark, top)))
            return frozenset(self.derived), replaced

        def started(result):
            types, replaced = result
            for event_type, (mark, top) in replaced.items():
                log.warn("Webhooks: the stored rows {event_type} events are read from all lie below the delivery "
                         "file's mark ({mark}): the database was replaced; reading goes on from its last row "
                         "({top})", event_type=event_type, mark=mark, top=top)
            return types
        return self.delivery_db.run(thd, desc="webhooks_row_sources").addCallback(started)

    def _row_marks(self, conn) -> dict[str, tuple]:
        """The types read from rows: {type: (StoredRows, opt_in, key of the last row read)}."""
        marks = {}
        for row in conn.execute(select(row_sources)):
            source = self._sources.get(row.path)
            if source is None:
                try:
                    source = self._sources[row.path] = load_stored_rows(row.path)
                except Exception as exc:  # noqa: BLE001 - a plugin not installed here: said once, skipped
                    if row.path not in self._unloadable:
                        self._unloadable.add(row.path)
                        log.error("Webhooks: {event_type} events are read from stored rows by {path}, which "
                                  "cannot be loaded here ({error}): they wait until it can", event_type=row.event_type,
                                  path=row.path, error=exc)
                    continue
            marks[row.event_type] = (source, row.opt_in, row.mark)
        return marks

    def _rows_waiting(self, conn) -> bool:
        """Whether rows wait to be read for a subscription (rows nobody wants are passed over by the next
        pass that has something else to do: an idle deliverer writes nothing for them)."""
        marks = self._row_marks(conn)
        if not marks:
            return False
        named = [orjson.loads(types) for types in conn.execute(select(subscriptions.c.event_types)).scalars()]
        for event_type, (source, opt_in, mark) in marks.items():
            if any(wants(types, event_type, opt_in) for types in named) and conn.execute(
                    select(source.key).where(source.key > mark).limit(1)).first() is not None:
                return True
        return False

    def _move_in_rows(self, conn, limit: int, batch_size: int) -> int:
        """The events of the rows stored after each type's mark, up to ``limit`` rows a type: made by the
        type's ``events``, each to the subscriptions that wanted the type before its first row was stored
        (``derived_from``), in batches as the outbox's meter values are; the mark moves past the rows.
        Fires with how many events. (A main file older than a mark is found when the CSMS starts:
        :meth:`read_rows_from_now`.)"""
        marks = self._row_marks(conn)
        if not marks:
            return 0
        wanting_rows = conn.execute(select(subscriptions.c.id, subscriptions.c.event_types,
                                           subscriptions.c.derived_from)).all()
        read = 0
        now = None
        for event_type, (source, opt_in, mark) in marks.items():
            top = conn.execute(select(func.max(source.key))).scalar() or 0
            if top <= mark:
                continue
            wanting = []
            for row in wanting_rows:
                if wants(orjson.loads(row.event_types), event_type, opt_in):
                    wanting.append((row.id, orjson.loads(row.derived_from or "{}").get(event_type)))
            # Nobody to read them for, or only subscriptions that came to want the type later: past them at once.
            start = min(mark if since is None else max(mark, since) for _, since in (wanting or [(0, top)]))
            if start >= top:
                _move_mark(conn, event_type, top)
                continue
            mark = start
            rows = conn.execute(select(source.table).where(source.key > mark).order_by(source.key)
                                .limit(limit)).all()
            made = source.events(rows)
            if len(rows) == limit and len(made) > 1:
                # The last event may go on beyond the rows read: it is read whole at the next pass.
                rows = rows[:made[-1][0]]
                made = made[:-1]
            key = source.key.name
            now = now or self.now()
            stored = []
            for index, data in made:
                first = getattr(rows[index], key)
                subscribers = ",".join(str(subscription_id) for subscription_id, since in wanting
                                       if since is None or first > since)
                if subscribers:
                    event_id = str(uuid.uuid5(ROWS_NAMESPACE, f"{source.table.name}:{first}"))
                    stored.append(_OutboxLike(event_id, subscribers, event_body(
                        event_id, event_type, now, orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS).decode()), now))
            if stored:
                _move_in_batches(self.delivery_db, conn, stored, batch_size, skip_known_events=True)
            read += len(stored)
            _move_mark(conn, event_type, getattr(rows[-1], key))
        return read

    def prune_outbox(self, force: bool = False):
        """Delete the outbox rows moved into the delivery file (but its last row), if PRUNE_INTERVAL seconds
        have passed since the last time (or ``force``); fires with how many. A transaction of the main
        file's: the OCPP writer waits for it, so it is rare, and a few hundred rows of one table."""
        upto = self._moved_to
        now = self.clock.seconds()
        if upto is None or upto <= self._pruned_to or (
                not force and self._pruned_at is not None and now - self._pruned_at < PRUNE_INTERVAL):
            return defer.succeed(0)

        def thd(conn):
            return conn.execute(delete(outbox).where(
                outbox.c.seq <= upto, outbox.c.seq < select(func.max(outbox.c.seq)).scalar_subquery())).rowcount

        def pruned(count):
            self._pruned_to, self._pruned_at = upto, now
            return count
        # The moves up to ``upto`` reach the disk first (the delivery file may commit without syncing).
        return self.delivery_db.sync_to_disk().addCallback(
            lambda _: self.db.run(thd, desc="webhooks_outbox_prune")).addCallback(pruned)

    def _move_legacy(self):
        """Split layout, once per process: deliveries an older release kept in the main file's tables are
        moved into the delivery file (then deleted there; ``legacy_moved`` marks a move whose deletion is
        still to be done, should the process end in between)."""
        names = [column.name for column in deliveries.c if column.name != "id"]
        columns = ", ".join(names)

        def copy(conn):
            if conn.execute(select(delivery_state.c.value).where(delivery_state.c.name == LEGACY_MOVED)).first():
                return True  # copied before, its deletion from the main file cut short
            count = conn.exec_driver_sql(f"SELECT count(*) FROM {MAIN}.webhooks_deliveries").scalar()
            if not count:
                return False
            conn.exec_driver_sql("INSERT OR IGNORE INTO main.webhooks_events (event_id, body, created_at) "
                                 f"SELECT event_id, body, created_at FROM {MAIN}.webhooks_events")
            conn.exec_driver_sql(f"INSERT INTO main.webhooks_deliveries ({columns}) "
                                 f"SELECT {columns} FROM {MAIN}.webhooks_deliveries ORDER BY id")
            conn.execute(insert(delivery_state).values(name=LEGACY_MOVED, value=count))
            return count

        def clear(conn):
            conn.execute(delete(deliveries))
            conn.execute(delete(events))

        def checked(_):
            self._legacy_checked = True

        def moved(to_clear):
            if not to_clear:
                return None
            if to_clear is not True:
                log.info("Webhooks: {count} deliveries moved from the main database file into {path}",
                         count=to_clear, path=self.delivery_db.url.database)
            # The copies reach the disk before the originals are deleted (the delivery file may commit
            # without syncing).
            return self.delivery_db.sync_to_disk().addCallback(
                lambda _: self.db.run(clear, desc="webhooks_legacy_clear")).addCallback(
                lambda _: self.delivery_db.run(lambda conn: conn.execute(
                    delete(delivery_state).where(delivery_state.c.name == LEGACY_MOVED)), desc="webhooks_legacy_done"))
        return self.delivery_db.run(copy, desc="webhooks_legacy_move").addCallback(moved).addCallback(checked)

    def expire(self, busy: list[int], dead_before: datetime, purge_before: datetime | None):
        """Dead-letter pending deliveries older than ``dead_before`` (not in ``busy``), purge finished ones
        older than ``purge_before`` (and any left by a deleted subscription), up to PURGE_MAX of each;
        fires with how many died. ``purge_unfinished`` then says whether the purge left some for later."""
        now = self.now()

        def thd(conn):
            dead = conn.execute(update(deliveries).where(
                IS_PENDING, deliveries.c.created_at < dead_before,
                deliveries.c.id.not_in(busy)).values(
                state=DEAD, finished_at=now, next_attempt_at=now,
                last_error=func.coalesce(deliveries.c.last_error, "never delivered") + " (dead-lettered: too old)"
            )).rowcount
            more = False
            if purge_before is not None:
                purge = _PURGES[self.delivery_db.dialect_name]
                _, more = purge.run(conn, purge.finished, {"before": purge_before}, PURGE_MAX)
                # Deliveries of a subscription deleted meanwhile (an event moved in while it was being
                # deleted, or a deletion the process did not live to finish): the subscriptions the
                # deliveries name, one index seek each, against those that exist.
                existing = set(conn.execute(select(subscriptions.c.id)).scalars())
                after = -1
                while (named := conn.execute(purge.next_subscription, {"after": after}).scalar()) is not None:
                    if named not in existing:
                        more = purge.run(conn, purge.of_subscription, {"subscription": named}, PURGE_MAX)[1] or more
                    after = named
            return dead, more

        def done(result):
            dead, self.purge_unfinished = result
            return dead
        return self.delivery_db.run(thd, desc="webhooks_expire").addCallback(done)

    def due(self, busy: list[int], limit: int, skip_subscriptions: list[int] = ()):
        """Up to ``limit`` due deliveries (not in ``busy``, of subscriptions not paused nor skipped), longest
        due first, each with its subscription's URL and secret. Only reads: on SQLite it runs beside the
        writer (Database.read), so it sees what was committed before it began."""
        now = self.now()

        def thd(conn):
            dialect = self.delivery_db.dialect_name
            result = conn.execute(_statements(dialect)[0], {
                "now": now, "busy": _id_values(busy, dialect), "skip": _id_values(skip_subscriptions, dialect),
                "limit": limit})
            keys = tuple(result.keys())  # (row._mapping builds a view of its keys for every row)
            due = [dict(zip(keys, row)) for row in result.fetchall()]
            targets = {}
            if due:
                ids = sorted({row["subscription_id"] for row in due})
                targets = {row.id: (row.url, row.secret) for row in conn.execute(_TARGETS, {"ids": ids})}
            for row in due:
                row["body"] = unpack_body(row["body"])
                row["created_at"] = as_utc(row["created_at"])
                row["url"], row["secret"] = targets[row["subscription_id"]]
            return due
        return self.delivery_db.read(thd, desc="webhooks_due")

    def record_outcomes(self, outcomes: list[tuple]):
        """The outcomes of several POSTs, in one transaction: each ``(delivery ids, state, next attempt,
        attempted at, status code, error)``. Successes with the same status code share one UPDATE.
        (A delivery pass writes them with its fan-out instead: :meth:`fan_out`.)"""
        return self.delivery_db.run(self._outcome_writer(outcomes), desc="webhooks_outcomes")

    def _outcome_writer(self, outcomes: list[tuple]):
        """``thd(conn)`` writing ``outcomes`` (see :meth:`record_outcomes`); its ``writes``: whether there
        is anything to write. The statements are made here, on the reactor thread."""
        delivered: dict[int, tuple[list, datetime]] = {}
        statements = []
        for ids, state, next_attempt_at, attempted_at, code, error in outcomes:
            if state == DELIVERED and error is None:
                grouped, latest = delivered.get(code, ([], attempted_at))
                delivered[code] = (grouped + list(ids), max(latest, attempted_at))
                continue
            statements.append((ids, state, next_attempt_at, attempted_at, code, error))
        statements += [(ids, DELIVERED, at, at, code, None) for code, (ids, at) in delivered.items()]

        dialect = self.delivery_db.dialect_name

        def thd(conn):
            for ids, state, next_attempt_at, attempted_at, code, error in statements:
                conn.execute(_statements(dialect)[1], {
                    "deliveries": _id_values(ids, dialect), "b_state": state, "b_next": next_attempt_at,
                    "b_at": attempted_at,
                    "b_code": code, "b_error": None if error is None else error[:MAX_ERROR_LENGTH],
                    "b_finished": attempted_at if state != PENDING else None})
        thd.writes = bool(statements)
        return thd

    # -- subscriptions ----------------------------------------------------------------------------

    def create(self, url: str, event_types: list, secret: str, description: str | None, paused: bool):
        now = self.now()

        def thd(conn):
            subscription_id = conn.execute(insert(subscriptions).values(
                url=url, event_types=orjson.dumps(event_types).decode(), secret=secret, description=description,
                paused=paused, created_at=now, updated_at=now,
                derived_from=self._derived_from(conn, event_types, None, {}))).inserted_primary_key[0]
            return subscription_dict(conn.execute(select(subscriptions).where(
                subscriptions.c.id == subscription_id)).first())
        return self.db.run(thd, desc="webhooks_create")

    def _derived_from(self, conn, event_types: list, before: list | None, marks: dict) -> str | None:
        """A subscription's ``derived_from`` once it names ``event_types`` (``before``: what it named, None
        for a new one; ``marks``: its marks then): for each type read from stored rows that it wants, the
        key of the last row stored now, or its earlier mark while it wanted the type all along."""
        if not self.split:  # events are outbox rows, naming their subscriptions when written
            return None
        made = {}
        for event_type, (source, opt_in) in self.derived.items():
            if not wants(event_types, event_type, opt_in):
                continue
            if before is not None and wants(before, event_type, opt_in) and event_type in marks:
                made[event_type] = marks[event_type]
            else:
                made[event_type] = conn.execute(select(func.max(source.key))).scalar() or 0
        return orjson.dumps(made).decode() if made else None

    def count(self):
        def thd(conn):
            return conn.execute(select(func.count()).select_from(subscriptions)).scalar_one()
        return self.db.run(thd, desc="webhooks_count")

    def get(self, subscription_id: int):
        def thd(conn):
            row = conn.execute(select(subscriptions).where(subscriptions.c.id == subscription_id)).first()
            return None if row is None else subscription_dict(row)
        return self.db.run(thd, desc="webhooks_get")

    def list(self, limit: int, offset: int):
        def thd(conn):
            total = conn.execute(select(func.count()).select_from(subscriptions)).scalar_one()
            rows = conn.execute(select(subscriptions).order_by(subscriptions.c.id).limit(limit).offset(offset))
            return total, [subscription_dict(row) for row in rows]
        return self.db.run(thd, desc="webhooks_list")

    def all_event_types(self):
        """(id, event_types) of every subscription (for the writer's cache of who wants what)."""
        def thd(conn):
            return [(row.id, orjson.loads(row.event_types)) for row in conn.execute(
                select(subscriptions.c.id, subscriptions.c.event_types).order_by(subscriptions.c.id))]
        return self.db.run(thd, desc="webhooks_event_types")

    def update(self, subscription_id: int, **values):
        """Change some fields; fires the subscription, or None when there is none."""
        event_types = values.get("event_types")
        if event_types is not None:
            values["event_types"] = orjson.dumps(event_types).decode()
        values["updated_at"] = self.now()

        def thd(conn):
            if event_types is not None:
                row = conn.execute(select(subscriptions.c.event_types, subscriptions.c.derived_from).where(
                    subscriptions.c.id == subscription_id)).first()
                if row is not None:
                    values["derived_from"] = self._derived_from(conn, event_types, orjson.loads(row.event_types),
                                                                orjson.loads(row.derived_from or "{}"))
            if conn.execute(update(subscriptions).where(subscriptions.c.id == subscription_id)
                            .values(**values)).rowcount == 0:
                return None
            return subscription_dict(conn.execute(select(subscriptions).where(
                subscriptions.c.id == subscription_id)).first())
        return self.db.run(thd, desc="webhooks_update")

    def delete(self, subscription_id: int):
        """Delete a subscription and its deliveries (pending ones are never sent); fires True if it existed.

        The subscription goes first: its deliveries are then never sent (due deliveries are read joined
        to their subscription), even should the process end before they are deleted, in the delivery file
        (the next purge deletes those left)."""
        def forget(conn):
            return conn.execute(delete(subscriptions).where(subscriptions.c.id == subscription_id)).rowcount > 0

        def forget_deliveries(conn):
            purge = _PURGES[self.delivery_db.dialect_name]
            while purge.run(conn, purge.of_subscription, {"subscription": subscription_id}, PURGE_MAX)[1]:
                pass  # a chunk at a time: the event ids of a chunk are held meanwhile, not of the whole history

        def deleted(existed):
            return self.delivery_db.run(forget_deliveries, desc="webhooks_delete_deliveries").addCallback(
                lambda _: existed)
        return self.db.run(forget, desc="webhooks_delete").addCallback(deleted)

    def add_test_delivery(self, subscription_id: int, event_type: str, data: dict):
        """A delivery of a test event to one subscription; fires with it, or None without the subscription."""
        now = self.now()
        event_id = time_ordered_uuid(int(self.clock.seconds() * 1000))
        body = event_body(event_id, event_type, now, orjson.dumps(data).decode())

        def thd(conn):
            if conn.execute(select(subscriptions.c.id).where(subscriptions.c.id == subscription_id)).first() is None:
                return None
            conn.execute(insert(events).values(dict(zip(EVENT_COLUMNS, (event_id, body, now)))))
            delivery_id = conn.execute(insert(deliveries).values(dict(zip(DELIVERY_COLUMNS, (
                subscription_id, event_id, event_type, PENDING, 0, now, now))))).inserted_primary_key[0]
            return delivery_dict(conn.execute(_HISTORY.where(deliveries.c.id == delivery_id)).first())
        return self.delivery_db.run(thd, desc="webhooks_test_delivery")

    def deliveries(self, subscription_id: int, limit: int, offset: int, state: str | None = None):
        """(total, deliveries of a subscription) newest first."""
        def thd(conn):
            query = _HISTORY.where(deliveries.c.subscription_id == subscription_id)
            if state is not None:
                query = query.where(deliveries.c.state == state)
            total = conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
            rows = conn.execute(query.order_by(deliveries.c.id.desc()).limit(limit).offset(offset))
            return total, [delivery_dict(row) for row in rows]
        return self.delivery_db.read(thd, desc="webhooks_deliveries")

