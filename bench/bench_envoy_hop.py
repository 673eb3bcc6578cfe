"""What the Envoy hop costs: added latency at one connection, and proxy CPU per request.

Envoy sits between every OpenAI client and vLLM, so its hop must be negligible next to a
model's latency; and it must be cheaper than the obvious alternative, a Python proxy.
Goals: Envoy adds <= 0.3 ms p50 at one connection; Envoy's CPU per request <= 0.4x that of
bench/aiohttp_proxy.py (a minimal aiohttp reverse proxy doing the same job); and the hop
costs the same with 1,000 models configured as with one (within +10 %, issue 17).

    python bench/bench_envoy_hop.py [--seconds 8] [--connections 32] [--sizes 1,200,1000]
    python bench/bench_envoy_hop.py --seconds 3 --sizes 1,1000 --paths direct,envoy   # quick

One backend, the project's simulator (`python -m controlplane sim`, non-streaming chat
completions with max_tokens 1: ~0.1 ms per request, fast enough to isolate the hop), serves
the paths in turn: `direct`; `envoy`, the Envoy of `switchyard up` (a `url` backend; Envoy's
default concurrency = number of cores), once per size in `--sizes`: with N-1 filler models
(two `url` versions each on one other sim, never called) configured *before* the measured
model, so that a router that tries the models in order tries them all first (rows
`envoy@N`); `envoy-1w`, an Envoy started with --concurrency 1 (one worker, like the
one-threaded Python proxy) for `switchyard serve`; `aiohttp`, through
bench/aiohttp_proxy.py. For each, wrk (1 thread) runs at 1 connection for latency and at
--connections for throughput; the proxy's CPU is the utime+stime delta of its process (all
threads) in /proc over each wrk run, divided by the requests of that run. With filler
models Envoy is busy even without requests (active health checks of every cluster, stats):
its CPU over `--idle` seconds just before each wrk run is subtracted ("net" columns).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import (
    ROOT,
    background,
    chat_body,
    cpu_seconds,
    free_port,
    own_envoy,
    post_json,
    run_wrk,
    switchyard_up,
)
from common import sim as common_sim

MODEL = "bench-model"


def check(url: str, expect_header: bool) -> None:
    """One request by hand: a 200 (and the version header through a proxy), else stop."""
    status, payload = post_json(url, json.loads(chat_body(MODEL)))
    if status != 200:
        raise SystemExit(f"{url}: {status} {payload[:200]!r}")
    if expect_header:
        request = urllib.request.Request(url, chat_body(MODEL).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            if response.headers.get("x-switchyard-version") != "v1":
                raise SystemExit(f"{url}: no x-switchyard-version header")


def measure(url: str, pid: int | None, seconds: int, connections: int, idle: float) -> dict:
    """Latency at 1 connection, throughput at `connections`, CPU of `pid` per request (raw,
    and net of what the process burns idle, measured over `idle` s before each run)."""
    body = chat_body(MODEL)
    run_wrk(url, body, 1, 1, 1)  # warm up: connection pools, caches
    row = {}
    for name, conns in (("c1", 1), ("cN", connections)):
        idle_rate = 0.0
        if pid and idle > 0:
            before, started = cpu_seconds(pid), time.monotonic()
            time.sleep(idle)
            idle_rate = (cpu_seconds(pid) - before) / (time.monotonic() - started)
        before, started = (cpu_seconds(pid) if pid else 0.0), time.monotonic()
        result = run_wrk(url, body, conns, 1, seconds)
        elapsed = time.monotonic() - started
        used = cpu_seconds(pid) - before if pid else 0.0
        if result["non_2xx"]:
            raise SystemExit(f"{url}: {result['non_2xx']} non-2xx responses")
        row[name] = {
            **result,
            "cpu_us": used / result["requests"] * 1e6 if pid else None,
            "net_us": max(0.0, used - idle_rate * elapsed) / result["requests"] * 1e6
            if pid
            else None,
            "idle_pct": idle_rate * 100,
        }
    return row


def filler_models(count: int, url: str) -> list[dict]:
    """`count` models of two `url` versions on `url`, never called."""
    return [
        {"name": f"filler-{index:04d}", "versions": [
            {"name": "v1", "weight": 90, "backend": {"url": url}},
            {"name": "v2", "weight": 10, "backend": {"url": url}},
        ]}
        for index in range(count)
    ]  # fmt: skip


def envoy_version() -> str:
    envoy = str(Path(sys.executable).parent / "envoy")
    out = subprocess.run([envoy, "--version"], capture_output=True, text=True).stdout
    return out.split("version:")[-1].strip()


def cpu_text(microseconds: float | None) -> str:
    return "-" if microseconds is None else f"{microseconds:.0f} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8, help="per wrk run")
    parser.add_argument("--connections", type=int, default=32, help="for the throughput run")
    parser.add_argument("--sizes", default="1,200,1000", help="models configured for `envoy`")
    parser.add_argument("--paths", default="direct,envoy,envoy-1w,aiohttp", help="a list")
    parser.add_argument("--idle", type=float, default=2.0,
                        help="seconds of idle CPU measured before each run")  # fmt: skip
    args = parser.parse_args()
    paths = args.paths.split(",")
    sizes = [int(size) for size in args.sizes.split(",")]
    path = "/v1/chat/completions"
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-hop-") as tmp:
        tmp_path = Path(tmp)
        sim_port, proxy_port = free_port(), free_port()
        sim = f"http://127.0.0.1:{sim_port}"
        sim_argv = [sys.executable, "-m", "controlplane", "sim", "--port", str(sim_port),
                    "--model", MODEL]  # fmt: skip
        with background(sim_argv, f"{sim}/health", tmp_path / "sim.log"):
            check(sim + path, expect_header=False)
            results["direct"] = measure(sim + path, None, args.seconds, args.connections, 0)

            models = [{"name": MODEL, "versions": [{"name": "v1", "weight": 100,
                                                    "backend": {"url": sim}}]}]  # fmt: skip
            for size in sizes if "envoy" in paths else []:
                directory = tmp_path / f"up-{size}"
                directory.mkdir()
                with (
                    common_sim(directory, "filler") as filler,
                    switchyard_up(
                        directory, [*filler_models(size - 1, filler), *models], timeout=300,
                        routed=MODEL,
                    ) as stack,
                ):  # fmt: skip
                    check(stack.proxy + path, expect_header=True)
                    name = "envoy" if size == 1 else f"envoy@{size}"
                    results[name] = measure(
                        stack.proxy + path, stack.envoy_pid, args.seconds, args.connections,
                        args.idle,
                    )  # fmt: skip
            if "envoy-1w" in paths:
                (tmp_path / "serve").mkdir()
                with (
                    switchyard_up(tmp_path / "serve", models, "serve") as stack,
                    own_envoy(stack, concurrency=1) as envoy,
                ):
                    stack.wait_routed(MODEL)
                    check(stack.proxy + path, expect_header=True)
                    results["envoy-1w"] = measure(
                        stack.proxy + path, envoy.pid, args.seconds, args.connections, args.idle
                    )

            if "aiohttp" in paths:
                proxy = f"http://127.0.0.1:{proxy_port}"
                route = f"{MODEL}=v1={sim}=100"
                proxy_argv = [sys.executable, str(ROOT / "bench" / "aiohttp_proxy.py"),
                              "--port", str(proxy_port), "--route", route]  # fmt: skip
                ready = proxy + "/unused"  # any answer (405 for GET) means it listens
                with background(proxy_argv, ready, tmp_path / "proxy.log") as process:
                    check(proxy + path, expect_header=True)
                    results["aiohttp"] = measure(
                        proxy + path, process.pid, args.seconds, args.connections, args.idle
                    )

    print(f"POST {path} (max_tokens 1) to the sim; wrk -t1, {args.seconds}s per run; "
          f"envoy {envoy_version()}, {os.cpu_count()} cpus; envoy@N: N models configured, "
          f"the measured one last")  # fmt: skip
    c = args.connections
    print(f"\n{'path':<11} {'c1 p50':>8} {'c1 p99':>8} {'c1 rps':>8} {'+p50':>7} "
          f"{f'c{c} rps':>8} {f'c{c} p50':>8} {f'c{c} p99':>8} {'cpu/req c1':>11} "
          f"{f'cpu/req c{c}':>11} {'net c1':>8} {f'net c{c}':>8} {'idle %':>7}")  # fmt: skip
    base = results["direct"]["c1"]["p50"]
    for name, row in results.items():
        one, many = row["c1"], row["cN"]
        cpu = "".join(f"{cpu_text(r['cpu_us']):>12}" for r in (one, many))
        net = "".join(f"{cpu_text(r['net_us']):>9}" for r in (one, many))
        print(
            f"{name:<11} {one['p50']:7.3f}ms {one['p99']:6.3f}ms {one['rps']:8.0f} "
            f"{one['p50'] - base:+6.3f} {many['rps']:8.0f} {many['p50']:6.2f}ms "
            f"{many['p99']:6.2f}ms{cpu}{net} {one['idle_pct']:7.2f}"
        )
    python = results.get("aiohttp")
    for name in results:
        if not name.startswith("envoy"):
            continue
        envoy = results[name]
        line = f"{name}: hop p50 {envoy['c1']['p50'] - base:+.3f} ms at 1 connection"
        if python is not None:
            ratios = [envoy[key]["cpu_us"] / python[key]["cpu_us"] for key in ("c1", "cN")]
            line += (f"; CPU per request / aiohttp proxy's: {ratios[0]:.2f}x at 1 connection, "
                     f"{ratios[1]:.2f}x at {c}")  # fmt: skip
        print(line)
    if python is not None:
        print(f"aiohttp: hop p50 {python['c1']['p50'] - base:+.3f} ms at 1 connection")
    one = results.get("envoy")
    for name, envoy in results.items():
        if one is None or not name.startswith("envoy@"):
            continue
        hop, hop1 = envoy["c1"]["p50"] - base, one["c1"]["p50"] - base
        print(f"{name} vs 1 model: hop p50 {hop:+.3f} vs {hop1:+.3f} ms "
              f"({(hop / hop1 - 1) * 100 if hop1 > 0 else 0:+.0f} %); net CPU/req at c{c} "
              f"{envoy['cN']['net_us']:.0f} vs {one['cN']['net_us']:.0f} us "
              f"({(envoy['cN']['net_us'] / one['cN']['net_us'] - 1) * 100:+.0f} %); c{c} req/s "
              f"{envoy['cN']['rps']:.0f} vs {one['cN']['rps']:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
