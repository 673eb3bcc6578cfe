"""What the Envoy hop costs: added latency at one connection, and proxy CPU per request.

Envoy sits between every OpenAI client and vLLM, so its hop must be negligible next to a
model's latency; and it must be cheaper than the obvious alternative, a Python proxy.
Goals: Envoy adds <= 0.3 ms p50 at one connection; Envoy's CPU per request <= 0.4x that of
bench/aiohttp_proxy.py (a minimal aiohttp reverse proxy doing the same job).

    python bench/bench_envoy_hop.py [--seconds 8] [--connections 32]

One backend, the project's simulator (`python -m controlplane sim`, non-streaming chat
completions with max_tokens 1: ~0.1 ms per request, fast enough to isolate the hop), serves
four paths in turn: `direct`; `envoy`, the Envoy of `switchyard up` (a `url` backend; Envoy's
default concurrency = number of cores); `envoy-1w`, an Envoy started with --concurrency 1
(one worker, like the one-threaded Python proxy) for `switchyard serve`; `aiohttp`, through
bench/aiohttp_proxy.py. For each, wrk (1 thread) runs at 1 connection for latency and at
--connections for throughput; the proxy's CPU is the utime+stime delta of its process (all
threads) in /proc over each wrk run, divided by the requests of that run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
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


def measure(url: str, pid: int | None, seconds: int, connections: int) -> dict:
    """Latency at 1 connection, throughput at `connections`, CPU of `pid` per request."""
    body = chat_body(MODEL)
    run_wrk(url, body, 1, 1, 1)  # warm up: connection pools, caches
    row = {}
    for name, conns in (("c1", 1), ("cN", connections)):
        before = cpu_seconds(pid) if pid else 0.0
        result = run_wrk(url, body, conns, 1, seconds)
        used = cpu_seconds(pid) - before if pid else 0.0
        if result["non_2xx"]:
            raise SystemExit(f"{url}: {result['non_2xx']} non-2xx responses")
        row[name] = {**result, "cpu_us": used / result["requests"] * 1e6 if pid else None}
    return row


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
    args = parser.parse_args()
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
            results["direct"] = measure(sim + path, None, args.seconds, args.connections)

            models = [{"name": MODEL, "versions": [{"name": "v1", "weight": 100,
                                                    "backend": {"url": sim}}]}]  # fmt: skip
            (tmp_path / "up").mkdir()
            with switchyard_up(tmp_path / "up", models) as stack:
                check(stack.proxy + path, expect_header=True)
                results["envoy"] = measure(
                    stack.proxy + path, stack.envoy_pid, args.seconds, args.connections
                )
            (tmp_path / "serve").mkdir()
            with (
                switchyard_up(tmp_path / "serve", models, "serve") as stack,
                own_envoy(stack, concurrency=1) as envoy,
            ):
                stack.wait_routed(MODEL)
                check(stack.proxy + path, expect_header=True)
                results["envoy-1w"] = measure(
                    stack.proxy + path, envoy.pid, args.seconds, args.connections
                )

            proxy = f"http://127.0.0.1:{proxy_port}"
            route = f"{MODEL}=v1={sim}=100"
            proxy_argv = [sys.executable, str(ROOT / "bench" / "aiohttp_proxy.py"),
                          "--port", str(proxy_port), "--route", route]  # fmt: skip
            ready = proxy + "/unused"  # any answer (405 for GET) means it listens
            with background(proxy_argv, ready, tmp_path / "proxy.log") as process:
                check(proxy + path, expect_header=True)
                results["aiohttp"] = measure(
                    proxy + path, process.pid, args.seconds, args.connections
                )

    print(f"POST {path} (max_tokens 1) to the sim; wrk -t1, {args.seconds}s per run; "
          f"envoy {envoy_version()}, {os.cpu_count()} cpus")  # fmt: skip
    c = args.connections
    print(f"\n{'path':<9} {'c1 p50':>8} {'c1 p99':>8} {'c1 rps':>8} {'+p50':>7} "
          f"{f'c{c} rps':>8} {f'c{c} p50':>8} {f'c{c} p99':>8} {'cpu/req c1':>11} "
          f"{f'cpu/req c{c}':>11}")  # fmt: skip
    base = results["direct"]["c1"]["p50"]
    for name, row in results.items():
        one, many = row["c1"], row["cN"]
        cpu = "".join(f"{cpu_text(r['cpu_us']):>12}" for r in (one, many))
        print(
            f"{name:<9} {one['p50']:7.3f}ms {one['p99']:6.3f}ms {one['rps']:8.0f} "
            f"{one['p50'] - base:+6.3f} {many['rps']:8.0f} {many['p50']:6.2f}ms "
            f"{many['p99']:6.2f}ms{cpu}"
        )
    python = results["aiohttp"]
    for name in ("envoy", "envoy-1w"):
        envoy = results[name]
        ratios = [envoy[key]["cpu_us"] / python[key]["cpu_us"] for key in ("c1", "cN")]
        print(
            f"{name}: hop p50 {envoy['c1']['p50'] - base:+.3f} ms at 1 connection; CPU per request"
            f" / aiohttp proxy's: {ratios[0]:.2f}x at 1 connection, {ratios[1]:.2f}x at {c}"
        )
    print(f"aiohttp: hop p50 {python['c1']['p50'] - base:+.3f} ms at 1 connection")


if __name__ == "__main__":
    main()
