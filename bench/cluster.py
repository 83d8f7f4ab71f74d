#!/usr/bin/env python3
"""The cluster benchmark: three ``twistd csms`` nodes on one PostgreSQL behind HAProxy (etc/haproxy.cfg),
N stations with a mixed load, one node killed with SIGKILL mid-run (docs/benchmarks.md, "Cluster").

1. Starts the cluster (csms.testing.cluster: loopback only) on a fresh schema of ``--database``.
2. Times operator API calls (``POST /stations/{id}/calls/GetConfiguration``) for probe stations, sent
   to the node holding the station (local) and to another node (forwarded; 409 without cluster mode),
   on the idle cluster and again under load (from the window's start until the kill).
3. Runs bench/loadgen.py through HAProxy: ``--stations`` stations, the ``cluster`` mix (Heartbeat,
   Authorize, StatusNotification, transactions with MeterValues) at ``--rate`` messages/s for
   ``--duration`` seconds; stations reconnect by themselves; ``--kill-at`` seconds into the window the
   load generator kills one node with SIGKILL.
4. Compares what the load generator saw confirmed with the database: every confirmed transaction,
   StopTransaction and MeterValues sample must be there (``lost`` must be 0).

Results: ``bench/results/cluster.json`` (``--output``) and a summary on stderr.

    .venv/bin/python bench/cluster.py --database postgresql+psycopg://csms:csms@127.0.0.1/csms_bench
    .venv/bin/python bench/cluster.py --stations 30 --duration 6 --kill-at 2    # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
LOADGEN = os.path.join(ROOT, "bench", "loadgen.py")
sys.path.insert(0, os.path.dirname(LOADGEN))
import loadgen  # noqa: E402 - the statistics and /proc readers are shared with the load generator


def parse_args(argv):
    p = argparse.ArgumentParser(description="Three CSMS nodes behind HAProxy: load, forwarded calls, a node killed.")
    p.add_argument("--database", default=os.environ.get("CSMS_BENCH_POSTGRES_URL") or os.environ.get(
        "CSMS_TEST_POSTGRES_URL"), help="PostgreSQL URL (default $CSMS_BENCH_POSTGRES_URL, else $CSMS_TEST_POSTGRES_URL); "
        "the bench works in a schema of its own there, dropped at the end, unless the URL sets search_path")
    p.add_argument("--stations", type=int, default=3000, help="simulated stations (default %(default)s)")
    p.add_argument("--duration", type=float, default=60.0, help="measurement window in seconds (default %(default)s)")
    p.add_argument("--rate", type=float, default=300.0, help="total OCPP messages per second (default %(default)s)")
    p.add_argument("--kill-at", type=float, default=None,
                   help="seconds into the window at which one node is killed (default: a third of --duration)")
    p.add_argument("--no-kill", action="store_true", help="no node killed")
    p.add_argument("--forward-samples", type=int, default=50,
                   help="API calls timed per kind (local, forwarded) (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="load generator processes (default %(default)s)")
    p.add_argument("--pool-size", type=int, default=4, help="[database] pool_size of each node (default %(default)s)")
    p.add_argument("--output", default=os.path.join(ROOT, "bench", "results", "cluster.json"))
    p.add_argument("--keep", action="store_true", help="keep the nodes' directories (configs, logs)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if not args.database or not args.database.startswith(("postgresql", "postgres")):
        p.error("--database: a PostgreSQL URL (cluster mode needs PostgreSQL)")
    if args.kill_at is None:
        args.kill_at = args.duration / 3
    return args


def fresh_schema(url: str):
    """(the URL to give the nodes, a function dropping what was made) for a schema of the bench's own."""
    from sqlalchemy import create_engine

    if "search_path" in url:
        return url, lambda: None
    schema = "bench_cluster_" + uuid.uuid4().hex[:10]
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")

    def drop():
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        engine.dispose()
    return url + ("&" if "?" in url else "?") + f"options=-csearch_path%3D{schema}", drop


# -- forwarded against local API calls ---------------------------------------------------------------------


async def connect_probes(cluster) -> list:
    """Test stations (they answer GetConfiguration) through HAProxy until one is on each node:
    [(station id, node, station)]."""
    from twisted.internet import reactor

    from csms.testing.station import connect_station

    probes = []
    for i in range(len(cluster.nodes) * 4):
        if len(probes) == len(cluster.nodes):
            break
        station = await connect_station(reactor, cluster.ocpp_port, f"PROBE-{i}", timeout=60)
        await station.boot()
        node = await cluster.holder(f"PROBE-{i}")
        if node is not None and node.name not in {p[1].name for p in probes}:
            probes.append((f"PROBE-{i}", node, station))
        else:
            await station.close()
    return probes


