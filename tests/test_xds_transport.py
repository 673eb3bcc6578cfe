"""The xDS port's own gRPC transport (controlplane/xds/transport.py, ADR 0006), against the
real grpc client library and raw sockets: what Envoys and attackers can send it.

The Envoy-facing behaviour (ADS with a real Envoy, mutual TLS, the stats push) is covered by
test_xds_envoys.py, test_xds_tls.py and test_envoy_stats.py on this same transport."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import struct

import grpc
import hpack
import pytest

from controlplane.xds import transport
from controlplane.xds.transport import PREFACE, GrpcServer

ECHO = "/test.Echo/Stream"
BIG = "/test.Big/Stream"


class Echo:
    """Answers every message with itself; records what it got and whether it ended."""

    def __init__(self, call) -> None:
        self.call = call
        self.got: list[bytes] = []
        self.ended = False
        OPENED.append(self)

    def on_message(self, message: bytes) -> None:
        self.got.append(message)
        self.call.send(message)

    def on_end(self) -> None:
        self.ended = True


OPENED: list[Echo] = []


class Big:
    """Sends three large messages as soon as the call opens, then ends it."""

    SIZES = (3 << 20, 70_000, 5)

    def __init__(self, call) -> None:
        for index, size in enumerate(self.SIZES):
            call.send(bytes([index]) * size)
        call.close()

    def on_message(self, message: bytes) -> None:
        pass

    def on_end(self) -> None:
        pass


@pytest.fixture
async def server():
    OPENED.clear()
    server = GrpcServer({ECHO: Echo, BIG: Big})
    port = await server.start("127.0.0.1", 0)
    yield server, port
    await server.stop()


def channel(port: int, **options) -> grpc.Channel:
    """A blocking grpc channel: used from a thread (grpc.aio binds itself to one event loop
    per process, and every test here has its own)."""
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=list(options.items()))


def stream(port: int, method: str, messages, **options) -> tuple[list[bytes], grpc.StatusCode, str]:
    """Send `messages` on one call, read every answer until the status."""
    with channel(port, **options) as chan:
        call = chan.stream_stream(method)(iter(messages))
        got = []
        with contextlib.suppress(grpc.RpcError):
            got.extend(call)
        return got, call.code(), call.details() or ""


class Conversation:
    """A call driven step by step from the test: send one, read one."""

    def __init__(self, port: int, method: str = ECHO) -> None:
        self.chan = channel(port)
        self.outbox: queue.Queue = queue.Queue()
        self.call = self.chan.stream_stream(method)(iter(self.outbox.get, None))

    async def ask(self, message: bytes) -> bytes:
        self.outbox.put(message)
        return await asyncio.to_thread(next, self.call)

    async def status(self) -> grpc.StatusCode:
        def wait():
            with contextlib.suppress(grpc.RpcError, StopIteration):
                for _ in self.call:
                    pass
            return self.call.code()

        return await asyncio.to_thread(wait)

    def close(self) -> None:
        self.outbox.put(None)
        self.chan.close()


async def test_messages_go_both_ways_on_a_stream(server) -> None:
    _, port = server
    messages = [b"one", b"", b"x" * 100_000]
    got, code, _ = await asyncio.to_thread(stream, port, ECHO, messages)
    assert got == messages and code == grpc.StatusCode.OK
    assert OPENED[0].ended


async def test_a_response_larger_than_the_clients_window_arrives_whole(server) -> None:
    """3 MB against a gRPC client's 64 KB initial window and 16 KB frames: held back and
    sent as the client opens its window, in order, then the status."""
    _, port = server
    options = {"grpc.max_receive_message_length": 8 << 20}
    got, code, _ = await asyncio.to_thread(stream, port, BIG, [], **options)
    assert [len(m) for m in got] == list(Big.SIZES)
    assert [m[0] for m in got] == [0, 1, 2] and got[0] == bytes(1) * (3 << 20)
    assert code == grpc.StatusCode.OK


async def test_an_unknown_method_is_unimplemented_and_the_server_serves_on(server) -> None:
    _, port = server
    method = "/envoy.service.Nope/Stream"
    got, code, details = await asyncio.to_thread(stream, port, method, [b"hello"])
    assert (got, code) == ([], grpc.StatusCode.UNIMPLEMENTED) and method in details
    got, code, _ = await asyncio.to_thread(stream, port, ECHO, [b"still here"])
    assert (got, code) == ([b"still here"], grpc.StatusCode.OK)


async def test_a_message_over_the_limit_ends_that_call_only(server, monkeypatch) -> None:
    monkeypatch.setattr(transport, "MAX_MESSAGE", 1000)
    _, port = server
    got, code, _ = await asyncio.to_thread(stream, port, ECHO, [b"y" * 5000])
    assert (got, code) == ([], grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert OPENED[0].got == [] and OPENED[0].ended
    got, code, _ = await asyncio.to_thread(stream, port, ECHO, [b"ok"])
    assert (got, code) == ([b"ok"], grpc.StatusCode.OK)


async def test_stopping_the_server_ends_the_calls_unavailable(server) -> None:
    grpc_server, port = server
    talk = Conversation(port)
    try:
        assert await talk.ask(b"a") == b"a"
        await grpc_server.stop()
        assert await talk.status() == grpc.StatusCode.UNAVAILABLE
    finally:
        talk.close()
    assert OPENED[0].ended


async def test_a_second_server_on_the_port_fails(server) -> None:
    _, port = server
    with pytest.raises(OSError):
        await GrpcServer({}).start("127.0.0.1", port)


# -- raw sockets: what no gRPC library would send ----------------------------------------


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return transport.frame(kind, flags, stream_id, payload)


def grpc_message(data: bytes) -> bytes:
    return struct.pack(">BI", 0, len(data)) + data


def open_stream(stream_id: int = 1) -> bytes:
    headers = hpack.Encoder().encode([
        (":method", "POST"), (":scheme", "http"), (":path", ECHO), (":authority", "x"),
        ("content-type", "application/grpc"), ("te", "trailers"),
    ])  # fmt: skip
    return frame(transport.HEADERS, transport.END_HEADERS, stream_id, headers)


async def raw(port: int):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(PREFACE + frame(transport.SETTINGS, 0, 0))
    return reader, writer


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_messages_split_and_packed_across_frames_arrive_intact(server) -> None:
    """Two messages in one DATA frame, then one cut over three frames (one of them padded):
    the method gets exactly three messages."""
    _, port = server
    _, writer = await raw(port)
    third = grpc_message(b"third message" * 10)
    padded = bytes([4]) + third[10:40] + bytes(4)
    writer.write(
        open_stream()
        + frame(transport.DATA, 0, 1, grpc_message(b"first") + grpc_message(b"second"))
        + frame(transport.DATA, 0, 1, third[:10])
        + frame(transport.DATA, transport.PADDED, 1, padded)
        + frame(transport.DATA, transport.END_STREAM, 1, third[40:])
    )
    await writer.drain()
    await until(lambda: OPENED and OPENED[0].ended)
    assert OPENED[0].got == [b"first", b"second", b"third message" * 10]
    writer.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not HTTP/2
        PREFACE + frame(transport.WINDOW_UPDATE, 0, 0, bytes(4)),  # a window update of 0
        PREFACE + frame(transport.HEADERS, transport.END_HEADERS, 1, b"\xff\xff\xff"),  # HPACK
        PREFACE + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01",  # a 16 MB frame
        PREFACE + frame(transport.DATA, 0, 7, b"data on a stream never opened"),
    ],
    ids=["http1", "zero-window-update", "bad-hpack", "huge-frame", "idle-stream"],
)
async def test_a_peer_that_breaks_the_protocol_is_disconnected_and_others_served(
    server, garbage: bytes
) -> None:
    _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(garbage)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) is not None  # EOF: the server hung up
    assert reader.at_eof()
    writer.close()
    got, code, _ = await asyncio.to_thread(stream, port, ECHO, [b"next"])
    assert (got, code) == ([b"next"], grpc.StatusCode.OK)


async def test_a_peer_that_stops_answering_pings_is_dropped(server, monkeypatch) -> None:
    """A dead Envoy (machine gone, network cut) leaves no FIN: the keepalive PING that goes
    unanswered ends its calls, so the server stops waiting for its ACKs."""
    monkeypatch.setattr(transport, "KEEPALIVE_S", 0.2)
    grpc_server, port = server
    sock = socket.create_connection(("127.0.0.1", port))  # answers nothing, reads nothing
    sock.sendall(PREFACE + frame(transport.SETTINGS, 0, 0) + open_stream())
    await until(lambda: OPENED)
    await until(lambda: OPENED[0].ended, timeout=5)
    await until(lambda: not grpc_server.connections)
    sock.close()


async def test_too_many_calls_on_one_connection_are_refused(server, monkeypatch) -> None:
    monkeypatch.setattr(transport, "MAX_STREAMS", 2)
    _, port = server
    reader, writer = await raw(port)
    writer.write(open_stream(1) + open_stream(3) + open_stream(5))
    await writer.drain()
    refused = b""
    while True:  # frames until the RST_STREAM of stream 5
        head = await asyncio.wait_for(reader.readexactly(9), 5)
        size, kind, stream_id = int.from_bytes(head[:3], "big"), head[3], head[5:9]
        body = await reader.readexactly(size)
        if kind == transport.RST_STREAM:
            refused = stream_id + body
            break
    assert refused == (5).to_bytes(4, "big") + transport.REFUSED_STREAM.to_bytes(4, "big")
    assert len(OPENED) == 2
    writer.close()


async def test_writes_a_full_socket_does_not_take_go_out_later_whole_and_in_order(server) -> None:
    """A plaintext connection writes to its socket directly while nothing waits in the
    transport; a peer that does not read fills the socket, and what it did not take (then
    everything after it, even once the socket has room again) goes through the transport:
    nothing lost, nothing reordered. Once the transport has sent it all, writes go direct."""
    grpc_server, port = server
    count, size = 128, 64 << 10
    messages = [index.to_bytes(4, "big") * (size // 4) for index in range(count)]
    settings = struct.pack(">HIHI", 4, (1 << 31) - 1, 5, (1 << 24) - 1)  # window, frame size
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        PREFACE
        + frame(transport.SETTINGS, 0, 0, settings)
        + frame(transport.WINDOW_UPDATE, 0, 0, ((1 << 31) - 1 - 65535).to_bytes(4, "big"))
        + open_stream()
    )
    await asyncio.to_thread(
        sock.sendall, b"".join(frame(transport.DATA, 0, 1, grpc_message(m)) for m in messages)
    )
    await until(lambda: len(OPENED) == 1 and len(OPENED[0].got) == count)
    (conn,) = grpc_server.connections
    assert conn.sock is not None and conn.spilled  # the socket was full: the rest queued
    assert conn.transport.get_write_buffer_size()
    # Make room in the socket without letting the event loop run (the transport still holds
    # what it took): a write now must still go behind what the transport holds.
    sock.settimeout(0.3)
    received = bytearray()
    with contextlib.suppress(TimeoutError):
        while len(received) < 4 << 20:
            received += sock.recv(1 << 16)
    assert received and conn.transport.get_write_buffer_size()
    OPENED[0].call.send(b"late")
    sock.settimeout(10)  # bytes lost or reordered: a frame never completes

    def read_messages(wanted: int) -> list[bytes]:
        body, got = b"", []
        while len(got) < wanted:
            while len(received) < 9 or len(received) < 9 + int.from_bytes(received[:3], "big"):
                received.extend(sock.recv(1 << 16))
            length, kind = int.from_bytes(received[:3], "big"), received[3]
            if kind == transport.DATA:
                body += received[9 : 9 + length]
                while len(body) >= 5 and len(body) >= 5 + int.from_bytes(body[1:5], "big"):
                    end = 5 + int.from_bytes(body[1:5], "big")
                    got.append(body[5:end])
                    body = body[end:]
            del received[: 9 + length]
        return got

    assert await asyncio.to_thread(read_messages, count + 1) == [*messages, b"late"]
    await until(lambda: not conn.transport.get_write_buffer_size())
    sock.sendall(frame(transport.DATA, 0, 1, grpc_message(b"after")))
    assert await asyncio.to_thread(read_messages, 1) == [b"after"]
    assert not conn.spilled  # the transport had drained: written direct again
    sock.close()
