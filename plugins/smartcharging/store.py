"""The Smart Charging store: the CSMS's record of the profiles each station holds.

Every method returns a Deferred and runs its SQL in one transaction on the database pool.
"""
from __future__ import annotations

import json

from sqlalchemy import and_, bindparam, delete, func, insert, or_, select, update
from twisted.internet import defer

from csms.ocpp16 import parse_datetime
from csms.outbox import Outbox, event_data
from csms.stations import as_utc

from .tables import profiles

INSTALLED, REJECTED, REPLACED, CLEARED, ENDED = "installed", "rejected", "replaced", "cleared", "ended"

# Asked at every StartTransaction, so built once.
_REMOTE_START_PROFILE = (select(profiles).where(
    profiles.c.station_id == bindparam("station"), profiles.c.state == INSTALLED,
    profiles.c.source == "RemoteStartTransaction", profiles.c.transaction_id.is_(None),
    or_(profiles.c.connector_id.is_(None), profiles.c.connector_id == bindparam("connector")))
    .order_by(profiles.c.id.desc()).limit(1))
STATES = (INSTALLED, REJECTED, REPLACED, CLEARED, ENDED)


def profile_row(row) -> dict:
    data = dict(row._mapping)
    for key in ("valid_from", "valid_to", "sent_at", "updated_at"):
        data[key] = as_utc(data.get(key))
    data["profile"] = json.loads(data["profile"])
    return data


def _date(value):
    return parse_datetime(value) if value else None


def _replace_matching(conn, station_id: str, connector_id, profile: dict, now, exclude_id=None) -> None:
    """OCPP 1.6 §5.15: a new profile replaces the one with the same chargingProfileId, and the one
    with the same purpose and stack level on the same connector."""
    same_slot = and_(profiles.c.purpose == profile["chargingProfilePurpose"],
                     profiles.c.stack_level == profile["stackLevel"])
    same_slot = and_(same_slot, profiles.c.connector_id == connector_id) if connector_id is not None \
        else and_(same_slot, profiles.c.connector_id.is_(None))
    query = update(profiles).where(
        profiles.c.station_id == station_id, profiles.c.state == INSTALLED,
        or_(profiles.c.charging_profile_id == profile["chargingProfileId"], same_slot))
    if exclude_id is not None:
        query = query.where(profiles.c.id != exclude_id)
    conn.execute(query.values(state=REPLACED, updated_at=now))


#: The cluster topic telling the other nodes a station now has an installed profile: ``{"station_id"}``.
INSTALLED_TOPIC = "smartcharging.installed"


class _Alone:
    """No other node to tell (a store made without ``cluster``)."""

    @staticmethod
    def publish(conn, topic: str, data: dict) -> None:
        pass


