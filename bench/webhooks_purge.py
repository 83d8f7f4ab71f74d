"""The hourly purge of the webhook delivery history, by the size of the history: it should cost what it
deletes, not what is kept.

Builds an SQLite delivery file (the tables and indexes the delivery worker's file has) holding
``--days`` days of history, ``--deliveries`` rows spread evenly over them (4 subscriptions, one event
per 4 deliveries, as batches of meter values are), then times one purge the way the worker runs it
(WebhookStore.expire: the finished deliveries past the retention, their events left without a delivery,
and the look for deliveries of deleted subscriptions), with the retention ending ``--expired-hours``
into the history: the hour that expired since the last purge, in steady state.

    .venv/bin/python bench/webhooks_purge.py [--deliveries 1000000 100000] [--days 8] [--expired-hours 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

from sqlalchemy import create_engine, insert, select

from csms_plugins.webhooks import store as webhooks_store
from csms_plugins.webhooks.tables import deliveries, delivery_metadata, events, subscriptions

SUBSCRIPTIONS = (1, 2, 3, 4)
NOW = datetime(2026, 12, 2, tzinfo=timezone.utc)


def build(path: str, count: int, days: float) -> None:
    engine = create_engine(f"sqlite:///{path}")
    delivery_metadata.create_all(engine)
    span = days * 86400
    events_count = count // len(SUBSCRIPTIONS)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE webhooks_subscriptions (id INTEGER PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO webhooks_subscriptions VALUES " + ",".join(f"({s})" for s in SUBSCRIPTIONS))
        made, held = [], []
        for i in range(events_count):
            at = NOW - timedelta(seconds=span * (1 - i / events_count))
            event_id = f"event-{i:010d}"
            made.append({"event_id": event_id, "body": "z1:" + "x" * 40, "created_at": at})
            held += [{"subscription_id": s, "event_id": event_id, "event_type": "meter_values.batch",
                      "state": "delivered", "attempts": 1, "created_at": at, "next_attempt_at": at,
                      "finished_at": at} for s in SUBSCRIPTIONS]
            if len(held) >= 20_000 or i == events_count - 1:
                conn.execute(insert(events), made)
                conn.execute(insert(deliveries), held)
                made, held = [], []
    engine.dispose()


def purge(path: str, before: datetime) -> tuple[float, int]:
    """One purge as WebhookStore.expire makes it (no budget): (seconds, deliveries deleted)."""
    engine = create_engine(f"sqlite:///{path}")
    plan = webhooks_store._PURGES["sqlite"]
    with engine.begin() as conn:
        started = time.perf_counter()
        deleted, _ = plan.run(conn, plan.finished, {"before": before}, 10 ** 12)
        existing = set(conn.execute(select(subscriptions.c.id)).scalars())
        after = -1
        while (named := conn.execute(plan.next_subscription, {"after": after}).scalar()) is not None:
            if named not in existing:
                deleted += plan.run(conn, plan.of_subscription, {"subscription": named}, 10 ** 12)[0]
            after = named
        elapsed = time.perf_counter() - started
    engine.dispose()
    return elapsed, deleted


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--days", type=float, default=8.0)
    parser.add_argument("--expired-hours", type=float, default=1.0)
    parser.add_argument("--output", help="write the results here (JSON)")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-purge-") as workdir:
        for count in args.deliveries:
            path = os.path.join(workdir, f"history-{count}.db")
            build(path, count, args.days)
            before = NOW - timedelta(days=args.days) + timedelta(hours=args.expired_hours)
            seconds, deleted = purge(path, before)
            results.append({"deliveries": count, "days": args.days, "deleted": deleted, "seconds": seconds,
                            "file_mb": os.path.getsize(path) / 1e6})
            os.remove(path)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"expired_hours": args.expired_hours, "runs": results}, f, indent=2)
    print(f"One purge of {args.expired_hours:g} h expired out of {args.days:g} days of history (SQLite):\n")
    print("| deliveries in the history | file MB | deleted | purge s |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['deliveries']:,} | {r['file_mb']:.0f} | {r['deleted']:,} | {r['seconds']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
