"""Routes of the operator API: one table that serves requests and writes the OpenAPI document.

Plugins add routes with ``csms_api_routes(app, router)``; each route declares its path parameters,
query parameters and JSON body schema, so that validation and documentation cannot drift apart.
Every value is converted and checked in one place (:mod:`csms.api.inputs`) before a handler runs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import fastjsonschema

from csms.api import inputs
from csms.api.errors import ApiError

_PARAM = re.compile(r"\{([a-z_]+)\}")


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
    responses: dict = field(default_factory=dict)
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

    def __post_init__(self):
        self.params = _PARAM.findall(self.template)
        declared = {p.name: p for p in self.path}
        unknown = set(declared) - set(self.params)
        if unknown:
            raise ValueError(f"route {self.template} declares path parameters it does not have: {sorted(unknown)}")
        #: Every path parameter's spec, in template order (undeclared ones are strings).
        self.path_params = tuple(declared.get(name) or Param(name) for name in self.params)
        pattern = _PARAM.sub(r"(?P<\1>[^/]+)", re.escape(self.template).replace(r"\{", "{").replace(r"\}", "}"))
        self.regex = re.compile("^" + pattern + "$")
        self.validator = fastjsonschema.compile(self.body, formats={"date-time": inputs.is_datetime}) \
            if self.body is not None else None
        if not self.operation_id:
            self.operation_id = getattr(self.handler, "__name__", "op").strip("_")


class Router:
    def __init__(self):
        self.routes: list[Route] = []

    def add(self, method: str, template: str, handler, summary: str, **kwargs) -> Route:
        method = method.upper()
        for existing in self.routes:
            if existing.method == method and existing.template == template:
                raise ValueError(f"route {method} {template} is defined twice")
        route = Route(method, template, handler, summary, **kwargs)
        if any(existing.operation_id == route.operation_id for existing in self.routes):
            # OpenAPI wants unique operationIds; two plugins' handlers may share a name ("history").
            route.operation_id = method.lower() + "_" + "_".join(re.findall(r"[a-z0-9]+", template.lower()))
        self.routes.append(route)
        return route

    def match(self, method: str, path: str):
        """(route, raw path params, still percent-encoded) for a request, or raise ApiError 404 / 405."""
        allowed = []
        for route in self.routes:
            found = route.regex.match(path)
            if found is None:
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
