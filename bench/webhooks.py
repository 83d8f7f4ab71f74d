"""Webhook delivery beside OCPP traffic: what delivering ~1,000 events/s costs OCPP latency.

Runs of the same fixed-rate OCPP load (stations sending MeterValues for a running transaction, each
one event ``meter_values.received``), each on a fresh CSMS:

* ``baseline``: the webhooks plugin enabled, no subscription (events are not even written);
* ``webhooks-unbatched``: ``--subscriptions`` K subscriptions to meter values,
  ``meter_values_batch_size = 1``: one signed POST per event and subscription to a receiver process on
  loopback, K x rate deliveries per second;
* ``webhooks-batched``: the same with the shipped batch size (100 events per POST);
* ``webhooks-nice-only``: the same with ``worker_policy = normal`` (the worker at ``worker_nice``, not
  SCHED_IDLE);
* ``outbox-only``: the events written, nobody delivering them; ``webhooks-in-process``: delivery on the
  CSMS's reactor.

The OCPP rate is kept at what the machine sustains without webhooks; K multiplies the deliveries.
Reports OCPP latency (p50/p99, from the load generator), events and POSTs the receiver got during the
window, and how long the backlog took to drain after it.

    .venv/bin/python bench/webhooks.py [--rate 250] [--subscriptions 4] [--stations 100] [--duration 20]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402  (bench/run.py: servers, load generator, PostgreSQL schemas)

#: run -> (meter_values_batch_size or None for no subscription, [plugin:webhooks] delivery, worker_policy)
RUNS = {"baseline": (None, "worker", "idle"), "outbox-only": (100, "external", "idle"),
        "webhooks-unbatched": (1, "worker", "idle"), "webhooks-batched": (100, "worker", "idle"),
        "webhooks-nice-only": (100, "worker", "normal"), "webhooks-in-process": (100, "in-process", "idle"),
        "webhooks-delivery-file-in-memory": (100, "worker", "idle")}
#: An experiment, SQLite only: the delivery file (and its WAL) on tmpfs, through a symbolic link SQLite
#: follows, so that the worker's writes never reach the disk the OCPP commits sync to.
IN_MEMORY_DELIVERY_FILE = "webhooks-delivery-file-in-memory"
#: --alternate --held: the window whose events are written with the worker stopped (delivered after it).
HELD = "outbox-held"


def http_json(method: str, url: str, token: str | None = None, body: dict | None = None) -> dict:
    request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode())
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), robust to what else the machine runs."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_pids() -> list[int]:
    """Every ``postgres`` process of this machine (servers and their backends)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/comm") as f:
                    if f.read().strip() == "postgres":
                        pids.append(int(name))
            except OSError:
                continue
    return pids


def local_postgres_cpu_seconds() -> float | None:
    """User + system CPU time of this machine's PostgreSQL servers so far, backends that ended included:
    every ``postgres`` process's own, plus what each postmaster (a ``postgres`` process whose parent is not
    one) collected from the children it reaped. None when no PostgreSQL runs here (a remote server)."""
    stats = {}
    for pid in postgres_pids():
        try:
            with open(f"/proc/{pid}/stat") as f:
                stats[pid] = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile: its time is in its postmaster's children's
            continue
    if not stats:
        return None
    ticks = 0
    for fields in stats.values():
        ticks += int(fields[11]) + int(fields[12])
        if int(fields[1]) not in stats:  # a postmaster: field 4 of stat (index 1 here) is the parent's pid
            ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The pids of a process's children still running (the webhook delivery worker)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


def process_written_bytes(pid: int) -> int:
    """Bytes a process has caused to be written to storage so far (Linux /proc/<pid>/io ``write_bytes``)."""
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))


def children_total(pid: int, measure) -> float:
    """``measure(child)`` summed over a process's children still running."""
    total = 0.0
    for child in children(pid):
        try:
            total += measure(child)
        except (OSError, StopIteration):
            pass
    return total


