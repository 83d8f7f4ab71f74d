"""The OpenAPI 3.1 document, written from the same route table that serves requests.

Every request and response body schema a route declares lands in ``components.schemas`` (see
:mod:`csms.api.types` for how they are named); the OCPP actions the generic call route sends are listed
with the schemas the CSMS validates them with.
"""
from __future__ import annotations

import re

import csms
from csms.api.inputs import INT64_MAX, INT64_MIN
from csms.api.router import RouteError, route_label

ERROR_SCHEMA = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "description": "Every error answer of the operator API",
    "properties": {"error": {
        "type": "object", "required": ["status", "code", "message"], "additionalProperties": False,
        "properties": {
            "status": {"type": "integer", "description": "The HTTP status code"},
            "code": {"type": "string", "description": "What went wrong, for programs (e.g. station_not_found)"},
            "message": {"type": "string", "description": "What went wrong, for people"},
            "details": {"type": "object", "description": "Facts about the error, depending on its code"}}}},
}
_ERROR = {"$ref": "#/components/schemas/Error"}
#: Errors any route may answer: a bad path or query parameter (or a body where none is taken), a
#: missing token (routes with auth), a body over the size limit; 422 is for routes that take a body.
_STANDARD_ERRORS = {
    "400": "Malformed request (invalid JSON, nested too deep, unknown or invalid query or path parameter)",
    "401": "Missing or wrong bearer token",
    "413": "Request body too large",
    "422": "Request body does not validate",
}
_KIND = {"string": {"type": "string"}, "integer": {"type": "integer"}, "boolean": {"type": "boolean"},
         "date-time": {"type": "string", "format": "date-time"}}
#: Keys whose values are data, not schemas: never searched for titled sub-schemas.
_DATA_KEYS = ("enum", "const", "default", "examples", "required")


def _schema(param) -> dict:
    """A parameter's schema: an integer's bounds are its own, else a 64-bit column's (as to_integer checks)."""
    minimum, maximum = param.minimum, param.maximum
    if param.kind == "integer":
        minimum = INT64_MIN if minimum is None else minimum
        maximum = INT64_MAX if maximum is None else maximum
    return {**_KIND[param.kind], **({"enum": list(param.enum)} if param.enum else {}),
            **({"minimum": minimum} if minimum is not None else {}),
            **({"maximum": maximum} if maximum is not None else {})}


