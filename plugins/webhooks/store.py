"""The webhooks plugin's store: the outbox writer, claiming of due deliveries, subscriptions."""
from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone

import orjson
from sqlalchemy import (BigInteger, String, all_, any_, bindparam, cast, delete, exists, func, insert, literal,
                        literal_column, select, update)
from sqlalchemy.dialects.postgresql import ARRAY

from csms.ocpp16 import format_datetime
from csms.stations import as_utc

from .tables import deliveries, events, outbox, subscriptions

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
STATES = (PENDING, DELIVERED, DEAD)
#: In a subscription's event_types: every event type except the opt-in ones.
ALL_TYPES = "*"
DELIVERY_COLUMNS = ("subscription_id", "event_id", "event_type", "state", "attempts", "created_at",
                    "next_attempt_at")
EVENT_COLUMNS = ("event_id", "body", "created_at")
OUTBOX_COLUMNS = ("event_id", "event_type", "subscribers", "body", "created_at")
#: The longest error text kept for a delivery attempt.
MAX_ERROR_LENGTH = 500

def _ids(name: str, dialect: str):
    """A list of ids as ONE parameter: a PostgreSQL array, or a JSON array SQLite's json_each reads. An
    expanding IN renders a placeholder per id into the SQL at every execution (hundreds of ids: the
    claimed deliveries), which cost the deliverer more CPU than the statement itself."""
    if dialect == "postgresql":
        return bindparam(name, type_=ARRAY(BigInteger))
    return select(func.json_each(bindparam(name, type_=String)).table_valued("value").c.value).scalar_subquery()


def _in(column, name: str, dialect: str):
    return column == any_(_ids(name, dialect)) if dialect == "postgresql" else column.in_(_ids(name, dialect))


def _not_in(column, name: str, dialect: str):
    return column != all_(_ids(name, dialect)) if dialect == "postgresql" else column.not_in(_ids(name, dialect))


