"""The twisted.web side of the operator API: request parsing, auth, body limits, JSON errors."""
from __future__ import annotations

import json
from datetime import date, datetime
from urllib.parse import unquote

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web import resource, server
from zope.interface import implementer

from csms.api import audit, inputs
from csms.api.errors import ApiError, bad_request, not_found, unprocessable
from csms.api.tokens import caller_thd, configured_caller, scope_allows
from csms.app import as_deferred
from csms.httplimits import HTTPLimits, LimitedSite
from csms.ocpp16 import format_datetime

log = Logger(namespace="csms.api")

API_PREFIX = b"/api/v1"


def to_json(value) -> bytes:
    def default(obj):
        if isinstance(obj, datetime):
            return format_datetime(obj)
        if isinstance(obj, date):
            return obj.isoformat()
        if isinstance(obj, (set, tuple)):
            return list(obj)
        raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
    return json.dumps(value, default=default, separators=(",", ":")).encode("utf-8")


class Response:
    """A handler result other than a plain 200 JSON body."""

    def __init__(self, status: int = 200, body=None, headers: dict | None = None, raw: bytes | None = None,
                 content_type: str = "application/json", stream=None):
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.raw = raw
        self.content_type = content_type
        #: An async iterator of ``bytes`` chunks, written as they come (chunked, with back-pressure):
        #: for bodies of any size. Once the first chunk is out the status cannot change, so a failure
        #: mid-way aborts the connection: the client sees a truncated body, never a complete-looking one.
        self.stream = stream


@implementer(IPushProducer)
class _StreamPump:
    """Writes a streamed response, waiting while the client's connection is not draining."""

    def __init__(self, request, chunks):
        self.request = request
        self.chunks = chunks
        self._resumed = None
        self.stopped = False

    def pauseProducing(self):
        if self._resumed is None:
            self._resumed = defer.Deferred()

    def resumeProducing(self):
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.callback(None)

    def stopProducing(self):
        self.stopped = True
        self.resumeProducing()

    async def run(self):
        self.request.registerProducer(self, True)
        # A client that hangs up ends the request: stop reading pages for it.
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        try:
            async for chunk in self.chunks:
                if self.stopped:
                    break
                if chunk:
                    self.request.write(chunk)
                if self._resumed is not None:
                    await self._resumed
                if self.stopped:
                    break
        except Exception:
            log.failure("Operator API stream {path} failed part-way; connection aborted", path=self.request.path)
            self.request.unregisterProducer()
            self.request.channel.transport.abortConnection()
            return
        finally:
            if self.stopped:
                await self.chunks.aclose()
        self.request.unregisterProducer()
        if not self.stopped:
            self.request.finish()


class ApiRequest:
    """What a route handler gets: path params, validated query and JSON body, and the app."""

    def __init__(self, app, request, route, params: dict, query: dict, body, caller=None):
        self.app = app
        self.request = request
        self.route = route
        self.params = params
        self.query = query
        self.body = body
        #: The :class:`csms.api.tokens.Caller` (None on a route without authentication).
        self.caller = caller

    def page(self) -> tuple[int, int]:
        return self.query.get("limit", 50), self.query.get("offset", 0)


def paginated(items: list, total: int, limit: int, offset: int) -> dict:
    return {"items": items, "total": total, "limit": limit, "offset": offset}


def _parse_path(route, raw_params: dict) -> dict:
    out = {}
    for spec in route.path_params:
        raw = raw_params[spec.name]
        try:
            out[spec.name] = inputs.convert(spec, inputs.to_text(raw))
        except inputs.Invalid as exc:
            if spec.resource and spec.kind == "integer":
                raise not_found(spec.resource, unquote(raw)) from None
            raise bad_request(f"Path parameter {spec.name}={unquote(raw)!r} {_explain(exc)}",
                              "invalid_path_parameter") from None
    return out


def _explain(exc: inputs.Invalid) -> str:
    text = str(exc)
    return text if text.startswith(("is ", "contains ")) else f"must be {text}"


