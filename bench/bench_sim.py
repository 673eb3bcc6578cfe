"""Throughput of the vLLM simulator on small non-streaming chat completions.

The sim stands in for GPUs in every benchmark of the project, so it must never be the
bottleneck; this measures how many requests per second one sim process answers.

    python bench/bench_sim.py [--duration 5] [--threads 2] [--connections 32] [--client auto]
                              [--max-tokens 1] [--stream]

Starts the sim in a subprocess on a free port, drives it with `wrk` (or an aiohttp client loop
when wrk is missing), and prints requests/s and latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "sim-model"


def request_body(max_tokens: int, stream: bool) -> str:
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
    )


def wrk_script(body: str) -> str:
    return (
        'wrk.method = "POST"\n'
        f"wrk.body = [[{body}]]\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_sim(port: int) -> subprocess.Popen[bytes]:
    code = (
        "from controlplane.sim import SimConfig, run; "
        f"run(SimConfig(model={MODEL!r}), '127.0.0.1', {port})"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"sim exited with {proc.returncode} before becoming ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("sim did not become ready within 15 s")


def stop_sim(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_wrk(url: str, body: str, duration: int, threads: int, connections: int) -> dict[str, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(wrk_script(body))
    try:
        cmd = [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-s",
            script.name,
            url,
        ]
        print("$", " ".join(cmd), flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script.name)
    print(out)
    result = {"client": "wrk"}
    if match := re.search(r"Requests/sec:\s+([\d.]+)", out):
        result["requests_per_s"] = match.group(1)
    if match := re.search(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M):
        result["latency_avg"], result["latency_stdev"], result["latency_max"] = match.groups()
    for pct in ("50", "90", "99"):
        if match := re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M):
            result[f"latency_p{pct}"] = match.group(1)
    if match := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        result["non_2xx"] = match.group(1)
    return result


async def _client_loop(url: str, body: str, duration: int, connections: int) -> dict[str, str]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration
    headers = {"Content-Type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        began = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(connections)))
        elapsed = time.perf_counter() - began
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "client": "aiohttp",
        "requests_per_s": f"{len(latencies) / elapsed:.0f}",
        "latency_avg": f"{statistics.fmean(latencies) * 1000:.2f}ms",
        "latency_p50": f"{cuts[49] * 1000:.2f}ms",
        "latency_p90": f"{cuts[89] * 1000:.2f}ms",
        "latency_p99": f"{cuts[98] * 1000:.2f}ms",
        "non_2xx": str(errors),
    }


def sim_success_total(port: int) -> float:
    """What the sim itself counted, to check the load really reached it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total{")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds of load")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections")
    parser.add_argument("--client", choices=("auto", "wrk", "aiohttp"), default="auto")
    parser.add_argument("--max-tokens", type=int, default=1, help="tokens per completion")
    parser.add_argument("--stream", action="store_true", help="SSE responses instead of JSON")
    args = parser.parse_args()
    body = request_body(args.max_tokens, args.stream)

    use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    proc = start_sim(port)
    try:
        if use_wrk:
            result = run_wrk(url, body, args.duration, args.threads, args.connections)
        else:
            result = asyncio.run(_client_loop(url, body, args.duration, args.connections))
        result["sim_requests_counted"] = f"{sim_success_total(port):.0f}"
    finally:
        with contextlib.suppress(Exception):
            stop_sim(proc)
    print(f"machine: {os.cpu_count()} cpus, python {sys.version.split()[0]}")
    kind = "streaming" if args.stream else "non-streaming"
    print(
        f"load: {args.connections} connections for {args.duration}s, {kind} chat completions, "
        f"max_tokens={args.max_tokens}"
    )
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
