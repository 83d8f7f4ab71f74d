"""The Local Auth List Management profile's tables (all prefixed ``localauth_``)."""
from sqlalchemy import BigInteger, Boolean, Column, DateTime, Index, MetaData, String, Table, Text

from csms.db import BIG_KEY

metadata = MetaData()

#: One row per station the CSMS keeps a local list for: which tags go on it, and where the versions stand.
stations = Table(
    "localauth_stations", metadata,
    Column("station_id", String(255), primary_key=True),
    # "all": every id tag the CSMS holds; "chosen": the tags in localauth_selected_tags.
    Column("selection", String(8), nullable=False, default="all"),
    Column("sent_version", BigInteger),
    Column("sent_update_type", String(16)),
    Column("sent_at", DateTime(timezone=True)),
    Column("acknowledged_version", BigInteger),
    Column("acknowledged_at", DateTime(timezone=True)),
    # What GetLocalListVersion last read back (-1: the station's local list is disabled).
    Column("reported_version", BigInteger),
    Column("reported_at", DateTime(timezone=True)),
    # The last SendLocalList outcome: a SendLocalList.conf status, or Error (see last_error).
    Column("last_status", String(16)),
    Column("last_status_at", DateTime(timezone=True)),
    Column("last_error", Text),
    Column("not_supported", Boolean, nullable=False, default=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

#: The chosen id tags of a station whose selection is "chosen".
selected_tags = Table(
    "localauth_selected_tags", metadata,
    Column("station_id", String(255), primary_key=True),
    Column("id_tag", String(20), primary_key=True),
)

#: The list content the station acknowledged (as of acknowledged_version): the base of a Differential.
list_entries = Table(
    "localauth_list_entries", metadata,
    Column("station_id", String(255), primary_key=True),
    Column("id_tag", String(20), primary_key=True),
    # The idTagInfo sent, as canonical JSON (sorted keys).
    Column("id_tag_info", Text, nullable=False),
    Column("list_version", BigInteger, nullable=False),
)

#: Every answered SendLocalList, whoever sent it (a sync or the generic calls endpoint).
updates = Table(
    "localauth_updates", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("station_id", String(255), nullable=False),
    Column("list_version", BigInteger, nullable=False),
    Column("update_type", String(16), nullable=False),
    Column("entry_count", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("answered_at", DateTime(timezone=True), nullable=False),
    Index("localauth_updates_station", "station_id", "id"),
    Index("localauth_updates_answered_at", "answered_at"),  # the retention purge's (csms.retention)
)
