"""SignCertificate and CertificateSigned (whitepaper use cases A02/A03; OCTT TC_074, TC_077).

A station's CSR is checked (:func:`.certificates.check_csr`) and stored: a bad one is answered
Rejected and recorded as a security event; a good one is answered Accepted, then signed by the CSMS
CA and sent back with CertificateSigned, or, with an external CA, kept until the operator posts the
signed chain. What the station answers to CertificateSigned is recorded, whichever route sent it.
"""
from __future__ import annotations

from datetime import timedelta

from cryptography.x509.oid import NameOID
from sqlalchemy import func, insert, select, update
from twisted.internet import defer, threads
from twisted.logger import Logger

from csms.rpc import CallErrorReceived, CallTimeout, ResponseInvalid, StationOffline
from csms.stations import as_utc

from .ca import issued_by
from .certificates import Refused, check_csr, parse_chain, parse_csr, same_public_key, to_pem
from .events import CSMS, CSR_REJECTED
from .tables import certificate_requests

log = Logger(namespace="csms.security")

REJECTED = "rejected"
AWAITING_CERTIFICATE = "awaiting_certificate"
SIGNING = "signing"
SIGNED = "signed"
ACCEPTED = "accepted"
REJECTED_BY_STATION = "rejected_by_station"
SEND_FAILED = "send_failed"
STATUSES = (REJECTED, AWAITING_CERTIFICATE, SIGNING, SIGNED, ACCEPTED, REJECTED_BY_STATION, SEND_FAILED)


def failure_text(error) -> str:
    """Why a CertificateSigned call failed, in a few words."""
    if isinstance(error, CallErrorReceived):
        return f"the station answered CALLERROR {error.code}"[:200]
    if isinstance(error, CallTimeout):
        return "the station did not answer in time"
    if isinstance(error, StationOffline):
        return "the station was not connected"
    if isinstance(error, ResponseInvalid):
        return "the station's answer was invalid"
    message = getattr(error, "message", None)  # the operator API's answer: the call was not sent
    return f"not sent: {message}"[:200] if message else "the call failed"


def request_view(row) -> dict:
    view = dict(row._mapping)
    for name in ("received_at", "updated_at", "not_before", "not_after"):
        view[name] = as_utc(view[name])
    return view


def current_certificates():
    """The newest accepted request of each station: its current certificate (a subquery of ids)."""
    return (select(func.max(certificate_requests.c.id).label("id"))
            .where(certificate_requests.c.status == ACCEPTED)
            .group_by(certificate_requests.c.station_id).subquery())


def certificate_view(row) -> dict:
    return {"station_id": row.station_id, "request_id": row.id, "serial_number": row.serial_number,
            "not_before": as_utc(row.not_before), "not_after": as_utc(row.not_after),
            "accepted_at": as_utc(row.updated_at)}


