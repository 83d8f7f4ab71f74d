"""The event outbox: events written in the database transaction of the change that caused them.

A store calls ``app.outbox.add(conn, event_type, data)`` inside the ``thd`` function that makes the
change, so the event commits with the change or not at all: a crash can neither lose it nor announce a
change that was rolled back, and a function the pool reruns writes it again only in the transaction
that commits. Delivering events (webhooks) is a plugin's business: it attaches a writer and says which
event types anyone wants; until then, and for types nobody wants, ``add`` does nothing.

Event types form an open registry: a plugin registers its own in ``csms_configure`` with
``app.outbox.register(name, description, example)`` and then adds events of them (docs/hooks.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

#: An event type name: lower-case words separated by dots or underscores ("transaction.started").
EVENT_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")


class UnknownEventType(ValueError):
    """``add`` was given an event type nobody registered: a programming error in the caller."""


@dataclass(frozen=True)
class StoredRows:
    """Where the events of a type can be read from instead of being written as outbox rows: the rows
    the change stores anyway (meter values: the samples), in the order of ``key``, an integer primary key
    given in increasing order. ``events(rows)`` makes the events of rows read in that order: a list of
    ``(index of the event's first row, data)``, each event's rows in one run.

    A delivering side may read events from such a table only where a row's key is given in commit order
    (SQLite: one writer at a time), so that nothing below a key it has read can still be committed; it
    then tells :meth:`Outbox.want` not to want the type, and the producer's ``add`` writes nothing. Elsewhere
    (PostgreSQL, whose sequences hand keys out before commit) the producer's events are outbox rows as
    any other's. The producer makes both the same: its ``add`` calls give the data ``events`` would make of
    the rows it stores."""

    table: Any
    key: Any
    events: Callable[[list], list]
    #: Where this object is to be imported from ("package.module:NAME"): a delivering process of its
    #: own (the webhooks worker) loads it there (:func:`load_stored_rows`).
    path: str


def load_stored_rows(path: str) -> StoredRows:
    """The :class:`StoredRows` at ``path`` ("package.module:NAME")."""
    import importlib

    module, _, name = path.partition(":")
    source = getattr(importlib.import_module(module), name)
    if not isinstance(source, StoredRows):
        raise TypeError(f"{path} is not a StoredRows")
    return source


@dataclass(frozen=True)
class EventType:
    """One registered event type. ``opt_in`` types (a stream such as meter values) go only to
    subscriptions that name them, never to one asking for every type."""

    name: str
    description: str
    example: dict = field(default_factory=dict)
    opt_in: bool = False
    #: Who registered it ("csms" or a plugin's name), for the API's list and for error messages.
    owner: str = "csms"
    #: Where its events can be read from rather than written (see :class:`StoredRows`), or None.
    source: StoredRows | None = None


class Outbox:
    """The registry of event types and the in-transaction writer of events (see the module docstring)."""

    def __init__(self):
        self.types: dict[str, EventType] = {}
        self._writer = None
        # Replaced whole (never mutated) from the reactor thread, read by database threads.
        self._wanted: frozenset = frozenset()

    def register(self, name: str, description: str, example: dict | None = None, opt_in: bool = False,
                 owner: str = "csms", source: StoredRows | None = None) -> EventType:
        """Declare an event type; registering the same name twice is refused (two owners would collide)."""
        if not EVENT_TYPE_NAME.match(name):
            raise ValueError(f"event type {name!r}: names are dotted lower-case words, e.g. 'station.booted'")
        if name in self.types:
            raise ValueError(f"event type {name!r} is already registered by {self.types[name].owner}")
        event_type = self.types[name] = EventType(name, description, dict(example or {}), opt_in, owner,
                                                        source)
        return event_type

    def attach(self, writer) -> None:
        """Install the function that stores an event: ``writer(conn, event_type, data)``; one at a time."""
        if self._writer is not None and writer is not None:
            raise ValueError("an outbox writer is already attached")
        self._writer = writer
        if writer is None:
            self._wanted = frozenset()

    def want(self, event_types) -> None:
        """Set the event types someone subscribes to (called on the reactor thread when that changes)."""
        self._wanted = frozenset(event_types)

    def wanted(self, event_type: str) -> bool:
        return self._writer is not None and event_type in self._wanted

    def add(self, conn, event_type: str, data: dict) -> None:
        """Store an event in the transaction of ``conn``: call it from a database ``thd`` function only.

        ``data`` must be JSON-serialisable (datetimes are written as ISO 8601). A no-op when no writer
        is attached or nobody wants ``event_type``; with a writer attached, an unregistered type raises
        :class:`UnknownEventType`, so that a misspelt name fails its caller's tests instead of going unnoticed.
        """
        if self._writer is None:
            return  # nothing delivers events (a store built outside an app, in a unit test)
        if event_type in self._wanted:
            self._writer(conn, event_type, data)
        elif event_type not in self.types:
            raise UnknownEventType(f"event type {event_type!r} is not registered (app.outbox.register)")


def event_data(values: dict, leave_out=()) -> dict:
    """``values`` as an event's data: datetimes as ISO 8601 (the CSMS's own format), ``leave_out`` keys left out."""
    from datetime import datetime

    from csms.ocpp16 import format_datetime

    return {key: format_datetime(value) if isinstance(value, datetime) else value
            for key, value in values.items() if key not in leave_out}


def register_framework_types(outbox: Outbox) -> None:
    """The framework's own events: a station's connection opening and closing."""
    outbox.register("station.connected", "A station completed the WebSocket handshake.",
                    {"station_id": "CP-1", "remote_address": "tcp4:203.0.113.7:52144"})
    outbox.register("station.disconnected", "A station's connection closed; `reason` says how.",
                    {"station_id": "CP-1", "reason": "closed by the station: code=1000"})
