"""Tables of signed firmware updates and log uploads (security extension §4 of issue 14), in the
plugin's shared MetaData."""
from sqlalchemy import BigInteger, Boolean, Column, DateTime, Index, String, Table, Text

from csms.db import BIG_KEY

from .tables import metadata

#: A hosted firmware file (the Firmware plugin's) with the signature and signing certificate an operator
#: gave for it, and whether the CSMS could verify that signature.
signed_firmware = Table(
    "security_signed_firmware", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("firmware_file_id", BigInteger, nullable=False),
    Column("name", String(128), nullable=False),
    Column("sha256", String(64), nullable=False),
    #: Base64, exactly as it is sent to stations.
    Column("signature", Text, nullable=False),
    Column("signing_certificate", Text, nullable=False),
    #: True: the signature verifies over the file; False: it does not, and the operator sent it anyway
    #: (``verify: false``, e.g. for OCTT TC_081).
    Column("verified", Boolean, nullable=False),
    #: Why it does not verify (None when it does).
    Column("verify_error", String(200)),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

#: Every SignedUpdateFirmware sent, through any API route.
signed_updates = Table(
    "security_signed_updates", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("station_id", String(255), nullable=False),
    Column("request_id", BigInteger, nullable=False),
    Column("signed_firmware_id", BigInteger),
    Column("location", Text, nullable=False),
    Column("retrieve_date", DateTime(timezone=True), nullable=False),
    Column("install_date", DateTime(timezone=True)),
    Column("retries", BigInteger),
    Column("retry_interval", BigInteger),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    #: SignedUpdateFirmware.conf status (Accepted, Rejected, AcceptedCanceled, InvalidCertificate,
    #: RevokedCertificate); None until it came.
    Column("answer", String(32)),
    #: Why the call failed ("CALLERROR <code>", "timeout", "offline", "invalid response").
    Column("call_error", String(64)),
    #: The latest SignedFirmwareStatusNotification status for this request ("Requested" before any).
    Column("status", String(32), nullable=False),
    Column("status_at", DateTime(timezone=True), nullable=False),
    Index("security_signed_updates_station", "station_id", "request_id"),
)

#: Every GetLog sent, through any API route; a CSMS-hosted location names its upload (Firmware plugin).
log_requests = Table(
    "security_log_requests", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("station_id", String(255), nullable=False),
    Column("request_id", BigInteger, nullable=False),
    Column("log_type", String(32), nullable=False),
    #: The remote location with any upload secret masked.
    Column("location", Text, nullable=False),
    #: The upload location's id (csms_upload_location), None for an operator's own location.
    Column("upload_id", BigInteger),
    Column("oldest_timestamp", DateTime(timezone=True)),
    Column("latest_timestamp", DateTime(timezone=True)),
    Column("retries", BigInteger),
    Column("retry_interval", BigInteger),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    #: GetLog.conf status (Accepted, Rejected, AcceptedCanceled) and filename.
    Column("answer", String(32)),
    Column("filename", String(255)),
    Column("call_error", String(64)),
    #: The latest LogStatusNotification status for this request ("Requested" before any).
    Column("status", String(32), nullable=False),
    Column("status_at", DateTime(timezone=True), nullable=False),
    Index("security_log_requests_station", "station_id", "request_id"),
)

#: Every SignedFirmwareStatusNotification and LogStatusNotification, in arrival order.
transfer_history = Table(
    "security_transfer_history", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("station_id", String(255), nullable=False),
    #: "firmware" or "log"
    Column("kind", String(16), nullable=False),
    Column("status", String(32), nullable=False),
    #: The notification's requestId, as the station sent it (None when it sent none).
    Column("request_id", BigInteger),
    #: The signed update / log request row that requestId named; None when it named none of ours.
    Column("row_id", BigInteger),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Index("security_transfer_history_station", "station_id", "kind", "id"),
)
