"""an index for the retention purge

The retention purge (csms.retention, docs/retention.md) deletes the oldest rows of this history a batch at a
time, finding them through an index on its timestamp: without one, each batch would read the whole table.
Building it reads the table once, during the upgrade.

Revision ID: localauth_0002
Revises: localauth_0001
Create Date: 2026-12-03 07:44:49.175674
"""
from alembic import op


revision = 'localauth_0002'
down_revision = 'localauth_0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('localauth_updates', schema=None) as batch_op:
        batch_op.create_index('localauth_updates_answered_at', ['answered_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('localauth_updates', schema=None) as batch_op:
        batch_op.drop_index('localauth_updates_answered_at')
