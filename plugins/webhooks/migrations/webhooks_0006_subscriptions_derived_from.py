"""subscriptions: where each starts in the event types read from stored rows (derived_from)

On an SQLite file, meter values events are no longer written as outbox rows: the delivering process
reads them from the stored samples (csms.outbox.StoredRows). A subscription then gets those stored
after it came to want the type: ``derived_from`` keeps, per such type, the key of the last row stored
before that (JSON, {"meter_values.received": 1234}). NULL for subscriptions made before this revision:
they get every row the delivery has not yet read.

Revision ID: webhooks_0006
Revises: webhooks_0005
Create Date: 2026-12-03 10:10:00
"""
from alembic import op
import sqlalchemy as sa


revision = 'webhooks_0006'
down_revision = 'webhooks_0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('webhooks_subscriptions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('derived_from', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('webhooks_subscriptions', schema=None) as batch_op:
        batch_op.drop_column('derived_from')
