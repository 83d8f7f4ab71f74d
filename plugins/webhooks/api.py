"""The webhooks plugin's operator API: subscriptions, their delivery history, test-fire, event types."""
from __future__ import annotations

import secrets

from csms.api.errors import ApiError, not_found, unprocessable
from csms.api.resource import Response, paginated
from csms.api.router import PAGINATION, Path, Query
from csms.api.types import ANY_OBJECT, BOOLEAN, DATE_TIME, TEXT, array, columns, nullable, page, record

from .guard import MAX_URL_LENGTH, ReceiverRefused, check_url
from .store import ALL_TYPES, STATES
from .tables import deliveries, subscriptions

EVENT_TYPES = {"type": "array", "minItems": 1, "maxItems": 100, "uniqueItems": True,
               "items": {"type": "string", "minLength": 1, "maxLength": 64},
               "description": "Event type names (GET /webhook-event-types), or \"*\" for every type that is not "
                              "opt-in"}
SECRET = {"type": "string", "minLength": 16, "maxLength": 128,
          "description": "The HMAC-SHA256 key (16-128 characters); generated when not given. Shown once."}
URL = {"type": "string", "minLength": 1, "maxLength": MAX_URL_LENGTH, "description": "http:// or https:// receiver"}
DESCRIPTION = {"type": ["string", "null"], "maxLength": 500}

CREATE = {
    "type": "object", "additionalProperties": False, "required": ["url", "event_types"],
    "properties": {"url": URL, "event_types": EVENT_TYPES, "secret": SECRET, "description": DESCRIPTION,
                   "paused": {"type": "boolean", "description": "Create it paused (default false)"}},
}
UPDATE = {
    "type": "object", "additionalProperties": False, "minProperties": 1,
    "properties": {"url": URL, "event_types": EVENT_TYPES, "secret": SECRET, "description": DESCRIPTION,
                   "paused": {"type": "boolean", "description": "true pauses deliveries, false resumes them"}},
}

# -- what the routes answer --------------------------------------------------------------------------

#: Not shown: the secret (but once, SUBSCRIPTION_CREATED), and where the subscription starts in the events
#: read from stored rows (the deliverer's business).
_HIDDEN = ("secret", "derived_from")
_SUBSCRIPTION_FIELDS = {**columns(subscriptions, *(c.name for c in subscriptions.c if c.name not in _HIDDEN)),
                        "event_types": array(TEXT)}
SUBSCRIPTION = record(_SUBSCRIPTION_FIELDS, title="WebhookSubscription")
SUBSCRIPTION_CREATED = record({**_SUBSCRIPTION_FIELDS, "secret": dict(TEXT, description="Shown this once")})
EVENT = record({"id": dict(TEXT, description="The idempotency id: the same on every attempt"), "type": TEXT,
                "created_at": DATE_TIME, "data": ANY_OBJECT}, title="WebhookEvent")
DELIVERY = record({**columns(deliveries, *(c.name for c in deliveries.c if c.name != "body")), "event": EVENT,
                   "next_attempt_at": nullable(dict(DATE_TIME, description="null once delivered or dead"))},
                  title="WebhookDelivery")
EVENT_TYPE = record({"name": TEXT, "description": TEXT, "opt_in": dict(BOOLEAN, description="Sent only to "
                     "subscriptions that name it"), "owner": TEXT, "example": ANY_OBJECT}, title="WebhookEventType")
EVENT_TYPE_LIST = record({"items": array(EVENT_TYPE), "total": {"type": "integer"}})

SUBSCRIPTION_ID = Path("subscription_id", "integer", minimum=1, resource="webhook")
TEST_EVENT = "webhook.test"


