"""`health.degraded` and `health.recovered`: a serving version crossed its model's alerts.

A model's `alerts` (config: `AlertThresholds`) hold absolute thresholds like a rollout's
analysis. Every second, each version with weight > 0 (rollout or not) is checked over the
last `window_seconds` with the same checks the verdicts use (`analysis.absolute_checks`).
Events are edge-triggered: `health.degraded` once when a version crosses a threshold,
`health.recovered` once when it is back within all of them. Below `min_requests`, or while a
checked figure has no data, a version keeps its last status: quiet is not healthy. A version
taken out of traffic (weight 0) is not checked and keeps its status too, so a canary rolled
back while degraded says `health.recovered` only once it serves well again. Webhooks get the
events like any other (`events: ["health.*"]`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Literal

from controlplane import logs, metrics
from controlplane.config import AlertThresholds
from controlplane.health.analysis import absolute_checks, short
from controlplane.health.signals import Figures

if TYPE_CHECKING:
    from controlplane.controller import Controller

log = logs.get("health.alerts")
INTERVAL_S = 1.0
Status = Literal["ok", "degraded"]


def assess(figures: Figures, alerts: AlertThresholds) -> tuple[Status | None, str]:
    """A version's status over one window, with the reason: None when there is too little
    data to tell (the caller keeps the last status)."""
    if figures.requests < alerts.min_requests:
        return None, f"{short(figures.requests)} requests < min_requests {alerts.min_requests}"
    breaches, missing = absolute_checks(figures, thresholds(alerts))
    if breaches:
        return "degraded", "; ".join(breaches)
    if missing:
        return None, "; ".join(missing)
    return "ok", f"within thresholds over {short(figures.requests)} requests"


def thresholds(alerts: AlertThresholds) -> dict[str, Any]:
    """The thresholds set (not None), as the events report them."""
    return {key: value for key, value in alerts.model_dump().items() if value is not None}


class HealthAlerts:
    """Watches every serving version of every model with `alerts`; publishes on changes."""

    def __init__(self, controller: Controller, interval: float = INTERVAL_S) -> None:
        self.controller = controller
        self.interval = interval
        self.status: dict[tuple[str, str], Status] = {}  # (model, version); absent = ok
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="health-alerts")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                self.check()
            except Exception:  # a bug here must not end the alerts
                log.exception("health.alerts_failed", extra={"fields": {}})
            await asyncio.sleep(self.interval)

    def check(self, now: float | None = None) -> list[tuple[str, dict[str, Any]]]:
        """One pass over the serving versions; returns the events published (type, data)."""
        now = time.time() if now is None else now
        published = []
        for model in list(self.controller.state.models.values()):
            alerts = model.alerts
            if alerts is None:
                continue
            for version in list(model.versions.values()):
                if version.weight <= 0:
                    continue
                figures = self.controller.health.window(
                    model.name, version.name, alerts.window_seconds, now
                )
                status, reason = assess(figures, alerts)
                key = (model.name, version.name)
                if status is None or status == self.status.get(key, "ok"):
                    continue
                self.status[key] = status
                event = "health.degraded" if status == "degraded" else "health.recovered"
                data = {
                    "model": model.name,
                    "version": version.name,
                    "reason": reason,
                    "figures": figures.to_json(),
                    "thresholds": thresholds(alerts),
                }
                self.controller.events.publish(event, **data)
                level = logging.WARNING if status == "degraded" else logging.INFO
                logs.event(log, event, level, model=model.name, version=version.name, reason=reason)
                gauge = getattr(metrics, "version_degraded", None)  # metrics.py is not ours
                if gauge is not None:
                    gauge.labels(model.name, version.name).set(int(status == "degraded"))
                published.append((event, data))
        self._forget_removed()
        return published

    def _forget_removed(self) -> None:
        models = self.controller.state.models
        for name, version in list(self.status):
            if name not in models or version not in models[name].versions:
                del self.status[(name, version)]
