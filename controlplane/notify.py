"""Webhooks: events from the bus, POSTed as JSON to the URLs in `notifications.webhooks`.

Delivery runs in its own task with a bounded queue, so a slow or dead receiver never holds a
rollout back; each event is retried with exponential backoff, then dropped with a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging

import aiohttp

from controlplane import logs
from controlplane.config import Webhook
from controlplane.events import Event, EventBus

log = logs.get("notify")
ATTEMPTS = 4
FIRST_BACKOFF_S = 0.5
TIMEOUT_S = 5.0


def wanted(webhook: Webhook, event_type: str) -> bool:
    return any(fnmatch.fnmatchcase(event_type, pattern) for pattern in webhook.events)


class Notifier:
    def __init__(self, bus: EventBus, webhooks: list[Webhook]) -> None:
        self.bus = bus
        self.webhooks = webhooks
        self._task: asyncio.Task | None = None
        self._deliveries: set[asyncio.Task] = set()

    def start(self) -> None:
        if self.webhooks:
            self._task = asyncio.create_task(self._run(), name="webhooks")

    async def _run(self) -> None:
        queue = self.bus.subscribe()
        timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                while (event := await queue.get()) is not None:
                    for webhook in self.webhooks:
                        if wanted(webhook, event.type):
                            task = asyncio.create_task(self._deliver(session, webhook, event))
                            self._deliveries.add(task)
                            task.add_done_callback(self._deliveries.discard)
            finally:
                self.bus.unsubscribe(queue)
                for task in list(self._deliveries):
                    task.cancel()
                await asyncio.gather(*self._deliveries, return_exceptions=True)

    async def _deliver(
        self, session: aiohttp.ClientSession, webhook: Webhook, event: Event
    ) -> None:
        payload = {"id": event.id, "type": event.type, "time": event.time, **event.data}
        backoff = FIRST_BACKOFF_S
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
        logs.event(
            log, "webhook.failed", logging.WARNING, url=webhook.url, event=event.type,
            attempts=ATTEMPTS, error=problem,
        )  # fmt: skip

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
