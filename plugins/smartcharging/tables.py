"""The Smart Charging profile's tables (all prefixed ``smartcharging_``)."""
from sqlalchemy import BigInteger, Column, DateTime, Index, MetaData, String, Table, Text

from csms.db import BIG_KEY

metadata = MetaData()

#: Every charging profile the CSMS sent, with what became of it on the station.
#: ``state``: installed (the station accepted it and holds it), rejected (the station refused it),
#: replaced (a later profile with the same id, or the same connector + purpose + stack level, took its
#: place), cleared (a ClearChargingProfile matched it) or ended (its transaction ended).
profiles = Table(
    "smartcharging_profiles", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("station_id", String(255), nullable=False),
    #: None for a RemoteStartTransaction profile without connectorId, until its transaction starts.
    Column("connector_id", BigInteger),
    Column("charging_profile_id", BigInteger, nullable=False),
    Column("stack_level", BigInteger, nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("recurrency_kind", String(16)),
    Column("transaction_id", BigInteger),
    Column("valid_from", DateTime(timezone=True)),
    Column("valid_to", DateTime(timezone=True)),
    #: The csChargingProfiles object exactly as sent (JSON).
    Column("profile", Text, nullable=False),
    #: SetChargingProfile or RemoteStartTransaction.
    Column("source", String(32), nullable=False),
    Column("state", String(16), nullable=False),
    #: The station's answer (Accepted, Rejected, NotSupported).
    Column("station_status", String(16)),
    Column("sent_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("smartcharging_profiles_station_state", "station_id", "state"),
)