def pin_children(pid: int, cpus: set) -> None:
    """Move a process's children (the delivery worker), every thread of them, to ``cpus``."""
    for child in children(pid):
        for task in os.listdir(f"/proc/{child}/task"):
            try:
                os.sched_setaffinity(int(task), cpus)
            except OSError:
                pass


def pin_postgres(cpus: set) -> list[int]:
    """Move this machine's PostgreSQL processes to ``cpus``; backends started later inherit it from their
    postmaster. Returns those moved (none without the right to: run as root or as postgres)."""
    moved = []
    for pid in postgres_pids():
        try:
            os.sched_setaffinity(pid, cpus)
            moved.append(pid)
        except OSError:
            pass
    return moved


@contextlib.contextmanager
def csms_for(name: str, batch: int | None, delivery: str, policy: str, args):
    """A started CSMS with the webhooks plugin (``batch``: its meter_values_batch_size), its stations' id
    tags in the database; stopped and cleaned up at the end. Yields the server (run.Server)."""
    workdir = tempfile.mkdtemp(prefix=f"bench-webhooks-{name}-")
    schema = run.PostgresSchema(args.postgres) if args.postgres else None
    db_url = schema.url if schema else f"sqlite:///{os.path.join(workdir, 'csms.sqlite')}"
    memory_dir = None
    if name == IN_MEMORY_DELIVERY_FILE and schema is None:
        memory_dir = tempfile.mkdtemp(prefix="bench-webhooks-", dir="/dev/shm")
        os.symlink(os.path.join(memory_dir, "delivery.db"), os.path.join(workdir, "csms.sqlite-webhooks.db"))
    extra = (f"[plugin:webhooks]\nallow_private_networks = 127.0.0.0/8\nmeter_values_batch_size = {batch or 1}\n"
             f"delivery = {delivery}\nworker_nice = {args.worker_nice}\nworker_policy = {policy}\n")
    server = run.start_csms(workdir, schema.url if schema else None, "info", args.profile and os.path.join(
                                args.profile, f"{name}.pstats"),
                            plugins=run.BENCH_PLUGINS + ("webhooks",), extra_config=extra,
                            prefix=("taskset", "-c", "0") if args.pin else ())
    try:
        run.insert_id_tags(db_url, args.stations, "LGTAG")
        run.wait_listening(server.api_port, server.process)  # the API listens after the OCPP endpoint
        yield server
    finally:
        server.stop()
        if schema is not None:
            schema.drop()
        if memory_dir is not None:
            shutil.rmtree(memory_dir, ignore_errors=True)
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def one_run(name: str, batch: int | None, delivery: str, policy: str, args, receiver_url: str) -> dict:
    with csms_for(name, batch, delivery, policy, args) as server:
        if batch is not None:
            subscribe(server, args, receiver_url + f"/{name}")
        return window(server, name, batch is not None and delivery != "external", delivery, policy, args,
                      receiver_url)


def subscribe(server, args, url: str) -> list[int]:
    """--subscriptions subscriptions to the meter values, to the receiver: their ids."""
    return [http_json("POST", server.api_url + "/webhooks", server.token,
                      {"url": f"{url}/{k}", "event_types": ["meter_values.received"]})["id"]
            for k in range(args.subscriptions)]