class SmartChargingStore:
    def __init__(self, db, clock, outbox: Outbox | None = None, cluster=None):
        self.db = db
        self.clock = clock
        self.outbox = outbox if outbox is not None else Outbox()
        #: The other nodes' :meth:`may_have_profiles` hear of every profile installed here.
        self.cluster = cluster if cluster is not None else _Alone()
        #: Stations that may have an installed profile; None until read at start-up (then: ask the database).
        self._with_profiles: set | None = None
        self._added: set = set()
        #: station -> re-reads of it running; changes of it since the oldest began (see :meth:`refresh`)
        self._refreshing: dict[str, int] = {}
        self._changed_while_refreshing: set = set()
        self._station_locks: dict[str, defer.DeferredLock] = {}

    def _in_order(self, station_id: str, thd, desc: str) -> defer.Deferred:
        """Run a write of a station's profiles after the ones asked for before it: which profile replaces
        which follows the order the station answered in, and two answers recorded at the same moment
        (PostgreSQL commits on several threads) cannot each miss the other's profile."""
        lock = self._station_locks.setdefault(station_id, defer.DeferredLock())
        return lock.run(self.db.run, thd, desc=desc)

    def load_stations_with_profiles(self):
        """At start-up: which stations have installed profiles, so that a transaction at a station with
        none (most of them) costs no database round trip for its TxProfiles."""
        def thd(conn):
            return {row[0] for row in conn.execute(
                select(profiles.c.station_id).where(profiles.c.state == INSTALLED).distinct())}

        def loaded(stations):
            self._with_profiles = stations | self._added
            return len(self._with_profiles)
        return self.db.run(thd, desc="smartcharging_stations_with_profiles").addCallback(loaded)

    def may_have_profiles(self, station_id: str) -> bool:
        """False only when this station certainly has no installed profile. A profile recorded here marks
        its station before the write; one recorded by another node arrives as a ``smartcharging.installed``
        message; a station connecting here is re-read (:meth:`refresh`)."""
        return self._with_profiles is None or station_id in self._with_profiles or station_id in self._refreshing

    def _mark(self, station_id: str) -> None:
        self._added.add(station_id)
        if self._with_profiles is not None:
            self._with_profiles.add(station_id)
        if station_id in self._refreshing:
            self._changed_while_refreshing.add(station_id)

    def installed_elsewhere(self, data: dict, origin: str) -> None:
        """A ``smartcharging.installed`` message: another node recorded a profile the station accepted."""
        self._mark(data["station_id"])

    def refresh(self, station_id: str) -> defer.Deferred:
        """Re-read whether the station has installed profiles (it connected to this node: messages may
        have been missed). Until the answer it counts as having some; a profile marked meanwhile stays."""
        self._refreshing[station_id] = self._refreshing.get(station_id, 0) + 1

        def thd(conn):
            return conn.execute(select(profiles.c.id).where(profiles.c.station_id == station_id,
                                                            profiles.c.state == INSTALLED).limit(1)).first() is not None

        def read(has_profiles):
            if has_profiles:
                self._mark(station_id)
            elif station_id not in self._changed_while_refreshing and self._refreshing[station_id] == 1:
                self._added.discard(station_id)
                if self._with_profiles is not None:
                    self._with_profiles.discard(station_id)
            return has_profiles

        def done(result):
            left = self._refreshing.pop(station_id) - 1
            if left:
                self._refreshing[station_id] = left
            else:
                self._changed_while_refreshing.discard(station_id)
            return result
        return self.db.run(thd, desc="smartcharging_station_has_profiles").addCallback(read).addBoth(done)

    def record_sent(self, station_id: str, connector_id, profile: dict, source: str, station_status: str,
                    transaction_id, now):
        """Record a profile the station answered: installed when Accepted (replacing what it replaces),
        rejected otherwise. Fires with the new row."""
        if station_status == "Accepted":
            self._mark(station_id)

        def thd(conn):
            accepted = station_status == "Accepted"
            if accepted:
                _replace_matching(conn, station_id, connector_id, profile, now)
            result = conn.execute(insert(profiles).values(
                station_id=station_id, connector_id=connector_id,
                charging_profile_id=profile["chargingProfileId"], stack_level=profile["stackLevel"],
                purpose=profile["chargingProfilePurpose"], kind=profile["chargingProfileKind"],
                recurrency_kind=profile.get("recurrencyKind"), transaction_id=transaction_id,
                valid_from=_date(profile.get("validFrom")), valid_to=_date(profile.get("validTo")),
                profile=json.dumps(profile, separators=(",", ":")), source=source,
                state=INSTALLED if accepted else REJECTED, station_status=station_status,
                sent_at=now, updated_at=now))
            if accepted:
                self.cluster.publish(conn, INSTALLED_TOPIC, {"station_id": station_id})
            row_id = result.inserted_primary_key[0]
            row = profile_row(conn.execute(select(profiles).where(profiles.c.id == row_id)).one())
            self.outbox.add(conn, "charging_profile.changed", dict(event_data(row, leave_out=("id",)),
                                                                   change="sent"))
            return row
        return self._in_order(station_id, thd, desc="smartcharging_record_sent")

    def bind_transaction(self, station_id: str, connector_id: int, transaction_id: int, now):
        """A transaction started: the latest TxProfile a RemoteStartTransaction carried for this
        connector (or for any connector) now belongs to it. Fires with the row, or None."""
        def thd(conn):
            row = conn.execute(_REMOTE_START_PROFILE, {"station": station_id, "connector": connector_id}).first()
            if row is None:
                return None
            profile = json.loads(row.profile)
            profile["transactionId"] = transaction_id
            _replace_matching(conn, station_id, connector_id, profile, now, exclude_id=row.id)
            conn.execute(update(profiles).where(profiles.c.id == row.id).values(
                connector_id=connector_id, transaction_id=transaction_id, updated_at=now))
            return profile_row(conn.execute(select(profiles).where(profiles.c.id == row.id)).one())
        return self._in_order(station_id, thd, desc="smartcharging_bind_transaction")

    def clear(self, station_id: str, criteria: dict, now):
        """Apply an accepted ClearChargingProfile (OCPP 1.6 §5.5) to the record: every installed
        profile matching all the criteria given (id, connectorId, chargingProfilePurpose, stackLevel)
        is cleared; no criteria clears them all. Fires with the cleared rows' ids."""
        def thd(conn):
            query = select(profiles.c.id).where(profiles.c.station_id == station_id, profiles.c.state == INSTALLED)
            if criteria.get("id") is not None:
                query = query.where(profiles.c.charging_profile_id == criteria["id"])
            if criteria.get("connectorId") is not None:
                query = query.where(profiles.c.connector_id == criteria["connectorId"])
            if criteria.get("chargingProfilePurpose") is not None:
                query = query.where(profiles.c.purpose == criteria["chargingProfilePurpose"])
            if criteria.get("stackLevel") is not None:
                query = query.where(profiles.c.stack_level == criteria["stackLevel"])
            ids = [row.id for row in conn.execute(query.order_by(profiles.c.id))]
            if ids:
                conn.execute(update(profiles).where(profiles.c.id.in_(ids)).values(state=CLEARED, updated_at=now))
                self.outbox.add(conn, "charging_profile.changed", {"station_id": station_id, "change": "cleared",
                                                                   "criteria": criteria, "cleared": len(ids)})
            return ids
        return self._in_order(station_id, thd, desc="smartcharging_clear")

    def end_transaction(self, station_id: str, transaction_id: int, now):
        """A transaction ended: its TxProfiles end with it (OCPP 1.6 §3.13.1). Fires with their ids."""
        def thd(conn):
            ids = [row.id for row in conn.execute(select(profiles.c.id).where(
                profiles.c.station_id == station_id, profiles.c.state == INSTALLED,
                profiles.c.purpose == "TxProfile", profiles.c.transaction_id == transaction_id))]
            if ids:
                conn.execute(update(profiles).where(profiles.c.id.in_(ids)).values(state=ENDED, updated_at=now))
            return ids
        return self._in_order(station_id, thd, desc="smartcharging_end_transaction")

    def list(self, station_id: str, connector_id=None, states=None, limit=None, offset: int = 0):
        """Fires with (total, rows) for a station, newest first."""
        def thd(conn):
            where = [profiles.c.station_id == station_id]
            if connector_id is not None:
                where.append(profiles.c.connector_id == connector_id)
            if states:
                where.append(profiles.c.state.in_(list(states)))
            total = conn.execute(select(func.count()).select_from(profiles).where(*where)).scalar_one()
            query = select(profiles).where(*where).order_by(profiles.c.id.desc()).offset(offset)
            if limit is not None:
                query = query.limit(limit)
            return total, [profile_row(row) for row in conn.execute(query)]
        return self.db.run(thd, desc="smartcharging_list")

    def installed(self, station_id: str):
        """Fires with the rows of the profiles the station holds now, oldest first."""
        def thd(conn):
            return [profile_row(row) for row in conn.execute(select(profiles).where(
                profiles.c.station_id == station_id, profiles.c.state == INSTALLED).order_by(profiles.c.id))]
        return self.db.run(thd, desc="smartcharging_installed")

    def delete_station(self, station_id: str):
        def thd(conn):
            conn.execute(delete(profiles).where(profiles.c.station_id == station_id))
        return self._in_order(station_id, thd, desc="smartcharging_delete_station").addBoth(
            self._forget_lock, station_id)

    def _forget_lock(self, result, station_id: str):
        lock = self._station_locks.get(station_id)
        if lock is not None and not lock.locked:
            del self._station_locks[station_id]
        return result
