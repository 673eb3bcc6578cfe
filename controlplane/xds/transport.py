"""gRPC over HTTP/2 on asyncio: as much of it as the xDS port serves (ADR 0006).

grpc.aio hands every message between its own threads and the event loop: ~250 us of CPU
per push and ~0.7 ms of latency per round trip on this machine (ADR 0005). Here a push is
one `transport.write` of bytes built once per change, made by the event loop that made the
change, and an Envoy's answer is parsed and handled inside `data_received`, with no task
switch either way.

It serves streaming calls to Envoys and to gRPC clients: HTTP/2 framing, flow control in
both directions, HPACK (the `hpack` package) for the header blocks that open and end a
call, PING (and a keepalive that drops dead peers), GOAWAY, mutual TLS through `ssl`.
Not served: compression (nobody asks for it here), server push, HTTP/1.

A method is served by an `open(call) -> receiver` function: the receiver's `on_message`
gets each request message (bytes), and `on_end` once, when the call is over: the client
half-closed (then `call.closed` is False: it may still answer, and the call then ends with
OK unless it closed it otherwise) or the call was reset, the connection lost or the server
stopped (`call.closed` is True).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from collections import deque
from collections.abc import Callable
from typing import Protocol
from urllib.parse import quote

import hpack

from controlplane import logs

log = logs.get("xds")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
# Error codes (RFC 9113, 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x7, 0x9, 0xB
# gRPC status codes.
OK, INTERNAL, UNIMPLEMENTED, UNAVAILABLE, RESOURCE_EXHAUSTED = 0, 13, 12, 14, 8

MAX_STREAMS = 100  # per connection: an Envoy uses two (ADS, stats)
RECV_WINDOW = 1 << 24  # what a peer may send ahead, per stream and per connection
MAX_FRAME = 1 << 20  # the largest frame a peer may send us
MAX_HEADER_BLOCK = 1 << 16  # a header block, CONTINUATIONs included
MAX_MESSAGE = 4 << 20  # a request message (grpc's default)
KEEPALIVE_S = 30.0  # a peer that does not answer a PING within this is dropped
MAX_WINDOW = (1 << 31) - 1
# The standard event loop's plaintext transport, whose socket `_Connection.write` may use
# directly (a private class: if a Python release drops it, every write uses the transport).
_SELECTOR_TRANSPORT = getattr(asyncio.selector_events, "_SelectorSocketTransport", None)
_HEADER = struct.Struct(">HBBBI")  # an HTTP/2 frame header: 24-bit length, type, flags, id
_PREFIX = struct.Struct(">BI")  # a gRPC message prefix: compressed flag, length
_GRPC_HEADERS = [(":status", "200"), ("content-type", "application/grpc")]


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return _HEADER.pack(size >> 8, size & 0xFF, kind, flags, stream_id) + payload


class Framed:
    """A response message framed once for every call it goes to (XdsServer.publish sends
    the same bytes to every Envoy): the gRPC prefix and the DATA frame header but for the
    stream id, which each call adds. Writing it to a call then copies it once."""

    __slots__ = ("body", "head", "size")

    def __init__(self, message: bytes) -> None:
        self.size = size = len(message) + 5
        self.head = _HEADER.pack(size >> 8, size & 0xFF, DATA, 0, 0)[:5]  # length, type, flags
        self.body = _PREFIX.pack(0, size - 5) + message


class Receiver(Protocol):
    def on_message(self, message: bytes) -> None: ...
    def on_end(self) -> None: ...


Opener = Callable[["Call"], Receiver]


class ConnectionFailed(Exception):
    """The peer broke the protocol: the connection ends with GOAWAY and this code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class Call:
    """One gRPC call (an HTTP/2 stream): what a method's receiver answers through."""

    __slots__ = (
        "buffer",
        "close_after",
        "closed",
        "conn",
        "ended",
        "headers_sent",
        "id",
        "id_bytes",
        "path",
        "peer",
        "pending",
        "receiver",
        "remote_closed",
        "send_window",
        "unacked",
    )  # fmt: skip

    def __init__(self, conn: _Connection, stream_id: int, path: str) -> None:
        self.conn = conn
        self.id = stream_id
        self.id_bytes = stream_id.to_bytes(4, "big")  # the last 4 bytes of its frame headers
        self.path = path
        self.peer = conn.peer
        self.receiver: Receiver | None = None
        self.send_window = conn.peer_window
        self.unacked = 0  # bytes received since our last WINDOW_UPDATE for this stream
        self.pending: deque[memoryview] = deque()  # DATA held back by the peer's windows
        self.buffer = bytearray()  # a request message not complete yet
        self.headers_sent = False
        self.closed = False  # we sent our trailers (or reset the stream)
        self.remote_closed = False  # the peer half-closed or reset it
        self.ended = False  # the receiver's on_end ran
        self.close_after: tuple[int, str] | None = None  # trailers waiting for pending DATA

    def send(self, message: bytes | Framed) -> None:
        """Send one response message (serialized, or framed once for many calls): written
        at once unless the peer's flow control windows hold it back; then it goes out as
        they open, in order."""
        if self.closed:
            return
        conn = self.conn
        if not self.headers_sent:
            self.headers_sent = True
            conn.write(frame(HEADERS, END_HEADERS, self.id, conn.encoder.encode(_GRPC_HEADERS)))
        if type(message) is not Framed:
            message = Framed(message)
        size = message.size
        if (
            not self.pending
            and size <= self.send_window
            and size <= conn.send_window
            and size <= conn.peer_max_frame
        ):
            self.send_window -= size
            conn.send_window -= size
            conn.write(b"".join((message.head, self.id_bytes, message.body)))
            return
        self.pending.append(memoryview(message.body))
        conn.flush(self)

    def close(self, status: int = OK, message: str = "") -> None:
        """End the call with a gRPC status (after any response still held back)."""
        if self.closed or self.close_after is not None:
            return
        if self.pending:
            self.close_after = (status, message)
            return
        self.closed = True
        conn = self.conn
        headers = [] if self.headers_sent else list(_GRPC_HEADERS)
        headers.append(("grpc-status", str(status)))
        if message:
            headers.append(("grpc-message", quote(message, safe=" !#$&'()*+,-./:;<=>?@[]^_`{|}~")))
        conn.write(frame(HEADERS, END_HEADERS | END_STREAM, self.id, conn.encoder.encode(headers)))
        # What the client still sends on it is counted against the connection's window and
        # dropped (no RST_STREAM: grpc clients report a write racing it as an internal error).
        self.remote_closed = True
        conn.forget(self)
        self.end()

    def reset(self, code: int) -> None:
        """Abort the call (RST_STREAM): for a call that broke the protocol or its limits."""
        if not self.closed:
            self.closed = self.remote_closed = True
            self.pending.clear()
            self.conn.write(frame(RST_STREAM, 0, self.id, code.to_bytes(4, "big")))
        self.conn.forget(self)
        self.end()

    # -- from the connection ------------------------------------------------------------

    def received(self, data: bytes, end_stream: bool) -> None:
        """A DATA frame's content: deliver every complete message."""
        if data:
            if not self.buffer and len(data) >= 5 and data[0] == 0:
                size = int.from_bytes(data[1:5], "big")
                if size + 5 == len(data) and size <= MAX_MESSAGE:  # one message, one frame
                    self._deliver(data[5:])
                    data = b""
            if data:
                self.buffer += data
                self._deliver_buffered()
        if end_stream:
            self.remote_closed = True
            self.end()

    def _deliver_buffered(self) -> None:
        buffer = self.buffer
        start = 0
        while len(buffer) - start >= 5 and not self.closed:
            compressed, size = _PREFIX.unpack_from(buffer, start)
            if compressed:
                self.close(UNIMPLEMENTED, "compressed messages are not supported")
                return
            if size > MAX_MESSAGE:
                self.close(RESOURCE_EXHAUSTED, f"message of {size} bytes exceeds {MAX_MESSAGE}")
                return
            if len(buffer) - start < 5 + size:
                break
            message = bytes(buffer[start + 5 : start + 5 + size])
            start += 5 + size
            self._deliver(message)
        del buffer[:start]

    def _deliver(self, message: bytes) -> None:
        if self.closed or self.receiver is None:
            return
        try:
            self.receiver.on_message(message)
        except Exception as exc:  # one bad call must not take the connection down
            logs.event(log, "grpc.handler_failed", logging.ERROR, path=self.path,
                       peer=self.peer, error=repr(exc))  # fmt: skip
            self.close(INTERNAL, "the server failed to handle the message")

    def end(self) -> None:
        """Tell the receiver, once, that the call is over (or half-closed by the peer)."""
        if self.ended:
            return
        self.ended = True
        if self.receiver is not None:
            try:
                self.receiver.on_end()
            except Exception as exc:
                logs.event(log, "grpc.handler_failed", logging.ERROR, path=self.path,
                           peer=self.peer, error=repr(exc))  # fmt: skip
        if not self.closed and self.remote_closed and self.close_after is None:
            self.close(OK)

    def aborted(self) -> None:
        """The peer reset the call, or the connection is gone."""
        self.closed = self.remote_closed = True
        self.pending.clear()
        self.end()


