"""The Core profile's store: every method returns a Deferred and runs its SQL on the database pool."""
from __future__ import annotations

import math
from collections import namedtuple
from datetime import datetime

from sqlalchemy import and_, bindparam, delete, func, insert, or_, select, update
from twisted.internet import defer

from csms.ocpp16 import format_datetime, parse_datetime
from csms.outbox import Outbox, StoredRows, event_data
from csms.stations import as_utc

from .tables import (boot_info, configuration, connectors, id_tags, meter_values, status_history,
                     transactions, unmatched_stops)

ID_TAG_STATUSES = ("Accepted", "Blocked", "Expired", "Invalid")
#: ``stopped_by`` and ``stop_reason`` of a refused start that the CSMS closed because its station booted
#: again (see :meth:`CoreStore.record_boot`).
STOPPED_BY_BOOT = "boot"
REBOOT = "Reboot"


def _row(row, *time_keys) -> dict:
    data = dict(row._mapping)
    for key in time_keys:
        data[key] = as_utc(data.get(key))
    return data


def select_transactions(station_id=None, id_tag=None, active=None, since=None, until=None):
    """The transactions matching the operator API's filters (``since`` inclusive, ``until`` exclusive, on
    started_at); the list and the exports use the same."""
    query = select(transactions)
    if station_id is not None:
        query = query.where(transactions.c.station_id == station_id)
    if id_tag is not None:
        query = query.where(transactions.c.id_tag == id_tag)
    if active is True:
        query = query.where(transactions.c.stopped_at.is_(None))
    elif active is False:
        query = query.where(transactions.c.stopped_at.is_not(None))
    if since is not None:
        query = query.where(transactions.c.started_at >= since)
    if until is not None:
        query = query.where(transactions.c.started_at < until)
    return query


def transaction_dict(row) -> dict:
    data = _row(row, "started_at", "received_at", "stopped_at", "stop_received_at")
    data["transaction_id"] = data.pop("id")
    data["active"] = data["stopped_at"] is None
    return data


def _holds_tag(transaction: dict) -> bool:
    """Whether a transaction counts for its tag's ConcurrentTx (see _HOLDS_TAG)."""
    return transaction["active"] and transaction["id_tag_status"] == "Accepted"


def id_tag_dict(row) -> dict:
    return _row(row, "expiry_date", "created_at", "updated_at")


def _tag_snapshot(row):
    """What idTagInfo needs of a stored tag: (status, expiry as UTC, parent), or None for no tag."""
    return None if row is None else (row.status, as_utc(row.expiry_date), row.parent_id_tag)


def id_tag_info_from(snapshot, now: datetime) -> dict:
    """OCPP idTagInfo for a stored tag (OCPP 1.6 §7.28): status, expiry and parent as the CSMS holds them."""
    if snapshot is None:
        return {"status": "Invalid"}
    status, expiry, parent = snapshot
    if status == "Accepted" and expiry is not None and expiry <= now:
        status = "Expired"
    info = {"status": status}
    if expiry is not None:
        info["expiryDate"] = format_datetime(expiry)
    if parent:
        info["parentIdTag"] = parent
    return info


class IdTagCache:
    """What Authorize needs of an id tag, kept in memory so that a repeated Authorize costs no query.

    An entry is the tag's snapshot (:func:`_tag_snapshot`) and, once asked, whether the tag has an
    open transaction (for ConcurrentTx). Every change this process makes through :class:`CoreStore`
    (id tags written, transactions started or stopped) drops the entries of that tag, case-insensitively,
    both when the write is queued and when it is committed; a lookup that was in flight across a change
    is not cached. In a cluster the other nodes' changes arrive as ``core.id_tag`` messages and drop the
    tag the same way. Entries also age out after ``ttl`` seconds, which bounds how long a change made by
    anything else (hand-written SQL, a message lost with a node's channel) can go unseen; ``ttl = 0``
    turns the cache off.
    """

    def __init__(self, clock, ttl: float, max_entries: int = 100_000):
        self.clock = clock
        self.ttl = ttl
        self.max_entries = max_entries
        self.generation = 0
        self._entries: dict[str, tuple] = {}  # id tag as sent -> (snapshot, active or None, stored at)
        self._by_lower: dict[str, set] = {}
        self.stats = {"hits": 0, "misses": 0}

    def get(self, id_tag: str, need_active: bool):
        """The cached (snapshot, active), or None when it must be read."""
        entry = self._entries.get(id_tag)
        if entry is None or (need_active and entry[1] is None) or self.clock.seconds() - entry[2] >= self.ttl:
            self.stats["misses"] += 1
            return None
        self.stats["hits"] += 1
        return entry

    def put(self, id_tag: str, snapshot, active, generation: int) -> None:
        if self.ttl <= 0 or generation != self.generation:
            return  # something changed while this was being read
        if len(self._entries) >= self.max_entries and id_tag not in self._entries:
            self.clear()
        self._entries[id_tag] = (snapshot, active, self.clock.seconds())
        self._by_lower.setdefault(id_tag.lower(), set()).add(id_tag)

    def invalidate(self, id_tag: str | None = None) -> None:
        """Forget ``id_tag`` (any case), and let no lookup in flight store what it read."""
        self.generation += 1
        if id_tag is not None:
            for key in self._by_lower.pop(id_tag.lower(), ()):
                self._entries.pop(key, None)

    def set_active(self, id_tag: str, active: bool | None) -> None:
        """A transaction with ``id_tag`` started (True) or stopped (None: others may still be open).

        The tag itself did not change, so its snapshot stays; only the ConcurrentTx answer does.
        """
        self.generation += 1
        for key in self._by_lower.get(id_tag.lower(), ()):
            snapshot, _, stored_at = self._entries[key]
            self._entries[key] = (snapshot, active, stored_at)

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()
        self._by_lower.clear()


class _Alone:
    """No other node to tell (a store made without ``cluster``, as in unit tests)."""

    @staticmethod
    def publish(conn, topic: str, data: dict) -> None:
        pass


