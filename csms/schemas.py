"""Validation against the official OCPP 1.6 JSON schemas (shipped by the ``ocpp`` package), and
against the schemas plugins declare for the actions they add.

Each schema is compiled once by fastjsonschema, on first use, and cached; a violation becomes the
OCPP-J error code the specification names for it (OCPP-J 1.6 §4.2.3). The ``ocpp`` package's directory
also holds the OCPP 1.6 security extension's schemas (SignCertificate, SecurityEventNotification...):
a plugin declaring one of those actions needs to ship nothing. Plugin schemas live in a registry of
the Central System's own (:meth:`SchemaRegistry.extended`), so two Central Systems in one process
(tests) may load different plugins.

The schemas say nothing of what a database can hold, so two rules are added, both answered
PropertyConstraintViolation: every integer lies in the signed 64-bit range (the BIGINT columns), and
every string is UTF-8 text without NUL (PostgreSQL refuses NUL; a lone surrogate is no UTF-8 at all).
The first is compiled into each schema; the second is :func:`check_storable`, which the RPC layer runs
only on what the JSON text says may need it (see :mod:`csms.rpc`).

Nor do the schemas carry the bounds the specification's text gives connector ids: those of
:data:`CONNECTOR_ID_MINIMUM` are added to the ``ocpp`` package's schemas as they are loaded (also
PropertyConstraintViolation), so what the CSMS validates is what :meth:`SchemaRegistry.schema` shows.
"""
from __future__ import annotations

import json
import math
import os
from importlib import resources
from pathlib import Path

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


INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
#: OCPP 1.6's integers are 32-bit: its SOAP schemas declare connectorId (and transactionId...) ``xs:int``.
INT32_MAX = 2 ** 31 - 1

#: The smallest connectorId of the station's requests, as OCPP 1.6's text gives it where its JSON schemas
#: say only "integer": StartTransaction.req > 0 (§6.45); StatusNotification.req >= 0 (§6.47, 0: the charge
#: point as a whole); MeterValues.req >= 0 (§6.31, 0: the main meter). StopTransaction.req has none. The
#: largest is OCPP's integer range (:data:`INT32_MAX`), not a count of connectors: see docs/connections.md.
CONNECTOR_ID_MINIMUM = {"StartTransaction": 1, "StatusNotification": 0, "MeterValues": 0}


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


