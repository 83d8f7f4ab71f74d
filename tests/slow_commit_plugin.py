"""A plugin for tests/test_shutdown.py: holds the commit of each StartTransaction until it is released.

In the test's own process the test releases it (``release``); in a ``twistd csms`` process started by
the test, where it is installed as a distribution on PYTHONPATH (entry point ``slowcommit``), the
shutdown's start releases it: the commit is then under way when SIGTERM arrives, and ends after.
"""
from __future__ import annotations

import threading

from sqlalchemy import event
from twisted.logger import Logger
from zope.interface import implementer

from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin

log = Logger(namespace="slowcommit")
HOLDING = "Holding the commit of a StartTransaction"


@implementer(ICSMSPlugin)
class SlowCommit:
    name = "slowcommit"
    profile = None
    inbound_actions = ()
    outbound_actions = ()
    settings = ()
    release_on_shutdown = False

    def __init__(self):
        self.release = threading.Event()
        #: Called on the reactor thread when a commit is held.
        self.on_hold = lambda: None
        self._local = threading.local()

    @hookimpl
    def csms_configure(self, app):
        self.app = app
        event.listen(app.db.engine, "before_cursor_execute", self._statement)
        event.listen(app.db.engine, "commit", self._commit)
        if self.release_on_shutdown:
            app.reactor.addSystemEventTrigger("before", "shutdown", self.release.set)

    def _statement(self, conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO CORE_TRANSACTIONS"):
            self._local.hold = True

    def _commit(self, conn):
        if getattr(self._local, "hold", False):  # on the database thread
            self._local.hold = False
            self.app.reactor.callFromThread(self._holding)
            self.release.wait(60)

    def _holding(self):
        log.info(HOLDING)
        self.on_hold()


class SlowCommitUntilShutdown(SlowCommit):
    release_on_shutdown = True