def _due(dialect: str):
    return (select(deliveries.c.id, deliveries.c.subscription_id, deliveries.c.event_id, deliveries.c.event_type,
                   events.c.body, deliveries.c.attempts, deliveries.c.created_at)
            .join(subscriptions, subscriptions.c.id == deliveries.c.subscription_id)
            .join(events, events.c.event_id == deliveries.c.event_id)
            .where(deliveries.c.state == PENDING, deliveries.c.next_attempt_at <= bindparam("now"),
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


def _id_values(ids, dialect: str):
    ids = [int(i) for i in ids]
    return ids if dialect == "postgresql" else orjson.dumps(ids).decode()


#: An outbox row names a subscription: ",1,4," has ",4," in it (subscribers is "1,4").
_NAMES_SUBSCRIPTION = (literal(",") + outbox.c.subscribers + literal(",")).like(
    literal("%,") + cast(subscriptions.c.id, String) + literal(",%"))
#: The seq of the last outbox row a fan-out of ``limit`` rows takes.
_FAN_OUT_LAST = select(func.max(literal_column("seq"))).select_from(
    select(outbox.c.seq).order_by(outbox.c.seq).limit(bindparam("limit")).subquery())

#: Deliveries with their event's body (the delivery history).
_HISTORY = select(deliveries, events.c.body).join(events, events.c.event_id == deliveries.c.event_id)
#: Events none of whose deliveries are left (purged or their subscription deleted).
_ORPHAN_EVENTS = delete(events).where(~exists().where(deliveries.c.event_id == events.c.event_id))


def time_ordered_uuid(now_ms: int) -> str:
    """A version 7 UUID (RFC 9562): 48 bits of Unix milliseconds, then random bits. Ids written one after
    another sort one after another, so the event table's key and the deliveries' event index grow at
    their end (a few pages per transaction) instead of at random places (a page per event), which is
    what the OCPP transactions writing them pay for. (Python 3.14's uuid.uuid7 makes the same.)"""
    value = (now_ms & ((1 << 48) - 1)) << 80 | int.from_bytes(os.urandom(10), "big") & ((1 << 80) - 1)
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # variant 10
    return str(uuid.UUID(int=value))


def event_body(event_id: str, event_type: str, created_at: datetime, data_json: str) -> str:
    """The JSON an event is delivered as; ``data_json`` is spliced in as stored (no re-encoding)."""
    head = orjson.dumps({"id": event_id, "type": event_type, "created_at": format_datetime(created_at)}).decode()
    return head[:-1] + ',"data":' + data_json + "}"


def subscription_dict(row) -> dict:
    data = dict(row._mapping)
    data.pop("secret", None)
    data["event_types"] = orjson.loads(data["event_types"])
    for key in ("created_at", "updated_at"):
        data[key] = as_utc(data[key])
    return data


def delivery_dict(row) -> dict:
    data = dict(row._mapping)
    data["event"] = orjson.loads(data.pop("body"))
    for key in ("created_at", "next_attempt_at", "last_attempt_at", "finished_at"):
        data[key] = as_utc(data[key])
    if data["state"] != PENDING:
        data["next_attempt_at"] = None
    return data


class WebhookStore:
    def __init__(self, db, clock):
        self.db = db
        self.clock = clock
        #: event type -> ids of the subscriptions wanting it. Replaced whole on the reactor thread when
        #: subscriptions change, read by the database threads writing events.
        self.subscribers: dict[str, tuple] = {}

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

    def fan_out(self, limit: int):
        """Move up to ``limit`` events from the outbox, oldest first: each into ``webhooks_events`` with a
        pending delivery per subscription it names that still exists, in one transaction that deletes
        them from the outbox (rerun whole, or not at all). Fires with how many were moved.

        In SQL statements only, rows never coming up into Python: on SQLite this transaction holds the
        database's one write lock, which the OCPP writer of the CSMS waits for meanwhile."""
        def thd(conn):
            if self.db.is_sqlite:
                # One writer at a time, and a row's seq is given when it is written: the rows up to the
                # limit's are exactly those committed, and no other can come in below it meanwhile.
                last = conn.execute(_FAN_OUT_LAST, {"limit": limit}).scalar()
                if last is None:
                    return 0
                chosen = outbox.c.seq <= last
            else:
                # PostgreSQL hands out seqs at INSERT and commits in any order: exactly the rows read
                # (and locked: a second deliverer, in a lock hand-over, skips them).
                seqs = list(conn.execute(select(outbox.c.seq).order_by(outbox.c.seq).limit(limit)
                                         .with_for_update(skip_locked=True)).scalars())
                if not seqs:
                    return 0
                chosen = outbox.c.seq.in_(seqs)
            conn.execute(insert(events).from_select(
                list(EVENT_COLUMNS), select(outbox.c.event_id, outbox.c.body, outbox.c.created_at)
                .where(chosen, exists().where(_NAMES_SUBSCRIPTION))))
            conn.execute(insert(deliveries).from_select(
                list(DELIVERY_COLUMNS), select(subscriptions.c.id, outbox.c.event_id, outbox.c.event_type,
                                               literal(PENDING), literal(0), outbox.c.created_at,
                                               outbox.c.created_at)
                .select_from(outbox.join(subscriptions, _NAMES_SUBSCRIPTION)).where(chosen)))
            return conn.execute(delete(outbox).where(chosen)).rowcount

        def anything(conn):
            return conn.execute(select(outbox.c.seq).limit(1)).first() is not None
        # A look first, beside the writer: an idle pass takes no write lock (on SQLite, the file's).
        return self.db.read(anything, desc="webhooks_outbox_waiting").addCallback(
            lambda waiting: self.db.run(thd, desc="webhooks_fan_out") if waiting else 0)

    def expire(self, busy: list[int], dead_before: datetime, purge_before: datetime | None):
        """Dead-letter pending deliveries older than ``dead_before`` (not in ``busy``), purge finished ones
        older than ``purge_before`` (and any left by a deleted subscription); fires with how many died."""
        now = self.now()

        def thd(conn):
            dead = conn.execute(update(deliveries).where(
                deliveries.c.state == PENDING, deliveries.c.created_at < dead_before,
                deliveries.c.id.not_in(busy)).values(
                state=DEAD, finished_at=now, next_attempt_at=now,
                last_error=func.coalesce(deliveries.c.last_error, "never delivered") + " (dead-lettered: too old)"
            )).rowcount
            if purge_before is not None:
                conn.execute(delete(deliveries).where(deliveries.c.state != PENDING,
                                                      deliveries.c.finished_at < purge_before))
                # An event written while its subscription was being deleted.
                conn.execute(delete(deliveries).where(deliveries.c.subscription_id.not_in(
                    select(subscriptions.c.id))))
                conn.execute(_ORPHAN_EVENTS)
            return dead
        return self.db.run(thd, desc="webhooks_expire")

    def due(self, busy: list[int], limit: int, skip_subscriptions: list[int] = ()):
        """Up to ``limit`` due deliveries (not in ``busy``, of subscriptions not paused nor skipped), longest
        due first, each with its subscription's URL and secret. Only reads: on SQLite it runs beside the
        writer (Database.read), so it sees what was committed before it began."""
        now = self.now()

        def thd(conn):
            dialect = self.db.dialect_name
            rows = conn.execute(_statements(dialect)[0], {
                "now": now, "busy": _id_values(busy, dialect), "skip": _id_values(skip_subscriptions, dialect),
                                       "limit": limit}).fetchall()
            due = [dict(row._mapping) for row in rows]
            targets = {}
            if due:
                ids = sorted({row["subscription_id"] for row in due})
                targets = {row.id: (row.url, row.secret) for row in conn.execute(
                    select(subscriptions.c.id, subscriptions.c.url, subscriptions.c.secret)
                    .where(subscriptions.c.id.in_(ids)))}
            for row in due:
                row["created_at"] = as_utc(row["created_at"])
                row["url"], row["secret"] = targets[row["subscription_id"]]
            return due
        return self.db.read(thd, desc="webhooks_due")

    def record_outcomes(self, outcomes: list[tuple]):
        """The outcomes of several POSTs, in one transaction: each ``(delivery ids, state, next attempt,
        attempted at, status code, error)``. Successes with the same status code share one UPDATE."""
        delivered: dict[int, tuple[list, datetime]] = {}
        statements = []
        for ids, state, next_attempt_at, attempted_at, code, error in outcomes:
            if state == DELIVERED and error is None:
                grouped, latest = delivered.get(code, ([], attempted_at))
                delivered[code] = (grouped + list(ids), max(latest, attempted_at))
                continue
            statements.append((ids, state, next_attempt_at, attempted_at, code, error))
        statements += [(ids, DELIVERED, at, at, code, None) for code, (ids, at) in delivered.items()]

        def thd(conn):
            for ids, state, next_attempt_at, attempted_at, code, error in statements:
                conn.execute(_statements(self.db.dialect_name)[1], {
                    "deliveries": _id_values(ids, self.db.dialect_name), "b_state": state, "b_next": next_attempt_at, "b_at": attempted_at,
                    "b_code": code, "b_error": None if error is None else error[:MAX_ERROR_LENGTH],
                    "b_finished": attempted_at if state != PENDING else None})
        return self.db.run(thd, desc="webhooks_outcomes")

    # -- subscriptions ----------------------------------------------------------------------------

    def create(self, url: str, event_types: list, secret: str, description: str | None, paused: bool):
        now = self.now()

        def thd(conn):
            subscription_id = conn.execute(insert(subscriptions).values(
                url=url, event_types=orjson.dumps(event_types).decode(), secret=secret, description=description,
                paused=paused, created_at=now, updated_at=now)).inserted_primary_key[0]
            return subscription_dict(conn.execute(select(subscriptions).where(
                subscriptions.c.id == subscription_id)).first())
        return self.db.run(thd, desc="webhooks_create")

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
        if "event_types" in values:
            values["event_types"] = orjson.dumps(values["event_types"]).decode()
        values["updated_at"] = self.now()

        def thd(conn):
            if conn.execute(update(subscriptions).where(subscriptions.c.id == subscription_id)
                            .values(**values)).rowcount == 0:
                return None
            return subscription_dict(conn.execute(select(subscriptions).where(
                subscriptions.c.id == subscription_id)).first())
        return self.db.run(thd, desc="webhooks_update")

    def delete(self, subscription_id: int):
        """Delete a subscription and its deliveries (pending ones are never sent); fires True if it existed."""
        def thd(conn):
            conn.execute(delete(deliveries).where(deliveries.c.subscription_id == subscription_id))
            conn.execute(_ORPHAN_EVENTS)
            return conn.execute(delete(subscriptions).where(subscriptions.c.id == subscription_id)).rowcount > 0
        return self.db.run(thd, desc="webhooks_delete")

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
        return self.db.run(thd, desc="webhooks_test_delivery")

    def deliveries(self, subscription_id: int, limit: int, offset: int, state: str | None = None):
        """(total, deliveries of a subscription) newest first."""
        def thd(conn):
            query = _HISTORY.where(deliveries.c.subscription_id == subscription_id)
            if state is not None:
                query = query.where(deliveries.c.state == state)
            total = conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
            rows = conn.execute(query.order_by(deliveries.c.id.desc()).limit(limit).offset(offset))
            return total, [delivery_dict(row) for row in rows]
        return self.db.run(thd, desc="webhooks_deliveries")