async def time_api_calls(cluster, probes: list, samples: int, until: float | None = None) -> dict:
    """GetConfiguration for the probe stations, sent to the node holding each (local) and to another
    (forwarded), ``samples`` of each or as many as fit before ``until`` (time.monotonic())."""
    timings: dict[str, list] = {"local": [], "forwarded": []}
    codes: dict[str, dict] = {"local": {}, "forwarded": {}}
    for n in range(samples):
        if until is not None and time.monotonic() > until:
            break
        station_id, holder, _ = probes[n % len(probes)]
        others = [node for node in cluster.nodes if node is not holder and node.alive]
        other = others[n % len(others)]
        for kind, node in (("local", holder), ("forwarded", other)):
            started = time.perf_counter()
            try:
                code, _ = await cluster.api("POST", f"/stations/{station_id}/calls/GetConfiguration", json={},
                                            node=node, timeout=60)
            except Exception as exc:  # noqa: BLE001 - a node killed mid-call: counted, not fatal
                code = f"no answer ({type(exc).__name__})"
            else:
                timings[kind].append(int((time.perf_counter() - started) * 1e6))
            codes[kind][str(code)] = codes[kind].get(str(code), 0) + 1
    return {kind: {"latency_ms": loadgen.latency_summary(timings[kind]), "status_codes": codes[kind]}
            for kind in timings}


# -- what was confirmed against what is stored -----------------------------------------------------------


def parse_timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def compare_with_database(url: str, confirmed: dict) -> dict:
    """Every transaction, stop and MeterValues sample the load generator saw confirmed, looked up."""
    from sqlalchemy import create_engine, select

    from csms_plugins.core.tables import meter_values, transactions

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            stored = {row.id: row for row in conn.execute(
                select(transactions.c.id, transactions.c.station_id, transactions.c.stopped_at))}
            samples = {(row.transaction_id, row.timestamp) for row in conn.execute(
                select(meter_values.c.transaction_id, meter_values.c.timestamp).where(
                    meter_values.c.transaction_id.is_not(None),
                    meter_values.c.measurand == "Energy.Active.Import.Register"))}
    finally:
        engine.dispose()
    lost = {"transactions": 0, "stops": 0, "meter_values": 0}
    for key, entry in confirmed.items():
        row = stored.get(int(key))
        if row is None or row.station_id != entry["station"]:
            lost["transactions"] += 1
            continue
        if entry["stopped"] and row.stopped_at is None:
            lost["stops"] += 1
        lost["meter_values"] += sum((int(key), parse_timestamp(t)) not in samples for t in entry["samples"])
    return {"checked": {"transactions": len(confirmed), "stops": sum(e["stopped"] for e in confirmed.values()),
                        "meter_values": sum(len(e["samples"]) for e in confirmed.values())},
            "lost": lost, "lost_total": sum(lost.values())}


# -- the run ----------------------------------------------------------------------------------------------


async def run_loadgen(args, cluster, victim, confirmed_path: str, result_path: str, during_window) -> tuple[int, str]:
    """Run the load generator; ``during_window()`` (async) runs once its window opens."""
    from twisted.internet import reactor

    from csms.testing.processes import WatchedProcess

    argv = [sys.executable, LOADGEN, "--quiet", "--announce", "--url", cluster.ocpp_url, "--stations",
            str(args.stations), "--mix", "cluster", "--mode", "rate", "--rate", str(args.rate), "--duration",
            str(args.duration), "--max-messages", "0", "--reconnect", "--call-timeout", "30", "--connect-timeout", "600",
            "--drain-timeout", "30", "--workers", str(args.workers), "--id-prefix", "CL-", "--confirmed", confirmed_path,
            "--json", result_path]
    if victim is not None:
        argv += ["--kill-pid", str(victim.process.transport.pid), "--kill-at", str(args.kill_at)]
    process = WatchedProcess(reactor, deadline=600 + args.duration + 200)
    reactor.spawnProcess(process, argv[0], argv, env=dict(os.environ), path=ROOT)
    try:
        await process.logged("loadgen: window open")
        await during_window()
        code = await process.finished()
    finally:
        process.signal("KILL")  # only if it is still running (the run failed)
    return code, process.stderr


