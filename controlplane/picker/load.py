"""How loaded each endpoint is: its vLLM metrics, read every `interval`, plus what the
picker sent it since.

A thread reads `/metrics` of every endpoint a request named in the last minute, at most
`interval` apart (100 ms by default: GIE's endpoint picker reads every 50 ms), in parallel,
with keep-alive connections: `vllm:num_requests_waiting`, `vllm:num_requests_running`,
`vllm:kv_cache_usage_perc`. Between two reads, the requests the picker sent an endpoint
count as in it, fading (Load.in_engine).
An endpoint that does not answer is `down` until it does: the picker lists it last.
"""

from __future__ import annotations

import http.client
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from controlplane import logs

log = logs.get("picker")
FORGET_AFTER_S = 60.0  # an endpoint no request named for this long is no longer read
SCRAPE_TIMEOUT_S = 1.0
GAUGES = {
    b"vllm:num_requests_waiting": "waiting",
    b"vllm:num_requests_running": "running",
    b"vllm:kv_cache_usage_perc": "kv_cache",
}
QUERIES = b"vllm:prefix_cache_queries_total"


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

    def in_engine(self, now: float, fade: float) -> float:
        """Requests waiting or running there, as last read, and those sent since. A sent
        request counts fully at once and fades with time constant `fade` (half the read
        interval): the next read counts it again if it still runs, and a short request that
        ended between two reads must not keep the endpoint looking busy."""
        return self.waiting + self.running + self.sent * math.exp((self.sent_at - now) / fade)

    def add_sent(self, tokens: int, now: float, fade: float) -> None:
        self.sent = self.sent * math.exp((self.sent_at - now) / fade) + 1.0
        self.sent_at = now
        self.sent_tokens += tokens


def parse(text: bytes) -> dict[str, float]:
    """The few vLLM series the picker reads, summed over their label sets (one per engine).
    Found with bytes.find rather than by splitting every line: an exposition is ~10 KB of
    histograms the picker does not read, and it reads one every 100 ms per endpoint."""
    found: dict[str, float] = {}
    for name, key in (*GAUGES.items(), (QUERIES, "queries")):
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
    """Reads the endpoints' metrics in a thread; `loads` is shared under `lock`."""

    def __init__(
        self,
        interval: float,
        lock: threading.Lock,
        on_restart: Callable[[str], None] = lambda endpoint: None,
        on_read: Callable[[str, bool], None] = lambda endpoint, ok: None,
    ) -> None:
        self.interval = interval
        self.lock = lock
        self.loads: dict[str, Load] = {}
        self._on_restart = on_restart
        self._on_read = on_read
        self._connections: dict[str, http.client.HTTPConnection] = {}
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="picker-read")
        self._thread = threading.Thread(target=self._run, name="picker-loads", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def named(self, endpoints: list[str], now: float) -> None:
        """Candidates of a request (call under `lock`): read them from now on."""
        loads = self.loads
        for endpoint in endpoints:
            load = loads.get(endpoint)
            if load is None:
                load = loads[endpoint] = Load()
            load.named_at = now

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            with self.lock:
                for endpoint in [e for e, load in self.loads.items()
                                 if started - load.named_at > FORGET_AFTER_S]:  # fmt: skip
                    del self.loads[endpoint]
                endpoints = list(self.loads)
            for endpoint, found in zip(endpoints, self._pool.map(self._read, endpoints),
                                       strict=True):  # fmt: skip
                self._apply(endpoint, found)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

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
        if restarted:
            self._on_restart(endpoint)
        if load.up != was_up:
            logs.event(log, "picker.endpoint_up" if load.up else "picker.endpoint_down",
                       logging.INFO if load.up else logging.WARNING, endpoint=endpoint)  # fmt: skip
        self._on_read(endpoint, found is not None)

    def _read(self, endpoint: str) -> dict[str, float] | None:
        connection = self._connections.get(endpoint)
        for attempt in range(2):  # a kept-alive connection the server closed: once more
            if connection is None:
                host, _, port = endpoint.rpartition(":")
                connection = http.client.HTTPConnection(host.strip("[]"), int(port),
                                                        timeout=SCRAPE_TIMEOUT_S)  # fmt: skip
                self._connections[endpoint] = connection
            try:
                connection.request("GET", "/metrics")
                response = connection.getresponse()
                body = response.read()
                if response.status != 200:
                    return None
                return parse(body)
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = None
                self._connections.pop(endpoint, None)
                if attempt:
                    return None
        return None