# Hot-path statements are built once, with bind parameters: building a SQLAlchemy statement per
# message costs several times more CPU than executing it (see docs/benchmarks.md).
_TAG_EXACT = select(id_tags).where(id_tags.c.id_tag == bindparam("tag"))
_TAG_ANY_CASE = (select(id_tags).where(func.lower(id_tags.c.id_tag) == func.lower(bindparam("tag")))
                 .order_by(id_tags.c.id_tag).limit(1))
# Only a start that was Accepted holds its tag (ConcurrentTx): one refused (ConcurrentTx, Invalid, Blocked,
# Expired) delivers no energy, and its station may never stop it.
_HOLDS_TAG = and_(func.lower(transactions.c.id_tag) == func.lower(bindparam("tag")),
                  transactions.c.stopped_at.is_(None), transactions.c.id_tag_status == "Accepted")
_ACTIVE_FOR_TAG = select(transactions.c.id).where(_HOLDS_TAG).limit(1)
_ACTIVE_FOR_TAG_ELSEWHERE = (select(transactions.c.id).where(
    _HOLDS_TAG,
    or_(transactions.c.station_id != bindparam("station"), transactions.c.connector_id != bindparam("connector")))
    .limit(1))
# PostgreSQL commits on several pool threads at once: two starts with one tag take this lock (on the
# lower-cased tag, as ConcurrentTx compares) before the check, so the second sees the first's row. It is
# held until the commit. SQLite has one writer thread, whose functions run one after the other.
_LOCK_ID_TAG = select(func.pg_advisory_xact_lock(func.hashtext("csms.core.id_tag"),
                                                 func.hashtext(func.lower(bindparam("tag")))))
_EXISTING_START = select(transactions).where(
    transactions.c.station_id == bindparam("station"), transactions.c.connector_id == bindparam("connector"),
    transactions.c.id_tag == bindparam("tag"), transactions.c.started_at == bindparam("started_at"),
    transactions.c.meter_start == bindparam("meter_start"))
_START_KEY = ("station_id", "connector_id", "id_tag", "started_at", "meter_start")
_TRANSACTION_BY_ID = select(transactions).where(transactions.c.id == bindparam("tx"))
_TRANSACTION_ROW_OF_STATION = select(transactions).where(transactions.c.id == bindparam("tx"),
                                                         transactions.c.station_id == bindparam("station"))
_STOP = update(transactions).where(transactions.c.id == bindparam("tx")).values(
    meter_stop=bindparam("b_meter_stop"), stopped_at=bindparam("b_stopped_at"),
    stop_reason=bindparam("b_reason"), stop_id_tag=bindparam("b_id_tag"),
    stop_received_at=bindparam("b_received_at"), stopped_by=bindparam("b_stopped_by"))
# The transactions of a station its BootNotification closes: the open ones that were not Accepted.
_CLOSE_REFUSED = (update(transactions).where(
    transactions.c.station_id == bindparam("station"), transactions.c.stopped_at.is_(None),
    transactions.c.id_tag_status != "Accepted")
    .values(stopped_at=bindparam("b_at"), stop_reason=REBOOT, stop_received_at=bindparam("b_at"),
            stopped_by=STOPPED_BY_BOOT)
    .returning(*transactions.c))
_TRANSACTION_OF_STATION = select(transactions.c.id).where(transactions.c.id == bindparam("tx"),
                                                          transactions.c.station_id == bindparam("station"))
_CONNECTOR_STATUS = select(connectors.c.status).where(connectors.c.station_id == bindparam("station"),
                                                      connectors.c.connector_id == bindparam("connector"))
_INSERT_STATUS_HISTORY = insert(status_history)


def _find_id_tag(conn, id_tag: str):
    """The stored tag ``id_tag`` names: the exact one, else one that differs only in case.

    IdToken is a CiString20Type (OCPP 1.6 §7.28): readers that send 04a1b2 and 04A1B2 mean the same card.
    """
    row = conn.execute(_TAG_EXACT, {"tag": id_tag}).first()
    if row is None:
        row = conn.execute(_TAG_ANY_CASE, {"tag": id_tag}).first()
    return row


def _active_for_tag(conn, id_tag: str, exclude_station: str | None = None, exclude_connector: int | None = None):
    # Case-insensitive like every IdToken comparison (served by core_transactions_id_tag_ci_open).
    if exclude_station is None:
        return conn.execute(_ACTIVE_FOR_TAG, {"tag": id_tag}).first() is not None
    return conn.execute(_ACTIVE_FOR_TAG_ELSEWHERE, {"tag": id_tag, "station": exclude_station,
                                                    "connector": exclude_connector}).first() is not None


METER_COLUMNS = ("station_id", "connector_id", "transaction_id", "timestamp", "value", "measurand", "phase",
                 "unit", "context", "location", "format")


def _meter_rows(station_id: str, connector_id: int, transaction_id, meter_value_list: list) -> list[tuple]:
    """One row (in METER_COLUMNS order) per sampled value, with OCPP 1.6's defaults filled in (§7.45)."""
    rows = []
    for meter_value in meter_value_list:
        timestamp = parse_datetime(meter_value["timestamp"])
        for sample in meter_value["sampledValue"]:
            get = sample.get
            rows.append((station_id, connector_id, transaction_id, timestamp, sample["value"],
                         get("measurand", "Energy.Active.Import.Register"), get("phase"), get("unit", "Wh"),
                         get("context", "Sample.Periodic"), get("location", "Outlet"), get("format", "Raw")))
    return rows


#: A row of METER_COLUMNS by name, as a stored sample reads.
_Sample = namedtuple("_Sample", METER_COLUMNS)
#: The sampled value's fields an event gives, OCPP's names for the columns.
_SAMPLE_FIELDS = ("value", "context", "format", "measurand", "phase", "location", "unit")
METER_VALUES_RECEIVED = "meter_values.received"


