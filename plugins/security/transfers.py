"""Signed firmware updates and log uploads: the notifications' handlers and the record of every
SignedUpdateFirmware and GetLog sent (OCTT TC_079, TC_080, TC_081).

Requests are recorded from the call events, so a call sent through the generic
``/stations/{id}/calls/{action}`` route is tracked like one sent through this part's routes; the
routes hand over what the call alone does not carry (the signed firmware row, the upload location)
in :attr:`Transfers.pending`, keyed by station and requestId.
"""
from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from csms.rpc import CallErrorReceived, CallTimeout, ResponseInvalid, StationOffline

from .transfer_store import FIRMWARE, LOG, TransferStore

log = Logger(namespace="csms.security.transfers")

#: Entries shown in a station's signed firmware and log views.
HISTORY_LIMIT = 100
_KINDS = {"SignedUpdateFirmware": FIRMWARE, "GetLog": LOG}


def call_error_text(error) -> str:
    """Why a call failed, in a few words that fit ``call_error``."""
    if isinstance(error, CallErrorReceived):
        code = error.code if error.code.isascii() and error.code.isalnum() and len(error.code) <= 40 else \
            "GenericError"  # a station's own code: kept only when it looks like one
        return f"CALLERROR {code}"
    return {CallTimeout: "timeout", StationOffline: "offline", ResponseInvalid: "invalid response"}.get(
        type(error), "failed")


class Transfers:
    def __init__(self, app):
        self.app = app
        self.store = TransferStore(app.db, app.outbox)
        #: (station id, requestId) -> what the route knows about the call it is sending: for
        #: SignedUpdateFirmware ``{"signed_firmware_id"}``, for GetLog the upload location dict.
        self.pending: dict[tuple[str, int], dict] = {}
        #: id(request payload) -> (the payload, kind, row id, upload id), from csms_on_call_sending to the
        #: csms_on_call_completed / _failed that follows with the same object.
        self._in_flight: dict[int, tuple] = {}

    def install(self, handlers: dict) -> None:
        handlers["SignedFirmwareStatusNotification"] = self.signed_firmware_status
        handlers["LogStatusNotification"] = self.log_status

    # -- inbound -----------------------------------------------------------------------------------

    def signed_firmware_status(self, station, payload):
        # TC_080: Downloading ... Installed; TC_081: ... InvalidSignature.
        return self._status(FIRMWARE, station, payload)

    def log_status(self, station, payload):
        # TC_079: Uploading, Uploaded.
        return self._status(LOG, station, payload)

    def _status(self, kind, station, payload):
        request_id = payload.get("requestId")

        def answered(row_id):
            if row_id is None and request_id is not None:
                # OCPP gives the CSMS no way to refuse a notification: kept, marked unlinked.
                log.info("{station_id}: {kind} status {status} names requestId {request_id}, which the CSMS "
                         "never sent", station_id=station.station_id, kind=kind, status=payload["status"],
                         request_id=request_id)
            return {}
        d = self.store.record_status(kind, station.station_id, payload["status"], request_id, self.app.now())
        return d.addCallback(answered)

    # -- CSMS-initiated calls ------------------------------------------------------------------------

    def call_sending(self, station_id, action, request):
        kind = _KINDS.get(action)
        if kind is None:
            return None
        known = self.pending.pop((station_id, request["requestId"]), None) or {}
        now = self.app.now()
        if kind == FIRMWARE:
            d = self.store.record_update_sending(station_id, request, known.get("signed_firmware_id"), now)
            upload_id = None
        else:
            upload_id = known.get("upload_id")
            shown = known.get("shown_location") or request["log"]["remoteLocation"]
            d = self.store.record_log_sending(station_id, request, shown, upload_id, now)

        def remember(row_id):
            self._in_flight[id(request)] = (request, kind, row_id, upload_id)
        return d.addCallback(remember)

    @defer.inlineCallbacks
    def call_completed(self, station_id, action, request, response):
        entry = self._in_flight.pop(id(request), None)
        if entry is None or action not in _KINDS:
            return
        _, kind, row_id, upload_id = entry
        yield self.store.record_answer(kind, row_id, response["status"], response.get("filename"))
        if upload_id is not None and response["status"] == "Rejected":
            yield self.withdraw_upload(upload_id)

    @defer.inlineCallbacks
    def call_failed(self, station_id, action, request, error):
        entry = self._in_flight.pop(id(request), None)
        if entry is None or action not in _KINDS:
            return
        _, kind, row_id, upload_id = entry
        yield self.store.record_call_failed(kind, row_id, call_error_text(error))
        if upload_id is not None:
            yield self.withdraw_upload(upload_id)

    def withdraw_upload(self, upload_id: int):
        return self.app.lookup("csms_withdraw_upload_location", upload_id=upload_id)
