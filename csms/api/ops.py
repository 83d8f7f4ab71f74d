"""``/metrics``, ``/healthz`` and ``/readyz``: for Prometheus, load balancers and orchestrators.

Served at the root of the API port, and of ``[metrics] endpoint`` when one is set (docs/metrics.md).
``/healthz`` and ``/readyz`` need no credentials; ``/metrics`` needs none from ``[metrics]
allowed_networks`` (loopback by default) and the operator API's bearer token from anywhere else. All
three do bounded work per request: ``/healthz`` none, ``/readyz`` joins the readiness run under way
(:mod:`csms.health`), ``/metrics`` reads counters whose label values are bounded.
"""
from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from csms.api.errors import ApiError
from csms.api.resource import Response, require_bearer_token, to_json
from csms.netaddr import address_in, parse_networks

log = Logger(namespace="csms.api")

METRICS, HEALTHZ, READYZ = b"metrics", b"healthz", b"readyz"


class OperationsResource(resource.Resource):
    """One of the three paths: GET or HEAD only, nothing below it, JSON errors like the API's."""

    isLeaf = True

    def __init__(self, app, networks: tuple):
        super().__init__()
        self.app = app
        self.networks = networks

    def render(self, request):
        d = defer.ensureDeferred(self._answer(request))
        d.addErrback(self._unexpected, request)
        d.addCallback(write_response, request)
        return server.NOT_DONE_YET

    async def _answer(self, request) -> Response:
        try:
            if request.postpath:
                raise ApiError(404, "route_not_found", f"No route {request.path.decode('utf-8', 'replace')}")
            if request.method not in (b"GET", b"HEAD"):
                raise ApiError(405, "method_not_allowed", "Only GET and HEAD are allowed here",
                               {"allowed": ["GET", "HEAD"]}, headers={"Allow": "GET, HEAD"})
            return await self.answer(request)
        except ApiError as exc:
            return Response(exc.status, exc.body(), exc.headers)

    async def answer(self, request) -> Response:
        raise NotImplementedError

    def trusted(self, request) -> bool:
        """Whether the client is in ``[metrics] allowed_networks``."""
        return address_in(getattr(request.getClientAddress(), "host", None), self.networks)

    def _unexpected(self, failure, request):
        log.failure("{path} failed", failure, path=request.path)
        return Response(500, ApiError(500, "internal_error", "The server failed to handle this request").body())


class Healthz(OperationsResource):
    """Alive: the process answers HTTP. Nothing else is looked at."""

    async def answer(self, request) -> Response:
        return Response(200, {"status": "alive"})


class Readyz(OperationsResource):
    """Ready: every readiness check passes (the database answers, the listeners are up, ...)."""

    async def answer(self, request) -> Response:
        outcome = await self.app.readiness.run()
        failed = sorted(name for name, problem in outcome.items() if problem is not None)
        # Why a check failed (a database host name, a driver's message) only for the trusted networks.
        shown = outcome if self.trusted(request) else {name: "failed" if problem else None
                                                      for name, problem in outcome.items()}
        checks = {name: problem or "ok" for name, problem in shown.items()}
        if not failed:
            return Response(200, {"status": "ready", "checks": checks})
        return Response(503, ApiError(503, "not_ready", f"Not ready: {', '.join(failed)}",
                                      {"failed": failed, "checks": checks}).body())


class Metrics(OperationsResource):
    """Every metric in the Prometheus text format."""

    async def answer(self, request) -> Response:
        metrics = self.app.metrics
        if not metrics.enabled:
            raise ApiError(404, "metrics_disabled", "Metrics are disabled ([metrics] enabled = false)")
        if not self.trusted(request):
            await require_bearer_token(self.app, request, list(self.app.config.api.tokens))
        return Response(200, raw=metrics.exposition(), content_type=metrics.CONTENT_TYPE)


def operations_children(app) -> dict:
    """The resources to serve at ``/metrics``, ``/healthz`` and ``/readyz``."""
    networks = parse_networks(app.config.metrics.allowed_networks, "[metrics] allowed_networks")
    return {METRICS: Metrics(app, networks), HEALTHZ: Healthz(app, networks), READYZ: Readyz(app, networks)}


def write_response(response: Response, request) -> None:
    if request._disconnected:
        return
    request.setResponseCode(response.status)
    for name, value in response.headers.items():
        request.setHeader(name, value)
    data = response.raw if response.raw is not None else to_json(response.body)
    request.setHeader("content-type", response.content_type)
    request.setHeader("content-length", str(len(data)))
    request.setHeader("cache-control", "no-store")
    if request.method != b"HEAD":
        request.write(data)
    request.finish()


class _OperationsRoot(resource.Resource):
    """The root of ``[metrics] endpoint``: the three paths, and a JSON 404 for anything else."""

    def __init__(self, children: dict):
        super().__init__()
        self.operations = children

    def getChild(self, name, request):
        return self.operations.get(name, _NotFound())

    def render(self, request):
        return _NotFound().render(request)


class _NotFound(resource.Resource):
    isLeaf = True

    def render(self, request):
        request.setResponseCode(404)
        request.setHeader("content-type", "application/json")
        return to_json(ApiError(404, "route_not_found", "This endpoint serves /metrics, /healthz and /readyz").body())


def make_operations_site(app):
    """The factory ``[metrics] endpoint`` listens with, behind the [api] connection caps and request deadlines."""
    from csms.api.resource import LimitedRequest
    from csms.httplimits import HTTPLimits, LimitedSite, limited_listener

    limits = HTTPLimits.read(lambda name, default: getattr(app.config.api, name))
    site = LimitedSite(_OperationsRoot(operations_children(app)), limits, app.clock)
    # No path here takes a body: none is stored, whatever a client sends.
    site.requestFactory = LimitedRequest
    site.max_body_size = 0
    site.noisy = False
    site.displayTracebacks = False
    site.log = lambda request: None
    return limited_listener(site, "Metrics endpoint")
