"""The Local Auth List Management store: every method returns a Deferred and runs its SQL on the pool."""
from __future__ import annotations

import json
from datetime import datetime, timezone

from sqlalchemy import delete, func, insert, select, update
from twisted.internet import defer

from csms.stations import as_utc

from .lists import FULL, canonical
from .tables import list_entries, selected_tags, stations, updates

_TIMES = ("sent_at", "acknowledged_at", "reported_at", "last_status_at", "updated_at")


def _default_state(station_id: str) -> dict:
    state = {column.name: None for column in stations.columns}
    state.update(station_id=station_id, selection="all", not_supported=False)
    return state


class LocalAuthStore:
    def __init__(self, db, clock):
        self.db = db
        self.clock = clock
        self._station_locks: dict[str, defer.DeferredLock] = {}

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), tz=timezone.utc)

    def _ensure(self, conn, station_id: str, now: datetime) -> None:
        """Give the station its row (selection "all") unless it has one; safe against a concurrent insert."""
        conn.execute(self.db.insert(stations).values(station_id=station_id, selection="all", not_supported=False,
                                                     updated_at=now)
                     .on_conflict_do_nothing(index_elements=["station_id"]))

    def _in_order(self, station_id: str, thd, desc: str) -> defer.Deferred:
        """Run a write of a station's list state after the ones asked for before it: answers apply in the
        order the station gave them, each to the list the one before left (PostgreSQL commits on several
        threads: two answers recorded at the same moment would otherwise race on the same entries)."""
        lock = self._station_locks.setdefault(station_id, defer.DeferredLock())
        return lock.run(self.db.run, thd, desc=desc)

    def state(self, station_id: str):
        """Fires with the station's row (defaults when none) plus ``chosen`` (sorted id tags or None)
        and ``entries`` (``{id_tag: idTagInfo}`` as acknowledged)."""
        def thd(conn):
            row = conn.execute(select(stations).where(stations.c.station_id == station_id)).first()
            state = _default_state(station_id) if row is None else dict(row._mapping)
            for key in _TIMES:
                state[key] = as_utc(state.get(key))
            state["chosen"] = None
            if state["selection"] == "chosen":
                state["chosen"] = [r[0] for r in conn.execute(
                    select(selected_tags.c.id_tag).where(selected_tags.c.station_id == station_id)
                    .order_by(selected_tags.c.id_tag))]
            state["entries"] = {r.id_tag: json.loads(r.id_tag_info) for r in conn.execute(
                select(list_entries).where(list_entries.c.station_id == station_id))}
            return state
        return self.db.run(thd, desc="localauth_state")

    def choose_tags(self, station_id: str, id_tags: list[str] | None):
        """Put every id tag (None) or exactly ``id_tags`` on the station's list."""
        now = self.now()

        def thd(conn):
            self._ensure(conn, station_id, now)
            conn.execute(delete(selected_tags).where(selected_tags.c.station_id == station_id))
            if id_tags is not None and id_tags:
                conn.execute(insert(selected_tags), [{"station_id": station_id, "id_tag": t} for t in id_tags])
            conn.execute(update(stations).where(stations.c.station_id == station_id).values(
                selection="all" if id_tags is None else "chosen", updated_at=now))
        return self.db.run(thd, desc="localauth_choose_tags")

    def stations_choosing(self, id_tag: str):
        """Fires with the station ids whose chosen set names ``id_tag``."""
        def thd(conn):
            return [r[0] for r in conn.execute(select(selected_tags.c.station_id)
                                               .where(selected_tags.c.id_tag == id_tag))]
        return self.db.run(thd, desc="localauth_stations_choosing")

    def mark_sent(self, station_id: str, list_version: int, update_type: str):
        """Record a version as sent before the request leaves: a lost answer still uses the version up."""
        now = self.now()

        def thd(conn):
            self._ensure(conn, station_id, now)
            current = conn.execute(select(stations.c.sent_version)
                                   .where(stations.c.station_id == station_id)).scalar()
            conn.execute(update(stations).where(stations.c.station_id == station_id).values(
                sent_version=max(list_version, current or 0), sent_update_type=update_type, sent_at=now,
                updated_at=now))
        return self._in_order(station_id, thd, desc="localauth_mark_sent")

    def record_send_result(self, station_id: str, request: dict, status: str):
        """Record a SendLocalList answer; Accepted applies the request to the acknowledged content."""
        now = self.now()
        version = request["listVersion"]
        update_type = request["updateType"]
        entries = request.get("localAuthorizationList") or []

        def thd(conn):
            self._ensure(conn, station_id, now)
            current = conn.execute(select(stations.c.sent_version)
                                   .where(stations.c.station_id == station_id)).scalar()
            values = {"sent_version": max(version, current or 0), "last_status": status, "last_status_at": now,
                      "last_error": None, "updated_at": now}
            if status == "Accepted":
                if update_type == FULL:
                    conn.execute(delete(list_entries).where(list_entries.c.station_id == station_id))
                for entry in entries:
                    conn.execute(delete(list_entries).where(list_entries.c.station_id == station_id,
                                                            list_entries.c.id_tag == entry["idTag"]))
                    if "idTagInfo" in entry:
                        conn.execute(insert(list_entries).values(
                            station_id=station_id, id_tag=entry["idTag"],
                            id_tag_info=canonical(entry["idTagInfo"]), list_version=version))
                values.update(acknowledged_version=version, acknowledged_at=now, not_supported=False)
            elif status == "NotSupported":
                values["not_supported"] = True
            conn.execute(update(stations).where(stations.c.station_id == station_id).values(**values))
            conn.execute(insert(updates).values(station_id=station_id, list_version=version,
                                                update_type=update_type, entry_count=len(entries),
                                                status=status, answered_at=now))
        return self._in_order(station_id, thd, desc="localauth_send_result")

    def record_error(self, station_id: str, error: str):
        """A SendLocalList got no valid answer (offline, CALLERROR, timeout): nothing was acknowledged."""
        now = self.now()

        def thd(conn):
            self._ensure(conn, station_id, now)
            conn.execute(update(stations).where(stations.c.station_id == station_id).values(
                last_status="Error", last_error=error[:1000], last_status_at=now, updated_at=now))
        return self._in_order(station_id, thd, desc="localauth_send_error")

    def record_version(self, station_id: str, list_version: int):
        now = self.now()

        def thd(conn):
            self._ensure(conn, station_id, now)
            conn.execute(update(stations).where(stations.c.station_id == station_id).values(
                reported_version=list_version, reported_at=now, updated_at=now))
        return self._in_order(station_id, thd, desc="localauth_version")

    def history(self, station_id: str, limit: int, offset: int):
        """(total, answered SendLocalList requests newest first)."""
        def thd(conn):
            query = select(updates).where(updates.c.station_id == station_id)
            total = conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
            rows = conn.execute(query.order_by(updates.c.id.desc()).limit(limit).offset(offset)).fetchall()
            out = []
            for row in rows:
                item = dict(row._mapping)
                item["answered_at"] = as_utc(item["answered_at"])
                out.append(item)
            return total, out
        return self.db.run(thd, desc="localauth_history")

    def delete_station(self, station_id: str):
        def thd(conn):
            for table in (stations, selected_tags, list_entries, updates):
                conn.execute(delete(table).where(table.c.station_id == station_id))

        def forget_lock(result):
            lock = self._station_locks.get(station_id)
            if lock is not None and not lock.locked:
                del self._station_locks[station_id]
            return result
        return self._in_order(station_id, thd, desc="localauth_delete_station").addBoth(forget_lock)