def window(server, name: str, delivered: bool, delivery: str, policy: str, args, receiver_url: str,
           hold_worker: bool = False) -> dict:
    """One measurement window of the load against ``server``; with ``delivered``, then waits until the
    receiver has every event the window produced (at most 60 s). With ``hold_worker``, the CSMS's
    delivery worker is stopped (SIGSTOP) for the load and let go (SIGCONT) after it: the events are
    written during the window and delivered only after it."""
    before = http_json("GET", receiver_url + "/stats")
    if args.pin:
        pin_children(server.process.pid, {args.worker_cpu})
    scenario = {"name": f"wh-{name}", "args": ["--stations", args.stations, "--mix", "metervalues",
                                               "--mode", "rate", "--rate", args.rate,
                                               "--duration", args.duration]}
    print(f"== {name} (pid {server.process.pid})", file=sys.stderr, flush=True)
    loadavg = os.getloadavg()
    cpu_before = process_cpu_seconds(server.process.pid)
    database_cpu_before = local_postgres_cpu_seconds() if args.postgres else None
    worker_cpu_before = children_total(server.process.pid, process_cpu_seconds)
    written_before = process_written_bytes(server.process.pid)
    worker_written_before = children_total(server.process.pid, process_written_bytes)
    held = children(server.process.pid) if hold_worker else []
    for pid in held:
        os.kill(pid, signal.SIGSTOP)
    try:
        result = run.run_loadgen(server, scenario, run.workers_for(args.stations, None), server.workdir, True)
        window_end = time.monotonic()
        after = http_json("GET", receiver_url + "/stats")  # before a held worker can deliver
    finally:
        for pid in held:
            os.kill(pid, signal.SIGCONT)
    expected = result.get("window", {}).get("messages", 0) * args.subscriptions
    drained = None
    after_drain = after
    if delivered:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            after_drain = http_json("GET", receiver_url + "/stats")
            if after_drain["events"] - before["events"] >= expected:
                drained = after_drain["last_at"] - window_end
                break
            time.sleep(0.2)  # the runner polls a separate process; no test waits here
    cpu_seconds = process_cpu_seconds(server.process.pid) - cpu_before
    database_cpu_seconds = None
    if database_cpu_before is not None:
        database_cpu_seconds = local_postgres_cpu_seconds() - database_cpu_before
    worker_cpu_seconds = children_total(server.process.pid, process_cpu_seconds) - worker_cpu_before
    written_mb = (process_written_bytes(server.process.pid) - written_before) / 1e6
    worker_written_mb = (children_total(server.process.pid, process_written_bytes) - worker_written_before) / 1e6
    seconds = result.get("window", {}).get("seconds") or args.duration
    return {
        "latency_ms": result.get("latency_ms"), "throughput": result.get("window", {}).get("throughput"),
        "ocpp_messages": expected, "errors": result.get("errors", {}).get("total"),
        "server_cpu_utilisation": result.get("server", {}).get("cpu_utilisation"),
        "events_in_window_per_s": (after["events"] - before["events"]) / seconds,
        "posts_in_window_per_s": (after["posts"] - before["posts"]) / seconds,
        "events_total": after_drain["events"] - before["events"],
        "seconds_to_drain_after_window": drained,
        "loadavg": loadavg, "server_cpu_seconds": cpu_seconds, "worker_cpu_seconds": worker_cpu_seconds,
        "database_server_cpu_seconds": database_cpu_seconds,
        "server_written_mb": written_mb, "worker_written_mb": worker_written_mb,
        "delivery": delivery, "worker_policy": policy,
        # Sends the load generator made over 1 ms after their time (it was short of CPU): its latency
        # counts from the intended time, so these add to it without the CSMS being any slower.
        "late_sends": result.get("late_sends"),
        "ocpp_replies": result.get("window", {}).get("messages", 0),
    }


def alternating(args, receiver_url: str, first_round: int, rng: random.Random) -> list[dict]:
    """--alternate N: one CSMS (delivery in its worker, batches) and N pairs of windows. In each pair, in an
    order drawn at random, a ``baseline`` window without any subscription (no event is written, nothing
    is delivered) and a ``webhooks-batched`` window with --subscriptions of them (outbox and delivery),
    deleted again once the receiver has every event. Both windows of a pair share the process, its warm
    caches and the same minute: what differs is delivery, and the machine's short-term noise. Rounds are
    numbered from ``first_round``, for the pairing in repeat_summary.

    With ``--held``, each round has a third window, ``outbox-held``: the subscriptions, with the worker
    stopped during the load (the CSMS writes every event, nobody delivers one until the window ends). It
    tells the cost of writing the events from the cost of delivering them, in the same process."""
    runs = []
    kinds = ["baseline", "webhooks-batched"] + ([HELD] if args.held else [])
    with csms_for("alternate", 100, "worker", "idle", args) as server:
        for pair in range(args.alternate):
            order = list(kinds)
            rng.shuffle(order)
            for name in order:
                ids = subscribe(server, args, receiver_url + f"/alternate-{pair}") if name != "baseline" else []
                outcome = window(server, name, bool(ids), "worker", "idle", args, receiver_url,
                                 hold_worker=name == HELD)
                for subscription_id in ids:
                    http_json("DELETE", server.api_url + f"/webhooks/{subscription_id}", server.token)
                outcome["name"], outcome["round"], outcome["order"] = name, first_round + pair, order.index(name)
                runs.append(outcome)
    return runs


