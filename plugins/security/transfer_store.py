"""Store of signed firmware updates and log uploads: every method returns a Deferred and runs its SQL on the pool."""
from __future__ import annotations

from sqlalchemy import delete, func, insert, select, update

from csms.ocpp16 import parse_datetime
from csms.outbox import Outbox
from csms.stations import as_utc

from .events import LOG_STATUS, SIGNED_FIRMWARE_STATUS
from .transfer_tables import log_requests, signed_firmware, signed_updates, transfer_history

#: A request's status before the station's first notification about it.
REQUESTED = "Requested"
FIRMWARE, LOG = "firmware", "log"
_TABLES = {FIRMWARE: signed_updates, LOG: log_requests}
#: Per kind: the webhook event type of a status notification, and the name of its request row's id there.
_STATUS_EVENTS = {FIRMWARE: (SIGNED_FIRMWARE_STATUS, "signed_update_id"), LOG: (LOG_STATUS, "log_request_id")}
_TIME_KEYS = ("created_at", "retrieve_date", "install_date", "requested_at", "status_at", "oldest_timestamp",
              "latest_timestamp", "received_at")


def _dict(row) -> dict | None:
    if row is None:
        return None
    data = dict(row._mapping)
    for key in _TIME_KEYS:
        if data.get(key) is not None:
            data[key] = as_utc(data[key])
    return data


def _time(value):
    return None if value is None else parse_datetime(value)


