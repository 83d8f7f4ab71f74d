"""The schema change of revisions webhooks_0005 (the main history: PostgreSQL, in-memory SQLite) and
webhooks_delivery_0003 (an SQLite file's delivery file), written once for both: compressed event
bodies, and the indexes of a purge that reads only what it deletes (see either revision's text).

Frozen with those revisions, as a migration is: later code must not change what it does. It imports
nothing of the plugin's, so that the format it reads stays the one they were written for.
"""
import base64
import zlib

from alembic import op
import sqlalchemy as sa

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