def repeat_summary(runs: list[dict], reference: str = "baseline") -> dict:
    """Per run name: how many, the median, min and max p99 and the median p50, and two two-sided tests of
    its p99s against the baseline's (``reference``: another run's name to compare with it instead; None for
    the reference itself or with fewer than 3 of either):

    - ``p_vs_baseline``: Mann-Whitney U, the runs as two unordered sets;
    - ``paired_p``: Wilcoxon signed-rank over the pairs --repeat interleaves (the i-th run of each name, a
      minute apart), which discounts the machine's slow swings that the unordered test counts as noise;
      ``higher_in``: in how many of those pairs the run's p99 was the higher. (With 5 pairs or fewer it
      cannot go below 0.0625: take 8 or more.)

    A p-value of 0.05 or more: no difference from the baseline that these runs can tell from the machine's
    noise; below it: a difference. "Unchanged within noise" needs both.

    A run that failed (no answer measured, or an OCPP error: a load that did not run as meant) counts in
    ``failed`` and in nothing else, nor does the run it was paired with."""
    from scipy.stats import mannwhitneyu

    p99s, p50s, rounds, p50_rounds, failed = {}, {}, {}, {}, {}
    for r in runs:
        latency = r.get("latency_ms") or {}
        if latency.get("p99") is None or r.get("errors"):
            failed[r["name"]] = failed.get(r["name"], 0) + 1
            continue
        p99s.setdefault(r["name"], []).append(latency["p99"])
        p50s.setdefault(r["name"], []).append(latency["p50"])
        index = r.get("round", len(rounds.get(r["name"], {})))
        rounds.setdefault(r["name"], {})[index] = latency["p99"]
        p50_rounds.setdefault(r["name"], {})[index] = latency["p50"]
    base = p99s.get(reference, [])
    summary = {}
    for name, values in p99s.items():
        p = paired_p = higher_in = p50_paired_p = p50_higher_in = None
        if name != reference and len(values) >= 3 and len(base) >= 3:
            p = float(mannwhitneyu(values, base, alternative="two-sided").pvalue)
            higher_in, paired_p = _paired(rounds[name], rounds[reference])
            p50_higher_in, p50_paired_p = _paired(p50_rounds[name], p50_rounds[reference])
        summary[name] = {"runs": len(values), "p99_median": statistics.median(values), "p99_min": min(values),
                         "p99_max": max(values), "p50_median": statistics.median(p50s[name]), "p_vs_baseline": p,
                         "paired_p": paired_p, "higher_in": higher_in, "p50_paired_p": p50_paired_p,
                         "p50_higher_in": p50_higher_in, "failed": failed.get(name, 0)}
    return summary


def _paired(run_rounds: dict, base_rounds: dict) -> tuple:
    """(in how many pairs the run's value was the higher, of how many; the two-sided Wilcoxon p or None)."""
    from scipy.stats import wilcoxon

    pairs = [(value, base_rounds[i]) for i, value in run_rounds.items() if i in base_rounds]
    higher_in = (sum(1 for run, baseline in pairs if run > baseline), len(pairs))
    paired_p = None
    if any(run != baseline for run, baseline in pairs):
        paired_p = float(wilcoxon([run for run, _ in pairs], [baseline for _, baseline in pairs],
                                  alternative="two-sided").pvalue)
    return higher_in, paired_p


