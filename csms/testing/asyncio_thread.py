"""Run asyncio code (such as the ``ocpp`` package's ChargePoint) beside the Twisted reactor in tests.

The asyncio loop runs on its own daemon thread; :meth:`AsyncioThread.run` schedules a coroutine there
and returns a Deferred that fires on the reactor thread, so a test awaits it without blocking the reactor.
"""
from __future__ import annotations

import asyncio
import threading

from twisted.internet import defer

DEFAULT_TIMEOUT = 15.0


class AsyncioThread:
    def __init__(self, name: str = "asyncio-interop", reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def start(self) -> None:
        """Kept for symmetry with :meth:`stop`; the loop already runs from construction."""

    def run(self, coroutine, timeout: float = DEFAULT_TIMEOUT) -> defer.Deferred:
        """Fires on the reactor with the coroutine's result or failure; cancelling it cancels the coroutine."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        d = defer.Deferred(lambda _: future.cancel())

        def settle(done):
            if d.called:
                return  # already timed out (and cancelled)
            if done.cancelled():
                d.errback(defer.CancelledError())
            elif done.exception() is not None:
                d.errback(done.exception())
            else:
                d.callback(done.result())
        future.add_done_callback(lambda done: self.reactor.callFromThread(settle, done))
        return d.addTimeout(timeout, self.reactor)

    submit = run

    def stop(self, timeout: float = 10.0) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)
        if not self.thread.is_alive() and not self.loop.is_closed():
            self.loop.close()
