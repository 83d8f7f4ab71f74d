"""Delivery: claims due deliveries, POSTs them with treq beside the OCPP traffic, records the outcome.

Everything here runs on the reactor thread and never inside a database function: a claim is a
database pass (dead-letter what is too old, read what is due); POSTs start after
it has committed. Claimed deliveries wait in memory, per subscription, and are sent at most
``max_concurrent_per_subscription`` at a time for one subscription and ``max_concurrent_deliveries``
in all. A failed POST holds the whole subscription back until its retry time (exponential backoff with
jitter), so a dead receiver costs one attempt per backoff step, not one per event. Delivery is at
least once: a delivery is pending until its successful outcome is committed, so one sent just before a
crash is sent again after the restart, with the same event id.
"""
from __future__ import annotations

import hashlib
import hmac
import random
from collections import Counter, deque
from datetime import datetime, timezone

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.web.client import (Agent, HTTPConnectionPool, RequestNotSent, RequestTransmissionFailed, ResponseDone,
                                ResponseNeverReceived)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from .guard import CheckedEndpointFactory, ReceiverRefused
from .store import DEAD, DELIVERED, METER_VALUES, METER_VALUES_BATCH, PENDING, batch_body, batch_event_id

log = Logger(namespace="csms.webhooks")

USER_AGENT = b"csms-webhooks/1"
#: Seconds (on the app's clock) between two looks for deliveries too old to keep trying.
SWEEP_INTERVAL = 60.0
#: Most outbox events a pass turns into deliveries (webhooks_outbox: see WebhookStore.fan_out).
FAN_OUT_LIMIT = 1000
#: Seconds between a POST's outcome and the pass that records it and claims what came meanwhile (see
#: Dispatcher._poke_after_a_while): at 1,000 events a second, about two passes (a commit and a read each)
#: a second, and about 60 meter values per POST. With a delivery per event, 0.5 s made bursts that
#: SQLite's OCPP p99 felt (0.1 s was shipped then); with a delivery per batch a pass writes a few rows,
#: and 0.5 s about halved the worker's CPU against 0.1 s (docs/benchmarks.md, fourth round).
REPASS_DELAY = 0.5


