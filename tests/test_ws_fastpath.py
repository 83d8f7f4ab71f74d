"""The WebSocket fast path of :class:`csms.protocol.OCPPServerProtocol`, byte for byte.

The server parses whole, masked, unfragmented text/binary frames itself and frames its replies itself
(``unmask``, ``frame_header``, ``write_now``); everything else is left to Autobahn. These tests drive
it with a raw TCP client that performs the WebSocket opening handshake by hand and then writes exactly
the bytes a test chooses (several frames in one write, a frame split over writes, control frames in
between, broken frames), and parses every frame the server sends back.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import socket
import struct
from collections import deque

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from csms.fastpath import frame_header, unmask, write_now

WAIT = 5
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


# -- unit: unmask ------------------------------------------------------------------------------

def naive_unmask(payload: bytes, mask: bytes) -> bytes:
    return bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 5, 7, 8, 125, 126, 127, 1000, 65535, 65536, 70000])
def test_unmask_matches_bytewise_xor(length):
    rng = random.Random(length)
    for _ in range(5):
        payload = bytes(rng.getrandbits(8) for _ in range(length))
        mask = bytes(rng.getrandbits(8) for _ in range(4))
        masked = unmask(payload, mask)
        assert type(masked) is bytes
        assert len(masked) == length
        assert masked == naive_unmask(payload, mask)
        assert unmask(masked, mask) == payload


@pytest.mark.parametrize("mask", [b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x01\x02\x03\x04",
                                  b"\x80\x00\x00\x01", b"\x00\x00\x00\x80"])
def test_unmask_edge_masks_and_edge_bytes(mask):
    # Leading/trailing zero and 0xff bytes must survive the big-integer round trip.
    for payload in (b"\x00", b"\x00" * 9, b"\xff" * 9, b"\x00abc\x00", b"abc\x00\x00\x00\x00\x00",
                    b"\x80" + b"\x00" * 6 + b"\x01"):
        assert unmask(payload, mask) == naive_unmask(payload, mask)
        assert unmask(unmask(payload, mask), mask) == payload


def test_unmask_with_zero_mask_is_identity_and_empty_payload_is_empty():
    assert unmask(b"", b"\x12\x34\x56\x78") == b""
    data = os.urandom(333)
    assert unmask(data, b"\x00\x00\x00\x00") == data


# -- unit: frame_header ------------------------------------------------------------------------

@pytest.mark.parametrize("length, expected", [
    (0, b"\x81\x00"),
    (1, b"\x81\x01"),
    (125, b"\x81\x7d"),
    (126, b"\x81\x7e\x00\x7e"),
    (127, b"\x81\x7e\x00\x7f"),
    (256, b"\x81\x7e\x01\x00"),
    (65535, b"\x81\x7e\xff\xff"),
    (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    (2 ** 32 + 5, b"\x81\x7f\x00\x00\x00\x01\x00\x00\x00\x05"),
])
def test_frame_header_rfc6455_encodings(length, expected):
    assert frame_header(length) == expected
    # An unmasked server frame: the MASK bit is never set.
    assert not frame_header(length)[1] & 0x80


def test_frame_header_opcode_byte():
    assert frame_header(5, 0x82) == b"\x82\x05"
    assert frame_header(300, 0x82) == b"\x82\x7e\x01\x2c"
    assert frame_header(70000, 0x82)[:2] == b"\x82\x7f"
    assert frame_header(5)[0] == 0x81  # text, FIN by default


# -- unit: write_now ---------------------------------------------------------------------------

class FakeTransport:
    """Looks like a connected TCP transport, but is not a twisted.internet.tcp.Server."""

    def __init__(self):
        self.writes = []
        self.connected = True
        self.disconnecting = False
        self.dataBuffer = b""
        self._tempDataBuffer = []

        class _NoSocket:
            def send(_, data):  # pragma: no cover - must never be called
                raise AssertionError("write_now used the socket of a transport that is not tcp.Server")
        self.socket = _NoSocket()

    def write(self, data):
        self.writes.append(data)


def test_write_now_on_other_transports_uses_transport_write_once():
    transport = FakeTransport()
    data = frame_header(300) + b"x" * 300
    write_now(transport, data)
    assert transport.writes == [data]
    write_now(transport, b"")
    assert transport.writes == [data, b""]


def test_write_now_on_a_tcp_server_subclass_uses_transport_write():
    # The socket shortcut is only for exactly tcp.Server (not e.g. a subclass with other write semantics).
    from twisted.internet import tcp

    class Sub(tcp.Server):
        def __init__(self):  # no real socket
            self.writes = []
            self.connected = True
            self.disconnecting = False
            self.dataBuffer = b""
            self._tempDataBuffer = []
            self.socket = FakeTransport().socket

        def write(self, data):
            self.writes.append(data)

    transport = Sub()
    write_now(transport, b"hello")
    assert transport.writes == [b"hello"]


# -- a raw WebSocket client ----------------------------------------------------------------------

def client_frame(payload: bytes | str, opcode: int = OP_TEXT, fin: bool = True, mask: bytes | None = None,
                 masked: bool = True, length_form: str | None = None, rsv: int = 0) -> bytes:
    """One client-to-server frame; ``length_form`` ('7', '16', '64') forces a (possibly non-minimal) encoding."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    n = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    if length_form is None:
        length_form = "7" if n < 126 else ("16" if n < 65536 else "64")
    if length_form == "7":
        header = bytes((first, mask_bit | n))
    elif length_form == "16":
        header = bytes((first, mask_bit | 126)) + struct.pack("!H", n)
    else:
        header = bytes((first, mask_bit | 127)) + struct.pack("!Q", n)
    if not masked:
        return header + payload
    mask = mask if mask is not None else os.urandom(4)
    return header + mask + naive_unmask(payload, mask)


