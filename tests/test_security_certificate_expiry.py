"""Security plugin, station certificate expiry: at security profile 3 a station whose certificate has
expired cannot connect, so the CSMS keeps each signed certificate's serial and validity, lists the
stations' current certificates by their end, counts those ending soon in metrics and warns once a day.

Time is the app's task.Clock: certificates are signed "now" by that clock, and advancing it runs the
hourly reading of the certificates.
"""
from __future__ import annotations

from datetime import timedelta
from urllib.parse import quote

import pytest_twisted
from conftest import within
from cryptography import x509
from sqlalchemy import create_engine, insert, select

from test_hardening_ws import logged  # noqa: F401  (a fixture)
from test_security_certificates import api, make_csr, renew, requests_of, security

from csms.testing.pki import make_key

EARLIEST = "csms_security_station_certificate_earliest_not_after_timestamp_seconds"
DAY = 86400
#: (id of the running CSMS, station id) -> the test station connected as it.
CONNECTED: dict = {}


async def certificate_of(csms, station_id: str, answer: str = "Accepted") -> x509.Certificate:
    """Have ``station_id`` renew its certificate (answering CertificateSigned with ``answer``): its leaf."""
    station = CONNECTED.get((id(csms), station_id))
    if station is None or station.closed.called:
        station = CONNECTED[id(csms), station_id] = await csms.connect_booted(station_id)
    station.received_calls.clear()
    station.responses["CertificateSigned"] = {"status": answer}
    csr_pem, _ = make_csr(station_id, make_key("ec"))
    chain = await renew(csms, station, station_id, csr_pem)
    await within(security(csms).expiry.refresh())
    return x509.load_pem_x509_certificates(chain.encode())[0]


def text(moment) -> str:
    """A time as the API writes it (certificates' times are whole seconds)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def metric(csms, name: str):
    return csms.app.metrics.registry.get_sample_value(name)


async def advance(csms, seconds: float) -> None:
    """Move the app's clock on, and wait for the reading of the certificates it starts (hourly)."""
    csms.clock.advance(seconds)
    await within(security(csms).expiry.refresh())


@pytest_twisted.ensureDeferred
async def test_a_signed_certificate_is_kept_with_its_serial_and_validity_and_shown_on_the_station(csms):
    leaf = await certificate_of(csms, "CP-EXP-1")
    [request] = await requests_of(csms, "CP-EXP-1")
    assert (request["status"], request["serial_number"], request["not_before"], request["not_after"]) == \
        ("accepted", format(leaf.serial_number, "x"), text(leaf.not_valid_before_utc), text(leaf.not_valid_after_utc))
    status, station = await api(csms, "GET", "/stations/CP-EXP-1")
    assert status == 200
    assert station["station_certificate"] == {
        "station_id": "CP-EXP-1", "request_id": request["id"], "serial_number": format(leaf.serial_number, "x"),
        "not_before": text(leaf.not_valid_before_utc), "not_after": text(leaf.not_valid_after_utc),
        "accepted_at": request["updated_at"]}
    await api(csms, "POST", "/stations", {"id": "CP-EXP-NONE"})
    status, station = await api(csms, "GET", "/stations/CP-EXP-NONE")
    assert (status, station["station_certificate"]) == (200, None)
    status, page = await api(csms, "GET", "/stations")
    assert {s["id"]: s["station_certificate"] is not None for s in page["items"]} == \
        {"CP-EXP-1": True, "CP-EXP-NONE": False}


@pytest_twisted.ensureDeferred
async def test_current_certificates_are_listed_by_their_end_and_filtered_with_expires_before(csms):
    first = await certificate_of(csms, "CP-EXP-A")
    await advance(csms, 100 * DAY)
    second = await certificate_of(csms, "CP-EXP-B")
    # A chain the station rejected is not its certificate: CP-EXP-A's current one stays the first.
    await certificate_of(csms, "CP-EXP-A", answer="Rejected")
    assert second.not_valid_after_utc - first.not_valid_after_utc == timedelta(days=100)

    status, body = await api(csms, "GET", "/security/station-certificates")
    assert status == 200 and body["total"] == 2
    assert [(c["station_id"], c["serial_number"], c["not_after"]) for c in body["items"]] == [
        ("CP-EXP-A", format(first.serial_number, "x"), text(first.not_valid_after_utc)),
        ("CP-EXP-B", format(second.serial_number, "x"), text(second.not_valid_after_utc))]
    between = quote(text(first.not_valid_after_utc + timedelta(days=1)))
    status, body = await api(csms, "GET", f"/security/station-certificates?expires_before={between}")
    assert (status, body["total"], [c["station_id"] for c in body["items"]]) == (200, 1, ["CP-EXP-A"])
    status, body = await api(csms, "GET", "/security/station-certificates?station_id=CP-EXP-B&limit=1")
    assert [c["station_id"] for c in body["items"]] == ["CP-EXP-B"]

    # A station's own requests: the filter keeps those whose certificate ends before the time given.
    status, body = await api(csms, "GET", f"/stations/CP-EXP-A/certificate-requests?expires_before={between}")
    assert (status, [r["status"] for r in body["items"]]) == (200, ["accepted"])
    status, body = await api(csms, "GET", "/stations/CP-EXP-A/certificate-requests")
    assert [r["status"] for r in body["items"]] == ["rejected_by_station", "accepted"]
    status, body = await api(csms, "GET", "/security/station-certificates?expires_before=yesterday")
    assert status == 400


