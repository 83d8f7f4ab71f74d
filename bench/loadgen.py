#!/usr/bin/env python3
"""Load generator: N simulated OCPP 1.6J charge points over WebSocket, against a Central System on loopback.

Each station connects (subprotocol ``ocpp1.6``), sends BootNotification, then works through its message mix
with at most one outstanding call, either closed-loop (the next call as soon as the reply arrives) or at a
fixed total rate shared by all stations. Latency is measured per message; the run is bounded by a
measurement window (``--duration``) and a message count (``--max-messages``), and a watchdog ends every
process it started if anything hangs.

Safety: the target must resolve to a loopback address (127.0.0.0/8 or ::1) only; anything else is refused
before a single packet is sent to it, and the connections go to the checked address literal, not to the
name (so a later DNS answer cannot redirect them).

Architecture: this process is the coordinator; it starts ``--workers`` worker processes (asyncio +
``websockets``), each simulating a share of the stations, and synchronises them on CLOCK_MONOTONIC
(shared by every process on Linux): "connect at t", then "measure from t for --duration seconds". When
``--server-pid`` is given the coordinator reads that process's CPU time and memory from ``/proc`` at the
window's edges, so CPU per message counts exactly the messages of the window.

Exit status: 0 completed without errors, 1 completed with errors, 2 refused (target or arguments),
3 stopped by the watchdog.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

try:  # the load generator's own JSON cost matters: take a faster codec when one is installed
    import ujson as fastjson
except ImportError:  # pragma: no cover
    fastjson = json

EXIT_OK, EXIT_ERRORS, EXIT_REFUSED, EXIT_WATCHDOG = 0, 1, 2, 3
#: file descriptors a worker keeps for itself beside its stations' sockets
FD_RESERVE = 64

#: message cycles: what each station sends, in order, round and round
MIXES = {
    "heartbeat": ["Heartbeat"],
    "authorize": ["Authorize"],
    # a transaction is started before the window and stopped after it: the window sees MeterValues only
    "metervalues": ["MeterValues"],
    "transaction": ["Authorize", "StartTransaction", "MeterValues", "MeterValues", "MeterValues",
                    "MeterValues", "StopTransaction"],
    "mix": ["Heartbeat", "Authorize", "StartTransaction", "MeterValues", "MeterValues", "Heartbeat",
            "MeterValues", "MeterValues", "StopTransaction"],
    # bench/cluster.py: the mix with the connector's status changes around each transaction
    "cluster": ["Heartbeat", "Authorize", "StatusNotification", "StartTransaction", "MeterValues", "MeterValues",
                "Heartbeat", "MeterValues", "StopTransaction", "StatusNotification"],
}


class Refused(Exception):
    """The run cannot start: non-loopback target, bad arguments."""


# ---------------------------------------------------------------------------------------------------------
# target checks and limits (coordinator)
# ---------------------------------------------------------------------------------------------------------

def is_loopback_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def resolve_loopback_url(url: str) -> tuple[str, list[str]]:
    """The URL rewritten to a checked loopback address literal, and every address the host resolved to.

    Raises :class:`Refused` unless every resolved address is loopback (127.0.0.0/8 or ::1).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise Refused(f"target {url!r}: only ws:// or wss:// URLs")
    host = parts.hostname
    if not host:
        raise Refused(f"target {url!r} has no host")
    try:
        port = parts.port or (443 if parts.scheme == "wss" else 80)
    except ValueError as exc:
        raise Refused(f"target {url!r}: {exc}") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Refused(f"target host {host!r} does not resolve: {exc}") from None
    addresses = sorted({info[4][0] for info in infos})
    foreign = [a for a in addresses if not is_loopback_address(a)]
    if not addresses or foreign:
        raise Refused(f"target {host!r} resolves to {', '.join(foreign or addresses)}: refusing a target that is "
                      f"not loopback (127.0.0.0/8 or ::1); the load generator only ever runs against this machine")
    address = addresses[0]
    literal = f"[{address}]" if ":" in address else address
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urlunsplit((parts.scheme, f"{literal}:{port}", path, "", "")), addresses


