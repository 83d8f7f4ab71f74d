"""SQLite: the webhook delivery state in a database file of its own, ``<database file>-webhooks.db``.

SQLite has one write lock per database file, and the OCPP transactions of the CSMS need the main file's.
Were the deliverer's own writes (moving events in from the outbox, recording each POST's outcome,
dead-lettering) made there, the CSMS's writer would wait for them many times a second. So on SQLite the
deliveries and their events live in this second file, whose connections attach the main file read only
(as ``csms``): the deliverer reads the outbox and the subscriptions there by their plain names, and its
write transactions only ever lock this file. The outbox stays in the main file, written in the same
transaction as the change it reports; the deliverer remembers in this file how far it has moved it in
(``webhooks_delivery_state``) and deletes the moved rows from the main file now and then, in one short
transaction (WebhookStore.prune_outbox).

PostgreSQL locks rows, not the database: there the delivery state stays in the main database, as does
an in-memory SQLite database's (which no other connection could attach).

The file has a migration history of its own (``webhooks_delivery``, its revisions in
``delivery_migrations/``), brought to its head by the first process that opens the file, CSMS or worker:
it holds only the delivery queue, kept by this plugin. A change to ``webhooks_events`` or
``webhooks_deliveries`` needs a revision in both histories.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from csms.db import Database
from csms.migrations import History, prepare_schema

from .tables import delivery_metadata

HISTORY_NAME = "webhooks_delivery"
MIGRATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "delivery_migrations")
#: The name the main database file is attached under, read only.
MAIN_SCHEMA = "csms"
SUFFIX = "-webhooks.db"


@dataclass(frozen=True)
class DeliveryHistory(History):
    """The delivery file's history: its tables are those of ``delivery_metadata``, whatever their prefix."""

    def owns(self, table_name: str) -> bool:
        return table_name in self.metadata.tables


def history() -> DeliveryHistory:
    return DeliveryHistory(HISTORY_NAME, delivery_metadata, MIGRATIONS)


def main_file(db) -> str | None:
    """The main database's file when it is an SQLite file another connection can attach, else None."""
    if not db.is_sqlite:
        return None
    database = db.url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return os.path.abspath(database)


def delivery_path(db) -> str | None:
    """Where the delivery state of ``db`` lives when not in ``db`` itself (see the module's text)."""
    main = main_file(db)
    return None if main is None else main + SUFFIX


def open_delivery_database(db, reactor, synchronous: str = "FULL") -> Database | None:
    """The delivery file's Database (not started), or None where the delivery state stays in ``db``.

    ``synchronous`` is the main database's ``[database] sqlite_synchronous``. Where that syncs every
    commit (FULL, EXTRA), the delivery file still commits without waiting for the disk (NORMAL: synced
    at its checkpoints), as its syncs would share the disk with the OCPP commits' about 24 times a second
    at 1,000 events/s. Nothing is lost by it: before moved rows are deleted from the main file's outbox,
    the delivery file is synced (WebhookStore.prune_outbox), so a power cut can undo only moves whose
    outbox rows are still there (they are moved again) and outcomes (sent again: at least once)."""
    path = delivery_path(db)
    if path is None:
        return None
    return Database(f"sqlite:///{path}", reactor, sqlite_synchronous=unsynced(synchronous),
                    attach_readonly={MAIN_SCHEMA: main_file(db)})


def unsynced(synchronous: str) -> str:
    """``synchronous`` for commits that need not wait for the disk: NORMAL where it syncs every commit."""
    return "NORMAL" if synchronous.upper() in ("FULL", "EXTRA") else synchronous


def prepare(delivery_db):
    """Bring the delivery file's schema to its head (creating it); fires with what was done. A file made by
    a newer release fails with SchemaError, as the main database's would."""
    return delivery_db.run(lambda conn: prepare_schema(conn, [history()], auto_upgrade=True),
                           desc="webhooks_delivery_schema")
