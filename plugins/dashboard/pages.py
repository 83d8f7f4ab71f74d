"""The dashboard's pages and forms, each reading and acting through the operator API's routes.

A form's action runs one API route as the signed-in token, stores the answer (the station's response,
or the API's error) to show once, and redirects back (POST, then 303, then GET: a reload never resends).
"""
from __future__ import annotations

import hmac
import json
from urllib.parse import quote

from csms.api.inputs import has_offset
from csms.api.resource import to_json
from csms.ocpp16 import format_datetime

from .events import meter_points
from .web import LOGIN_COOKIE, PREFIX, SESSION_COOKIE, PageError, Reply, query_string, redirect, safe_return_path

REGISTRATION_STATUSES = ("Accepted", "Pending", "Rejected")
CONNECTOR_STATUSES = ("Available", "Preparing", "Charging", "SuspendedEVSE", "SuspendedEV", "Finishing",
                      "Reserved", "Unavailable", "Faulted")
ID_TAG_STATUSES = ("Accepted", "Blocked", "Expired", "Invalid")
TRIGGER_MESSAGES = ("BootNotification", "DiagnosticsStatusNotification", "FirmwareStatusNotification",
                    "Heartbeat", "MeterValues", "StatusNotification")


def seg(value) -> str:
    return quote(str(value), safe="")


def page_number(ctx) -> int:
    try:
        return max(1, min(int(ctx.arg("page", "1")), 1_000_000))
    except ValueError:
        return 1