def _parse_query(route, args: dict) -> dict:
    """Declared query parameters from the URL's ``{name: [values]}`` (bytes; never from a form-encoded
    body: see LimitedRequest)."""
    declared = {q.name: q for q in route.query}
    out = {}
    for raw_name, values in args.items():
        name = raw_name.decode("utf-8", "replace")
        spec = declared.get(name)
        if spec is None:
            raise bad_request(f"Unknown query parameter {name!r}", "unknown_query_parameter",
                              allowed=sorted(declared))
        try:
            out[name] = inputs.convert(spec, inputs.to_text(values[-1]))
        except inputs.Invalid as exc:
            shown = values[-1].decode("utf-8", "replace")
            raise bad_request(f"Query parameter {name}={shown!r} {_explain(exc)}", "invalid_query_parameter") \
                from None
    missing = [q.name for q in route.query if q.required and q.name not in out]
    if missing:
        raise bad_request(f"Query parameter {missing[0]!r} is required", "missing_query_parameter",
                          missing=missing)
    return out


def _parse_body(route, request):
    content = request.content.read() if request.content is not None else b""
    if not route.json_body:
        request.content.seek(0)
        return None
    if route.body is None:
        if content.strip():
            raise bad_request("This route takes no request body", "unexpected_body")
        return None
    if not content.strip():
        if route.body_required:
            raise bad_request("A JSON request body is required", "missing_body")
        content = b"{}"
    return _validate_body(route, inputs.parse_json(content))


def _validate_body(route, body):
    try:
        route.validator(body)
    except Exception as exc:  # fastjsonschema.JsonSchemaValueException
        raise unprocessable(f"Invalid request body: {_body_message(getattr(exc, 'message', str(exc)))}")
    return body


def _body_message(message: str) -> str:
    """fastjsonschema's message with the client's names: it calls the body ``data`` (``data.vendor_id must
    be string``, ``data must contain ...``). Only that leading name is rewritten: a field that is or ends
    in "data" (DataTransfer's ``data``, ``certificate_hash_data``) keeps its name."""
    if message.startswith("data."):
        return message[len("data."):]
    if message.startswith("data"):
        return "body" + message[len("data"):]
    return message


def _authorize(caller, route) -> None:
    if not scope_allows(caller.scope, route.scope):
        raise ApiError(403, "forbidden", f"This token's scope ({caller.scope}) does not allow this "
                       f"route (it needs {route.scope})", {"scope": caller.scope, "required": route.scope})


def _internal_error() -> Response:
    return Response(500, ApiError(500, "internal_error", "The server failed to handle this request").body())


