"""The cluster's tables, in the framework's metadata: node leases, station presence, large messages.

On one node they stay empty.
"""
from __future__ import annotations

from sqlalchemy import Column, DateTime, String, Table, Text

from csms.db import BIG_KEY
from csms.stations import metadata

nodes = Table(
    "csms_nodes", metadata,
    Column("name", String(255), primary_key=True),
    #: Which process holds the name: a node started again under the same name takes it over.
    Column("instance", String(64), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
    Column("lease_expires_at", DateTime(timezone=True), nullable=False),
    # For display: where the node listens.
    Column("ocpp_endpoint", Text),
    Column("api_endpoint", Text),
)

presence = Table(
    "csms_presence", metadata,
    Column("station_id", String(255), primary_key=True),
    Column("node", String(255), nullable=False, index=True),
    Column("connected_at", DateTime(timezone=True), nullable=False),
    #: The connection on that node: a node closing an older connection leaves a newer one's row alone.
    Column("connection", String(64), nullable=False),
)

#: Message bodies too large for NOTIFY (8000 bytes): the notification carries the row's id.
messages = Table(
    "csms_cluster_messages", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    #: A node's name, or "*" for every node.
    Column("target", String(255), nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
)
