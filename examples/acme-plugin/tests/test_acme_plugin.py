"""ACME's plugin, tested with the CSMS's own pytest plugin (``csms.testing``, installed with csms):
``csms_factory`` starts a real Central System on loopback, on SQLite and (when
CSMS_TEST_POSTGRES_URL is set) on PostgreSQL; ``connect_booted`` gives a test station that has booted."""
from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor

from csms.testing import untyped_operations
from csms.testing.station import CallErrorFrame

TIMEOUT = 10
HELLO = {"serialNumber": "ACME-0042", "moduleCount": 4}


async def acme_csms(csms_factory):
    """Core and ACME (acmehub) enabled by their entry point names, as an operator's [plugins] enabled would."""
    return await csms_factory(plugins=["core", "acmehub"])


def waited(deferred):
    return deferred.addTimeout(TIMEOUT, reactor)


@pytest_twisted.ensureDeferred
async def test_acme_hello_is_recorded_and_listed(csms_factory):
    csms = await acme_csms(csms_factory)
    station = await csms.connect_booted("ACME-1")
    assert await station.call("AcmeHello", HELLO) == {"status": "Accepted"}

    status, body, _ = await csms.api("GET", "/acmehub/stations/ACME-1/hellos")
    assert status == 200
    assert [(h["serial_number"], h["module_count"]) for h in body["items"]] == [("ACME-0042", 4)]


@pytest_twisted.ensureDeferred
async def test_acme_hello_outside_its_schema_gets_the_schema_error(csms_factory):
    csms = await acme_csms(csms_factory)
    station = await csms.connect_booted("ACME-2")
    with pytest.raises(CallErrorFrame) as caught:
        await station.call("AcmeHello", {"serialNumber": "ACME-0042", "moduleCount": 17})
    assert caught.value.code == "PropertyConstraintViolation"
    status, body, _ = await csms.api("GET", "/acmehub/stations/ACME-2/hellos")
    assert (status, body["items"]) == (200, [])


@pytest_twisted.ensureDeferred
async def test_reboot_route_sends_acme_reboot(csms_factory):
    csms = await acme_csms(csms_factory)
    station = await csms.connect_booted("ACME-3")
    station.responses["AcmeReboot"] = lambda payload: {"status": "Accepted" if payload["module"] <= 4 else "Rejected"}

    status, body, _ = await csms.api("POST", "/acmehub/stations/ACME-3/reboot", json={"module": 2})
    assert (status, body) == (200, {"status": "Accepted"})
    assert await waited(station.wait_for_call("AcmeReboot")) == {"module": 2}
    # The generic call route takes the vendor action too.
    status, body, _ = await csms.api("POST", "/stations/ACME-3/calls/AcmeReboot", json={"module": 9})
    assert (status, body) == (200, {"status": "Rejected"})

    status, body, _ = await csms.api("POST", "/acmehub/stations/ACME-3/reboot", json={"module": 0})
    assert status == 422
    status, body, _ = await csms.api("POST", "/acmehub/stations/NOBODY/reboot", json={"module": 1})
    assert (status, body["error"]["code"]) == (404, "station_not_found")


@pytest_twisted.ensureDeferred
async def test_deleting_a_station_forgets_its_hellos(csms_factory):
    csms = await acme_csms(csms_factory)
    station = await csms.connect_booted("ACME-4")
    await station.call("AcmeHello", HELLO)
    status, _, _ = await csms.api("DELETE", "/stations/ACME-4")
    assert status == 204
    assert await csms.app.db.run(lambda conn: conn.exec_driver_sql(
        "SELECT count(*) FROM acmehub_hellos WHERE station_id = 'ACME-4'").scalar_one(), desc="test") == 0


@pytest_twisted.ensureDeferred
async def test_openapi_documents_the_acme_actions_and_routes(csms_factory):
    csms = await acme_csms(csms_factory)
    status, document, _ = await csms.api("GET", "/openapi.json", token=None)
    assert status == 200
    assert "/acmehub/stations/{station_id}/reboot" in document["paths"]
    assert document["components"]["schemas"]["AcmeRebootRequest"]["required"] == ["module"]
    # Every ACME route types its bodies, so a client generated from the document is typed too.
    assert untyped_operations(document) == []
    assert "AcmeHelloRecord" in document["components"]["schemas"]


