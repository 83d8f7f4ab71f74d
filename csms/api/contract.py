"""Holding the API's answers to its OpenAPI document (used by the test fixtures, never when serving).

:class:`ResponseContract` is installed as :attr:`csms.api.resource.ApiResource.response_check` by the
``csms_factory`` fixture: every answer a test provokes must carry a status code its operation lists,
and its JSON body must validate against the schema the document gives for that code, so a route
cannot drift from what it documents. Needs ``jsonschema`` (a test extra).
"""
from __future__ import annotations

import json

from csms.api.resource import to_json


class ResponseContract:
    """Collects in :attr:`problems` every answer that breaks the document of ``router``."""

    def __init__(self, router):
        self.router = router
        self.problems: list[str] = []
        self._validators: dict = {}

    def __call__(self, route, response) -> None:
        try:
            problem = self.problem(route, response)
        except Exception as exc:  # a check that cannot run is a problem to report, not a failed request
            problem = f"{route.method} {route.template}: the response check failed: {exc!r}"
        if problem:
            self.problems.append(problem)

    def problem(self, route, response) -> str | None:
        document = self.router.openapi_document()
        answers = document["paths"][route.template][route.method.lower()]["responses"]
        status = str(response.status)
        label = f"{route.method} {route.template} answered {status}"
        declared = answers.get(status) or (answers.get("default") if status == "500" else None)
        if declared is None:
            return f"{label}, a status its OpenAPI operation does not list ({', '.join(answers)})"
        content = declared.get("content") or {}
        if status == "204":
            return None
        if response.raw is not None or response.stream is not None:
            if response.content_type.split(";")[0].strip() not in content:
                return f"{label} with {response.content_type}, which its operation does not declare"
            return None
        media = content.get("application/json")
        if media is None or "schema" not in media:
            return (f"{label} with a JSON body, but its operation declares no JSON schema for {status}: "
                    "declare the route's response= schema")
        body = json.loads(to_json(response.body))
        import jsonschema

        error = jsonschema.exceptions.best_match(self._validator(media["schema"], document).iter_errors(body))
        if error is not None:
            where = "/".join(str(part) for part in error.absolute_path) or "(the body)"
            return f"{label} with a body that breaks its schema at {where}: {error.message}"
        return None

    def _validator(self, schema: dict, document: dict):
        key = json.dumps(schema, sort_keys=True)
        if key not in self._validators:
            import jsonschema

            root = {**schema, "components": document["components"]}
            validator = jsonschema.Draft202012Validator(root, format_checker=jsonschema.FormatChecker())
            self._validators[key] = validator
        return self._validators[key]


def untyped_operations(document: dict) -> list[str]:
    """Operations of ``document`` with a JSON request body or a success answer that has no schema, or
    an error answer that is not the Error body: what a generated client could not type."""
    found = []
    for template, operations in document["paths"].items():
        for method, operation in operations.items():
            label = f"{method.upper()} {template}"
            body = operation.get("requestBody", {}).get("content", {})
            if any("schema" not in media for media in body.values()):
                found.append(f"{label}: request body without a schema")
            for code, answer in operation["responses"].items():
                content = answer.get("content", {})
                if code.startswith("2") and code != "204" and not any("schema" in m for m in content.values()):
                    found.append(f"{label}: {code} answer without a schema (declare the route's response=)")
                if not code.startswith("2") and content.get("application/json", {}).get("schema") != \
                        {"$ref": "#/components/schemas/Error"}:
                    found.append(f"{label}: {code} answer is not the Error body")
    return found
