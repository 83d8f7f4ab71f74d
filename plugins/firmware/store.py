"""The Firmware Management profile's store: every method returns a Deferred and runs its SQL on the pool."""
from __future__ import annotations

import hashlib
import hmac
import os

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from csms.outbox import Outbox
from csms.stations import as_utc

from .tables import diagnostics_files, diagnostics_requests, files, station_state, status_history, updates

#: The state of an update or diagnostics request before the station's first notification about it.
REQUESTED = "Requested"
#: The state of a request whose call failed (CALLERROR, no answer, station gone) before any notification.
CALL_FAILED = "CallFailed"
FIRMWARE_FAILED = ("DownloadFailed", "InstallationFailed", CALL_FAILED)
#: Why an upload was refused (see :meth:`FirmwareStore.claim_upload`).
UNKNOWN, USED, EXPIRED = "unknown_credentials", "credentials_used", "credentials_expired"

_TIME_KEYS = ("uploaded_at", "retrieve_date", "requested_at", "status_at", "start_time", "stop_time", "sent_at",
              "upload_expires_at", "upload_used_at", "received_at", "firmware_status_at", "diagnostics_status_at")


def _dict(row) -> dict | None:
    if row is None:
        return None
    data = dict(row._mapping)
    for key in _TIME_KEYS:
        if key in data:
            data[key] = as_utc(data[key])
    return data


def secret_hash(secret: str) -> str:
    # The secret is 128 random bits: a plain SHA-256 is enough to keep it out of the database.
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _request_view(row) -> dict:
    data = _dict(row)
    data.pop("upload_secret_sha256", None)
    return data


def _check_credentials(conn, user: str, secret: str, now):
    """(request row, None) when ``user``/``secret`` may upload now, else (None, reason)."""
    row = conn.execute(select(diagnostics_requests).where(diagnostics_requests.c.upload_user == user)).first()
    if row is None or row.upload_secret_sha256 is None or \
            not hmac.compare_digest(row.upload_secret_sha256, secret_hash(secret)):
        return None, UNKNOWN
    if row.upload_used_at is not None:
        return None, USED
    if as_utc(row.upload_expires_at) <= now:
        return None, EXPIRED
    return row, None