def call(unique_id: str, action: str, payload: dict) -> bytes:
    return json.dumps([2, unique_id, action, payload], ensure_ascii=False).encode("utf-8")


def heartbeat(unique_id: str) -> bytes:
    return client_frame(call(unique_id, "Heartbeat", {}))


class ServerFrame:
    def __init__(self, fin, rsv, opcode, header, payload):
        self.fin, self.rsv, self.opcode, self.header, self.payload = fin, rsv, opcode, header, payload

    def json(self):
        assert self.opcode == OP_TEXT and self.fin, self
        return json.loads(self.payload.decode("utf-8"))

    @property
    def close_code(self):
        assert self.opcode == OP_CLOSE, self
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    def __repr__(self):
        return f"<ServerFrame fin={self.fin} op={self.opcode:#x} header={self.header!r} payload={self.payload[:80]!r}>"


class RawWebSocket(Protocol):
    """Does the opening handshake by hand, then writes raw bytes and parses the server's frames."""

    def __init__(self, path: str, protocols: str = "ocpp1.6"):
        self.path = path
        self.protocols = protocols
        self.key = base64.b64encode(os.urandom(16)).decode()
        self.handshake = defer.Deferred()
        self.closed = defer.Deferred()
        self.response_head = None
        self._buffer = b""
        self.frames: list[ServerFrame] = []
        self._unread: deque = deque()
        self._waiters: deque = deque()
        self.protocol_errors: list[str] = []

    def connectionMade(self):
        host = self.transport.getPeer()
        self.transport.write(
            (f"GET {self.path} HTTP/1.1\r\n"
             f"Host: {host.host}:{host.port}\r\n"
             "Upgrade: websocket\r\n"
             "Connection: Upgrade\r\n"
             f"Sec-WebSocket-Key: {self.key}\r\n"
             "Sec-WebSocket-Version: 13\r\n"
             f"Sec-WebSocket-Protocol: {self.protocols}\r\n"
             "\r\n").encode("ascii"))

    def dataReceived(self, data):
        self._buffer += data
        if self.response_head is None:
            head, sep, rest = self._buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            self.response_head = head.decode("latin-1")
            self._buffer = rest
            self.handshake.callback(self.response_head)
        self._parse()

    def _parse(self):
        buf = self._buffer
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            if b1 & 0x80:
                self.protocol_errors.append(f"masked server frame {buf[:2]!r}")
            n = b1 & 0x7F
            pos = 2
            if n == 126:
                if len(buf) < 4:
                    break
                n = struct.unpack("!H", buf[2:4])[0]
                pos = 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n = struct.unpack("!Q", buf[2:10])[0]
                pos = 10
            if len(buf) < pos + n:
                break
            frame = ServerFrame(bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0x0F, buf[:pos], buf[pos:pos + n])
            buf = buf[pos + n:]
            self.frames.append(frame)
            if self._waiters:
                self._waiters.popleft().callback(frame)
            else:
                self._unread.append(frame)
        self._buffer = buf

    def connectionLost(self, reason):
        for d in list(self._waiters):
            d.errback(ConnectionError(f"connection lost: {reason.value!r}"))
        self._waiters.clear()
        self.closed.callback(None)

    def next_frame(self, timeout: float = WAIT) -> defer.Deferred:
        if self._unread:
            return defer.succeed(self._unread.popleft())
        d = defer.Deferred()
        self._waiters.append(d)
        return d.addTimeout(timeout, reactor)

    async def frames_n(self, n: int, timeout: float = WAIT) -> list[ServerFrame]:
        return [await self.next_frame(timeout) for _ in range(n)]

    async def expect_close(self, code: int) -> ServerFrame:
        """The next frame is a close frame with ``code``; answer it and wait for the TCP close."""
        frame = await self.next_frame()
        assert frame.opcode == OP_CLOSE, frame
        assert frame.close_code == code, (frame.close_code, frame.payload)
        self.transport.write(client_frame(frame.payload[:2], opcode=OP_CLOSE))
        await self.closed.addTimeout(WAIT, reactor)
        return frame

    def assert_nothing_unread(self):
        assert not self._unread, list(self._unread)


