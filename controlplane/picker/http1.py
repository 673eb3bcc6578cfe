"""HTTP/1.1 framing, both ways, without a web framework: the picker answers Envoy's ext_proc
POSTs (http_service.py) and reads the endpoints' /metrics (load.py) on one event loop, and
its CPU per request is the point (docs/routing.md). A message is framed by content-length or
chunked transfer-encoding; its body is copied only once it is all there."""

from __future__ import annotations

from dataclasses import dataclass

MAX_HEAD_BYTES = 16 * 1024
_HEX_DIGITS = b"0123456789abcdefABCDEF"


class BadMessage(Exception):
    """A message that cannot be framed: a server answers `status` and closes the
    connection, a client closes it (what follows on it cannot be trusted)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class Head:
    start_line: list[bytes]  # request: method, target, version; response: version, status, ...
    length: int | None  # content-length, if given
    chunked: bool
    keep_alive: bool
    size: int  # bytes of the head, blank line included: where the body starts


def read_head(buffer: bytearray, response: bool = False) -> Head | None:
    """The head of the request (or `response`) at the start of `buffer`, None while it is
    incomplete."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise BadMessage(431, "head too large")
        return None
    lines = bytes(buffer[:head_end]).split(b"\r\n")
    start_line = lines[0].split(b" ", 2)
    if response:
        version = start_line[0]
    else:  # method, target, version
        version = start_line[2] if len(start_line) == 3 and b" " not in start_line[2] else b""
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadMessage(400, "not HTTP/1.x")
    length: int | None = None
    chunked = False
    keep_alive = version == b"HTTP/1.1"
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise BadMessage(400, "malformed header")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            if not value.isdigit() or length is not None:
                raise BadMessage(400, "bad content-length")
            length = int(value)
        elif name == b"transfer-encoding":
            if value != b"chunked":
                raise BadMessage(501, "only chunked transfer-encoding")
            chunked = True
        elif name == b"connection":
            if b"close" in value:
                keep_alive = False
            elif b"keep-alive" in value:
                keep_alive = True
    if chunked and length is not None:
        raise BadMessage(400, "both content-length and chunked")
    return Head(start_line, length, chunked, keep_alive, head_end + 4)


def read_body(buffer: bytearray, head: Head, limit: int) -> tuple[bytes, int] | None:
    """The body after `head` in `buffer` and where the message ends, None while it is
    incomplete; BadMessage (413) beyond `limit` bytes."""
    start = head.size
    if not head.chunked:
        length = head.length or 0
        if length > limit:
            raise BadMessage(413, "message too large")
        if len(buffer) < start + length:
            return None
        return bytes(buffer[start : start + length]), start + length
    spans: list[tuple[int, int]] = []  # where each chunk's data is
    total, position = 0, start
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            if len(buffer) - position > 1024:
                raise BadMessage(400, "chunk size line too long")
            return None
        size_text = bytes(buffer[position:line_end]).split(b";", 1)[0].strip()
        if not size_text or size_text.translate(None, _HEX_DIGITS) or len(size_text) > 16:
            raise BadMessage(400, "bad chunk size")
        size = int(size_text, 16)
        total += size
        if total > limit:
            raise BadMessage(413, "message too large")
        if size == 0:  # then trailers, if any, up to an empty line
            end = buffer.find(b"\r\n\r\n", line_end)
            if end < 0:
                return None
            return b"".join(bytes(buffer[a:b]) for a, b in spans), end + 4
        data = line_end + 2
        if len(buffer) < data + size + 2:
            return None
        if buffer[data + size : data + size + 2] != b"\r\n":
            raise BadMessage(400, "chunk not followed by CRLF")
        spans.append((data, data + size))
        position = data + size + 2
