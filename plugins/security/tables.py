"""The security plugin's tables (all prefixed ``security_``)."""
from sqlalchemy import BigInteger, Boolean, Column, DateTime, Index, MetaData, String, Table, Text

from csms.db import BIG_KEY

metadata = MetaData()

# -- certificates (docs/security.md, "Certificates") -------------------------------------------------

#: Every SignCertificate.req a station sent, and what became of it.
certificate_requests = Table(
    "security_certificate_requests", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("station_id", String(255), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("csr", Text, nullable=False),
    #: rejected, awaiting_certificate (external CA), signing, signed (sent, unanswered), accepted,
    #: rejected_by_station, send_failed (signing/sending failed: reason says why)
    Column("status", String(32), nullable=False),
    Column("reason_code", String(64)),
    Column("reason", Text),
    Column("certificate_chain", Text),
    #: Of the chain's first certificate (the station's), once a chain is stored: its serial (hex) and,
    #: below, its validity. A station's current certificate is that of its newest accepted request.
    Column("serial_number", String(64)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # Added by security_0002: after the columns of security_0001, where ALTER TABLE puts them.
    Column("not_before", DateTime(timezone=True)),
    Column("not_after", DateTime(timezone=True)),
    Index("security_certificate_requests_station", "station_id", "id"),
    Index("security_certificate_requests_status", "status", "station_id"),
)

#: Each station's installed certificates as it last reported them (GetInstalledCertificateIds), kept
#: current by the InstallCertificate and DeleteCertificate the station accepted.
installed_certificates = Table(
    "security_installed_certificates", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("station_id", String(255), nullable=False),
    Column("certificate_type", String(40), nullable=False),
    Column("hash_algorithm", String(8), nullable=False),
    Column("issuer_name_hash", String(128), nullable=False),
    Column("issuer_key_hash", String(128), nullable=False),
    Column("serial_number", String(40), nullable=False),
    #: The PEM, when the CSMS installed it (the station reports hashes only).
    Column("certificate", Text),
    #: reported (GetInstalledCertificateIds) or installed (InstallCertificate Accepted, not yet reported)
    Column("source", String(16), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("security_installed_certificates_station", "station_id", "certificate_type"),
)

# -- security events (docs/security.md, "Security events") -------------------------------------------

#: SecurityEventNotification.req of the stations (origin "station") and the CSMS's own findings about
#: a station (origin "csms", e.g. a rejected CSR).
security_events = Table(
    "security_events", metadata,
    Column("id", BIG_KEY, primary_key=True, autoincrement=True),
    Column("station_id", String(255), nullable=False),
    Column("origin", String(16), nullable=False),
    Column("type", String(50), nullable=False),
    Column("timestamp", DateTime(timezone=True), nullable=False),
    Column("tech_info", String(255)),
    Column("critical", Boolean, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Index("security_events_station_time", "station_id", "timestamp"),
    Index("security_events_time", "timestamp"),
    Index("security_events_received_at", "received_at"),  # the retention purge's (csms.retention)
)

# -- security profiles (docs/security.md, "Security profiles") -----------------------------------------

#: Security profiles (OCPP 1.6 Security whitepaper §2): the lowest one each station may connect at (the
#: highest it has connected at, or what an operator set; TC_083), and the one of its latest connection.
station_profiles = Table(
    "security_station_profiles", metadata,
    Column("station_id", String(255), primary_key=True),
    Column("profile", BigInteger, nullable=False),
    Column("last_connection_profile", BigInteger),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