@pytest.fixture
def raw_connect(csms_factory):
    """``await raw_connect("CP-1")``: a handshaken RawWebSocket plus the server's protocol for it.

    It connects to ``running`` (a started CSMS) if given, else to a CSMS with every built-in plugin.
    """
    clients: list[RawWebSocket] = []
    default: list = []

    async def connect(station_id: str, running=None):
        if running is None:
            if not default:
                default.append(await csms_factory())
            running = default[0]
        client = RawWebSocket(f"/ocpp/{station_id}")
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", running.port, timeout=WAIT)
        await connectProtocol(endpoint, client).addTimeout(WAIT, reactor)
        clients.append(client)
        head = await client.handshake.addTimeout(WAIT, reactor)
        lines = head.split("\r\n")
        assert lines[0].startswith("HTTP/1.1 101"), head
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        expected_accept = base64.b64encode(hashlib.sha1(client.key.encode() + WS_GUID).digest()).decode()
        assert headers["sec-websocket-accept"] == expected_accept
        assert headers["sec-websocket-protocol"] == "ocpp1.6"
        server = running.service.ocpp_factory.connections[station_id]
        # Else the fast path's guard turned it off, and these tests would be testing Autobahn's path.
        assert server.fast_path, "the WebSocket fast path is off (see the warning logged at start-up)"
        return client, server

    yield connect
    for client in clients:
        if client.transport is not None and client.transport.connected:
            client.transport.abortConnection()


class ReadWatcher:
    """Counts the bytes the server-side protocol has read; ``until(n)`` fires once it has read n."""

    def __init__(self, server_protocol):
        self.total = 0
        self.chunks: list[bytes] = []
        self._waiters: list = []
        original = server_protocol._dataReceived

        def spy(data):
            self.total += len(data)
            self.chunks.append(data)
            original(data)
            for target, d in list(self._waiters):
                if self.total >= target:
                    self._waiters.remove((target, d))
                    d.callback(self.total)
        server_protocol._dataReceived = spy  # instance attribute: Autobahn calls self._dataReceived

    def until(self, total: int) -> defer.Deferred:
        if self.total >= total:
            return defer.succeed(self.total)
        d = defer.Deferred()
        self._waiters.append((total, d))
        return d.addTimeout(WAIT, reactor)


