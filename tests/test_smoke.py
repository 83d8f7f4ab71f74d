import pytest_twisted


@pytest_twisted.ensureDeferred
async def test_boot_and_heartbeat(csms):
    station = await csms.connect("CP-1")
    assert station.subprotocol == "ocpp1.6"
    response = await station.call("BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"})
    assert response["status"] == "Accepted"
    response = await station.call("Heartbeat", {})
    assert response["currentTime"].endswith("Z")
