"""Latency of a weight change as the admin API client sees it: PUT -> Envoy ACK -> 200.

The API answers `PUT /v1/models/{model}/weights` only once every connected Envoy has ACKed
the new route configuration, so this is the time an operator (or the rollout engine) waits
for a change to be live. Goal: p50 <= 2 ms, p99 <= 5 ms with one Envoy, at 1, 200 and 1,000
models; the bytes pushed per change independent of the number of models (issue 17).

    python bench/bench_weights.py [--changes 200] [--sizes 1,200,1000] [--budget 120]
    python bench/bench_weights.py --changes 50 --sizes 1,1000      # quick

For each size N, starts `switchyard up` (one Envoy) with `llama-3-8b` on two sim versions
plus N-1 filler models (two `url` versions each, all on one extra sim so that they are
ready, never called: they only make the configuration bigger), alternates
v1=90/v2=10 and v1=10/v2=90 over one keep-alive connection, and prints client-side
percentiles next to the server's own histograms from /metrics (deltas around the run): the
admin handler, the snapshot build, and push -> Envoy ACK for routes. Bytes pushed per change:
the server's `switchyard_xds_pushed_bytes_total` when it has that counter, and always what
Envoy itself received on its connection to the control plane
(`cluster.switchyard_xds.upstream_cx_rx_bytes_total` from Envoy's admin /stats: the xDS
responses with their gRPC and HTTP/2 framing), with Envoy's route updates per change
(`*.rds.*.update_success`). Also the controller's RSS at each size.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import re
import tempfile
import time
import urllib.request
from pathlib import Path

from common import percentile, rss_mb, sim, switchyard_up

MODEL = "llama-3-8b"
SPLITS = ({"v1": 90, "v2": 10}, {"v1": 10, "v2": 90})
# The server's own view of one change, from /metrics: (histogram, label filter).
PUSHED_BYTES = "switchyard_xds_pushed_bytes_total"  # the new layout's counter (issue 17)
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


def metrics_text(admin: str) -> str:
    """The server's /metrics ('' when it cannot answer within 2 minutes: an overloaded
    control plane at fleet size; its figures are then n/a rather than the run lost)."""
    try:
        return urllib.request.urlopen(f"{admin}/metrics", timeout=120).read().decode()
    except OSError as exc:
        print(f"(GET {admin}/metrics failed: {exc!r})", flush=True)
        return ""


def histogram(admin: str, name: str, labels: str) -> dict[str, float]:
    """Cumulative bucket counts (le -> count), plus sum and count, of one histogram."""
    text = metrics_text(admin)
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}_(bucket|sum|count)(?:\{{(.*)\}})? (\S+)", line)
        if not match or labels not in (match.group(2) or ""):
            continue
        kind, label_text, value = match.groups(default="")
        key = re.search(r'le="([^"]+)"', label_text).group(1) if kind == "bucket" else kind
        found[key] = float(value)
    return found


def counter_total(admin: str, name: str) -> float | None:
    """The sum over every label of a counter in /metrics; None when the server has none."""
    text = metrics_text(admin)
    values = [
        float(match.group(1))
        for match in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    ]
    return sum(values) if values else None


def envoy_stats(envoy_admin: str) -> dict[str, float]:
    """Envoy's counters that tell what a change cost it: bytes it received from the control
    plane, and route configuration updates."""
    url = f"http://{envoy_admin}/stats?filter=(switchyard_xds\\.upstream_cx_rx_bytes_total|rds.*update_success)"
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    found = {"rx_bytes": 0.0, "rds_updates": 0.0}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if not value.strip().isdigit():
            continue
        if name.endswith("upstream_cx_rx_bytes_total"):
            found["rx_bytes"] += float(value)
        elif name.endswith("update_success") and ".rds." in f".{name}":
            found["rds_updates"] += float(value)
    return found


def buckets(before: dict, after: dict) -> str:
    """This run's observations per bucket (non-cumulative), e.g. '<=0.0005:259 <=0.001:141'."""
    parts, previous = [], 0.0
    for le in before:
        if le in ("sum", "count") or le not in after:
            continue
        cumulative = after[le] - before[le]
        if cumulative > previous:
            parts.append(f"<={le}:{cumulative - previous:.0f}")
        previous = cumulative
    return " ".join(parts)


def put_weights(
    admin_hostport: str, changes: int, budget: float = math.inf
) -> tuple[list[float], int]:
    """Milliseconds per PUT over one keep-alive connection, sorted (fewer than `changes` when
    they took over `budget` seconds); and how many answered 504 (Envoy did not ACK within
    the server's 10 s: counted with the time they took)."""
    connection = http.client.HTTPConnection(admin_hostport, timeout=60)
    headers = {"Content-Type": "application/json"}
    took, timeouts = [], 0
    deadline = time.monotonic() + budget
    try:
        for index in range(changes):
            if time.monotonic() > deadline:
                break
            body = json.dumps({"weights": SPLITS[index % 2]})
            started = time.perf_counter()
            connection.request("PUT", f"/v1/models/{MODEL}/weights", body, headers)
            response = connection.getresponse()
            payload = response.read()
            took.append((time.perf_counter() - started) * 1000)
            if response.status == 504:
                timeouts += 1
            elif response.status != 200:
                raise SystemExit(f"PUT failed: {response.status} {payload[:300]!r}")
    finally:
        connection.close()
    return sorted(took), timeouts