def markdown(results: dict, args) -> str:
    lines = [f"Fixed rate {args.rate} msg/s MeterValues from {args.stations} stations for {args.duration:g} s, "
             f"{args.subscriptions} subscriptions ({results['database']}"
             + (f"; CSMS on CPU 0, worker on CPU {args.worker_cpu}" if args.pin else "")
             + (f", PostgreSQL on CPU {args.database_cpu}" if args.pin and args.database_cpu is not None else "")
             + "; load average before: "
             + f"{', '.join(f'{x:.1f}' for x in results['loadavg_before'])}).", "",
             "| run | delivery | OCPP p50 ms | OCPP p99 ms | OCPP msg/s | events/s delivered in the window | POSTs/s | "
             "drained after the window (s) | load average | CSMS CPU s | worker CPU s | database server CPU s | "
             "CPU µs per delivered event | CSMS writes MB | worker writes MB | load generator's late sends |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    baselines = [r for r in results["runs"] if r["name"] == "baseline"]
    base_per_message = None
    if baselines:
        base_per_message = (sum(r["server_cpu_seconds"] for r in baselines)
                            / max(sum(r["ocpp_replies"] for r in baselines), 1))
    fmt = (lambda v, d=1: "-" if v is None else f"{v:.{d}f}")
    for r in results["runs"]:
        per_event = None
        if base_per_message is not None and r["events_total"]:
            # What the CSMS and its worker spent beyond the same OCPP traffic without webhooks, per event.
            extra = r["server_cpu_seconds"] + r.get("worker_cpu_seconds", 0) - base_per_message * r["ocpp_replies"]
            per_event = extra / r["events_total"] * 1e6
        lat = r.get("latency_ms") or {}
        lines.append(f"| {r['name']} | {r.get('delivery', '-')} | {fmt(lat.get('p50'), 2)} | {fmt(lat.get('p99'), 2)} | "
                     f"{fmt(r['throughput'], 0)} | {fmt(r['events_in_window_per_s'], 0)} | "
                     f"{fmt(r['posts_in_window_per_s'], 0)} | {fmt(r['seconds_to_drain_after_window'], 2)} | "
                     f"{r['loadavg'][0]:.1f} | {fmt(r['server_cpu_seconds'], 1)} | "
                     f"{fmt(r.get('worker_cpu_seconds'), 1)} | {fmt(r.get('database_server_cpu_seconds'), 1)} | "
                     f"{fmt(per_event, 0)} | "
                     f"{fmt(r.get('server_written_mb'), 1)} | {fmt(r.get('worker_written_mb'), 1)} | "
                     f"{fmt(r.get('late_sends'), 0)} |")
    names = list(dict.fromkeys(r["name"] for r in results["runs"]))
    if any(sum(1 for r in results["runs"] if r["name"] == name) > 1 for name in names):
        lines += ["", "| run | runs | OCPP p99 ms, median | min | max | OCPP p50 ms, median | p99 vs baseline: "
                  "Mann-Whitney p | p99 above the baseline's in (pairs) | paired: Wilcoxon p | "
                  "p50 above the baseline's in (pairs) | p50 paired: Wilcoxon p | failed runs (left out) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = list(repeat_summary(results["runs"]).items())
        if any(r["name"] == HELD for r in results["runs"]):  # delivery against the same events held back
            rows += [(f"{name} vs {HELD}", row) for name, row in repeat_summary(results["runs"], HELD).items()
                     if name == "webhooks-batched"]
        for name, row in rows:
            higher = "-" if row["higher_in"] is None else "{} of {}".format(*row["higher_in"])
            p50_higher = "-" if row["p50_higher_in"] is None else "{} of {}".format(*row["p50_higher_in"])
            lines.append(f"| {name} | {row['runs']} | {row['p99_median']:.1f} | {row['p99_min']:.1f} | "
                         f"{row['p99_max']:.1f} | {row['p50_median']:.1f} | {fmt(row['p_vs_baseline'], 2)} | "
                         f"{higher} | {fmt(row['paired_p'], 2)} | {p50_higher} | {fmt(row['p50_paired_p'], 3)} | "
                         f"{row['failed']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Webhook delivery throughput and its cost on OCPP latency.")
    parser.add_argument("--rate", type=int, default=250)
    parser.add_argument("--subscriptions", type=int, default=4)
    parser.add_argument("--stations", type=int, default=100)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--postgres", metavar="URL")
    parser.add_argument("--pin", action="store_true",
                        help="the CSMS on CPU 0; the load generator and the receiver on CPU 1 (a machine whose "
                             "CSMS has a core to itself; 2 CPUs or more); its delivery worker on --worker-cpu")
    parser.add_argument("--worker-cpu", type=int, choices=(0, 1), default=1,
                        help="with --pin: the delivery worker beside the CSMS (0: the server's core) or beside "
                             "the load generator (1, the default)")
    parser.add_argument("--database-cpu", type=int, choices=(0, 1),
                        help="with --pin and a PostgreSQL on this machine: its processes on this CPU (1: beside "
                             "the load generator, so that the CSMS's core is its own), put back on every CPU "
                             "at the end; by default they are left where the system puts them")
    parser.add_argument("--worker-nice", type=int, default=10, help="[plugin:webhooks] worker_nice")
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS))
    parser.add_argument("--alternate", type=int, metavar="N",
                        help="instead of a CSMS per run: per --repeat, one CSMS and N pairs of windows, each pair "
                             "a baseline window and a webhooks-batched one in a random order (see alternating())")
    parser.add_argument("--held", action="store_true",
                        help="with --alternate: a third window per round, outbox-held (events written, the worker "
                             "stopped until the window ends)")
    parser.add_argument("--seed", type=int, help="the random order of --alternate's pairs")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the chosen runs this many times, interleaved (baseline, X, baseline, X ...)")
    parser.add_argument("--profile", metavar="DIR", help="run the CSMS under cProfile, one .pstats per run")
    parser.add_argument("--keep", action="store_true", help="keep each run's directory (the CSMS log)")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "webhooks.json"))
    args = parser.parse_args(argv)
    if args.held and not args.alternate:
        parser.error("--held: only with --alternate (a third window in each of its rounds)")
    if args.pin:
        os.sched_setaffinity(0, {1})  # this process and what it starts: the receiver, the load generator
    every_cpu = set(range(os.cpu_count() or 1))
    if args.pin and args.database_cpu is not None:
        if not pin_postgres({args.database_cpu}):
            parser.error("--database-cpu: no PostgreSQL process here could be moved (run as root or postgres)")
    port = run.free_port()
    receiver = subprocess.Popen([sys.executable, os.path.join(HERE, "webhook_receiver.py"), "--port", str(port)])
    try:
        run.wait_listening(port, receiver)
        receiver_url = f"http://127.0.0.1:{port}"
        results = {"database": "postgresql" if args.postgres else "sqlite", "loadavg_before": os.getloadavg(),
                   "pinned": args.pin, "worker_cpu": args.worker_cpu if args.pin else None,
                   "database_cpu": args.database_cpu if args.pin else None,
                   "alternate": args.alternate,
                   "rate": args.rate, "subscriptions": args.subscriptions, "stations": args.stations,
                   "duration": args.duration, "runs": []}
        rng = random.Random(args.seed)
        for round_index in range(max(args.repeat, 1)):
            if args.alternate:
                results["runs"] += alternating(args, receiver_url, round_index * args.alternate, rng)
                continue
            for name, (batch, delivery, policy) in RUNS.items():
                if args.only and name not in args.only:
                    continue
                outcome = one_run(name, batch, delivery, policy, args, receiver_url)
                outcome["name"], outcome["round"] = name, round_index
                results["runs"].append(outcome)
        results["loadavg_after"] = os.getloadavg()
    finally:
        run.stop(receiver)
        if args.pin and args.database_cpu is not None:
            pin_postgres(every_cpu)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    print(markdown(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
