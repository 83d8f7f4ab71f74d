"""Validation against the official OCPP 1.6 JSON schemas (shipped by the ``ocpp`` package).

Each schema is compiled once by fastjsonschema, on first use, and cached; a violation becomes the
OCPP-J error code the specification names for it (OCPP-J 1.6 §4.2.3).
"""
from __future__ import annotations

import json
import os
from importlib import resources

import fastjsonschema

from csms.ocpp16 import parse_datetime

_SCHEMA_PACKAGE = "ocpp.v16"

#: fastjsonschema rule -> OCPP-J error code.
_RULE_CODES = {
    "type": "TypeConstraintViolation",
    "required": "OccurenceConstraintViolation",
    "minItems": "OccurenceConstraintViolation",
    "maxItems": "OccurenceConstraintViolation",
    "additionalProperties": "FormationViolation",
}


class SchemaViolation(Exception):
    """A payload does not match its action's schema."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _date_time(value: str) -> bool:
    try:
        parse_datetime(value)
    except (ValueError, TypeError):
        return False
    return "T" in value or "t" in value


class SchemaRegistry:
    """Compiled validators for requests and responses, keyed by action name."""

    def __init__(self) -> None:
        self._compiled: dict[str, object] = {}
        self._dir = resources.files(_SCHEMA_PACKAGE) / "schemas"
        self._actions: set[str] | None = None

    def has_request(self, action: str) -> bool:
        """Whether OCPP 1.6 defines ``action`` (and so a request schema for it)."""
        if self._actions is None:
            self._actions = {
                entry.name[:-5] for entry in self._dir.iterdir()
                if entry.name.endswith(".json") and not entry.name.endswith("Response.json")
            }
        return action in self._actions

    def _validator(self, name: str):
        validator = self._compiled.get(name)
        if validator is None:
            schema = json.loads((self._dir / f"{name}.json").read_text(encoding="utf-8"))
            validator = fastjsonschema.compile(schema, formats={"date-time": _date_time})
            self._compiled[name] = validator
        return validator

    def validate_request(self, action: str, payload: dict) -> None:
        self._validate(action, payload)

    def validate_response(self, action: str, payload: dict) -> None:
        self._validate(action + "Response", payload)

    def _validate(self, name: str, payload: dict) -> None:
        try:
            self._validator(name)(payload)
        except fastjsonschema.JsonSchemaValueException as exc:
            code = _RULE_CODES.get(exc.rule, "PropertyConstraintViolation")
            raise SchemaViolation(code, exc.message) from None

    def compile_all(self) -> None:
        """Compile every schema now (at start-up) rather than on each action's first message."""
        for entry in self._dir.iterdir():
            name, ext = os.path.splitext(entry.name)
            if ext == ".json":
                self._validator(name)


schemas = SchemaRegistry()
