"""The event bus behind `GET /v1/events` and webhooks."""

from __future__ import annotations


async def test_a_subscriber_too_far_behind_is_ended_not_left_hanging():
    from controlplane.events import MAX_QUEUED, EventBus

    bus = EventBus()
    queue = bus.subscribe()
    for i in range(MAX_QUEUED + 1):
        bus.publish("weights.changed", n=i)
    items = [queue.get_nowait() for _ in range(queue.qsize())]
    assert items[-1] is None  # its SSE stream ends instead of waiting forever
    bus.publish("weights.changed", n=-1)
    assert queue.empty()