class _Connection(asyncio.Protocol):
    """One client connection: frames in, frames out."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        # A plaintext connection's socket, written directly while the transport holds
        # nothing unsent (write); None over TLS or another event loop's transport.
        self.sock: socket.socket | None = None
        self.spilled = False  # the transport may hold bytes: write through it until it drains
        self.peer = ""
        self.buffer = bytearray()
        self.preface = False
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_BLOCK)
        self.calls: dict[int, Call] = {}
        self.blocked: dict[int, Call] = {}  # calls with DATA held back, in order
        self.peer_window = 65535  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self.peer_max_frame = 16384
        self.send_window = 65535  # the connection's
        self.unacked = 0  # bytes received since our last connection WINDOW_UPDATE
        self.last_stream = 0
        self.continued: tuple[int, int, bytearray] | None = None  # headers awaiting CONTINUATION
        self.going_away = False
        self.ping_unanswered = False
        self.keepalive: asyncio.TimerHandle | None = None
        self.lost = asyncio.get_running_loop().create_future()

    # -- asyncio ---------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None and sslobj.selected_alpn_protocol() != "h2":
            transport.abort()  # gRPC over TLS is HTTP/2 negotiated by ALPN, nothing else
            return
        self.server.connections.add(self)
        sock = getattr(transport, "_sock", None)
        if _SELECTOR_TRANSPORT is not None and type(transport) is _SELECTOR_TRANSPORT \
                and type(sock) is socket.socket:
            self.sock = sock
        ours = ((3, MAX_STREAMS), (4, RECV_WINDOW), (5, MAX_FRAME), (6, MAX_HEADER_BLOCK))
        settings = b"".join(struct.pack(">HI", key, value) for key, value in ours)
        self.write(frame(SETTINGS, 0, 0, settings))
        self.write(frame(WINDOW_UPDATE, 0, 0, (RECV_WINDOW - 65535).to_bytes(4, "big")))
        self.keepalive = asyncio.get_running_loop().call_later(KEEPALIVE_S, self._ping)

    def connection_lost(self, exc) -> None:
        self.server.connections.discard(self)
        if self.keepalive is not None:
            self.keepalive.cancel()
        for call in list(self.calls.values()):
            call.aborted()
        self.calls.clear()
        self.blocked.clear()
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        if buffer or not self.preface:  # the rest of a frame begun in an earlier read
            buffer += data
            data = buffer
        # else (most reads: whole frames, an ACK) parsed from `data` itself, not copied
        try:
            start = 0
            if not self.preface:
                if len(buffer) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buffer)):
                        raise ConnectionFailed(PROTOCOL_ERROR, "not an HTTP/2 client")
                    return
                if buffer[: len(PREFACE)] != PREFACE:
                    raise ConnectionFailed(PROTOCOL_ERROR, "not an HTTP/2 client")
                self.preface = True
                start = len(PREFACE)
            end = len(data)
            while end - start >= 9:
                high, low, kind, flags, stream_id = _HEADER.unpack_from(data, start)
                size = (high << 8) | low
                if size > MAX_FRAME:
                    raise ConnectionFailed(FRAME_SIZE_ERROR, f"a frame of {size} bytes")
                if end - start < 9 + size:
                    break
                payload = data[start + 9 : start + 9 + size]
                if data is buffer:
                    payload = bytes(payload)
                start += 9 + size
                self._frame(kind, flags, stream_id & 0x7FFFFFFF, payload)
                if self.transport is None or self.transport.is_closing():
                    return
            if data is buffer:
                del buffer[:start]
            elif start < end:
                buffer += memoryview(data)[start:]  # a frame's beginning
        except ConnectionFailed as exc:
            self._fail(exc.code, str(exc))
        except Exception as exc:  # a bug of ours: end this connection, not the server
            logs.event(log, "grpc.connection_failed", logging.ERROR, peer=self.peer,
                       error=repr(exc))  # fmt: skip
            self._fail(INTERNAL_ERROR, "internal error")

    # -- frames in -------------------------------------------------------------------------

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continued is not None and kind != CONTINUATION:
            raise ConnectionFailed(PROTOCOL_ERROR, "a header block was interrupted")
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == CONTINUATION:
            if self.continued is None or self.continued[0] != stream_id:
                raise ConnectionFailed(PROTOCOL_ERROR, "an unexpected CONTINUATION")
            block = self.continued[2]
            block += payload
            if len(block) > MAX_HEADER_BLOCK:
                raise ConnectionFailed(ENHANCE_YOUR_CALM, "a header block too large")
            if flags & END_HEADERS:
                first_flags = self.continued[1]
                self.continued = None
                self._header_block(stream_id, first_flags, bytes(block))
        elif kind == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == PING:
            if len(payload) != 8:
                raise ConnectionFailed(FRAME_SIZE_ERROR, "a PING not of 8 bytes")
            if flags & ACK:
                self.ping_unanswered = False
            else:
                self.write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            call = self.calls.get(stream_id)
            if call is not None:
                self.forget(call)
                call.aborted()
        elif kind == GOAWAY:
            self.going_away = True
            if not self.calls:
                self.transport.close()
        elif kind == PUSH_PROMISE:
            raise ConnectionFailed(PROTOCOL_ERROR, "a client may not push")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 says.

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ConnectionFailed(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)
        if flags & PADDED:
            if not payload or payload[0] >= size:
                raise ConnectionFailed(PROTOCOL_ERROR, "bad padding")
            payload = payload[1 : size - payload[0]]
        self.unacked += size
        if self.unacked >= RECV_WINDOW // 4:
            self.write(frame(WINDOW_UPDATE, 0, 0, self.unacked.to_bytes(4, "big")))
            self.unacked = 0
        call = self.calls.get(stream_id)
        if call is None or call.remote_closed:
            if stream_id > self.last_stream:
                raise ConnectionFailed(PROTOCOL_ERROR, "DATA on an idle stream")
            return  # a call we ended: its data is counted above and dropped
        call.unacked += size
        if call.unacked >= RECV_WINDOW // 4 and not flags & END_STREAM:
            self.write(frame(WINDOW_UPDATE, 0, stream_id, call.unacked.to_bytes(4, "big")))
            call.unacked = 0
        call.received(payload, bool(flags & END_STREAM))

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise ConnectionFailed(PROTOCOL_ERROR, "HEADERS on a server stream id")
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise ConnectionFailed(PROTOCOL_ERROR, "bad padding")
            payload = payload[1 : len(payload) - payload[0]]
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        if flags & END_HEADERS:
            self._header_block(stream_id, flags, payload)
        else:
            self.continued = (stream_id, flags, bytearray(payload))

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        try:  # always decoded: the HPACK table is the connection's
            headers = dict(self.decoder.decode(block))
        except hpack.HPACKError as exc:
            raise ConnectionFailed(COMPRESSION_ERROR, f"bad header block: {exc}") from None
        end_stream = bool(flags & END_STREAM)
        call = self.calls.get(stream_id)
        if call is not None:  # trailers of a call
            if end_stream and not call.remote_closed:
                call.remote_closed = True
                call.end()
            return
        if stream_id <= self.last_stream:
            return  # a call we ended already
        self.last_stream = stream_id
        if self.going_away or len(self.calls) >= MAX_STREAMS:
            self.write(frame(RST_STREAM, 0, stream_id, REFUSED_STREAM.to_bytes(4, "big")))
            return
        path = headers.get(":path", "")
        call = Call(self, stream_id, path)
        self.calls[stream_id] = call
        call.remote_closed = end_stream
        opener = self.server.methods.get(path)
        if headers.get(":method") != "POST" or not headers.get("content-type", "").startswith(
            "application/grpc"
        ):
            call.close(UNIMPLEMENTED, "only gRPC is served here")
            return
        if opener is None:
            call.close(UNIMPLEMENTED, f"unknown method {path}")
            return
        try:
            call.receiver = opener(call)
        except Exception as exc:
            logs.event(log, "grpc.handler_failed", logging.ERROR, path=path, peer=self.peer,
                       error=repr(exc))  # fmt: skip
            call.close(INTERNAL, "the server failed to open the call")
            return
        if end_stream:
            call.end()

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ConnectionFailed(FRAME_SIZE_ERROR, "a SETTINGS frame not of 6-byte entries")
        for key, value in struct.iter_unpack(">HI", payload):
            if key == 1:
                self.encoder.header_table_size = min(value, 4096)
            elif key == 4:
                if value > MAX_WINDOW:
                    raise ConnectionFailed(FLOW_CONTROL_ERROR, "initial window too large")
                delta, self.peer_window = value - self.peer_window, value
                for call in self.calls.values():
                    call.send_window += delta
            elif key == 5:
                if not 16384 <= value <= (1 << 24) - 1:
                    raise ConnectionFailed(PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self.peer_max_frame = value
        self.write(frame(SETTINGS, ACK, 0))
        for call in list(self.blocked.values()):
            self.flush(call)

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionFailed(FRAME_SIZE_ERROR, "a WINDOW_UPDATE not of 4 bytes")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0 or self.send_window + increment > MAX_WINDOW:
                raise ConnectionFailed(FLOW_CONTROL_ERROR, "bad connection window update")
            self.send_window += increment
            for call in list(self.blocked.values()):
                self.flush(call)
                if self.send_window <= 0:
                    break
            return
        call = self.calls.get(stream_id)
        if call is None:
            return
        if increment == 0 or call.send_window + increment > MAX_WINDOW:
            call.reset(FLOW_CONTROL_ERROR)
            return
        call.send_window += increment
        self.flush(call)

    # -- frames out ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send `data` after everything written before. A plaintext connection whose
        transport holds nothing unsent writes to its socket itself, one send(), with none
        of asyncio's bookkeeping (most writes: a push, ~3 KB, fits the socket's buffer);
        what the socket does not take, and everything after it until the transport has
        sent that, goes through the transport, which keeps the order and waits for the
        socket as always. TLS connections always write through the transport."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        sock = self.sock
        if sock is not None:
            if self.spilled:
                self.spilled = bool(transport.get_write_buffer_size())
            if not self.spilled:
                try:
                    sent = sock.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:  # the transport meets it again and closes as it does
                    sent = 0
                if sent == len(data):
                    return
                self.spilled = True
                data = data[sent:]
        transport.write(data)

    def flush(self, call: Call) -> None:
        """Send what the windows now allow of `call`'s held-back DATA; its trailers after."""
        pending = call.pending
        while pending and call.send_window > 0 and self.send_window > 0:
            chunk = pending[0]
            size = min(len(chunk), call.send_window, self.send_window, self.peer_max_frame)
            self.write(_HEADER.pack(size >> 8, size & 0xFF, DATA, 0, call.id) + chunk[:size])
            call.send_window -= size
            self.send_window -= size
            if size == len(chunk):
                pending.popleft()
            else:
                pending[0] = chunk[size:]
        if pending:
            self.blocked[call.id] = call
            return
        self.blocked.pop(call.id, None)
        if call.close_after is not None:
            status, message = call.close_after
            call.close_after = None
            call.close(status, message)

    def forget(self, call: Call) -> None:
        self.calls.pop(call.id, None)
        self.blocked.pop(call.id, None)
        if self.going_away and not self.calls and self.transport is not None:
            self.transport.close()

    def _fail(self, code: int, reason: str) -> None:
        logs.event(log, "grpc.protocol_error", logging.WARNING, peer=self.peer, reason=reason)
        self.goaway(code, reason)
        if self.transport is not None:
            self.transport.close()

    def goaway(self, code: int = NO_ERROR, reason: str = "") -> None:
        self.going_away = True
        self.write(frame(GOAWAY, 0, 0, struct.pack(">II", self.last_stream, code)
                         + reason.encode()[:256]))  # fmt: skip

    def _ping(self) -> None:
        """Keepalive: a peer that left no trace (a dead machine, a cut network) is dropped
        when it does not answer a PING within KEEPALIVE_S; its calls end."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.ping_unanswered:
            logs.event(log, "grpc.peer_unresponsive", logging.WARNING, peer=self.peer)
            self.transport.abort()
            return
        self.ping_unanswered = True
        self.write(frame(PING, 0, 0, b"keepaliv"))
        self.keepalive = asyncio.get_running_loop().call_later(KEEPALIVE_S, self._ping)


class GrpcServer:
    """Serves `methods` ({"/package.Service/Method": open}) on one port."""

    def __init__(self, methods: dict[str, Opener], ssl_context: ssl.SSLContext | None = None):
        self.methods = dict(methods)
        self.ssl = ssl_context
        self.connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen (port 0: a free one); the port. OSError when it cannot bind: no
        SO_REUSEPORT, so a second server on the port fails rather than sharing it."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, ssl=self.ssl, reuse_port=False
        )
        return self._server.sockets[0].getsockname()[1]

    async def stop(self, grace: float = 0.5) -> None:
        """Stop listening, end every call (UNAVAILABLE: clients reconnect elsewhere or
        later) and close the connections, waiting at most `grace` for them to go."""
        if self._server is None:
            return
        self._server.close()
        connections = list(self.connections)
        for conn in connections:
            conn.goaway()
            for call in list(conn.calls.values()):
                call.close(UNAVAILABLE, "the server is stopping")
                call.aborted()
            if conn.transport is not None:
                conn.transport.close()
        if connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(conn.lost for conn in connections)), grace
                )
            for conn in connections:
                if conn.transport is not None and not conn.lost.done():
                    conn.transport.abort()
        self._server = None

