"""an index for the retention purge

The retention purge (csms.retention, docs/retention.md) deletes the oldest rows of this history a batch at a
time, finding them through an index on its timestamp: without one, each batch would read the whole table.
Building it reads the table once, during the upgrade.

Revision ID: core_0002
Revises: core_0001
Create Date: 2026-12-03 07:44:35.719590
"""
from alembic import op


revision = 'core_0002'
down_revision = 'core_0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('core_status_history', schema=None) as batch_op:
        batch_op.create_index('core_status_history_received_at', ['received_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('core_status_history', schema=None) as batch_op:
        batch_op.drop_index('core_status_history_received_at')