def meter_value_events(samples) -> list[tuple[int, dict]]:
    """The ``meter_values.received`` events of stored samples (rows with METER_COLUMNS' names, in the
    order they were stored): one per meter value, i.e. per run of samples of one station, connector,
    transaction and time, as ``(index of its first sample, data)``. The data is OCPP's MeterValues shape
    for that one meter value, its sampled values as stored (OCPP's defaults filled in; ``phase`` only
    when given). Made the same from the samples a request stores (PostgreSQL: the outbox row written with
    them) and from the stored rows read back (SQLite: StoredRows), so that both say the same."""
    made: list[tuple[int, dict]] = []
    current = None
    for index, sample in enumerate(samples):
        group = (sample.station_id, sample.connector_id, sample.transaction_id, sample.timestamp)
        if group != current:
            current = group
            sampled: list[dict] = []
            made.append((index, {"station_id": sample.station_id, "connector_id": sample.connector_id,
                                 "transaction_id": sample.transaction_id,
                                 "meter_value": [{"timestamp": format_datetime(as_utc(sample.timestamp)),
                                                  "sampledValue": sampled}]}))
        sampled.append({name: getattr(sample, name) for name in _SAMPLE_FIELDS
                        if name != "phase" or sample.phase is not None})
    return made


#: Where meter values events can be read from: the stored samples (see csms.outbox.StoredRows).
METER_VALUE_ROWS = StoredRows(meter_values, meter_values.c.id, meter_value_events, f"{__name__}:METER_VALUE_ROWS")


def _add_meter_value_events(outbox: Outbox, conn, rows: list[tuple]) -> None:
    """The events of the samples ``rows`` (METER_COLUMNS tuples) a transaction stores, into the outbox:
    nothing to make where nobody wants them written (see StoredRows)."""
    if rows and outbox.wanted(METER_VALUES_RECEIVED):
        for _, data in meter_value_events([_Sample(*row) for row in rows]):
            outbox.add(conn, METER_VALUES_RECEIVED, data)


def energy_wh(meter_start: int, meter_stop: int | None) -> int | None:
    """The energy a transaction delivered (Wh): None without a meter reading, never below 0 (a meter
    reading below the start's, as after a meter's replacement, says nothing about the energy)."""
    return None if meter_stop is None else max(0, meter_stop - meter_start)


def transaction_event(transaction: dict) -> dict:
    """A transaction as the outbox announces it: its columns, times as ISO 8601, and once stopped the
    energy delivered (Wh, None without a meter reading) and the duration (seconds)."""
    data = event_data(transaction)
    if transaction.get("stopped_at") is not None:
        meter_stop = transaction.get("meter_stop")
        data["energy_wh"] = energy_wh(transaction["meter_start"], meter_stop)
        data["duration_seconds"] = (transaction["stopped_at"] - transaction["started_at"]).total_seconds()
    return data


def id_tag_event(id_tag: str, change: str, tag: dict | None) -> dict:
    data = {"id_tag": id_tag, "change": change}
    if tag is not None:
        data.update(event_data(tag, leave_out=("id_tag",)))
    return data


def register_event_types(outbox: Outbox) -> None:
    """The Core profile's events (docs/webhooks.md shows each payload)."""
    register = outbox.register
    register("station.booted", "A BootNotification was stored; `status` is the answer it gets.",
             {"station_id": "CP-1", "status": "Accepted", "charge_point_vendor": "ACME", "charge_point_model": "X1",
              "firmware_version": "1.2.3", "boot_count": 4}, owner="core")
    register("connector.status_changed", "A StatusNotification changed a connector's status (or reported a "
             "connector for the first time: `previous_status` null).",
             {"station_id": "CP-1", "connector_id": 1, "status": "Charging", "previous_status": "Preparing",
              "error_code": "NoError", "info": None, "timestamp": "2026-12-01T10:00:00.000Z"}, owner="core")
    register("transaction.started", "A new transaction was stored (not a retransmitted StartTransaction).",
             {"station_id": "CP-1", "transaction_id": 42, "connector_id": 1, "id_tag": "04A1B2C3",
              "id_tag_status": "Accepted", "meter_start": 1000, "started_at": "2026-12-01T10:00:00.000Z"},
             owner="core")
    register("transaction.stopped", "A transaction was closed (by its station, an operator, or a reboot).",
             {"station_id": "CP-1", "transaction_id": 42, "connector_id": 1, "id_tag": "04A1B2C3",
              "meter_start": 1000, "meter_stop": 13500, "energy_wh": 12500, "duration_seconds": 5400.0,
              "started_at": "2026-12-01T10:00:00.000Z", "stopped_at": "2026-12-01T11:30:00.000Z",
              "stop_reason": "Local", "stopped_by": "station"}, owner="core")
    register(METER_VALUES_RECEIVED, "A meter value was stored (from MeterValues or a StopTransaction's "
             "transactionData): the samples a station took at one time on one connector, as stored (OCPP's "
             "defaults filled in). Opt-in (name it in a subscription's event_types) and delivered in batches.",
             {"station_id": "CP-1", "connector_id": 1, "transaction_id": 42,
              "meter_value": [{"timestamp": "2026-12-01T10:15:00.000Z",
                               "sampledValue": [{"value": "3750", "context": "Sample.Periodic", "format": "Raw",
                                                 "measurand": "Energy.Active.Import.Register",
                                                 "location": "Outlet", "unit": "Wh"}]}]},
             opt_in=True, owner="core",
             source=METER_VALUE_ROWS)
    register("id_tag.changed", "An id tag was created, updated or deleted (`change`).",
             {"id_tag": "04A1B2C3", "change": "updated", "status": "Blocked", "expiry_date": None,
              "parent_id_tag": None, "description": "Fleet card 17"}, owner="core")


#: The cluster topic telling the other nodes an id tag's cached answer is stale: ``{"id_tag": tag}``
#: (the tag was written, or a transaction holding it started or stopped), ``{"id_tag": None}`` for all.
ID_TAG_TOPIC = "core.id_tag"


