"""Smoke tests of the benchmark harness (bench/): the load generator works against the CSMS and refuses
anything but loopback. The benchmark's numbers are not part of the suite (machines are noisy); these runs
only keep the harness from rotting."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import pytest_twisted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADGEN = os.path.join(ROOT, "bench", "loadgen.py")
FULL_MIX = {"Heartbeat", "Authorize", "StartTransaction", "MeterValues", "StopTransaction"}


def load_loadgen():
    spec = importlib.util.spec_from_file_location("bench_loadgen", LOADGEN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def run_loadgen(*args):
    """Runs the load generator as its own process without blocking the reactor: (exit status, JSON, stderr)."""
    from twisted.internet import reactor, utils

    d = utils.getProcessOutputAndValue(sys.executable, [LOADGEN, "--quiet", *map(str, args)],
                                       env=dict(os.environ), path=ROOT, reactor=reactor)
    out, err, code = await d.addTimeout(90, reactor)
    return code, (json.loads(out) if out.strip() else None), err.decode()


@pytest_twisted.ensureDeferred
async def test_loadgen_closed_loop_mix_against_the_csms_gets_every_reply(csms):
    code, result, err = await run_loadgen("--url", f"ws://127.0.0.1:{csms.port}/ocpp/", "--stations", 3,
                                          "--mix", "mix", "--mode", "closed", "--duration", 2,
                                          "--server-pid", os.getpid())
    assert code == 0, err
    assert result["errors"] == {"total": 0, "by_kind": {}}
    assert result["stations"] == 3
    assert result["connect"]["connected"] == 3
    assert result["connect"]["accepted"] == 3
    assert set(result["latency_ms_by_action"]) == FULL_MIX
    assert result["latency_ms"]["count"] == sum(a["count"] for a in result["latency_ms_by_action"].values())
    assert result["window"]["messages"] >= result["latency_ms"]["count"] - 3
    assert result["latency_ms"]["p50"] <= result["latency_ms"]["p99"] <= result["latency_ms"]["max"]
    assert result["server"]["pid"] == os.getpid()
    assert result["server"]["cpu_seconds"] > 0
    # every station's open transaction was stopped after the window
    active = await csms.app.pm.get_plugin("core").store.active_transactions(f"LG-{0:05d}")
    assert active == []


@pytest_twisted.ensureDeferred
async def test_loadgen_fixed_rate_stops_after_max_messages(csms):
    code, result, err = await run_loadgen("--url", f"ws://127.0.0.1:{csms.port}/ocpp/", "--stations", 4,
                                          "--mix", "heartbeat", "--mode", "rate", "--rate", 40,
                                          "--duration", 60, "--max-messages", 12)
    assert code == 0, err
    assert result["errors"]["total"] == 0
    assert result["window"]["messages"] == 12
    assert result["window"]["seconds"] < 30
    assert result["window"]["offered_rate"] == 40
    assert set(result["latency_ms_by_action"]) == {"Heartbeat"}


@pytest_twisted.ensureDeferred
async def test_loadgen_refuses_a_target_that_is_not_loopback():
    code, result, err = await run_loadgen("--url", "ws://10.0.0.1:9000/ocpp/", "--stations", 1, "--duration", 1)
    assert code == 2
    assert result is None
    assert "refused" in err and "not loopback" in err


def test_loadgen_refuses_before_connecting_or_starting_workers(monkeypatch):
    loadgen = load_loadgen()
    attempts = []

    def forbidden(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("the load generator tried to connect or to start a worker")
    monkeypatch.setattr(socket.socket, "connect", forbidden)
    monkeypatch.setattr(socket.socket, "connect_ex", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    assert loadgen.main(["--url", "ws://10.0.0.1:9000/ocpp/", "--quiet"]) == loadgen.EXIT_REFUSED
    assert loadgen.main(["--url", "ws://[::ffff:10.0.0.1]:9000/ocpp/", "--quiet"]) == loadgen.EXIT_REFUSED
    assert attempts == []


@pytest.mark.parametrize("url, expected", [
    ("ws://127.0.0.1:9000/ocpp/", "ws://127.0.0.1:9000/ocpp/"),
    ("ws://127.1.2.3:9000/ocpp", "ws://127.1.2.3:9000/ocpp/"),
    ("ws://[::1]:9000/ocpp/", "ws://[::1]:9000/ocpp/"),
])
def test_loadgen_accepts_loopback_and_connects_to_the_checked_literal(url, expected):
    loadgen = load_loadgen()
    resolved, addresses = loadgen.resolve_loopback_url(url)
    assert resolved == expected
    assert all(loadgen.is_loopback_address(a) for a in addresses)


@pytest.mark.parametrize("url", ["ws://10.0.0.1:9000/ocpp/", "ws://192.168.1.1/ocpp/", "ws://[::2]:9000/",
                                 "ws://[::ffff:10.0.0.1]:9000/", "http://127.0.0.1:9000/ocpp/"])
def test_loadgen_refuses_non_loopback_urls(url):
    loadgen = load_loadgen()
    with pytest.raises(loadgen.Refused):
        loadgen.resolve_loopback_url(url)


def test_loadgen_refuses_a_name_when_any_address_it_resolves_to_is_not_loopback(monkeypatch):
    loadgen = load_loadgen()

    def getaddrinfo(host, port, *args, **kwargs):
        assert host == "mixed.invalid"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", port))]
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(loadgen.Refused, match="10.0.0.1"):
        loadgen.resolve_loopback_url("ws://mixed.invalid:9000/ocpp/")


def test_run_report_only_plots_latency_against_load_with_matplotlib(tmp_path):
    output = tmp_path / "latest.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quiet", "--no-doc",
                           "--report-only", os.path.join(ROOT, "bench", "results", "latest.json"),
                           "--output", str(output)], cwd=ROOT, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    results = json.loads(output.read_text())
    assert results.get("plot_note") is None and results["plot"].endswith("latency_vs_load.png")
    png = (tmp_path / "latency_vs_load.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (800, 500)


def test_the_dashboard_bench_times_the_station_list_views(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "dashboard.py"), "--stations", "120",
                           "--repeat", "1", "--no-browser"], cwd=ROOT, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    table = [line for line in done.stdout.decode().splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in table[1:]] == ["| first page", "| page 1", "| search by id",
                                                          "| connector status Faulted", "| offline, page 1"]


def test_the_webhooks_bench_delivers_through_the_worker_and_reports_each_run(tmp_path):
    output = tmp_path / "webhooks.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "webhooks.py"), "--rate", "20",
                           "--stations", "4", "--duration", "2", "--subscriptions", "2", "--only", "baseline",
                           "webhooks-batched", "--output", str(output)], cwd=ROOT, capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr.decode()
    runs = {run["name"]: run for run in json.loads(output.read_text())["runs"]}
    assert runs["baseline"]["events_total"] == 0
    batched = runs["webhooks-batched"]
    assert batched["delivery"] == "worker"
    # Every MeterValues answered in the window reached the receiver once per subscription, sent by the
    # worker process (which spent CPU on it), not by the CSMS's reactor.
    assert batched["events_total"] >= batched["ocpp_replies"] * 2 > 0
    assert batched["worker_cpu_seconds"] > 0
    assert batched["worker_written_mb"] > 0  # the delivery file (SQLite) is the worker's to write


def test_the_webhooks_bench_alternates_windows_with_and_without_delivery_in_one_csms(tmp_path):
    output = tmp_path / "alternate.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "webhooks.py"), "--rate", "20",
                           "--stations", "4", "--duration", "2", "--subscriptions", "2", "--alternate", "2",
                           "--held", "--seed", "3", "--output", str(output)], cwd=ROOT, capture_output=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr.decode()
    runs = json.loads(output.read_text())["runs"]
    assert all(sorted(run["order"] for run in runs if run["round"] == r) == [0, 1, 2] for r in (0, 1))
    assert sorted((run["round"], run["name"]) for run in runs) == [
        (0, "baseline"), (0, "outbox-held"), (0, "webhooks-batched"),
        (1, "baseline"), (1, "outbox-held"), (1, "webhooks-batched")]
    for run in runs:
        assert run["errors"] == 0 and run["latency_ms"]["p99"] > 0
        if run["name"] == "baseline":  # its subscriptions deleted: no event written, none delivered
            assert run["events_total"] == 0
        else:  # every MeterValues of the window, once per subscription
            assert run["events_total"] >= run["ocpp_replies"] * 2 > 0
        if run["name"] == "outbox-held":  # the worker stopped through the load: nothing arrived in it
            assert run["events_in_window_per_s"] == 0


def load_webhooks_bench():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_webhooks", os.path.join(ROOT, "bench", "webhooks.py"))
        webhooks = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(webhooks)
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    return webhooks


def test_the_webhooks_bench_tells_a_difference_from_noise():
    """--repeat's verdict: a Mann-Whitney U test of each run's p99s against the baseline's."""
    webhooks = load_webhooks_bench()
    runs = [{"name": name, "latency_ms": {"p99": p99, "p50": 1.0}}
            for name, values in (("baseline", [10, 11, 12, 13, 14]), ("same", [10.5, 11.5, 12.5, 13.5, 14.5]),
                                 ("slower", [30, 31, 32, 33, 34]), ("once", [99])) for p99 in values]
    summary = webhooks.repeat_summary(runs)
    assert summary["baseline"]["p_vs_baseline"] is None and summary["once"]["p_vs_baseline"] is None
    assert summary["same"]["p_vs_baseline"] > 0.5
    assert summary["slower"]["p_vs_baseline"] < 0.05 and summary["slower"]["paired_p"] < 0.1
    assert summary["slower"]["p99_median"] == 32 and summary["slower"]["runs"] == 5
    assert summary["same"]["higher_in"] == (5, 5) and summary["baseline"]["paired_p"] is None
    # Above the baseline's a minute before in each of 8 pairs, by a little, while the machine drifted a lot:
    # the unordered test sees noise, the paired one a difference.
    drift = [10, 14, 18, 22, 26, 30, 34, 38]
    runs = [{"name": name, "latency_ms": {"p99": p99, "p50": 1.0}}
            for name, values in (("baseline", drift), ("drifting", [x + 1 for x in drift])) for p99 in values]
    drifting = webhooks.repeat_summary(runs)["drifting"]
    assert drifting["p_vs_baseline"] > 0.5 and drifting["paired_p"] < 0.01 and drifting["higher_in"] == (8, 8)
    # Against another run instead (--held's outbox-held): the baseline is then the lower in every pair.
    against = webhooks.repeat_summary(runs, reference="drifting")
    assert against["drifting"]["paired_p"] is None and against["baseline"]["higher_in"] == (0, 8)
    assert against["baseline"]["paired_p"] < 0.01
    # A run whose load did not run (no answer measured, or OCPP errors) is left out, and so is its pair:
    # the other pairs stay those of their round.
    runs = [{"name": name, "round": i, "latency_ms": {"p99": p99, "p50": 1.0}, "errors": 0}
            for name, values in (("baseline", drift), ("drifting", [x + 1 for x in drift]))
            for i, p99 in enumerate(values)]
    runs[2]["latency_ms"] = {"p99": None, "p50": None}
    runs[8 + 5]["errors"] = 200
    summary = webhooks.repeat_summary(runs)
    assert (summary["baseline"]["failed"], summary["baseline"]["runs"]) == (1, 7)
    assert (summary["drifting"]["failed"], summary["drifting"]["runs"]) == (1, 7)
    assert summary["drifting"]["higher_in"] == (6, 6) and summary["baseline"]["p99_min"] == 10
    # The medians are paired the same way: equal ones tell nothing, higher ones in every pair do.
    assert summary["drifting"]["p50_higher_in"] == (0, 6) and summary["drifting"]["p50_paired_p"] is None
    for run in runs:
        if run["name"] == "drifting" and run["latency_ms"]["p50"] is not None:
            run["latency_ms"]["p50"] = 1.0 + run["round"] / 100 + 0.05
    summary = webhooks.repeat_summary(runs)["drifting"]
    assert summary["p50_higher_in"] == (6, 6) and summary["p50_paired_p"] < 0.05


