"""an index for the retention purge

The retention purge (csms.retention, docs/retention.md) deletes the oldest rows of this history a batch at a
time, finding them through an index on its timestamp: without one, each batch would read the whole table.
Building it reads the table once, during the upgrade.

Revision ID: firmware_0003
Revises: firmware_0002
Create Date: 2026-12-03 07:44:40.691977
"""
from alembic import op


revision = 'firmware_0003'
down_revision = 'firmware_0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('firmware_status_history', schema=None) as batch_op:
        batch_op.create_index('firmware_status_history_received_at', ['received_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('firmware_status_history', schema=None) as batch_op:
        batch_op.drop_index('firmware_status_history_received_at')
