"""The /ui/ resource: sessions, CSRF, assets and the page routing; the pages themselves are in pages.py.

Every request is answered with a page, a redirect or an asset: an unknown or expired session gets a 303
to the sign-in page, a POST without its session's CSRF token a 403 page, a failure a 500 page (logged),
never a stack trace.
"""
from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field
from importlib import resources as package_files
from urllib.parse import parse_qs, quote, urlencode

import jinja2
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from csms.api.tokens import caller_thd, configured_caller, scope_allows

log = Logger(namespace="csms.dashboard")

SESSION_COOKIE = b"csms_ui_session"
LOGIN_COOKIE = b"csms_ui_login"
PREFIX = "/ui/"
#: Largest form a page posts (the site's own body limit is larger, for firmware uploads).
MAX_FORM_SIZE = 64 * 1024
ASSET_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".svg": "image/svg+xml", ".png": "image/png"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


class PageError(Exception):
    """Answer with the error page: ``status`` and a message for the operator."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    content_type: str = "text/html; charset=utf-8"
    #: The response was written by the handler itself (an event stream, an export).
    written: bool = False


def redirect(location: str) -> Reply:
    return Reply(303, b"", {"Location": location})


def safe_return_path(value: str | None, default: str) -> str:
    """A path under /ui/ to go back to after a form (never another site: ``//host`` or a scheme)."""
    if value and value.startswith(PREFIX) and not value.startswith("//") and "\\" not in value \
            and not any(ord(c) < 32 for c in value):
        return value
    return default


class Assets:
    """The package's static files, read once, each with a content hash for its URL (cached for a year)."""

    def __init__(self):
        self.files: dict[str, tuple[bytes, str, str]] = {}
        for entry in package_files.files(__package__).joinpath("static").iterdir():
            suffix = "." + entry.name.rsplit(".", 1)[-1]
            if entry.is_file() and suffix in ASSET_TYPES:
                data = entry.read_bytes()
                self.files[entry.name] = (data, ASSET_TYPES[suffix], hashlib.sha256(data).hexdigest()[:12])

    def url(self, name: str) -> str:
        return f"{PREFIX}static/{name}?v={self.files[name][2]}"


def make_templates(app, plugin, assets: Assets) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader(__package__, "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.globals.update(asset=assets.url, q=lambda value: quote(str(value), safe=""))
    env.filters["when"] = lambda value: "" if value is None else str(value).replace("T", " ")[:19]
    return env


class Context:
    """One page request: the signed-in session, the path parameters, the form (POST) and the query."""

    def __init__(self, resource_, request, session, params: dict, form: dict):
        self.resource = resource_
        self.request = request
        self.session = session
        self.params = params
        self.form = form

    def arg(self, name: str, default: str = "") -> str:
        values = self.request.args.get(name.encode())
        if not values:
            return default
        return values[-1].decode("utf-8", "replace").strip()

    def field(self, name: str, default: str = "") -> str:
        return self.form.get(name, default).strip()

    def may(self, scope: str) -> bool:
        return scope_allows(self.session.caller.scope, scope)

    async def api(self, method: str, path: str, query: dict | None = None, body=None):
        """(status, body) of an operator API route, run in-process as the signed-in token."""
        query = {k: v for k, v in (query or {}).items() if v not in (None, "")}
        response = await self.resource.app.api_resource.dispatch(self.request, self.session.caller, method, path,
                                                                 query, body)
        return response.status, response.body

    async def read(self, path: str, query: dict | None = None):
        """The body of a GET route, or PageError with the API's own status and message."""
        status, body = await self.api("GET", path, query)
        if status != 200:
            raise PageError(status, _message(body))
        return body

    def render(self, template: str, status: int = 200, **values) -> Reply:
        return self.resource.render_page(template, self, status, **values)


def _message(body) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", "error"))
    return "The request failed"


_PARAM = re.compile(r"^\{([a-z_]+)\}$")


class DashboardResource(resource.Resource):
    isLeaf = True

    def __init__(self, app, plugin):
        super().__init__()
        from . import pages

        self.app = app
        self.plugin = plugin
        self.sessions = plugin.sessions
        self.assets = Assets()
        self.templates = make_templates(app, plugin, self.assets)
        #: (method, path segments, handler, signed in) in the order tried.
        self.routes = pages.routes(self)

    # -- profiles ---------------------------------------------------------------------------------

    def has_route(self, method: str, template: str) -> bool:
        """Whether the operator API serves that route (its plugin is enabled): a page for it is shown."""
        return any(r.method == method and r.template == template for r in self.app.api_router.routes)

    # -- twisted.web ------------------------------------------------------------------------------

    def render(self, request):
        d = defer.ensureDeferred(self._handle(request))
        d.addErrback(self._failed, request)
        d.addCallback(self._write, request)
        return server.NOT_DONE_YET

    def _failed(self, failure, request):
        log.failure("Dashboard request {method} {path} failed", failure, method=request.method, path=request.path)
        try:
            return self.error_page(None, 500, "The server failed to handle this request")
        except Exception:  # the templates themselves: still an answer, never a traceback
            log.failure("Dashboard error page failed")
            return Reply(500, b"<!doctype html><title>500</title><p>The server failed to handle this request.",
                         {})

    async def _handle(self, request) -> Reply:
        method = request.method.decode("ascii", "replace")
        if method == "HEAD":
            method = "GET"
        try:
            segments = [s.decode("utf-8") for s in request.postpath]
        except UnicodeDecodeError:
            return self.error_page(None, 404, "No such page")
        while segments and segments[-1] == "":
            segments.pop()
        for route_method, pattern, handler, signed_in in self.routes:
            params = _match(pattern, segments)
            if params is None or route_method != method:
                continue
            return await self._serve(request, method, handler, signed_in, params)
        if any(_match(p, segments) is not None for _, p, _, _ in self.routes):
            return self.error_page(None, 405, f"{method} is not allowed here")
        return self.error_page(None, 404, "No such page")

    async def _serve(self, request, method, handler, signed_in, params) -> Reply:
        session = self.sessions.get(self.session_id(request))
        if signed_in and session is None:
            return redirect(PREFIX + "login")
        form = {}
        if method == "POST":
            # A raw upload's body is the file, sent by the page's script: its CSRF token is in the header.
            form = {} if getattr(handler, "raw_body", False) else self._form(request)
            if form is None:
                return self.error_page(session, 413, f"The form is larger than {MAX_FORM_SIZE} bytes")
            if signed_in and not session.csrf_matches(form.get("csrf_token") or request.getHeader("x-csrf-token")):
                return self.error_page(session, 403, "This form has expired or did not come from this dashboard: "
                                                     "reload the page and try again")
        ctx = Context(self, request, session, params, form)
        try:
            return await handler(ctx)
        except PageError as exc:
            return self.error_page(session, exc.status, exc.message)

    def _form(self, request) -> dict | None:
        if request.content is None:
            return {}
        data = request.content.read(MAX_FORM_SIZE + 1)
        if len(data) > MAX_FORM_SIZE:
            return None
        try:
            parsed = parse_qs(data.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=200)
        except (UnicodeDecodeError, ValueError):
            return {}
        return {name: values[-1] for name, values in parsed.items() if "\x00" not in values[-1]}

    def _write(self, reply: Reply, request):
        if reply.written or request._disconnected:
            return
        request.setResponseCode(reply.status)
        for name, value in reply.headers.items():
            request.setHeader(name, value)
        if reply.content_type.startswith("text/html"):
            for name, value in SECURITY_HEADERS.items():
                request.setHeader(name, value)
            request.setHeader("cache-control", "no-store")
        request.setHeader("content-type", reply.content_type)
        request.setHeader("content-length", str(len(reply.body)))
        if request.method != b"HEAD":
            request.write(reply.body)
        request.finish()

    # -- sessions ---------------------------------------------------------------------------------

    @staticmethod
    def session_id(request) -> str | None:
        value = request.getCookie(SESSION_COOKIE)
        return value.decode("ascii", "replace") if value else None

    def set_cookie(self, request, name: bytes, value: str, expire: bool = False) -> None:
        # A session cookie (no Max-Age: gone when the browser closes); the server expires it too.
        request.addCookie(name, value.encode("ascii"), path=PREFIX.encode(), httpOnly=True, sameSite="strict",
                          secure=request.isSecure(),
                          **({"max_age": b"0", "expires": b"Thu, 01 Jan 1970 00:00:00 GMT"} if expire else {}))

    async def authenticate(self, token: str):
        """The Caller an operator API token stands for, or None (configured tokens, then stored ones)."""
        token = token.strip()
        if not token or len(token) > 200:
            return None
        caller = configured_caller(token, list(self.app.config.api.tokens))
        if caller is None:
            caller = await self.app.db.run(caller_thd, token, desc="dashboard_sign_in")
        return caller

    def new_login_token(self, request) -> str:
        """The sign-in form's CSRF token: a random value in a cookie and the form (double submit)."""
        token = secrets.token_urlsafe(24)
        self.set_cookie(request, LOGIN_COOKIE, token)
        return token

    # -- pages ------------------------------------------------------------------------------------

    def render_page(self, template: str, ctx: Context | None, status: int = 200, **values) -> Reply:
        session = ctx.session if ctx is not None else None
        flashes = []
        if session is not None:
            flashes, session.flashes = session.flashes, []
        page = self.templates.get_template(template).render(
            session=session, caller=session.caller if session else None, flashes=flashes,
            may_command=bool(session) and scope_allows(session.caller.scope, "commands"),
            may_admin=bool(session) and scope_allows(session.caller.scope, "admin"),
            nav=self.navigation(), current=template,
            here=ctx.request.uri.decode("utf-8", "replace") if ctx is not None and ctx.request is not None else "",
            **values)
        return Reply(status, page.encode("utf-8"))

    def navigation(self) -> list:
        items = [("Stations", "stations"), ("Transactions", "transactions"), ("Id tags", "id-tags")]
        if self.has_route("GET", "/firmware-files"):
            items.append(("Firmware", "firmware"))
        return items

    def error_page(self, session, status: int, message: str) -> Reply:
        ctx = Context(self, None, session, {}, {}) if session is not None else None
        return self.render_page("error.html", ctx, status, code=status, message=message)


def _match(pattern: tuple, segments: list) -> dict | None:
    if len(pattern) != len(segments):
        return None
    params = {}
    for expected, actual in zip(pattern, segments):
        found = _PARAM.match(expected)
        if found:
            if not actual:
                return None
            params[found.group(1)] = actual
        elif expected != actual:
            return None
    return params


async def serve_asset(ctx) -> Reply:
    found = ctx.resource.assets.files.get(ctx.params["name"])
    if found is None:
        raise PageError(404, "No such file")
    data, content_type, digest = found
    # Pages link assets with their hash (?v=): that URL never changes meaning, so it is cached for good.
    cache = "public, max-age=31536000, immutable" if ctx.arg("v") == digest else "no-cache"
    return Reply(200, data, {"Cache-Control": cache, "ETag": f'"{digest}"', "X-Content-Type-Options": "nosniff"},
                 content_type)


def query_string(values: dict) -> str:
    given = {k: v for k, v in values.items() if v not in (None, "")}
    return ("?" + urlencode(given)) if given else ""
