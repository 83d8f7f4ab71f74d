"""How late a process that sleeps wakes up on a CPU another process keeps busy, by that process's priority.

The question behind ``[plugin:webhooks] worker_policy``: the delivery worker runs beside the OCPP
process, at a lower priority. When the OCPP process wakes (a frame arrived, a commit ended) while the
worker has the CPU, how long does it wait for it? Under ``nice`` alone, Linux's scheduler (EEVDF, 6.6
and later) may let the running worker finish its slice first; under ``SCHED_IDLE`` a waking process of
the normal policy preempts it at once.

One CPU (``--cpu``), two processes: a *sleeper* (the stand-in for the OCPP process) sleeps ``--interval``
again and again and records how much later than asked it woke; a *competitor* (the stand-in for the
worker) spins on the same CPU, ``--busy`` ms at a time with 1 ms pauses, under one of:

* ``none``: no competitor (the CPU is idle between the sleeper's wake-ups);
* ``nice``: the competitor at ``nice --nice`` (the worker with ``worker_policy = normal``);
* ``idle``: the competitor at that nice and under SCHED_IDLE (``worker_policy = idle``, the default).

Each mode runs ``--seconds`` per round, the modes interleaved, ``--rounds`` rounds; the report gives the
oversleep's p50, p99, p99.9 and max per mode (µs), over all rounds. Linux only; everything ends by
itself (the competitor after ``--seconds`` + 5 s even if this process dies).

    .venv/bin/python bench/wakeup_latency.py [--cpu 1] [--seconds 10] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODES = ("none", "nice", "idle")


def compete(mode: str, cpu: int, nice: int, busy_ms: float, seconds: float) -> None:
    """The competitor: spin on ``cpu`` for ``busy_ms`` at a time, 1 ms pauses, for ``seconds``."""
    os.sched_setaffinity(0, {cpu})
    os.nice(nice)
    if mode == "idle":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        until = time.monotonic() + busy_ms / 1000
        while time.monotonic() < until:
            pass
        time.sleep(0.001)


def oversleeps(cpu: int, interval: float, seconds: float) -> list[float]:
    """Sleep ``interval`` over and over on ``cpu`` for ``seconds``: how late each wake-up was, in µs."""
    os.sched_setaffinity(0, {cpu})
    late = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        asked = time.monotonic() + interval
        time.sleep(interval)
        late.append((time.monotonic() - asked) * 1e6)
    return late


def percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def summary(late: list[float]) -> dict:
    ordered = sorted(late)
    return {"wake_ups": len(ordered), "p50_us": percentile(ordered, 0.5), "p99_us": percentile(ordered, 0.99),
            "p999_us": percentile(ordered, 0.999), "max_us": ordered[-1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", type=int, default=1, help="the CPU both processes share")
    parser.add_argument("--seconds", type=float, default=10.0, help="per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interval", type=float, default=0.001, help="the sleeper's sleep, in seconds")
    parser.add_argument("--nice", type=int, default=10, help="the competitor's nice (worker_nice)")
    parser.add_argument("--busy", type=float, default=50.0, help="ms the competitor spins between 1 ms pauses")
    parser.add_argument("--output", help="write the results here (JSON)")
    parser.add_argument("--compete", choices=MODES, help=argparse.SUPPRESS)  # the competitor process itself
    args = parser.parse_args(argv)
    if not hasattr(os, "SCHED_IDLE"):
        print("wakeup_latency.py: Linux only (SCHED_IDLE)", file=sys.stderr)
        return 2
    if args.compete:
        compete(args.compete, args.cpu, args.nice, args.busy, args.seconds + 5)
        return 0
    late: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(max(args.rounds, 1)):
        for mode in MODES:
            competitor = None
            if mode != "none":
                competitor = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--compete", mode,
                                               "--cpu", str(args.cpu), "--nice", str(args.nice),
                                               "--busy", str(args.busy), "--seconds", str(args.seconds)])
                time.sleep(0.5)  # it is spinning before the measurement begins
            try:
                late[mode] += oversleeps(args.cpu, args.interval, args.seconds)
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
    results = {"cpu": args.cpu, "seconds": args.seconds, "rounds": args.rounds, "interval": args.interval,
               "nice": args.nice, "busy_ms": args.busy, "kernel": os.uname().release,
               "modes": {mode: summary(values) for mode, values in late.items()}}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    print(f"Oversleep of a {args.interval * 1000:g} ms sleep on CPU {args.cpu} (kernel {results['kernel']}), "
          f"{args.rounds} x {args.seconds:g} s per mode; competitor spinning {args.busy:g} ms at a time:\n")
    print("| competitor | wake-ups | p50 µs | p99 µs | p99.9 µs | max µs |\n|---|---|---|---|---|---|")
    labels = {"none": "none", "nice": f"nice {args.nice}", "idle": f"nice {args.nice} + SCHED_IDLE"}
    for mode, row in results["modes"].items():
        print(f"| {labels[mode]} | {row['wake_ups']} | {row['p50_us']:.0f} | {row['p99_us']:.0f} | "
              f"{row['p999_us']:.0f} | {row['max_us']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