class CertificateRequests:
    def __init__(self, app, ca, events, organization: str, validity: timedelta, external_ca: bool):
        """``ca``: () -> the CSMS CA (:class:`.ca.CertificateAuthority`), loaded when first asked for."""
        self.app = app
        self.ca = ca
        self.events = events
        self.organization = organization
        self.validity = validity
        self.external_ca = external_ca
        #: request id -> the Deferred of its signing and CertificateSigned call, while it runs.
        self._deliveries: dict[int, defer.Deferred] = {}

    # -- SignCertificate.req ---------------------------------------------------------------------------

    def handle_sign_certificate(self, station, payload) -> defer.Deferred:
        station_id, pem = station.station_id, payload["csr"]
        try:
            csr = parse_csr(pem)
            check_csr(csr, station_id, self.organization)
        except Refused as exc:
            return self._reject(station_id, pem, exc)
        status = AWAITING_CERTIFICATE if self.external_ca else SIGNING
        answer = defer.Deferred()

        def stored(request_id):
            # The answer goes out (synchronously, from this callback) before CertificateSigned can.
            answer.callback({"status": "Accepted"})
            if not self.external_ca:
                self._deliver_later(request_id, station_id, csr)
        self._add(station_id, pem, status).addCallbacks(stored, answer.errback)
        return answer

    def _reject(self, station_id: str, pem: str, refused: Refused) -> defer.Deferred:
        log.warn("Rejected the CSR of {station}: {reason}", station=station_id, reason=refused.message)
        d = self._add(station_id, pem, REJECTED, reason_code=refused.code, reason=refused.message)
        d.addCallback(lambda _: self.events.record(station_id, CSMS, CSR_REJECTED, self.app.now(),
                                                   f"{refused.code}: {refused.message}"[:255]))
        return d.addCallback(lambda _: {"status": "Rejected"})

    def _add(self, station_id: str, pem: str, status: str, reason_code=None, reason=None) -> defer.Deferred:
        now = self.app.now()
        row = {"station_id": station_id, "received_at": now, "updated_at": now, "csr": pem, "status": status,
               "reason_code": reason_code, "reason": reason}

        def thd(conn):
            return conn.execute(insert(certificate_requests).values(**row)
                                .returning(certificate_requests.c.id)).scalar_one()
        return self.app.db.run(thd, desc="security_add_certificate_request")

    # -- signing and CertificateSigned -------------------------------------------------------------------

    def _deliver_later(self, request_id: int, station_id: str, csr) -> None:
        def not_signed(failure):
            log.failure("Signing the CSR {id} of {station} failed", failure, id=request_id, station=station_id)
            return self.unsent(request_id, "signing failed")
        d = defer.maybeDeferred(self._sign, csr).addCallbacks(lambda chain: self.send_chain(request_id, station_id, chain), not_signed)
        d.addErrback(lambda _: None)  # send_chain logged and recorded its failure
        self._deliveries[request_id] = d

        def done(_):
            del self._deliveries[request_id]
        d.addBoth(done)

    def settled(self) -> defer.Deferred:
        """Fires once every signing and CertificateSigned call under way has ended (for tests and shutdown)."""
        return defer.DeferredList(list(self._deliveries.values()), consumeErrors=True)

    def _sign(self, csr) -> defer.Deferred:
        valid_from = self.app.now()
        ca = self.ca()

        def sign():  # an RSA CA key takes milliseconds per signature: off the reactor thread
            return to_pem([ca.sign(csr, valid_from, self.validity), ca.certificate])
        return threads.deferToThreadPool(self.app.reactor, self.app.reactor.getThreadPool(), sign)

    def store_chain(self, request_id: int, chain_pem: str) -> defer.Deferred:
        """Keep ``chain_pem`` as the request's certificate, about to be sent (status signed)."""
        leaf = parse_chain(chain_pem)[0]
        leaf_serial = format(leaf.serial_number, "x")

        def thd(conn):
            conn.execute(update(certificate_requests).where(certificate_requests.c.id == request_id)
                         .values(status=SIGNED, certificate_chain=chain_pem, serial_number=leaf_serial,
                                 not_before=leaf.not_valid_before_utc, not_after=leaf.not_valid_after_utc,
                                 reason=None, updated_at=self.app.now()))
        return self.app.db.run(thd, desc="security_store_certificate_chain")

    def unsent(self, request_id: int, reason: str) -> defer.Deferred:
        """CertificateSigned was never sent (not signed, station offline, a check refused it): say so on the request.
        A call that was sent has its outcome recorded by :meth:`call_completed` / :meth:`call_failed`."""
        def thd(conn):
            conn.execute(update(certificate_requests).where(certificate_requests.c.id == request_id,
                                                            certificate_requests.c.status.in_((SIGNING, SIGNED)))
                         .values(status=SEND_FAILED, reason=reason, updated_at=self.app.now()))
        return self.app.db.run(thd, desc="security_certificate_unsent")

    def send_chain(self, request_id: int, station_id: str, chain_pem: str) -> defer.Deferred:
        """Store ``chain_pem`` as the request's certificate, then send it; fires with the station's answer."""
        d = self.store_chain(request_id, chain_pem)
        d.addCallback(lambda _: self.app.call(station_id, "CertificateSigned", {"certificateChain": chain_pem}))

        def failed(failure):
            log.warn("CertificateSigned for {station} (request {id}) failed: {why}", station=station_id,
                     id=request_id, why=failure_text(failure.value))
            return self.unsent(request_id, failure_text(failure.value)).addCallback(lambda _: failure)
        return d.addErrback(failed)

    def call_completed(self, station_id: str, request: dict, response: dict) -> defer.Deferred:
        status = ACCEPTED if response["status"] == "Accepted" else REJECTED_BY_STATION
        if status == REJECTED_BY_STATION:
            log.warn("{station} rejected the certificate chain the CSMS sent it (CertificateSigned)",
                     station=station_id)
        return self._outcome(station_id, request["certificateChain"], status, None)

    def call_failed(self, station_id: str, request: dict, error) -> defer.Deferred:
        return self._outcome(station_id, request["certificateChain"], SEND_FAILED, failure_text(error))

    def _outcome(self, station_id: str, chain_pem: str, status: str, reason: str | None) -> defer.Deferred:
        def thd(conn):
            # The newest request this chain was stored for (an operator may send any chain through the
            # generic call route: then no request is changed).
            request_id = conn.execute(
                select(func.max(certificate_requests.c.id))
                .where(certificate_requests.c.station_id == station_id,
                       certificate_requests.c.certificate_chain == chain_pem)).scalar_one()
            if request_id is not None:
                conn.execute(update(certificate_requests).where(certificate_requests.c.id == request_id)
                             .values(status=status, reason=reason, updated_at=self.app.now()))
        return self.app.db.run(thd, desc="security_certificate_signed_outcome")

    # -- the operator: list, and post a chain an external CA signed --------------------------------------

    def list(self, station_id: str, limit: int, offset: int, status: str | None = None,
             expires_before=None) -> defer.Deferred:
        conditions = [certificate_requests.c.station_id == station_id]
        if status is not None:
            conditions.append(certificate_requests.c.status == status)
        if expires_before is not None:
            conditions.append(certificate_requests.c.not_after < expires_before)

        def thd(conn):
            total = conn.execute(select(func.count()).select_from(certificate_requests)
                                 .where(*conditions)).scalar_one()
            rows = conn.execute(select(certificate_requests).where(*conditions)
                                .order_by(certificate_requests.c.id.desc()).limit(limit).offset(offset)).fetchall()
            return total, [request_view(row) for row in rows]
        return self.app.db.run(thd, desc="security_list_certificate_requests")

    def list_current(self, limit: int, offset: int, expires_before=None, station_id: str | None = None):
        """Each station's current certificate (that of its newest accepted request), the earliest to end
        first: (total, page)."""
        current = current_certificates()
        conditions = [certificate_requests.c.id == current.c.id]
        if expires_before is not None:
            conditions.append(certificate_requests.c.not_after < expires_before)
        if station_id is not None:
            conditions.append(certificate_requests.c.station_id == station_id)

        def thd(conn):
            total = conn.execute(select(func.count()).select_from(certificate_requests).join(
                current, certificate_requests.c.id == current.c.id).where(*conditions)).scalar_one()
            rows = conn.execute(select(certificate_requests).join(current, certificate_requests.c.id == current.c.id)
                                .where(*conditions)
                                .order_by(certificate_requests.c.not_after, certificate_requests.c.station_id)
                                .limit(limit).offset(offset)).fetchall()
            return total, [certificate_view(row) for row in rows]
        return self.app.db.run(thd, desc="security_list_station_certificates")

    def current_of(self, station_ids: list[str]) -> defer.Deferred:
        """{station_id: its current certificate} for the stations that have one (the station views)."""
        current = current_certificates()

        def thd(conn):
            rows = conn.execute(select(certificate_requests).join(current, certificate_requests.c.id == current.c.id)
                                .where(certificate_requests.c.station_id.in_(station_ids))).fetchall()
            return {row.station_id: certificate_view(row) for row in rows}
        return self.app.db.run(thd, desc="security_station_certificates")

    def expiry_summary(self, now, soon, first: int) -> defer.Deferred:
        """What the stations' current certificates (those with a known end) say about expiry, as a dict:
        ``earliest`` end (None without any), how many have ``expired`` (end at or before ``now``), how many
        end ``soon`` (after ``now``, before ``soon``), and the ``first`` of both as (station_id, not_after),
        the earliest first."""
        current = current_certificates()
        joined = certificate_requests.join(current, certificate_requests.c.id == current.c.id)
        ends = certificate_requests.c.not_after

        def thd(conn):
            earliest = conn.execute(select(func.min(ends)).select_from(joined)).scalar()
            expired = conn.execute(select(func.count()).select_from(joined).where(ends <= now)).scalar_one()
            ending = conn.execute(select(func.count()).select_from(joined)
                                  .where(ends > now, ends < soon)).scalar_one()
            rows = conn.execute(select(certificate_requests.c.station_id, ends).select_from(joined)
                                .where(ends < soon).order_by(ends, certificate_requests.c.station_id)
                                .limit(first)).fetchall()
            return {"earliest": as_utc(earliest), "expired": expired, "soon": ending,
                    "first": [(row.station_id, as_utc(row.not_after)) for row in rows]}
        return self.app.db.run(thd, desc="security_certificate_expiry")

    def get(self, station_id: str, request_id: int) -> defer.Deferred:
        def thd(conn):
            row = conn.execute(select(certificate_requests).where(
                certificate_requests.c.id == request_id, certificate_requests.c.station_id == station_id)).first()
            return None if row is None else request_view(row)
        return self.app.db.run(thd, desc="security_get_certificate_request")

    @staticmethod
    def check_signed_chain(request: dict, chain_pem: str, station_id: str) -> str:
        """The chain an operator posts for ``request``, as it is sent; Refused when it does not fit the CSR."""
        chain = parse_chain(chain_pem)
        csr = parse_csr(request["csr"])
        if not same_public_key(chain[0].public_key(), csr.public_key()):
            raise Refused("public_key_mismatch", "The first certificate's public key is not the CSR's")
        leaf_names = [a.value for a in chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if leaf_names != [station_id]:
            raise Refused("common_name_mismatch", f"The first certificate's subject commonName is not {station_id!r}")
        for position, (certificate, issuer) in enumerate(zip(chain, chain[1:]), start=1):
            if not issued_by(certificate, issuer):
                raise Refused("chain_broken", f"Certificate {position} of the chain is not issued by the next one")
        return to_pem(chain)

    def delete_station(self, station_id: str) -> defer.Deferred:
        def thd(conn):
            conn.execute(certificate_requests.delete().where(certificate_requests.c.station_id == station_id))
        return self.app.db.run(thd, desc="security_delete_station_certificate_requests")
