"""Routes of the operator API: one table that serves requests and writes the OpenAPI document.

Plugins add routes with ``csms_api_routes(app, router)``; each route declares its path parameters,
query parameters, JSON body schema and the schema of what it answers, so that validation, answers and
documentation cannot drift apart (the test fixtures check the answers: :mod:`csms.api.contract`).
Every value is converted and checked in one place (:mod:`csms.api.inputs`) before a handler runs.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import fastjsonschema

from csms.api import inputs
from csms.api.errors import ApiError
from csms.api.tokens import SCOPES
from csms.plugins import PluginError

#: A path parameter: a whole segment ``{name}``, the name in snake_case.
_PARAM = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
_SEGMENT_PARAM = re.compile(r"^\{([^{}]*)\}$")
_SNAKE_CASE = re.compile(r"^[a-z_][a-z0-9_]*$")


#: Canonical JSON of a body schema -> its compiled validator (compiled functions keep no state). A CSMS
#: builds its router once, but a process starting many (the test suite starts one per test) would
#: otherwise compile the same hundred schemas each time, most of a start's cost.
_body_validators: dict[str, object] = {}


def body_validator(schema: dict):
    """fastjsonschema's validator for a route body, compiled once per distinct schema."""
    try:
        key = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError):
        return _compile_body(schema)
    if key not in _body_validators:
        _body_validators[key] = _compile_body(schema)
    return _body_validators[key]


def _compile_body(schema: dict):
    return fastjsonschema.compile(schema, formats={"date-time": inputs.is_datetime})


class RouteError(PluginError, ValueError):
    """A route the router cannot serve as written: start-up stops with this one line."""


def route_label(method: str, template, handler=None) -> str:
    """How errors name a route: method, template and, to find the plugin, the handler's module."""
    module = getattr(handler, "__module__", None)
    return f"operator API route {method} {template!r}" + (f" (from {module})" if module else "")


def check_template(method: str, template: str, handler=None) -> None:
    """Refuse a template whose placeholders the router would not honour (they would match nothing).

    A template is a path relative to ``/api/v1`` starting with ``/``; each placeholder is a whole path
    segment ``{name}`` with a snake_case name, used once.
    """
    def refuse(why: str):
        return RouteError(f"{route_label(method, template, handler)}: {why}")

    if not isinstance(template, str) or not template.startswith("/"):
        raise refuse("a route path starts with '/' (it is relative to /api/v1)")
    if any(c.isspace() or c in "?#" for c in template):
        raise refuse("a route path has no spaces, '?' or '#' (query parameters are declared with query=...)")
    names = []
    for segment in template.split("/"):
        found = _SEGMENT_PARAM.match(segment)
        if found is None:
            if "{" in segment or "}" in segment:
                raise refuse(f"segment {segment!r}: a placeholder is a whole segment '{{name}}', "
                             "with balanced braces")
            continue
        name = found.group(1)
        if not _SNAKE_CASE.match(name):
            raise refuse(f"placeholder {{{name}}}: a path parameter name is snake_case "
                         "(a-z, 0-9 and _, not starting with a digit)")
        if name in names:
            raise refuse(f"placeholder {{{name}}} appears twice")
        names.append(name)


def _shape(template: str) -> str:
    """The template with its parameter names left out: two routes of one shape match the same paths."""
    return _PARAM.sub("{}", template)


@dataclass
class Param:
    """A path or query parameter: ``kind`` is one of string, integer, boolean, date-time.

    An integer without bounds still has to fit a 64-bit column. A path parameter naming a ``resource``
    ("transaction") answers 404 ``<resource>_not_found`` for a value that cannot name one.
    """

    name: str
    kind: str = "string"
    description: str = ""
    enum: tuple | None = None
    minimum: int | None = None
    maximum: int | None = None
    resource: str = ""
    #: A query parameter the route cannot do without: 400 ``missing_query_parameter`` when absent.
    required: bool = False


Query = Path = Param


PAGINATION = (
    Query("limit", "integer", "Page size (1-1000, default 50)", minimum=1, maximum=1000),
    Query("offset", "integer", "Items to skip (default 0)", minimum=0),
)


