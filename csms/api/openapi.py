"""The OpenAPI 3 document, written from the same route table that serves requests."""
from __future__ import annotations

import csms

_ERROR = {"$ref": "#/components/schemas/Error"}
_STANDARD_ERRORS = {
    "400": "Malformed request (invalid JSON, nested too deep, unknown or invalid query or path parameter)",
    "401": "Missing or wrong bearer token",
    "413": "Request body too large",
    "422": "Request body does not validate",
}
_KIND = {"string": {"type": "string"}, "integer": {"type": "integer"}, "boolean": {"type": "boolean"},
         "date-time": {"type": "string", "format": "date-time"}}


def _schema(param) -> dict:
    return {**_KIND[param.kind], **({"enum": list(param.enum)} if param.enum else {}),
            **({"minimum": param.minimum} if param.minimum is not None else {}),
            **({"maximum": param.maximum} if param.maximum is not None else {})}


def _inlined(schema, definitions: dict):
    """A JSON schema as OpenAPI 3.0 takes it: local ``#/definitions/...`` references replaced by what
    they point at, and the draft's own keywords (``$schema``, ``$id``, ``id``, ``definitions``) left out."""
    if isinstance(schema, list):
        return [_inlined(item, definitions) for item in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/definitions/"):
        return _inlined(definitions[ref[len("#/definitions/"):]], definitions)
    return {key: _inlined(value, definitions) if key not in ("enum", "required") else value
            for key, value in schema.items() if key not in ("$schema", "$id", "id", "definitions")}


def ocpp_component(schema: dict) -> dict:
    return _inlined(schema, schema.get("definitions", {}))


def _document_calls(operation: dict, components: dict, call_actions: dict) -> None:
    """The generic call route: its ``action`` one of ``call_actions`` (action -> {"plugin", "request",
    "response"}), its body and answer that action's schemas (listed under ``x-ocpp-actions``)."""
    catalogue = {}
    for action, entry in sorted(call_actions.items()):
        components[f"{action}Request"] = ocpp_component(entry["request"])
        components[f"{action}Response"] = ocpp_component(entry["response"])
        catalogue[action] = {"plugin": entry["plugin"],
                             "request": {"$ref": f"#/components/schemas/{action}Request"},
                             "response": {"$ref": f"#/components/schemas/{action}Response"}}
    for parameter in operation["parameters"]:
        if parameter["name"] == "action":
            parameter["schema"] = {"type": "string", "enum": sorted(call_actions)}
    operation["requestBody"]["content"]["application/json"]["schema"] = {
        "oneOf": [entry["request"] for entry in catalogue.values()]}
    operation["responses"]["200"] = {"description": "The station's response payload", "content": {
        "application/json": {"schema": {"oneOf": [entry["response"] for entry in catalogue.values()]}}}}
    operation["x-ocpp-actions"] = catalogue


def build_openapi(router, call_actions: dict | None = None, call_template: str | None = None) -> dict:
    """The document for ``router``. ``call_actions`` (action -> {"plugin", "request", "response"}) are
    the actions the route ``POST call_template`` sends, documented with their OCPP schemas."""
    paths: dict = {}
    components: dict = {}
    for route in router.routes:
        operation = {
            "operationId": route.operation_id,
            "summary": route.summary,
            "tags": list(route.tags),
            "parameters": [
                {"name": p.name, "in": "path", "required": True, "schema": _schema(p)} for p in route.path_params
            ] + [
                {"name": q.name, "in": "query", "required": False, "description": q.description, "schema": _schema(q)}
                for q in route.query
            ],
            "responses": {},
        }
        if route.description:
            operation["description"] = route.description
        if route.body is not None:
            operation["requestBody"] = {"required": route.body_required,
                                        "content": {"application/json": {"schema": route.body}}}
        elif not route.json_body:
            operation["requestBody"] = {"required": True,
                                        "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                            "format": "binary"}}}}
        responses = dict(route.responses) or {"200": "OK"}
        for code, text in responses.items():
            operation["responses"][str(code)] = {"description": text} if isinstance(text, str) else text
        if route.auth:
            operation["x-csms-scope"] = route.scope
            operation["responses"].setdefault("403", {
                "description": f"The token's scope does not allow this route (it needs {route.scope})",
                "content": {"application/json": {"schema": _ERROR}}})
        for code, text in _STANDARD_ERRORS.items():
            if code == "401" and not route.auth:
                continue
            operation["responses"].setdefault(code, {"description": text,
                                                     "content": {"application/json": {"schema": _ERROR}}})
        if not route.auth:
            operation["security"] = []
        if call_actions and route.method == "POST" and route.template == call_template:
            _document_calls(operation, components, call_actions)
        paths.setdefault(route.template, {})[route.method.lower()] = operation
    return {
        "openapi": "3.0.3",
        "info": {"title": "CSMS operator API", "version": csms.__version__,
                 "description": "Manage stations, id tags and transactions of an OCPP 1.6J Central System, "
                                "and send any OCPP command to a connected station."},
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearerAuth": []}],
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {
                "type": "object", "required": ["error"],
                "properties": {"error": {"type": "object", "required": ["status", "code", "message"], "properties": {
                    "status": {"type": "integer"}, "code": {"type": "string"}, "message": {"type": "string"},
                    "details": {"type": "object"}}}}}, **components},
        },
        "paths": paths,
    }