def bound_integers(schema):
    """``schema`` with every integer confined to the signed 64-bit range (bounds it has are kept when
    narrower)."""
    if isinstance(schema, list):
        return [bound_integers(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    bounded = {key: value if key == "enum" else bound_integers(value) for key, value in schema.items()}
    kind = schema.get("type")
    if kind == "integer" or (isinstance(kind, list) and "integer" in kind):
        bounded["minimum"] = max(schema.get("minimum", INT64_MIN), INT64_MIN)
        bounded["maximum"] = min(schema.get("maximum", INT64_MAX), INT64_MAX)
    return bounded


def _unstorable(value) -> str | None:
    """Why a decoded JSON value cannot be stored, or None when it can."""
    kind = type(value)
    if kind is str:
        if "\x00" in value:
            return "must not contain NUL (U+0000)"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must be valid Unicode (it holds a lone surrogate)"
    elif kind is int:
        if not INT64_MIN <= value <= INT64_MAX:
            return "must be an integer in the signed 64-bit range"
    elif kind is float:
        if not math.isfinite(value):
            return "must be a finite number"
    return None


def check_storable(value, name: str = "data") -> None:
    """Raise :class:`SchemaViolation` (PropertyConstraintViolation) unless every string (keys too),
    integer and number in ``value`` can be stored: see the module docstring.

    Iterative, so a document nested as deep as a parser allows cannot exhaust the stack.
    """
    pending = [(name, value)]
    while pending:
        where, item = pending.pop()
        if isinstance(item, dict):
            for key, sub in item.items():
                problem = _unstorable(key)
                if problem is not None:
                    raise SchemaViolation("PropertyConstraintViolation", f"{where}: a property name {problem}")
                pending.append((f"{where}.{key}", sub))
        elif isinstance(item, list):
            pending.extend((f"{where}[{index}]", sub) for index, sub in enumerate(item))
        else:
            problem = _unstorable(item)
            if problem is not None:
                raise SchemaViolation("PropertyConstraintViolation", f"{where} {problem}")


def load_schema(source) -> dict:
    """A JSON schema given as a dict, or as the path of a JSON file (a string, an ``os.PathLike`` or an
    ``importlib.resources`` traversable, as ``files("my_plugin") / "schemas" / "Foo.json"``)."""
    if isinstance(source, dict):
        return source
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as file:
            return json.load(file)
    if hasattr(source, "read_text"):
        return json.loads(source.read_text(encoding="utf-8"))
    raise TypeError(f"a schema is a dict or the path of a JSON file, not {source!r}")


def schemas_in(directory, *actions: str) -> dict:
    """``{action: {"request": directory/<action>.json, "response": directory/<action>Response.json}}``,
    the layout of the ``ocpp`` package, for a plugin's ``action_schemas``."""
    if isinstance(directory, str):
        directory = Path(directory)
    return {action: {"request": directory / f"{action}.json", "response": directory / f"{action}Response.json"}
            for action in actions}


def with_spec_bounds(name: str, schema: dict) -> dict:
    """The ``ocpp`` package's schema ``name`` with the connectorId bounds of :data:`CONNECTOR_ID_MINIMUM`."""
    minimum = CONNECTOR_ID_MINIMUM.get(name)
    if minimum is None:
        return schema
    properties = dict(schema["properties"])
    properties["connectorId"] = dict(properties["connectorId"], minimum=minimum, maximum=INT32_MAX)
    return dict(schema, properties=properties)


def _compile(schema: dict):
    return fastjsonschema.compile(bound_integers(schema), formats={"date-time": _date_time})


class SchemaRegistry:
    """Compiled validators for requests and responses, keyed by action name."""

    def __init__(self, parent: SchemaRegistry | None = None) -> None:
        self._compiled: dict[str, object] = {}
        self._dir = resources.files(_SCHEMA_PACKAGE) / "schemas"
        self._actions: set[str] | None = None
        self._parent = parent
        #: Request or response name -> schema, for the actions registered here (not the ``ocpp`` package's).
        self._registered: dict[str, dict] = {}

    def extended(self) -> SchemaRegistry:
        """A registry knowing everything this one knows (sharing its compiled validators), where
        :meth:`register` adds actions without changing this one."""
        return SchemaRegistry(parent=self)

    def register(self, action: str, request, response) -> None:
        """Add ``action``'s request and response schemas (dicts or JSON file paths, see :func:`load_schema`),
        compiled now. Raises ValueError for a schema fastjsonschema cannot compile."""
        compiled = {}
        for name, source in ((action, request), (action + "Response", response)):
            schema = load_schema(source)
            try:
                compiled[name] = (schema, _compile(schema))
            except fastjsonschema.JsonSchemaDefinitionException as exc:
                raise ValueError(f"{name} schema does not compile: {exc}") from None
        for name, (schema, validator) in compiled.items():
            self._registered[name] = schema
            self._compiled[name] = validator

    def schema(self, name: str) -> dict:
        """The JSON schema of a request (``"Reset"``) or a response (``"ResetResponse"``)."""
        if name in self._registered:
            return self._registered[name]
        if self._parent is not None:
            return self._parent.schema(name)
        return self._package_schema(name)

    def _package_schema(self, name: str) -> dict:
        return with_spec_bounds(name, json.loads((self._dir / f"{name}.json").read_text(encoding="utf-8")))

    def has_request(self, action: str) -> bool:
        """Whether ``action`` has a request schema: OCPP 1.6 (with the security extension) or registered."""
        if action in self._registered:
            return True
        if self._parent is not None:
            return self._parent.has_request(action)
        if self._actions is None:
            self._actions = {
                entry.name[:-5] for entry in self._dir.iterdir()
                if entry.name.endswith(".json") and not entry.name.endswith("Response.json")
            }
        return action in self._actions

    def _validator(self, name: str):
        validator = self._compiled.get(name)
        if validator is None:
            if self._parent is not None:
                return self._parent._validator(name)
            validator = _compile(self._package_schema(name))
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
            if _integer_out_of_range(exc):
                raise SchemaViolation("PropertyConstraintViolation",
                                      f"{exc.name} must be an integer in the signed 64-bit range") from None
            code = _RULE_CODES.get(exc.rule, "PropertyConstraintViolation")
            raise SchemaViolation(code, _explained(exc)) from None
        except (ValueError, ArithmeticError, RecursionError) as exc:
            # A value the validator itself cannot cope with (fastjsonschema's multipleOf on an infinite
            # number, say) is as bad a value as one it refuses.
            raise SchemaViolation("PropertyConstraintViolation",
                                  f"data holds a value that cannot be checked ({exc})") from None

    def compile_all(self) -> None:
        """Compile every schema now (at start-up) rather than on each action's first message."""
        if self._parent is not None:
            self._parent.compile_all()  # registered schemas were compiled when registered
            return
        for entry in self._dir.iterdir():
            name, ext = os.path.splitext(entry.name)
            if ext == ".json":
                self._validator(name)


def _integer_out_of_range(exc) -> bool:
    """Whether a "must be integer" is about an integer too wide for orjson, which reads it as a float
    (an integral float within the 64-bit range, 5.0 say, is a type error under draft-04 as before)."""
    value = exc.value
    return (exc.rule == "type" and type(value) is float and isinstance(exc.definition, dict)
            and exc.definition.get("type") == "integer" and value.is_integer()
            and not INT64_MIN < value <= INT64_MAX)


def _explained(exc) -> str:
    """fastjsonschema's message, plus the reason when a well-formed date-time is out of range."""
    if exc.rule == "format" and isinstance(exc.definition, dict) and exc.definition.get("format") == "date-time":
        try:
            parse_datetime(exc.value)
        except ValueError as reason:
            if "not a representable date-time" in str(reason):
                return f"{exc.message}: {reason}"
        except TypeError:
            pass
    return exc.message


schemas = SchemaRegistry()
