"""Split accuracy: does Envoy send the share of requests the weights say?

An operator who sets 90/10 expects the candidate to get 10 % of the traffic, not 7 or 13.
Goal: the observed share within +-1 percentage point of the set weight at 10,000 requests.

    python bench/bench_split.py [--requests 10000] [--splits 90/10,50/50,99/1] [--runs 3]

One `switchyard up` (one Envoy), `llama-3-8b` with two sim versions. For each split it sets
the weights with `PUT /v1/models/llama-3-8b/weights` (live once the API answers), sends
`--requests` non-streaming chat completions through Envoy from `--concurrency` keep-alive
aiohttp connections, and counts the `x-switchyard-version` header of every answer. Next to
the error in percentage points it prints the binomial standard deviation of a fair random
choice at that share (sqrt(p (1 - p) / n)) and the error in those units (z): Envoy picks a
weighted cluster at random per request, so +-1 pp is about 2 standard deviations at 50/50
and 3 at 90/10.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import urllib.request
from collections import Counter
from pathlib import Path

import aiohttp
from common import switchyard_up

MODEL = "llama-3-8b"


def model_config() -> list[dict]:
    versions = [
        {"name": "v1", "weight": 100, "backend": {"sim": {}}},
        {"name": "v2", "weight": 0, "backend": {"sim": {}}},
    ]
    return [{"name": MODEL, "versions": versions}]


def set_weights(admin: str, weights: dict[str, int]) -> None:
    request = urllib.request.Request(
        f"{admin}/v1/models/{MODEL}/weights", json.dumps({"weights": weights}).encode(),
        {"Content-Type": "application/json"}, method="PUT",
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        if response.status != 200:
            raise SystemExit(f"PUT weights: {response.status}")


async def count_versions(proxy: str, requests: int, concurrency: int) -> Counter:
    """Send `requests` completions; count who served them (non-200 counts as 'failed')."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    counts: Counter = Counter()
    left = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            for _ in left:
                async with session.post(f"{proxy}/v1/chat/completions", json=body) as response:
                    await response.read()
                    version = response.headers.get("x-switchyard-version", "none")
                    counts[version if response.status == 200 else "failed"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000, help="per split and run")
    parser.add_argument("--splits", default="90/10,50/50,99/1", help="v1/v2 weights")
    parser.add_argument("--runs", type=int, default=3, help="repetitions of each split")
    parser.add_argument("--concurrency", type=int, default=16, help="keep-alive connections")
    args = parser.parse_args()
    splits = [tuple(int(w) for w in split.split("/")) for split in args.splits.split(",")]
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-split-") as tmp,
        switchyard_up(Path(tmp), model_config()) as stack,
    ):
        for run in range(1, args.runs + 1):
            for v1, v2 in splits:
                set_weights(stack.admin, {"v1": v1, "v2": v2})
                counts = asyncio.run(count_versions(stack.proxy, args.requests, args.concurrency))
                rows.append((run, v1, v2, counts))

    print(f"split accuracy: {args.requests} non-streaming completions per row through 1 Envoy "
          f"({args.concurrency} connections), counted by x-switchyard-version")  # fmt: skip
    print(f"{'run':>3} {'set v1/v2':>9} {'v1':>6} {'v2':>6} {'other':>5} {'v2 share':>9} "
          f"{'error pp':>8} {'sd pp':>6} {'z':>5}  within 1 pp")  # fmt: skip
    worst = 0.0
    for run, v1, v2, counts in rows:
        worst = max(worst, abs(print_row(str(run), v1, v2, counts)))
    print(f"largest error: {worst:.2f} pp (goal <= 1 pp)")
    if args.runs > 1:  # all runs of a split together: is the choice biased at all?
        for v1, v2 in splits:
            pooled = sum((c for _, a, b, c in rows if (a, b) == (v1, v2)), Counter())
            print_row("all", v1, v2, pooled)


def print_row(run: str, v1: int, v2: int, counts: Counter) -> float:
    """One table row; returns the error in percentage points."""
    total = sum(counts.values())
    other = total - counts["v1"] - counts["v2"]
    share = counts["v2"] / total * 100
    error = share - v2
    sd = math.sqrt(v2 / 100 * (1 - v2 / 100) / total) * 100
    z = error / sd if sd else 0.0
    print(
        f"{run:>3} {f'{v1}/{v2}':>9} {counts['v1']:6d} {counts['v2']:6d} {other:5d} "
        f"{share:8.2f}% {error:+8.2f} {sd:6.2f} {z:+5.1f}  {'yes' if abs(error) <= 1 else 'NO'}"
    )
    return error


if __name__ == "__main__":
    main()
