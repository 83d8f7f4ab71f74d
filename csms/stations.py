"""The framework's own tables: which stations exist, how they are admitted, and when they connected.

Everything a feature profile learns about a station (boot info, connectors, transactions ...) lives
in that profile's plugin tables; this module only knows identity and admission.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (Column, DateTime, Index, MetaData, String, Table, Text, bindparam, delete, func, insert, select,
                        update)

from csms.db import BIG_KEY

metadata = MetaData()

REGISTRATION_STATUSES = ("Accepted", "Pending", "Rejected")

stations = Table(
    "csms_stations", metadata,
    Column("id", String(255), primary_key=True),
    Column("registration_status", String(16), nullable=False, default="Accepted"),
    Column("password_hash", String(255)),
    Column("description", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("last_connected_at", DateTime(timezone=True)),
    Column("last_disconnected_at", DateTime(timezone=True)),
    Column("last_seen_at", DateTime(timezone=True)),
)

connection_events = Table(
    "csms_connection_events", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("station_id", String(255), nullable=False, index=True),
    Column("event", String(32), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("remote_address", String(128)),
    Column("detail", Text),
    # The retention purge's: the oldest first, never the whole table (csms.retention).
    Index("csms_connection_events_at", "at"),
)


# Statements run for every connection, built once (a reconnect storm runs them thousands of times).
_ADMISSION = select(stations.c.registration_status, stations.c.password_hash).where(
    stations.c.id == bindparam("station"))
_INSERT_EVENT = insert(connection_events)
_STATION = select(stations).where(stations.c.id == bindparam("station"))
_CONNECTION_TIMES = select(stations.c.last_connected_at, stations.c.last_disconnected_at).where(
    stations.c.id == bindparam("station"))
_TOUCH = {column: update(stations).where(stations.c.id == bindparam("station")).values(
    {column: bindparam("at")}) for column in ("last_connected_at", "last_disconnected_at", "last_seen_at")}


#: Connection events that are announced in the outbox (csms.outbox), as which event type.
_ANNOUNCED_EVENTS = {"connected": "station.connected", "disconnected": "station.disconnected",
                     "replaced": "station.disconnected"}


#: The ``detail`` of the ``disconnected`` event, and the ``reason`` of ``station.disconnected`` and
#: ``csms_on_station_disconnected``, for a connection whose end was never recorded: the Central System
#: (or its node) stopped while the station was connected, without closing the connection (``kill -9``, a
#: power cut). It is recorded when the station connects again, the time being that moment.
UNRECORDED_END = "end not recorded: the Central System stopped while the station was connected"


def as_utc(value: datetime | None) -> datetime | None:
    """A stored time as aware UTC: SQLite hands back naive datetimes (stored as UTC), PostgreSQL
    aware ones in the session's time zone."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def station_row(row) -> dict:
    data = dict(row._mapping)
    data["has_password"] = data.pop("password_hash") is not None
    for key in ("created_at", "updated_at", "last_connected_at", "last_disconnected_at", "last_seen_at"):
        data[key] = as_utc(data[key])
    return data