def raise_nofile_limit(wanted: int) -> dict:
    """Raise this process's RLIMIT_NOFILE soft limit towards ``wanted``, as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    new_soft = soft
    if soft != resource.RLIM_INFINITY and target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        new_soft = target
    return {"soft_before": soft, "soft": new_soft, "hard": hard}


def read_proc(pid: int) -> dict:
    """CPU seconds (user+system, all threads) and memory (KiB) of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15 of stat(5))
    memory = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                memory[key] = int(value.split()[0])
    return {"cpu_seconds": cpu, "rss_kib": memory.get("VmRSS"), "peak_rss_kib": memory.get("VmHWM")}


# ---------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------

def percentile(sorted_values: list, fraction: float):
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, int(round(fraction * len(sorted_values) + 0.5)) - 1))
    return sorted_values[index]


def latency_summary(samples_us: list) -> dict:
    values = sorted(samples_us)
    if not values:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    ms = 1000.0
    return {"count": len(values), "p50": percentile(values, 0.50) / ms, "p90": percentile(values, 0.90) / ms,
            "p99": percentile(values, 0.99) / ms, "max": values[-1] / ms, "mean": sum(values) / len(values) / ms}


# ---------------------------------------------------------------------------------------------------------
# worker: the simulated stations
# ---------------------------------------------------------------------------------------------------------

class CallFailed(Exception):
    def __init__(self, kind: str, connection_lost: bool = False):
        super().__init__(kind)
        self.kind = kind
        #: the connection is gone (closed, reset, silent past --call-timeout): a station reconnects
        self.connection_lost = connection_lost


