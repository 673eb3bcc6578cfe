"""The choice: the candidates of one request ranked by a weighted score, as llm-d scores.

- prefix (weight 3): the share of the prompt's blocks the picker sent that endpoint before
  (prefix.py), so most of its prefill is a cache hit there;
- queue (weight 2): fewest requests in the engine (vllm:num_requests_waiting and _running):
  `1 - (q - q_least) / queue_unit`, so the least busy candidates score 1 and every
  `queue_unit` (4) requests more than them cost the weight once more, without bound;
- kv_cache (weight 2): most free KV cache (1 - vllm:kv_cache_usage_perc).

So a request follows its prefix unless that endpoint is busier than the others by more
than the prefix is worth: a conversation whose history is there (most of its prompt) stays
through a few requests of difference, while a shared system prompt cached on one endpoint
does not draw every new conversation there. Between two reads of the metrics, the requests
(and prompt tokens) the picker sent an endpoint count as in it, fading with the time a
request stays in that engine (load.py), so a burst is spread but a sequential client's
finished requests are not counted against its prefix.

Two departures from llm-d, measured on the benchmark (docs/benchmarks.md): its queue scorer
counts waiting requests only, min-max normalised, so it can never outweigh a prefix match
(3 > 2) and a shared prefix drew all the load to one server until its KV cache filled;
here running requests count too, since a server's prefill backlog shows as running requests
(in vLLM as in the simulator) long before any has to wait for a slot, and the penalty grows
with the difference. Endpoints that do not answer their metrics come last. The whole
ranking is returned: Envoy tries them in order on retries (GIE's fallback list).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from controlplane.picker.load import Load


@dataclass(frozen=True)
class Weights:
    prefix: float = 3.0
    queue: float = 2.0
    kv_cache: float = 2.0
    queue_unit: float = 4.0  # requests more than the least busy that cost `queue` once


@dataclass(frozen=True)
class Ranked:
    endpoints: list[str]  # best first
    matched: int  # leading blocks of the prompt the first one has
    reason: str  # "prefix": chosen with a prefix match; "load": on load alone


def rank(
    candidates: list[str],
    loads: dict[str, Load],
    matched: dict[str, int],
    blocks: int,
    weights: Weights,
    cache_tokens: int,
    now: float,
    fade: float,
) -> Ranked:
    """Rank `candidates` (call under the loads' lock). `cache_tokens`: a server's KV cache,
    to count the prompts the picker sent since the last read; `now` and `fade`: the time,
    and how fast a request stops counting as in an engine whose requests' stay was not
    measured yet (load.py)."""
    queue = {e: loads[e].in_engine(now, fade) if e in loads else 0.0 for e in candidates}
    least = min(queue.values())

    def score(endpoint: str) -> tuple[int, float, float]:
        load = loads.get(endpoint)
        up = load is None or load.up
        prefix = matched.get(endpoint, 0) / blocks if blocks else 0.0
        queued = 1.0 - (queue[endpoint] - least) / weights.queue_unit
        used = load.kv_cache + load.sent_tokens / cache_tokens if load is not None else 0.0
        free = 1.0 - min(1.0, used)
        total = weights.prefix * prefix + weights.queue * queued + weights.kv_cache * free
        return (1 if up else 0, total, random.random())  # ties: any, not always the first

    ordered = sorted(candidates, key=score, reverse=True)
    best = matched.get(ordered[0], 0) if ordered else 0
    return Ranked(ordered, best, "prefix" if best else "load")