class TransferStore:
    def __init__(self, db, outbox: Outbox | None = None):
        self.db = db
        self.outbox = outbox if outbox is not None else Outbox()

    # -- signed firmware -------------------------------------------------------------------------

    def add_signed_firmware(self, values: dict):
        def thd(conn):
            new_id = conn.execute(insert(signed_firmware).values(**values)).inserted_primary_key[0]
            return _dict(conn.execute(select(signed_firmware).where(signed_firmware.c.id == new_id)).first())
        return self.db.run(thd, desc="security_add_signed_firmware")

    def get_signed_firmware(self, signed_id: int):
        def thd(conn):
            return _dict(conn.execute(select(signed_firmware).where(signed_firmware.c.id == signed_id)).first())
        return self.db.run(thd, desc="security_get_signed_firmware")

    def list_signed_firmware(self, limit: int, offset: int):
        def thd(conn):
            total = conn.execute(select(func.count()).select_from(signed_firmware)).scalar()
            rows = conn.execute(select(signed_firmware).order_by(signed_firmware.c.id).limit(limit).offset(offset))
            return total, [_dict(r) for r in rows]
        return self.db.run(thd, desc="security_list_signed_firmware")

    # -- requests: recorded as they are sent, answered, failed -------------------------------------

    def record_update_sending(self, station_id: str, request: dict, signed_firmware_id: int | None, now):
        """A SignedUpdateFirmware is being sent; fires with its row id."""
        firmware = request["firmware"]

        def thd(conn):
            return conn.execute(insert(signed_updates).values(
                station_id=station_id, request_id=request["requestId"], signed_firmware_id=signed_firmware_id,
                location=firmware["location"], retrieve_date=parse_datetime(firmware["retrieveDateTime"]),
                install_date=_time(firmware.get("installDateTime")), retries=request.get("retries"),
                retry_interval=request.get("retryInterval"), requested_at=now, status=REQUESTED,
                status_at=now)).inserted_primary_key[0]
        return self.db.run(thd, desc="security_update_sending")

    def record_log_sending(self, station_id: str, request: dict, shown_location: str, upload_id: int | None, now):
        """A GetLog is being sent; fires with its row id."""
        log = request["log"]

        def thd(conn):
            return conn.execute(insert(log_requests).values(
                station_id=station_id, request_id=request["requestId"], log_type=request["logType"],
                location=shown_location, upload_id=upload_id,
                oldest_timestamp=_time(log.get("oldestTimestamp")), latest_timestamp=_time(log.get("latestTimestamp")),
                retries=request.get("retries"), retry_interval=request.get("retryInterval"), requested_at=now,
                status=REQUESTED, status_at=now)).inserted_primary_key[0]
        return self.db.run(thd, desc="security_log_sending")

    def record_answer(self, kind: str, row_id: int, answer: str, filename: str | None = None):
        table = _TABLES[kind]
        values = {"answer": answer} if kind == FIRMWARE else {"answer": answer, "filename": filename}

        def thd(conn):
            conn.execute(update(table).where(table.c.id == row_id).values(**values))
        return self.db.run(thd, desc=f"security_{kind}_answer")

    def record_call_failed(self, kind: str, row_id: int, call_error: str):
        table = _TABLES[kind]

        def thd(conn):
            conn.execute(update(table).where(table.c.id == row_id).values(call_error=call_error))
        return self.db.run(thd, desc=f"security_{kind}_call_failed")

    # -- notifications ---------------------------------------------------------------------------

    def record_status(self, kind: str, station_id: str, status: str, request_id: int | None, now):
        """A SignedFirmwareStatusNotification / LogStatusNotification: kept in the history, linked to the
        station's latest request with that requestId. Fires with that request's row id, or None when
        the notification named no request of ours."""
        table = _TABLES[kind]
        event_type, row_key = _STATUS_EVENTS[kind]

        def thd(conn):
            row_id = None
            if request_id is not None:
                row_id = conn.execute(select(func.max(table.c.id)).where(
                    table.c.station_id == station_id, table.c.request_id == request_id)).scalar()
            conn.execute(insert(transfer_history).values(station_id=station_id, kind=kind, status=status,
                                                         request_id=request_id, row_id=row_id, received_at=now))
            if row_id is not None and status != "Idle":
                conn.execute(update(table).where(table.c.id == row_id).values(status=status, status_at=now))
            # With the history row: a webhook for the notification is sent if and only if it is stored.
            self.outbox.add(conn, event_type, {"station_id": station_id, "status": status, "request_id": request_id,
                                               row_key: row_id})
            return row_id
        return self.db.run(thd, desc=f"security_{kind}_status")

    # -- views -----------------------------------------------------------------------------------

    def get_request(self, kind: str, row_id: int):
        table = _TABLES[kind]

        def thd(conn):
            return _dict(conn.execute(select(table).where(table.c.id == row_id)).first())
        return self.db.run(thd, desc=f"security_get_{kind}_request")

    def latest_request(self, kind: str, station_id: str, request_id: int):
        table = _TABLES[kind]

        def thd(conn):
            return _dict(conn.execute(select(table).where(table.c.station_id == station_id,
                                                          table.c.request_id == request_id)
                                      .order_by(table.c.id.desc()).limit(1)).first())
        return self.db.run(thd, desc=f"security_latest_{kind}_request")

    def station_view(self, kind: str, station_id: str, limit: int):
        """The station's latest requests and notifications of one kind (newest first)."""
        table = _TABLES[kind]

        def thd(conn):
            requests = conn.execute(select(table).where(table.c.station_id == station_id)
                                    .order_by(table.c.id.desc()).limit(limit))
            history = conn.execute(select(transfer_history).where(
                transfer_history.c.station_id == station_id, transfer_history.c.kind == kind)
                .order_by(transfer_history.c.id.desc()).limit(limit))
            return {"requests": [_dict(r) for r in requests],
                    "history": [_history(r) for r in history]}
        return self.db.run(thd, desc=f"security_station_{kind}")

    def delete_station(self, station_id: str):
        def thd(conn):
            for table in (signed_updates, log_requests, transfer_history):
                conn.execute(delete(table).where(table.c.station_id == station_id))
        return self.db.run(thd, desc="security_transfers_delete_station")


def _history(row) -> dict:
    data = _dict(row)
    for key in ("station_id", "kind"):
        data.pop(key)
    data["known_request"] = data["row_id"] is not None or data["request_id"] is None
    return data
