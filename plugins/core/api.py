"""The Core profile's operator API routes (filled in by the operator API work)."""


def add_routes(plugin, app, router):
    return None
