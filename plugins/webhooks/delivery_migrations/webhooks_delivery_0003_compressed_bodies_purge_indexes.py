"""events: compressed bodies; deliveries: indexes for a purge that reads only what it deletes (the delivery file)

The same change as webhooks_0005 in the main history (PostgreSQL, in-memory SQLite).

A stored event body of 2 KiB or more may now be compressed ("z1:" + base64 of zlib): batches of meter
values (up to 100 events, tens of KiB of JSON each) are kept about seven times smaller, for as long
as the delivery history keeps them. No column changes for it: an older release, which would send such
a body as it is stored, refuses a database at this revision. The downgrade stores every compressed
body as JSON again.

Two indexes let the purge of the history read only the rows it deletes, where it scanned every
delivery (days of them: millions of rows): the finished deliveries by the time they ended (partial:
not the pending ones), and the deliveries by event, for the check that an event has none left. Since
a batch of meter values is one delivery, the index by event costs a few entries a second, not the
thousand per event that webhooks_0004 dropped it for. Building them reads the table once.

Revision ID: webhooks_delivery_0003
Revises: webhooks_delivery_0002
Create Date: 2026-12-02 13:00:00
"""
import base64
import zlib

from alembic import op
import sqlalchemy as sa


revision = 'webhooks_delivery_0003'
down_revision = 'webhooks_delivery_0002'
branch_labels = None
depends_on = None

COMPRESSED = "z1:"
#: Bodies rewritten per statement by the downgrade (each of them held in memory meanwhile).
CHUNK = 200
NOT_PENDING = sa.text("state <> 'pending'")


def upgrade() -> None:
    op.create_index('webhooks_deliveries_finished', 'webhooks_deliveries', ['finished_at'], unique=False,
                    sqlite_where=NOT_PENDING, postgresql_where=NOT_PENDING)
    op.create_index('webhooks_deliveries_of_event', 'webhooks_deliveries', ['event_id'], unique=False)
    # From here on the purge looks for events left without a delivery only among those whose deliveries
    # it deletes; the earlier purge looked at every event every hour. Any left meanwhile go now, once.
    events = sa.table("webhooks_events", sa.column("event_id", sa.String))
    deliveries = sa.table("webhooks_deliveries", sa.column("event_id", sa.String))
    op.execute(events.delete().where(~sa.exists().where(deliveries.c.event_id == events.c.event_id)))


def downgrade() -> None:
    op.drop_index('webhooks_deliveries_of_event', table_name='webhooks_deliveries')
    op.drop_index('webhooks_deliveries_finished', table_name='webhooks_deliveries')
    conn = op.get_bind()
    events = sa.table("webhooks_events", sa.column("event_id", sa.String), sa.column("body", sa.Text))
    packed = sa.select(events.c.event_id, events.c.body).where(
        sa.func.substr(events.c.body, 1, len(COMPRESSED)) == COMPRESSED).limit(CHUNK)
    while True:
        rows = conn.execute(packed).fetchall()
        if not rows:
            return
        conn.execute(events.update().where(events.c.event_id == sa.bindparam("id")).values(body=sa.bindparam("plain")),
                     [{"id": event_id, "plain": zlib.decompress(base64.b64decode(body[len(COMPRESSED):])).decode()}
                      for event_id, body in rows])