def run(
    size: int, changes: int, warmup: int, budget: float
) -> tuple[list[float], dict, dict, dict]:
    with (
        tempfile.TemporaryDirectory(prefix="bench-weights-") as tmp,
        sim(Path(tmp), "filler") as filler_url,
        switchyard_up(Path(tmp), models(size, filler_url), timeout=300) as stack,
    ):
        admin_hostport = stack.config["listen"]["admin"]
        envoy_admin = stack.config["listen"]["envoy_admin"]
        put_weights(admin_hostport, warmup, budget / 4)
        before = {key: histogram(stack.admin, *query) for key, query in SERVER.items()}
        before_bytes = counter_total(stack.admin, PUSHED_BYTES)
        before_envoy = envoy_stats(envoy_admin)
        took, timeouts = put_weights(admin_hostport, changes, budget)
        after = {key: histogram(stack.admin, *query) for key, query in SERVER.items()}
        after_bytes = counter_total(stack.admin, PUSHED_BYTES)
        after_envoy = envoy_stats(envoy_admin)
        extra = {
            "server_bytes": None
            if after_bytes is None
            else (after_bytes - (before_bytes or 0)) / len(took),
            "envoy_rx": (after_envoy["rx_bytes"] - before_envoy["rx_bytes"]) / len(took),
            "rds_updates": (after_envoy["rds_updates"] - before_envoy["rds_updates"]) / len(took),
            "rss": rss_mb(stack.process.pid),
            "timeouts": timeouts,
        }
    return took, before, after, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=200, help="timed weight changes")
    parser.add_argument("--warmup", type=int, default=20, help="untimed changes first")
    parser.add_argument("--sizes", default="1,200,1000", help="models configured, a list")
    parser.add_argument("--budget", type=float, default=120,
                        help="seconds of timed changes per size at most")  # fmt: skip
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    results = {}
    for size in sizes:
        results[size] = run(size, args.changes, args.warmup, args.budget)
        took, extra = results[size][0], results[size][3]
        print(f"{size} models: {len(took)} changes, p50 {percentile(took, 50):.2f} ms, p99 "
              f"{percentile(took, 99):.2f} ms, {extra['timeouts']} 504s", flush=True)  # fmt: skip

    print(f"PUT /v1/models/{MODEL}/weights -> 200 (after the Envoy ACK), 1 Envoy, "
          f"{args.changes} changes over one keep-alive connection (at most "
          f"{args.budget:g} s)")  # fmt: skip
    print("\nclient side (ms)")
    print(
        f"{'models':>6} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} {'mean':>7} {'changes':>7} 504s"
    )
    for size, (ms, *_, extra) in results.items():
        print(
            f"{size:6d} {percentile(ms, 50):7.2f} {percentile(ms, 90):7.2f} "
            f"{percentile(ms, 99):7.2f} {ms[-1]:7.2f} {sum(ms) / len(ms):7.2f} {len(ms):7d} "
            f"{extra['timeouts']}"
        )
    print("\nserver side, means from /metrics (ms): admin handler = whole PUT inside the server,")
    print("build = snapshot build + serialize, ack = RDS push written -> Envoy ACK read")
    print(f"{'models':>6} {'admin':>7} {'build':>7} {'ack':>7} {'other':>7}   ack histogram (s)")
    for size, (_, before, after, _) in results.items():
        if not all(before[key] and after[key] for key in SERVER):
            print(f"{size:6d}     n/a (the server did not answer /metrics in time)")
            continue
        mean = {}
        for key in SERVER:
            count = after[key]["count"] - before[key]["count"]
            mean[key] = (after[key]["sum"] - before[key]["sum"]) / count * 1000 if count else 0
        other = mean["admin"] - mean["build"] - mean["ack"]
        print(
            f"{size:6d} {mean['admin']:7.3f} {mean['build']:7.3f} {mean['ack']:7.3f} "
            f"{other:7.3f}   {buckets(before['ack'], after['ack'])}"
        )
    print("\nper change: bytes the server pushed (its counter, all types), bytes Envoy received")
    print("from the control plane (gRPC + HTTP/2 framing included), Envoy's route updates;")
    print("controller RSS at the end of the run")
    print(f"{'models':>6} {'server B':>10} {'Envoy rx B':>11} {'RDS upd':>8} {'RSS MB':>7}")
    for size, (*_, extra) in results.items():
        server = "n/a" if extra["server_bytes"] is None else f"{extra['server_bytes']:.0f}"
        print(f"{size:6d} {server:>10} {extra['envoy_rx']:11.0f} {extra['rds_updates']:8.2f} "
              f"{extra['rss']:7.1f}")  # fmt: skip
    if any(extra["server_bytes"] is None for *_, extra in results.values()):
        print(f"(server B n/a: this control plane has no {PUSHED_BYTES})")


if __name__ == "__main__":
    main()
