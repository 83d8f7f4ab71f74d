"""The Reservation profile's store: every method returns a Deferred and runs its SQL on the database pool."""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import bindparam, case, delete, func, insert, or_, select, update

from csms.ocpp16 import format_datetime
from csms.outbox import Outbox, event_data
from csms.stations import as_utc

from .tables import events, id_counter, reservations

#: States in which a reservation is still held by the station.
LIVE = "active"
STATES = ("requested", "active", "refused", "failed", "expired", "cancelled", "consumed", "replaced")
ANSWERS = ("Accepted", "Faulted", "Occupied", "Rejected", "Unavailable")


def reservation_dict(row) -> dict:
    data = dict(row._mapping)
    for key in ("expiry_date", "created_at", "answered_at", "closed_at"):
        data[key] = as_utc(data[key])
    data["record_id"] = data.pop("id")
    data["active"] = data["state"] == LIVE
    return data


def event_dict(row) -> dict:
    data = dict(row._mapping)
    data["at"] = as_utc(data["at"])
    return data


_LIVE_FOR_TAG = (select(reservations.c.id).where(
    reservations.c.station_id == bindparam("station"), reservations.c.state == LIVE,
    or_(reservations.c.connector_id == bindparam("connector"), reservations.c.connector_id == 0),
    # With no parent, "= NULL" matches nothing: the tag alone decides.
    or_(reservations.c.id_tag == bindparam("tag"), reservations.c.parent_id_tag == bindparam("parent"),
        reservations.c.id_tag == bindparam("parent")))
    .order_by(case((reservations.c.connector_id == 0, 1), else_=0), reservations.c.id).limit(1))


def _newest(conn, station_id: str, reservation_id: int):
    return conn.execute(select(reservations).where(
        reservations.c.station_id == station_id, reservations.c.reservation_id == reservation_id)
        .order_by(reservations.c.id.desc()).limit(1)).first()


def _by_key(conn, record_id: int):
    return conn.execute(select(reservations).where(reservations.c.id == record_id)).first()


#: The cluster topic of the reservations' timers: ``{"station_id", "live": [{"record_id", "expiry_date"}],
#: "closed": [record ids]}``, published with every change that makes a reservation live or ends one.
LIVE_TOPIC = "reservation.live"


def live_message(station_id: str, live: list[dict] = (), closed: list[int] = ()) -> dict:
    return {"station_id": station_id, "closed": list(closed),
            "live": [{"record_id": row["record_id"], "expiry_date": format_datetime(row["expiry_date"])}
                     for row in live]}


class _Alone:
    """No other node to tell (a store made without ``cluster``)."""

    @staticmethod
    def publish(conn, topic: str, data: dict) -> None:
        pass