async def bench(args) -> dict:
    from csms.testing.cluster import Cluster, cluster_settings

    url, drop = fresh_schema(args.database)
    directory = tempfile.mkdtemp(prefix="csms-bench-cluster-")
    cluster = Cluster(directory, url, nodes=3, extra_config=cluster_settings(), pool_size=args.pool_size,
                      plugins="core", deadline=120)
    result = {"config": {"stations": args.stations, "duration": args.duration, "rate": args.rate, "mix": "cluster",
                         "kill_at": None if args.no_kill else args.kill_at, "workers": args.workers,
                         "pool_size": args.pool_size, "nodes": 3},
              "load_average_before": os.getloadavg(), "cpu_count": os.cpu_count()}
    probes = []
    try:
        await cluster.start()
        probes = await connect_probes(cluster)
        result["api_calls"] = await time_api_calls(cluster, probes, args.forward_samples)
        result["api_calls"]["probes"] = {sid: node.name for sid, node, _ in probes}
        victim = None if args.no_kill else cluster.nodes[-1]
        before = {n.name: loadgen.read_proc(n.process.transport.pid) for n in cluster.nodes}
        confirmed_path = os.path.join(directory, "confirmed.json")
        load_path = os.path.join(directory, "loadgen.json")

        async def under_load():
            # Before the kill, and with the probes of the nodes that survive it.
            until = time.monotonic() + (args.duration if args.no_kill else args.kill_at) - 1
            survivors = [p for p in probes if p[1] is not victim]
            result["api_calls_under_load"] = await time_api_calls(cluster, survivors, args.forward_samples, until)
        code, err = await run_loadgen(args, cluster, victim, confirmed_path, load_path, under_load)
        after = {n.name: loadgen.read_proc(n.process.transport.pid) for n in cluster.alive_nodes()}
        if not os.path.exists(load_path):
            raise RuntimeError(f"the load generator failed ({code}): {err}")
        with open(load_path) as f:
            load = json.load(f)
        with open(confirmed_path) as f:
            confirmed = json.load(f)
        result["loadgen_exit_status"] = code
        result["load"] = {k: load[k] for k in ("stations", "connect", "window", "latency_ms", "latency_ms_by_action",
                                               "late_sends", "errors", "reconnect", "confirmed") if k in load}
        result["killed_node"] = victim.name if victim is not None else None
        result["node_cpu_seconds"] = {name: after[name]["cpu_seconds"] - before[name]["cpu_seconds"] for name in after}
        result["node_peak_rss_kib"] = {name: after[name]["peak_rss_kib"] for name in after}
        from twisted.internet import threads
        result["database_check"] = await threads.deferToThread(compare_with_database, url, confirmed)
    finally:
        for _, _, station in probes:
            station.close()
        await cluster.stop()
        result["load_average_after"] = os.getloadavg()
        drop()
        if not args.keep:
            import shutil
            shutil.rmtree(directory, ignore_errors=True)
        else:
            result["directory"] = directory
    return result


def human(result: dict) -> str:
    fmt = (lambda v: "-" if v is None else f"{v:.1f}")
    load, api, check = result["load"], result["api_calls"], result["database_check"]
    reconnect = load.get("reconnect") or {}
    return "\n".join([
        f"{load['stations']} stations through HAProxy on 3 nodes: {load['window']['messages']} replies in "
        f"{load['window']['seconds']:.1f} s = {load['window']['throughput']:.0f} msg/s; latency ms p50 "
        f"{fmt(load['latency_ms']['p50'])} p99 {fmt(load['latency_ms']['p99'])}",
        f"API GetConfiguration ms p50/p99: local {fmt(api['local']['latency_ms']['p50'])}/"
        f"{fmt(api['local']['latency_ms']['p99'])} {api['local']['status_codes']}, forwarded "
        f"{fmt(api['forwarded']['latency_ms']['p50'])}/{fmt(api['forwarded']['latency_ms']['p99'])} "
        f"{api['forwarded']['status_codes']}",
        f"under load: local {fmt(result['api_calls_under_load']['local']['latency_ms']['p50'])}/"
        f"{fmt(result['api_calls_under_load']['local']['latency_ms']['p99'])}, forwarded "
        f"{fmt(result['api_calls_under_load']['forwarded']['latency_ms']['p50'])}/"
        f"{fmt(result['api_calls_under_load']['forwarded']['latency_ms']['p99'])} "
        f"{result['api_calls_under_load']['forwarded']['status_codes']}",
        f"killed {result['killed_node']}: {reconnect.get('count', 0)} reconnects, all back "
        f"{fmt(reconnect.get('seconds_from_kill_to_last_back'))} s after the kill; errors {load['errors']['by_kind']}",
        f"confirmed and checked {check['checked']}, lost {check['lost']}; node CPU s {result['node_cpu_seconds']}; "
        f"load average {result['load_average_before']} -> {result['load_average_after']}",
    ])


def main(argv=None) -> None:
    """Exits 0 when nothing confirmed was lost, 1 otherwise (or when the run failed)."""
    args = parse_args(argv)
    from twisted.internet import defer, task

    async def run(reactor):
        result = await bench(args)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        if not args.quiet:
            sys.stderr.write(human(result) + "\n")
        if result["database_check"]["lost_total"]:
            raise RuntimeError(f"confirmed messages missing from the database: {result['database_check']['lost']}")

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