@pytest_twisted.ensureDeferred
async def test_with_acme_not_enabled_its_actions_are_not_supported(csms_factory):
    csms = await csms_factory(plugins=["core"])
    station = await csms.connect_booted("ACME-5")
    with pytest.raises(CallErrorFrame) as caught:
        await station.call("AcmeHello", HELLO)
    assert caught.value.code == "NotSupported"
    status, body, _ = await csms.api("POST", "/stations/ACME-5/calls/AcmeReboot", json={"module": 1})
    assert (status, body["error"]["code"]) == (404, "action_unavailable")


@pytest_twisted.ensureDeferred
async def test_a_hello_with_its_firmware_version_and_a_long_serial_number_is_kept(csms_factory):
    csms = await acme_csms(csms_factory)
    station = await csms.connect_booted("ACME-6")
    serial = "ACME-G2-" + "7" * 32
    assert await station.call("AcmeHello", {**HELLO, "serialNumber": serial, "firmwareVersion": "2.1.0"}) == {
        "status": "Accepted"}
    status, body, _ = await csms.api("GET", "/acmehub/stations/ACME-6/hellos")
    assert [(h["serial_number"], h["firmware_version"]) for h in body["items"]] == [(serial, "2.1.0")]


# -- the plugin's migrations ---------------------------------------------------------------------------------


def acmehub_history():
    from csms.migrations import histories
    from csms.plugins import make_plugin_manager

    (history,) = [h for h in histories(make_plugin_manager(["acmehub"])) if h.name == "acmehub"]
    return history


@pytest_twisted.ensureDeferred
async def test_upgrading_from_the_first_migration_keeps_the_hellos_and_applies_the_second(csms_factory, database_url):
    """A database made at acmehub_0001 with rows in it: the CSMS upgrades it (on SQLite the serial number's
    new type copies the table, batch mode) and the rows come back as they were, with the new column."""
    from alembic import command
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(database_url)
    history = acmehub_history()
    with engine.begin() as conn:
        command.upgrade(history.config(conn), "acmehub_0001")
        conn.execute(text("INSERT INTO acmehub_hellos (station_id, serial_number, module_count, received_at) "
                          "VALUES ('ACME-7', 'ACME-0001', 3, '2026-01-02 03:04:05'), "
                          "('ACME-7', 'ACME-0002', 5, '2026-01-02 03:04:06')"))
        assert "firmware_version" not in {c["name"] for c in inspect(conn).get_columns("acmehub_hellos")}

    csms = await csms_factory("[database]\nauto_upgrade = true\n", plugins=["core", "acmehub"], migrate=True)
    assert await csms.app.schema_is_current() is True
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM acmehub_alembic_version")).scalar_one() == "acmehub_0002"
        columns = {c["name"]: c for c in inspect(conn).get_columns("acmehub_hellos")}
        assert columns["serial_number"]["type"].length == 40 and columns["firmware_version"]["nullable"]
        assert "ix_acmehub_hellos_station_id" in {i["name"] for i in inspect(conn).get_indexes("acmehub_hellos")}
    engine.dispose()
    await csms.connect_booted("ACME-7")  # a known station, for the route
    status, body, _ = await csms.api("GET", "/acmehub/stations/ACME-7/hellos")
    assert status == 200
    assert [(h["serial_number"], h["module_count"], h["firmware_version"], h["received_at"])
            for h in body["items"]] == [("ACME-0001", 3, None, "2026-01-02T03:04:05.000Z"),
                                        ("ACME-0002", 5, None, "2026-01-02T03:04:06.000Z")]


def test_the_migrations_make_exactly_the_plugins_table(database_url):
    """upgrade heads, then Alembic's autogenerate comparison finds nothing between the database and the MetaData."""
    from sqlalchemy import create_engine

    from csms.migrations import differences, prepare_schema

    engine = create_engine(database_url)
    history = acmehub_history()
    with engine.begin() as conn:
        prepare_schema(conn, [history], auto_upgrade=True)
    with engine.connect() as conn:
        assert differences(conn, history) == []
    engine.dispose()
