"""Parking and waking through the backends' own sleep endpoints (vLLM's dev mode), requests
caught by a sleeping engine included: held, then served once it is awake, never left hanging.

On vLLM's CPU build the sleep endpoints pause and resume the engine without freeing memory
and level 2 keeps the weights (docs/runtimes.md): the protocol is real, the memory is not.
"""

from __future__ import annotations

import urllib.request

from tests.conftest import wait_until
from tests.scenarios import backends
from tests.scenarios.conftest import (
    IDLE_MODEL,
    MODEL,
    Load,
    answer,
    is_sleeping,
    rollout,
    until_phase,
    version_of,
)


def test_a_level_two_parked_version_wakes_with_its_weights_reloaded(tiny, client):
    """`tiny` parks with sleep level 2: the weights are discarded, so the wake must reload
    them (/wake_up?tags=weights, /collective_rpc reload_weights, /wake_up?tags=kv_cache); a
    plain /wake_up would serve garbage."""
    before = answer(client)
    until_phase(tiny, rollout(tiny, {"strategy": "immediate"}), "succeeded")
    wait_until(lambda: version_of(tiny, "v1")["state"] == "sleeping", 30,
               message="v1 parked")  # fmt: skip
    endpoint = version_of(tiny, "v1")["endpoints"] or None
    assert endpoint is None  # out of Envoy's EDS while it sleeps
    status, body = tiny.api("POST", "/v1/rollback", {"model": MODEL})
    assert status == 200, body
    assert version_of(tiny, "v1")["state"] == "active"
    assert answer(client) == before  # the same weights as before it slept
    assert backends.woke_with_reload(backends.log_of(tiny.state_dir, MODEL, "v1"))


def test_an_engine_found_asleep_is_woken_and_the_requests_it_held_are_served(tiny):
    """An engine that falls asleep while Envoy routes to it (a /sleep that completed after
    Switchyard gave up on it, an operator's call) holds every request it gets. Switchyard
    sees it asleep, takes it out of EDS, wakes it, and the held requests are answered."""
    endpoint = version_of(tiny, "v1")["endpoints"][0]
    with Load(tiny.proxy, concurrency=3, timeout=20) as load:
        wait_until(lambda: len(load.results) > 10, 20, message="traffic flowing")
        # mode=wait: requests already running finish (vLLM's default would abort them,
        # which is the caller's doing, not Switchyard's); those arriving now are held
        request = urllib.request.Request(f"{endpoint}/sleep?level=1&mode=wait", method="POST")
        urllib.request.urlopen(request, timeout=30).close()
        wait_until(lambda: not is_sleeping(endpoint), 15, message="woken by switchyard")
        served = len(load.results)
        wait_until(lambda: len(load.results) > served + 10, 20, message="traffic again")
    assert not load.failures(), load.failures()[:5]
    assert version_of(tiny, "v1")["state"] == "active"
    assert "backend.found_asleep" in tiny.logs()


def test_an_idle_version_sleeps_and_its_next_request_is_held_until_it_is_awake(stack, client):
    wait_until(lambda: version_of(stack, "v1", IDLE_MODEL)["state"] == "sleeping", 30,
               message="the idle version parked")  # fmt: skip
    reply = client.completions.create(model=IDLE_MODEL, prompt="hello", max_tokens=3,
                                      extra_body={"ignore_eos": True})  # fmt: skip
    assert reply.usage.completion_tokens == 3
    version = version_of(stack, "v1", IDLE_MODEL)
    assert version["state"] == "active" and not is_sleeping(version["endpoints"][0])