def assert_heartbeat_result(frame: ServerFrame, unique_id: str):
    message = frame.json()
    assert message[0] == 3 and message[1] == unique_id, message
    assert message[2]["currentTime"].endswith("Z"), message


# -- end to end ----------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_two_calls_in_one_write_are_both_answered_in_order(raw_connect):
    client, server = await raw_connect("CP-RAW")
    client.transport.write(heartbeat("a-1") + heartbeat("a-2"))
    first, second = await client.frames_n(2)
    assert_heartbeat_result(first, "a-1")
    assert_heartbeat_result(second, "a-2")
    # Reply frames are minimal, unmasked, FIN text frames.
    for frame in (first, second):
        assert frame.fin and frame.rsv == 0 and frame.opcode == OP_TEXT
        assert frame.header == frame_header(len(frame.payload))
    assert not client.protocol_errors


@pytest_twisted.ensureDeferred
async def test_many_calls_and_a_binary_frame_in_one_write(raw_connect):
    client, _ = await raw_connect("CP-RAW")
    data = b"".join(heartbeat(f"m-{i}") for i in range(30))
    data += client_frame(call("bin-1", "Heartbeat", {}), opcode=OP_BINARY)
    data += client_frame(b"", opcode=OP_TEXT)  # an empty text message: not JSON
    client.transport.write(data)
    frames = await client.frames_n(32)
    for i in range(30):
        assert_heartbeat_result(frames[i], f"m-{i}")
    assert_heartbeat_result(frames[30], "bin-1")
    assert frames[31].json() == [4, "-1", "FormationViolation", "Message is not valid JSON", {}]


@pytest.mark.parametrize("split", ["1", "2", "header+mask", "mid-payload", "last-byte-missing",
                                   "16bit-mid-length", "16bit-after-length"])
@pytest_twisted.ensureDeferred
async def test_frame_split_across_two_writes_is_answered(raw_connect, split):
    client, server = await raw_connect("CP-RAW")
    watcher = ReadWatcher(server)
    if split.startswith("16bit"):
        payload = call("split-1", "DataTransfer", {"vendorId": "X", "data": "d" * 300})
        frame = client_frame(payload)
        assert frame[1] == 0x80 | 126
        cut = {"16bit-mid-length": 3, "16bit-after-length": 4}[split]
    else:
        frame = heartbeat("split-1")
        cut = {"1": 1, "2": 2, "header+mask": 6, "mid-payload": 6 + 10, "last-byte-missing": len(frame) - 1}[split]
    part1, part2 = frame[:cut], frame[cut:]
    # The second write also carries a whole second frame: once the partial frame is done, it must
    # be answered too, and after the first.
    part2 += heartbeat("split-2")

    client.transport.write(part1)
    await watcher.until(len(part1))  # the server has read (only) the first part
    assert watcher.total == len(part1)
    assert client.frames == []
    client.transport.write(part2)
    first, second = await client.frames_n(2)
    message = first.json()
    assert message[:2] == [3, "split-1"], message
    if split.startswith("16bit"):
        assert message[2] == {"status": "UnknownVendorId"}
    else:
        assert message[2]["currentTime"].endswith("Z")
    assert_heartbeat_result(second, "split-2")
    # And the connection is back on the fast path for what follows.
    client.transport.write(heartbeat("split-3"))
    assert_heartbeat_result(await client.next_frame(), "split-3")


@pytest_twisted.ensureDeferred
async def test_many_frames_written_one_byte_at_a_time(raw_connect):
    client, server = await raw_connect("CP-RAW")
    watcher = ReadWatcher(server)
    data = heartbeat("b-1") + heartbeat("b-2")
    for i in range(len(data)):
        client.transport.write(data[i:i + 1])
        await watcher.until(i + 1)
    first, second = await client.frames_n(2)
    assert_heartbeat_result(first, "b-1")
    assert_heartbeat_result(second, "b-2")