class StationStore:
    """Reads and writes ``csms_stations`` and ``csms_connection_events`` (all methods return Deferreds)."""

    def __init__(self, db, clock, outbox=None):
        from csms.outbox import Outbox

        self.db = db
        self.clock = clock
        self.outbox = outbox if outbox is not None else Outbox()
        self._insert_station = None

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), tz=timezone.utc)

    def admit(self, station_id: str, register_as: str | None):
        """One round trip for a handshake: (registration_status, password_hash, registered_now) of a
        station; an unknown one is registered with ``register_as`` first, or None when that is None."""
        now = self.now()

        def thd(conn):
            row = conn.execute(_ADMISSION, {"station": station_id}).first()
            if row is not None:
                return row[0], row[1], False
            if register_as is None:
                return None
            if not self._insert_new(conn, {"id": station_id, "registration_status": register_as,
                                           "password_hash": None, "description": None,
                                           "created_at": now, "updated_at": now}):
                # Registered meanwhile by a handshake of the same id (another connection, another node).
                row = conn.execute(_ADMISSION, {"station": station_id}).first()
                return row[0], row[1], False
            return register_as, None, True
        return self.db.run(thd, desc="station_admit")

    def get(self, station_id: str):
        def thd(conn):
            row = conn.execute(_STATION, {"station": station_id}).first()
            return None if row is None else station_row(row)
        return self.db.run(thd, desc="station_get")

    def create(self, station_id: str, registration_status: str = "Accepted", password_hash: str | None = None,
               description: str | None = None):
        """Register a station; fires True when created, False when it already existed."""
        now = self.now()

        def thd(conn):
            return self._insert_new(conn, {"id": station_id, "registration_status": registration_status,
                                           "password_hash": password_hash, "description": description,
                                           "created_at": now, "updated_at": now})
        return self.db.run(thd, desc="station_create")

    def _insert_new(self, conn, values: dict) -> bool:
        """Insert a station row unless its id exists; True when inserted. One statement, so two creators
        of the same id at once (API calls, handshakes, nodes) get True and False, never a unique-key error."""
        if self._insert_station is None:
            self._insert_station = self.db.insert(stations).values(
                {name: bindparam(name) for name in values}).on_conflict_do_nothing(
                index_elements=["id"]).returning(stations.c.id)
        # RETURNING, not rowcount: psycopg reports -1 for this statement.
        return conn.execute(self._insert_station, values).first() is not None

    def update(self, station_id: str, **values):
        """Update columns of a station; fires True when it exists."""
        values["updated_at"] = self.now()

        def thd(conn):
            return conn.execute(update(stations).where(stations.c.id == station_id).values(**values)).rowcount > 0
        return self.db.run(thd, desc="station_update")

    def delete(self, station_id: str):
        def thd(conn):
            conn.execute(delete(connection_events).where(connection_events.c.station_id == station_id))
            return conn.execute(delete(stations).where(stations.c.id == station_id)).rowcount > 0
        return self.db.run(thd, desc="station_delete")

    def list(self, limit: int = 100, offset: int = 0, ids: list[str] | None = None,
             exclude_ids: list[str] | None = None, registration_status: str | None = None,
             search: str | None = None):
        """(total, rows) of stations ordered by id; ``search``: ids containing that text, ignoring case."""
        def thd(conn):
            query = select(stations)
            if search:
                query = query.where(func.lower(stations.c.id).contains(search.lower(), autoescape=True))
            if ids is not None:
                query = query.where(stations.c.id.in_(ids))
            if exclude_ids:
                query = query.where(stations.c.id.not_in(exclude_ids))
            if registration_status is not None:
                query = query.where(stations.c.registration_status == registration_status)
            total = conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
            rows = conn.execute(query.order_by(stations.c.id).limit(limit).offset(offset)).fetchall()
            return total, [station_row(row) for row in rows]
        return self.db.run(thd, desc="station_list")

    def record_event(self, station_id: str, event: str, remote_address: str | None = None,
                     detail: str | None = None, touch: str | None = None, also=None):
        """Append a connection event; ``touch`` names a ``csms_stations`` timestamp column to set too.

        ``also(conn)``: more work in the same transaction (the cluster's presence); fires with its result.
        """
        now = self.now()

        def thd(conn):
            result = None if also is None else also(conn)
            if result is False:
                # The cluster's presence release of a connection a newer one on another node took over:
                # that node recorded this one's end (``replaced``) with its own connection.
                return result
            self._insert_event(conn, station_id, event, now, remote_address, detail)
            if touch is not None:
                conn.execute(_TOUCH[touch], {"station": station_id, "at": now})
            return result
        return self.db.run(thd, desc="connection_event")

    def _insert_event(self, conn, station_id: str, event: str, at: datetime, remote_address: str | None,
                      detail: str | None) -> None:
        conn.execute(_INSERT_EVENT, {"station_id": station_id, "event": event, "at": at,
                                     "remote_address": remote_address, "detail": detail})
        announced = _ANNOUNCED_EVENTS.get(event)
        if announced == "station.connected":
            self.outbox.add(conn, announced, {"station_id": station_id, "remote_address": remote_address})
        elif announced is not None:
            reason = "replaced" if event == "replaced" else detail  # as csms_on_station_disconnected says
            self.outbox.add(conn, announced, {"station_id": station_id, "reason": reason})

    def record_connected(self, station_id: str, remote_address: str | None, also=None, replacing: bool = False,
                         node: str | None = None):
        """Record a new connection (``connected``, ``last_connected_at``) on ``node``; ``also`` as
        :meth:`record_event`'s, returning the node that held the station before (the cluster's presence
        claim). Fires with (``also``'s result, the detail of an end recorded for the previous connection).

        The previous connection's end is recorded here, first and in the same transaction, when no live
        process of this node will record it:
        * held by another node (``also`` says which): ``replaced`` (``connected to node ...``), whether that
          node is alive to close it or not;
        * unless ``replacing`` a connection of this node (whose end the caller records), a previous
          connection whose start is recorded and whose end is not was lost with the process that held it
          (``kill -9``, a power cut): ``disconnected``, with the detail :data:`UNRECORDED_END`.
        """
        now = self.now()

        def thd(conn):
            times = None if replacing else conn.execute(_CONNECTION_TIMES, {"station": station_id}).first()
            held_before = None if also is None else also(conn)
            ended = None
            if held_before is not None and held_before != node:
                ended = "replaced"
                self._insert_event(conn, station_id, "replaced", now, None, f"connected to node {node}")
            elif times is not None and times[0] is not None and (times[1] is None
                                                                  or as_utc(times[1]) < as_utc(times[0])):
                ended = UNRECORDED_END
                self._insert_event(conn, station_id, "disconnected", now, None, ended)
            self._insert_event(conn, station_id, "connected", now, remote_address, None)
            conn.execute(_TOUCH["last_connected_at"], {"station": station_id, "at": now})
            return held_before, ended
        return self.db.run(thd, desc="connection_event")

    def touch_last_seen(self, station_id: str, seen_at: datetime):
        def thd(conn):
            conn.execute(_TOUCH["last_seen_at"], {"station": station_id, "at": seen_at})
        return self.db.run(thd, desc="station_last_seen")

    def events(self, station_id: str, limit: int = 100, offset: int = 0):
        def thd(conn):
            rows = conn.execute(select(connection_events).where(connection_events.c.station_id == station_id)
                                .order_by(connection_events.c.id.desc()).limit(limit).offset(offset)).fetchall()
            out = []
            for row in rows:
                data = dict(row._mapping)
                data["at"] = as_utc(data["at"])
                out.append(data)
            return out
        return self.db.run(thd, desc="connection_events")