def add_routes(plugin, app, router):
    store = plugin.store

    def check_types(types: list) -> list:
        unknown = [name for name in types if name != ALL_TYPES and name not in app.outbox.types]
        if unknown:
            raise unprocessable(f"Unknown event types: {', '.join(unknown)}", "unknown_event_type",
                                known=sorted(app.outbox.types))
        return types

    async def check_receiver(url: str) -> None:
        try:
            _, host, port = check_url(url)
            await plugin.guard.allowed_addresses(host, port)
        except ReceiverRefused as exc:
            raise unprocessable(exc.message, exc.code, url=url)

    async def existing(subscription_id: int) -> dict:
        row = await store.get(subscription_id)
        if row is None:
            raise not_found("webhook", subscription_id)
        return row

    async def create(request):
        body = request.body
        check_types(body["event_types"])
        await check_receiver(body["url"])
        if await store.count() >= plugin.settings_values["max_subscriptions"]:
            raise ApiError(409, "too_many_webhooks", "The most subscriptions allowed exist already "
                           "([plugin:webhooks] max_subscriptions)")
        secret = body.get("secret") or secrets.token_urlsafe(32)
        row = await store.create(body["url"], body["event_types"], secret, body.get("description"),
                                 body.get("paused", False))
        await plugin.subscriptions_changed()
        return Response(201, dict(row, secret=secret), {"Location": f"/api/v1/webhooks/{row['id']}"})

    async def list_webhooks(request):
        limit, offset = request.page()
        total, rows = await store.list(limit, offset)
        return paginated(rows, total, limit, offset)

    async def get_webhook(request):
        return await existing(request.params["subscription_id"])

    async def update_webhook(request):
        subscription_id, body = request.params["subscription_id"], dict(request.body)
        await existing(subscription_id)
        if "event_types" in body:
            check_types(body["event_types"])
        if "url" in body:
            await check_receiver(body["url"])
        row = await store.update(subscription_id, **body)
        if row is None:
            raise not_found("webhook", subscription_id)
        await plugin.subscriptions_changed()
        if body.get("paused") is False:
            plugin.poke()
        return row

    async def delete_webhook(request):
        subscription_id = request.params["subscription_id"]
        if not await store.delete(subscription_id):
            raise not_found("webhook", subscription_id)
        await plugin.subscriptions_changed()
        return Response(204)

    async def test_fire(request):
        subscription_id = request.params["subscription_id"]
        delivery = await store.add_test_delivery(subscription_id, TEST_EVENT, {"subscription_id": subscription_id})
        if delivery is None:
            raise not_found("webhook", subscription_id)
        plugin.poke()
        return Response(202, delivery)

    async def history(request):
        subscription_id = request.params["subscription_id"]
        await existing(subscription_id)
        limit, offset = request.page()
        total, rows = await store.deliveries(subscription_id, limit, offset, request.query.get("state"))
        return paginated(rows, total, limit, offset)

    async def event_types(request):
        items = [{"name": t.name, "description": t.description, "opt_in": t.opt_in, "owner": t.owner,
                  "example": t.example} for t in sorted(app.outbox.types.values(), key=lambda t: t.name)]
        return {"items": items, "total": len(items)}

    tags = ("webhooks",)
    one = {"404": "Unknown webhook subscription"}
    router.add("POST", "/webhooks", create, "Subscribe a receiver URL to event types", tags=tags,
               operation_id="create_webhook", body=CREATE, response=SUBSCRIPTION_CREATED,
               description="201 with the subscription and its `secret`, shown this once (generated when not "
                           "given). 422: an unknown event type, a URL that is not http(s), or a receiver "
                           "resolving to a private, loopback, link-local or multicast address that "
                           "[plugin:webhooks] allow_private_networks does not allow.",
               responses={"201": "Created", "409": "Too many subscriptions", "422": "Refused URL or event type"})
    router.add("GET", "/webhooks", list_webhooks, "Webhook subscriptions (secrets are never shown again)",
               tags=tags, operation_id="list_webhooks", query=PAGINATION, response=page(SUBSCRIPTION),
               responses={"200": "OK"})
    router.add("GET", "/webhooks/{subscription_id}", get_webhook, "One webhook subscription", tags=tags,
               operation_id="get_webhook", path=(SUBSCRIPTION_ID,), response=SUBSCRIPTION, responses=dict(one, **{"200": "OK"}))
    router.add("PATCH", "/webhooks/{subscription_id}", update_webhook,
               "Change a subscription: pause (`paused`: true), resume (false), URL, event types, secret",
               tags=tags, operation_id="update_webhook", path=(SUBSCRIPTION_ID,), body=UPDATE, response=SUBSCRIPTION,
               description="A paused subscription keeps collecting its events and delivers them once resumed "
                           "(each is dead-lettered once older than [plugin:webhooks] dead_letter_after).",
               responses=dict(one, **{"200": "OK", "422": "Refused URL or event type"}))
    router.add("DELETE", "/webhooks/{subscription_id}", delete_webhook,
               "Delete a subscription with its delivery history (pending deliveries are dropped)", tags=tags,
               operation_id="delete_webhook", path=(SUBSCRIPTION_ID,), responses=dict(one, **{"204": "Deleted"}))
    router.add("POST", "/webhooks/{subscription_id}/test", test_fire,
               f"Send a `{TEST_EVENT}` event to this subscription now", tags=tags, operation_id="test_webhook",
               path=(SUBSCRIPTION_ID,), body={"type": "object", "additionalProperties": False, "properties": {}},
               body_required=False,
               description="202 with the queued delivery: its outcome shows in the delivery history. A "
                           "paused subscription gets it once resumed.",
               response=DELIVERY, responses=dict(one, **{"202": "Queued"}))
    router.add("GET", "/webhooks/{subscription_id}/deliveries", history,
               "The subscription's deliveries, newest first: state, attempts, last status code and error",
               tags=tags, operation_id="list_webhook_deliveries", path=(SUBSCRIPTION_ID,),
               query=PAGINATION + (Query("state", enum=STATES),), response=page(DELIVERY), responses=dict(one, **{"200": "OK"}))
    router.add("GET", "/webhook-event-types", event_types, "Every event type a subscription may name, with "
               "an example payload", tags=tags, operation_id="list_webhook_event_types", response=EVENT_TYPE_LIST,
               responses={"200": "OK"})
