"""The Remote Trigger profile's table (prefixed ``remotetrigger_``)."""
from sqlalchemy import Column, DateTime, Index, Integer, MetaData, String, Table

metadata = MetaData()

#: Every answered TriggerMessage, whoever sent it (the trigger endpoint or the generic calls endpoint).
requests = Table(
    "remotetrigger_requests", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("station_id", String(255), nullable=False),
    Column("requested_message", String(40), nullable=False),
    Column("connector_id", Integer),
    Column("status", String(16), nullable=False),
    Column("answered_at", DateTime(timezone=True), nullable=False),
    Index("remotetrigger_requests_station", "station_id", "id"),
)