def paging(ctx, total: int, page: int, size: int, filters: dict) -> dict:
    pages = max(1, -(-total // size))
    def link(number):
        return query_string({**filters, "page": number if number > 1 else ""})
    return {"total": total, "page": page, "pages": pages,
            "previous": link(page - 1) if page > 1 else None,
            "next": link(page + 1) if page < pages else None}


def json_for_script(value) -> str:
    """JSON to embed in a ``<script type="application/json">``: no ``<`` can close the element."""
    return to_json(value).decode("utf-8").replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def int_or_none(text: str, name: str) -> int | None:
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise PageError(400, f"{name} must be a whole number") from None


def show_answer(ctx, title: str, status: int, body) -> None:
    """Keep an action's outcome to show once on the next page; a scope refusal is a 403 page at once."""
    if status == 403:
        raise PageError(403, f"{title}: " + str((body or {}).get("error", {}).get("message", "forbidden")))
    if status < 300:
        text = json.dumps(body, indent=2, default=str) if body is not None else "Done"
        ctx.session.flashes.append({"ok": True, "title": title, "text": text})
        return
    error = body.get("error", {}) if isinstance(body, dict) else {}
    details = error.get("details")
    text = str(error.get("message", f"HTTP {status}"))
    if details:
        text += "\n" + json.dumps(details, indent=2, default=str)
    ctx.session.flashes.append({"ok": False, "title": title, "text": text})


# -- sign-in ------------------------------------------------------------------------------------------


async def home(ctx):
    return redirect(PREFIX + "stations")


async def login_page(ctx, error: str = "", status: int = 200):
    login_token = ctx.resource.new_login_token(ctx.request)
    return ctx.resource.render_page("login.html", None, status, login_token=login_token, error=error)


async def login(ctx):
    presented = ctx.field("login_token")
    expected = (ctx.request.getCookie(LOGIN_COOKIE) or b"").decode("ascii", "replace")
    if not presented or not expected or not hmac.compare_digest(presented.encode(), expected.encode()):
        return await login_page(ctx, "The sign-in form expired: try again.", 403)
    throttle = ctx.resource.plugin.throttle
    address = str(getattr(ctx.request.getClientAddress(), "host", ""))
    if throttle.refused(address):
        reply = await login_page(ctx, "Too many failed sign-ins from this address: wait a minute.", 429)
        reply.headers["Retry-After"] = str(int(throttle.window))
        return reply
    caller = await ctx.resource.authenticate(ctx.field("token"))
    if caller is None:
        throttle.failed(address)
        return await login_page(ctx, "That token is not valid.", 401)
    if ctx.session is not None:  # a new id at every sign-in: never keep one the browser brought
        ctx.resource.plugin.broker.close_session(ctx.session)
        ctx.resource.sessions.end(ctx.session)
    session = ctx.resource.sessions.create(caller)
    ctx.resource.set_cookie(ctx.request, SESSION_COOKIE, session.id)
    ctx.resource.set_cookie(ctx.request, LOGIN_COOKIE, "", expire=True)
    return redirect(PREFIX + "stations")


async def logout(ctx):
    ctx.resource.plugin.broker.close_session(ctx.session)
    ctx.resource.sessions.end(ctx.session)
    ctx.resource.set_cookie(ctx.request, SESSION_COOKIE, "", expire=True)
    return redirect(PREFIX + "login")


# -- live events ----------------------------------------------------------------------------------


async def events(ctx):
    if ctx.request.method == b"HEAD":  # nothing would be sent: no stream to hold open
        return Reply(200, b"", {"Cache-Control": "no-store"}, "text/event-stream; charset=utf-8")
    # ?transaction=<id>: the meter values of that transaction too (its page's chart); no other stream gets them.
    transaction = ctx.arg("transaction")
    if transaction and not (transaction.isascii() and transaction.isdigit() and int(transaction) < 2 ** 63):
        return Reply(400, b"transaction must be a transaction id", {}, "text/plain; charset=utf-8")
    broker = ctx.resource.plugin.broker
    refusal = broker.refusal(ctx.session)
    if refusal is not None:
        return Reply(429, refusal.encode(), {"Retry-After": "10"}, "text/plain; charset=utf-8")
    ctx.request.setResponseCode(200)
    broker.open(ctx.request, ctx.session, int(transaction) if transaction else None)
    return Reply(written=True)


# -- stations -------------------------------------------------------------------------------------


async def stations(ctx):
    size = ctx.resource.plugin.page_size
    page = page_number(ctx)
    filters = {"search": ctx.arg("search"), "online": ctx.arg("online"),
               "registration_status": ctx.arg("registration_status"),
               "connector_status": ctx.arg("connector_status"), "connector_error": ctx.arg("connector_error")}
    if filters["online"] not in ("", "true", "false"):
        filters["online"] = ""
    query = {**filters, "limit": size, "offset": (page - 1) * size}
    if not ctx.resource.has_connector_filters:
        query.pop("connector_status"), query.pop("connector_error")
    body = await ctx.read("/stations", query)
    return ctx.render("stations.html", stations=body["items"], filters=filters,
                      paging=paging(ctx, body["total"], page, size, filters),
                      registration_statuses=REGISTRATION_STATUSES, connector_statuses=CONNECTOR_STATUSES,
                      connector_filters=ctx.resource.has_connector_filters)


async def station(ctx):
    station_id = ctx.params["station_id"]
    base = f"/stations/{seg(station_id)}"
    resource = ctx.resource
    view = await ctx.read(base)
    events = (await ctx.read(base + "/events", {"limit": 10}))["items"]
    history = (await ctx.read(base + "/status-history", {"limit": 15}))["items"] \
        if resource.has_route("GET", "/stations/{station_id}/status-history") else []
    configuration = (await ctx.read(base + "/configuration"))["items"] \
        if resource.has_route("GET", "/stations/{station_id}/configuration") else []
    transactions = (await ctx.read("/transactions", {"station_id": station_id, "limit": 10}))["items"]
    id_tags = []
    if ctx.may("commands"):
        id_tags = (await ctx.read("/id-tags", {"status": "Accepted", "limit": 50}))["items"]
    local_list = None
    if resource.has_route("GET", "/stations/{station_id}/local-list"):
        local_list = await ctx.read(base + "/local-list")
    reservations = None
    if resource.has_route("GET", "/stations/{station_id}/reservations"):
        reservations = (await ctx.read(base + "/reservations", {"limit": 10}))["items"]
    firmware = firmware_files = diagnostics = None
    if resource.has_route("GET", "/stations/{station_id}/firmware"):
        firmware = await ctx.read(base + "/firmware")
        firmware_files = (await ctx.read("/firmware-files", {"limit": 50}))["items"]
    if resource.has_route("GET", "/stations/{station_id}/diagnostics"):
        diagnostics = await ctx.read(base + "/diagnostics")
    smart = await _smart_charging(ctx, base)
    return ctx.render("station.html", station=view, events=events, history=history, configuration=configuration,
                      transactions=transactions, id_tags=id_tags, local_list=local_list, reservations=reservations,
                      can_trigger=resource.has_route("POST", "/stations/{station_id}/trigger"),
                      trigger_messages=TRIGGER_MESSAGES, firmware=firmware, firmware_files=firmware_files,
                      diagnostics=diagnostics, smart=smart,
                      series_json=json_for_script({"schedule": smart["points"]} if smart else {}))


async def _smart_charging(ctx, base: str) -> dict | None:
    """The station's charging profiles and the composite schedule the CSMS computes, as step points."""
    if not ctx.resource.has_route("GET", "/stations/{station_id}/composite-schedule/preview"):
        return None
    connector = int_or_none(ctx.arg("schedule_connector", "1"), "Connector")
    connector = 1 if connector is None or connector < 0 else connector
    profiles = (await ctx.read(base + "/charging-profiles", {"limit": 20}))["items"]
    status, preview = await ctx.api("GET", base + "/composite-schedule/preview", {"connector_id": connector})
    points, unit = [], ""
    if status == 200:
        points, unit = schedule_points(preview)
    return {"connector": connector, "profiles": profiles, "points": points, "unit": unit,
            "problem": None if status == 200 else (preview or {}).get("error", {}).get("message")}


def schedule_points(preview: dict) -> tuple[list, str]:
    """A composite schedule as step-chart points [[iso time, limit]], ending at the window's end."""
    from datetime import timedelta

    from csms.ocpp16 import parse_datetime

    schedule = preview.get("chargingSchedule") or {}
    start = parse_datetime(preview["start"])
    points = [[format_datetime(start + timedelta(seconds=p["startPeriod"])), p["limit"]]
              for p in schedule.get("chargingSchedulePeriod") or ()]
    if points:
        points.append([format_datetime(start + timedelta(seconds=preview.get("duration") or 86400)),
                       points[-1][1]])
    return points, preview.get("chargingRateUnit") or schedule.get("chargingRateUnit") or ""


def _command_request(ctx, command: str):
    """(title, method, API path under the station, body) for a command form."""
    f = ctx.field
    if command == "reset":
        return "Reset", "POST", "/reset", {"type": "Hard" if f("type") == "Hard" else "Soft"}
    if command == "unlock":
        return "Unlock connector", "POST", "/unlock", {"connector_id": int_or_none(f("connector_id"), "Connector")}
    if command == "availability":
        return "Change availability", "POST", "/availability", {
            "connector_id": int_or_none(f("connector_id", "0"), "Connector") or 0,
            "type": "Inoperative" if f("type") == "Inoperative" else "Operative"}
    if command == "remote-start":
        body = {"id_tag": f("id_tag")}
        connector = int_or_none(f("connector_id"), "Connector")
        if connector is not None:
            body["connector_id"] = connector
        return "Remote start", "POST", "/remote-start", body
    if command == "remote-stop":
        transaction = int_or_none(f("transaction_id"), "Transaction")
        return "Remote stop", "POST", "/remote-stop", {} if transaction is None else {"transaction_id": transaction}
    if command == "clear-cache":
        return "Clear cache", "POST", "/clear-cache", {}
    if command == "trigger":
        body = {"requested_message": f("requested_message")}
        connector = int_or_none(f("connector_id"), "Connector")
        if connector is not None:
            body["connector_id"] = connector
        return "Trigger message", "POST", "/trigger", body
    if command == "configuration-fetch":
        return "Read configuration", "POST", "/configuration/fetch", {}
    if command == "configuration-change":
        key = f("key")
        if not key:
            raise PageError(400, "Give the configuration key to change")
        return f"Change {key}", "PUT", "/configuration/" + seg(key), {"value": f("value")}
    if command == "local-list-sync":
        return "Sync local list", "POST", "/local-list/sync", {
            "update_type": "Differential" if f("update_type") == "Differential" else "Full"}
    if command == "local-list-version":
        return "Read local list version", "POST", "/local-list/version", None
    if command == "reserve":
        body = {"connector_id": int_or_none(f("connector_id", "0"), "Connector") or 0, "id_tag": f("id_tag"),
                "expiry_date": _utc_if_naive(f("expiry_date"))}
        return "Reserve", "POST", "/reservations", body
    if command == "cancel-reservation":
        reservation = int_or_none(f("reservation_id"), "Reservation")
        return "Cancel reservation", "POST", f"/reservations/{reservation}/cancel", None
    if command == "firmware-update":
        firmware_id = int_or_none(f("firmware_id"), "Firmware file")
        body = {"firmware_id": firmware_id} if firmware_id is not None else {"location": f("location")}
        return "Update firmware", "POST", "/firmware-update", body
    if command == "diagnostics":
        return "Get diagnostics", "POST", "/diagnostics", {}
    if command == "charging-profile-set":
        try:
            profile = json.loads(f("charging_profile"))
        except ValueError:
            raise PageError(400, "The charging profile is not valid JSON") from None
        return "Set charging profile", "POST", "/charging-profiles", {
            "connector_id": int_or_none(f("connector_id", "0"), "Connector") or 0, "charging_profile": profile}
    if command == "charging-profiles-clear":
        return "Clear charging profiles", "POST", "/charging-profiles/clear", {}
    if command == "charging-profile-clear":
        profile_id = int_or_none(f("charging_profile_id"), "Charging profile")
        return f"Clear charging profile {profile_id}", "DELETE", f"/charging-profiles/{profile_id}", None
    raise PageError(404, f"No command {command!r}")


async def station_command(ctx):
    station_id = ctx.params["station_id"]
    title, method, path, body = _command_request(ctx, ctx.params["command"])
    status, answer = await ctx.api(method, f"/stations/{seg(station_id)}{path}", body=body)
    show_answer(ctx, title, status, answer)
    return redirect(f"{PREFIX}stations/{seg(station_id)}")


# -- transactions ---------------------------------------------------------------------------------


def _transaction_filters(ctx) -> dict:
    filters = {name: ctx.arg(name) for name in ("station_id", "id_tag", "active", "since", "until")}
    if filters["active"] not in ("", "true", "false"):
        filters["active"] = ""
    return filters


def _api_dates(filters: dict) -> dict:
    """The API takes date-times; the form's date inputs give days (UTC)."""
    out = dict(filters)
    for name in ("since", "until"):
        value = out.get(name)
        if value and len(value) == 10:
            out[name] = value + "T00:00:00Z"
    return out


async def transactions(ctx):
    size = ctx.resource.plugin.page_size
    page = page_number(ctx)
    filters = _transaction_filters(ctx)
    body = await ctx.read("/transactions", {**_api_dates(filters), "limit": size, "offset": (page - 1) * size})
    return ctx.render("transactions.html", transactions=body["items"], filters=filters,
                      paging=paging(ctx, body["total"], page, size, filters), export=query_string(filters))


async def transactions_export(ctx):
    response = await ctx.resource.app.api_resource.dispatch(
        ctx.request, ctx.session.caller, "GET", "/exports/transactions",
        {k: v for k, v in _api_dates(_transaction_filters(ctx)).items() if v})
    if response.status != 200:
        raise PageError(response.status, (response.body or {}).get("error", {}).get("message", "Export failed"))
    response.headers.setdefault("Content-Disposition", 'attachment; filename="transactions.csv"')
    response.headers["Cache-Control"] = "no-store"
    ctx.resource.app.api_resource.write(response, ctx.request)
    return Reply(written=True)


async def transaction(ctx):
    transaction_id = ctx.params["transaction_id"]
    body = await ctx.read(f"/transactions/{seg(transaction_id)}")
    samples = [(format_datetime(row["timestamp"]) if not isinstance(row["timestamp"], str) else row["timestamp"],
                row.get("measurand"), row.get("unit"), row.get("value"), row.get("phase"))
               for row in body.get("meter_values") or ()]
    series = meter_points(samples)
    return ctx.render("transaction.html", transaction=body, series_json=json_for_script(series),
                      samples=len(samples))


# -- id tags --------------------------------------------------------------------------------------


async def id_tags(ctx):
    size = ctx.resource.plugin.page_size
    page = page_number(ctx)
    filters = {"search": ctx.arg("search"), "status": ctx.arg("status")}
    if filters["status"] not in ID_TAG_STATUSES:
        filters["status"] = ""
    body = await ctx.read("/id-tags", {**filters, "limit": size, "offset": (page - 1) * size})
    return ctx.render("id_tags.html", id_tags=body["items"], filters=filters, statuses=ID_TAG_STATUSES,
                      paging=paging(ctx, body["total"], page, size, filters))


async def id_tag_create(ctx):
    body = {"id_tag": ctx.field("id_tag")}
    if ctx.field("status") in ID_TAG_STATUSES:
        body["status"] = ctx.field("status")
    if ctx.field("parent_id_tag"):
        body["parent_id_tag"] = ctx.field("parent_id_tag")
    if ctx.field("expiry_date"):
        body["expiry_date"] = _day_or_time(ctx.field("expiry_date"))
    status, answer = await ctx.api("POST", "/id-tags", body=body)
    show_answer(ctx, f"Add id tag {body['id_tag']}", status, answer)
    return redirect(safe_return_path(ctx.field("return_to"), PREFIX + "id-tags"))


def _day_or_time(value: str) -> str:
    return value + "T00:00:00Z" if len(value) == 10 else _utc_if_naive(value)


def _utc_if_naive(value: str) -> str:
    """A date-time typed where the form says UTC, with its Z added when it has no offset (the API refuses
    a date-time without one)."""
    value = value.strip()
    return value + "Z" if "T" in value.upper() and not has_offset(value) else value


async def id_tag_change(ctx):
    id_tag = ctx.params["id_tag"]
    action = ctx.field("action")
    if action == "block":
        body, title = {"status": "Blocked"}, f"Block {id_tag}"
    elif action == "unblock":
        body, title = {"status": "Accepted"}, f"Unblock {id_tag}"
    elif action == "expire":
        body, title = {"expiry_date": format_datetime(ctx.resource.app.now())}, f"Expire {id_tag}"
    elif action == "parent":
        body, title = {"parent_id_tag": ctx.field("parent_id_tag") or None}, f"Set parent of {id_tag}"
    else:
        raise PageError(400, "Choose block, unblock, expire or parent")
    status, answer = await ctx.api("PATCH", f"/id-tags/{seg(id_tag)}", body=body)
    show_answer(ctx, title, status, answer)
    return redirect(safe_return_path(ctx.field("return_to"), PREFIX + "id-tags"))


# -- firmware and diagnostics files ---------------------------------------------------------------------


async def firmware_page(ctx):
    size = ctx.resource.plugin.page_size
    page = page_number(ctx)
    body = await ctx.read("/firmware-files", {"limit": size, "offset": (page - 1) * size})
    rollout = await ctx.read("/firmware/status", {"limit": size})
    return ctx.render("firmware.html", files=body["items"], rollout=rollout,
                      paging=paging(ctx, body["total"], page, size, {}))


async def firmware_upload(ctx):
    """The page's script posts the file as the raw body (``?name=``), as the API route takes it."""
    status, answer = await ctx.api("POST", "/firmware-files", {"name": ctx.arg("name")})
    show_answer(ctx, f"Upload {ctx.arg('name')}", status, answer)
    return Reply(204 if status < 300 else status, b"", {}, "text/plain; charset=utf-8")


firmware_upload.raw_body = True


async def diagnostics_download(ctx):
    response = await ctx.resource.app.api_resource.dispatch(
        ctx.request, ctx.session.caller, "GET", f"/diagnostics-files/{seg(ctx.params['file_id'])}/content")
    if response.status != 200:
        raise PageError(response.status, (response.body or {}).get("error", {}).get("message", "Download failed"))
    response.headers["Cache-Control"] = "no-store"
    ctx.resource.app.api_resource.write(response, ctx.request)
    return Reply(written=True)


def routes(resource) -> list:
    """(method, path segments under /ui/, handler, needs a session)."""
    resource.has_connector_filters = resource.has_route("GET", "/stations") and any(
        q.name == "connector_status" for r in resource.app.api_router.routes
        if r.method == "GET" and r.template == "/stations" for q in r.query)
    from .web import serve_asset

    table = [
        ("GET", (), home, True),
        ("GET", ("login",), login_page, False),
        ("POST", ("login",), login, False),
        ("POST", ("logout",), logout, True),
        ("GET", ("static", "{name}"), serve_asset, False),
        ("GET", ("events",), events, True),
        ("GET", ("stations",), stations, True),
        ("GET", ("stations", "{station_id}"), station, True),
        ("POST", ("stations", "{station_id}", "commands", "{command}"), station_command, True),
        ("GET", ("transactions",), transactions, True),
        ("GET", ("transactions.csv",), transactions_export, True),
        ("GET", ("transactions", "{transaction_id}"), transaction, True),
        ("GET", ("id-tags",), id_tags, True),
        ("POST", ("id-tags",), id_tag_create, True),
        ("POST", ("id-tags", "{id_tag}"), id_tag_change, True),
    ]
    if resource.has_route("POST", "/firmware-files"):
        table += [("GET", ("firmware",), firmware_page, True),
                  ("POST", ("firmware-files",), firmware_upload, True)]
    if resource.has_route("GET", "/diagnostics-files/{file_id}/content"):
        table.append(("GET", ("diagnostics-files", "{file_id}"), diagnostics_download, True))
    return table