class ApiResource(resource.Resource):
    """Everything under /api/v1: route, authenticate, validate, run the handler, answer JSON."""

    isLeaf = True
    #: Called as ``response_check(route, response)`` with every answer of a matched route before it is
    #: written; the test fixtures set it to hold each answer to the route's documented responses.
    response_check = None

    def __init__(self, app, router):
        super().__init__()
        self.app = app
        self.router = router
        self.configured_tokens = list(app.config.api.tokens)

    def render(self, request):
        d = defer.ensureDeferred(self._handle(request))
        d.addErrback(self._unexpected, request)
        d.addCallback(self._write, request)
        return server.NOT_DONE_YET

    async def _handle(self, request):
        caller = route = None
        params, raw_params, body = {}, {}, None
        try:
            path = request.path
            if not path.startswith(API_PREFIX):
                raise ApiError(404, "route_not_found", "The operator API lives under /api/v1")
            path = path[len(API_PREFIX):].decode("utf-8", "replace") or "/"
            route, raw_params = self.router.match(request.method.decode("ascii", "replace"), path)
            request.api_route = route
            request.route_template = route.template
            if route.auth:
                caller = await self._authenticate(request)
                _authorize(caller, route)
            if getattr(request, "body_too_large", False) or \
                    (request.received_body_size > (route.max_body or self.app.config.api.max_body_size)):
                limit = route.max_body or self.app.config.api.max_body_size
                raise ApiError(413, "body_too_large", f"The request body is larger than {limit} bytes",
                               {"limit": limit})
            params = _parse_path(route, raw_params)
            query = _parse_query(route, request.args)
            body = _parse_body(route, request)
            response = await self._run(request, route, params, query, body, caller)
        except ApiError as exc:
            response = Response(exc.status, exc.body(), exc.headers)
        except Exception:
            log.failure("Operator API request {method} {path} failed", method=request.method, path=request.path)
            response = _internal_error()
        if caller is not None and route.method not in audit.READ_METHODS:
            if not params and raw_params:
                # Refused before its parameters were read (403, 413): the station is named all the same.
                try:
                    params = _parse_path(route, raw_params)
                except ApiError:
                    pass
            await self._audit(request, request.path.decode("utf-8", "replace"), caller, route, params, body,
                              response)
        return response

    async def _run(self, request, route, params: dict, query: dict, body, caller) -> Response:
        result = await as_deferred(route.handler(ApiRequest(self.app, request, route, params, query, body, caller)))
        return result if isinstance(result, Response) else Response(200, result)

    async def dispatch(self, request, caller, method: str, path: str, query: dict | None = None,
                       body=None) -> Response:
        """Serve one route in-process for another resource on the API's site (``csms_web_resources``).

        ``caller`` (a :class:`csms.api.tokens.Caller` the resource authenticated) must hold the route's
        scope; ``path`` is relative to /api/v1 (its segments percent-encoded), ``query`` maps names to
        text values, ``body`` is the decoded JSON body (validated here as for an HTTP request). A change
        is audited under the caller's name, as if the caller had sent it to /api/v1. Never raises: every
        outcome is a :class:`Response` carrying the API's JSON error body. A route taking a raw body
        (``json_body=False``, an upload) reads ``request``'s own.
        """
        route = None
        params = {}
        try:
            route, raw_params = self.router.match(method, path)
            _authorize(caller, route)
            limit = route.max_body or self.app.config.api.max_body_size
            if not route.json_body and (getattr(request, "body_too_large", False) or
                                        getattr(request, "received_body_size", 0) > limit):
                # A raw body (an upload) is the request's own: it is as limited as it would be under /api/v1.
                raise ApiError(413, "body_too_large", f"The request body is larger than {limit} bytes",
                               {"limit": limit})
            params = _parse_path(route, raw_params)
            args = {name.encode("utf-8"): [str(value).encode("utf-8")] for name, value in (query or {}).items()}
            query = _parse_query(route, args)
            if route.body is None or not route.json_body:
                if body is not None:
                    raise bad_request("This route takes no request body", "unexpected_body")
            else:
                if body is None:
                    if route.body_required:
                        raise bad_request("A JSON request body is required", "missing_body")
                    body = {}
                inputs.check_json(body)
                body = _validate_body(route, body)
            response = await self._run(request, route, params, query, body, caller)
        except ApiError as exc:
            response = Response(exc.status, exc.body(), exc.headers)
        except Exception:
            log.failure("Operator API request {method} {path} (in-process) failed", method=method, path=path)
            response = _internal_error()
        if route is not None and route.method not in audit.READ_METHODS:
            await self._audit(request, API_PREFIX.decode() + path, caller, route, params, body, response)
        return response

    async def _authenticate(self, request):
        """The caller the request's bearer token stands for, or ApiError 401."""
        return await require_bearer_token(self.app, request, self.configured_tokens)

    async def _audit(self, request, path: str, caller, route, params: dict, body, response: Response):
        """Record a change request once answered; a failure to record is logged, the answer still goes out."""
        station_id = params.get("station_id")
        if station_id is None and route.template == "/stations" and isinstance(body, dict):
            station_id = body.get("id")
        peer = request.getClientAddress()
        entry = {"at": self.app.now(), "token_name": caller.name[:100], "token_id": caller.token_id,
                 "scope": caller.scope, "method": route.method, "route": route.template[:255],
                 "path": path[:2048],
                 "station_id": station_id if isinstance(station_id, str) else None,
                 "status": response.status, "outcome": audit.outcome_of(response.status, response.body),
                 "remote_address": str(getattr(peer, "host", ""))[:64] or None}
        try:
            await self.app.db.run(audit.record_thd, entry, desc="api_audit")
        except Exception:
            log.failure("Could not record {method} {route} by {token} in the audit trail",
                        method=route.method, route=route.template, token=caller.name)

    def _unexpected(self, failure, request):
        log.failure("Operator API request {method} {path} failed", failure,
                    method=request.method, path=request.path)
        return _internal_error()

    def write(self, response: Response, request):
        """Send ``response`` on ``request`` as the API does (JSON, raw bytes, or a stream with back-pressure)."""
        self._write(response, request)

    def _write(self, response: Response, request):
        route = getattr(request, "api_route", None)
        if self.response_check is not None and route is not None:
            self.response_check(route, response)
        if request._disconnected:
            return
        self.app.metrics.api_request(request.method, getattr(request, "route_template", "unmatched"), response.status)
        request.setResponseCode(response.status)
        for name, value in response.headers.items():
            request.setHeader(name, value)
        if response.status == 204:
            request.finish()
            return
        if response.stream is not None:
            request.setHeader("content-type", response.content_type)
            if request.method == b"HEAD":
                request.finish()
                return
            defer.ensureDeferred(_StreamPump(request, response.stream).run())
            return
        if response.raw is not None:
            data = response.raw
            request.setHeader("content-type", response.content_type)
        else:
            data = to_json(response.body)
            request.setHeader("content-type", "application/json")
        request.setHeader("content-length", str(len(data)))
        if request.method != b"HEAD":
            request.write(data)
        request.finish()


