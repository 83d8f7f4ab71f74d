"""The Firmware Management profile's tables (all prefixed ``firmware_``)."""
from sqlalchemy import BigInteger, Column, DateTime, Index, MetaData, String, Table, Text

from csms.db import BIG_KEY

metadata = MetaData()

#: Firmware images an operator uploaded; the CSMS serves them to stations over HTTP.
files = Table(
    "firmware_files", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("md5", String(32), nullable=False),
    Column("description", Text),
    Column("uploaded_at", DateTime(timezone=True), nullable=False),
)

#: Every UpdateFirmware sent to a station (OCPP 1.6 §5.16), through either API route.
updates = Table(
    "firmware_updates", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("station_id", String(255), nullable=False),
    Column("location", Text, nullable=False),
    Column("firmware_file_id", BigInteger),
    Column("retrieve_date", DateTime(timezone=True), nullable=False),
    Column("retries", BigInteger),
    Column("retry_interval", BigInteger),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    #: Latest FirmwareStatusNotification status for this update ("Requested" until the first one,
    #: "CallFailed" when the call failed before any).
    Column("status", String(32), nullable=False),
    Column("status_at", DateTime(timezone=True), nullable=False),
    #: Why the UpdateFirmware call failed ("CALLERROR <code>", "timeout", "offline", "invalid response").
    Column("call_error", String(64)),
    Index("firmware_updates_station", "station_id", "id"),
)

#: Every GetDiagnostics sent (OCPP 1.6 §5.8); a CSMS-hosted location carries one-time upload credentials.
diagnostics_requests = Table(
    "firmware_diagnostics_requests", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("station_id", String(255), nullable=False),
    Column("location", Text, nullable=False),
    Column("protocol", String(8)),
    Column("start_time", DateTime(timezone=True)),
    Column("stop_time", DateTime(timezone=True)),
    Column("retries", BigInteger),
    Column("retry_interval", BigInteger),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    #: When the GetDiagnostics was sent (None: not yet, for a CSMS-hosted location created just before).
    Column("sent_at", DateTime(timezone=True)),
    #: GetDiagnostics.conf fileName: the file the station will upload (absent: nothing to upload).
    Column("file_name", String(255)),
    #: Latest DiagnosticsStatusNotification status ("Requested" until the first one, "CallFailed" when
    #: the call failed before any).
    Column("status", String(32), nullable=False),
    Column("status_at", DateTime(timezone=True), nullable=False),
    #: Why the GetDiagnostics call failed ("CALLERROR <code>", "timeout", "offline", "invalid response").
    Column("call_error", String(64)),
    #: Upload credentials: user name (unique) and the SHA-256 of the random password.
    Column("upload_user", String(64), unique=True),
    Column("upload_secret_sha256", String(64)),
    Column("upload_expires_at", DateTime(timezone=True)),
    Column("upload_used_at", DateTime(timezone=True)),
    #: None for a GetDiagnostics; else the purpose another plugin asked an upload location for
    #: (``csms_upload_location``, e.g. "GetLog"): such rows stay out of the diagnostics views.
    Column("purpose", String(32)),
    Index("firmware_diagnostics_requests_station", "station_id", "id"),
)

#: Diagnostics files stations uploaded to the CSMS, each linked to its request.
diagnostics_files = Table(
    "firmware_diagnostics_files", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("request_id", BigInteger, nullable=False, index=True),
    Column("station_id", String(255), nullable=False, index=True),
    Column("name", String(255), nullable=False),
    Column("stored_path", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("via", String(8), nullable=False),
    Column("uploaded_at", DateTime(timezone=True), nullable=False),
)

#: Every FirmwareStatusNotification and DiagnosticsStatusNotification, in arrival order.
status_history = Table(
    "firmware_status_history", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("station_id", String(255), nullable=False),
    #: "firmware" or "diagnostics"
    Column("kind", String(16), nullable=False),
    Column("status", String(32), nullable=False),
    #: The update or diagnostics request the notification was linked to (the station's latest).
    Column("request_id", BigInteger),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Index("firmware_status_history_station", "station_id", "kind", "id"),
    Index("firmware_status_history_received_at", "received_at"),  # the retention purge's (csms.retention)
)

#: Each station's current state: its last notification of each kind and its last request of each kind.
station_state = Table(
    "firmware_station_state", metadata,
    Column("station_id", String(255), primary_key=True),
    Column("firmware_status", String(32)),
    Column("firmware_status_at", DateTime(timezone=True)),
    Column("firmware_update_id", BigInteger),
    Column("diagnostics_status", String(32)),
    Column("diagnostics_status_at", DateTime(timezone=True)),
    Column("diagnostics_request_id", BigInteger),
)