@dataclass
class Route:
    method: str
    template: str
    handler: object
    summary: str
    tags: tuple = ()
    body: dict | None = None
    query: tuple = ()
    #: Status code -> description: the success status (200 unless given) and the errors this route
    #: answers besides those every route may (see csms.api.openapi).
    responses: dict = field(default_factory=dict)
    #: JSON schema of the success body (csms.api.types helps build one); None for a route answering 204
    #: or ``response_type`` bytes. The test fixtures check every answer against it.
    response: dict | None = None
    #: Content type of a success body that is not JSON (a download), or a tuple of those it may answer.
    response_type: str | tuple = "application/json"
    description: str = ""
    #: Largest request body this route takes, in bytes (None: the API's [api] max_body_size).
    max_body: int | None = None
    #: False for a body that is not JSON (an upload): the handler reads request.content itself.
    json_body: bool = True
    #: False when every body field is optional: an empty body then reads as ``{}``.
    body_required: bool = True
    auth: bool = True
    operation_id: str = ""
    #: Path parameters that are not plain strings (ids): ``Path("transaction_id", "integer", ...)``.
    path: tuple = ()
    #: The least token scope allowed to call it (csms.api.tokens.SCOPES): ``read``, ``commands`` (sends a
    #: station a command) or ``admin``. Default: read for GET, admin for anything that may change data.
    scope: str = ""

    def __post_init__(self):
        check_template(self.method, self.template, self.handler)
        if not self.scope:
            self.scope = "read" if self.method in ("GET", "HEAD") else "admin"
        if self.scope not in SCOPES:
            raise RouteError(f"{route_label(self.method, self.template, self.handler)}: scope must be one of "
                             f"{', '.join(SCOPES)}, not {self.scope!r}")
        self.params = _PARAM.findall(self.template)
        declared = {p.name: p for p in self.path}
        unknown = set(declared) - set(self.params)
        if unknown:
            raise RouteError(f"{route_label(self.method, self.template, self.handler)} declares path parameters "
                             f"it does not have: {sorted(unknown)}")
        #: Every path parameter's spec, in template order (undeclared ones are strings).
        self.path_params = tuple(declared.get(name) or Param(name) for name in self.params)
        pattern = _PARAM.sub(r"(?P<\1>[^/]+)", re.escape(self.template).replace(r"\{", "{").replace(r"\}", "}"))
        self.regex = re.compile("^" + pattern + "$")
        #: Which segments are literal (1) or a parameter (0), in order: the larger wins a match (see Router.match).
        self.specificity = tuple(0 if _SEGMENT_PARAM.match(part) else 1 for part in self.template.split("/"))
        self.validator = body_validator(self.body) if self.body is not None else None
        if not self.operation_id:
            self.operation_id = getattr(self.handler, "__name__", "op").strip("_")


class Router:
    def __init__(self):
        self.routes: list[Route] = []
        #: () -> the OpenAPI document of these routes, built once (set by :func:`csms.api.make_router`).
        self.openapi_document = None
        #: Component title -> {property: (schema, who added it)}: see :meth:`extend_schema`.
        self.schema_extensions: dict[str, dict] = {}

    def extend_schema(self, title: str, properties: dict, owner: str) -> None:
        """Document optional ``properties`` that ``owner`` (a plugin name) adds to the shared response
        schema ``title``: e.g. the fields a ``csms_station_details`` hook adds to ``Station``."""
        extension = self.schema_extensions.setdefault(title, {})
        for name, schema in properties.items():
            if name in extension and extension[name][1] != owner:
                raise RouteError(f"{owner} and {extension[name][1]} both add {name!r} to the {title} schema")
            extension[name] = (schema, owner)

    def add(self, method: str, template: str, handler, summary: str, **kwargs) -> Route:
        method = method.upper()
        route = Route(method, template, handler, summary, **kwargs)
        for existing in self.routes:
            if existing.method == method and _shape(existing.template) == _shape(template):
                raise RouteError(f"{route_label(method, template, handler)} is defined twice"
                                 + (f" (as {existing.template!r})" if existing.template != template else ""))
        if any(existing.operation_id == route.operation_id for existing in self.routes):
            # OpenAPI wants unique operationIds; two plugins' handlers may share a name ("history").
            route.operation_id = method.lower() + "_" + "_".join(re.findall(r"[a-z0-9]+", template.lower()))
        self.routes.append(route)
        return route

    def match(self, method: str, path: str):
        """(route, raw path params, still percent-encoded) for a request, or raise ApiError 404 / 405.

        As OpenAPI reads paths, a concrete segment wins over a template's parameter: of the templates
        matching ``path``, only those with the most leading literal segments count, for the method and for
        the 405's Allow (``/charging-profiles/clear`` is a path of its own, not a profile named "clear")."""
        matches = []
        for route in self.routes:
            found = route.regex.match(path)
            if found is not None:
                matches.append((route.specificity, route, found))
        if not matches:
            raise ApiError(404, "route_not_found", f"No API route {path}")
        best = max(specificity for specificity, _, _ in matches)
        allowed = []
        for specificity, route, found in matches:
            if specificity != best:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route, found.groupdict()
            allowed.append(route.method)
        if allowed:
            raise ApiError(405, "method_not_allowed", f"{method} is not allowed on {path}",
                           {"allowed": sorted(set(allowed))}, headers={"Allow": ", ".join(sorted(set(allowed)))})
        raise ApiError(404, "route_not_found", f"No API route {path}")

    def largest_body(self, default: int) -> int:
        return max([default] + [r.max_body for r in self.routes if r.max_body])
