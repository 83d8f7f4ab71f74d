"""deliveries: a partial index of the pending ones; no index by event

The read of due deliveries walked an index of every delivery by (state, next_attempt_at, id), history
included, and each recorded outcome moved its entry there; an index by event served only the hourly
purge of orphaned events. Now one index holds the pending deliveries alone (next_attempt_at, id), and
recording an outcome takes the entry out: on PostgreSQL the UPDATE adds entries to two indexes instead
of four. Building it reads the table once.

Revision ID: webhooks_0004
Revises: webhooks_0003
Create Date: 2026-12-02 06:40:00
"""
from alembic import op
import sqlalchemy as sa


revision = 'webhooks_0004'
down_revision = 'webhooks_0003'
branch_labels = None
depends_on = None

PENDING_ONLY = sa.text("state = 'pending'")


def upgrade() -> None:
    with op.batch_alter_table('webhooks_deliveries', schema=None) as batch_op:
        batch_op.drop_index('webhooks_deliveries_due')
        batch_op.drop_index('webhooks_deliveries_of_event')
        batch_op.create_index('webhooks_deliveries_pending', ['next_attempt_at', 'id'], unique=False,
                              sqlite_where=PENDING_ONLY, postgresql_where=PENDING_ONLY)


def downgrade() -> None:
    with op.batch_alter_table('webhooks_deliveries', schema=None) as batch_op:
        batch_op.drop_index('webhooks_deliveries_pending')
        batch_op.create_index('webhooks_deliveries_of_event', ['event_id'], unique=False)
        batch_op.create_index('webhooks_deliveries_due', ['state', 'next_attempt_at', 'id'], unique=False)