def _closed_unanswered(failure: Failure) -> bool:
    """Whether a POST failed because its connection closed (cleanly or not) before any answer came: what
    a kept-alive connection the receiver has just closed does (an HTTP/1.0 server such as Python's
    http.server closes after each answer, which Twisted's pool does not take for a close; a server's idle
    timeout can meet the next request). Not a timeout, a refusal or a cancellation."""
    value = failure.value
    if isinstance(value, RequestNotSent):
        return True
    if isinstance(value, (ResponseNeverReceived, RequestTransmissionFailed)):
        return bool(value.reasons) and all(reason.check(ConnectionDone, ConnectionLost) for reason in value.reasons)
    return False


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """``Webhook-Signature``: ``v1=`` + hex HMAC-SHA256 over ``<timestamp>.<body>`` keyed with the secret."""
    mac = hmac.new(secret.encode("utf-8"), str(timestamp).encode("ascii") + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


class Job:
    """One POST: a delivery (of an event, or of a batch of meter values: see store._move_in_batches), or
    a batch of meter_values.received deliveries, as an earlier release fanned them out (one per event,
    batched here when sent)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        first = rows[0]
        self.subscription_id = first["subscription_id"]
        self.url = first["url"]
        self.secret = first["secret"]
        self.attempt = max(row["attempts"] for row in rows) + 1
        self.created_at = min(row["created_at"] for row in rows)
        if len(rows) == 1 and first["event_type"] != METER_VALUES:
            self.event_id, self.event_type, self.body = first["event_id"], first["event_type"], first["body"].encode()
        else:
            self.event_id = batch_event_id([row["event_id"] for row in rows])
            self.event_type = METER_VALUES_BATCH
            self.body = batch_body(self.event_id, self.created_at, [row["body"] for row in rows]).encode()

    @property
    def ids(self) -> list[int]:
        return [row["id"] for row in self.rows]


@implementer(IBodyProducer)
class _Body:
    """A request body written at once, in the same reactor turn as the headers: one send() for both.
    (FileBodyProducer writes it a turn later, and every send costs a GIL hand-off to the database threads.)"""

    def __init__(self, body: bytes):
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class _BoundedBody(Protocol):
    """Reads at most ``limit`` bytes of a response body, then drops the connection: a receiver that
    answers with an endless body costs nothing more."""

    def __init__(self, limit: int, done: defer.Deferred):
        self.limit, self.done, self.parts, self.size = limit, done, [], 0

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.parts.append(data[:self.limit - self.size])
        self.size += len(self.parts[-1])
        if self.size >= self.limit:
            self.done.callback(b"".join(self.parts))
            self.transport.stopProducing()

    def connectionLost(self, reason) -> None:
        if not self.done.called:
            if reason.check(ResponseDone, PotentialDataLoss):
                self.done.callback(b"".join(self.parts))
            else:
                self.done.errback(reason)


class Dispatcher(service.Service):
    """Polls every ``poll_interval`` seconds (on the app's clock), and again at once while there is more."""

    name = "webhooks-dispatcher"

    def __init__(self, store, settings: dict, reactor, clock, guard, may_deliver, rng: random.Random | None = None,
                 count=None):
        self.store = store
        self.settings = settings
        #: Whether this process may deliver now: the cluster's leader (in the CSMS process), or the holder
        #: of the delivery lock (in the delivery worker, csms_plugins.webhooks.worker).
        self.may_deliver = may_deliver
        #: ``count(outcome, n)``: deliveries ``delivered`` or ``dead``, POSTs ``failed`` (the metrics).
        self.count = count or (lambda outcome, n: None)
        self.reactor = reactor
        self.clock = clock
        self.random = rng or random.Random()
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        # Idle connections kept per receiving host and port, which several subscriptions may share: as many
        # as may be in flight to it at once, so that none is closed only to be opened again (a new
        # connection costs an address check on a resolver thread, and a TCP handshake).
        self.pool.maxPersistentPerHost = self.settings["max_concurrent_deliveries"]
        endpoints = CheckedEndpointFactory(reactor, guard, self.settings["request_timeout"])
        self.agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self.pool)
        #: A POST whose connection closed before any answer (see _closed_unanswered) is sent once more at
        #: once, on a connection of its own: at least once allows it, and the receiver sees the same id.
        self.fresh_agent = Agent.usingEndpointFactory(reactor, endpoints,
                                                      pool=HTTPConnectionPool(reactor, persistent=False))
        self.queues: dict[int, deque] = {}
        self.claimed: set[int] = set()
        self.active: Counter = Counter()
        #: Deferreds of the jobs started and not yet recorded; ``posting``: the POSTs among them still running.
        self.jobs: set = set()
        self.posting: dict = {}
        #: POSTs over, their outcomes not yet written: (outcome, Deferred fired once it is committed). The
        #: next pass writes them, in its own transaction (store.fan_out).
        self._outcomes: list = []
        #: Fires (and is replaced) when a POST ends: drain() waits for it.
        self._posted = defer.Deferred()
        #: subscription id -> clock time before which it is not tried again (after a failure)
        self.held_until: dict[int, float] = {}
        self.stats = Counter()
        self._pass: defer.Deferred | None = None
        self._again = False
        self._soon = None
        self._last_purge = None
        self._last_sweep = None
        #: While a pass reads: the deliveries released since it began (see _run_pass).
        self._settled: set | None = None
        self._loop = task.LoopingCall(self.poke)
        self._loop.clock = clock

    # -- lifecycle -------------------------------------------------------------------------------

    def startService(self):
        service.Service.startService(self)
        self._loop.start(self.settings["poll_interval"], now=True)

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        if self._loop.running:
            self._loop.stop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        if self._pass is not None:
            try:
                yield self._pass
            except Exception:  # its database work dropped at shutdown (DatabaseStopped): nothing to finish
                pass
        self.queues.clear()
        for request in list(self.posting.values()):
            request.cancel()  # still pending in the database: sent again after the restart
        if self._outcomes:  # POSTs that ended since the last pass: no pass will come to write their outcomes
            try:
                yield self._write_outcomes(self.store.record_outcomes)
            except Exception:  # logged: those deliveries stay pending, sent again after the restart
                pass
        if self.jobs:
            yield defer.DeferredList(list(self.jobs))
        yield self.pool.closeCachedConnections()
        log.info("Webhooks: {delivered} deliveries made, {failed} POSTs failed, {dead} dead-lettered, "
                 "{passes} passes", delivered=self.stats["delivered"], failed=self.stats["failed"],
                 dead=self.stats["dead"], passes=self.stats["passes"])

    # -- passes ----------------------------------------------------------------------------------

    def poke(self) -> None:
        """Run a pass now, or right after the one running, if this process may deliver: one process
        delivers for the whole database (docs/webhooks.md), as its claims live in its memory."""
        if not self.running:
            return
        if not self.may_deliver():
            if self._outcomes:  # POSTs this process made (before another took over): recorded all the same
                self._write_outcomes(self.store.record_outcomes).addErrback(lambda _: None)  # logged there
            return
        if self._pass is not None:
            self._again = True
            return
        self._pass = self._run_pass()
        self._pass.addErrback(lambda failure: log.failure("Webhook delivery pass failed", failure))
        self._pass.addBoth(self._pass_done)

    def _pass_done(self, _):
        self._pass = None
        if self._again and self.running:
            self._again = False
            if self._soon is not None and self._soon.active():
                self._soon.cancel()
            self._soon = self.reactor.callLater(0, self.poke)

    def drain(self) -> defer.Deferred:
        """Fires once nothing is due or in flight any more (for tests and benchmarks)."""
        @defer.inlineCallbacks
        def loop():
            while True:
                if self._pass is not None:
                    yield self._pass
                started = yield self._run_pass_guarded()
                if self.posting:
                    yield self._posted  # a POST ended: the next pass writes its outcome
                    continue
                if self._outcomes or self.jobs:
                    continue
                if not started:
                    return
        return loop()

    def _run_pass_guarded(self):
        self._pass = d = self._run_pass()

        def done(result):
            self._pass = None
            return result
        return d.addBoth(done)

    @defer.inlineCallbacks
    def _run_pass(self):
        self.stats["passes"] += 1
        settings = self.settings
        now = self.clock.seconds()
        self.held_until = {sub: until for sub, until in self.held_until.items() if until > now}
        full = {sub for sub, count in self.active.items() if count >= settings["max_concurrent_per_subscription"]}
        if self._last_sweep is None or now - self._last_sweep >= SWEEP_INTERVAL:
            # A write, and rarely needed (a failed POST dead-letters its own deliveries): not every pass.
            self._last_sweep = now
            purge_before = None
            if self._last_purge is None or now - self._last_purge >= 3600:
                self._last_purge = now
                purge_before = _utc(now - settings["history_retention"])
            dead = yield self.store.expire(sorted(self.claimed), _utc(now - settings["dead_letter_after"]),
                                           purge_before)
            if purge_before is not None and self.store.purge_unfinished:
                self._last_purge = None  # the rest at the next sweep, not in an hour
            if dead:
                log.warn("Webhooks: {count} deliveries dead-lettered (older than {age} s)", count=dead,
                         age=settings["dead_letter_after"])
            self.stats["dead"] += dead
            self.count("dead", dead)
        # Events written since the last pass become deliveries (webhooks_outbox -> webhooks_deliveries), in
        # the transaction that records the outcomes of the POSTs that ended since then.
        moved = yield self._write_outcomes(lambda outcomes: self.store.fan_out(
            FAN_OUT_LIMIT, outcomes, settings["meter_values_batch_size"]))
        if moved >= FAN_OUT_LIMIT:
            self._again = True  # more is waiting
        # (After the outcomes: their deliveries were released.)
        room = settings["batch_size"] - len(self.claimed)
        if room <= 0:
            return 0
        # Deliveries recorded from here on were read by this pass as still pending, if its read began
        # before their outcome committed: _queue leaves them out.
        self._settled = set()
        try:
            due = yield self.store.due(sorted(self.claimed), room,
                                       skip_subscriptions=sorted(set(self.held_until) | full))
        finally:
            settled, self._settled = self._settled, None
        added = self._queue(due, settled)
        started = self._start_ready()
        if len(due) >= room:
            self._again = True  # more is waiting
        return added + started

    def _queue(self, rows: list[dict], settled=frozenset()) -> int:
        batch = self.settings["meter_values_batch_size"]
        by_subscription: dict[int, list] = {}
        for row in rows:
            if row["id"] in self.claimed or row["id"] in settled or row["subscription_id"] in self.held_until:
                continue
            self.claimed.add(row["id"])
            by_subscription.setdefault(row["subscription_id"], []).append(row)
        for subscription_id, sub_rows in by_subscription.items():
            queue = self.queues.setdefault(subscription_id, deque())
            meter: list = []
            for row in sub_rows:
                if row["event_type"] == METER_VALUES:
                    meter.append(row)
                    if len(meter) >= batch:
                        queue.append(Job(meter))
                        meter = []
                else:
                    queue.append(Job([row]))
            if meter:
                queue.append(Job(meter))
        return len(rows)

    def _start_ready(self) -> int:
        settings = self.settings
        started = 0
        for subscription_id in list(self.queues):
            queue = self.queues[subscription_id]
            while queue and len(self.posting) < settings["max_concurrent_deliveries"] and \
                    self.active[subscription_id] < settings["max_concurrent_per_subscription"]:
                self._start(queue.popleft())
                started += 1
            # A POST that failed at once (a refused address) has dropped the subscription's queue.
            if not queue and self.queues.get(subscription_id) is queue:
                del self.queues[subscription_id]
        return started

    # -- one POST --------------------------------------------------------------------------------

    def _start(self, job: Job) -> None:
        self.active[job.subscription_id] += 1
        request = self.posting[job] = self._post(job)
        d = request.addBoth(self._finished, job, request)
        self.jobs.add(d)

    def _post(self, job: Job) -> defer.Deferred:
        timestamp = int(self.clock.seconds())
        headers = {
            b"Content-Type": [b"application/json"], b"User-Agent": [USER_AGENT],
            b"Webhook-Id": [job.event_id.encode()], b"Webhook-Timestamp": [str(timestamp).encode()],
            b"Webhook-Signature": [signature(job.secret, timestamp, job.body).encode()],
            b"Webhook-Event-Type": [job.event_type.encode()], b"Webhook-Attempt": [str(job.attempt).encode()],
        }
        url = job.url.encode("utf-8")
        d = self.agent.request(b"POST", url, Headers(headers), _Body(job.body))

        def again(failure):
            if not _closed_unanswered(failure):
                return failure
            log.debug("Webhook {event}: the connection closed unanswered; sent again on a new one",
                      event=job.event_id)
            return self.fresh_agent.request(b"POST", url, Headers(headers), _Body(job.body))
        d.addErrback(again)

        def read(response):
            done = defer.Deferred()
            response.deliverBody(_BoundedBody(self.settings["max_response_bytes"], done))
            return done.addCallback(lambda body: (response.code, body))
        d.addCallback(read)
        return d.addTimeout(self.settings["request_timeout"], self.clock, onTimeoutCancel=_timed_out)

    def _finished(self, outcome, job: Job, d):
        # The POST is over: its slot is free now; its deliveries stay claimed until the outcome is committed.
        del self.posting[job]
        self.active[job.subscription_id] -= 1
        if self.active[job.subscription_id] <= 0:
            del self.active[job.subscription_id]
        now = self.clock.seconds()
        code, error = None, None
        if isinstance(outcome, tuple):
            code, body = outcome
            if not 200 <= code < 300:
                error = f"HTTP {code}" + (f": {body.decode('utf-8', 'replace')[:200]}" if body else "")
        elif not self.running:
            self._release(job, d)
            self._post_ended()
            return None  # cut short by stopping: the delivery stays pending, sent again after the restart
        elif outcome.check(defer.TimeoutError):
            error = f"no answer within {self.settings['request_timeout']:g} s"
        elif outcome.check(ReceiverRefused):
            error = outcome.value.message
        else:
            error = f"{type(outcome.value).__name__}: {outcome.getErrorMessage()}"
        if error is None:
            state, next_at = DELIVERED, now
            self.held_until.pop(job.subscription_id, None)
            self.stats["delivered"] += len(job.rows)
            self.count("delivered", len(job.rows))
        else:
            delay = self.backoff(job.attempt)
            next_at = now + delay
            state = PENDING
            if next_at - job.created_at.timestamp() >= self.settings["dead_letter_after"]:
                state = DEAD
                self.stats["dead"] += len(job.rows)
                self.count("dead", len(job.rows))
            self.stats["failed"] += 1
            self.count("failed", 1)
            # Hold the subscription back: its other events would meet the same receiver.
            self.held_until[job.subscription_id] = next_at
            for dropped in self.queues.pop(job.subscription_id, ()):
                self.claimed.difference_update(dropped.ids)
            log.info("Webhook {event} to subscription {sub} failed (attempt {attempt}): {error}",
                     event=job.event_id, sub=job.subscription_id, attempt=job.attempt, error=error)
        recorded = self._record((job.ids, state, _utc(next_at), _utc(now), code, error))
        recorded.addBoth(lambda _: self._release(job, d))
        self._post_ended()
        if self.running:
            self._start_ready()
        return recorded

    def _post_ended(self) -> None:
        posted, self._posted = self._posted, defer.Deferred()
        posted.callback(None)

    def _record(self, outcome: tuple) -> defer.Deferred:
        """Fires once ``outcome`` is committed, by the next pass (in a while: every POST that ends meanwhile
        shares its transaction, and the events that came meanwhile are moved in by it too)."""
        done = defer.Deferred()
        self._outcomes.append((outcome, done))
        if self.running:
            self._poke_after_a_while()
        return done

    def _write_outcomes(self, write) -> defer.Deferred:
        """``write(outcomes)`` with the outcomes queued so far; then their deliveries are released, whether
        the write committed or failed (a failure leaves them pending in the database, to be sent again).
        Fires with what ``write`` fired with, or fails as it did."""
        batch, self._outcomes = self._outcomes, []

        def written(result):
            if isinstance(result, Failure) and batch:
                log.warn("Recording {count} webhook outcomes failed (their deliveries stay pending): {error}",
                         count=len(batch), error=result.getErrorMessage())
            for _, done in batch:
                done.callback(None)
            return result
        return write([outcome for outcome, _ in batch]).addBoth(written)

    def _release(self, job: Job, d) -> None:
        self.jobs.discard(d)
        self.claimed.difference_update(job.ids)
        if self._settled is not None:
            self._settled.update(job.ids)
        if self.running and not self.queues:
            self._poke_after_a_while()

    def _poke_after_a_while(self) -> None:
        """A pass a moment later: the events written meanwhile go in one read and in fuller batches, instead
        of a pass (a read, a POST, an outcome write) per few events at once."""
        if self._soon is None or not self._soon.active():
            self._soon = self.reactor.callLater(REPASS_DELAY, self.poke)

    def backoff(self, attempt: int) -> float:
        """Seconds before attempt ``attempt + 1``: doubling from retry_initial_delay up to retry_max_delay,
        the second half of it random (jitter: receivers that failed together are not retried together)."""
        base = min(self.settings["retry_max_delay"], self.settings["retry_initial_delay"] * 2 ** (attempt - 1))
        return base / 2 + self.random.random() * base / 2


def _timed_out(result, timeout):
    """addTimeout's outcome once the request was cancelled (Agent reports that as ResponseNeverReceived)."""
    return Failure(defer.TimeoutError(f"no answer within {timeout:g} s"))


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)