@pytest_twisted.ensureDeferred
async def test_fragmented_message_is_reassembled_and_answered(raw_connect):
    client, server = await raw_connect("CP-RAW")
    message = call("frag-1", "Heartbeat", {})
    a, b, c = message[:5], message[5:12], message[12:]
    client.transport.write(heartbeat("before")
                           + client_frame(a, opcode=OP_TEXT, fin=False)
                           + client_frame(b, opcode=OP_CONT, fin=False)
                           + client_frame(c, opcode=OP_CONT, fin=True)
                           + heartbeat("after"))
    frames = await client.frames_n(3)
    assert_heartbeat_result(frames[0], "before")
    assert_heartbeat_result(frames[1], "frag-1")
    assert_heartbeat_result(frames[2], "after")


@pytest_twisted.ensureDeferred
async def test_fragmented_message_over_several_writes_with_a_ping_inside(raw_connect):
    client, server = await raw_connect("CP-RAW")
    watcher = ReadWatcher(server)
    message = call("frag-2", "Heartbeat", {})
    first = client_frame(message[:10], opcode=OP_TEXT, fin=False)
    client.transport.write(first)
    await watcher.until(len(first))
    assert server.inside_message  # Autobahn holds the first fragment
    rest = client_frame(b"in-frag", opcode=OP_PING) + client_frame(message[10:], opcode=OP_CONT, fin=True)
    client.transport.write(rest)
    pong, answer = await client.frames_n(2)
    assert (pong.opcode, pong.fin, pong.payload) == (OP_PONG, True, b"in-frag")
    assert_heartbeat_result(answer, "frag-2")
    client.transport.write(heartbeat("after"))
    assert_heartbeat_result(await client.next_frame(), "after")


@pytest_twisted.ensureDeferred
async def test_new_text_frame_inside_a_fragmented_message_fails_with_1002(raw_connect):
    # A whole FIN text frame while a fragmented message is open is a protocol error (RFC 6455 §5.4);
    # the fast path must not take it for a message of its own.
    client, server = await raw_connect("CP-RAW")
    watcher = ReadWatcher(server)
    first = client_frame(call("frag-3", "Heartbeat", {})[:10], opcode=OP_TEXT, fin=False)
    client.transport.write(first)
    await watcher.until(len(first))
    client.transport.write(heartbeat("intruder"))
    frame = await client.expect_close(1002)
    assert all(f.opcode != OP_TEXT for f in client.frames), client.frames
    assert frame.close_code == 1002


@pytest_twisted.ensureDeferred
async def test_ping_between_two_data_frames_in_one_write(raw_connect):
    client, _ = await raw_connect("CP-RAW")
    client.transport.write(heartbeat("p-1") + client_frame(b"ping-payload", opcode=OP_PING) + heartbeat("p-2"))
    frames = await client.frames_n(3)
    # Exactly the order of the input: the answer after the pong must not overtake it.
    assert_heartbeat_result(frames[0], "p-1")
    assert (frames[1].opcode, frames[1].fin, frames[1].payload) == (OP_PONG, True, b"ping-payload")
    assert_heartbeat_result(frames[2], "p-2")


@pytest_twisted.ensureDeferred
async def test_pong_from_the_client_is_ignored_and_calls_continue(raw_connect):
    client, _ = await raw_connect("CP-RAW")
    client.transport.write(client_frame(b"unsolicited", opcode=OP_PONG) + heartbeat("q-1") + heartbeat("q-2"))
    first, second = await client.frames_n(2)
    assert_heartbeat_result(first, "q-1")
    assert_heartbeat_result(second, "q-2")


@pytest.mark.parametrize("padding", [0, 1, 2, 3, 200, 60000])
@pytest_twisted.ensureDeferred
async def test_16bit_length_frame_is_answered(raw_connect, padding):
    client, _ = await raw_connect("CP-RAW")
    base = len(call("long-1", "DataTransfer", {"vendorId": "X", "data": ""}))
    # Lengths 126.. (the smallest 16-bit frame) up to ~60 KB.
    payload = call("long-1", "DataTransfer", {"vendorId": "X", "data": "d" * (126 - base + padding)})
    assert len(payload) == 126 + padding
    frame = client_frame(payload)
    assert frame[1] == 0x80 | 126
    client.transport.write(frame + heartbeat("long-2"))
    first, second = await client.frames_n(2)
    assert first.json() == [3, "long-1", {"status": "UnknownVendorId"}]
    assert_heartbeat_result(second, "long-2")


