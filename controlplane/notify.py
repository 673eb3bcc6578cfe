"""Webhooks: events from the bus, POSTed as JSON to the URLs in `notifications.webhooks`.

Each receiver has one delivery task fed by one bounded queue: events reach it in the order
they happened, each retried with backoff before the next one is sent, and a rollout never
waits for a webhook. A receiver that is slow or dead fills its queue; then its oldest waiting
event is dropped for the newest (counted in `switchyard_webhook_events_dropped_total`, logged
at most once a minute), so whatever the receivers do, the controller holds one task and at
most QUEUE_SIZE events per receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import time

import aiohttp

from controlplane import logs, metrics
from controlplane.config import Webhook
from controlplane.events import Event, EventBus

log = logs.get("notify")
ATTEMPTS = 4
FIRST_BACKOFF_S = 0.5
TIMEOUT_S = 5.0
QUEUE_SIZE = 1000  # events waiting per receiver; older ones are dropped beyond it
DROP_LOG_EVERY_S = 60.0


def wanted(webhook: Webhook, event_type: str) -> bool:
    return any(fnmatch.fnmatchcase(event_type, pattern) for pattern in webhook.events)


class _Receiver:
    """One webhook's queue and the drops not logged yet."""

    def __init__(self, webhook: Webhook, size: int) -> None:
        self.webhook = webhook
        self.queue: asyncio.Queue[Event] = asyncio.Queue(size)
        self.unlogged_drops = 0
        self.logged_at = -DROP_LOG_EVERY_S

    def offer(self, event: Event) -> None:
        """Queue `event`; when full, the oldest waiting event makes room for it."""
        if self.queue.full():
            dropped = self.queue.get_nowait()
            metrics.webhook_drops.labels("queue_full").inc()
            self.unlogged_drops += 1
            now = time.monotonic()
            if now - self.logged_at >= DROP_LOG_EVERY_S:
                logs.event(
                    log, "webhook.dropped", logging.WARNING, url=self.webhook.url,
                    reason="queue_full", dropped=self.unlogged_drops, oldest=dropped.type,
                )  # fmt: skip
                self.unlogged_drops, self.logged_at = 0, now
        self.queue.put_nowait(event)


class Notifier:
    def __init__(
        self,
        bus: EventBus,
        webhooks: list[Webhook],
        queue_size: int = QUEUE_SIZE,
        first_backoff_s: float = FIRST_BACKOFF_S,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.bus = bus
        self.webhooks = webhooks
        self.queue_size = queue_size
        self.first_backoff_s = first_backoff_s
        self.timeout_s = timeout_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.webhooks:
            self._task = asyncio.create_task(self._run(), name="webhooks")

    async def _run(self) -> None:
        events = self.bus.subscribe()
        receivers = [_Receiver(webhook, self.queue_size) for webhook in self.webhooks]
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            workers = [
                asyncio.create_task(self._deliver_in_order(session, receiver), name=f"webhook-{i}")
                for i, receiver in enumerate(receivers)
            ]
            try:
                while (event := await events.get()) is not None:
                    for receiver in receivers:
                        if wanted(receiver.webhook, event.type):
                            receiver.offer(event)
            finally:
                self.bus.unsubscribe(events)
                for worker in workers:
                    worker.cancel()
                await asyncio.gather(*workers, return_exceptions=True)

    async def _deliver_in_order(
        self, session: aiohttp.ClientSession, receiver: _Receiver
    ) -> None:
        while True:
            event = await receiver.queue.get()
            await self._deliver(session, receiver.webhook, event)

    async def _deliver(
        self, session: aiohttp.ClientSession, webhook: Webhook, event: Event
    ) -> None:
        # `event_id` is always the event's own (for deduplication); `id` is the event's when
        # its data has none, and the rollout's for rollout events, as in GET /v1/events.
        payload = {"id": event.id, "type": event.type, "time": event.time, **event.data,
                   "event_id": event.id}  # fmt: skip
        backoff = self.first_backoff_s
        for attempt in range(1, ATTEMPTS + 1):
            try:
                async with session.post(webhook.url, json=payload) as response:
                    if response.status < 300:
                        return
                    problem = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = repr(exc)
            if attempt < ATTEMPTS:
                await asyncio.sleep(backoff)
                backoff *= 2
        metrics.webhook_drops.labels("failed").inc()
        logs.event(
            log, "webhook.failed", logging.WARNING, url=webhook.url, event=event.type,
            attempts=ATTEMPTS, error=problem,
        )  # fmt: skip

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