class CoreStore:
    def __init__(self, db, clock, concurrent_tx: bool = True, id_tag_cache_seconds: float = 60.0,
                 outbox: Outbox | None = None, cluster=None):
        self.db = db
        self.clock = clock
        #: The other nodes hear of every change that makes their IdTagCache stale (csms.cluster); on one
        #: node publishing does nothing.
        self.cluster = cluster if cluster is not None else _Alone()
        #: Events are added in the same thd as the change they announce (csms.outbox).
        self.outbox = outbox if outbox is not None else Outbox()
        self.concurrent_tx = concurrent_tx
        self.tag_cache = IdTagCache(clock, id_tag_cache_seconds)
        #: transaction id -> its station, for transactions seen by this process (MeterValues' link check)
        self._transaction_owner: dict[int, str] = {}
        # A copy of a start still in flight on another connection (PostgreSQL) makes this insert nothing:
        # the start is then read back, not refused by the unique key.
        self._insert_start = (db.insert(transactions).on_conflict_do_nothing(index_elements=list(_START_KEY))
                              .returning(transactions.c.id))
        self._lock_id_tags = not db.is_sqlite
        #: lower-cased id tag -> how many writes of it are queued or running. On PostgreSQL the pool runs
        #: functions on several threads, so a lookup queued after a write could otherwise run before that
        #: write commits and answer with the tag as it was.
        self._tag_writes: dict[str, int] = {}
        self._tag_write_waiters: dict[str, list] = {}

    def _changing_tag(self, d, id_tag: str):
        """Drop ``id_tag`` from the cache now (the write is queued) and again once it is committed; lookups
        of the tag asked for meanwhile wait for the write (:meth:`_after_tag_writes`)."""
        cache = self.tag_cache
        cache.invalidate(id_tag)
        key = id_tag.lower()
        self._tag_writes[key] = self._tag_writes.get(key, 0) + 1

        def done(result):
            cache.invalidate(id_tag)
            left = self._tag_writes.pop(key) - 1
            if left:
                self._tag_writes[key] = left
            else:
                for waiter in self._tag_write_waiters.pop(key, ()):
                    waiter.callback(None)
            return result
        return d.addBoth(done)

    def _after_tag_writes(self, id_tag: str):
        """None when no write of ``id_tag`` is under way, else a Deferred firing once none is."""
        key = id_tag.lower()
        if key not in self._tag_writes:
            return None
        waiter = defer.Deferred()
        self._tag_write_waiters.setdefault(key, []).append(waiter)
        return waiter

    def _changing_active(self, d, id_tag: str | None, active_of_result):
        """A transaction write: the tags it touches keep their snapshot, their ConcurrentTx answer
        becomes unknown while it is queued and ``active_of_result(result)`` -> (tag, active) after."""
        cache = self.tag_cache

        def unknown(tag):
            if tag is None:
                cache.invalidate()  # no tag to mark: just keep lookups in flight from being cached
            else:
                cache.set_active(tag, None)
        unknown(id_tag)

        def committed(result):
            tag, active = active_of_result(result)
            if tag is not None:
                cache.set_active(tag, active)
            return result

        def failed(failure):
            unknown(id_tag)
            return failure
        return d.addCallbacks(committed, failed)

    def _tag_changed(self, conn, id_tag: str | None) -> None:
        """Inside the change's transaction: the other nodes drop the tag from their cache once it commits."""
        self.cluster.publish(conn, ID_TAG_TOPIC, {"id_tag": id_tag})

    def tag_changed_elsewhere(self, data: dict, origin: str) -> None:
        """A ``core.id_tag`` message from another node: what this node holds of the tag is stale."""
        id_tag = data.get("id_tag")
        if id_tag is None:
            self.tag_cache.clear()
        else:
            self.tag_cache.invalidate(id_tag)

    def now(self) -> datetime:
        from datetime import timezone
        return datetime.fromtimestamp(self.clock.seconds(), tz=timezone.utc)

    # -- BootNotification / StatusNotification ------------------------------------------------

    def record_boot(self, station_id: str, payload: dict, status: str):
        """Store a BootNotification; fires the transactions it closed (dicts, oldest first).

        A start that was not Accepted holds no tag (ConcurrentTx), but its station may never stop it; a
        station that boots has ended every session it had, so those transactions are closed here
        (``stopped_by`` "boot", reason Reboot, no meter reading). Should the station's own
        StopTransaction come after all, its values replace these. Accepted transactions stay open: a
        station sends their StopTransactions after its boot.
        """
        now = self.now()
        values = {
            "charge_point_vendor": payload["chargePointVendor"],
            "charge_point_model": payload["chargePointModel"],
            "charge_point_serial_number": payload.get("chargePointSerialNumber"),
            "charge_box_serial_number": payload.get("chargeBoxSerialNumber"),
            "firmware_version": payload.get("firmwareVersion"),
            "iccid": payload.get("iccid"), "imsi": payload.get("imsi"),
            "meter_type": payload.get("meterType"), "meter_serial_number": payload.get("meterSerialNumber"),
            "last_boot_at": now, "last_boot_status": status,
        }

        def thd(conn):
            count = conn.execute(select(boot_info.c.boot_count).where(boot_info.c.station_id == station_id)).scalar()
            self.db.upsert(conn, boot_info, {"station_id": station_id}, {**values, "boot_count": (count or 0) + 1})
            closed = conn.execute(_CLOSE_REFUSED, {"station": station_id, "b_at": now}).fetchall()
            closed = [transaction_dict(row) for row in sorted(closed, key=lambda row: row.id)]
            self.outbox.add(conn, "station.booted", {
                "station_id": station_id, "boot_count": (count or 0) + 1,
                "status": status,
                **event_data(values, leave_out=("last_boot_status", "last_boot_at"))})
            for transaction in closed:
                self.outbox.add(conn, "transaction.stopped", transaction_event(transaction))
            return closed
        return self.db.run(thd, desc="core_boot")

    def record_status(self, station_id: str, payload: dict):
        """Store a StatusNotification; fires with the connector's previous status (None if new)."""
        now = self.now()
        timestamp = parse_datetime(payload["timestamp"]) if payload.get("timestamp") else None
        connector_id = payload["connectorId"]
        values = {
            "status": payload["status"], "error_code": payload["errorCode"], "info": payload.get("info"),
            "vendor_id": payload.get("vendorId"), "vendor_error_code": payload.get("vendorErrorCode"),
        }

        def thd(conn):
            previous = conn.execute(_CONNECTOR_STATUS, {"station": station_id, "connector": connector_id}).scalar()
            self.db.upsert(conn, connectors, {"station_id": station_id, "connector_id": connector_id},
                           {**values, "status_timestamp": timestamp or now, "updated_at": now})
            conn.execute(_INSERT_STATUS_HISTORY, dict(station_id=station_id, connector_id=connector_id,
                                                      timestamp=timestamp, received_at=now, **values))
            if previous != values["status"]:
                self.outbox.add(conn, "connector.status_changed", {
                    "station_id": station_id, "connector_id": connector_id, "status": values["status"],
                    "previous_status": previous, "error_code": values["error_code"], "info": values["info"],
                    "timestamp": format_datetime(timestamp or now)})
            return previous
        return self.db.run(thd, desc="core_status")

    # -- id tags -----------------------------------------------------------------------------

    def id_tag_info(self, id_tag: str, check_concurrent: bool):
        """idTagInfo for ``id_tag``; ConcurrentTx when asked and it has an open transaction.

        Answered from :class:`IdTagCache` when it can be (a Deferred that has already fired).
        """
        answer = self.cached_id_tag_info(id_tag, check_concurrent)
        if answer is not None:
            return defer.succeed(answer)
        pending = self._after_tag_writes(id_tag)
        if pending is not None:
            return pending.addCallback(lambda _: self.id_tag_info(id_tag, check_concurrent))
        now = self.now()
        concurrent = check_concurrent and self.concurrent_tx
        cache = self.tag_cache
        generation = cache.generation

        def thd(conn):
            snapshot = _tag_snapshot(_find_id_tag(conn, id_tag))
            active = None
            if concurrent:
                # Only an Accepted tag can be ConcurrentTx, so only then is the question asked.
                active = snapshot is not None and snapshot[0] == "Accepted" and _active_for_tag(conn, id_tag)
            return snapshot, active

        def read(result):
            snapshot, active = result
            cache.put(id_tag, snapshot, active, generation)
            return self._tag_info(snapshot, active, now, concurrent)
        return self.db.run(thd, desc="core_id_tag_info").addCallback(read)

    def cached_id_tag_info(self, id_tag: str, check_concurrent: bool) -> dict | None:
        """idTagInfo from :class:`IdTagCache` alone, or None when the database must be asked."""
        concurrent = check_concurrent and self.concurrent_tx
        entry = self.tag_cache.get(id_tag, concurrent)
        if entry is None:
            return None
        return self._tag_info(entry[0], entry[1], self.now(), concurrent)

    @staticmethod
    def _tag_info(snapshot, active, now: datetime, concurrent: bool) -> dict:
        info = id_tag_info_from(snapshot, now)
        if concurrent and active and info["status"] == "Accepted":
            info["status"] = "ConcurrentTx"
        return info

    def put_id_tag(self, id_tag: str, status: str = "Accepted", expiry_date: datetime | None = None,
                   parent_id_tag: str | None = None, description: str | None = None, replace: bool = True):
        """Create or replace an id tag; fires True when it was created. ``replace=False``: leave an existing
        one as it is (fires False)."""
        now = self.now()

        def thd(conn):
            values = {"status": status, "expiry_date": expiry_date, "parent_id_tag": parent_id_tag,
                      "description": description, "updated_at": now}
            # Insert unless it exists, in one statement: two puts of a new tag at once (two operators, two
            # nodes) make one "created" and one "updated", never a unique-key error.
            created = conn.execute(self.db.insert(id_tags).values(id_tag=id_tag, created_at=now, **values)
                                   .on_conflict_do_nothing(index_elements=["id_tag"])
                                   .returning(id_tags.c.id_tag)).first() is not None
            exists = not created
            if exists and not replace:
                return False
            if exists:
                conn.execute(update(id_tags).where(id_tags.c.id_tag == id_tag).values(**values))
            self.outbox.add(conn, "id_tag.changed",
                            id_tag_event(id_tag, "updated" if exists else "created", values))
            self._tag_changed(conn, id_tag)
            return not exists
        return self._changing_tag(self.db.run(thd, desc="core_put_id_tag"), id_tag)

    def update_id_tag(self, id_tag: str, **values):
        """Update some fields of an id tag; fires the updated tag, or None when it does not exist."""
        values["updated_at"] = self.now()

        def thd(conn):
            if conn.execute(update(id_tags).where(id_tags.c.id_tag == id_tag).values(**values)).rowcount == 0:
                return None
            tag = id_tag_dict(conn.execute(select(id_tags).where(id_tags.c.id_tag == id_tag)).first())
            self.outbox.add(conn, "id_tag.changed", id_tag_event(id_tag, "updated", tag))
            self._tag_changed(conn, id_tag)
            return tag
        return self._changing_tag(self.db.run(thd, desc="core_update_id_tag"), id_tag)

    def get_id_tag(self, id_tag: str):
        def thd(conn):
            row = conn.execute(select(id_tags).where(id_tags.c.id_tag == id_tag)).first()
            return None if row is None else id_tag_dict(row)
        return self.db.run(thd, desc="core_get_id_tag")

    def delete_id_tag(self, id_tag: str):
        def thd(conn):
            deleted = conn.execute(delete(id_tags).where(id_tags.c.id_tag == id_tag)).rowcount > 0
            if deleted:
                self.outbox.add(conn, "id_tag.changed", id_tag_event(id_tag, "deleted", None))
                self._tag_changed(conn, id_tag)
            return deleted
        return self._changing_tag(self.db.run(thd, desc="core_delete_id_tag"), id_tag)

    def list_id_tags(self, limit: int = 100, offset: int = 0, status: str | None = None,
                     parent_id_tag: str | None = None, id_tags_in: list[str] | None = None,
                     search: str | None = None):
        """(total, tags) ordered by id tag; ``search``: tags containing that text, ignoring case."""
        def thd(conn):
            query = select(id_tags)
            if search:
                query = query.where(func.lower(id_tags.c.id_tag).contains(search.lower(), autoescape=True))
            if status is not None:
                query = query.where(id_tags.c.status == status)
            if parent_id_tag is not None:
                query = query.where(id_tags.c.parent_id_tag == parent_id_tag)
            if id_tags_in is not None:
                query = query.where(id_tags.c.id_tag.in_(id_tags_in))
            total = conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
            rows = conn.execute(query.order_by(id_tags.c.id_tag).limit(limit).offset(offset)).fetchall()
            return total, [id_tag_dict(r) for r in rows]
        return self.db.run(thd, desc="core_list_id_tags")

    # -- transactions ------------------------------------------------------------------------

    def start_transaction(self, station_id: str, payload: dict, info: dict):
        """Fires (transaction dict, created). A retransmitted start returns the stored one, created=False,
        whichever connection it came on and even while the first copy is still being stored.

        ConcurrentTx is decided here, atomically with the insert (see _LOCK_ID_TAG): an Accepted tag
        that an Accepted transaction elsewhere holds gets ConcurrentTx.
        """
        now = self.now()
        started_at = parse_datetime(payload["timestamp"])
        connector_id, id_tag, meter_start = payload["connectorId"], payload["idTag"], payload["meterStart"]
        key = {"station": station_id, "connector": connector_id, "tag": id_tag, "started_at": started_at,
               "meter_start": meter_start}
        check_concurrent = self.concurrent_tx and info["status"] == "Accepted"
        lock = check_concurrent and self._lock_id_tags

        def thd(conn):
            if lock:
                conn.execute(_LOCK_ID_TAG, {"tag": id_tag})
            existing = conn.execute(_EXISTING_START, key).first()
            if existing is not None:
                return transaction_dict(existing), False
            status = info["status"]
            if check_concurrent and _active_for_tag(conn, id_tag, station_id, connector_id):
                status = "ConcurrentTx"
            values = dict(station_id=station_id, connector_id=connector_id, id_tag=id_tag,
                          id_tag_status=status, parent_id_tag=info.get("parentIdTag"),
                          reservation_id=payload.get("reservationId"), meter_start=meter_start,
                          started_at=started_at, received_at=now)
            transaction_id = conn.execute(self._insert_start, values).scalar()
            if transaction_id is None:  # another connection's copy committed it meanwhile
                return transaction_dict(conn.execute(_EXISTING_START, key).first()), False
            transaction = transaction_dict(conn.execute(_TRANSACTION_BY_ID, {"tx": transaction_id}).first())
            self.outbox.add(conn, "transaction.started", transaction_event(transaction))
            if status == "Accepted":  # it holds the tag now: ConcurrentTx elsewhere
                self._tag_changed(conn, id_tag)
            return transaction, True

        def started(result):
            self._remember_owner(result[0]["transaction_id"], station_id)
            return result
        # An Accepted start holds its tag now; a refused one changes nothing the cache can know of.
        return self._changing_active(self.db.run(thd, desc="core_start_transaction"), id_tag,
                                     lambda result: (id_tag, True if _holds_tag(result[0]) else None)
                                     ).addCallback(started)

    def stop_transaction(self, station_id: str, payload: dict, stopped_by: str = "station"):
        """Fires (transaction dict or None, newly_stopped). An unknown transaction is kept in core_unmatched_stops."""
        now = self.now()
        transaction_id = payload["transactionId"]
        stopped_at = parse_datetime(payload["timestamp"])
        transaction_data = payload.get("transactionData") or []

        def thd(conn):
            row = conn.execute(_TRANSACTION_ROW_OF_STATION, {"tx": transaction_id, "station": station_id}).first()
            if row is None:
                conn.execute(self.db.insert(unmatched_stops).values(
                    station_id=station_id, transaction_id=transaction_id, id_tag=payload.get("idTag"),
                    meter_stop=payload["meterStop"], timestamp=stopped_at, reason=payload.get("reason"),
                    received_at=now).on_conflict_do_nothing())
                rows = _meter_rows(station_id, 0, None, transaction_data)
                if rows:
                    self.db.insert_many(conn, meter_values, METER_COLUMNS, rows, skip_duplicates=True)
                    _add_meter_value_events(self.outbox, conn, rows)
                return None, False
            newly_stopped = row.stopped_at is None
            # A retransmitted stop, or one after an operator closed the transaction, leaves the first close;
            # the station's own stop replaces a boot's (whose event was fired then).
            if newly_stopped or row.stopped_by == STOPPED_BY_BOOT:
                conn.execute(_STOP, {"tx": transaction_id, "b_meter_stop": payload["meterStop"],
                                     "b_stopped_at": stopped_at, "b_reason": payload.get("reason", "Local"),
                                     "b_id_tag": payload.get("idTag"), "b_received_at": now,
                                     "b_stopped_by": stopped_by})
                row = conn.execute(_TRANSACTION_BY_ID, {"tx": transaction_id}).first()
            # Samples already stored (a resend) are not stored twice; any others are kept.
            rows = _meter_rows(station_id, row.connector_id, transaction_id, transaction_data)
            if rows:
                self.db.insert_many(conn, meter_values, METER_COLUMNS, rows, skip_duplicates=True)
                _add_meter_value_events(self.outbox, conn, rows)
            transaction = transaction_dict(row)
            if newly_stopped:
                self.outbox.add(conn, "transaction.stopped", transaction_event(transaction))
                if transaction["id_tag_status"] == "Accepted":  # it held its tag until now
                    self._tag_changed(conn, transaction["id_tag"])
            return transaction, newly_stopped
        # Another transaction with the tag may still be open: unknown until asked again.
        return self._changing_active(self.db.run(thd, desc="core_stop_transaction"), payload.get("idTag"),
                                     lambda result: (result[0]["id_tag"] if result[0] else None, None))

    def meter_stop_estimates(self, closed: list[dict]):
        """Fires with {transaction id: Wh} for transactions closed without a meter reading: the highest
        energy register reading stored for each (see :func:`_energy_readings`), never below its meterStart."""
        if not closed:
            return defer.succeed({})
        meter_start = {transaction["transaction_id"]: transaction["meter_start"] for transaction in closed}

        def thd(conn):
            estimates = dict(meter_start)
            for transaction_id, wh in _energy_readings(conn, list(meter_start)):
                estimates[transaction_id] = max(estimates[transaction_id], wh)
            return estimates
        return self.db.run(thd, desc="core_meter_stop_estimates")

    def record_meter_values(self, station_id: str, payload: dict):
        """Store MeterValues; fires the transaction id they were linked to.

        Samples are linked to the request's transactionId only when that transaction is this station's:
        otherwise (a station's bug, or a forged id) they would show up in another station's transaction.
        """
        transaction_id = payload.get("transactionId")
        # A transaction never changes station, so an owner seen once needs no query again.
        known = transaction_id is not None and self._transaction_owner.get(transaction_id) == station_id

        def thd(conn):
            linked = transaction_id
            if linked is not None and not known and conn.execute(
                    _TRANSACTION_OF_STATION, {"tx": linked, "station": station_id}).first() is None:
                linked = None
            rows = _meter_rows(station_id, payload["connectorId"], linked, payload["meterValue"])
            if rows:
                self.db.insert_many(conn, meter_values, METER_COLUMNS, rows, skip_duplicates=True)
                _add_meter_value_events(self.outbox, conn, rows)
            return linked

        d = self.db.run(thd, desc="core_meter_values")
        if known or transaction_id is None:
            return d

        def stored(linked):
            if linked is not None:
                self._remember_owner(linked, station_id)
            return linked
        return d.addCallback(stored)

    def _remember_owner(self, transaction_id: int, station_id: str) -> None:
        if len(self._transaction_owner) >= 100_000:
            self._transaction_owner.clear()
        self._transaction_owner[transaction_id] = station_id

    def active_transactions(self, station_id: str):
        def thd(conn):
            rows = conn.execute(select(transactions).where(transactions.c.station_id == station_id,
                                                           transactions.c.stopped_at.is_(None))
                                .order_by(transactions.c.id)).fetchall()
            return [transaction_dict(r) for r in rows]
        return self.db.run(thd, desc="core_active_transactions")

    def get_transaction(self, transaction_id: int):
        def thd(conn):
            row = conn.execute(select(transactions).where(transactions.c.id == transaction_id)).first()
            return None if row is None else transaction_dict(row)
        return self.db.run(thd, desc="core_get_transaction")

    def connector_ids(self, station_id: str):
        def thd(conn):
            return [r[0] for r in conn.execute(
                select(connectors.c.connector_id).where(connectors.c.station_id == station_id,
                                                        connectors.c.connector_id > 0)
                .order_by(connectors.c.connector_id))]
        return self.db.run(thd, desc="core_connector_ids")

    def connectors(self, station_id: str):
        def thd(conn):
            rows = conn.execute(select(connectors).where(connectors.c.station_id == station_id)
                                .order_by(connectors.c.connector_id)).fetchall()
            return [_row(r, "status_timestamp", "updated_at") for r in rows]
        return self.db.run(thd, desc="core_connectors")

    def boot_info(self, station_id: str):
        def thd(conn):
            row = conn.execute(select(boot_info).where(boot_info.c.station_id == station_id)).first()
            return None if row is None else _row(row, "last_boot_at")
        return self.db.run(thd, desc="core_boot_info")

    # -- results of CSMS-initiated calls ---------------------------------------------------------

    def record_configuration(self, station_id: str, keys: list[dict], unknown: list[str]):
        now = self.now()

        def thd(conn):
            for entry in keys:
                self.db.upsert(conn, configuration, {"station_id": station_id, "key": entry["key"]},
                               {"value": entry.get("value"), "readonly": entry.get("readonly"), "known": True,
                                "updated_at": now})
            for key in unknown:
                self.db.upsert(conn, configuration, {"station_id": station_id, "key": key},
                               {"value": None, "readonly": None, "known": False, "updated_at": now})
        return self.db.run(thd, desc="core_configuration")

    def set_configuration_value(self, station_id: str, key: str, value: str):
        now = self.now()

        def thd(conn):
            self.db.upsert(conn, configuration, {"station_id": station_id, "key": key},
                           {"value": value, "known": True, "updated_at": now})
        return self.db.run(thd, desc="core_configuration_set")

    def configuration(self, station_id: str):
        def thd(conn):
            rows = conn.execute(select(configuration).where(configuration.c.station_id == station_id)
                                .order_by(configuration.c.key)).fetchall()
            return [_row(r, "updated_at") for r in rows]
        return self.db.run(thd, desc="core_configuration_get")

    def set_requested_availability(self, station_id: str, connector_id: int, availability: str):
        now = self.now()

        def thd(conn):
            self.db.upsert(conn, connectors, {"station_id": station_id, "connector_id": connector_id},
                           {"requested_availability": availability, "updated_at": now})
            if connector_id == 0:
                conn.execute(update(connectors).where(connectors.c.station_id == station_id)
                             .values(requested_availability=availability))
        return self.db.run(thd, desc="core_availability")

    def delete_station(self, station_id: str):
        def thd(conn):
            for table in (boot_info, connectors, status_history, configuration, unmatched_stops):
                conn.execute(delete(table).where(table.c.station_id == station_id))
        return self.db.run(thd, desc="core_delete_station")

    # -- queries for the operator API ------------------------------------------------------------

    def list_transactions(self, limit: int = 50, offset: int = 0, station_id: str | None = None,
                          id_tag: str | None = None, active: bool | None = None,
                          since: datetime | None = None, until: datetime | None = None):
        """(total, transactions) newest first; each with ``latest_meter_values`` (the samples of its
        most recent meter value timestamp). ``since`` is inclusive, ``until`` exclusive (on started_at)."""
        def thd(conn):
            query = select_transactions(station_id, id_tag, active, since, until)
            total = conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
            rows = conn.execute(query.order_by(transactions.c.id.desc()).limit(limit).offset(offset)).fetchall()
            items = [transaction_dict(r) for r in rows]
            latest = _latest_meter_values(conn, [item["transaction_id"] for item in items])
            for item in items:
                item["latest_meter_values"] = latest.get(item["transaction_id"], [])
            return total, items
        return self.db.run(thd, desc="core_list_transactions")

    def transaction_with_meter_values(self, transaction_id: int):
        """One transaction with all its ``meter_values`` (oldest first), or None."""
        def thd(conn):
            row = conn.execute(select(transactions).where(transactions.c.id == transaction_id)).first()
            if row is None:
                return None
            data = transaction_dict(row)
            samples = conn.execute(select(meter_values).where(meter_values.c.transaction_id == transaction_id)
                                   .order_by(meter_values.c.timestamp, meter_values.c.id)).fetchall()
            data["meter_values"] = [_meter_value_dict(s) for s in samples]
            return data
        return self.db.run(thd, desc="core_transaction_meter_values")

    def status_history(self, station_id: str, limit: int = 50, offset: int = 0, connector_id: int | None = None):
        """(total, StatusNotifications as received) newest first."""
        def thd(conn):
            query = select(status_history).where(status_history.c.station_id == station_id)
            if connector_id is not None:
                query = query.where(status_history.c.connector_id == connector_id)
            total = conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
            rows = conn.execute(query.order_by(status_history.c.id.desc()).limit(limit).offset(offset)).fetchall()
            return total, [_row(r, "timestamp", "received_at") for r in rows]
        return self.db.run(thd, desc="core_status_history")

    def unmatched_stops(self, station_id: str, limit: int = 50, offset: int = 0):
        """(total, StopTransactions for transactions the CSMS never knew) newest first."""
        def thd(conn):
            query = select(unmatched_stops).where(unmatched_stops.c.station_id == station_id)
            total = conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
            rows = conn.execute(query.order_by(unmatched_stops.c.id.desc()).limit(limit).offset(offset)).fetchall()
            return total, [_row(r, "timestamp", "received_at") for r in rows]
        return self.db.run(thd, desc="core_unmatched_stops")

    def stations_with_connectors(self, status: str | None, error: bool | None):
        """Ids of the stations with a connector (0, the station itself, too) in ``status`` and with (or
        without) an error."""
        def thd(conn):
            query = select(connectors.c.station_id).distinct()
            if status is not None:
                query = query.where(connectors.c.status == status)
            if error is not None:
                query = query.where((connectors.c.error_code != "NoError") if error else
                                    (connectors.c.error_code == "NoError"))
            return [row[0] for row in conn.execute(query)]
        return self.db.run(thd, desc="core_stations_with_connectors")

    def station_details(self, station_ids: list[str]):
        """{station_id: {"boot": ..., "connectors": [...], "active_transaction_ids": [...]}} for the API."""
        def thd(conn):
            out = {sid: {"boot": None, "connectors": [], "active_transaction_ids": []} for sid in station_ids}
            for row in conn.execute(select(boot_info).where(boot_info.c.station_id.in_(station_ids))):
                data = _row(row, "last_boot_at")
                out[data.pop("station_id")]["boot"] = data
            for row in conn.execute(select(connectors).where(connectors.c.station_id.in_(station_ids))
                                    .order_by(connectors.c.station_id, connectors.c.connector_id)):
                data = _row(row, "status_timestamp", "updated_at")
                out[data.pop("station_id")]["connectors"].append(data)
            for station_id, transaction_id in conn.execute(
                    select(transactions.c.station_id, transactions.c.id)
                    .where(transactions.c.station_id.in_(station_ids), transactions.c.stopped_at.is_(None))
                    .order_by(transactions.c.id)):
                out[station_id]["active_transaction_ids"].append(transaction_id)
            return out
        return self.db.run(thd, desc="core_station_details")


