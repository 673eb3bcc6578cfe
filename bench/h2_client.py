"""A lean gRPC streaming client over HTTP/2 for the fan-out benchmark's simulated Envoys.

grpc.aio clients cost ~200 us of CPU per response received and ACKed on this machine: 1,000
of them on the same 2 cores as the control plane measure mostly themselves. Real Envoys
run elsewhere, in C++. This client speaks the same wire protocol (HTTP/2 frames, HPACK,
gRPC message framing) with the least work per message, so the control plane's share shows.
Flow control: it advertises large windows and returns them; it sends only small ACKs, far
inside the server's windows. Not for anything but benchmarks.
"""

from __future__ import annotations

import asyncio
import struct

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
WINDOW = 1 << 24
_HEADER = struct.Struct(">HBBBI")


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return _HEADER.pack(size >> 8, size & 0xFF, kind, flags, stream_id) + payload


class StreamClosed(ConnectionError):
    pass


class H2Call(asyncio.Protocol):
    """One connection with one gRPC call (stream 1): `write(bytes)`, `await read()`."""

    def __init__(self, path: str, authority: str) -> None:
        self.path, self.authority = path, authority
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.message = bytearray()
        self.messages: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.decoder = hpack.Decoder()
        self.unacked = 0
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int, path: str) -> H2Call:
        loop = asyncio.get_running_loop()
        _, call = await loop.create_connection(lambda: cls(path, f"{host}:{port}"), host, port)
        return call

    def connection_made(self, transport) -> None:
        self.transport = transport
        headers = hpack.Encoder().encode([
            (":method", "POST"), (":scheme", "http"), (":path", self.path),
            (":authority", self.authority), ("content-type", "application/grpc"),
            ("te", "trailers"),
        ])  # fmt: skip
        transport.write(
            PREFACE
            + _frame(SETTINGS, 0, 0, struct.pack(">HI", 4, WINDOW))
            + _frame(WINDOW_UPDATE, 0, 0, (WINDOW - 65535).to_bytes(4, "big"))
            + _frame(HEADERS, 0x4, 1, headers)
        )

    def write(self, message: bytes) -> None:
        if self.closed:
            raise StreamClosed("the call ended")
        size = len(message) + 5
        self.transport.write(
            _HEADER.pack(size >> 8, size & 0xFF, DATA, 0, 1) + struct.pack(">BI", 0, len(message))
            + message
        )  # fmt: skip

    async def read(self) -> bytes:
        message = await self.messages.get()
        if message is None:
            self.messages.put_nowait(None)
            raise StreamClosed("the call ended")
        return message

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self._end()

    def _end(self) -> None:
        if not self.closed:
            self.closed = True
            self.messages.put_nowait(None)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        start, end = 0, len(buffer)
        while end - start >= 9:
            high, low, kind, flags, _ = _HEADER.unpack_from(buffer, start)
            size = (high << 8) | low
            if end - start < 9 + size:
                break
            payload = bytes(buffer[start + 9 : start + 9 + size])
            start += 9 + size
            if kind == DATA:
                self._data(payload)
                if flags & 0x1:
                    self._end()
            elif kind == HEADERS:
                self.decoder.decode(payload)  # keep the table; trailers end the call
                if flags & 0x1:
                    self._end()
            elif kind == SETTINGS and not flags & 0x1:
                self.transport.write(_frame(SETTINGS, 0x1, 0))
            elif kind == PING and not flags & 0x1:
                self.transport.write(_frame(PING, 0x1, 0, payload))
            elif kind in (RST_STREAM, GOAWAY):
                self._end()
                self.transport.close()
        del buffer[:start]

    def _data(self, payload: bytes) -> None:
        self.unacked += len(payload)
        if self.unacked >= WINDOW // 4:
            update = self.unacked.to_bytes(4, "big")
            both = _frame(WINDOW_UPDATE, 0, 0, update) + _frame(WINDOW_UPDATE, 0, 1, update)
            self.transport.write(both)
            self.unacked = 0
        message = self.message
        message += payload
        while len(message) >= 5:
            size = int.from_bytes(message[1:5], "big")
            if len(message) < 5 + size:
                break
            self.messages.put_nowait(bytes(message[5 : 5 + size]))
            del message[: 5 + size]
