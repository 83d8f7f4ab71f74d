"""The WebSocket fast path's building blocks, and the check that the libraries still have what it uses.

:class:`csms.protocol.OCPPServerProtocol` parses simple client frames and frames its replies itself
(about a third of the per-message CPU). To do so it reads and calls attributes of Autobahn's
``WebSocketServerProtocol`` and of Twisted's ``tcp.Server`` that are not public API. A new release may
rename or drop any of them, so :class:`FastPathGuard` checks them, and the versions the fast path was
tested with, before it is used; when anything is missing the server takes the libraries' own (slower,
public) path and says so once.
"""
from __future__ import annotations

import functools
import re
from importlib.metadata import PackageNotFoundError, version

from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.internet import tcp
from twisted.logger import Logger

log = Logger(namespace="csms.protocol")

_TEXT_FIN = 0x81

#: Versions the fast path runs on: from the lowest ``setup.cfg`` accepts up to (not including) the next
#: release series; the upper bounds there are the same, so only a forced install goes beyond them.
TESTED_VERSIONS = {
    "autobahn": ((23, 1), (27,)),
    "twisted": ((23, 10), (27,)),
}
#: Methods and constants of Autobahn's server protocol the fast path calls or compares with.
PROTOCOL_MEMBERS = ("_dataReceived", "_cancelAutoPingTimeoutCall", "sendMessage", "STATE_OPEN")
#: Factory options Autobahn copies onto each connection (``CONFIG_ATTRS``) that the fast path reads there.
PROTOCOL_OPTIONS = ("maxMessagePayloadSize", "autoFragmentSize", "autoPingRestartOnAnyTraffic")
#: Autobahn's per-connection state, as it stands once the opening handshake is done.
PROTOCOL_STATE = ("state", "current_frame", "data", "inside_message", "_perMessageCompress", "send_queue",
                  "autoPingTimeoutCall")
#: What :func:`write_now` reads on Twisted's TCP transport.
TRANSPORT_STATE = ("dataBuffer", "_tempDataBuffer", "socket", "connected", "disconnecting")


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR a client frame's payload with its 4-byte mask (RFC 6455 §5.3), as one big-integer XOR in C."""
    n = len(payload)
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def frame_header(length: int, opcode_fin: int = _TEXT_FIN) -> bytes:
    """The header of an unmasked server-to-client frame (RFC 6455 §5.2) carrying ``length`` bytes."""
    if length < 126:
        return bytes((opcode_fin, length))
    if length < 65536:
        return bytes((opcode_fin, 126)) + length.to_bytes(2, "big")
    return bytes((opcode_fin, 127)) + length.to_bytes(8, "big")


def write_now(transport, data: bytes) -> None:
    """``transport.write(data)``, but onto the socket at once when nothing is queued before it.

    Twisted queues every write until the reactor's next turn, which costs two epoll changes and a
    write event per reply. On a plain TCP connection with an empty buffer the kernel almost always
    takes a whole OCPP reply, so try that first; whatever is left (or any socket error, which Twisted
    then reports the usual way) goes through ``transport.write``.
    """
    if (type(transport) is tcp.Server and transport.connected and not transport.disconnecting
            and not transport.dataBuffer and not transport._tempDataBuffer):
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


@functools.lru_cache(maxsize=None)
def release(distribution: str) -> tuple[int, ...] | None:
    """The installed release of ``distribution`` as numbers ((26, 10) for 26.10.0rc1), None if unknown.

    Read once: the library imported into this process does not change, and each factory asks."""
    try:
        text = version(distribution)
    except PackageNotFoundError:
        return None
    numbers = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(part) for part in numbers.group().split(".")) if numbers else None


def library_problems(factory) -> list[str]:
    """What the fast path needs but the installed libraries (or ``factory``'s options) lack."""
    problems = []
    for distribution, (lowest, beyond) in TESTED_VERSIONS.items():
        found = release(distribution)
        if found is None or not lowest <= found < beyond:
            problems.append(f"{distribution} {version_text(found)} is not a tested release "
                            f"(>= {version_text(lowest)}, < {version_text(beyond)})")
    problems += [f"WebSocketServerProtocol.{name} is missing" for name in PROTOCOL_MEMBERS
                 if not hasattr(WebSocketServerProtocol, name)]
    options = getattr(WebSocketServerProtocol, "CONFIG_ATTRS", ())
    problems += [f"option {name} is not copied onto connections" for name in PROTOCOL_OPTIONS
                 if name not in options or not hasattr(factory, name)]
    return problems


def connection_problems(protocol) -> list[str]:
    """What the fast path reads on an open connection but this one lacks."""
    problems = [f"connection state {name} is missing" for name in PROTOCOL_STATE if not hasattr(protocol, name)]
    transport = protocol.transport
    if type(transport) is tcp.Server:
        problems += [f"tcp.Server.{name} is missing" for name in TRANSPORT_STATE if not hasattr(transport, name)]
    return problems


def version_text(numbers) -> str:
    return "unknown" if numbers is None else ".".join(map(str, numbers))


class FastPathGuard:
    """Decides, once per server, whether its connections may take the fast path.

    The libraries' versions, classes and options are checked when the server is created; the
    per-connection state Autobahn and Twisted set up during a connection is checked on the first
    connection that opens. Whatever is missing is logged in one warning, and from then on every
    connection uses Autobahn's and Twisted's public path.
    """

    def __init__(self, factory):
        #: True: checked and usable; False: not usable; None: the first connection has yet to be checked.
        self.usable: bool | None = None
        problems = library_problems(factory)
        if problems:
            self._give_up(problems)

    def allows(self, protocol) -> bool:
        """Whether ``protocol`` (an open connection) may take the fast path."""
        if self.usable is None:
            problems = connection_problems(protocol)
            if problems:
                self._give_up(problems)
            else:
                self.usable = True
        return self.usable

    def _give_up(self, problems: list[str]) -> None:
        self.usable = False
        log.warn("WebSocket fast path disabled, using Autobahn's and Twisted's own path (slower): {problems}",
                 problems="; ".join(problems))