def test_the_wakeup_latency_bench_measures_each_competitor(tmp_path):
    output = tmp_path / "wakeup.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "wakeup_latency.py"), "--seconds", "0.3",
                           "--rounds", "1", "--cpu", "0", "--output", str(output)], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    modes = json.loads(output.read_text())["modes"]
    assert set(modes) == {"none", "nice", "idle"}
    for row in modes.values():
        assert row["wake_ups"] > 10 and 0 <= row["p50_us"] <= row["p99_us"] <= row["p999_us"] <= row["max_us"]
    assert "nice 10 + SCHED_IDLE" in done.stdout.decode()


@pytest.mark.postgresql_only
@pytest_twisted.ensureDeferred
async def test_the_cluster_bench_kills_a_node_and_checks_nothing_confirmed_was_lost(tmp_path, database_url):
    from twisted.internet import reactor, utils

    output = tmp_path / "cluster.json"
    out, err, code = await utils.getProcessOutputAndValue(
        sys.executable, [os.path.join(ROOT, "bench", "cluster.py"), "--quiet", "--database", database_url,
                         "--stations", "30", "--duration", "6", "--kill-at", "2", "--rate", "30",
                         "--forward-samples", "3", "--workers", "1", "--output", str(output)],
        env=dict(os.environ), path=ROOT, reactor=reactor).addTimeout(300, reactor)
    assert code == 0, err.decode()
    result = json.loads(output.read_text())
    load = result["load"]
    assert load["connect"]["accepted"] == 30
    assert load["window"]["messages"] > 0
    # The killed node's stations (leastconn: about a third) came back through HAProxy to the others.
    assert result["killed_node"] == "node3" and set(result["node_cpu_seconds"]) == {"node1", "node2"}
    assert load["reconnect"]["count"] >= 5 and load["reconnect"]["seconds_from_kill_to_last_back"] is not None
    check = result["database_check"]
    assert check["checked"]["transactions"] > 0 and check["checked"]["meter_values"] > 0
    assert check["lost_total"] == 0
    for kind in ("local", "forwarded"):
        assert sum(result["api_calls"][kind]["status_codes"].values()) == 3
    assert result["api_calls"]["local"]["status_codes"] == {"200": 3}
    assert set(result["api_calls_under_load"]) == {"local", "forwarded"}  # sampled from the window's start


