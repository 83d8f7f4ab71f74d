"""events: compressed bodies; deliveries: indexes for a purge that reads only what it deletes (the delivery file)

The same change as webhooks_0005 in the main history (PostgreSQL, in-memory SQLite), whose text says
why: compressed event bodies, and the purge's two indexes. Both revisions run
revision_compressed_bodies.py.

Revision ID: webhooks_delivery_0003
Revises: webhooks_delivery_0002
Create Date: 2026-12-02 13:00:00
"""
from csms_plugins.webhooks.revision_compressed_bodies import downgrade, upgrade  # noqa: F401


revision = 'webhooks_delivery_0003'
down_revision = 'webhooks_delivery_0002'
branch_labels = None
depends_on = None
