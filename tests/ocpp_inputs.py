"""Station input for the hardening tests: one valid payload of every inbound OCPP 1.6 action and the
fields of its official schema, so that a test can put a chosen value into every field of a given type.

Shared by tests/test_rpc.py, tests/test_hardening_station.py and tests/test_property_station.py.
"""
from __future__ import annotations

import copy
import json
from importlib import resources

from csms.ocpp16 import INBOUND

TIMESTAMP = "2024-05-01T10:00:00Z"
_SAMPLE = {"timestamp": TIMESTAMP, "sampledValue": [{"value": "1"}]}

#: A valid request of every inbound action, with each nested object present once (so every field
#: of the schema has a place in it).
BASELINE = {
    "Authorize": {"idTag": "TAG"},
    "BootNotification": {"chargePointVendor": "Vendor", "chargePointModel": "Model"},
    "DataTransfer": {"vendorId": "com.example"},
    "Heartbeat": {},
    "MeterValues": {"connectorId": 1, "meterValue": [copy.deepcopy(_SAMPLE)]},
    "StartTransaction": {"connectorId": 1, "idTag": "TAG", "meterStart": 0, "timestamp": TIMESTAMP},
    "StatusNotification": {"connectorId": 1, "errorCode": "NoError", "status": "Available"},
    "StopTransaction": {"transactionId": 1, "meterStop": 0, "timestamp": TIMESTAMP,
                        "transactionData": [copy.deepcopy(_SAMPLE)]},
    "DiagnosticsStatusNotification": {"status": "Idle"},
    "FirmwareStatusNotification": {"status": "Idle"},
}
assert set(BASELINE) == set(INBOUND)


def schema_of(name: str) -> dict:
    """The official OCPP 1.6 JSON schema ``name`` (``Authorize``, ``ResetResponse``...)."""
    return json.loads((resources.files("ocpp.v16") / "schemas" / f"{name}.json").read_text(encoding="utf-8"))


def fields(schema: dict, path: tuple = ()):
    """(path, field schema) of every leaf field; an array's items are at index 0."""
    kind = schema.get("type")
    if kind == "object":
        for name, sub in schema.get("properties", {}).items():
            yield from fields(sub, path + (name,))
    elif kind == "array":
        yield from fields(schema["items"], path + (0,))
    else:
        yield path, schema


def fields_of_type(action: str, kind: str, fmt: str | None = None) -> list[tuple]:
    """Paths of the ``kind`` fields (and ``format``, when given) of ``action``'s request schema."""
    return [path for path, sub in fields(schema_of(action))
            if sub.get("type") == kind and (fmt is None or sub.get("format") == fmt)]


def with_value(action: str, path: tuple, value) -> dict:
    """:data:`BASELINE` of ``action`` with ``value`` put at ``path``."""
    payload = copy.deepcopy(BASELINE[action])
    target = payload
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return payload


def cases(kind: str, fmt: str | None = None) -> list[tuple[str, tuple]]:
    """(action, path) of every ``kind`` field of every inbound action."""
    return [(action, path) for action in INBOUND for path in fields_of_type(action, kind, fmt)]


def case_id(action: str, path: tuple) -> str:
    return action + "." + ".".join(map(str, path))
