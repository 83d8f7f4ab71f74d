#!/usr/bin/env python3
"""Run the whole benchmark: our CSMS and the reference CSMS, side by side, on the same scenarios in one run.

    .venv/bin/python bench/run.py                      # full run, SQLite in a temporary directory
    .venv/bin/python bench/run.py --postgres postgresql+psycopg://user:pw@127.0.0.1/bench
    .venv/bin/python bench/run.py --quick              # tiny version of every scenario (harness check)

For every scenario each server is started fresh (so its peak RSS belongs to that scenario), loaded by
``bench/loadgen.py`` and stopped; the two servers alternate scenario by scenario so that a change in the
machine's load affects both alike. Writes ``bench/results/latest.json``, the results section of
``docs/benchmarks.md`` and ``bench/results/latency_vs_load.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
PLOT = os.path.join(RESULTS, "latency_vs_load.png")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SERVERS = ("csms", "reference")

#: The targets of issue 8, per scenario kind; checked against our CSMS.
CPU_TARGET_US = {"heartbeat": 100, "authorize": 100, "metervalues": 150}
THROUGHPUT_RATIO_TARGET = 4.0
RATE_P99_TARGET_MS = 10.0
STORM_SECONDS_TARGET = 60.0
STORM_KIB_PER_STATION_TARGET = 30.0


def scenarios(quick: bool) -> list[dict]:
    """Each scenario: loadgen arguments plus what it is checked against."""
    d = 1.5 if quick else 15.0
    small, large = (5, 10) if quick else (50, 500)
    out = []
    for n in (small, large):
        for mix in ("heartbeat", "authorize", "metervalues"):
            out.append({"name": f"closed-{n}-{mix}", "kind": "closed", "mix": mix, "stations": n,
                        "title": f"{n} stations, closed loop, {mix}",
                        "args": ["--stations", n, "--mix", mix, "--mode", "closed", "--duration", d],
                        "large": n == large})
    rate_n, rate = (20, 50) if quick else (1000, 1000)
    out.append({"name": f"rate-{rate_n}-at-{rate}", "kind": "rate", "mix": "mix", "stations": rate_n, "rate": rate,
                "title": f"{rate_n} stations at a fixed {rate} msg/s, mixed (Heartbeat, Authorize, transactions)",
                "args": ["--stations", rate_n, "--mix", "mix", "--mode", "rate", "--rate", rate,
                         "--duration", 2.0 if quick else 20.0]})
    storm_n, storm_rate = (50, 25) if quick else (10000, 1000)
    out.append({"name": f"storm-{storm_n}", "kind": "storm", "mix": "heartbeat", "stations": storm_n,
                "title": f"reconnect storm: {storm_n} stations connect and boot at once, then heartbeat "
                         f"({storm_rate} msg/s in total)",
                "args": ["--stations", storm_n, "--storm", "--mix", "heartbeat", "--mode", "rate",
                         "--rate", storm_rate, "--duration", 2.0 if quick else 20.0,
                         "--connect-timeout", 10.0 if quick else 120.0]})
    sweep_n = 10 if quick else 500
    for rate in ((20, 50) if quick else (250, 500, 1000, 2000, 4000)):
        out.append({"name": f"sweep-{sweep_n}-at-{rate}", "kind": "sweep", "mix": "mix", "stations": sweep_n,
                    "rate": rate, "title": f"offered-load sweep: {sweep_n} stations at {rate} msg/s, mixed",
                    "args": ["--stations", sweep_n, "--mix", "mix", "--mode", "rate", "--rate", rate,
                             "--duration", 1.5 if quick else 8.0]})
    return out


# ---------------------------------------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server not listening on 127.0.0.1:{port} after {timeout} s")


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM (twistd then writes its profile, if any), SIGKILL when it does not go."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Server:
    """One started server process; ``url`` is the loadgen's target prefix."""

    def __init__(self, name, process, port, workdir, log_path):
        self.name, self.process, self.port, self.workdir, self.log_path = name, process, port, workdir, log_path
        self.url = f"ws://127.0.0.1:{port}/ocpp/"

    def stop(self):
        stop(self.process)


