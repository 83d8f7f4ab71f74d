"""``GET /api/v1/nodes``: the nodes of the Central System (one, unless ``[cluster] enabled``)."""
from __future__ import annotations

from csms.api.types import BOOLEAN, DATE_TIME, INTEGER, TEXT, array, nullable, record

NODE = record({
    "name": TEXT,
    "alive": dict(BOOLEAN, description="Its lease has not expired"),
    "started_at": DATE_TIME,
    "heartbeat_at": DATE_TIME,
    "lease_expires_at": dict(nullable(DATE_TIME), description="null on a single node (no lease)"),
    "stations": dict(INTEGER, description="Stations connected to it"),
    "ocpp_endpoint": nullable(TEXT),
    "api_endpoint": nullable(TEXT),
}, title="Node")
NODES = record({"items": array(NODE)}, title="Nodes")


def add_routes(app, router):
    async def list_nodes(request):
        return {"items": await app.cluster.nodes()}

    router.add("GET", "/nodes", list_nodes, "The Central System's nodes, with how many stations each holds",
               tags=("nodes",), response=NODES,
               description="One node unless [cluster] is enabled; then every node registered in the shared "
                           "database, a node whose lease expired shown with alive false until another node "
                           "clears it.")
