"""Time to build and serialize one xDS snapshot for 100 models x 2 versions.

The controller builds snapshots on the event loop: from scratch at start-up, and
incrementally (SnapshotBuilder: only the changed model's routes) on every weight change, so
this bounds how fast weight changes can go at that size. Goal: p50 and p99 <= 5 ms.

    python bench/bench_snapshot.py [--models 100] [--builds 200]

Also times each stage (message construction per type, then `Snapshot.from_resources`, which
checks consistency, serializes deterministically and hashes) so a miss points at its cause.

For ADR 0001, with `--edp-python` naming a Python with `envoy-data-plane` (betterproto2)
installed, runs bench/edp_snapshot.py with it to build the same configuration that way,
checks both produce the same messages, and compares timings. bench/edp_snapshot.py mirrors
the resources of its time (one cluster per version); since the aggregate clusters came the
messages differ and the comparison says so and stops (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import tempfile
import time
from pathlib import Path

from common import percentile
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2

from controlplane.config import parse_config
from controlplane.state import Endpoint, State, apply_weights
from controlplane.xds import resources
from controlplane.xds.snapshot import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    Snapshot,
    SnapshotBuilder,
    build_snapshot,
)

PROXY = resources.ProxySettings("127.0.0.1", 10000)
HERE = Path(__file__).resolve().parent
MESSAGES = {
    CLUSTER: cluster_pb2.Cluster,
    ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    LISTENER: listener_pb2.Listener,
    ROUTE: route_pb2.RouteConfiguration,
}


def make_state(models: int) -> State:
    """`models` models, each v1=90/v2=10 on its own ready endpoint, as after `up`."""

    def version(name: str, weight: int, host: str, port: int) -> dict:
        return {"name": name, "weight": weight, "backend": {"url": f"http://{host}:{port}"}}

    config = parse_config(
        {
            "models": [
                {
                    "name": f"model-{index:03d}",
                    "versions": [
                        version("v1", 90, "10.0.0.1", 8000 + index),
                        version("v2", 10, "10.0.0.2", 8000 + index),
                    ],
                }
                for index in range(models)
            ]
        }
    )
    state = State.from_config(config)
    for model in state.models.values():
        for version in model.versions.values():
            version.endpoints, version.state = [Endpoint(version.backend.url)], "active"
    return state


def timed(function, runs: int) -> list[float]:
    """Milliseconds per call, sorted."""
    took = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        took.append((time.perf_counter() - started) * 1000)
    return sorted(took)


def compare_edp(python: str, state: State, builds: int, ours: dict[str, list[float]]) -> None:
    """Build the same snapshot with envoy-data-plane in its own venv; check it and compare."""
    models = [
        {
            "name": model.name,
            "created": model.created,
            "versions": [
                {
                    "name": version.name,
                    "weight": version.weight,
                    "endpoints": [ep.host_port for ep in version.endpoints if ep.ready],
                }
                for version in model.versions.values()
            ],
        }
        for model in state.models.values()
    ]
    with tempfile.TemporaryDirectory(prefix="bench-edp-") as tmp:
        state_path, out_path = Path(tmp, "state.json"), Path(tmp, "out.json")
        state_path.write_text(json.dumps({"models": models}))
        subprocess.run(
            [python, str(HERE / "edp_snapshot.py"), str(state_path), str(out_path),
             "--builds", str(builds)],
            check=True,
        )  # fmt: skip
        result = json.loads(out_path.read_text())
    snapshot = build_snapshot(state, PROXY)
    for type_url, blobs in result["resources"].items():
        theirs = [MESSAGES[type_url].FromString(base64.b64decode(blob)) for blob in blobs]
        packed = snapshot.resources[type_url].values()
        mine = [MESSAGES[type_url].FromString(any_message.value) for any_message in packed]
        if theirs != mine:
            print(
                f"\nenvoy-data-plane comparison skipped: bench/edp_snapshot.py built a different "
                f"{type_url.rsplit('.', 1)[1]} (it mirrors an older resources.py; the recorded "
                "comparison is in docs/benchmarks.md)"
            )
            return
    print(
        f"\nenvoy-data-plane (betterproto2, {builds} runs) vs xds-protos (upb), "
        "same messages (checked):"
    )
    print(f"{'stage':<42} {'edp p50':>8} {'edp p99':>8} {'ours p50':>9} {'ours p99':>9}")
    for name, label in (
        ("snapshot", "build + serialize + hash, whole snapshot"),
        ("routes", "route configuration, construct"),
        ("routes_bytes", "route configuration, construct + serialize"),
    ):
        edp, mine = result["timings_ms"][name], ours[name]
        print(
            f"{label:<42} {percentile(edp, 50):8.2f} {percentile(edp, 99):8.2f} "
            f"{percentile(mine, 50):9.2f} {percentile(mine, 99):9.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--builds", type=int, default=200)
    parser.add_argument(
        "--edp-python", help="a Python with envoy-data-plane, e.g. /tmp/edp/bin/python"
    )
    parser.add_argument("--edp-builds", type=int, default=20, help="edp is slow: fewer runs")
    args = parser.parse_args()
    state = make_state(args.models)
    snapshot = build_snapshot(state, PROXY)
    short = {"cds": CLUSTER, "eds": ENDPOINT, "lds": LISTENER, "rds": ROUTE}
    sizes = {
        name: sum(len(packed.value) for packed in snapshot.resources[type_url].values())
        for name, type_url in short.items()
    }
    by_type = {
        CLUSTER: resources.build_clusters(state),
        ENDPOINT: resources.build_endpoints(state),
        LISTENER: [resources.build_listener(PROXY)],
        ROUTE: [resources.build_route_config(state)],
    }
    builder = SnapshotBuilder(PROXY)
    builder.build(state)
    model = next(iter(state.models.values()))
    flips = iter(range(10**9))

    def weight_change() -> Snapshot:
        """What Controller.rebuild does after PUT weights: one model's split moved."""
        share = 10 if next(flips) % 2 else 90
        apply_weights(
            model, {name: share if i else 100 - share for i, name in enumerate(model.versions)}
        )
        return builder.build(state)

    stages = {
        "weight change (SnapshotBuilder, incremental)": weight_change,
        "build_snapshot (total, from scratch)": lambda: build_snapshot(state, PROXY),
        "  build_clusters": lambda: resources.build_clusters(state),
        "  build_endpoints": lambda: resources.build_endpoints(state),
        "  build_listener": lambda: resources.build_listener(PROXY),
        "  build_route_config": lambda: resources.build_route_config(state),
        "  from_resources (check+serialize+hash)": lambda: Snapshot.from_resources(by_type),
    }
    for function in stages.values():  # warm up imports and caches
        function()
    print(
        f"{args.models} models x 2 versions: {len(snapshot.resources[CLUSTER])} clusters, "
        f"{len(snapshot.resources[ENDPOINT])} endpoint sets, serialized bytes "
        + ", ".join(f"{name} {size}" for name, size in sizes.items())
    )
    print(f"{'stage':<46} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}   ({args.builds} runs)")
    for name, function in stages.items():
        ms = timed(function, args.builds)
        print(f"{name:<46} {percentile(ms, 50):8.2f} {percentile(ms, 99):8.2f} {ms[-1]:8.2f}")

    if not args.edp_python:
        return
    if not Path(args.edp_python).exists():
        print(f"\nenvoy-data-plane comparison skipped: no {args.edp_python} (see --help)")
        return
    ours = {
        "snapshot": timed(lambda: build_snapshot(state, PROXY), args.builds),
        "routes": timed(lambda: resources.build_route_config(state), args.builds),
        "routes_bytes": timed(
            lambda: resources.build_route_config(state).SerializeToString(deterministic=True),
            args.builds,
        ),
    }
    compare_edp(args.edp_python, state, args.edp_builds, ours)


if __name__ == "__main__":
    main()