class ReservationStore:
    def __init__(self, db, clock, outbox: Outbox | None = None, cluster=None):
        self.db = db
        self.clock = clock
        self.outbox = outbox if outbox is not None else Outbox()
        #: Every node keeps a timer per live reservation: each change is published to the others.
        self.cluster = cluster if cluster is not None else _Alone()

    def _tell_nodes(self, conn, station_id: str, live: list[dict] = (), closed: list[int] = ()) -> None:
        if live or closed:
            self.cluster.publish(conn, LIVE_TOPIC, live_message(station_id, live, closed))

    def _changed(self, conn, row: dict | None) -> dict | None:
        """Announce a reservation's new state (outbox event ``reservation.changed``); returns ``row``."""
        if row is not None:
            self.outbox.add(conn, "reservation.changed", event_data(row, leave_out=("record_id",)))
        return row

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), tz=timezone.utc)

    def _event(self, conn, station_id: str, reservation_id, event: str, detail: str, now: datetime) -> None:
        conn.execute(insert(events).values(station_id=station_id, reservation_id=reservation_id, event=event,
                                           detail=detail, at=now))

    # -- ReserveNow --------------------------------------------------------------------------

    def create(self, station_id: str, connector_id: int, id_tag: str, parent_id_tag: str | None,
               expiry_date: datetime):
        """Allocate the next reservation id and record the request (state ``requested``); fires the row.

        The next id is above both the counter and every id ever recorded (operators may pick ids through
        the generic calls endpoint), so ids only grow and never collide with one the CSMS knows.
        """
        now = self.now()

        def thd(conn):
            # The counter's row is held until the commit (PostgreSQL commits on several threads): a
            # reservation made at the same moment waits, then reads what this one wrote.
            conn.execute(self.db.insert(id_counter).values(name="reservation", last_id=0).on_conflict_do_nothing())
            last = conn.execute(select(id_counter.c.last_id).where(id_counter.c.name == "reservation")
                                .with_for_update()).scalar()
            highest = conn.execute(select(func.max(reservations.c.reservation_id))).scalar()
            next_id = max(last, highest or 0) + 1
            conn.execute(update(id_counter).where(id_counter.c.name == "reservation").values(last_id=next_id))
            record_id = conn.execute(insert(reservations).values(
                reservation_id=next_id, station_id=station_id, connector_id=connector_id, id_tag=id_tag,
                parent_id_tag=parent_id_tag, expiry_date=expiry_date, source="api", state="requested",
                created_at=now)).inserted_primary_key[0]
            return reservation_dict(_by_key(conn, record_id))
        return self.db.run(thd, desc="reservation_create")

    def mark_failed(self, record_id: int, error: str):
        """The ReserveNow got no valid answer (offline, timeout, CALLERROR): the reservation never was."""
        now = self.now()

        def thd(conn):
            conn.execute(update(reservations).where(reservations.c.id == record_id,
                                                    reservations.c.state == "requested")
                         .values(state="failed", error=error, closed_at=now))
        return self.db.run(thd, desc="reservation_failed")

    def record_reserve_answer(self, station_id: str, request: dict, status: str):
        """Record the station's ReserveNow.conf; fires (row, [record ids closed by it]).

        The friendly endpoint's ``requested`` row is completed. A ReserveNow sent otherwise gets a row of
        its own; a live reservation with the same id on that station is replaced (OCPP 1.6 §5.13), so it
        is closed as ``replaced`` when the station accepts the new one.
        """
        now = self.now()
        from csms.ocpp16 import parse_datetime

        reservation_id = request["reservationId"]
        state = LIVE if status == "Accepted" else "refused"

        def thd(conn):
            closed = []
            pending = conn.execute(select(reservations.c.id).where(
                reservations.c.station_id == station_id, reservations.c.reservation_id == reservation_id,
                reservations.c.state == "requested").order_by(reservations.c.id.desc()).limit(1)).scalar()
            if status == "Accepted":
                live = conn.execute(select(reservations.c.id).where(
                    reservations.c.station_id == station_id, reservations.c.reservation_id == reservation_id,
                    reservations.c.state == LIVE)).scalars().all()
                for record_id in live:
                    conn.execute(update(reservations).where(reservations.c.id == record_id)
                                 .values(state="replaced", closed_at=now))
                    closed.append(record_id)
                if live:
                    self._event(conn, station_id, reservation_id, "replaced",
                                f"ReserveNow for live reservation id {reservation_id} replaced it", now)
            if pending is not None:
                conn.execute(update(reservations).where(reservations.c.id == pending).values(
                    status=status, state=state, answered_at=now, closed_at=None if state == LIVE else now))
                record_id = pending
            else:
                record_id = conn.execute(insert(reservations).values(
                    reservation_id=reservation_id, station_id=station_id, connector_id=request["connectorId"],
                    id_tag=request["idTag"], parent_id_tag=request.get("parentIdTag"),
                    expiry_date=parse_datetime(request["expiryDate"]), source="call", status=status, state=state,
                    created_at=now, answered_at=now, closed_at=None if state == LIVE else now,
                )).inserted_primary_key[0]
            row = self._changed(conn, reservation_dict(_by_key(conn, record_id)))
            self._tell_nodes(conn, station_id, [row] if row["state"] == LIVE else [], closed)
            return row, closed
        return self.db.run(thd, desc="reservation_answer")

    # -- closing -----------------------------------------------------------------------------

    def record_cancel(self, station_id: str, reservation_id: int, status: str):
        """Record CancelReservation.conf; fires (row or None, [record ids closed]).

        Accepted closes a live reservation as ``cancelled``. A cancel of an id the CSMS does not know
        at that station (OCTT TC_052) is kept in ``reservation_events``.
        """
        now = self.now()

        def thd(conn):
            row = _newest(conn, station_id, reservation_id)
            if row is None:
                self._event(conn, station_id, reservation_id, "cancel_unknown",
                            f"CancelReservation for an id the CSMS does not know: {status}", now)
                return None, []
            closed = []
            values = {"cancel_status": status}
            if status == "Accepted" and row.state == LIVE:
                values.update(state="cancelled", closed_at=now)
                closed.append(row.id)
            elif row.state != LIVE:
                self._event(conn, station_id, reservation_id, "cancel_closed",
                            f"CancelReservation for a reservation already {row.state}: {status}", now)
            conn.execute(update(reservations).where(reservations.c.id == row.id).values(**values))
            changed = reservation_dict(_by_key(conn, row.id))
            self._tell_nodes(conn, station_id, closed=closed)
            return (self._changed(conn, changed) if closed else changed), closed
        return self.db.run(thd, desc="reservation_cancel")

    def expire(self, record_id: int):
        """Close a live reservation whose expiry date has come; fires the row, or None when it was not live.

        Every node of a cluster has a timer for it: the UPDATE is conditional on the row still being live,
        so one node's wins (PostgreSQL re-checks the condition once the winner's commit frees the row)
        and only that node announces it.
        """
        now = self.now()

        def thd(conn):
            changed = conn.execute(update(reservations).where(reservations.c.id == record_id,
                                                              reservations.c.state == LIVE)
                                   .values(state="expired", closed_at=now)).rowcount
            if not changed:
                return None
            row = self._changed(conn, reservation_dict(_by_key(conn, record_id)))
            self._tell_nodes(conn, row["station_id"], closed=[record_id])
            return row
        return self.db.run(thd, desc="reservation_expire")

    def consume(self, station_id: str, transaction: dict):
        """A transaction started: close the reservation it uses as ``consumed``; fires the row or None.

        By its reservationId when the station sent one and it is live at that station; otherwise by the
        id tag, or the group (parentIdTag), of a live reservation of that connector or of the whole
        station (connector 0), connector ones first. A reservationId that is unknown or no longer live
        is kept in ``reservation_events``. A start whose id tag was not Accepted consumes nothing.
        """
        now = self.now()
        reservation_id = transaction.get("reservation_id")
        connector_id = transaction["connector_id"]
        id_tag = transaction["id_tag"]
        parent = transaction.get("parent_id_tag")
        accepted = transaction.get("id_tag_status", "Accepted") == "Accepted"
        transaction_id = transaction["transaction_id"]

        def close(conn, record_id):
            # Guarded by the state: an expiry timer may close the same row at the same moment.
            changed = conn.execute(update(reservations).where(reservations.c.id == record_id,
                                                              reservations.c.state == LIVE).values(
                state="consumed", transaction_id=transaction_id, closed_at=now)).rowcount
            if not changed:
                return None
            self._tell_nodes(conn, station_id, closed=[record_id])
            return self._changed(conn, reservation_dict(_by_key(conn, record_id)))

        def thd(conn):
            if reservation_id is not None:
                row = _newest(conn, station_id, reservation_id)
                if row is None:
                    self._event(conn, station_id, reservation_id, "unknown_reservation_id",
                                f"StartTransaction {transaction_id} carried a reservationId the CSMS does not know",
                                now)
                elif row.state != LIVE:
                    detail = f"StartTransaction {transaction_id} carried the reservationId of a {row.state} reservation"
                    if row.transaction_id is not None:
                        detail += f" (transaction {row.transaction_id})"
                    self._event(conn, station_id, reservation_id, "reservation_not_live", detail, now)
                elif not accepted:
                    self._event(conn, station_id, reservation_id, "start_not_accepted",
                                f"StartTransaction {transaction_id} id tag was {transaction.get('id_tag_status')}",
                                now)
                    return None
                else:
                    return close(conn, row.id)
            if not accepted:
                return None
            # Built once (every StartTransaction asks): the parent matches too when there is one.
            record_id = conn.execute(_LIVE_FOR_TAG, {"station": station_id, "connector": connector_id,
                                                     "tag": id_tag, "parent": parent or None}).scalar()
            return None if record_id is None else close(conn, record_id)
        return self.db.run(thd, desc="reservation_consume")

    def status_changed(self, station_id: str, connector_id: int, status: str):
        """Reflect a StatusNotification on the live reservations of that connector (and, for Reserved,
        of the whole station)."""
        def thd(conn):
            where = reservations.c.connector_id == connector_id
            if status == "Reserved":
                where = where | (reservations.c.connector_id == 0)
            return conn.execute(update(reservations).where(
                reservations.c.station_id == station_id, reservations.c.state == LIVE, where)
                .values(connector_status=status)).rowcount
        return self.db.run(thd, desc="reservation_status")

    def fail_interrupted(self, made_before: datetime | None = None):
        """At start-up: requests whose answer was lost with the previous process never became reservations.

        ``made_before``: only requests made before then (in a cluster, younger ones may be another
        node's calls still waiting for their answer).
        """
        now = self.now()

        def thd(conn):
            query = update(reservations).where(reservations.c.state == "requested")
            if made_before is not None:
                query = query.where(reservations.c.created_at < made_before)
            return conn.execute(query.values(
                state="failed", error="interrupted: the Central System stopped before the station answered",
                closed_at=now)).rowcount
        return self.db.run(thd, desc="reservation_fail_interrupted")

    # -- reading -----------------------------------------------------------------------------

    def get(self, station_id: str, reservation_id: int):
        def thd(conn):
            row = _newest(conn, station_id, reservation_id)
            return None if row is None else reservation_dict(row)
        return self.db.run(thd, desc="reservation_get")

    def list(self, station_id: str | None = None, active: bool | None = None, state: str | None = None,
             limit: int | None = 50, offset: int = 0):
        """(total, rows), newest first."""
        def thd(conn):
            query = select(reservations)
            if station_id is not None:
                query = query.where(reservations.c.station_id == station_id)
            if active is True:
                query = query.where(reservations.c.state == LIVE)
            elif active is False:
                query = query.where(reservations.c.state != LIVE)
            if state is not None:
                query = query.where(reservations.c.state == state)
            total = conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
            rows = conn.execute(query.order_by(reservations.c.id.desc()).limit(limit).offset(offset)).fetchall()
            return total, [reservation_dict(r) for r in rows]
        return self.db.run(thd, desc="reservation_list")

    def events(self, station_id: str | None = None, limit: int = 50, offset: int = 0):
        """(total, events), newest first."""
        def thd(conn):
            query = select(events)
            if station_id is not None:
                query = query.where(events.c.station_id == station_id)
            total = conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
            rows = conn.execute(query.order_by(events.c.id.desc()).limit(limit).offset(offset)).fetchall()
            return total, [event_dict(r) for r in rows]
        return self.db.run(thd, desc="reservation_events")

    def delete_station(self, station_id: str):
        """Fires the record ids of the live reservations removed (their timers must go too)."""
        def thd(conn):
            live = conn.execute(select(reservations.c.id).where(reservations.c.station_id == station_id,
                                                                reservations.c.state == LIVE)).scalars().all()
            conn.execute(delete(reservations).where(reservations.c.station_id == station_id))
            conn.execute(delete(events).where(events.c.station_id == station_id))
            self._tell_nodes(conn, station_id, closed=live)
            return list(live)
        return self.db.run(thd, desc="reservation_delete_station")