class Worker:
    """Runs one share of the stations in an asyncio loop; talks to the coordinator with JSON lines."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.url = spec["url"]
        self.mode = spec["mode"]
        self.cycle = MIXES[spec["mix"]]
        self.rate = spec["rate"]
        self.indices = spec["indices"]
        self.duration = spec["duration"]
        self.max_messages = spec["max_messages"]
        self.errors: dict[str, int] = {}
        self.samples: dict[str, list] = {}
        self.window_messages = 0
        self.late_sends = 0
        self.in_flight = 0
        self.accepted_at: list[float] = []
        self.connections: list = []
        self.window_start = self.window_end = None
        self.stopping = False
        self.timestamp = ""
        #: with --reconnect: seconds each lost connection took to come back, and when it came back
        self.reconnect_seconds: list[float] = []
        self.reconnected_at: list[float] = []
        #: with --confirmed: transaction id -> what the CSMS confirmed of it (see Station.record)
        self.confirmed: dict[int, dict] = {}
        self._commands: asyncio.Queue | None = None

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def emit(self, event: dict) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    async def command(self, name: str) -> dict:
        while True:
            message = await self._commands.get()
            if message.get("cmd") == name:
                return message

    def _read_stdin(self, loop) -> None:
        for line in sys.stdin:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            loop.call_soon_threadsafe(self._commands.put_nowait, message)

    async def sleep_until(self, t: float) -> None:
        delay = t - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def clock_task(self) -> None:
        from datetime import datetime, timezone

        while True:
            self.timestamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
            await asyncio.sleep(0.25)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._commands = asyncio.Queue()
        threading.Thread(target=self._read_stdin, args=(loop,), daemon=True).start()
        clock = asyncio.ensure_future(self.clock_task())
        await asyncio.sleep(0)
        self.emit({"event": "loaded"})
        start = (await self.command("connect"))["t"]
        await self.sleep_until(start)
        stations = [Station(self, i, position) for position, i in enumerate(self.indices)]
        concurrency = self.spec["connect_concurrency"]
        gate = asyncio.Semaphore(concurrency) if concurrency else None
        await asyncio.gather(*(s.connect_and_boot(gate, start) for s in stations))
        ready = [s for s in stations if s.ws is not None]
        await asyncio.gather(*(s.setup() for s in ready))
        self.emit({"event": "ready", "connected": len(self.connections), "accepted": len(self.accepted_at),
                   "last_accepted": max(self.accepted_at) if self.accepted_at else None, "errors": self.errors})
        go = await self.command("go")
        self.window_start = go["t"]
        self.window_end = self.window_start + self.duration
        self._stop = asyncio.Event()
        loop.call_later(max(0.0, self.window_end - time.monotonic()), self._stop.set)
        await self.sleep_until(self.window_start)
        ready = [s for s in stations if s.ws is not None]
        tasks = {s: asyncio.ensure_future(s.work()) for s in ready}
        await self._stop.wait()
        self.stopping = True
        window_closed = time.monotonic()
        self.emit({"event": "stopped", "t": window_closed})
        for station, task in tasks.items():
            if not station.outstanding:  # idle (rate mode, between sends): nothing to wait for
                task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks.values(), timeout=self.spec["drain_timeout"])
            for task in pending:
                task.cancel()
        unanswered = sum(1 for s in ready if s.outstanding)
        if unanswered:
            self.errors["no reply by the end of the drain"] = unanswered
        await asyncio.gather(*(s.teardown() for s in ready if not s.outstanding))
        await asyncio.gather(*(s.close() for s in stations))
        clock.cancel()
        self.emit({"event": "done", "window_closed": window_closed, "window_messages": self.window_messages,
                   "late_sends": self.late_sends, "errors": self.errors, "samples": self.samples,
                   "stations": len(stations), "connected": len(ready),
                   "reconnect_seconds": self.reconnect_seconds, "reconnected_at": self.reconnected_at,
                   "confirmed": self.confirmed if self.spec.get("record_confirmed") else None})

    def count(self, action: str, sent: float, received: float) -> None:
        if self.window_start <= sent < self.window_end:
            self.samples.setdefault(action, []).append(int((received - sent) * 1e6))
        if received < self.window_end:
            self.window_messages += 1
            if self.max_messages and self.window_messages >= self.max_messages:
                self.window_end = received
                self._stop.set()


class Station:
    """One simulated charge point: one WebSocket connection, one outstanding call at a time."""

    def __init__(self, worker: Worker, index: int, position: int):
        self.worker = worker
        self.index = index
        self.position = position
        self.station_id = f"{worker.spec['id_prefix']}{index:05d}"
        self.id_tag = f"{worker.spec['tag_prefix']}{index}"[:20]
        self.ws = None
        self.next_id = 0
        self.transaction_id = None
        self.meter = 0
        self.outstanding = False
        #: The timestamp of this station's last MeterValues sample (see sample_timestamp).
        self.last_sample = ""

    async def connect_and_boot(self, gate, start: float) -> None:
        from websockets.asyncio.client import connect

        worker = self.worker
        if gate is not None:
            await gate.acquire()
        try:
            self.ws = await connect(worker.url + self.station_id, subprotocols=["ocpp1.6"], compression=None,
                                    proxy=None, ping_interval=None, open_timeout=worker.spec["connect_timeout"],
                                    close_timeout=2, max_queue=None, user_agent_header=None)
            worker.connections.append(self.ws)
            if self.ws.subprotocol != "ocpp1.6":
                raise CallFailed("connect: subprotocol ocpp1.6 not agreed")
            reply = await self.call("BootNotification", {"chargePointVendor": "Bench", "chargePointModel": "LoadGen"})
            if reply.get("status") != "Accepted":
                raise CallFailed(f"boot: {reply.get('status')}")
            worker.accepted_at.append(time.monotonic())
        except CallFailed as exc:
            worker.error(exc.kind)
            await self.close()
        except (OSError, asyncio.TimeoutError) as exc:
            worker.error(f"connect: {type(exc).__name__}")
            await self.close()
        except Exception as exc:  # noqa: BLE001 - every failure is counted by kind, none ends the run
            worker.error(f"connect: {type(exc).__name__}: {str(exc)[:80]}")
            await self.close()
        finally:
            if gate is not None:
                gate.release()

    async def call(self, action: str, payload: dict) -> dict:
        """Send one CALL and wait for its CALLRESULT, answering any call the CSMS makes meanwhile."""
        self.next_id += 1
        message_id = str(self.next_id)
        self.outstanding = True
        call_timeout = self.worker.spec.get("call_timeout") or None
        try:
            await self.ws.send(fastjson.dumps([2, message_id, action, payload]))
        except Exception as exc:  # noqa: BLE001 - a closed connection is one error kind
            raise CallFailed(f"{action}: connection closed ({type(exc).__name__})", True) from None
        while True:
            try:
                raw = await asyncio.wait_for(self.ws.recv(), call_timeout)
            except Exception as exc:  # noqa: BLE001 - a closed (or silent) connection is one error kind
                raise CallFailed(f"{action}: connection closed ({type(exc).__name__})", True) from None
            try:
                frame = fastjson.loads(raw)
                kind = frame[0]
            except (ValueError, TypeError, IndexError):
                raise CallFailed(f"{action}: unparseable reply") from None
            if kind == 2:  # a CSMS-initiated call: a bench station implements none
                await self.ws.send(fastjson.dumps([4, frame[1], "NotImplemented", "", {}]))
                continue
            if frame[1] != message_id:
                raise CallFailed(f"{action}: reply to another message id")
            self.outstanding = False
            if kind == 4:
                raise CallFailed(f"{action}: CALLERROR {frame[2]}")
            if kind != 3 or not isinstance(frame[2], dict):
                raise CallFailed(f"{action}: malformed reply")
            return frame[2]

    def sample_timestamp(self, now: str) -> str:
        """A MeterValues timestamp after this station's last one: the shared clock ticks every 0.25 s, and
        two samples of one station, time and measurand are one sample to the CSMS (stored, and sent to
        webhooks, once), as a real meter never takes two at the same time. A millisecond later where
        the tick has not moved."""
        if now > self.last_sample:
            self.last_sample = now
        else:
            later = datetime.strptime(self.last_sample, "%Y-%m-%dT%H:%M:%S.%fZ") + timedelta(milliseconds=1)
            self.last_sample = later.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        return self.last_sample

    def payload(self, action: str) -> dict:
        ts = self.worker.timestamp
        if action == "Heartbeat":
            return {}
        if action == "Authorize":
            return {"idTag": self.id_tag}
        if action == "StatusNotification":
            return {"connectorId": 1, "errorCode": "NoError", "timestamp": ts, "status": "Available"}
        if action == "StartTransaction":
            return {"connectorId": 1, "idTag": self.id_tag, "meterStart": self.meter, "timestamp": ts}
        if action == "MeterValues":
            self.meter += 25
            ts = self.sample_timestamp(ts)
            payload = {"connectorId": 1, "meterValue": [{"timestamp": ts, "sampledValue": [
                {"value": str(self.meter), "context": "Sample.Periodic", "measurand": "Energy.Active.Import.Register",
                 "unit": "Wh"},
                {"value": "11000", "context": "Sample.Periodic", "measurand": "Power.Active.Import", "unit": "W"}]}]}
            if self.transaction_id is not None:
                payload["transactionId"] = self.transaction_id
            return payload
        if action == "StopTransaction":
            return {"transactionId": self.transaction_id if self.transaction_id is not None else 0,
                    "meterStop": self.meter, "timestamp": ts, "idTag": self.id_tag, "reason": "Local"}
        raise ValueError(action)

    async def send(self, action: str) -> dict:
        payload = self.payload(action)
        reply = await self.call(action, payload)
        if action == "StartTransaction":
            self.transaction_id = reply.get("transactionId")
            if not isinstance(self.transaction_id, int):
                raise CallFailed("StartTransaction: no transactionId")
        elif action == "StopTransaction":
            self.transaction_id = None
        elif action == "Authorize" and "idTagInfo" not in reply:
            raise CallFailed("Authorize: no idTagInfo")
        if self.worker.spec.get("record_confirmed"):
            self.record(action, payload, reply)
        return reply

    def record(self, action: str, payload: dict, reply: dict) -> None:
        """What the CSMS confirmed, to compare with its database afterwards: each transaction's station,
        the timestamps of its confirmed MeterValues samples, and whether its StopTransaction was confirmed."""
        confirmed = self.worker.confirmed
        if action == "StartTransaction":
            confirmed.setdefault(reply["transactionId"], {"station": self.station_id, "samples": [], "stopped": False})
        elif action == "MeterValues" and "transactionId" in payload:
            entry = confirmed.get(payload["transactionId"])
            if entry is not None:
                entry["samples"].append(payload["meterValue"][0]["timestamp"])
        elif action == "StopTransaction":
            entry = confirmed.get(payload["transactionId"])
            if entry is not None:
                entry["stopped"] = True

    async def reconnect(self) -> bool:
        """Connect again after losing the connection (no BootNotification: the station did not reboot),
        backing off between attempts like a charge point; False when the window ends first."""
        from websockets.asyncio.client import connect

        worker = self.worker
        lost = time.monotonic()
        backoff = 0.2
        while not worker.stopping:
            try:
                self.ws = await connect(worker.url + self.station_id, subprotocols=["ocpp1.6"], compression=None,
                                        proxy=None, ping_interval=None, open_timeout=worker.spec["connect_timeout"],
                                        close_timeout=2, max_queue=None, user_agent_header=None)
            except Exception:  # noqa: BLE001 - refused, reset, 503 from the balancer: try again
                worker.error("reconnect attempt failed")
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 5.0)
                continue
            worker.connections.append(self.ws)
            now = time.monotonic()
            worker.reconnect_seconds.append(now - lost)
            worker.reconnected_at.append(now)
            return True
        return False

    async def setup(self) -> None:
        """Unmeasured: the metervalues mix needs a running transaction."""
        if self.worker.spec["mix"] == "metervalues":
            try:
                await self.send("StartTransaction")
            except CallFailed as exc:
                self.worker.error(exc.kind)
                await self.close()

    async def teardown(self) -> None:
        """Unmeasured: stop a transaction left running when the window closed."""
        if self.ws is None or self.transaction_id is None:
            return
        try:
            await asyncio.wait_for(self.send("StopTransaction"), self.worker.spec["drain_timeout"])
        except (CallFailed, asyncio.TimeoutError):
            pass

    async def work(self) -> None:
        worker = self.worker
        cycle = worker.cycle
        position = self.index % len(cycle)  # stations start at different points of the cycle
        rate_mode = worker.mode == "rate"
        if rate_mode:
            interval = len(worker.indices) / (worker.rate or 1)
            # spread the stations' first sends evenly over one interval
            due = worker.window_start + interval * (self.position / len(worker.indices))
        now = time.monotonic
        while not worker.stopping:
            action = cycle[position]
            position = (position + 1) % len(cycle)
            if rate_mode:
                delay = due - now()
                if delay > 0:
                    await asyncio.sleep(delay)
                    if worker.stopping:
                        break
                elif delay < -0.001:
                    worker.late_sends += 1
                # latency counts from the intended send time (no coordinated omission)
                sent = due
                due += interval
            else:
                sent = now()
            try:
                await self.send(action)
            except CallFailed as exc:
                worker.error(exc.kind)
                self.outstanding = False
                await self.close()
                if not (exc.connection_lost and worker.spec.get("reconnect") and await self.reconnect()):
                    return
                # Unanswered, the call was not confirmed: the station sends it again (OCPP-J §4.1.1 retries).
                position = (position - 1) % len(cycle)
                continue
            worker.count(action, sent, now())

    async def close(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            try:
                await asyncio.wait_for(ws.close(), 3)
            except Exception:  # noqa: BLE001 - closing is best effort
                ws.transport.abort()


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    raise_nofile_limit(len(spec["indices"]) + FD_RESERVE)
    deadline = spec["deadline"]

    coordinator = os.getppid()

    def watchdog():
        # Ends the worker at its deadline, or at once when its coordinator is gone (killed by a failed run).
        while time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            if os.getppid() != coordinator:
                sys.stderr.write("loadgen worker: the coordinator is gone, exiting\n")
                os._exit(EXIT_WATCHDOG)
        sys.stderr.write("loadgen worker: watchdog deadline reached, exiting\n")
        os._exit(EXIT_WATCHDOG)
    threading.Thread(target=watchdog, daemon=True).start()
    asyncio.run(Worker(spec).run())
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------
# coordinator
# ---------------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description="OCPP 1.6J load generator (loopback targets only).")
    p.add_argument("--url", default="ws://127.0.0.1:9000/ocpp/",
                   help="WebSocket URL prefix; the station id is appended (default %(default)s)")
    p.add_argument("--stations", "-n", type=int, default=10, help="simulated stations (default %(default)s)")
    p.add_argument("--mix", choices=sorted(MIXES), default="heartbeat", help="message cycle (default %(default)s)")
    p.add_argument("--mode", choices=("closed", "rate"), default="closed",
                   help="closed: next call when the reply arrives; rate: --rate messages/s in total")
    p.add_argument("--rate", type=float, default=100.0, help="total messages per second in rate mode")
    p.add_argument("--duration", type=float, default=10.0, help="measurement window in seconds (default %(default)s)")
    p.add_argument("--max-messages", type=int, default=1_000_000,
                   help="end the window after this many replies in total (0: no limit; default %(default)s)")
    p.add_argument("--storm", action="store_true",
                   help="connection storm: every station connects and boots at the same moment; reports the "
                        "time until all are Accepted")
    p.add_argument("--connect-concurrency", type=int, default=200,
                   help="handshakes in flight at once outside a storm (default %(default)s)")
    p.add_argument("--connect-timeout", type=float, default=60.0,
                   help="seconds allowed for connecting and booting every station (default %(default)s)")
    p.add_argument("--drain-timeout", type=float, default=10.0,
                   help="seconds to wait for outstanding replies after the window (default %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="load generator processes (default %(default)s)")
    p.add_argument("--server-pid", type=int, help="measure this process's CPU and memory from /proc")
    p.add_argument("--id-prefix", default="LG-", help="station id prefix (default %(default)s)")
    p.add_argument("--tag-prefix", default="LGTAG", help="id tag prefix; station i uses PREFIX+i")
    p.add_argument("--reconnect", action="store_true",
                   help="a station whose connection drops reconnects (backing off) and goes on, instead of stopping")
    p.add_argument("--call-timeout", type=float, default=0,
                   help="seconds without a reply after which a connection counts as lost (0: wait; default %(default)s)")
    p.add_argument("--confirmed", dest="confirmed_path",
                   help="write what the CSMS confirmed (transactions, MeterValues timestamps, stops) here as JSON")
    p.add_argument("--kill-pid", type=int, help="fault injection: SIGKILL this process (a loopback CSMS node) ...")
    p.add_argument("--kill-at", type=float, default=None, help="... this many seconds into the window")
    p.add_argument("--announce", action="store_true",
                   help="print 'loadgen: window open' on stdout when the window opens (with --json; for a driver)")
    p.add_argument("--json", dest="json_path", help="write the result JSON here (default: stdout)")
    p.add_argument("--quiet", action="store_true", help="no human summary on stderr")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None:
        if args.stations < 1 or args.workers < 1 or args.duration <= 0:
            raise Refused("--stations, --workers and --duration must be positive")
        if args.mode == "rate" and args.rate <= 0:
            raise Refused("--rate must be positive")
        if args.duration > 3600 or args.connect_timeout > 600:
            raise Refused("runs are bounded: --duration at most 3600 s, --connect-timeout at most 600 s")
        if (args.kill_pid is None) != (args.kill_at is None) or (args.kill_at is not None and args.kill_at < 0):
            raise Refused("--kill-pid and --kill-at go together (--kill-at seconds into the window, >= 0)")
    return args


class Coordinator:
    def __init__(self, args, url: str, addresses: list[str]):
        self.args = args
        self.url = url
        self.addresses = addresses
        self.processes: list[subprocess.Popen] = []
        self.fault: threading.Timer | None = None
        self.killed_at: float | None = None

    def _kill(self) -> None:
        try:
            os.kill(self.args.kill_pid, signal.SIGKILL)
        except OSError as exc:
            self.say(f"loadgen: could not kill {self.args.kill_pid}: {exc}")
            return
        self.killed_at = time.monotonic()

    def kill_workers(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()

    def send(self, message: dict) -> None:
        line = (json.dumps(message) + "\n").encode()
        for process in self.processes:
            process.stdin.write(line)
            process.stdin.flush()

    def expect(self, event: str) -> list[dict]:
        results = []
        for process in self.processes:
            while True:
                line = process.stdout.readline()
                if not line:
                    raise RuntimeError(f"a worker exited (status {process.wait()}) before '{event}'")
                message = json.loads(line)
                if message.get("event") == event:
                    results.append(message)
                    break
        return results

    def run(self) -> dict:
        args = self.args
        requested = args.stations
        workers = min(args.workers, requested)
        limits = raise_nofile_limit(-(-requested // workers) + FD_RESERVE)
        hard = limits["hard"]
        per_worker_cap = requested if hard == resource.RLIM_INFINITY else max(0, hard - FD_RESERVE)
        stations = min(requested, per_worker_cap * workers)
        limits["capped"] = stations < requested
        if limits["capped"]:
            limits["note"] = (f"open-files hard limit {hard} allows {per_worker_cap} stations per worker process: "
                              f"running {stations} of the {requested} requested (raise the hard limit, e.g. "
                              f"`ulimit -Hn`, or use more --workers)")
            self.say("loadgen: " + limits["note"])
        if stations == 0:
            raise Refused("the open-files limit leaves room for no station")
        timeouts = args.connect_timeout + args.duration + 2 * args.drain_timeout + 30
        deadline = time.monotonic() + timeouts
        watchdog = threading.Timer(timeouts + 10, self._watchdog)
        watchdog.daemon = True
        watchdog.start()
        indices = list(range(stations))
        base = {"url": self.url, "mode": args.mode, "mix": args.mix, "duration": args.duration,
                "connect_timeout": args.connect_timeout, "drain_timeout": args.drain_timeout,
                "connect_concurrency": 0 if args.storm else args.connect_concurrency,
                "id_prefix": args.id_prefix, "tag_prefix": args.tag_prefix, "deadline": deadline,
                "reconnect": args.reconnect, "call_timeout": args.call_timeout,
                "record_confirmed": args.confirmed_path is not None}
        for w in range(workers):
            mine = indices[w::workers]
            spec = dict(base, indices=mine, rate=args.rate * len(mine) / stations,
                        max_messages=-(-args.max_messages // workers) if args.max_messages else 0)
            self.processes.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        try:
            self.expect("loaded")
            server_before_connect = self.server()
            connect_at = time.monotonic() + 0.2
            self.send({"cmd": "connect", "t": connect_at})
            ready = self.expect("ready")
            go_at = time.monotonic() + 0.3
            self.send({"cmd": "go", "t": go_at})
            if args.announce:
                sys.stdout.write("loadgen: window open\n")
                sys.stdout.flush()
            if args.kill_pid is not None:
                self.fault = threading.Timer(max(0.0, go_at + args.kill_at - time.monotonic()), self._kill)
                self.fault.daemon = True
                self.fault.start()
            time.sleep(max(0.0, go_at - time.monotonic()))
            server_start = self.server()
            self.expect("stopped")  # at the window's end, or sooner when --max-messages is reached
            server_end = self.server()
            done = self.expect("done")
        finally:
            if self.fault is not None:
                self.fault.cancel()
            self.kill_workers()
            for process in self.processes:
                process.wait()
            watchdog.cancel()
        return self.summarise(requested, stations, limits, workers, ready, done, connect_at, go_at,
                              server_before_connect, server_start, server_end)

    def reconnect_summary(self, done: list, go_at: float) -> dict:
        seconds = sorted(s for d in done for s in d["reconnect_seconds"])
        back = [t for d in done for t in d["reconnected_at"]]
        killed = self.killed_at
        return {"count": len(seconds), "seconds_p50": percentile(seconds, 0.5), "seconds_max": seconds[-1] if seconds else None,
                "killed_pid": self.args.kill_pid, "killed_at_window_seconds": (killed - go_at) if killed else None,
                "seconds_from_kill_to_last_back": (max(back) - killed) if killed and back else None}

    def _watchdog(self) -> None:
        sys.stderr.write("loadgen: watchdog deadline reached; stopping the workers\n")
        self.kill_workers()
        os._exit(EXIT_WATCHDOG)

    def server(self):
        if self.args.server_pid is None:
            return None
        try:
            return read_proc(self.args.server_pid)
        except OSError:
            return None

    def say(self, text: str) -> None:
        if not self.args.quiet:
            sys.stderr.write(text + "\n")

    def summarise(self, requested, stations, limits, workers, ready, done, connect_at, go_at, server_before,
                  server_start, server_end) -> dict:
        args = self.args
        errors: dict[str, int] = {}
        for report in ready + done:
            for kind, n in report["errors"].items():
                errors[kind] = errors.get(kind, 0) + n
        accepted = sum(r["accepted"] for r in ready)
        last = [r["last_accepted"] for r in ready if r["last_accepted"] is not None]
        window_closed = max(d["window_closed"] for d in done)
        window = max(1e-9, min(window_closed, go_at + args.duration) - go_at)
        messages = sum(d["window_messages"] for d in done)
        by_action: dict[str, list] = {}
        for d in done:
            for action, values in d["samples"].items():
                by_action.setdefault(action, []).extend(values)
        everything = [v for values in by_action.values() for v in values]
        result = {
            "target": self.url, "resolved_addresses": self.addresses,
            "config": {"stations_requested": requested, "mix": args.mix, "mode": args.mode,
                       "rate": args.rate if args.mode == "rate" else None, "duration": args.duration,
                       "max_messages": args.max_messages, "storm": args.storm, "workers": workers},
            "stations": stations, "nofile": limits,
            "connect": {"connected": sum(r["connected"] for r in ready), "accepted": accepted,
                        "seconds_to_all_accepted": (max(last) - connect_at) if last and accepted == stations else None,
                        "seconds_to_last_accepted": (max(last) - connect_at) if last else None},
            "window": {"seconds": window, "messages": messages, "throughput": messages / window,
                       "offered_rate": args.rate if args.mode == "rate" else None},
            "latency_ms": latency_summary(everything),
            "latency_ms_by_action": {a: latency_summary(v) for a, v in sorted(by_action.items())},
            "late_sends": sum(d["late_sends"] for d in done),
            "errors": {"total": sum(errors.values()), "by_kind": errors},
        }
        if args.reconnect or args.kill_pid is not None:
            result["reconnect"] = self.reconnect_summary(done, go_at)
        if args.confirmed_path:
            confirmed = {}
            for d in done:
                confirmed.update(d["confirmed"] or {})
            with open(args.confirmed_path, "w") as f:
                json.dump(confirmed, f)
            result["confirmed"] = {"transactions": len(confirmed), "stopped": sum(e["stopped"] for e in confirmed.values()),
                                   "meter_values": sum(len(e["samples"]) for e in confirmed.values()),
                                   "path": args.confirmed_path}
        if server_start and server_end:
            cpu = server_end["cpu_seconds"] - server_start["cpu_seconds"]
            connected = result["connect"]["connected"]
            baseline = server_before["rss_kib"] if server_before else None
            result["server"] = {
                "pid": args.server_pid, "cpu_seconds": cpu,
                "cpu_us_per_message": cpu / messages * 1e6 if messages else None,
                "cpu_utilisation": cpu / window,
                "rss_baseline_kib": baseline, "rss_kib": server_end["rss_kib"],
                "peak_rss_kib": server_end["peak_rss_kib"],
                "rss_per_station_kib": ((server_end["rss_kib"] - baseline) / connected
                                        if baseline is not None and connected else None),
            }
        return result


def human(result: dict) -> str:
    lat = result["latency_ms"]
    fmt = (lambda v: "-" if v is None else f"{v:.2f}")
    lines = [f"{result['stations']} stations, {result['config']['mix']} {result['config']['mode']}"
             f"{' storm' if result['config']['storm'] else ''}: {result['window']['messages']} replies in "
             f"{result['window']['seconds']:.2f} s = {result['window']['throughput']:.0f} msg/s; latency ms "
             f"p50 {fmt(lat['p50'])} p90 {fmt(lat['p90'])} p99 {fmt(lat['p99'])} max {fmt(lat['max'])}; "
             f"errors {result['errors']['total']}"]
    if result["config"]["storm"]:
        lines.append(f"storm: {result['connect']['accepted']}/{result['stations']} Accepted after "
                     f"{fmt(result['connect']['seconds_to_last_accepted'])} s")
    server = result.get("server")
    if server:
        lines.append(f"server: {fmt(server['cpu_us_per_message'])} µs CPU/message, peak RSS "
                     f"{server['peak_rss_kib']} KiB, {fmt(server['rss_per_station_kib'])} KiB/station")
    if result["errors"]["total"]:
        lines.append(f"errors: {result['errors']['by_kind']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except Refused as exc:
        sys.stderr.write(f"loadgen: refused: {exc}\n")
        return EXIT_REFUSED
    if args.worker is not None:
        return worker_main(args.worker)
    try:
        url, addresses = resolve_loopback_url(args.url)
    except Refused as exc:
        sys.stderr.write(f"loadgen: refused: {exc}\n")
        return EXIT_REFUSED
    try:
        result = Coordinator(args, url, addresses).run()
    except Refused as exc:
        sys.stderr.write(f"loadgen: refused: {exc}\n")
        return EXIT_REFUSED
    text = json.dumps(result, indent=2)
    if args.json_path:
        with open(args.json_path, "w") as f:
            f.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    if not args.quiet:
        sys.stderr.write(human(result) + "\n")
    return EXIT_OK if result["errors"]["total"] == 0 else EXIT_ERRORS


if __name__ == "__main__":
    sys.exit(main())