@pytest.mark.parametrize("length", [125, 126, 127, 300, 65535, 65536, 70000])
@pytest_twisted.ensureDeferred
async def test_long_replies_are_framed_correctly(csms_factory, raw_connect, length):
    running = await csms_factory(config_text="[ocpp]\nmax_message_size = 262144\n")
    client, _ = await raw_connect("CP-RAW", running)
    # An unknown action is answered NotImplemented, naming it: a reply of any length we choose.
    template = 'Action {!r} is not implemented by this Central System'
    overhead = len(json.dumps([4, "r-1", "NotImplemented", template.format(""), {}], separators=(",", ":")))
    action = "A" * (length - overhead)
    expected = [4, "r-1", "NotImplemented", template.format(action), {}]
    assert len(json.dumps(expected, separators=(",", ":"))) == length
    request = client_frame(call("r-1", action, {}))
    client.transport.write(request + heartbeat("r-2"))
    first, second = await client.frames_n(2)
    assert len(first.payload) == length
    assert first.header == frame_header(length), first.header
    assert first.json() == expected
    assert_heartbeat_result(second, "r-2")
    assert not client.protocol_errors


@pytest_twisted.ensureDeferred
async def test_64bit_length_client_frame_is_answered(csms_factory, raw_connect):
    running = await csms_factory(config_text="[ocpp]\nmax_message_size = 262144\n")
    client, _ = await raw_connect("CP-RAW", running)
    payload = call("big-1", "DataTransfer", {"vendorId": "X", "data": "d" * 70000})
    frame = client_frame(payload)
    assert frame[1] == 0x80 | 127
    client.transport.write(heartbeat("big-0") + frame + heartbeat("big-2"))
    frames = await client.frames_n(3)
    assert_heartbeat_result(frames[0], "big-0")
    assert frames[1].json() == [3, "big-1", {"status": "UnknownVendorId"}]
    assert_heartbeat_result(frames[2], "big-2")


@pytest_twisted.ensureDeferred
async def test_frame_of_exactly_max_message_size_is_answered_one_more_byte_closes_1009(csms_factory, raw_connect):
    running = await csms_factory(config_text="[ocpp]\nmax_message_size = 2048\n")
    client, _ = await raw_connect("CP-RAW", running)

    def data_transfer(unique_id, size):
        base = len(call(unique_id, "DataTransfer", {"vendorId": "X", "data": ""}))
        payload = call(unique_id, "DataTransfer", {"vendorId": "X", "data": "d" * (size - base)})
        assert len(payload) == size
        return client_frame(payload)

    client.transport.write(data_transfer("max-1", 2048) + data_transfer("max-2", 2049) + heartbeat("max-3"))
    answer = await client.next_frame()
    assert answer.json() == [3, "max-1", {"status": "UnknownVendorId"}]
    await client.expect_close(1009)
    assert [f.opcode for f in client.frames] == [OP_TEXT, OP_CLOSE]


@pytest.mark.parametrize("opcode, followed", [(OP_TEXT, False), (OP_TEXT, True), (OP_BINARY, True)],
                         ids=["text-last", "text-followed-by-a-call", "binary-followed-by-a-call"])
@pytest_twisted.ensureDeferred
async def test_unmasked_client_frame_fails_the_connection_with_1002(raw_connect, opcode, followed):
    client, _ = await raw_connect("CP-RAW")
    # Read as if masked (its first 4 bytes taken for a mask) a binary frame followed by more bytes
    # would be a message of its own (answered FormationViolation): only the MASK bit tells.
    unmasked = client_frame(b"    " + call("u-2", "Heartbeat", {}), opcode=opcode, masked=False)
    client.transport.write(heartbeat("u-1") + unmasked + (heartbeat("u-3") if followed else b""))
    assert_heartbeat_result(await client.next_frame(), "u-1")
    await client.expect_close(1002)
    assert [f.opcode for f in client.frames] == [OP_TEXT, OP_CLOSE]


