"""Real ``twistd csms`` processes for tests and benchmarks, watched from the Twisted reactor.

A run's output is kept and can be awaited (``logged("Central System ready")``) instead of sleeping;
its end fires a Deferred. Children get SIGKILL when the process that started them dies (``setpriv
--pdeathsig``, util-linux), so that a test runner killed mid-test leaves no node behind.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import textwrap

from twisted.internet import defer, protocol

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
#: Seconds a start-up, or its failure, may take on a loaded CI machine.
DEADLINE = 60


def die_with_parent(argv: list[str]) -> list[str]:
    """``argv`` run so that the child is killed when this process ends (where setpriv exists)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", *argv] if setpriv else argv


class WatchedProcess(protocol.ProcessProtocol):
    """One child process: its output so far, and ``ended`` (fires with the exit status, or minus the
    signal that ended it)."""

    def __init__(self, reactor=None, deadline: float = DEADLINE):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.deadline = deadline
        self.out = b""
        self.err = b""
        self.ended: defer.Deferred = defer.Deferred()
        self.status: int | None = None
        self._waiting: list = []

    @property
    def stdout(self) -> str:
        return self.out.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.err.decode("utf-8", "replace")

    @property
    def running(self) -> bool:
        return self.status is None and self.transport is not None

    def childDataReceived(self, fd, data):
        if fd == 1:
            self.out += data
        else:
            self.err += data
        for text, d in list(self._waiting):
            if text in self.stdout:
                self._waiting.remove((text, d))
                d.callback(self.stdout)

    def processEnded(self, reason):
        status = reason.value.exitCode if reason.value.signal is None else -reason.value.signal
        self.status = status
        for _, d in self._waiting:
            d.errback(AssertionError(f"the process ended ({status}) before logging what was awaited:\n"
                                     f"{self.stdout}\n{self.stderr}"))
        self._waiting.clear()
        self.ended.callback(status)

    def logged(self, text: str) -> defer.Deferred:
        """Fires with the output so far once ``text`` appears in it (twistd -n logs to stdout)."""
        d = defer.Deferred()
        if text in self.stdout:
            d.callback(self.stdout)
        else:
            self._waiting.append((text, d))
        return d.addTimeout(self.deadline, self.reactor)

    def finished(self) -> defer.Deferred:
        """Fires with the exit status (a Deferred of its own: awaiting it twice is fine)."""
        d = defer.Deferred()
        self.ended.addBoth(lambda status: (d.callback(status), status)[1])
        return d.addTimeout(self.deadline, self.reactor)

    def signal(self, name: str) -> None:
        """Send a signal unless the process has already ended."""
        if self.running:
            try:
                self.transport.signalProcess(name)
            except OSError:  # ended between the check and the kill
                pass

    @defer.inlineCallbacks
    def stop(self, grace: float = 15.0):
        """SIGTERM, then SIGKILL if it is still there after ``grace`` seconds; fires with the status."""
        if self.status is not None:
            return self.status
        self.signal("TERM")
        waiting = defer.Deferred()
        self.ended.addBoth(lambda status: (waiting.callback(status) if not waiting.called else None, status)[1])
        waiting.addTimeout(grace, self.reactor)
        try:
            status = yield waiting
        except defer.TimeoutError:
            self.signal("KILL")
            status = yield self.finished()
        return status


#: Kept for the tests written before the cluster harness (tests/test_startup.py).
TwistdProcess = WatchedProcess


def run_twistd(config_file: str, cwd: str, env: dict | None = None, reactor=None,
               deadline: float = DEADLINE) -> WatchedProcess:
    """``twistd -n --pidfile= csms --config config_file`` in ``cwd``, watched."""
    if reactor is None:
        from twisted.internet import reactor
    process = WatchedProcess(reactor, deadline)
    argv = die_with_parent([TWISTD, "-n", "--pidfile=", "csms", "--config", config_file])
    reactor.spawnProcess(process, argv[0], argv, env=dict(os.environ, **(env or {})), path=cwd)
    return process


def write_loopback_config(directory, database_url: str, token: str, plugins: str = "core", extra: str = "") -> str:
    """A config file in ``directory`` for :func:`run_twistd`: OCPP and the API on loopback ports the
    system picks (:func:`listening_port` tells which), the API token ``token``, the database (its schema
    brought up to date at start), ``plugins`` enabled, ``extra`` sections appended; returns its path."""
    path = os.path.join(str(directory), "csms.ini")
    with open(path, "w", encoding="utf-8") as file:
        file.write(textwrap.dedent(f"""\
            [ocpp]
            endpoint = tcp:0:interface=127.0.0.1
            [api]
            endpoint = tcp:0:interface=127.0.0.1
            tokens = {token}
            [database]
            url = {database_url}
            auto_upgrade = true
            [plugins]
            enabled = {plugins}
            """) + textwrap.dedent(extra))
    return path


def listening_port(log: str, what: str) -> int:
    """The loopback port ``what`` (e.g. "OCPP 1.6J endpoint", "Operator API") says it listens on."""
    match = re.search(what + r" listening on IPv4Address\(type='TCP', host='127.0.0.1', port=(\d+)\)", log)
    assert match is not None, log
    return int(match.group(1))
