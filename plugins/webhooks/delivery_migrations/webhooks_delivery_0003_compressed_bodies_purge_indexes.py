"""events: compressed bodies; deliveries: indexes for a purge that reads only what it deletes (the delivery file)

The same change as webhooks_0005 in the main history (PostgreSQL, in-memory SQLite).

A stored event body of 2 KiB or more may now be compressed ("z1:" + base64 of zlib): batches of meter
values (up to 100 events, tens of KiB of JSON each) are kept about seven times smaller, for as long
as the delivery history keeps them. No column changes for it: an older release, which would send such
a body as it is stored, refuses a database at this revision. The downgrade stores every compressed
body as JSON again.

Two indexes let the purge of the history read only the rows it deletes, where it scanned every
delivery (days of them: millions of rows): the finished deliveries by the time they ended (partial:
not the pending ones), and the deliveries by event, for the check that an event has none left. Since
a batch of meter values is one delivery, the index by event costs a few entries a second, not the
thousand per event that webhooks_0004 dropped it for. Building them reads the table once.

Revision ID: webhooks_delivery_0003
Revises: webhooks_delivery_0002
Create Date: 2026-12-02 13:00:00
"""
from csms_plugins.webhooks.revision_compressed_bodies import downgrade, upgrade  # noqa: F401


revision = 'webhooks_delivery_0003'
down_revision = 'webhooks_delivery_0002'
branch_labels = None
depends_on = None