@pytest_twisted.ensureDeferred
async def test_unmasked_first_frame_fails_the_connection_with_1002(raw_connect):
    client, _ = await raw_connect("CP-RAW")
    client.transport.write(client_frame(call("u-1", "Heartbeat", {}), masked=False))
    await client.expect_close(1002)
    assert [f.opcode for f in client.frames] == [OP_CLOSE]


@pytest.mark.parametrize("case", ["16bit-for-10-bytes", "16bit-for-125-bytes", "64bit-for-200-bytes",
                                  "64bit-for-65535-bytes"])
@pytest_twisted.ensureDeferred
async def test_non_minimal_length_encoding_fails_with_1002(raw_connect, case):
    client, _ = await raw_connect("CP-RAW")
    form, size = {"16bit-for-10-bytes": ("16", 10), "16bit-for-125-bytes": ("16", 125),
                  "64bit-for-200-bytes": ("64", 200), "64bit-for-65535-bytes": ("64", 65535)}[case]
    base = len(call("nm-1", "DataTransfer", {"vendorId": "X", "data": ""}))
    if size >= base:
        payload = call("nm-1", "DataTransfer", {"vendorId": "X", "data": "d" * (size - base)})
    else:
        payload = b'"' + b"x" * (size - 2) + b'"'
    assert len(payload) == size
    client.transport.write(heartbeat("nm-0") + client_frame(payload, length_form=form))
    assert_heartbeat_result(await client.next_frame(), "nm-0")
    await client.expect_close(1002)
    assert [f.opcode for f in client.frames] == [OP_TEXT, OP_CLOSE]


@pytest.mark.parametrize("first_byte", [0xC1, 0xA1, 0x91, 0x83, 0x8B], ids=["rsv1", "rsv2", "rsv3",
                                                                          "reserved-data-op", "reserved-ctrl-op"])
@pytest_twisted.ensureDeferred
async def test_reserved_bits_or_opcodes_fail_with_1002(raw_connect, first_byte):
    client, _ = await raw_connect("CP-RAW")
    bad = bytearray(heartbeat("rsv-1"))
    bad[0] = first_byte
    client.transport.write(heartbeat("rsv-0") + bytes(bad))
    assert_heartbeat_result(await client.next_frame(), "rsv-0")
    await client.expect_close(1002)


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_text_frame_after_a_valid_one_is_answered_then_1007(raw_connect):
    client, _ = await raw_connect("CP-RAW")
    client.transport.write(heartbeat("g-1") + client_frame(b'[2, "x\xff", "Heartbeat", {}]')
                           + heartbeat("g-3"))
    assert_heartbeat_result(await client.next_frame(), "g-1")
    await client.expect_close(1007)
    assert [f.opcode for f in client.frames] == [OP_TEXT, OP_CLOSE]


