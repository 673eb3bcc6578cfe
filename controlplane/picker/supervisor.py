"""The endpoint picker as a child process of `switchyard up`/`serve`.

A process of its own: its CPU is not the controller's event loop's, and it can die (or be
killed) without the control plane noticing more than a restart. It is started once a model
needs it (`routing: prefix_aware`) and restarted with backoff whenever it exits; meanwhile
Envoy routes by least request (fail-open), so its absence costs no request.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from controlplane import logs, processes
from controlplane.config import PickerSettings

log = logs.get("picker")
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
        "--engine", settings.engine,
    ]  # fmt: skip
    if http:
        argv += ["--http", http]
    if metrics:
        argv += ["--metrics", metrics]
    return argv


class PickerSupervisor(processes.Supervised):
    """Runs one picker and restarts it (with backoff) whenever it exits unasked."""

    def __init__(self, argv: list[str], state_dir: Path) -> None:
        super().__init__(NAME, lambda: argv, state_dir, _exited)

    async def start(self) -> None:
        """Start it (once; later calls do nothing)."""
        if self.running:
            return
        await super().start()
        logs.event(log, "picker.started", pid=self.process.pid)


def _exited(code: int | None, restarts: int) -> None:
    logs.event(log, "picker.exited", logging.WARNING, code=code, restarts=restarts)
