"""The endpoint picker (`switchyard picker`): one decision, served over two transports.

For each request it gets the body, ranks the candidate endpoints (scheduler.py) and answers,
as the Gateway API Inference Extension's endpoint pickers do, with
`x-gateway-destination-endpoint: ip:port[,ip:port...]` (best first, the rest for retries) as
a header mutation and in dynamic metadata `envoy.lb`, which Envoy's `override_host`
load-balancing policy reads. The candidates are the endpoints of the version the weighted
split chose, which come with each request.

Both transports are Envoy's ext_proc protocol and share `Picker.decide` (made by the native
engine, `_native.c`, where it was built, else in Python); each only parses and serialises:
- gRPC (grpc_service.py, `listen`): GIE's endpoint-picker protocol, for a GIE gateway or
  Switchyard's Envoy with `picker.transport: grpc`;
- HTTP (http_service.py, `http`): ext_proc's `http_service`, the same messages as JSON over
  HTTP/1.1, which Switchyard's Envoy uses by default: a Python gRPC call costs ~0.6-1.4 ms
  of CPU whatever the handler does, a JSON POST on asyncio ~0.1 ms (docs/benchmarks.md).

It holds no configuration of the models: what it knows comes with each request, plus the
endpoints' metrics it reads (load.py) and the prefixes it sent where (prefix.py). A restart
loses only the latter; meanwhile Envoy picks by least request (fail-open, resources.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import start_http_server

from controlplane import logs
from controlplane.config import split_hostport
from controlplane.picker import metrics, native_missing
from controlplane.picker.load import LoadWatcher
from controlplane.picker.prefix import PrefixIndex
from controlplane.picker.scheduler import Ranked, Weights, rank
from controlplane.prompt import (
    CHARS_PER_TOKEN,
    block_chars,
    block_hashes,
    prompt_text,
)

log = logs.get("picker")


@dataclass(frozen=True)
class Settings:
    listen: str = "127.0.0.1:18001"  # the gRPC transport
    http: str | None = None  # the HTTP transport (host:port), if served
    metrics: str | None = None  # host:port of the Prometheus endpoint
    scrape_interval_s: float = 0.1
    weights: Weights = field(default_factory=Weights)
    block_size: int = 64  # tokens per block it hashes
    max_prefix_tokens: int = 8192
    cache_tokens: int = 262144
    workers: int = 16
    engine: str = "auto"  # native | python | auto (native if built)


class Picker:
    """The decision and the state it comes from, shared by both transports (thread-safe).

    Decided by one of two engines with the same behaviour: `native` (C: the prefix index,
    the loads and the ranking, and the HTTP transport on a thread of its own) or `python`
    (below). Either way the endpoints' metrics are read here, in Python (load.py); the
    native engine is told each read."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.lock = threading.Lock()  # the loads and the prefix index
        self.native = None
        self._wake_read, self._wake_write = -1, -1  # the native engine: an endpoint is new
        if settings.engine != "python" and not (missing := native_missing()):
            self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self.native = _native_engine(settings, self._wake_write)
        elif settings.engine == "native":
            raise RuntimeError(f"picker engine native: {missing}")
        self.decisions = self.native or metrics.Decisions()
        self.watcher = LoadWatcher(
            settings.scrape_interval_s, self.lock, on_restart=self._restarted,
            on_read=self._read, named_at=self.native.named_at if self.native else None,
            on_forget=self.native.drop if self.native else None,
        )  # fmt: skip
        self.index = PrefixIndex(max(1, settings.cache_tokens // settings.block_size))
        self._block_chars = block_chars(settings.block_size)
        self._max_blocks = max(1, settings.max_prefix_tokens // settings.block_size)

    @property
    def engine(self) -> str:
        return "native" if self.native is not None else "python"

    def decide(self, pool: str, candidates: list[str], body: bytes | None) -> str | None:
        """The endpoints to use for this request, best first, as GIE writes them
        (`ip:port,ip:port`); None without candidates (Envoy then picks by least request).
        `pool` (`<model>@<version>`) only labels the metrics; `body` None: load alone."""
        if self.native is not None:
            return self.native.decide(pool, candidates, body)
        if not candidates:
            self.decisions.count(pool, "none")
            return None
        hashes: list[int] = []
        text = ""
        if body:
            try:
                text = prompt_text(json.loads(body))
            except (ValueError, RecursionError):  # not JSON: no prefix, load alone
                text = ""
            hashes = block_hashes(text, self._block_chars, self._max_blocks)
        ranked = self.choose(candidates, hashes, len(text) // CHARS_PER_TOKEN)
        self.decisions.count(pool, ranked.reason, len(hashes), ranked.matched)
        return ",".join(ranked.endpoints)

    def choose(self, candidates: list[str], hashes: list[int], tokens: int) -> Ranked:
        """Rank the candidates; the first is sent the prompt (counted and remembered)."""
        settings = self.settings
        fade = settings.scrape_interval_s / 2
        with self.lock:
            now = time.monotonic()
            self.watcher.named(candidates, now)
            matched = self.index.matched(hashes, candidates)
            ranked = rank(candidates, self.watcher.loads, matched, len(hashes),
                          settings.weights, settings.cache_tokens, now, fade)  # fmt: skip
            chosen = ranked.endpoints[0]
            self.watcher.loads[chosen].add_sent(tokens, now, fade)
            if hashes:
                self.index.record(chosen, hashes)
        return ranked

    def observe(self, seconds: float) -> None:
        """One answer took this long (switchyard_picker_pick_seconds)."""
        self.decisions.observe(seconds)

    def close(self) -> None:
        if self.native is not None:
            self.native.close()
        for fd in (self._wake_read, self._wake_write):
            if fd >= 0:
                os.close(fd)
        self._wake_read = self._wake_write = -1

    # -- from the load watcher ---------------------------------------------------------------

    def watch_new_endpoints(self, loop: asyncio.AbstractEventLoop) -> None:
        """The native engine decides without Python: it tells of an endpoint it had not seen
        through a pipe, and the watcher starts reading it (call on `loop`)."""
        if self.native is not None:
            loop.add_reader(self._wake_read, self._new_endpoints)

    def _new_endpoints(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_read, 4096):
                pass
        new = self.native.new_endpoints()
        if new:
            with self.lock:
                self.watcher.named(new, time.monotonic())

    def _restarted(self, endpoint: str) -> None:
        if self.native is not None:
            self.native.forget(endpoint)
        else:
            with self.lock:
                self.index.forget(endpoint)
        logs.event(log, "picker.endpoint_restarted", endpoint=endpoint)

    def _read(self, endpoint: str, ok: bool) -> None:
        metrics.reads.labels("ok" if ok else "failed").inc()
        metrics.endpoints.set(len(self.watcher.loads))
        if self.native is not None:
            with self.lock:
                load = self.watcher.loads.get(endpoint)
                if load is None:
                    return
                values = (load.up, load.waiting, load.running, load.kv_cache, load.stay_s or 0.0)
            self.native.read(endpoint, *values)


def _native_engine(settings: Settings, notify_fd: int):
    from controlplane.picker import _native
    from controlplane.xds.resources import PICKER_ATTRIBUTES, PICKER_HTTP_PATH

    weights = settings.weights
    return _native.Engine(
        block_chars=block_chars(settings.block_size),
        max_blocks=max(1, settings.max_prefix_tokens // settings.block_size),
        capacity_blocks=max(1, settings.cache_tokens // settings.block_size),
        cache_tokens=settings.cache_tokens, w_prefix=weights.prefix, w_queue=weights.queue,
        w_kv=weights.kv_cache, queue_unit=weights.queue_unit,
        default_fade=settings.scrape_interval_s / 2, path=PICKER_HTTP_PATH,
        pool_attribute=PICKER_ATTRIBUTES[0], subset_attribute=PICKER_ATTRIBUTES[1],
        notify_fd=notify_fd,
    )  # fmt: skip


def serve(settings: Settings, stop: threading.Event) -> int:
    """Serve both transports until `stop` is set; the bound gRPC port (0 in `listen` picks
    one). Either port taken: OSError, nothing left listening."""
    from controlplane.picker.grpc_service import GrpcService
    from controlplane.picker.http_service import HttpService

    picker = Picker(settings)
    metrics.decisions.source = picker.decisions
    logs.event(log, "picker.engine", engine=picker.engine,
               reason=native_missing() or "-" if picker.engine == "python" else "-")  # fmt: skip
    # One event loop thread serves HTTP and reads the endpoints' metrics (load.py).
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="picker-loop", daemon=True)
    thread.start()
    grpc_service = GrpcService(picker, settings.listen, settings.workers)
    http_service = HttpService(picker, settings.http, loop) if settings.http else None
    listening = False
    try:
        picker.watcher.start(loop)
        loop.call_soon_threadsafe(picker.watch_new_endpoints, loop)
        if http_service is not None:
            http_service.start()
        grpc_service.start()
        if settings.metrics:
            metrics_host, metrics_port = split_hostport(settings.metrics)
            start_http_server(metrics_port, addr=metrics_host, registry=metrics.REGISTRY)
        logs.event(log, "picker.listening", address=grpc_service.address,
                   http=http_service.address if http_service else "-",
                   metrics=settings.metrics or "-")  # fmt: skip
        listening = True
        stop.wait()
    finally:
        grpc_service.stop()
        if http_service is not None:
            http_service.stop()
        picker.watcher.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        picker.close()
        if listening:
            logs.event(log, "picker.stopped")
    return grpc_service.port


def run(settings: Settings) -> None:
    """Blocking entry point for the CLI; SIGTERM and SIGINT stop it."""
    if not logging.getLogger(logs.LOGGER_NAME).handlers:
        logs.setup()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serve(settings, stop)