#: The plugins every scenario runs with (bench/webhooks.py adds the webhooks plugin).
BENCH_PLUGINS = ("core", "firmware", "smartcharging", "reservation", "localauth", "remotetrigger")


def start_csms(workdir: str, database_url: str | None, log_level: str, profile: str | None,
               metrics: bool = True, plugins=BENCH_PLUGINS, extra_config: str = "", prefix=()) -> Server:
    port, api_port = free_port(), free_port()
    token = secrets.token_hex(16)
    db_url = database_url or f"sqlite:///{os.path.join(workdir, 'csms.sqlite')}"
    config = os.path.join(workdir, "csms.ini")
    with open(config, "w") as f:
        f.write(f"""[csms]
log_level = {log_level}
[ocpp]
# As the shipped etc/csms.ini: a listen backlog deep enough for a reconnect storm (the kernel caps it
# at net.core.somaxconn).
endpoint = tcp:{port}:interface=127.0.0.1:backlog=4096
unknown_stations = accept
# Every simulated station connects from 127.0.0.1, and the storm holds 10,000 of them at once.
max_connections = 0
max_connections_per_address = 0
[database]
url = {db_url}
# A fresh database each run: start-up migrates it.
auto_upgrade = true
[api]
endpoint = tcp:{api_port}:interface=127.0.0.1
tokens = {token}
[metrics]
# On as shipped; bench/run.py --metrics off measures what counting costs.
enabled = {"true" if metrics else "false"}
[plugins]
enabled = {", ".join(plugins)}
[plugin:firmware]
firmware_dir = {os.path.join(workdir, "firmware")}
diagnostics_dir = {os.path.join(workdir, "diagnostics")}
http_endpoint = tcp:{free_port()}:interface=127.0.0.1
ftp_endpoint = tcp:{free_port()}:interface=127.0.0.1
""" + extra_config)
    log_path = os.path.join(workdir, "csms.log")
    command = [*prefix, os.path.join(ROOT, ".venv", "bin", "twistd"), "-n", "--pidfile="]
    if profile:
        command += ["--profile", profile, "--profiler", "cprofile", "--savestats"]
    command += ["csms", "--config", config]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    server = Server("csms", process, port, workdir, log_path)
    server.api_port, server.api_url, server.token = api_port, f"http://127.0.0.1:{api_port}/api/v1", token
    try:
        wait_listening(port, process)
    except RuntimeError:
        server.stop()
        raise RuntimeError(f"our CSMS did not start; its log:\n{open(log_path).read()[-3000:]}") from None
    return server


