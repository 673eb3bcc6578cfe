"""The endpoint picker as a child process of `switchyard up`/`serve`.

A process of its own: its CPU is not the controller's event loop's, and it can die (or be
killed) without the control plane noticing more than a restart. It is started once a model
needs it (`routing: prefix_aware`) and restarted with backoff whenever it exits; meanwhile
Envoy routes by least request (fail-open), so its absence costs no request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from pathlib import Path

from controlplane import logs, processes
from controlplane.config import PickerSettings

log = logs.get("picker")
MAX_BACKOFF_S = 5.0
HEALTHY_RUN_S = 30.0  # a picker that ran this long before dying was not crash-looping
NAME = "picker"


def picker_argv(
    settings: PickerSettings, listen: str, metrics: str | None, http: str | None = None
) -> list[str]:
    """`switchyard picker` with the settings of `switchyard.yaml`: gRPC on `listen`, HTTP on
    `http` (both loopback; Envoy uses the one of `picker.transport`)."""
    weights = settings.weights
    argv = [
        sys.executable, "-m", "controlplane", "picker", "--listen", listen,
        "--scrape-interval-ms", str(settings.scrape_interval_ms),
        "--weights", f"prefix={weights.prefix},queue={weights.queue},"
                     f"kv_cache={weights.kv_cache},queue_unit={weights.queue_unit}",
        "--block-size", str(settings.block_size),
        "--max-prefix-tokens", str(settings.max_prefix_tokens),
        "--cache-tokens", str(settings.cache_tokens),
    ]  # fmt: skip
    if http:
        argv += ["--http", http]
    if metrics:
        argv += ["--metrics", metrics]
    return argv


class PickerSupervisor:
    """Runs one picker and restarts it (with backoff) whenever it exits unasked."""

    def __init__(self, argv: list[str], state_dir: Path) -> None:
        self.argv = argv
        self.state_dir = state_dir
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._task: asyncio.Task | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._task is not None

    async def start(self) -> None:
        """Start it (once; later calls do nothing)."""
        if self._task is not None:
            return
        self.process = await processes.spawn(NAME, self.argv, self.state_dir)
        self._task = asyncio.create_task(self._supervise(), name="picker-supervisor")
        logs.event(log, "picker.started", pid=self.process.pid)

    async def _supervise(self) -> None:
        backoff = 0.1
        loop = asyncio.get_running_loop()
        while not self._stopping:
            assert self.process is not None
            started = loop.time()
            code = await self.process.wait()
            if self._stopping:
                return
            if loop.time() - started >= HEALTHY_RUN_S:
                backoff = 0.1
            logs.event(log, "picker.exited", logging.WARNING, code=code, restarts=self.restarts)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            self.restarts += 1
            self.process = await processes.spawn(NAME, self.argv, self.state_dir)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.process is not None:
            await processes.stop(NAME, self.process, self.state_dir)