@pytest_twisted.ensureDeferred
async def test_metrics_give_the_earliest_end_and_count_certificates_expiring_and_expired(csms, logged):  # noqa: F811
    await within(security(csms).expiry.refresh())
    assert metric(csms, EARLIEST) is None  # no certificate: no sample (0 would read as long expired)
    assert (metric(csms, "csms_security_station_certificates_expiring"),
            metric(csms, "csms_security_station_certificates_expired")) == (0, 0)
    first = await certificate_of(csms, "CP-EXP-M1")
    await advance(csms, 10 * DAY)
    await certificate_of(csms, "CP-EXP-M2")
    assert metric(csms, EARLIEST) == first.not_valid_after_utc.timestamp()
    assert metric(csms, "csms_security_station_certificates_expiring") == 0
    assert not [t for _, _, t in logged if "Station certificates:" in t]

    # 20 days before the first one ends: the hourly reading counts it, and the warning names it once a day.
    until_warning = (first.not_valid_after_utc - timedelta(days=20)).timestamp() - csms.clock.seconds()
    await advance(csms, until_warning)
    assert (metric(csms, "csms_security_station_certificates_expiring"),
            metric(csms, "csms_security_station_certificates_expired")) == (1, 0)
    warnings = [t for _, _, t in logged if "Station certificates:" in t]
    assert warnings == ["Station certificates: 0 expired, 1 expiring within 30 days (at security profile 3 such a "
                        "station cannot connect; renew with ExtendedTriggerMessage(SignChargePointCertificate)): "
                        f"CP-EXP-M1 ({first.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})"], warnings
    for _ in range(3):
        await advance(csms, 3600)
    assert len([t for _, _, t in logged if "Station certificates:" in t]) == 1
    await advance(csms, DAY)
    assert len([t for _, _, t in logged if "Station certificates:" in t]) == 2

    # Both past their end (the second 10 days later): expired, and no longer expiring.
    await advance(csms, 31 * DAY)
    assert (metric(csms, "csms_security_station_certificates_expiring"),
            metric(csms, "csms_security_station_certificates_expired")) == (0, 2)
    assert [t for _, _, t in logged if "Station certificates:" in t][-1].startswith(
        "Station certificates: 2 expired, 0 expiring within 30 days")

    # Renewing the first station's certificate moves the earliest end to the other's at once.
    renewed = await certificate_of(csms, "CP-EXP-M1")
    assert metric(csms, "csms_security_station_certificates_expired") == 1
    assert metric(csms, EARLIEST) < renewed.not_valid_after_utc.timestamp()
    status, _ = await api(csms, "DELETE", "/stations/CP-EXP-M2")
    await within(security(csms).expiry.refresh())
    assert metric(csms, EARLIEST) == renewed.not_valid_after_utc.timestamp()


@pytest_twisted.ensureDeferred
async def test_no_warning_with_certificate_expiry_warning_days_0(csms_factory, logged):  # noqa: F811
    csms = await csms_factory("[plugin:security]\ncertificate_expiry_warning_days = 0\n")
    await certificate_of(csms, "CP-EXP-QUIET")
    await advance(csms, 364 * DAY)
    assert not [t for _, _, t in logged if "Station certificates:" in t]
    assert metric(csms, "csms_security_station_certificates_expiring") == 0


def test_security_0003_fills_in_the_validity_of_chains_stored_before_it(database_url):
    """Certificates signed by an earlier release are tracked too: the migration reads their stored chains."""
    from alembic import command
    from test_migrations import builtin_histories

    from csms_plugins.security.tables import certificate_requests
    from csms.testing.pki import make_ca, make_certificate

    [history] = [h for h in builtin_histories() if h.name == "security"]
    leaf = make_certificate(make_ca(), "CP-OLD", days=42)
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            command.upgrade(history.config(conn), "security_0001")
            old = {"station_id": "CP-OLD", "received_at": leaf.certificate.not_valid_before_utc, "csr": "...",
                   "updated_at": leaf.certificate.not_valid_before_utc}
            conn.execute(insert(certificate_requests).values(
                [{**old, "status": "accepted", "certificate_chain": leaf.chain_pem.decode(), "serial_number": "1"},
                 {**old, "status": "rejected", "certificate_chain": None, "serial_number": None}]))
        with engine.begin() as conn:
            command.upgrade(history.config(conn), "heads")
            rows = conn.execute(select(certificate_requests.c.status, certificate_requests.c.not_before,
                                       certificate_requests.c.not_after).order_by(certificate_requests.c.id)).all()
    finally:
        engine.dispose()
    from csms.stations import as_utc

    assert [(status, as_utc(start), as_utc(end)) for status, start, end in rows] == [
        ("accepted", leaf.certificate.not_valid_before_utc, leaf.certificate.not_valid_after_utc),
        ("rejected", None, None)]