def test_the_webhooks_purge_bench_deletes_the_expired_part_of_a_history(tmp_path):
    output = tmp_path / "purge.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "webhooks_purge.py"), "--deliveries", "400",
                           "--days", "8", "--expired-hours", "24", "--output", str(output)],
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    [run] = json.loads(output.read_text())["runs"]
    # 100 events (4 deliveries each) evenly over 8 days: the first 13 are older than 7 days.
    assert (run["deliveries"], run["deleted"]) == (400, 52) and run["seconds"] > 0


def test_the_webhooks_bench_moves_a_local_postgresql_to_one_cpu_and_back():
    """--database-cpu: every postgres process of this machine, and the backends it starts later."""
    webhooks = load_webhooks_bench()
    if not webhooks.postgres_pids() or os.geteuid() != 0 or (os.cpu_count() or 1) < 2:
        pytest.skip("needs a PostgreSQL on this machine, root and 2 CPUs (as in .ci/run)")
    every_cpu = set(range(os.cpu_count()))

    def affinities(pids) -> set:
        found = set()
        for pid in pids:
            try:
                found.add(frozenset(os.sched_getaffinity(pid)))
            except OSError:  # a backend that ended meanwhile
                pass
        return found

    def parent(pid: int) -> int | None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return None
    try:
        moved = webhooks.pin_postgres({1})
        assert moved and affinities(moved) == {frozenset({1})}
        postmasters = [pid for pid in moved if parent(pid) not in (None, *moved)]
        assert postmasters and affinities(postmasters) == {frozenset({1})}  # what new backends inherit
    finally:
        moved = webhooks.pin_postgres(every_cpu)
    assert affinities(moved) == {frozenset(every_cpu)}
