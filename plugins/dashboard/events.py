"""Server-Sent Events at /ui/events: what the framework's event hooks report, pushed to signed-in pages.

Bounded everywhere: at most ``sse_max_streams_per_session`` streams per session and ``sse_max_streams``
in all (one more is answered 429); a keepalive comment every ``sse_keepalive`` seconds (so that proxies
and idle timers keep the connection, and a stream whose session ended is closed); a consumer that stops
reading has at most ``sse_max_queued`` events waiting for it, then its stream is closed (the page's
EventSource reconnects, and the page says it missed updates until it is reloaded) rather than buffered
without bound.
"""
from __future__ import annotations

from twisted.internet import task
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from csms.api.resource import to_json

log = Logger(namespace="csms.dashboard")


def frame(event: str, data: dict) -> bytes:
    """One SSE message; the JSON has no raw newline, so it is one ``data:`` line."""
    return b"event: " + event.encode("ascii") + b"\ndata: " + to_json(data) + b"\n\n"


KEEPALIVE = b": keepalive\n\n"


@implementer(IPushProducer)
class Stream:
    """One open event stream: writes while the client reads, queues a little while it does not."""

    def __init__(self, broker, request, session, transaction: int | None = None):
        self.broker = broker
        self.request = request
        self.session = session
        #: The transaction whose meter values this stream gets (its page draws them), if any.
        self.transaction = transaction
        self.paused = False
        self.queued: list[bytes] = []
        self.closed = False

    # IPushProducer: the transport tells us when the client's socket stops draining.
    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        queued, self.queued = self.queued, []
        for data in queued:
            if self.closed or self.paused:
                self.queued.append(data)
            else:
                self.request.write(data)

    def stopProducing(self):
        self.close()

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.paused:
            self.request.write(data)
            return
        if len(self.queued) >= self.broker.max_queued:
            log.info("Dashboard event stream of {name} dropped: it reads too slowly", name=self.session.caller.name)
            self.close(finish=True)
            return
        self.queued.append(data)

    def close(self, finish: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.broker.forget(self)
        if finish and not self.request.finished and not self.request._disconnected:
            self.request.unregisterProducer()
            self.request.finish()


class EventBroker:
    def __init__(self, clock, sessions, max_streams: int, max_per_session: int, max_queued: int,
                 keepalive: float):
        self.clock = clock
        self.sessions = sessions
        self.max_streams = max_streams
        self.max_per_session = max_per_session
        self.max_queued = max_queued
        self.keepalive = keepalive
        self.streams: list[Stream] = []
        self._ticker = None
        #: ``callback(tick)`` after a stream opened or closed (False), and at every keepalive (True).
        self._watchers: list = []

    def watch(self, callback) -> None:
        self._watchers.append(callback)

    def _changed(self, tick: bool) -> None:
        for callback in self._watchers:
            try:
                callback(tick)
            except Exception:
                log.failure("Dashboard: a watcher of the event streams failed")

    def refusal(self, session) -> str | None:
        """Why one more stream for ``session`` is refused, or None."""
        if len(self.streams) >= self.max_streams:
            return "The dashboard serves as many event streams as it may: try again later"
        if session.streams >= self.max_per_session:
            return f"This session has {session.streams} event streams open already (close a tab)"
        return None

    def open(self, request, session, transaction: int | None = None) -> Stream:
        stream = Stream(self, request, session, transaction)
        session.streams += 1
        self.streams.append(stream)
        request.setHeader("content-type", "text/event-stream; charset=utf-8")
        request.setHeader("cache-control", "no-store")
        request.setHeader("x-accel-buffering", "no")
        request.registerProducer(stream, True)
        request.notifyFinish().addBoth(lambda _: stream.close())
        # The client reconnects after this long when the stream drops.
        request.write(b"retry: 3000\n\n")
        self._start_ticker()
        self._changed(False)
        return stream

    def forget(self, stream: Stream) -> None:
        if stream in self.streams:
            self.streams.remove(stream)
            stream.session.streams -= 1
            self._changed(False)
        if not self.streams:
            self._stop_ticker()

    def publish(self, event: str, data: dict) -> None:
        """To every stream; a ``meter`` event only to the streams of its transaction."""
        if event == "meter":
            streams = [stream for stream in self.streams if stream.transaction == data.get("transaction_id")]
        else:
            streams = list(self.streams)
        if not streams:
            return
        message = frame(event, data)
        for stream in streams:
            stream.send(message)

    def watched(self) -> frozenset:
        """The transactions whose meter values a stream here gets."""
        return frozenset(stream.transaction for stream in self.streams if stream.transaction is not None)

    def close_session(self, session) -> None:
        for stream in [s for s in self.streams if s.session is session]:
            stream.close(finish=True)

    def tick(self) -> None:
        for stream in list(self.streams):
            if not self.sessions.alive(stream.session):
                stream.close(finish=True)
            else:
                stream.send(KEEPALIVE)
        if self.streams:
            self._changed(True)

    def _start_ticker(self):
        if self._ticker is None:
            self._ticker = task.LoopingCall(self.tick)
            self._ticker.clock = self.clock
            self._ticker.start(self.keepalive, now=False)

    def _stop_ticker(self):
        if self._ticker is not None:
            if self._ticker.running:
                self._ticker.stop()
            self._ticker = None

    def stop(self) -> None:
        for stream in list(self.streams):
            stream.close(finish=True)
        self._stop_ticker()


def meter_points(samples) -> dict:
    """{"energy": [[iso time, Wh]], "power": [[iso time, W]]} from ``(timestamp, measurand, unit, value,
    phase)`` tuples: the whole-connector readings a chart can draw (a per-phase one is left out)."""
    out = {"energy": [], "power": []}
    for timestamp, measurand, unit, value, phase in samples:
        if phase:
            continue
        measurand = measurand or "Energy.Active.Import.Register"
        unit = unit or "Wh"
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if measurand == "Energy.Active.Import.Register" and unit in ("Wh", "kWh"):
            out["energy"].append([timestamp, number * (1000 if unit == "kWh" else 1)])
        elif measurand == "Power.Active.Import" and unit in ("W", "kW"):
            out["power"].append([timestamp, number * (1000 if unit == "kW" else 1)])
    for series in out.values():
        series.sort(key=lambda point: point[0])
    return out


def request_samples(meter_values: list) -> list:
    """A MeterValues request's ``meterValue`` list as meter_points' tuples."""
    rows = []
    for meter_value in meter_values or ():
        for sampled in meter_value.get("sampledValue", ()):
            rows.append((meter_value.get("timestamp"), sampled.get("measurand"), sampled.get("unit"),
                         sampled.get("value"), sampled.get("phase")))
    return rows

