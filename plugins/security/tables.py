"""The security plugin's tables (all prefixed ``security_``)."""
from sqlalchemy import MetaData

metadata = MetaData()

from sqlalchemy import Column, DateTime, SmallInteger, String, Table  # noqa: E402

#: Security profiles (OCPP 1.6 Security whitepaper §2): the lowest one each station may connect at (the
#: highest it has connected at, or what an operator set; TC_083), and the one of its latest connection.
station_profiles = Table(
    "security_station_profiles", metadata,
    Column("station_id", String(255), primary_key=True),
    Column("profile", SmallInteger, nullable=False),
    Column("last_connection_profile", SmallInteger),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
