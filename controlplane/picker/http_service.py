"""The picker over HTTP: the transport of ext_proc's `http_service`, Switchyard's Envoy's
default (`picker.transport: http`).

Envoy POSTs each ProcessingRequest as JSON (proto field names, the body base64-encoded,
`transfer-encoding: chunked`) to `PICKER_HTTP_PATH` and reads a ProcessingResponse as JSON
from a 200; any other answer, or none within the message timeout, and it goes on without
the picker (failure_mode_allow). Connections are kept alive, one request at a time each.

This transport carries no gRPC metadata: the version and its candidates come as request
attributes, which Envoy evaluates from the route's metadata (resources.PICKER_ATTRIBUTES),
or as GIE's subset hint in metadata `envoy.lb.subset_hint`.

With the native engine (service.Picker, docs/routing.md) this port is served in C on the
engine's own thread and nothing below runs; with the Python engine, this:
a plain asyncio protocol (framing: http1.py), not a web framework: measured, a POST
answered this way costs ~0.08 ms of CPU, a grpcio call ~0.6 ms (bench/
bench_picker_transport.py). It runs on the picker's event loop, the one that also reads the
endpoints' metrics (load.py): one thread, so the requests never wait for another to hand
over Python's GIL. It listens on loopback only and speaks to Envoy only: requests
it cannot frame get a 400 and the connection is closed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import socket
import time

import pybase64

from controlplane import logs
from controlplane.config import split_hostport
from controlplane.picker.http1 import BadMessage, read_body, read_head
from controlplane.xds.resources import (
    DESTINATION_HEADER,
    EXT_PROC,
    LB_NAMESPACE,
    PICKER_ATTRIBUTES,
    PICKER_HTTP_PATH,
    SUBSET_HEADER,
)

log = logs.get("picker")
SUBSET_NAMESPACE = "envoy.lb.subset_hint"  # GIE: the candidates, when the proxy sends them
POOL_ATTRIBUTE, SUBSET_ATTRIBUTE = PICKER_ATTRIBUTES
# A ProcessingRequest is the request body base64-encoded (4/3 of it) in a little JSON.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_PATH = PICKER_HTTP_PATH.encode()
_MAX_ANSWERS = 4096  # decisions kept serialised (a version's orders of its endpoints)


class HttpService:
    """The ext_proc HTTP service in front of a Picker, on the picker's event loop."""

    def __init__(self, picker, listen: str, loop: asyncio.AbstractEventLoop) -> None:
        self.picker = picker
        self.listen = listen
        self.port = 0
        self._loop = loop  # the picker's, running in its own thread (service.serve)
        self._server: asyncio.Server | None = None
        self._socket: socket.socket | None = None  # the native engine's listening socket
        self._connections: set[asyncio.Transport] = set()
        self._answers: dict[tuple[str, str], bytes] = {}  # (kind, decision) -> the JSON

    @property
    def address(self) -> str:
        return f"{split_hostport(self.listen)[0]}:{self.port}"

    def start(self) -> None:
        """Listen (OSError if the port is taken), then serve: on the native engine's own
        thread, or on the loop."""
        native = self.picker.native
        if native is not None:
            host, port = split_hostport(self.listen)
            self._socket = socket.create_server((host, port))  # SO_REUSEADDR, as below
            self.port = self._socket.getsockname()[1]
            native.serve(self._socket.fileno())
            return
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)

    async def _listen(self) -> None:
        host, port = split_hostport(self.listen)
        self._server = await self._loop.create_server(
            lambda: Exchange(self), host, port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._socket is not None:
            self.picker.native.close()  # its thread stops using the socket first
            self._socket.close()
            self._socket = None
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(5)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for transport in list(self._connections):
            transport.close()

    def answer(self, message: bytes) -> bytes:
        """The ProcessingResponse (JSON) to one ProcessingRequest (JSON): the decision on
        the body, or on the headers when no body follows; any other message is let through."""
        started = time.perf_counter()
        request, body = _parse(message)
        if "request_body" in request:
            kind = "request_body"
        elif "request_headers" in request and (
            request.get("protocol_config", {}).get("request_body_mode", "NONE") == "NONE"
        ):
            kind, body = "request_headers", None
        else:
            kind = next((key for key in request if key.startswith(("request_", "response_"))),
                        "request_body")  # fmt: skip
            return json.dumps({kind: {}}).encode()
        attributes = request.get("attributes", {}).get(EXT_PROC, {})
        subset = attributes.get(SUBSET_ATTRIBUTE) or ""
        candidates = [e for e in subset.split(",") if e] or _subset_hint(request)
        choice = self.picker.decide(attributes.get(POOL_ATTRIBUTE) or "", candidates, body)
        payload = self._answers.get((kind, choice))
        if payload is None:
            payload = _response(kind, choice)
            if len(self._answers) >= _MAX_ANSWERS:
                self._answers.clear()
            self._answers[(kind, choice)] = payload
        self.picker.observe(time.perf_counter() - started)
        return payload


_BODY_FIRST = b'{"request_body":{"body":"'


def _parse(message: bytes) -> tuple[dict, bytes | None]:
    """The ProcessingRequest (its body left out) and its request body, decoded (None if it
    has none). Where Envoy wrote the body first (it prints fields in their proto order:
    `request_body` leads), the body is decoded where it lies and only the rest is parsed:
    the JSON parser does not scan ~4/3 of the body in base64 only to copy it into a string.
    pybase64 decodes 15 KB in ~1 us, where binascii takes ~40 (SIMD)."""
    if message.startswith(_BODY_FIRST):
        end = message.find(b'"', len(_BODY_FIRST))
        if end > 0:
            try:
                body = pybase64.b64decode(memoryview(message)[len(_BODY_FIRST) : end],
                                          validate=True)  # fmt: skip
            except (binascii.Error, ValueError):
                pass  # not plain base64 (escaped?): the parser reads it below
            else:
                return json.loads(_BODY_FIRST + message[end:]), body
    request = json.loads(message)
    if not isinstance(request, dict):
        raise ValueError("a ProcessingRequest is a JSON object")
    if "request_body" not in request:
        return request, None
    return request, pybase64.b64decode(request["request_body"].get("body", ""), validate=True)


def _response(kind: str, choice: str | None) -> bytes:
    """The ProcessingResponse (JSON) for a decision; None: go on without one."""
    if choice is None:
        return json.dumps({kind: {}}).encode()
    header = {"key": DESTINATION_HEADER,
              "raw_value": base64.b64encode(choice.encode()).decode()}  # fmt: skip
    return json.dumps({
        kind: {"response": {"header_mutation": {"set_headers": [{"header": header}]}}},
        "dynamic_metadata": {LB_NAMESPACE: {DESTINATION_HEADER: choice}},
    }).encode()  # fmt: skip


def _subset_hint(request: dict) -> list[str]:
    """GIE's candidates in metadata `envoy.lb.subset_hint`, when a proxy sends them."""
    hint = request.get("metadata_context", {}).get("filter_metadata", {}).get(SUBSET_NAMESPACE)
    value = hint.get(SUBSET_HEADER) if isinstance(hint, dict) else None
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str) and item]
    if isinstance(value, str):
        return [e for e in value.split(",") if e]
    return []