class FirmwareStore:
    def __init__(self, db, outbox: Outbox | None = None):
        self.db = db
        self.outbox = outbox if outbox is not None else Outbox()

    # -- firmware files --------------------------------------------------------------------------

    def add_firmware_file(self, name: str, size: int, sha256: str, md5: str, description, now):
        """Insert a file row; fires with the row, or None when the name is taken (nothing stored then).

        The caller moves the file into place once this has committed (a database function may rerun,
        so it touches no file).
        """
        def thd(conn):
            if conn.execute(select(files.c.id).where(files.c.name == name)).first() is not None:
                return None
            try:
                # In its own SAVEPOINT: on PostgreSQL a failed statement would poison the transaction.
                with conn.begin_nested():
                    new_id = conn.execute(insert(files).values(
                        name=name, size=size, sha256=sha256, md5=md5, description=description,
                        uploaded_at=now)).inserted_primary_key[0]
            except IntegrityError:
                return None
            return _dict(conn.execute(select(files).where(files.c.id == new_id)).first())
        return self.db.run(thd, desc="firmware_add_file")

    def list_firmware_files(self, limit: int, offset: int):
        def thd(conn):
            total = conn.execute(select(func.count()).select_from(files)).scalar()
            rows = conn.execute(select(files).order_by(files.c.id).limit(limit).offset(offset)).all()
            return total, [_dict(r) for r in rows]
        return self.db.run(thd, desc="firmware_list_files")

    def get_firmware_file(self, file_id: int | None = None, name: str | None = None):
        def thd(conn):
            query = select(files).where(files.c.id == file_id) if file_id is not None else \
                select(files).where(files.c.name == name)
            return _dict(conn.execute(query).first())
        return self.db.run(thd, desc="firmware_get_file")

    def delete_firmware_file(self, file_id: int):
        """Delete the row; fires with the deleted file's dict (its file is the caller's to remove, after
        the commit), or None when there was none."""
        def thd(conn):
            row = conn.execute(select(files).where(files.c.id == file_id)).first()
            if row is None:
                return None
            conn.execute(delete(files).where(files.c.id == file_id))
            return _dict(row)
        return self.db.run(thd, desc="firmware_delete_file")

    # -- firmware updates and FirmwareStatusNotification ------------------------------------------

    def record_update(self, station_id: str, request: dict, firmware_file_name: str | None, now, retrieve_date):
        """An UpdateFirmware is being sent: a new update row, from now on the station's current one
        (OCPP-J lets a station report on it before it answers). Fires with its id."""
        def thd(conn):
            file_id = None
            if firmware_file_name is not None:
                file_id = conn.execute(select(files.c.id).where(files.c.name == firmware_file_name)).scalar()
            update_id = conn.execute(insert(updates).values(
                station_id=station_id, location=request["location"], firmware_file_id=file_id,
                retrieve_date=retrieve_date, retries=request.get("retries"),
                retry_interval=request.get("retryInterval"), requested_at=now, status=REQUESTED,
                status_at=now)).inserted_primary_key[0]
            self.db.upsert(conn, station_state, {"station_id": station_id},
                           {"firmware_status": REQUESTED, "firmware_status_at": now, "firmware_update_id": update_id})
            return update_id
        return self.db.run(thd, desc="firmware_record_update")

    def record_update_failed(self, station_id: str, update_id: int, call_error: str, now):
        """The UpdateFirmware call failed: see :func:`_mark_call_failed`."""
        def thd(conn):
            _mark_call_failed(conn, updates, update_id, call_error, now)
            conn.execute(update(station_state).where(
                station_state.c.station_id == station_id, station_state.c.firmware_update_id == update_id,
                station_state.c.firmware_status == REQUESTED).values(firmware_status=CALL_FAILED,
                                                                      firmware_status_at=now))
        return self.db.run(thd, desc="firmware_update_failed")

    def record_firmware_status(self, station_id: str, status: str, now):
        """A FirmwareStatusNotification: history, the current update's status, the station's state."""
        def thd(conn):
            update_id = conn.execute(select(station_state.c.firmware_update_id).where(
                station_state.c.station_id == station_id)).scalar()
            conn.execute(insert(status_history).values(station_id=station_id, kind="firmware", status=status,
                                                       request_id=update_id, received_at=now))
            if update_id is not None and status != "Idle":
                conn.execute(update(updates).where(updates.c.id == update_id).values(status=status, status_at=now))
            self.db.upsert(conn, station_state, {"station_id": station_id},
                           {"firmware_status": status, "firmware_status_at": now})
            self.outbox.add(conn, "firmware.status", {"station_id": station_id, "status": status,
                                                      "update_id": update_id})
        return self.db.run(thd, desc="firmware_status")

    def get_update(self, update_id: int):
        def thd(conn):
            return _dict(conn.execute(select(updates).where(updates.c.id == update_id)).first())
        return self.db.run(thd, desc="firmware_get_update")

    def station_firmware(self, station_id: str, limit: int):
        """The station's state, its latest updates and notifications (newest first)."""
        def thd(conn):
            state = _dict(conn.execute(select(station_state).where(station_state.c.station_id == station_id)).first())
            rows = conn.execute(select(updates).where(updates.c.station_id == station_id)
                                .order_by(updates.c.id.desc()).limit(limit)).all()
            history = conn.execute(select(status_history).where(
                status_history.c.station_id == station_id, status_history.c.kind == "firmware")
                .order_by(status_history.c.id.desc()).limit(limit)).all()
            current = None
            if state and state["firmware_update_id"] is not None:
                current = _dict(conn.execute(select(updates).where(
                    updates.c.id == state["firmware_update_id"])).first())
            return {
                "status": state["firmware_status"] if state else None,
                "status_at": state["firmware_status_at"] if state else None,
                "current_update": current,
                "updates": [_dict(r) for r in rows],
                "history": [_history(r) for r in history],
            }
        return self.db.run(thd, desc="firmware_station")

    def rollout(self, limit: int, offset: int, status: str | None = None, failed: bool | None = None,
                firmware_file_id: int | None = None, station_id: str | None = None):
        """Per station: the latest firmware status and its current update; plus counts per status."""
        def thd(conn):
            joined = station_state.outerjoin(updates, updates.c.id == station_state.c.firmware_update_id)
            conditions = [station_state.c.firmware_status.is_not(None)]
            if status is not None:
                conditions.append(station_state.c.firmware_status == status)
            if failed is True:
                conditions.append(station_state.c.firmware_status.in_(FIRMWARE_FAILED))
            elif failed is False:
                conditions.append(station_state.c.firmware_status.not_in(FIRMWARE_FAILED))
            if firmware_file_id is not None:
                conditions.append(updates.c.firmware_file_id == firmware_file_id)
            if station_id is not None:
                conditions.append(station_state.c.station_id == station_id)
            counts = {row[0]: row[1] for row in conn.execute(
                select(station_state.c.firmware_status, func.count()).select_from(joined)
                .where(*conditions).group_by(station_state.c.firmware_status))}
            rows = conn.execute(
                select(station_state.c.station_id, station_state.c.firmware_status,
                       station_state.c.firmware_status_at, updates.c.id.label("update_id"), updates.c.location,
                       updates.c.firmware_file_id, updates.c.requested_at, updates.c.retrieve_date)
                .select_from(joined).where(*conditions).order_by(station_state.c.station_id)
                .limit(limit).offset(offset)).all()
            items = []
            for row in rows:
                data = _dict(row)
                items.append({
                    "station_id": data["station_id"], "status": data["firmware_status"],
                    "status_at": data["firmware_status_at"],
                    "failed": data["firmware_status"] in FIRMWARE_FAILED,
                    "update": None if data["update_id"] is None else {
                        "id": data["update_id"], "location": data["location"],
                        "firmware_file_id": data["firmware_file_id"], "requested_at": data["requested_at"],
                        "retrieve_date": data["retrieve_date"]},
                })
            return sum(counts.values()), counts, items
        return self.db.run(thd, desc="firmware_rollout")

    # -- diagnostics requests and DiagnosticsStatusNotification ------------------------------------

    def create_diagnostics_request(self, station_id: str, request: dict, shown_location: str, protocol: str,
                                   user: str, secret: str, now, expires_at, times: dict):
        """A request with CSMS-hosted upload credentials, before its GetDiagnostics is sent.

        ``shown_location`` is the location with the secret masked: only its hash is stored.
        """
        def thd(conn):
            return conn.execute(insert(diagnostics_requests).values(
                station_id=station_id, location=shown_location, protocol=protocol,
                retries=request.get("retries"), retry_interval=request.get("retryInterval"),
                requested_at=now, status=REQUESTED, status_at=now, upload_user=user,
                upload_secret_sha256=secret_hash(secret), upload_expires_at=expires_at, **times,
            )).inserted_primary_key[0]
        return self.db.run(thd, desc="firmware_create_diagnostics")

    def discard_unsent_diagnostics_request(self, request_id: int):
        """The GetDiagnostics was never sent (refused by a check, station not connected): its
        credentials must not outlive it. A sent one is kept (see :meth:`record_diagnostics_failed`)."""
        def thd(conn):
            conn.execute(delete(diagnostics_requests).where(diagnostics_requests.c.id == request_id,
                                                            diagnostics_requests.c.sent_at.is_(None)))
        return self.db.run(thd, desc="firmware_discard_diagnostics")

    def record_diagnostics_sending(self, station_id: str, request: dict, now, times: dict,
                                   request_id: int | None = None):
        """A GetDiagnostics is being sent: mark its pre-created request (``request_id``) sent, or record
        a new one (a call through the generic endpoint, to any location); from now on it is the
        station's current request. Fires with the request id."""
        def thd(conn):
            found = None
            if request_id is not None:
                found = conn.execute(select(diagnostics_requests.c.id).where(
                    diagnostics_requests.c.id == request_id)).scalar()
            if found is None:
                found = conn.execute(insert(diagnostics_requests).values(
                    station_id=station_id, location=request["location"],
                    protocol=request["location"].partition(":")[0].lower()[:8],
                    retries=request.get("retries"), retry_interval=request.get("retryInterval"),
                    requested_at=now, status=REQUESTED, status_at=now, **times)).inserted_primary_key[0]
            conn.execute(update(diagnostics_requests).where(diagnostics_requests.c.id == found).values(sent_at=now))
            self.db.upsert(conn, station_state, {"station_id": station_id},
                           {"diagnostics_status": REQUESTED, "diagnostics_status_at": now,
                            "diagnostics_request_id": found})
            return found
        return self.db.run(thd, desc="firmware_diagnostics_sending")

    def record_diagnostics_answer(self, request_id: int, file_name: str | None):
        """GetDiagnostics.conf: the file the station will upload."""
        def thd(conn):
            conn.execute(update(diagnostics_requests).where(diagnostics_requests.c.id == request_id)
                         .values(file_name=file_name))
        return self.db.run(thd, desc="firmware_diagnostics_answer")

    def record_diagnostics_failed(self, station_id: str, request_id: int, call_error: str, now):
        """The GetDiagnostics call failed: see :func:`_mark_call_failed`. Unless the station already
        reported on the request, its upload credentials expire now."""
        def thd(conn):
            if _mark_call_failed(conn, diagnostics_requests, request_id, call_error, now):
                conn.execute(update(diagnostics_requests).where(
                    diagnostics_requests.c.id == request_id, diagnostics_requests.c.upload_used_at.is_(None),
                    diagnostics_requests.c.upload_expires_at.is_not(None)).values(upload_expires_at=now))
            conn.execute(update(station_state).where(
                station_state.c.station_id == station_id, station_state.c.diagnostics_request_id == request_id,
                station_state.c.diagnostics_status == REQUESTED).values(diagnostics_status=CALL_FAILED,
                                                                         diagnostics_status_at=now))
        return self.db.run(thd, desc="firmware_diagnostics_failed")

    def record_diagnostics_status(self, station_id: str, status: str, now):
        def thd(conn):
            request_id = conn.execute(select(station_state.c.diagnostics_request_id).where(
                station_state.c.station_id == station_id)).scalar()
            conn.execute(insert(status_history).values(station_id=station_id, kind="diagnostics", status=status,
                                                       request_id=request_id, received_at=now))
            if request_id is not None and status != "Idle":
                conn.execute(update(diagnostics_requests).where(diagnostics_requests.c.id == request_id)
                             .values(status=status, status_at=now))
            self.db.upsert(conn, station_state, {"station_id": station_id},
                           {"diagnostics_status": status, "diagnostics_status_at": now})
            self.outbox.add(conn, "diagnostics.status", {"station_id": station_id, "status": status,
                                                         "request_id": request_id})
        return self.db.run(thd, desc="firmware_diagnostics_status")

    def get_diagnostics_request(self, request_id: int):
        def thd(conn):
            row = conn.execute(select(diagnostics_requests).where(diagnostics_requests.c.id == request_id)).first()
            if row is None:
                return None
            view = _request_view(row)
            view["files"] = [_file_view(r) for r in conn.execute(select(diagnostics_files).where(
                diagnostics_files.c.request_id == request_id).order_by(diagnostics_files.c.id))]
            return view
        return self.db.run(thd, desc="firmware_get_diagnostics")

    def station_diagnostics(self, station_id: str, limit: int):
        def thd(conn):
            state = _dict(conn.execute(select(station_state).where(station_state.c.station_id == station_id)).first())
            rows = conn.execute(select(diagnostics_requests).where(diagnostics_requests.c.station_id == station_id,
                                                                   diagnostics_requests.c.purpose.is_(None))
                                .order_by(diagnostics_requests.c.id.desc()).limit(limit)).all()
            requests = []
            for row in rows:
                view = _request_view(row)
                view["files"] = [_file_view(r) for r in conn.execute(select(diagnostics_files).where(
                    diagnostics_files.c.request_id == row.id).order_by(diagnostics_files.c.id))]
                requests.append(view)
            history = conn.execute(select(status_history).where(
                status_history.c.station_id == station_id, status_history.c.kind == "diagnostics")
                .order_by(status_history.c.id.desc()).limit(limit)).all()
            return {
                "status": state["diagnostics_status"] if state else None,
                "status_at": state["diagnostics_status_at"] if state else None,
                "current_request_id": state["diagnostics_request_id"] if state else None,
                "requests": requests,
                "history": [_history(r) for r in history],
            }
        return self.db.run(thd, desc="firmware_station_diagnostics")

    # -- upload locations for other plugins (csms_upload_location) -----------------------------------

    def create_upload_location(self, station_id: str, purpose: str, shown_location: str, protocol: str,
                               user: str, secret: str, now, expires_at):
        """Upload credentials another plugin hands a station (e.g. in a GetLog); fires with the row id."""
        def thd(conn):
            return conn.execute(insert(diagnostics_requests).values(
                station_id=station_id, location=shown_location, protocol=protocol, requested_at=now,
                sent_at=now, status=REQUESTED, status_at=now, upload_user=user,
                upload_secret_sha256=secret_hash(secret), upload_expires_at=expires_at, purpose=purpose,
            )).inserted_primary_key[0]
        return self.db.run(thd, desc="firmware_create_upload_location")

    def withdraw_upload_location(self, upload_id: int, now):
        """The location was never handed out, or the station will not use it: unused, it is forgotten;
        used, its credentials expire now and its file stays. Fires with True when it existed."""
        def thd(conn):
            conditions = (diagnostics_requests.c.id == upload_id, diagnostics_requests.c.purpose.is_not(None))
            if conn.execute(delete(diagnostics_requests).where(
                    *conditions, diagnostics_requests.c.upload_used_at.is_(None))).rowcount:
                return True
            return conn.execute(update(diagnostics_requests).where(*conditions).values(
                upload_expires_at=now)).rowcount == 1
        return self.db.run(thd, desc="firmware_withdraw_upload_location")

    def uploaded_files(self, upload_id: int):
        """The files uploaded to one location (with ``stored_path``), oldest first."""
        def thd(conn):
            return [_dict(r) for r in conn.execute(select(diagnostics_files).where(
                diagnostics_files.c.request_id == upload_id).order_by(diagnostics_files.c.id))]
        return self.db.run(thd, desc="firmware_uploaded_files")

    # -- diagnostics uploads ---------------------------------------------------------------------

    def check_upload(self, user: str, secret: str, now):
        """Fires with (request dict, None) when these credentials may upload now, else (None, reason)."""
        def thd(conn):
            row, reason = _check_credentials(conn, user, secret, now)
            return (_request_view(row) if row is not None else None), reason
        return self.db.run(thd, desc="firmware_check_upload")

    def claim_upload(self, user: str, secret: str, now, name: str, size: int, sha256: str, via: str):
        """Use the credentials once: re-check them, mark them used and insert the file row, stored at
        ``<request id>/<name>`` under the diagnostics directory.

        Fires with (file dict with its ``stored_path``, None), or (None, reason) and nothing stored. The
        caller moves the upload there once this has committed, and calls :meth:`release_upload` if
        that fails.
        """
        def thd(conn):
            row, reason = _check_credentials(conn, user, secret, now)
            if row is None:
                return None, reason
            claimed = conn.execute(update(diagnostics_requests).where(
                diagnostics_requests.c.id == row.id, diagnostics_requests.c.upload_used_at.is_(None))
                .values(upload_used_at=now)).rowcount
            if claimed != 1:
                return None, USED
            file_id = conn.execute(insert(diagnostics_files).values(
                request_id=row.id, station_id=row.station_id, name=name,
                stored_path=os.path.join(str(row.id), name), size=size, sha256=sha256, via=via,
                uploaded_at=now)).inserted_primary_key[0]
            return _dict(conn.execute(select(diagnostics_files).where(diagnostics_files.c.id == file_id)).first()), None
        return self.db.run(thd, desc="firmware_claim_upload")

    def release_upload(self, file_id: int):
        """Undo :meth:`claim_upload` whose file could not be put in place: the row goes, the credentials
        may be used again (until they expire)."""
        def thd(conn):
            request_id = conn.execute(select(diagnostics_files.c.request_id).where(
                diagnostics_files.c.id == file_id)).scalar()
            conn.execute(delete(diagnostics_files).where(diagnostics_files.c.id == file_id))
            if request_id is not None:
                conn.execute(update(diagnostics_requests).where(diagnostics_requests.c.id == request_id)
                             .values(upload_used_at=None))
        return self.db.run(thd, desc="firmware_release_upload")

    def list_diagnostics_files(self, limit: int, offset: int, station_id: str | None = None,
                               request_id: int | None = None):
        def thd(conn):
            conditions = []
            if station_id is not None:
                conditions.append(diagnostics_files.c.station_id == station_id)
            if request_id is not None:
                conditions.append(diagnostics_files.c.request_id == request_id)
            total = conn.execute(select(func.count()).select_from(diagnostics_files).where(*conditions)).scalar()
            rows = conn.execute(select(diagnostics_files).where(*conditions).order_by(diagnostics_files.c.id)
                                .limit(limit).offset(offset)).all()
            return total, [_file_view(r) for r in rows]
        return self.db.run(thd, desc="firmware_list_diagnostics_files")

    def get_diagnostics_file(self, file_id: int):
        """The file row including ``stored_path`` (for serving it), or None."""
        def thd(conn):
            return _dict(conn.execute(select(diagnostics_files).where(diagnostics_files.c.id == file_id)).first())
        return self.db.run(thd, desc="firmware_get_diagnostics_file")

    # -- stations ----------------------------------------------------------------------------------

    def delete_station(self, station_id: str):
        """Forget a deleted station's records (uploaded diagnostics files stay on disk for the operator)."""
        def thd(conn):
            for table in (updates, diagnostics_requests, diagnostics_files, status_history, station_state):
                conn.execute(delete(table).where(table.c.station_id == station_id))
        return self.db.run(thd, desc="firmware_delete_station")


def _mark_call_failed(conn, table, request_id: int, call_error: str, now) -> bool:
    """Record why a request's call failed; the notifications already linked to it stay, and so does
    the status they gave it. Returns True when none had come (the status is then CallFailed)."""
    conn.execute(update(table).where(table.c.id == request_id).values(call_error=call_error))
    return conn.execute(update(table).where(table.c.id == request_id, table.c.status == REQUESTED)
                        .values(status=CALL_FAILED, status_at=now)).rowcount == 1


def _file_view(row) -> dict:
    data = _dict(row)
    data.pop("stored_path", None)
    return data


def _history(row) -> dict:
    data = _dict(row)
    data.pop("station_id", None)
    return data
