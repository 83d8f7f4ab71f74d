"""The operator API against its own OpenAPI document, checked by an independent tool: schemathesis.

Schemathesis reads the served document and sends every operation requests generated from it (the
schema's edges, then random ones) and requests that break it, and checks each answer: no 5xx, a status
the document lists for the route, a body matching the response schema the document gives, the declared
content type and headers, a 4xx for a request the schema refuses, 401 without the token, a 405 with a
truthful ``Allow``. Its first run over this API (2026-12, 35,800 requests) found a 500 and six other
disagreements; each is a test of its own elsewhere (test_hardening_http, test_smartcharging,
test_api_core, test_api), and this run keeps new ones from coming in.

Deliberately left out:
- ``positive_data_acceptance`` (every schema-valid request must succeed): the document cannot say that a
  reservation's expiry lies in the future or that an id tag exists, so business refusals (a documented
  4xx) would count as failures;
- the webhook routes that register or fire a receiver: a generated URL's host is resolved and, for a
  test-fire, sent a request; a test reaches nothing but loopback.

The run is seeded and deterministic, bounded per operation, and runs in a process of its own while the
CSMS serves it from this test's reactor. Nothing is connected: routes that send a station a command
answer 409 station_offline, as documented.
"""
from __future__ import annotations

import os
import shutil
import sys

import pytest
import pytest_twisted
from twisted.internet import utils

from csms.testing.pytest_plugin import TEST_API_TOKEN

#: Test cases per operation and phase: enough to reach every schema's edges in the coverage phase.
MAX_EXAMPLES = 8
CHECKS_LEFT_OUT = "positive_data_acceptance"
#: Operations that would make the CSMS reach for a host a generated URL names (see above).
REACHING_OUT = (("post", "/webhooks"), ("patch", "/webhooks/{subscription_id}"),
                ("post", "/webhooks/{subscription_id}/test"))


def schemathesis_cli() -> str:
    """The ``st`` command of this interpreter's environment (the test extras install it)."""
    path = os.path.join(os.path.dirname(sys.executable), "st")
    if not os.path.exists(path):
        path = shutil.which("st")
    if path is None:
        pytest.fail("schemathesis is not installed: `make test` installs the test extras (setup.cfg)")
    return path


@pytest.mark.timeout(600)
@pytest_twisted.ensureDeferred
async def test_every_operation_answers_as_the_openapi_document_says(csms, tmp_path):
    # Something to find for the routes that read, update or delete a stored item.
    for path, body in (("/stations", {"id": "CP-1", "description": "fuzzed"}), ("/id-tags", {"id_tag": "TAG-1"})):
        status, answer, _ = await csms.api("POST", path, json=body)
        assert status == 201, answer
    status, document, _ = await csms.api("GET", "/openapi.json")
    left_out = [document["paths"][path][method]["operationId"] for method, path in REACHING_OUT]
    args = ["run", csms.api_url + "/openapi.json",
            "--header", f"Authorization: Bearer {TEST_API_TOKEN}",
            "--checks", "all", "--exclude-checks", CHECKS_LEFT_OUT,
            "--phases", "examples,coverage,fuzzing", "--max-examples", str(MAX_EXAMPLES),
            "--seed", "20261203", "--generation-deterministic",
            "--generation-allow-x00", "true", "--no-shrink", "--workers", "1", "--request-timeout", "20",
            *[arg for operation_id in left_out for arg in ("--exclude-operation-id", operation_id)],
            "--warnings", "off", "--no-color", "--report", "junit", "--report-dir", str(tmp_path)]
    out, err, code = await utils.getProcessOutputAndValue(
        schemathesis_cli(), args, env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_HOOKS": ""}, path=str(tmp_path))
    output = out.decode("utf-8", "replace") + err.decode("utf-8", "replace")
    assert code == 0, output[-20000:]
    assert " passed" in output and "generated" in output, output[-5000:]