def start_reference(workdir: str) -> Server:
    port = free_port()
    log_path = os.path.join(workdir, "reference.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, os.path.join(HERE, "reference_csms.py"), "--port", str(port)],
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    server = Server("reference", process, port, workdir, log_path)
    try:
        wait_listening(port, process)
    except RuntimeError:
        server.stop()
        raise RuntimeError(f"the reference CSMS did not start; its log:\n{open(log_path).read()[-3000:]}") from None
    return server


def insert_id_tags(database_url: str, count: int, prefix: str) -> str:
    """Accepted id tags PREFIX0..PREFIX{count-1} for the loadgen's stations, written into our CSMS's table.

    There is no bulk id-tag route in the operator API; the runner writes the rows the Core profile reads,
    after the CSMS created its tables. Returns a note for the results when that is not possible (then
    Authorize answers Invalid, which is still a complete reply).
    """
    try:
        from sqlalchemy import create_engine, delete

        from csms_plugins.core.tables import id_tags
    except ImportError as exc:
        return f"id tags not inserted ({exc}): Authorize answers Invalid"
    now = datetime.now(timezone.utc)
    rows = [{"id_tag": f"{prefix}{i}"[:20], "status": "Accepted", "created_at": now, "updated_at": now}
            for i in range(count)]
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(delete(id_tags).where(id_tags.c.id_tag.like(f"{prefix}%")))
            conn.execute(id_tags.insert(), rows)
    finally:
        engine.dispose()
    return f"{count} Accepted id tags inserted"


class PostgresSchema:
    """A fresh schema per server start, dropped afterwards: every scenario starts from empty tables."""

    def __init__(self, base_url: str):
        import uuid

        from sqlalchemy import create_engine

        self.base_url = base_url
        self.schema = "bench_" + uuid.uuid4().hex[:12]
        self.engine = create_engine(base_url)
        with self.engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {self.schema}")
        self.url = base_url + ("&" if "?" in base_url else "?") + f"options=-csearch_path%3D{self.schema}"

    def drop(self):
        with self.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {self.schema} CASCADE")
        self.engine.dispose()


# ---------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------

def workers_for(stations: int, requested: int | None) -> int:
    if requested:
        return requested
    return 1 if stations <= 100 else 2


def run_loadgen(server: Server, scenario: dict, workers: int, workdir: str, quiet: bool) -> dict:
    out = os.path.join(workdir, f"{scenario['name']}-{server.name}.json")
    command = [sys.executable, os.path.join(HERE, "loadgen.py"), "--url", server.url,
               "--server-pid", str(server.process.pid), "--workers", str(workers), "--json", out,
               "--id-prefix", f"B{scenario['name'][:6]}-"] + [str(a) for a in scenario["args"]]
    if quiet:
        command.append("--quiet")
    completed = subprocess.run(command, cwd=ROOT)
    if completed.returncode not in (0, 1):
        return {"failed": f"loadgen exited with status {completed.returncode}"}
    with open(out) as f:
        return json.load(f)


def raise_nofile_for_servers(chosen: list[dict]) -> dict:
    """The servers inherit the runner's open-files limit: raise its soft limit to the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > soft):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    new_soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    info = {"soft_before": soft, "soft": new_soft, "hard": hard}
    needed = max((s["stations"] for s in chosen), default=0) + 100
    if new_soft != resource.RLIM_INFINITY and new_soft < needed:
        info["note"] = (f"servers get at most {new_soft} open files, fewer than the {needed} the largest scenario "
                        f"needs: raise the hard limit (ulimit -Hn) to run it in full")
        print("run.py: " + info["note"], file=sys.stderr)
    return info


def run_all(args) -> dict:
    chosen = [s for s in scenarios(args.quick) if not args.only or any(o in s["name"] for o in args.only)]
    nofile = raise_nofile_for_servers(chosen)
    started = datetime.now(timezone.utc)
    results = {"generated_at": started.isoformat(timespec="seconds"), "quick": args.quick,
               "command": " ".join([".venv/bin/python", "bench/run.py"] + sys.argv[1:]),
               "database": "postgresql" if args.postgres else "sqlite", "metrics": args.metrics,
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version(), "loadavg_before": os.getloadavg(),
                           "server_nofile": nofile},
               "scenarios": []}
    for scenario in chosen:
        entry = {key: scenario[key] for key in ("name", "kind", "mix", "stations", "title") if key in scenario}
        entry["rate"] = scenario.get("rate")
        entry["large"] = scenario.get("large", False)
        entry["results"] = {}
        for name in SERVERS:
            if name == "reference" and args.skip_reference:
                continue
            workdir = tempfile.mkdtemp(prefix=f"bench-{name}-")
            schema = None
            server = None
            try:
                if name == "csms":
                    if args.postgres:
                        schema = PostgresSchema(args.postgres)
                    db_url = schema.url if schema else None
                    profile = os.path.join(args.profile, f"{scenario['name']}.pstats") if args.profile else None
                    server = start_csms(workdir, db_url, args.log_level, profile, args.metrics == "on")
                    if scenario["mix"] != "heartbeat":
                        entry["id_tags"] = insert_id_tags(
                            db_url or f"sqlite:///{os.path.join(workdir, 'csms.sqlite')}", scenario["stations"],
                            "LGTAG")
                else:
                    server = start_reference(workdir)
                print(f"== {scenario['name']} on {name} (pid {server.process.pid})", file=sys.stderr, flush=True)
                result = run_loadgen(server, scenario, workers_for(scenario["stations"], args.workers), workdir,
                                     args.quiet)
            except RuntimeError as exc:
                result = {"failed": str(exc)}
            finally:
                if server is not None:
                    server.stop()
                if schema is not None:
                    schema.drop()
                if not args.keep:
                    shutil.rmtree(workdir, ignore_errors=True)
            entry["results"][name] = result
        entry["ratios"] = ratios(entry["results"])
        results["scenarios"].append(entry)
    results["machine"]["loadavg_after"] = os.getloadavg()
    results["targets"] = check_targets(results["scenarios"])
    return results


def _get(result: dict, *path):
    for key in path:
        if not isinstance(result, dict) or result.get(key) is None:
            return None
        result = result[key]
    return result


def ratios(results: dict) -> dict:
    """Ours against the reference, from this run: >1 means ours is better."""
    ours, ref = results.get("csms", {}), results.get("reference", {})
    out = {}
    a, b = _get(ours, "window", "throughput"), _get(ref, "window", "throughput")
    if a and b:
        out["throughput"] = a / b
    a, b = _get(ours, "server", "cpu_us_per_message"), _get(ref, "server", "cpu_us_per_message")
    if a and b:
        out["cpu_per_message"] = b / a
    a, b = _get(ours, "latency_ms", "p99"), _get(ref, "latency_ms", "p99")
    if a and b:
        out["p99_latency"] = b / a
    return out


def check_targets(entries: list[dict]) -> list[dict]:
    targets = []

    def add(name, target, value, met, unit="", note=""):
        targets.append({"target": name, "wanted": target, "value": value, "unit": unit,
                        "met": None if value is None else bool(met), "note": note})

    for e in entries:
        ours = e["results"].get("csms", {})
        if e["kind"] == "closed":
            limit = CPU_TARGET_US[e["mix"]]
            cpu = _get(ours, "server", "cpu_us_per_message")
            add(f"{e['name']}: server CPU per message", f"≤ {limit} µs", cpu, cpu is not None and cpu <= limit, "µs")
            if e["large"]:
                ratio = e["ratios"].get("throughput")
                add(f"{e['name']}: throughput vs reference", f"≥ {THROUGHPUT_RATIO_TARGET:g}×", ratio,
                    ratio is not None and ratio >= THROUGHPUT_RATIO_TARGET, "×")
        elif e["kind"] == "rate":
            p99 = _get(ours, "latency_ms", "p99")
            errors = _get(ours, "errors", "total")
            add(f"{e['name']}: p99 latency", f"≤ {RATE_P99_TARGET_MS:g} ms", p99,
                p99 is not None and p99 <= RATE_P99_TARGET_MS and errors == 0, "ms",
                "" if errors == 0 else f"{errors} errors")
        elif e["kind"] == "storm":
            seconds = _get(ours, "connect", "seconds_to_all_accepted")
            errors = _get(ours, "errors", "total")
            add(f"{e['name']}: all connected and Accepted, no errors", f"≤ {STORM_SECONDS_TARGET:g} s", seconds,
                seconds is not None and seconds <= STORM_SECONDS_TARGET and errors == 0, "s",
                f"{_get(ours, 'connect', 'accepted')}/{e['stations']} Accepted, {errors} errors")
            kib = _get(ours, "server", "rss_per_station_kib")
            add(f"{e['name']}: RSS per connected station", f"≤ {STORM_KIB_PER_STATION_TARGET:g} KiB", kib,
                kib is not None and kib <= STORM_KIB_PER_STATION_TARGET, "KiB")
    return targets


# ---------------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------------

def fmt(value, digits=1):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def markdown(results: dict) -> str:
    lines = []
    if results["quick"]:
        lines += ["> **Smoke run (`--quick`), not results.** Tiny scenarios of a few stations for a few seconds,",
                  "> run while the machine was shared with other work: these numbers only show that the harness",
                  "> runs end to end. They say nothing about performance. Run the full command for results.", ""]
    m = results["machine"]
    lines += [f"Run {results['generated_at']} with `{results['command']}`; database: {results['database']}; "
              f"{m['cpus']} CPUs, {m['platform']}, Python {m['python']}; load average before "
              f"{m['loadavg_before'][0]:.2f}, after {m['loadavg_after'][0]:.2f}.", ""]
    lines += ["| Scenario | Server | Stations | msg/s | p50 ms | p90 ms | p99 ms | max ms | Errors | "
              "CPU µs/msg | Peak RSS MiB | KiB/station |",
              "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for e in results["scenarios"]:
        for name in SERVERS:
            r = e["results"].get(name, {})
            label = "ours" if name == "csms" else "reference"
            if "failed" in r:
                lines.append(f"| {e['name']} | {label} | {e['stations']} | failed: {r['failed'][:60]} "
                             f"| | | | | | | | |")
                continue
            lat = r.get("latency_ms", {})
            peak = _get(r, "server", "peak_rss_kib")
            stations = r.get("stations", e["stations"])
            if e["kind"] == "storm":
                stations = f"{_get(r, 'connect', 'accepted')}/{stations} in {fmt(_get(r, 'connect', 'seconds_to_last_accepted'), 2)} s"
            lines.append(
                f"| {e['name']} | {label} | {stations} | {fmt(_get(r, 'window', 'throughput'), 0)} | "
                f"{fmt(lat.get('p50'), 2)} | {fmt(lat.get('p90'), 2)} | {fmt(lat.get('p99'), 2)} | "
                f"{fmt(lat.get('max'), 2)} | {fmt(_get(r, 'errors', 'total'))} | "
                f"{fmt(_get(r, 'server', 'cpu_us_per_message'), 0)} | "
                f"{fmt(peak / 1024 if peak else None, 1)} | {fmt(_get(r, 'server', 'rss_per_station_kib'), 1)} |")
        if e["ratios"]:
            parts = [f"{k.replace('_', ' ')} {v:.2f}×" for k, v in e["ratios"].items()]
            lines.append(f"| {e['name']} | **ours ÷ reference** | | {'; '.join(parts)} | | | | | | | | |")
    lines += ["", "Ratios are ours against the reference in the same run (above 1: ours is better: more "
              "throughput, less CPU per message, lower p99).", "",
              "### Targets (issue 8), for our CSMS" + (" (smoke run: no verdict)" if results["quick"] else ""), "",
              "| Target | Wanted | Measured | Met |", "|---|---|--:|---|"]
    for t in results["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"| {t['target']} | {t['wanted']} | {fmt(t['value'], 2)} {t['unit']}{note} | {met} |")
    notes = [f"{e['name']}: {r['nofile']['note']}" for e in results["scenarios"]
             for r in e["results"].values() if _get(r, "nofile", "note")]
    if _get(results, "machine", "server_nofile", "note"):
        notes.insert(0, "servers: " + results["machine"]["server_nofile"]["note"])
    if notes:
        lines += ["", "Open-files limit:"] + [f"- {n}" for n in notes]
    errors = [f"{e['name']} ({'ours' if n == 'csms' else 'reference'}): {r['errors']['by_kind']}"
              for e in results["scenarios"] for n, r in e["results"].items() if _get(r, "errors", "total")]
    if errors:
        lines += ["", "Errors by kind:"] + [f"- {x}" for x in errors]
    if results.get("plot"):
        lines += ["", f"![p50 and p99 latency against offered load, both servers]({results['plot']})"]
    elif results.get("plot_note"):
        lines += ["", results["plot_note"]]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    with open(DOC) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        doc = doc.rstrip("\n") + f"\n\n## Results\n\n{BEGIN}\n{END}\n"
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(DOC, "w") as f:
        f.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def plot(results: dict, path: str = PLOT) -> str | None:
    """Latency (p50, p99) against offered load for both servers, from the rate-mode scenarios.

    Needs matplotlib (``pip install -e '.[bench]'``); the caller keeps the numbers if it is missing.
    """
    from matplotlib.figure import Figure  # no pyplot: no display, no global state

    series = {}
    for e in results["scenarios"]:
        if e["kind"] != "sweep":  # one station count, only the offered rate changes
            continue
        for name in SERVERS:
            lat = e["results"].get(name, {}).get("latency_ms") or {}
            for q in ("p50", "p99"):
                if lat.get(q) is not None and lat[q] > 0:  # a log axis has no room for 0
                    series.setdefault((name, q), []).append((e["rate"], lat[q]))
    if not series:
        return None
    figure = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    axes = figure.subplots()
    colours = {"csms": "tab:blue", "reference": "tab:red"}
    for (name, q), points in sorted(series.items()):
        rates, latencies = zip(*sorted(points))
        label = f"{'ours' if name == 'csms' else 'reference'} {q}"
        axes.plot(rates, latencies, label=label, color=colours[name], marker="o",
                  linestyle="-" if q == "p99" else "--")
    axes.set_yscale("log")
    axes.set_xlim(left=0)
    stations = {e.get("stations") for e in results["scenarios"] if e["kind"] == "sweep"}
    axes.set_title("Latency against offered load" + (f" ({stations.pop()} stations)" if len(stations) == 1 else ""))
    axes.set_xlabel("offered load (messages/s)")
    axes.set_ylabel("latency (ms, log scale)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.savefig(path, format="png")
    return os.path.relpath(path, os.path.dirname(DOC))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Benchmark our CSMS against the reference CSMS (loopback only).")
    p.add_argument("--quick", action="store_true", help="tiny version of every scenario: checks the harness")
    p.add_argument("--postgres", metavar="URL", help="run our CSMS on this PostgreSQL database (a fresh schema "
                                                     "per scenario) instead of SQLite in a temporary directory")
    p.add_argument("--only", nargs="*", help="run only scenarios whose name contains one of these")
    p.add_argument("--workers", type=int, help="loadgen processes (default: 1 up to 100 stations, else 2)")
    p.add_argument("--log-level", default="info", help="our CSMS's log level (default: the shipped 'info')")
    p.add_argument("--profile", metavar="DIR", help="run our CSMS under cProfile, one .pstats per scenario "
                                                    "(numbers then include the profiler's overhead)")
    p.add_argument("--metrics", choices=("on", "off"), default="on",
                   help="our CSMS's Prometheus metrics ([metrics] enabled; default: on, as shipped)")
    p.add_argument("--skip-reference", action="store_true", help="run our CSMS only (no ratios)")
    p.add_argument("--output", default=os.path.join(RESULTS, "latest.json"), help="results JSON")
    p.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    p.add_argument("--keep", action="store_true", help="keep the servers' temporary directories (logs)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--report-only", metavar="JSON", help="run nothing: rewrite the doc section and the plot "
                                                         "from a results JSON of an earlier run")
    args = p.parse_args(argv)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        args.profile = os.path.abspath(args.profile)
    if args.report_only:
        with open(args.report_only) as f:
            results = json.load(f)
        results["targets"] = check_targets(results["scenarios"])
    else:
        results = run_all(args)
    try:
        results["plot"] = plot(results, os.path.join(os.path.dirname(os.path.abspath(args.output)),
                                                     "latency_vs_load.png"))
    except Exception as exc:  # noqa: BLE001 - a plot must never lose the numbers
        results["plot"] = None
        results["plot_note"] = f"(no plot: {exc})"
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    text = markdown(results)
    if not args.no_doc:
        write_doc(text)
    print(text)
    failed = [e["name"] for e in results["scenarios"] for r in e["results"].values() if "failed" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