@pytest.mark.parametrize("bad", [b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"],
                         ids=["truncated", "surrogate", "above-u10ffff", "overlong"])
@pytest_twisted.ensureDeferred
async def test_text_frames_that_are_not_utf8_close_1007_valid_multibyte_is_answered(raw_connect, bad):
    client, _ = await raw_connect("CP-RAW")
    good = call("ü-€-😀", "Heartbeat", {})  # non-ASCII, valid UTF-8
    assert len(json.loads(good)[1]) <= 36
    client.transport.write(client_frame(good) + client_frame(b'[2, "x' + bad + b'", "Heartbeat", {}]'))
    assert_heartbeat_result(await client.next_frame(), "ü-€-😀")
    await client.expect_close(1007)


@pytest_twisted.ensureDeferred
async def test_binary_frame_of_invalid_utf8_is_answered_not_closed(raw_connect):
    client, _ = await raw_connect("CP-RAW")
    client.transport.write(client_frame(b"\xff\xfe[2]", opcode=OP_BINARY) + heartbeat("bin-2"))
    first, second = await client.frames_n(2)
    assert first.json()[:3] == [4, "-1", "FormationViolation"]
    assert_heartbeat_result(second, "bin-2")


@pytest_twisted.ensureDeferred
async def test_close_frame_after_a_call_is_answered_then_echoed(raw_connect):
    client, _ = await raw_connect("CP-RAW")
    client.transport.write(heartbeat("c-1") + client_frame(struct.pack("!H", 1000) + b"bye", opcode=OP_CLOSE)
                           + heartbeat("c-2"))
    assert_heartbeat_result(await client.next_frame(), "c-1")
    close = await client.next_frame()
    assert close.opcode == OP_CLOSE and close.close_code == 1000
    await client.closed.addTimeout(WAIT, reactor)
    # Nothing is answered after the close.
    assert [f.opcode for f in client.frames] == [OP_TEXT, OP_CLOSE]


@pytest_twisted.ensureDeferred
async def test_replies_stay_whole_and_in_order_when_the_client_does_not_read(raw_connect):
    client, server = await raw_connect("CP-RAW")
    count = 200
    # A small kernel send buffer, so that ~1 MB of replies cannot all fit in the kernel while the
    # client does not read: write_now must hand (partial) replies to transport.write, and later ones
    # must queue behind them.
    server_socket = server.transport.socket
    server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    session = server.session
    sent = {"n": 0}
    all_sent = defer.Deferred()
    original_send = session._send

    def counting_send(data):
        original_send(data)
        sent["n"] += 1
        if sent["n"] == count:
            all_sent.callback(None)
    session._send = counting_send

    transport_writes = []
    original_write = server.transport.write

    def spy_write(data):
        transport_writes.append(len(data))
        original_write(data)
    server.transport.write = spy_write  # an instance attribute: type(transport) stays tcp.Server

    template = 'Action {!r} is not implemented by this Central System'
    actions = [f"Act{i:03d}" + chr(ord("a") + i % 26) * 5000 for i in range(count)]
    client.transport.pauseProducing()
    client.transport.write(b"".join(client_frame(call(f"h-{i}", action, {})) for i, action in enumerate(actions)))
    await all_sent.addTimeout(WAIT, reactor)
    assert transport_writes, "every reply fit in the socket buffer: the fallback was not exercised"
    assert server.transport.dataBuffer or server.transport._tempDataBuffer  # still queued in Twisted
    # A tiny send buffer makes loopback TCP crawl (delayed ACKs): give it room again for the catch-up.
    server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    client.transport.resumeProducing()

    frames = await client.frames_n(count)
    for i, frame in enumerate(frames):
        assert frame.header == frame_header(len(frame.payload))
        assert frame.json() == [4, f"h-{i}", "NotImplemented", template.format(actions[i]), {}], i
    client.transport.write(heartbeat("h-last"))
    assert_heartbeat_result(await client.next_frame(), "h-last")
    client.assert_nothing_unread()
    assert not client.protocol_errors


@pytest_twisted.ensureDeferred
async def test_many_heartbeats_in_one_write_while_paused(raw_connect):
    client, server = await raw_connect("CP-RAW")
    count = 500
    done = defer.Deferred()
    sent = {"n": 0}
    original_send = server.session._send

    def counting_send(data):
        original_send(data)
        sent["n"] += 1
        if sent["n"] == count:
            done.callback(None)
    server.session._send = counting_send
    client.transport.pauseProducing()
    client.transport.write(b"".join(heartbeat(f"hb-{i}") for i in range(count)))
    await done.addTimeout(WAIT, reactor)
    client.transport.resumeProducing()
    frames = await client.frames_n(count)
    for i, frame in enumerate(frames):
        assert_heartbeat_result(frame, f"hb-{i}")


@pytest_twisted.ensureDeferred
async def test_server_sockets_have_nagle_off_and_a_close_handshake_timeout_above_a_second(raw_connect):
    """Nagle would hold a small write behind an unacknowledged one for the peer's delayed ACK (40 ms);
    a 1 s closing-handshake timeout can fire at once on txaio's whole-second timers and drop the close
    frame that carries the reason."""
    _, server = await raw_connect("CP-NODELAY")
    assert server.transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert server.closeHandshakeTimeout >= 2
