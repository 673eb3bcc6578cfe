"""In-process event bus: state changes fan out to SSE subscribers of `GET /v1/events`."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Any

MAX_QUEUED = 1000  # a subscriber this far behind is dropped rather than growing without bound


@dataclass(frozen=True)
class Event:
    id: int
    type: str
    data: dict[str, Any]
    time: float


class EventBus:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[Event | None]] = set()
        self._ids = itertools.count(1)

    def publish(self, type_: str, **data: Any) -> Event:
        event = Event(next(self._ids), type_, data, time.time())
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                # Too far behind: drop it, and make room for the None that ends its stream.
                self._subscribers.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)
        return event

    def subscribe(self) -> asyncio.Queue[Event | None]:
        queue: asyncio.Queue[Event | None] = asyncio.Queue(MAX_QUEUED)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event | None]) -> None:
        self._subscribers.discard(queue)

    def close(self) -> None:
        """End every subscriber's stream (shutdown): each gets its end marker."""
        for queue in list(self._subscribers):
            self._subscribers.discard(queue)
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)
