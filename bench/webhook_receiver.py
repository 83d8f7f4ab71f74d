"""A webhook receiver for bench/webhooks.py: answers every POST with 204 at once and counts them.

GET /stats answers {"posts", "events", "first_at", "last_at"} (times from time.monotonic()). It checks
nothing: the benchmark measures the sender. 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import json
import time

from twisted.internet import reactor
from twisted.web import resource, server


#: A batch's body: {"id":...,"type":"meter_values.batch",...,"data":{"events":[<event>, ...]}}.
BATCH_HEAD = b'"type":"meter_values.batch"'
BATCHED_EVENT = b'"type":"meter_values.received"'


class Counter(resource.Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.stats = {"posts": 0, "events": 0, "first_at": None, "last_at": None}

    def render_POST(self, request):
        # Counted without parsing: the receiver shares a core with the load generator, whose latencies are
        # the measurement, and a real receiver runs elsewhere. The sender writes compact JSON (orjson).
        body = request.content.read()
        stats = self.stats
        stats["posts"] += 1
        stats["events"] += body.count(BATCHED_EVENT) if body.startswith(BATCH_HEAD, body.index(b',') + 1) else 1
        stats["last_at"] = time.monotonic()
        if stats["first_at"] is None:
            stats["first_at"] = stats["last_at"]
        request.setResponseCode(204)
        return b""

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.stats).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    reactor.listenTCP(args.port, server.Site(Counter()), interface="127.0.0.1", backlog=1024)
    reactor.run()


if __name__ == "__main__":
    main()
