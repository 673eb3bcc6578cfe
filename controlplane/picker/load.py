"""How loaded each endpoint is: its vLLM metrics, read every `interval`, plus what the
picker sent it since.

Every endpoint a request named in the last minute is read every `interval` (100 ms by
default: GIE's endpoint picker reads every 50 ms), at its own phase of the interval:
`GET /metrics` on a kept-alive connection, on the picker's event loop, the one that answers
Envoy's requests (http_service.py): `vllm:num_requests_waiting`, `vllm:num_requests_running`,
`vllm:kv_cache_usage_perc`. No thread: a read is a few callbacks between two requests, not
a second thread holding Python's GIL while a request waits (a thread of http.client reads
was most of the picker's CPU and its latency tail: docs/benchmarks.md section 12).
Between two reads, what was read and the requests the picker sent since fade with the
time a request stays in that engine, measured from `vllm:e2e_request_latency_seconds`
(Load.in_engine). An endpoint that does not answer is `down` until it does: the picker
lists it last.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from controlplane import logs
from controlplane.picker.http1 import BadMessage, read_body, read_head

log = logs.get("picker")
FORGET_AFTER_S = 60.0  # an endpoint no request named for this long is no longer read
SCRAPE_TIMEOUT_S = 1.0
MAX_METRICS_BYTES = 16 * 1024 * 1024
MIN_STAY_S = 0.001  # a floor under the measured time in the engine (the fade's constant)
GAUGES = {
    b"vllm:num_requests_waiting": "waiting",
    b"vllm:num_requests_running": "running",
    b"vllm:kv_cache_usage_perc": "kv_cache",
}
COUNTERS = {
    b"vllm:prefix_cache_queries_total": "queries",
    b"vllm:e2e_request_latency_seconds_sum": "finished_s",
    b"vllm:e2e_request_latency_seconds_count": "finished",
}


@dataclass
class Load:
    """One endpoint as last read, and the requests sent to it since."""

    waiting: float = 0.0
    running: float = 0.0
    kv_cache: float = 0.0
    sent: float = 0.0  # requests the picker sent it since the last read, fading (below)
    sent_at: float = 0.0  # monotonic time `sent` was last brought up to date
    sent_tokens: int = 0  # prompt tokens the picker sent it since the last read
    up: bool = True
    read_at: float = 0.0  # monotonic time of the last good read
    named_at: float = 0.0  # the last time a request named it as a candidate
    queries: float = 0.0  # vllm:prefix_cache_queries_total: going down means a restart
    finished: float = 0.0  # vllm:e2e_request_latency_seconds_count, as last read
    finished_s: float = 0.0  # and its _sum
    stay_s: float | None = None  # how long a request stays in the engine, once measured

    def fade(self, default: float) -> float:
        """The time constant with which a request counted in the engine stops counting."""
        return self.stay_s if self.stay_s is not None else default

    def in_engine(self, now: float, default_fade: float) -> float:
        """Requests waiting or running there, as last read, and those sent since: what a
        read saw, and each request sent, count fully at once and fade with the time a
        request stays in this engine (measured; `default_fade` before any finished), so
        that requests that ended between two reads do not keep the endpoint looking busy:
        a sequential client that sends its next request once the last one answered never
        looks like a burst, while requests sent faster than the engine serves them add up.
        """
        fade = self.fade(default_fade)
        read = self.waiting + self.running
        if read:
            read *= math.exp((self.read_at - now) / fade)
        return read + self.sent * math.exp((self.sent_at - now) / fade)

    def add_sent(self, tokens: int, now: float, default_fade: float) -> None:
        fade = self.fade(default_fade)
        self.sent = self.sent * math.exp((self.sent_at - now) / fade) + 1.0
        self.sent_at = now
        self.sent_tokens += tokens

    def measure_stay(self, finished: float, finished_s: float) -> None:
        """The mean time in the engine of the requests that finished since the last read
        (vLLM's end-to-end latency: from arrival, queueing included), averaged with the
        last measure; none finished: the last measure stands."""
        done, spent = finished - self.finished, finished_s - self.finished_s
        self.finished, self.finished_s = finished, finished_s
        if done <= 0 or spent < 0:  # nothing finished, or a restart reset the counters
            return
        stay = max(MIN_STAY_S, spent / done)
        self.stay_s = stay if self.stay_s is None else (self.stay_s + stay) / 2


def parse(text: bytes) -> dict[str, float]:
    """The few vLLM series the picker reads, summed over their label sets (one per engine).
    Found with bytes.find rather than by splitting every line: an exposition is ~10 KB of
    histograms the picker does not read, and it reads one every 100 ms per endpoint."""
    found: dict[str, float] = {}
    for name, key in (*GAUGES.items(), *COUNTERS.items()):
        start = 0
        while (at := text.find(b"\n" + name, start)) >= 0:
            end = text.find(b"\n", at + 1)
            line = text[at + 1 : end if end >= 0 else len(text)]
            start = at + 1
            after = line[len(name) : len(name) + 1]
            if after not in (b"{", b" "):
                continue  # another series that starts with this name (e.g. _created)
            try:
                found[key] = found.get(key, 0.0) + float(line.rsplit(b" ", 1)[1])
            except (ValueError, IndexError):
                continue
    return found


class LoadWatcher:
    """Reads the endpoints' metrics on an event loop. `loads` is shared under `lock`: the
    gRPC transport decides on threads of its own."""

    def __init__(
        self,
        interval: float,
        lock: threading.Lock,
        on_restart: Callable[[str], None] = lambda endpoint: None,
        on_read: Callable[[str, bool], None] = lambda endpoint, ok: None,
        named_at: Callable[[str], float | None] | None = None,
        on_forget: Callable[[str], None] | None = None,
    ) -> None:
        """`named_at`, `on_forget`: when another engine decides (the native one), when it
        last named an endpoint, and that the endpoint is no longer read."""
        self.interval = interval
        self.lock = lock
        self.loads: dict[str, Load] = {}
        self._on_restart = on_restart
        self._on_read = on_read
        self._named_at = named_at
        self._on_forget = on_forget
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: dict[str, Reader] = {}  # used on the loop only

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read on `loop`, which runs in another thread, from now on."""
        self._loop = loop
        loop.call_soon_threadsafe(self._add_readers)

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(5)

    async def _close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def named(self, endpoints: list[str], now: float) -> None:
        """Candidates of a request (call under `lock`): read them from now on."""
        loads = self.loads
        for endpoint in endpoints:
            load = loads.get(endpoint)
            if load is None:
                load = loads[endpoint] = Load()
                if self._loop is not None:
                    self._loop.call_soon_threadsafe(self._add_readers)
            load.named_at = now

    def _add_readers(self) -> None:
        """A reader for each endpoint named and not read yet, starting at a random phase of
        the interval, so that the reads of several endpoints do not all land at once."""
        if self._loop is None:
            return
        with self.lock:
            new = [endpoint for endpoint in self.loads if endpoint not in self._readers]
        for endpoint in new:
            reader = self._readers[endpoint] = Reader(self, endpoint, self._loop)
            reader.start(random.uniform(0.0, self.interval))

    def _forgotten(self, endpoint: str) -> bool:
        """Whether no request named `endpoint` for FORGET_AFTER_S (then it is no longer
        read, and its reader is dropped)."""
        with self.lock:
            load = self.loads.get(endpoint)
            if load is not None and self._named_at is not None:
                load.named_at = max(load.named_at, self._named_at(endpoint) or 0.0)
            if load is not None and time.monotonic() - load.named_at <= FORGET_AFTER_S:
                return False
            self.loads.pop(endpoint, None)
        self._readers.pop(endpoint, None)
        if self._on_forget is not None:
            self._on_forget(endpoint)
        return True

    def _apply(self, endpoint: str, found: dict[str, float] | None) -> None:
        restarted = False
        with self.lock:
            load = self.loads.get(endpoint)
            if load is None:
                return
            was_up = load.up
            if found is None:
                load.up = False
            else:
                load.up, load.read_at = True, time.monotonic()
                load.sent, load.sent_tokens = 0.0, 0
                load.waiting = found.get("waiting", 0.0)
                load.running = found.get("running", 0.0)
                load.kv_cache = found.get("kv_cache", 0.0)
                queries = found.get("queries", 0.0)
                restarted = queries < load.queries
                load.queries = queries
                load.measure_stay(found.get("finished", 0.0), found.get("finished_s", 0.0))
        if restarted:
            self._on_restart(endpoint)
        if load.up != was_up:
            logs.event(log, "picker.endpoint_up" if load.up else "picker.endpoint_down",
                       logging.INFO if load.up else logging.WARNING, endpoint=endpoint)  # fmt: skip
        self._on_read(endpoint, found is not None)


class Reader:
    """One endpoint's `GET /metrics` every interval, one at a time, on a kept-alive
    connection (opened again when it closes). A read not answered within SCRAPE_TIMEOUT_S,
    a refused connection or anything but a 200 counts as a failed read."""

    def __init__(self, watcher: LoadWatcher, endpoint: str, loop: asyncio.AbstractEventLoop):
        self.watcher, self.endpoint, self.loop = watcher, endpoint, loop
        host, _, port = endpoint.rpartition(":")
        self.address = (host.strip("[]"), int(port))
        self.request = b"GET /metrics HTTP/1.1\r\nhost: %s\r\n\r\n" % endpoint.encode()
        self.connection: Connection | None = None
        self.connecting: asyncio.Task | None = None
        self.sent_at: float | None = None  # loop time of the read under way
        self.retried = False  # a read under way was sent again on a new connection
        self.due = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def start(self, delay: float) -> None:
        self.due = self.loop.time() + delay
        self.timer = self.loop.call_at(self.due, self.tick)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.sent_at = None
        self._disconnect()

    def tick(self) -> None:
        """Every interval: read, unless the last read is still under way."""
        now = self.loop.time()
        if self.watcher._forgotten(self.endpoint):
            self.close()
            return
        self.due = max(self.due + self.watcher.interval, now)  # late: no catching up
        self.timer = self.loop.call_at(self.due, self.tick)
        if self.sent_at is None:
            self.sent_at, self.retried = now, False
            self._send()
        elif now - self.sent_at > SCRAPE_TIMEOUT_S:
            self._failed()

    def _send(self) -> None:
        if self.connection is not None:
            self.connection.transport.write(self.request)
        elif self.connecting is None:
            self.connecting = self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            await self.loop.create_connection(lambda: Connection(self), *self.address)
        except OSError:
            self.connecting = None
            self._failed()

    def connected(self, connection: Connection) -> None:
        self.connecting = None
        self.connection = connection
        if self.sent_at is not None:
            connection.transport.write(self.request)

    def received(self, connection: Connection) -> None:
        """Data on `connection`: a whole response ends the read under way."""
        buffer = connection.buffer
        try:
            head = read_head(buffer, response=True)
            framed = read_body(buffer, head, MAX_METRICS_BYTES) if head else None
        except BadMessage:
            self._failed()
            return
        if framed is None:
            return
        if self.sent_at is None:  # an answer to no question: the connection is not usable
            self._failed()
            return
        body, end = framed
        del buffer[:end]
        self.sent_at = None
        if not head.keep_alive:
            self._disconnect()
        ok = len(head.start_line) > 1 and head.start_line[1] == b"200"
        self.watcher._apply(self.endpoint, parse(body) if ok else None)

    def lost(self, connection: Connection) -> None:
        """The server closed the connection. With a read under way, it is sent once more
        on a new one (a kept-alive connection closed by the server's idle timeout)."""
        if connection is not self.connection:
            return
        self.connection = None
        if self.sent_at is None:
            return
        if self.retried:
            self._failed()
        else:
            self.retried = True
            self._send()

    def _failed(self) -> None:
        self.sent_at = None
        self._disconnect()
        self.watcher._apply(self.endpoint, None)

    def _disconnect(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if self.connection is not None:
            self.connection.transport.abort()
            self.connection = None


class Connection(asyncio.Protocol):
    """One TCP connection of a Reader: hands it what arrives."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.reader.connected(self)

    def data_received(self, data: bytes) -> None:
        if self is self.reader.connection:
            self.buffer += data
            self.reader.received(self)

    def connection_lost(self, exc) -> None:
        self.reader.lost(self)