def _inlined(schema, definitions: dict):
    """An OCPP JSON schema as one self-contained schema: local ``#/definitions/...`` references replaced
    by what they point at, and the draft's own keywords (``$schema``, ``$id``, ``id``, ``definitions``)
    left out (a document-level ``$id`` would change what its references resolve against)."""
    if isinstance(schema, list):
        return [_inlined(item, definitions) for item in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/definitions/"):
        return _inlined(definitions[ref[len("#/definitions/"):]], definitions)
    return {key: _inlined(value, definitions) if key not in _DATA_KEYS else value
            for key, value in schema.items() if key not in ("$schema", "$id", "id", "definitions")}


def ocpp_component(schema: dict) -> dict:
    return _inlined(schema, schema.get("definitions", {}))


def component_name(operation_id: str, suffix: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", operation_id) if part) + suffix


class _Components:
    """components.schemas being filled: titled schemas hoisted under their title, once."""

    def __init__(self):
        self.schemas: dict = {"Error": ERROR_SCHEMA}
        self.owners: dict = {"Error": "the framework"}

    def put(self, name: str, schema: dict, owner: str) -> dict:
        if name in self.schemas and self.schemas[name] != schema:
            raise RouteError(f"{owner}: schema {name!r} differs from the one {self.owners[name]} declares "
                             "under that name")
        self.schemas[name] = schema
        self.owners.setdefault(name, owner)
        return {"$ref": f"#/components/schemas/{name}"}

    def hoist(self, schema, owner: str):
        if isinstance(schema, list):
            return [self.hoist(item, owner) for item in schema]
        if not isinstance(schema, dict):
            return schema
        hoisted = {key: value if key in _DATA_KEYS else self.hoist(value, owner) for key, value in schema.items()}
        title = hoisted.get("title")
        if isinstance(title, str) and "type" in hoisted:
            return self.put(title, hoisted, owner)
        return hoisted

    def named(self, schema: dict, name: str, owner: str) -> dict:
        """A route's top-level schema as a reference to its component (its title, or ``name``)."""
        if "$ref" in schema and len(schema) == 1:
            return schema
        hoisted = self.hoist(schema, owner)
        if "$ref" in hoisted and len(hoisted) == 1:
            return hoisted
        return self.put(name, hoisted, owner)


def _document_calls(operation: dict, components: _Components, call_actions: dict) -> None:
    """The generic call route: its ``action`` one of ``call_actions`` (action -> {"plugin", "request",
    "response"}), its body and answer that action's schemas (listed under ``x-ocpp-actions``)."""
    catalogue = {}
    for action, entry in sorted(call_actions.items()):
        owner = f"OCPP action {action} ({entry['plugin']})"
        catalogue[action] = {"plugin": entry["plugin"],
                             "request": components.put(f"{action}Request", ocpp_component(entry["request"]), owner),
                             "response": components.put(f"{action}Response", ocpp_component(entry["response"]),
                                                        owner)}
    for parameter in operation["parameters"]:
        if parameter["name"] == "action":
            parameter["schema"] = {"type": "string", "enum": sorted(call_actions)}
    # anyOf, not oneOf: which schema applies depends on the action in the path, and several actions'
    # payloads look alike ({"status": "Accepted"} is a valid answer to many).
    operation["requestBody"]["content"]["application/json"]["schema"] = {
        "anyOf": [entry["request"] for entry in catalogue.values()]}
    operation["responses"]["200"]["content"] = {"application/json": {"schema": {
        "anyOf": [entry["response"] for entry in catalogue.values()]}}}
    operation["x-ocpp-actions"] = catalogue


def _extend(components: _Components, extensions: dict) -> None:
    """Add the optional properties plugins declare for shared schemas (``Router.extend_schema``)."""
    for title, properties in extensions.items():
        target = components.schemas.get(title)
        if target is None or "properties" not in target:
            owners = sorted({owner for _, owner in properties.values()})
            raise RouteError(f"{', '.join(owners)} extend{'s' if len(owners) == 1 else ''} the {title} schema, "
                             "which no route answers with")
        for name, (schema, owner) in properties.items():
            if name in target["properties"]:
                raise RouteError(f"{owner} adds {name!r} to the {title} schema, which has it already")
            target["properties"][name] = components.hoist(schema, owner)


def success_codes(route) -> list[str]:
    return [str(code) for code in route.responses if str(code).startswith("2")] or ["200"]


def _responses(route, components: _Components, owner: str, calls: bool) -> dict:
    responses = {}
    for code in success_codes(route):
        described = route.responses.get(code, route.responses.get(int(code), "OK"))
        answer = {"description": described}
        if code != "204":
            if route.response_type != "application/json":
                kinds = route.response_type if isinstance(route.response_type, tuple) else (route.response_type,)
                answer["content"] = {kind: {"schema": {"type": "string", "contentMediaType": kind}} for kind in kinds}
            elif route.response is not None and not calls:
                schema = components.named(route.response, component_name(route.operation_id, "Result"), owner)
                answer["content"] = {"application/json": {"schema": schema}}
        responses[code] = answer
    errors = dict(_STANDARD_ERRORS)
    if not route.auth:
        del errors["401"]
    else:
        errors["403"] = f"forbidden: the token's scope does not allow this route (it needs {route.scope})"
    if route.body is None or not route.json_body:
        del errors["422"]
    if any(p.resource for p in route.path_params):
        errors["404"] = "Unknown " + " or ".join(p.resource for p in route.path_params if p.resource)
    errors.update({str(code): text for code, text in route.responses.items() if not str(code).startswith("2")})
    for code, text in sorted(errors.items()):
        responses[code] = {"description": text, "content": {"application/json": {"schema": _ERROR}}}
    responses["default"] = {"description": "Unexpected error (500 internal_error)",
                            "content": {"application/json": {"schema": _ERROR}}}
    return responses


def _operation(route, components: _Components, calls: bool = False) -> dict:
    owner = route_label(route.method, route.template, route.handler)
    operation = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": list(route.tags),
        "parameters": [
            {"name": p.name, "in": "path", "required": True, "schema": _schema(p),
             **({"description": p.description} if p.description else {})} for p in route.path_params
        ] + [
            {"name": q.name, "in": "query", "required": q.required, "description": q.description, "schema": _schema(q)}
            for q in route.query
        ],
    }
    if route.description:
        operation["description"] = route.description
    if route.body is not None:
        schema = {} if calls else components.named(route.body, component_name(route.operation_id, "Body"), owner)
        operation["requestBody"] = {"required": route.body_required, "content": {"application/json": {
            "schema": schema}}}
    elif not route.json_body:
        operation["requestBody"] = {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}}
    operation["responses"] = _responses(route, components, owner, calls)
    if route.auth:
        operation["x-csms-scope"] = route.scope
    else:
        operation["security"] = []
    return operation


def build_openapi(router, call_actions: dict | None = None, call_template: str | None = None) -> dict:
    """The document for ``router``. ``call_actions`` (action -> {"plugin", "request", "response"}) are
    the actions the route ``POST call_template`` sends, documented with their OCPP schemas."""
    paths: dict = {}
    components = _Components()
    for route in router.routes:
        calls = bool(call_actions) and route.method == "POST" and route.template == call_template
        operation = _operation(route, components, calls)
        if calls:
            _document_calls(operation, components, call_actions)
        paths.setdefault(route.template, {})[route.method.lower()] = operation
    _extend(components, router.schema_extensions)
    return {
        "openapi": "3.1.0",
        "info": {"title": "CSMS operator API", "version": csms.__version__,
                 "description": "Manage stations, id tags and transactions of an OCPP 1.6J Central System, "
                                "and send any OCPP command to a connected station."},
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearerAuth": []}],
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "description": "A token from `csms-admin token create` or "
                                                              "[api] tokens"}},
            "schemas": components.schemas,
        },
        "paths": paths,
    }