async def require_bearer_token(app, request, configured_tokens):
    """The :class:`csms.api.tokens.Caller` the request's bearer token stands for, else raise ApiError 401."""
    header = request.getHeader("authorization") or ""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    caller = None
    if scheme.lower() == "bearer" and token:
        caller = configured_caller(token, configured_tokens)
        if caller is None:
            caller = await app.db.run(caller_thd, token, desc="api_token")
    if caller is None:
        raise ApiError(401, "unauthorized", "A valid bearer token is required (Authorization: Bearer <token>)",
                       headers={"WWW-Authenticate": 'Bearer realm="csms"'})
    return caller


class LimitedRequest(server.Request):
    """A request that stops storing its body past the site's largest allowed size (413 follows).

    Its body is never parsed as a form: Twisted would merge an ``application/x-www-form-urlencoded`` body
    (curl's default Content-Type for ``--data-binary``) into ``request.args``, so the bytes of an upload
    or of a JSON body would read as query parameters. Query parameters come from the URL only.
    """

    body_too_large = False
    received_body_size = 0

    def __init__(self, *args, **kwargs):
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(*args, **kwargs)

    def gotLength(self, length):
        limit = self.channel.site.max_body_size
        if length is not None and length > limit:
            self.body_too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data):
        self.received_body_size += len(data)
        if self.body_too_large or self.received_body_size > self.channel.site.max_body_size:
            self.body_too_large = True
            return
        super().handleContentChunk(data)


class RootResource(resource.Resource):
    """``/``: the API under /api/v1, the operations resources (/metrics, /healthz, /readyz) and the resources
    plugins mount (``csms_web_resources``) under their names; other paths answer the API's JSON 404."""

    def __init__(self, api, mounted: dict | None = None):
        super().__init__()
        self.api = api
        self.mounted = {name.encode("utf-8") if isinstance(name, str) else name: child
                        for name, child in (mounted or {}).items()}

    def getChild(self, name, request):
        return self.mounted.get(name, self.api)

    def render(self, request):
        return self.api.render(request)


class ApiSite(LimitedSite):
    requestFactory = LimitedRequest
    noisy = False

    def __init__(self, api_resource, max_body_size: int, limits: HTTPLimits, clock, mounted: dict | None = None):
        super().__init__(RootResource(api_resource, mounted), limits, clock)
        self.max_body_size = max_body_size
        self.displayTracebacks = False

    def log(self, request):
        # Access log without headers: never let an Authorization header reach a log.
        log.debug("{method} {uri} {code}", method=request.method, uri=request.uri, code=request.code)
