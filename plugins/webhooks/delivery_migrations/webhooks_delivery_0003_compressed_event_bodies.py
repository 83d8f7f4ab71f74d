"""events: a body of 2 KiB or more may be stored compressed ("z1:" + base64 of zlib) (the delivery file)

The same change as webhooks_0005 in the main history (PostgreSQL, in-memory SQLite).

No table changes: the revision marks the stored format. Batches of meter values (up to 100 events, tens
of KiB of JSON each) are kept about seven times smaller, for as long as the delivery history is kept;
an older release, which would send such a body as it is stored, refuses a database at this revision.
The downgrade stores every compressed body as plain JSON again.

Revision ID: webhooks_delivery_0003
Revises: webhooks_delivery_0002
Create Date: 2026-12-02 12:30:00
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


def upgrade() -> None:
    pass


def downgrade() -> None:
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
