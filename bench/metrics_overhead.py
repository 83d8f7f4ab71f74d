#!/usr/bin/env python3
"""What counting metrics costs per message on the OCPP hot path, in process, without the network.

    .venv/bin/python bench/metrics_overhead.py [--messages 200000] [--rounds 7]

One :class:`csms.rpc.OCPPSession` reads Heartbeat (or Authorize) CALLs and answers them synchronously, as the
Core plugin does from memory, with metrics off and on in alternating rounds; prints the median CPU time per
message of each and the difference. It isolates the RPC layer's share: the whole server's cost per message
(sockets, framing, the database) is measured by ``bench/run.py`` (``--metrics on|off``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from csms import ocpp16  # noqa: E402
from csms.metrics import OCPPMetrics  # noqa: E402
from csms.rpc import OCPPSession  # noqa: E402

ANSWERS = {"Heartbeat": {"currentTime": "2026-12-01T00:00:00.000Z"},
           "Authorize": {"idTagInfo": {"status": "Accepted"}}}
PAYLOADS = {"Heartbeat": "{}", "Authorize": '{"idTag":"TAG-1"}'}


class NoClock:
    def seconds(self):
        return 0.0

    def callLater(self, *args, **kwargs):
        raise AssertionError("a synchronous answer sets no timer")


def session(action: str, metrics) -> OCPPSession:
    answer = ANSWERS[action]
    s = OCPPSession("CP-1", lambda _s, _a, _p: answer, lambda data: None, NoClock(), 30, handler_timeout=60)
    s._metrics = metrics
    return s


def cpu_per_message(action: str, metrics, texts: list) -> float:
    s = session(action, metrics)
    receive = s.text_received
    started = time.process_time()
    for text in texts:
        receive(text)
    return (time.process_time() - started) / len(texts) * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--action", choices=sorted(ANSWERS), default="Heartbeat")
    args = p.parse_args(argv)
    texts = [f'[2,"m{i}","{args.action}",{PAYLOADS[args.action]}]' for i in range(args.messages)]
    cpu_per_message(args.action, None, texts[:1000])  # warm up: schemas compiled, caches filled
    off, on = [], []
    for _ in range(args.rounds):
        off.append(cpu_per_message(args.action, None, texts))
        on.append(cpu_per_message(args.action, OCPPMetrics(ocpp16.INBOUND, ocpp16.OUTBOUND), texts))
    off_median, on_median = statistics.median(off), statistics.median(on)
    print(f"{args.action}, {args.messages} messages x {args.rounds} rounds, load average {os.getloadavg()[0]:.1f}")
    print(f"metrics off: {off_median:.2f} µs CPU/msg (rounds: {', '.join(f'{v:.2f}' for v in off)})")
    print(f"metrics on:  {on_median:.2f} µs CPU/msg (rounds: {', '.join(f'{v:.2f}' for v in on)})")
    print(f"difference:  {on_median - off_median:+.2f} µs/msg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
