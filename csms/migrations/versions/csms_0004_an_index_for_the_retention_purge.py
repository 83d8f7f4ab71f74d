"""an index for the retention purge

The retention purge (csms.retention, docs/retention.md) deletes the oldest rows of this history a batch at a
time, finding them through an index on its timestamp: without one, each batch would read the whole table.
Building it reads the table once, during the upgrade.

Revision ID: csms_0004
Revises: csms_0003
Create Date: 2026-12-03 07:44:32.226202
"""
from alembic import op


revision = 'csms_0004'
down_revision = 'csms_0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('csms_connection_events', schema=None) as batch_op:
        batch_op.create_index('csms_connection_events_at', ['at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('csms_connection_events', schema=None) as batch_op:
        batch_op.drop_index('csms_connection_events_at')