class Exchange(asyncio.Protocol):
    """One connection from Envoy: HTTP/1.1 requests in turn, each answered at once."""

    def __init__(self, service: HttpService) -> None:
        self.service = service
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.service._connections.add(transport)

    def connection_lost(self, exc) -> None:
        self.service._connections.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None and not self.transport.is_closing():
            try:
                request = next_request(self.buffer)
            except BadMessage as exc:
                self._reply(exc.status, str(exc).encode(), keep_alive=False)
                return
            if request is None:
                return
            method, target, message, keep_alive, consumed = request
            del self.buffer[:consumed]
            if method != b"POST":
                self._reply(405, b"POST only", keep_alive)
            elif target.split(b"?", 1)[0] != _PATH:
                self._reply(404, b"not found", keep_alive)
            else:
                try:
                    payload = self.service.answer(message)
                except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
                    self._reply(400, f"not a ProcessingRequest: {exc}".encode(), keep_alive)
                except Exception as exc:  # a bug: Envoy goes on without the picker
                    logs.event(log, "picker.error", logging.ERROR, error=repr(exc))
                    self._reply(500, b"error", keep_alive)
                else:
                    self._reply(200, payload, keep_alive, json_body=True)

    def _reply(self, status: int, body: bytes, keep_alive: bool, json_body: bool = False) -> None:
        kind = b"application/json" if json_body else b"text/plain"
        head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n" % (
            status, _REASONS.get(status, b"Error"), kind, len(body),
            b"" if keep_alive else b"connection: close\r\n")  # fmt: skip
        self.transport.write(head + body)
        if not keep_alive:
            self.transport.close()


_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
            413: b"Content Too Large", 431: b"Request Header Fields Too Large",
            500: b"Internal Server Error", 501: b"Not Implemented"}  # fmt: skip


def next_request(buffer: bytearray) -> tuple[bytes, bytes, bytes, bool, int] | None:
    """The first whole request in `buffer`: (method, target, body, keep-alive, bytes it
    takes), None while it is incomplete, BadMessage when it cannot be framed."""
    head = read_head(buffer)
    if head is None:
        return None
    framed = read_body(buffer, head, MAX_MESSAGE_BYTES)
    if framed is None:
        return None
    method, target, _ = head.start_line
    return method, target, framed[0], head.keep_alive, framed[1]
