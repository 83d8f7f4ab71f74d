"""Webhooks: events from the outbox (csms.outbox) delivered to operators' HTTP receivers, signed."""
from .plugin import WebhooksPlugin

plugin = WebhooksPlugin
