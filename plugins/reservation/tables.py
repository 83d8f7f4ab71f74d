"""The Reservation profile's tables (all prefixed ``reservation_``)."""
from sqlalchemy import BigInteger, Column, DateTime, Index, MetaData, String, Table, Text

from csms.db import BIG_KEY

metadata = MetaData()

#: One row per ReserveNow the CSMS sent (or is sending). ``reservation_id`` is the OCPP id; it is unique
#: for ids the CSMS allocates, but an operator may reuse one through the generic calls endpoint (a
#: station then replaces its reservation, OCPP 1.6 §5.13), so rows have their own key.
reservations = Table(
    "reservation_reservations", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("reservation_id", BigInteger, nullable=False),
    Column("station_id", String(255), nullable=False),
    Column("connector_id", BigInteger, nullable=False),
    Column("id_tag", String(20), nullable=False),
    Column("parent_id_tag", String(20)),
    Column("expiry_date", DateTime(timezone=True), nullable=False),
    # api: the friendly endpoint; call: the generic calls endpoint or the Python API.
    Column("source", String(8), nullable=False),
    # The station's ReserveNow.conf status (Accepted, Faulted, Occupied, Rejected, Unavailable).
    Column("status", String(16)),
    # requested, active, refused, failed, expired, cancelled, consumed, replaced.
    Column("state", String(16), nullable=False),
    # The connector's last StatusNotification while the reservation was live (Reserved, Available ...).
    Column("connector_status", String(16)),
    Column("transaction_id", BigInteger),
    # The station's CancelReservation.conf status, when one was sent.
    Column("cancel_status", String(16)),
    Column("error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("answered_at", DateTime(timezone=True)),
    Column("closed_at", DateTime(timezone=True)),
    Index("reservation_reservations_station_state", "station_id", "state"),
    Index("reservation_reservations_station_rid", "station_id", "reservation_id"),
)

#: The last reservation id the CSMS allocated: ids only grow, also across restarts.
id_counter = Table(
    "reservation_id_counter", metadata,
    Column("name", String(16), primary_key=True),
    Column("last_id", BigInteger, nullable=False),
)

#: What did not fit the normal course: cancels of unknown ids, reservation ids reused or unknown at
#: StartTransaction, replaced reservations.
events = Table(
    "reservation_events", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("station_id", String(255), nullable=False, index=True),
    Column("reservation_id", BigInteger),
    Column("event", String(32), nullable=False),
    Column("detail", Text),
    Column("at", DateTime(timezone=True), nullable=False),
    Index("reservation_events_at", "at"),  # the retention purge's (csms.retention)
)
