"""Fan-out of one weight change to 1,000 simulated Envoys: PUT -> every ADS client ACKed.

A fleet of Envoys all connect to one control plane; a weight change is only live once the
last of them runs it, and `PUT /v1/models/{m}/weights` answers only then. Goal: p99 to the
last ACK <= 250 ms with 1,000 clients.

    python bench/bench_fanout.py [--clients 1,100,1000] [--processes 2] [--changes 100]

Starts one sim and `switchyard serve` with `--models` models (two `url` versions each, both
on that sim), then, for each count in `--clients` in turn (1 and 100 are the anchors),
up to `--processes` processes of bench/ads_clients.py holding that many real gRPC ADS
streams between them (each with its own channel and node id, subscribing to CDS,
EDS, LDS and RDS and ACKing every response like Envoy). Once every client runs the first
route configuration, it makes `--changes` weight changes on the first model over one
keep-alive connection, each with a new split, 0.1 s apart, and measures:

- PUT -> 200: the API answers after every connected client ACKed, so this is the time to
  the last ACK as the server saw it;
- PUT sent -> RDS received, per client and change (clocks: time.monotonic() in every
  process, one host); its max per change is the last client to receive the change.

Also checks that every client received exactly one route configuration per change and
nothing else, and prints CPU time per change of the control plane and of the clients.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_weights import histogram
from common import ROOT, cpu_seconds, percentile, sim, stop, switchyard_up

MODEL_PREFIX = "fanout-model"


def model_config(count: int, backend: str) -> list[dict]:
    return [
        {
            "name": f"{MODEL_PREFIX}-{index}",
            "versions": [
                {"name": "v1", "weight": 100, "backend": {"url": backend}},
                {"name": "v2", "weight": 0, "backend": {"url": backend}},
            ],
        }
        for index in range(count)
    ]


def start_clients(xds: str, clients: int, processes: int, nice: int) -> list[subprocess.Popen]:
    """`processes` client processes holding `clients` streams between them; once all ready."""
    started = []
    processes = min(processes, clients)
    per, extra = divmod(clients, processes)
    first = 0
    for index in range(processes):
        count = per + (index < extra)
        argv = ["nice", "-n", str(nice), sys.executable, str(ROOT / "bench" / "ads_clients.py"),
                "--xds", xds, "--count", str(count), "--first", str(first)]  # fmt: skip
        started.append(
            subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        )
        first += count
    for process in started:
        line = process.stdout.readline().strip()
        if line != "ready":
            for other in started:
                stop(other)
            raise SystemExit(f"an ADS client process did not get ready (said {line!r})")
    return started


def collect(processes: list[subprocess.Popen]) -> list[dict]:
    """Close their stdin; each prints its report as one JSON line and exits."""
    reports = []
    for process in processes:
        process.stdin.close()
    for process in processes:
        line = process.stdout.readline()
        process.wait(30)
        if process.returncode != 0 or not line:
            raise SystemExit(f"an ADS client process failed (exit {process.returncode})")
        reports += json.loads(line)
    return reports


def connected(admin: str) -> int:
    with urllib.request.urlopen(f"{admin}/v1/envoys", timeout=30) as response:
        envoys = json.loads(response.read())["envoys"]
    return sum(1 for envoy in envoys if envoy["node_id"].startswith("bench-ads-"))


def weight_changes(hostport: str, model: str, changes: int, gap: float) -> list[tuple]:
    """(sent, answered) in time.monotonic() per PUT, each with a new split."""
    connection = http.client.HTTPConnection(hostport, timeout=30)
    headers = {"Content-Type": "application/json"}
    windows = []
    try:
        for index in range(changes):
            share = 1 + index % 99  # consecutive changes differ, so each one is pushed
            body = json.dumps({"weights": {"v1": 100 - share, "v2": share}})
            sent = time.monotonic()
            connection.request("PUT", f"/v1/models/{model}/weights", body, headers)
            response = connection.getresponse()
            payload = response.read()
            answered = time.monotonic()
            if response.status != 200:
                raise SystemExit(f"PUT failed: {response.status} {payload[:300]!r}")
            windows.append((sent, answered))
            time.sleep(gap)
    finally:
        connection.close()
    return windows


def per_change(windows: list[tuple], reports: list[dict]) -> list[list[float]]:
    """Per change, every client's PUT sent -> RDS received (ms); checks one push each."""
    received: list[list[float]] = [[] for _ in windows]
    problems = []
    for report in reports:
        if report["others"]:
            problems.append(f"{report['node']}: {report['others']} non-RDS pushes")
        seen = [0] * len(windows)
        for _version, at, _acked in report["rds"]:
            index = next((i for i, (s, a) in enumerate(windows) if s <= at <= a), None)
            if index is None:
                problems.append(f"{report['node']}: an RDS push outside every change")
                continue
            seen[index] += 1
            received[index].append((at - windows[index][0]) * 1000)
        if seen != [1] * len(windows):
            problems.append(f"{report['node']}: pushes per change {seen}")
    if problems:
        raise SystemExit("fan-out incomplete:\n  " + "\n  ".join(problems[:10]))
    return received


