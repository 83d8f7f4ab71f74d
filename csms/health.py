"""Readiness: the named checks ``/readyz`` runs (the database, the listeners, and whatever is added).

A check is a callable taking no argument. It answers None (or True) when ready, or a short text saying
what is wrong (False: "not ready"); it may return a Deferred or a coroutine of that, and raising (or
failing) means not ready too. Each check gets ``[metrics] readiness_timeout`` seconds of the app's clock.

``/readyz`` is reachable without credentials, so the work per request is bounded: while the checks run,
every further request waits for that same run instead of starting another (one database query in flight
at most, however many requests arrive).
"""
from __future__ import annotations

from twisted.internet import defer
from twisted.python.failure import Failure

#: Longest problem text a check's failure is reported with.
MAX_PROBLEM_LENGTH = 200


class Readiness:
    """The checks of one Central System; :meth:`run` fires with ``{name: None or problem}``."""

    def __init__(self, clock, timeout: float):
        self.clock = clock
        self.timeout = timeout
        self.checks: dict = {}
        self._waiting: list[defer.Deferred] = []

    def add(self, name: str, check) -> None:
        """Add the check ``name``; ValueError when a check of that name exists (two parts would shadow each other)."""
        if name in self.checks:
            raise ValueError(f"a readiness check named {name!r} exists already")
        self.checks[name] = check

    def run(self) -> defer.Deferred:
        """Fires with ``{name: None (ready) or a problem text}`` for every check; never fails."""
        waiter = defer.Deferred()
        self._waiting.append(waiter)
        if len(self._waiting) == 1:
            names = list(self.checks)
            running = [self._bounded(self.checks[name]) for name in names]
            defer.gatherResults(running).addCallback(lambda problems: self._report(dict(zip(names, problems))))
        return waiter

    def _report(self, outcome: dict) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(dict(outcome))

    def _bounded(self, check) -> defer.Deferred:
        """The check's problem (None when ready), or a timeout's: fires within ``timeout`` whatever the check does."""
        from csms.app import as_deferred

        result = defer.Deferred()

        def settle(problem):
            if not result.called:
                result.callback(problem)

        timer = self.clock.callLater(self.timeout, settle, f"no answer within {self.timeout:g} s")

        def answered(outcome):
            if timer.active():
                timer.cancel()
            settle(problem_of(outcome))

        try:
            as_deferred(check()).addBoth(answered)
        except Exception:  # noqa: BLE001 - a check that raises at once is a failed check
            answered(Failure())
        return result


def problem_of(outcome) -> str | None:
    """What a check's answer says: None when ready, else a short text."""
    if outcome is None or outcome is True:
        return None
    if outcome is False:
        return "not ready"
    if isinstance(outcome, Failure):
        exc = outcome.value
        orig = getattr(exc, "orig", None)  # SQLAlchemy wraps the driver's error
        text = str(orig if orig is not None else exc).strip().splitlines()
        described = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
        return described[:MAX_PROBLEM_LENGTH]
    return str(outcome)[:MAX_PROBLEM_LENGTH]


def database_check(db):
    """A check: the database answers a trivial query through the pool (behind whatever is queued there)."""
    def select_one(conn):
        return conn.exec_driver_sql("SELECT 1").scalar()

    def check():
        return db.run(select_one, desc="readiness").addCallback(
            lambda value: None if value == 1 else f"SELECT 1 answered {value!r}")
    return check
