"""Security events (whitepaper use case A04): what stations report with SecurityEventNotification,
and what the CSMS finds itself about a station (a CSR it rejected), kept per station.

Each is stored, logged (critical ones at warning), and told to every plugin through
``csms_on_security_event`` before the station is answered.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, insert, select
from twisted.internet import defer
from twisted.logger import Logger

from csms.ocpp16 import parse_datetime
from csms.outbox import event_data
from csms.stations import as_utc

from .tables import security_events

log = Logger(namespace="csms.security")

#: The whitepaper's security events (its list, "Security events") and whether each is critical: a
#: station must send the critical ones; it may send the others, and types of its own.
CRITICAL_EVENTS = {
    "FirmwareUpdated": True,
    "FailedToAuthenticateAtCentralSystem": False,
    "CentralSystemFailedToAuthenticate": False,
    "SettingSystemTime": True,
    "StartupOfTheDevice": True,
    "ResetOrReboot": True,
    "SecurityLogWasCleared": True,
    "ReconfigurationOfSecurityParameters": False,
    "MemoryExhaustion": True,
    "InvalidMessages": False,
    "AttemptedReplayAttacks": False,
    "TamperDetectionActivated": True,
    "InvalidFirmwareSignature": False,
    "InvalidFirmwareSigningCertificate": False,
    "InvalidCentralSystemCertificate": False,
    "InvalidChargePointCertificate": False,
    "InvalidTLSVersion": False,
    "InvalidTLSCipherSuite": False,
}
STATION, CSMS = "station", "csms"
#: The event the CSMS records about a station whose SignCertificate.req it rejected.
CSR_REJECTED = "CertificateSigningRequestRejected"

#: The webhook event type of every stored security event (issue 17), written with its row.
EVENT_TYPE = "security.event"
#: The webhook event types of the stored SignedFirmwareStatusNotification and LogStatusNotification
#: (written with their history row by transfer_store.TransferStore.record_status).
SIGNED_FIRMWARE_STATUS = "signed_firmware.status"
LOG_STATUS = "log.status"


def register_event_types(outbox, owner: str) -> None:
    outbox.register(EVENT_TYPE, "A security event was stored: one a station reported (SecurityEventNotification, "
                    "`origin` station) or one the CSMS found (`origin` csms, e.g. a CSR it rejected).",
                    {"station_id": "CP-1", "id": 12, "origin": STATION, "type": "TamperDetectionActivated",
                     "timestamp": "2026-12-01T10:00:00.000Z", "tech_info": "lid opened", "critical": True,
                     "received_at": "2026-12-01T10:00:01.000Z"}, owner=owner)
    outbox.register(SIGNED_FIRMWARE_STATUS, "A SignedFirmwareStatusNotification was stored; `signed_update_id` is "
                    "the SignedUpdateFirmware it reports on (null when its `request_id` names none the CSMS sent).",
                    {"station_id": "CP-1", "status": "Installed", "request_id": 7, "signed_update_id": 3},
                    owner=owner)
    outbox.register(LOG_STATUS, "A LogStatusNotification was stored; `log_request_id` is the GetLog it reports on "
                    "(null when its `request_id` names none the CSMS sent).",
                    {"station_id": "CP-1", "status": "Uploaded", "request_id": 9, "log_request_id": 4},
                    owner=owner)


def event_view(row) -> dict:
    event = dict(row._mapping)
    event.pop("station_id")
    event["timestamp"] = as_utc(event["timestamp"])
    event["received_at"] = as_utc(event["received_at"])
    return event


class SecurityEvents:
    """Store, log and announce security events; list them for the operator."""

    def __init__(self, app):
        self.app = app

    def record(self, station_id: str, origin: str, event_type: str, timestamp: datetime,
               tech_info: str | None) -> defer.Deferred:
        """Fires with the stored event (a dict as ``csms_on_security_event`` gets it) once listeners had it."""
        critical = origin == STATION and CRITICAL_EVENTS.get(event_type, False)
        row = {"station_id": station_id, "origin": origin, "type": event_type, "timestamp": timestamp,
               "tech_info": tech_info, "critical": critical, "received_at": self.app.now()}

        def thd(conn):
            event_id = conn.execute(insert(security_events).values(**row)
                                    .returning(security_events.c.id)).scalar_one()
            event = event_view(conn.execute(select(security_events).where(security_events.c.id == event_id)).one())
            # In the event's own transaction: a webhook for it is sent if and only if it is stored.
            self.app.outbox.add(conn, EVENT_TYPE, event_data({"station_id": station_id, **event}))
            return event

        def announce(event):
            self._log(station_id, event)
            return self.app.fire("csms_on_security_event", station_id=station_id,
                                 event=event).addCallback(lambda _: event)
        return self.app.db.run(thd, desc="security_record_event").addCallback(announce)

    @staticmethod
    def _log(station_id: str, event: dict) -> None:
        emit = log.warn if event["critical"] or event["origin"] == CSMS else log.info
        emit("Security event {type} from {station} ({origin}) at {timestamp}: {tech_info}", type=event["type"],
             station=station_id, origin=event["origin"], timestamp=event["timestamp"].isoformat(),
             tech_info=event["tech_info"] or "no details")

    def handle_notification(self, station, payload) -> defer.Deferred:
        """SecurityEventNotification.req: stored, logged, announced, then answered (an empty conf)."""
        # The RPC layer has refused a timestamp that does not parse or overflows in UTC.
        d = self.record(station.station_id, STATION, payload["type"], parse_datetime(payload["timestamp"]),
                        payload.get("techInfo"))
        return d.addCallback(lambda _: {})

    def list(self, limit: int, offset: int, station_id: str | None = None, event_type: str | None = None,
             since: datetime | None = None, until: datetime | None = None, critical: bool | None = None,
             origin: str | None = None) -> defer.Deferred:
        """(total, events newest first); each event has its ``station_id``."""
        conditions = []
        if station_id is not None:
            conditions.append(security_events.c.station_id == station_id)
        if event_type is not None:
            conditions.append(security_events.c.type == event_type)
        if since is not None:
            conditions.append(security_events.c.timestamp >= since)
        if until is not None:
            conditions.append(security_events.c.timestamp < until)
        if critical is not None:
            conditions.append(security_events.c.critical == critical)
        if origin is not None:
            conditions.append(security_events.c.origin == origin)

        def thd(conn):
            total = conn.execute(select(func.count()).select_from(security_events).where(*conditions)).scalar_one()
            rows = conn.execute(select(security_events).where(*conditions)
                                .order_by(security_events.c.timestamp.desc(), security_events.c.id.desc())
                                .limit(limit).offset(offset)).fetchall()
            return total, [dict(event_view(row), station_id=row.station_id) for row in rows]
        return self.app.db.run(thd, desc="security_list_events")

    def delete_station(self, station_id: str) -> defer.Deferred:
        def thd(conn):
            conn.execute(security_events.delete().where(security_events.c.station_id == station_id))
        return self.app.db.run(thd, desc="security_delete_station_events")
