"""The Core profile's tables (all prefixed ``core_``)."""
from sqlalchemy import (BigInteger, Boolean, Column, DateTime, Index, MetaData, String, Table, Text,
                        UniqueConstraint, func)

from csms.db import BIG_KEY

metadata = MetaData()

boot_info = Table(
    "core_boot_info", metadata,
    Column("station_id", String(255), primary_key=True),
    Column("charge_point_vendor", String(20)),
    Column("charge_point_model", String(20)),
    Column("charge_point_serial_number", String(25)),
    Column("charge_box_serial_number", String(25)),
    Column("firmware_version", String(50)),
    Column("iccid", String(20)),
    Column("imsi", String(20)),
    Column("meter_type", String(25)),
    Column("meter_serial_number", String(25)),
    Column("last_boot_at", DateTime(timezone=True)),
    Column("last_boot_status", String(16)),
    Column("boot_count", BigInteger, nullable=False, default=0),
)

id_tags = Table(
    "core_id_tags", metadata,
    Column("id_tag", String(20), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("expiry_date", DateTime(timezone=True)),
    Column("parent_id_tag", String(20), index=True),
    Column("description", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# IdToken is a CiString20Type (OCPP 1.6 §7.28): authorization looks tags up ignoring case.
Index("core_id_tags_id_tag_ci", func.lower(id_tags.c.id_tag))

transactions = Table(
    "core_transactions", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("station_id", String(255), nullable=False),
    Column("connector_id", BigInteger, nullable=False),
    Column("id_tag", String(20), nullable=False),
    Column("id_tag_status", String(16), nullable=False),
    Column("parent_id_tag", String(20)),
    Column("reservation_id", BigInteger),
    Column("meter_start", BigInteger, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("meter_stop", BigInteger),
    Column("stopped_at", DateTime(timezone=True)),
    Column("stop_reason", String(32)),
    Column("stop_id_tag", String(20)),
    Column("stop_received_at", DateTime(timezone=True)),
    Column("stopped_by", String(16)),
    # A StartTransaction retransmitted after a lost confirmation gets the same id back.
    UniqueConstraint("station_id", "connector_id", "id_tag", "started_at", "meter_start",
                     name="core_transactions_start_key"),
    Index("core_transactions_station_open", "station_id", "stopped_at"),
    Index("core_transactions_id_tag_open", "id_tag", "stopped_at"),
)
# The ConcurrentTx check compares id tags ignoring case.
Index("core_transactions_id_tag_ci_open", func.lower(transactions.c.id_tag), transactions.c.stopped_at)

meter_values = Table(
    "core_meter_values", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("station_id", String(255), nullable=False),
    Column("connector_id", BigInteger, nullable=False),
    Column("transaction_id", BigInteger, index=True),
    Column("timestamp", DateTime(timezone=True), nullable=False),
    Column("value", Text, nullable=False),
    # Stored with OCPP's defaults filled in (§7.45), so only the phase may be missing.
    Column("measurand", String(48), nullable=False),
    Column("phase", String(8)),
    Column("unit", String(16), nullable=False),
    Column("context", String(32), nullable=False),
    Column("location", String(8), nullable=False),
    Column("format", String(16), nullable=False),
)
# A sample is stored once (OCPP 1.6 §4.7): a MeterValues resent after its answer was lost, or a
# StopTransaction whose transactionData repeats samples already sent, adds nothing (the inserts skip
# duplicates). What tells two samples apart is where and when they were taken and what they measure, not
# their value. NULLs are distinct in a unique index, so the nullable columns are compared through coalesce
# (transaction ids start at 1). Leading with station and time, it also serves lookups by those.
Index("core_meter_values_sample", meter_values.c.station_id, meter_values.c.timestamp, meter_values.c.connector_id,
      func.coalesce(meter_values.c.transaction_id, 0), meter_values.c.measurand,
      func.coalesce(meter_values.c.phase, ""), meter_values.c.location, meter_values.c.context, meter_values.c.unit,
      unique=True)

connectors = Table(
    "core_connectors", metadata,
    Column("station_id", String(255), primary_key=True),
    Column("connector_id", BigInteger, primary_key=True),
    Column("status", String(16)),
    Column("error_code", String(32)),
    Column("info", String(50)),
    Column("vendor_id", String(255)),
    Column("vendor_error_code", String(50)),
    Column("status_timestamp", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True)),
    Column("requested_availability", String(16)),
)

status_history = Table(
    "core_status_history", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("station_id", String(255), nullable=False),
    Column("connector_id", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("error_code", String(32), nullable=False),
    Column("info", String(50)),
    Column("vendor_id", String(255)),
    Column("vendor_error_code", String(50)),
    Column("timestamp", DateTime(timezone=True)),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Index("core_status_history_station", "station_id", "id"),
    Index("core_status_history_received_at", "received_at"),  # the retention purge's (csms.retention)
)

unmatched_stops = Table(
    "core_unmatched_stops", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("station_id", String(255), nullable=False, index=True),
    Column("transaction_id", BigInteger, nullable=False),
    Column("id_tag", String(20)),
    Column("meter_stop", BigInteger, nullable=False),
    Column("timestamp", DateTime(timezone=True), nullable=False),
    Column("reason", String(32)),
    Column("received_at", DateTime(timezone=True), nullable=False),
    # A stop resent after its answer was lost is kept once.
    UniqueConstraint("station_id", "transaction_id", "timestamp", "meter_stop", name="core_unmatched_stops_stop"),
)

configuration = Table(
    "core_configuration", metadata,
    Column("station_id", String(255), primary_key=True),
    Column("key", String(50), primary_key=True),
    Column("value", String(500)),
    Column("readonly", Boolean),
    Column("known", Boolean, nullable=False, default=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
