"""Signed-in dashboard sessions, held in memory: a restart signs everyone out.

A session id is 32 random bytes, issued at sign-in (never taken from the client: no fixation) and
dropped at sign-out, after ``session_idle_timeout`` seconds unused, or after ``session_max_age``
seconds whatever the use. Each session has its own CSRF token, checked on every POST.
"""
from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field

from csms.api.tokens import Caller


@dataclass
class Session:
    id: str
    caller: Caller
    csrf_token: str
    created_at: float
    last_used: float
    #: Answers to show once, on the next page (the outcome of a command sent from a form).
    flashes: list = field(default_factory=list)
    #: Event streams this session has open.
    streams: int = 0

    def csrf_matches(self, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(presented.encode("utf-8", "replace"),
                                                       self.csrf_token.encode("utf-8"))


class SessionStore:
    """Sessions by id; time from the CSMS's clock."""

    def __init__(self, clock, idle_timeout: float, max_age: float, max_sessions: int):
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_age = max_age
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, caller: Caller) -> Session:
        self.expire()
        while len(self._sessions) >= self.max_sessions:
            # Full: the least recently used session goes, not the operator signing in now.
            oldest = min(self._sessions.values(), key=lambda s: s.last_used)
            del self._sessions[oldest.id]
        now = self.clock.seconds()
        session = Session(secrets.token_urlsafe(32), caller, secrets.token_urlsafe(32), now, now)
        self._sessions[session.id] = session
        return session

    def alive(self, session: Session) -> bool:
        now = self.clock.seconds()
        return (self._sessions.get(session.id) is session and now - session.last_used <= self.idle_timeout
                and now - session.created_at <= self.max_age)

    def get(self, session_id: str | None, touch: bool = True) -> Session | None:
        """The live session with that id (its idle time restarting when ``touch``), or None."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if not self.alive(session):
            del self._sessions[session_id]
            return None
        if touch:
            session.last_used = self.clock.seconds()
        return session

    def end(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    def expire(self) -> None:
        for session in [s for s in self._sessions.values() if not self.alive(s)]:
            del self._sessions[session.id]


class SignInThrottle:
    """Failed sign-ins per client address: past ``limit`` in ``window`` seconds, that address is refused
    (429) until the window has passed, before any token is looked up. Remembers at most ``max_addresses``
    (the oldest forgotten first), so a flood from many addresses cannot grow it without bound."""

    def __init__(self, clock, limit: int, window: float = 60.0, max_addresses: int = 10_000):
        self.clock = clock
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._failures: dict[str, list[float]] = {}

    def _recent(self, address: str) -> list[float]:
        cutoff = self.clock.seconds() - self.window
        times = [t for t in self._failures.get(address, ()) if t > cutoff]
        if times:
            self._failures[address] = times
        else:
            self._failures.pop(address, None)
        return times

    def refused(self, address: str) -> bool:
        return len(self._recent(address)) >= self.limit

    def failed(self, address: str) -> None:
        times = self._recent(address)
        if not times:
            while len(self._failures) >= self.max_addresses:
                del self._failures[next(iter(self._failures))]
        self._failures[address] = times + [self.clock.seconds()]
