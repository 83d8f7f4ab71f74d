"""The webhooks plugin's tables (all prefixed ``webhooks_``)."""
from sqlalchemy import BigInteger, Boolean, Column, DateTime, Index, MetaData, String, Table, Text, text

from csms.db import BIG_KEY

metadata = MetaData()

subscriptions = Table(
    "webhooks_subscriptions", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("url", Text, nullable=False),
    #: JSON list of event type names; ["*"] is every type except the opt-in ones.
    Column("event_types", Text, nullable=False),
    # Kept as given: the HMAC needs the secret itself, not a hash of it.
    Column("secret", String(128), nullable=False),
    Column("description", Text),
    Column("paused", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    #: Per event type read from stored rows (csms.outbox.StoredRows), the key of the last row stored
    #: before the subscription wanted the type: it gets the rows after it. JSON ({"meter_values.received":
    #: 1234}); NULL: every row not yet read (webhooks_0006).
    Column("derived_from", Text),
)

#: The outbox proper, what the transactions of the changes write: one row per event, appended (its one
#: index is the sequence), naming the subscriptions that wanted it then. The delivering process moves
#: each into ``webhooks_events`` and a ``webhooks_deliveries`` row per subscription, in one transaction
#: that deletes it here, so that the OCPP transactions write one small row per event, not 1 + N with
#: four indexes to keep.
outbox = Table(
    "webhooks_outbox", metadata,
    Column("seq", BIG_KEY, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False),
    Column("event_type", String(64), nullable=False),
    #: The ids of the subscriptions that wanted the event when it was written, comma separated.
    Column("subscribers", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

#: Each event as delivered ({"id", "type", "created_at", "data"}, JSON), once however many subscriptions
#: want it; written with its deliveries, purged with the last of them.
events = Table(
    "webhooks_events", metadata,
    Column("event_id", String(36), primary_key=True),
    Column("body", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

#: One row per (event, subscription), made from its ``webhooks_outbox`` row, then its state, attempts and
#: the last attempt's outcome.
deliveries = Table(
    "webhooks_deliveries", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("subscription_id", BIG_KEY, nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("state", String(16), nullable=False),  # pending, delivered, dead
    Column("attempts", BigInteger, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_attempt_at", DateTime(timezone=True)),
    Column("last_status_code", BigInteger),
    Column("last_error", Text),
    Column("finished_at", DateTime(timezone=True)),
)

#: The pending deliveries, walked in order by the dispatcher's read of due ones, which stops at its limit: no
#: sort of the backlog. Partial: a delivery leaves it when its outcome is recorded, and the history (kept for
#: days) is not in it; recording an outcome adds no entry anywhere but the key and the subscription's index.
#: (A query's condition must say ``state = 'pending'`` as a literal for either database to use it: IS_PENDING.)
PENDING_ONLY = text("state = 'pending'")
Index("webhooks_deliveries_pending", deliveries.c.next_attempt_at, deliveries.c.id,
      sqlite_where=PENDING_ONLY, postgresql_where=PENDING_ONLY)
Index("webhooks_deliveries_of_subscription", deliveries.c.subscription_id, deliveries.c.id)
#: For the purge of the history, which reads only what it deletes (WebhookStore.expire): the finished
#: deliveries by when they ended (partial: a query must say ``state <> 'pending'`` as a literal,
#: NOT_PENDING), and the deliveries of an event, for the check that an event has none left. A batch of
#: meter values being one delivery, the index by event costs a few entries a second at 1,000 events/s.
NOT_PENDING_ONLY = text("state <> 'pending'")
Index("webhooks_deliveries_finished", deliveries.c.finished_at,
      sqlite_where=NOT_PENDING_ONLY, postgresql_where=NOT_PENDING_ONLY)
Index("webhooks_deliveries_of_event", deliveries.c.event_id)

#: SQLite: the delivery state in a database file of its own, beside the main one (``<file>-webhooks.db``,
#: see delivery_db.py), so that the deliverer's writes never take the main file's one write lock, which
#: the OCPP transactions need. The same two tables (copies: the statements are the same), plus how far
#: the outbox has been moved in. PostgreSQL keeps them in the main database (row locks, no file lock).
delivery_metadata = MetaData()
events.to_metadata(delivery_metadata)
deliveries.to_metadata(delivery_metadata)

#: Named values of the delivery file: ``outbox_seq``, the seq of the last ``webhooks_outbox`` row moved into
#: it (the outbox, in the main file, is only read from here; moved rows are deleted from it now and then,
#: by a transaction of the main file's: WebhookStore.prune_outbox); ``legacy_moved``, while the deliveries
#: an older release kept in the main file are being moved here.
delivery_state = Table(
    "webhooks_delivery_state", delivery_metadata,
    Column("name", String(32), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

#: The event types whose events the deliverer reads from the rows their changes store (SQLite file:
#: csms.outbox.StoredRows), written by the CSMS when it starts: where the reading code is imported from,
#: whether the type is opt-in, and the key of the last row read (webhooks_delivery_0004).
row_sources = Table(
    "webhooks_row_sources", delivery_metadata,
    Column("event_type", String(64), primary_key=True),
    Column("path", Text, nullable=False),
    Column("opt_in", Boolean, nullable=False),
    Column("mark", BigInteger, nullable=False),
)
