"""Building blocks for the JSON schemas routes declare for their request and response bodies.

A route's ``body`` schema is what :mod:`csms.api.router` validates requests against; its ``response``
schema is what the route answers with. Both go into the OpenAPI document's ``components.schemas``: a
schema (or sub-schema) with a ``title`` becomes the component of that name, shared wherever it is used;
an untitled top-level one is named after the route's operationId. The test fixtures validate every
JSON response the tests produce against the declared schema (:mod:`csms.api.contract`), so a route
cannot answer something other than what it documents.

Objects built with :func:`record` refuse properties they do not list and require every property not
named optional: a field added to a response without its schema fails the tests.
"""
from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, DateTime, Float, Integer, Numeric, String, Text

TEXT = {"type": "string"}
INTEGER = {"type": "integer"}
NUMBER = {"type": "number"}
BOOLEAN = {"type": "boolean"}
DATE_TIME = {"type": "string", "format": "date-time"}
#: Any JSON object (an OCPP payload kept as the station sent it, free-form details).
ANY_OBJECT = {"type": "object"}


def ocpp_schema(message: str, *path: str, title: str, description: str | None = None) -> dict:
    """A part of an OCPP 1.6 message's JSON schema as a titled schema (a component of the document):
    ``message`` names the ``ocpp`` package's schema ("SetChargingProfile", "GetCompositeScheduleResponse"),
    ``path`` the keys down to the part ("properties", "csChargingProfiles"). The part is the one the CSMS
    validates what it sends against (its references inlined, every integer within the signed 64-bit range,
    as :mod:`csms.schemas` compiles it), so a route whose body holds it refuses what the station would."""
    from csms.api.openapi import ocpp_component
    from csms.schemas import SchemaRegistry, bound_integers

    part = ocpp_component(SchemaRegistry().schema(message))
    for key in path:
        part = part[key]
    part = {**bound_integers(part), "title": title}
    if description:
        part["description"] = description
    return part


#: An OCPP 1.6 ChargingProfile (SetChargingProfile's csChargingProfiles, RemoteStartTransaction's
#: chargingProfile: the same schema), and its ChargingSchedule.
CHARGING_SCHEDULE = ocpp_schema("GetCompositeScheduleResponse", "properties", "chargingSchedule",
                                title="ChargingSchedule", description="An OCPP 1.6 ChargingSchedule")
CHARGING_PROFILE = ocpp_schema("SetChargingProfile", "properties", "csChargingProfiles", title="ChargingProfile",
                               description="An OCPP 1.6 ChargingProfile, as the OCPP 1.6 JSON schema spells it")
CHARGING_PROFILE["properties"]["chargingSchedule"] = CHARGING_SCHEDULE


def nullable(schema: dict) -> dict:
    """``schema`` or null (OpenAPI 3.1: a type list with "null")."""
    kind = schema.get("type")
    if kind is None or "title" in schema:
        # A titled schema stays whole: it is the one component of that name (see csms.api.openapi).
        return {"anyOf": [schema, {"type": "null"}]}
    kinds = list(kind) if isinstance(kind, list) else [kind]
    if schema.get("enum") is not None:
        schema = {**schema, "enum": [*schema["enum"], None]}
    return {**schema, "type": [*kinds, "null"] if "null" not in kinds else kinds}


def record(properties: dict, optional=(), title: str | None = None, open_ended: bool = False, **extra) -> dict:
    """An object with ``properties``, all of them required but ``optional`` ones (``"*"``: all optional).

    ``open_ended`` objects take properties beyond these (fields other plugins add); others refuse them.
    """
    schema = {"type": "object", "properties": properties}
    required = [] if optional == "*" else [name for name in properties if name not in optional]
    if required:
        schema["required"] = required
    if not open_ended:
        schema["additionalProperties"] = False
    if title:
        schema["title"] = title
    return {**schema, **extra}


def array(items: dict, **extra) -> dict:
    return {"type": "array", "items": items, **extra}


def page(items: dict, title: str | None = None, **more) -> dict:
    """What :func:`csms.api.resource.paginated` answers: ``items`` of one page, ``total``, ``limit``, ``offset``."""
    return record({"items": array(items), "total": INTEGER, "limit": INTEGER, "offset": INTEGER, **more},
                  title=title)


def ocpp_response(action: str) -> dict:
    """The OCPP response payload of ``action`` as the document lists it (the generic call route's schemas)."""
    return {"$ref": f"#/components/schemas/{action}Response"}


def enum(values, **extra) -> dict:
    return {"type": "string", "enum": list(values), **extra}


def _column_schema(column) -> dict:
    kind = column.type
    if isinstance(kind, Boolean):
        schema = dict(BOOLEAN)
    elif isinstance(kind, (Integer, BigInteger)) or isinstance(getattr(kind, "impl", None), (Integer, BigInteger)):
        schema = dict(INTEGER)
    elif isinstance(kind, (Float, Numeric)):
        schema = dict(NUMBER)
    elif isinstance(kind, DateTime):
        schema = dict(DATE_TIME)
    elif isinstance(kind, (String, Text)):
        schema = dict(TEXT)
    else:
        raise TypeError(f"no JSON schema for column {column.name} of type {kind!r}")
    if isinstance(kind, String) and not isinstance(kind, Text) and kind.length:
        schema["maxLength"] = kind.length
    return nullable(schema) if column.nullable and not column.primary_key else schema


def columns(table, *names: str, rename: dict | None = None) -> dict:
    """Properties for ``table``'s columns (all of them, or ``names``), typed from the column types, null
    allowed where the column allows it; ``rename`` maps a column to the name the API shows it under."""
    rename = rename or {}
    chosen = [table.c[name] for name in names] if names else list(table.c)
    return {rename.get(column.name, column.name): _column_schema(column) for column in chosen}
