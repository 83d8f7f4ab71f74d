"""row sources: the event types the deliverer reads from stored rows, and how far (the delivery file)

On an SQLite file, meter values events are no longer written as outbox rows by the OCPP transactions:
the deliverer reads them from the samples those store anyway (csms.outbox.StoredRows). This table says
which event types are read so, where the reading code is imported from (so that a worker started
outside the CSMS, `csms-admin webhooks deliver`, reads them too), and the key of the last row read.
The CSMS fills it in when it starts.

Revision ID: webhooks_delivery_0004
Revises: webhooks_delivery_0003
Create Date: 2026-12-03 10:20:00
"""
from alembic import op
import sqlalchemy as sa


revision = 'webhooks_delivery_0004'
down_revision = 'webhooks_delivery_0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'webhooks_row_sources',
        sa.Column('event_type', sa.String(length=64), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('opt_in', sa.Boolean(), nullable=False),
        sa.Column('mark', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('event_type'),
    )


def downgrade() -> None:
    op.drop_table('webhooks_row_sources')