def row(label: str, values: list[float]) -> str:
    values = sorted(values)
    return (
        f"{label:<44} {percentile(values, 50):7.1f} {percentile(values, 90):7.1f} "
        f"{percentile(values, 99):7.1f} {values[-1]:7.1f} {statistics.mean(values):7.1f}"
    )


def measure(stack, clients: int, args: argparse.Namespace) -> dict:
    """Start `clients` ADS clients, make the changes, stop the clients; the figures."""
    model = f"{MODEL_PREFIX}-0"
    hostport = stack.config["listen"]["admin"]
    began = time.monotonic()
    processes = start_clients(stack.config["listen"]["xds"], clients, args.processes, args.nice)
    try:
        synced_s = time.monotonic() - began
        streams = connected(stack.admin)
        if streams != clients:
            raise SystemExit(f"{streams} ADS clients connected, not {clients}")
        weight_changes(hostport, model, args.warmup, args.gap)
        before_ack = histogram(stack.admin, "switchyard_xds_push_ack_seconds", "rds")
        pids = [stack.process.pid] + [process.pid for process in processes]
        cpu_before = [cpu_seconds(pid) for pid in pids]
        windows = weight_changes(hostport, model, args.changes, args.gap)
        cpu = [cpu_seconds(pid) - b for pid, b in zip(pids, cpu_before, strict=True)]
        after_ack = histogram(stack.admin, "switchyard_xds_push_ack_seconds", "rds")
        reports = collect(processes)
    finally:
        for process in processes:
            stop(process)
    deadline = time.monotonic() + 30
    while connected(stack.admin) and time.monotonic() < deadline:
        time.sleep(0.1)  # the server has let go of every stream before the next count
    for report in reports:  # drop the warm-up pushes, which came before `windows`
        report["rds"] = [push for push in report["rds"] if push[1] >= windows[0][0]]
    received = per_change(windows, reports)
    acks = after_ack["count"] - before_ack["count"]
    return {
        "synced_s": synced_s,
        "puts": [(answered - sent) * 1000 for sent, answered in windows],
        "last": [max(values) for values in received],
        "every": [value for values in received for value in values],
        "ack_mean": (after_ack["sum"] - before_ack["sum"]) / acks * 1000 if acks else 0.0,
        "cpu_server": cpu[0] / args.changes * 1000,
        "cpu_clients": sum(cpu[1:]) / args.changes * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,100,1000", help="simulated Envoys, a list")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--changes", type=int, default=100, help="timed weight changes")
    parser.add_argument("--warmup", type=int, default=3, help="untimed changes first")
    parser.add_argument("--models", type=int, default=3, help="models configured")
    parser.add_argument("--gap", type=float, default=0.1, help="seconds between changes")
    parser.add_argument("--nice", type=int, default=0, help="niceness of the client processes")
    args = parser.parse_args()
    counts = [int(count) for count in args.clients.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        tmp_path = Path(tmp)
        with (
            sim(tmp_path, "fanout") as backend,
            switchyard_up(tmp_path, model_config(args.models, backend), "serve") as stack,
        ):
            results = {count: measure(stack, count, args) for count in counts}

    print(f"fan-out: ADS clients in {args.processes} processes, {args.models} models, "
          f"{args.changes} weight changes ({args.warmup} warm-up) per client count")  # fmt: skip
    for count, result in results.items():
        print(f"\n{count} clients (all synced {result['synced_s']:.1f} s after start)")
        print(f"{'ms':<44} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} {'mean':>7}")
        print(row("PUT -> 200 (after every client ACKed)", result["puts"]))
        print(row("PUT sent -> last client received, per change", result["last"]))
        print(row("PUT sent -> RDS received, every client", result["every"]))
        print(f"server push -> ACK (rds) mean {result['ack_mean']:.1f} ms; CPU per change: "
              f"control plane {result['cpu_server']:.0f} ms, client processes "
              f"{result['cpu_clients']:.0f} ms")  # fmt: skip
        print(f"every client received exactly one route configuration per change "
              f"({len(result['every'])} pushes) and nothing else")  # fmt: skip


if __name__ == "__main__":
    main()
