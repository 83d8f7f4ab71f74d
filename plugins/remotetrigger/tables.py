"""The Remote Trigger profile's table (prefixed ``remotetrigger_``)."""
from sqlalchemy import BigInteger, Column, DateTime, Index, MetaData, String, Table

from csms.db import BIG_KEY

metadata = MetaData()

#: Every answered TriggerMessage, whoever sent it (the trigger endpoint or the generic calls endpoint).
requests = Table(
    "remotetrigger_requests", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("station_id", String(255), nullable=False),
    Column("requested_message", String(40), nullable=False),
    Column("connector_id", BigInteger),
    Column("status", String(16), nullable=False),
    Column("answered_at", DateTime(timezone=True), nullable=False),
    Index("remotetrigger_requests_station", "station_id", "id"),
    Index("remotetrigger_requests_answered_at", "answered_at"),  # the retention purge's (csms.retention)
)
