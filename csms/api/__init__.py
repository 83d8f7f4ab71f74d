"""The operator HTTP API (JSON under /api/v1), served by the same ``twistd csms`` process.

The framework serves stations, connection events, the generic OCPP call endpoint and the OpenAPI
document; each plugin adds its own routes through ``csms_api_routes(app, router)``.
"""
from csms.api.errors import ApiError
from csms.api.resource import ApiRequest, ApiResource, ApiSite, Response, paginated, to_json
from csms.api.router import PAGINATION, Path, Query, Router

__all__ = ["ApiError", "ApiRequest", "Path", "Query", "PAGINATION", "Response", "Router", "make_site", "paginated"]


def make_router(app) -> Router:
    from csms.api import audit, nodes, openapi, stations

    router = Router()
    stations.add_routes(app, router)
    nodes.add_routes(app, router)
    audit.add_routes(app, router)
    app.hook.csms_api_routes(app=app, router=router)
    built: list = []

    def openapi_document() -> tuple[dict, bytes]:
        """The document and its JSON, built on first use: routes and actions are fixed once the API serves."""
        if not built:
            document = openapi.build_openapi(router, stations.call_actions(app), stations.CALL_ROUTE)
            built.append((document, to_json(document)))
        return built[0]

    def document(request):
        return Response(raw=openapi_document()[1], content_type="application/json")

    router.openapi_document = lambda: openapi_document()[0]
    router.add("GET", "/openapi.json", document,
               "This document: the OpenAPI 3.1 description of every route", tags=("meta",), auth=False,
               operation_id="get_openapi", response_type="application/json",
               response={"type": "object", "description": "An OpenAPI 3.1 document"})
    return router


def make_site(app):
    """The factory the API listens with: its site behind the [api] connection caps and request deadlines."""
    from csms.api.ops import operations_children
    from csms.httplimits import HTTPLimits, limited_listener

    router = make_router(app)
    app.api_router = router
    app.api_resource = ApiResource(app, router)
    mounted = web_resources(app)
    limits = HTTPLimits.read(lambda name, default: getattr(app.config.api, name))
    site = ApiSite(app.api_resource, router.largest_body(app.config.api.max_body_size), limits, app.clock,
                   {**operations_children(app), **mounted})
    return limited_listener(site, "Operator API")


def web_resources(app) -> dict:
    """``{name: resource}`` the plugins mount beside /api/v1 (``csms_web_resources``), names checked."""
    from csms.plugins import PluginError

    mounted: dict = {}
    for offered in app.hook.csms_web_resources(app=app):
        for name, child in (offered or {}).items():
            if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
                raise PluginError(f"csms_web_resources: {name!r} is not a path segment to mount a resource at")
            if name == "api" or name in mounted:
                raise PluginError(f"csms_web_resources: /{name}/ is already served")
            mounted[name] = child
    return mounted
