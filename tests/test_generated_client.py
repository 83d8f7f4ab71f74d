"""A client generated from the served OpenAPI document (openapi-python-client) drives a live CSMS: the
document is usable as it is, and examples/python-client/scenario.py works."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest_twisted
from conftest import clock_now, station_time, within
from twisted.internet import threads

from csms.testing import TEST_API_TOKEN

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "python-client"
GENERATOR = Path(sys.executable).parent / "openapi-python-client"
#: document JSON -> the directory the client generated from it was put in (one generation per run).
_generated: dict = {}


def generate(document: dict, into: Path) -> Path:
    """Run the generator on ``document`` (blocking: call it in a thread); the directory holding csms_client."""
    key = json.dumps(document, sort_keys=True)
    if key not in _generated:
        source = into / "openapi.json"
        source.write_text(key)
        done = subprocess.run([str(GENERATOR), "generate", "--path", str(source), "--config",
                               str(EXAMPLE / "generator.yml"), "--output-path", str(into / "csms-client")],
                              capture_output=True, text=True, timeout=120)
        # Warnings mean something in the document was left untyped or skipped: the document is fixed then.
        assert done.returncode == 0 and "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr
        _generated[key] = into / "csms-client"
    return _generated[key]


def load_scenario(client_dir: Path):
    for path in (str(client_dir), str(EXAMPLE)):
        if path not in sys.path:
            sys.path.insert(0, path)
    return importlib.import_module("scenario")


@pytest_twisted.ensureDeferred
async def test_a_generated_client_registers_starts_remotely_and_lists_the_transaction(csms, tmp_path):
    status, document, _ = await csms.api("GET", "/openapi.json", token=None)
    assert status == 200
    client_dir = await threads.deferToThread(generate, document, tmp_path)
    scenario = load_scenario(client_dir)
    # The generated client blocks on its socket: it runs in a thread while the reactor serves it.
    client = scenario.connect(csms.api_url, TEST_API_TOKEN)

    station, tag = await threads.deferToThread(scenario.register, client, "CP-GEN", "TAG-GEN")
    assert (station.id, station.online, tag.effective_status.value) == ("CP-GEN", False, "Accepted")

    cp = await csms.connect_booted("CP-GEN")
    assert await threads.deferToThread(scenario.is_online, client, "CP-GEN")
    assert await threads.deferToThread(scenario.start_charging, client, "CP-GEN", "TAG-GEN") == "Accepted"
    request = cp.received_calls[-1]
    assert request[2:] == ["RemoteStartTransaction", {"idTag": "TAG-GEN", "connectorId": 1}]

    started = await within(cp.call("StartTransaction", {"connectorId": 1, "idTag": "TAG-GEN", "meterStart": 100,
                                                        "timestamp": station_time(clock_now(csms))}))
    assert started["idTagInfo"]["status"] == "Accepted"

    transactions = await threads.deferToThread(scenario.transactions_of, client, "CP-GEN")
    assert [(t.transaction_id, t.id_tag, t.meter_start, t.active) for t in transactions] == \
        [(started["transactionId"], "TAG-GEN", 100, True)]
    # Typed: the date-time arrives as a datetime, not as text.
    assert abs((transactions[0].started_at - clock_now(csms)).total_seconds()) < 1
