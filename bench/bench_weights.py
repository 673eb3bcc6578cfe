"""Latency of a weight change as the admin API client sees it: PUT -> Envoy ACK -> 200.

The API answers `PUT /v1/models/{model}/weights` only once every connected Envoy has ACKed
the new route configuration, so this is the time an operator (or the rollout engine) waits
for a change to be live. Goal: p50 <= 2 ms, p99 <= 5 ms with one Envoy.

    python bench/bench_weights.py [--changes 400] [--sizes 1,40]

For each size N, starts `switchyard up` (one Envoy) with `llama-3-8b` on two sim versions
plus N-1 filler models (two `url` versions each, all on one extra sim so that they are
ready, never called: they only make the snapshot bigger), alternates
v1=90/v2=10 and v1=10/v2=90 over one keep-alive connection, and prints client-side
percentiles next to the server's own histograms from /metrics (deltas around the run): the
admin handler, the snapshot build, and push -> Envoy ACK for routes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import tempfile
import time
import urllib.request
from pathlib import Path

from common import percentile, sim, switchyard_up

MODEL = "llama-3-8b"
SPLITS = ({"v1": 90, "v2": 10}, {"v1": 10, "v2": 90})
# The server's own view of one change, from /metrics: (histogram, label filter).
SERVER = {
    "admin": ("switchyard_admin_request_seconds", 'route="/v1/models/{model}/weights"'),
    "build": ("switchyard_snapshot_build_seconds", ""),
    "ack": ("switchyard_xds_push_ack_seconds", 'type="rds"'),
}


def models(count: int, filler_url: str) -> list[dict]:
    filler = [
        {
            "name": f"filler-{index:03d}",
            "versions": [
                {"name": "v1", "weight": 90, "backend": {"url": filler_url}},
                {"name": "v2", "weight": 10, "backend": {"url": filler_url}},
            ],
        }
        for index in range(count - 1)
    ]
    main = {
        "name": MODEL,
        "versions": [
            {"name": "v1", "weight": 100, "backend": {"sim": {}}},
            {"name": "v2", "weight": 0, "backend": {"sim": {}}},
        ],
    }
    return [main, *filler]


def histogram(admin: str, name: str, labels: str) -> dict[str, float]:
    """Cumulative bucket counts (le -> count), plus sum and count, of one histogram."""
    text = urllib.request.urlopen(f"{admin}/metrics", timeout=5).read().decode()
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}_(bucket|sum|count)(?:\{{(.*)\}})? (\S+)", line)
        if not match or labels not in (match.group(2) or ""):
            continue
        kind, label_text, value = match.groups(default="")
        key = re.search(r'le="([^"]+)"', label_text).group(1) if kind == "bucket" else kind
        found[key] = float(value)
    return found


def buckets(before: dict, after: dict) -> str:
    """This run's observations per bucket (non-cumulative), e.g. '<=0.0005:259 <=0.001:141'."""
    parts, previous = [], 0.0
    for le in before:
        if le in ("sum", "count"):
            continue
        cumulative = after[le] - before[le]
        if cumulative > previous:
            parts.append(f"<={le}:{cumulative - previous:.0f}")
        previous = cumulative
    return " ".join(parts)


def put_weights(admin_hostport: str, changes: int) -> list[float]:
    """Milliseconds per PUT over one keep-alive connection, sorted."""
    connection = http.client.HTTPConnection(admin_hostport, timeout=15)
    headers = {"Content-Type": "application/json"}
    took = []
    try:
        for index in range(changes):
            body = json.dumps({"weights": SPLITS[index % 2]})
            started = time.perf_counter()
            connection.request("PUT", f"/v1/models/{MODEL}/weights", body, headers)
            response = connection.getresponse()
            payload = response.read()
            took.append((time.perf_counter() - started) * 1000)
            if response.status != 200:
                raise SystemExit(f"PUT failed: {response.status} {payload[:300]!r}")
    finally:
        connection.close()
    return sorted(took)


def run(size: int, changes: int, warmup: int) -> tuple[list[float], dict, dict]:
    with (
        tempfile.TemporaryDirectory(prefix="bench-weights-") as tmp,
        sim(Path(tmp), "filler") as filler_url,
        switchyard_up(Path(tmp), models(size, filler_url)) as stack,
    ):
        admin_hostport = stack.config["listen"]["admin"]
        put_weights(admin_hostport, warmup)
        before = {key: histogram(stack.admin, *query) for key, query in SERVER.items()}
        took = put_weights(admin_hostport, changes)
        after = {key: histogram(stack.admin, *query) for key, query in SERVER.items()}
    return took, before, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=400, help="timed weight changes")
    parser.add_argument("--warmup", type=int, default=20, help="untimed changes first")
    parser.add_argument("--sizes", default="1,40", help="models configured, comma-separated")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    results = {size: run(size, args.changes, args.warmup) for size in sizes}

    print(f"PUT /v1/models/{MODEL}/weights -> 200 (after the Envoy ACK), 1 Envoy, "
          f"{args.changes} changes over one keep-alive connection")  # fmt: skip
    print("\nclient side (ms)")
    print(f"{'models':>6} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} {'mean':>7}")
    for size, (ms, _, _) in results.items():
        print(
            f"{size:6d} {percentile(ms, 50):7.2f} {percentile(ms, 90):7.2f} "
            f"{percentile(ms, 99):7.2f} {ms[-1]:7.2f} {sum(ms) / len(ms):7.2f}"
        )
    print("\nserver side, means from /metrics (ms): admin handler = whole PUT inside the server,")
    print("build = snapshot build + serialize, ack = RDS push written -> Envoy ACK read")
    print(f"{'models':>6} {'admin':>7} {'build':>7} {'ack':>7} {'other':>7}   ack histogram (s)")
    for size, (_, before, after) in results.items():
        mean = {}
        for key in SERVER:
            count = after[key]["count"] - before[key]["count"]
            mean[key] = (after[key]["sum"] - before[key]["sum"]) / count * 1000 if count else 0
        other = mean["admin"] - mean["build"] - mean["ack"]
        print(
            f"{size:6d} {mean['admin']:7.3f} {mean['build']:7.3f} {mean['ack']:7.3f} "
            f"{other:7.3f}   {buckets(before['ack'], after['ack'])}"
        )


if __name__ == "__main__":
    main()
