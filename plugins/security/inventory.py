"""Each station's installed certificates, as it last reported them (whitepaper use cases M03-M05;
OCTT TC_075, TC_076, TC_078).

GetInstalledCertificateIds answered Accepted or NotFound replaces what is known of that certificate
type; InstallCertificate and DeleteCertificate answered Accepted add and remove an entry in between.
Kept current from ``csms_on_call_completed``, so whichever route sent the call counts.
"""
from __future__ import annotations

from sqlalchemy import delete, insert, select
from twisted.internet import defer

from csms.stations import as_utc

from .certificates import HASH_ALGORITHMS, Refused, hash_data, is_self_signed, parse_certificate, same_hash_data
from .tables import installed_certificates

REPORTED, INSTALLED = "reported", "installed"
#: The hash algorithm of an entry the CSMS installed and the station has not reported yet.
DEFAULT_ALGORITHM = "SHA256"


def entry_view(row) -> dict:
    entry = dict(row._mapping)
    entry["updated_at"] = as_utc(entry["updated_at"])
    return entry


def hash_of(entry: dict) -> dict:
    return {"hashAlgorithm": entry["hash_algorithm"], "issuerNameHash": entry["issuer_name_hash"],
            "issuerKeyHash": entry["issuer_key_hash"], "serialNumber": entry["serial_number"]}


def _columns(data: dict) -> dict:
    return {"hash_algorithm": data["hashAlgorithm"], "issuer_name_hash": data["issuerNameHash"],
            "issuer_key_hash": data["issuerKeyHash"], "serial_number": data["serialNumber"]}


def certificate_matches(pem: str | None, data: dict) -> bool:
    """Whether the self-signed certificate ``pem`` has the hash data ``data``."""
    if not pem or data["hashAlgorithm"] not in HASH_ALGORITHMS:
        return False
    try:
        return same_hash_data(hash_data(parse_certificate(pem), data["hashAlgorithm"]), data)
    except Refused:
        return False


class Inventory:
    def __init__(self, app):
        self.app = app

    def list(self, station_id: str, certificate_type: str | None = None) -> defer.Deferred:
        conditions = [installed_certificates.c.station_id == station_id]
        if certificate_type is not None:
            conditions.append(installed_certificates.c.certificate_type == certificate_type)

        def thd(conn):
            rows = conn.execute(select(installed_certificates).where(*conditions)
                                .order_by(installed_certificates.c.id)).fetchall()
            return [entry_view(row) for row in rows]
        return self.app.db.run(thd, desc="security_list_installed_certificates")

    def installed(self, station_id: str, certificate_type: str, pem: str) -> defer.Deferred:
        """InstallCertificate was Accepted: an entry with the PEM, until the station reports its own."""
        try:
            certificate = parse_certificate(pem)
        except Refused:  # sent through the generic call route: the station accepted what is not a certificate
            return defer.succeed(None)
        if not is_self_signed(certificate):  # its issuer's key is unknown: wait for the station's report
            return defer.succeed(None)
        data = hash_data(certificate, DEFAULT_ALGORITHM)
        now = self.app.now()

        def thd(conn):
            known = conn.execute(select(installed_certificates).where(
                installed_certificates.c.station_id == station_id,
                installed_certificates.c.certificate_type == certificate_type)).fetchall()
            if any(row.certificate == pem or certificate_matches(pem, hash_of(row._mapping)) for row in known):
                return
            conn.execute(insert(installed_certificates).values(
                station_id=station_id, certificate_type=certificate_type, certificate=pem, source=INSTALLED,
                updated_at=now, **_columns(data)))
        return self.app.db.run(thd, desc="security_certificate_installed")

    def reported(self, station_id: str, certificate_type: str, hash_data_list: list[dict]) -> defer.Deferred:
        """GetInstalledCertificateIds answered: the station's list replaces what was known of the type;
        an entry keeps the PEM the CSMS installed when its hash data is that certificate's."""
        now = self.app.now()

        def thd(conn):
            table = installed_certificates
            where = (table.c.station_id == station_id, table.c.certificate_type == certificate_type)
            pems = [row.certificate for row in conn.execute(select(table.c.certificate).where(
                *where, table.c.certificate.is_not(None))).fetchall()]
            conn.execute(delete(table).where(*where))
            for data in hash_data_list:
                pem = next((p for p in pems if certificate_matches(p, data)), None)
                conn.execute(insert(table).values(station_id=station_id, certificate_type=certificate_type,
                                                  certificate=pem, source=REPORTED, updated_at=now,
                                                  **_columns(data)))
        return self.app.db.run(thd, desc="security_certificates_reported")

    def deleted(self, station_id: str, data: dict) -> defer.Deferred:
        """DeleteCertificate was Accepted: the entries naming that certificate go."""
        def thd(conn):
            table = installed_certificates
            rows = conn.execute(select(table).where(table.c.station_id == station_id)).fetchall()
            gone = [row.id for row in rows
                    if same_hash_data(hash_of(row._mapping), data) or certificate_matches(row.certificate, data)]
            if gone:
                conn.execute(delete(table).where(table.c.id.in_(gone)))
        return self.app.db.run(thd, desc="security_certificate_deleted")

    def algorithm_for(self, station_id: str, pem: str) -> defer.Deferred:
        """The hash algorithm the station reported ``pem`` with, or None (TC_076: delete with that one)."""
        def thd(conn):
            rows = conn.execute(select(installed_certificates).where(
                installed_certificates.c.station_id == station_id,
                installed_certificates.c.source == REPORTED)).fetchall()
            for row in rows:
                if certificate_matches(pem, hash_of(row._mapping)):
                    return row.hash_algorithm
            return None
        return self.app.db.run(thd, desc="security_certificate_algorithm")

    def delete_station(self, station_id: str) -> defer.Deferred:
        def thd(conn):
            conn.execute(delete(installed_certificates).where(installed_certificates.c.station_id == station_id))
        return self.app.db.run(thd, desc="security_delete_station_certificates")