def _meter_value_dict(row) -> dict:
    data = _row(row, "timestamp")
    for key in ("id", "station_id", "transaction_id"):
        data.pop(key, None)
    return data


#: What a meter reading of a transaction's energy looks like (OCPP 1.6 §7.45, §7.31): the connector's
#: own register (all phases, at the outlet), as a plain number in Wh or kWh.
_ENERGY_READINGS = select(meter_values.c.transaction_id, meter_values.c.value, meter_values.c.unit).where(
    meter_values.c.transaction_id.in_(bindparam("txs", expanding=True)),
    meter_values.c.measurand == "Energy.Active.Import.Register", meter_values.c.phase.is_(None),
    meter_values.c.location == "Outlet", meter_values.c.format == "Raw", meter_values.c.unit.in_(("Wh", "kWh")))


def _energy_readings(conn, transaction_ids: list[int]):
    """(transaction id, Wh as an int) for each readable energy register sample of those transactions."""
    for transaction_id, value, unit in conn.execute(_ENERGY_READINGS, {"txs": transaction_ids}):
        try:
            wh = float(value) * (1000 if unit == "kWh" else 1)
        except ValueError:
            continue  # a station's value that is no number: no reading
        if math.isfinite(wh):
            yield transaction_id, int(wh)


def _latest_meter_values(conn, transaction_ids: list[int]) -> dict:
    """{transaction_id: [samples at that transaction's latest meter value timestamp]}."""
    if not transaction_ids:
        return {}
    latest = (select(meter_values.c.transaction_id, func.max(meter_values.c.timestamp).label("at"))
              .where(meter_values.c.transaction_id.in_(transaction_ids))
              .group_by(meter_values.c.transaction_id).subquery())
    rows = conn.execute(select(meter_values).join(latest, and_(meter_values.c.transaction_id == latest.c.transaction_id,
                                                               meter_values.c.timestamp == latest.c.at))
                        .order_by(meter_values.c.id)).fetchall()
    out: dict = {}
    for row in rows:
        out.setdefault(row.transaction_id, []).append(_meter_value_dict(row))
    return out
