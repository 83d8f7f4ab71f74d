"""The webhooks plugin's tables (all prefixed ``webhooks_``)."""
from sqlalchemy import BigInteger, Boolean, Column, DateTime, Index, MetaData, String, Table, Text

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
)

#: Each event as delivered ({"id", "type", "created_at", "data"}, JSON), once however many subscriptions
#: want it; written with its deliveries, purged with the last of them.
events = Table(
    "webhooks_events", metadata,
    Column("event_id", String(36), primary_key=True),
    Column("body", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

#: The outbox: one row per (event, subscription), written in the transaction of the change that caused
#: the event (csms.outbox), then its state, attempts and the last attempt's outcome.
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

#: Walked in order by the dispatcher's read of due deliveries, which stops at its limit: no sort of the backlog.
Index("webhooks_deliveries_due", deliveries.c.state, deliveries.c.next_attempt_at, deliveries.c.id)
Index("webhooks_deliveries_of_subscription", deliveries.c.subscription_id, deliveries.c.id)
Index("webhooks_deliveries_of_event", deliveries.c.event_id)
