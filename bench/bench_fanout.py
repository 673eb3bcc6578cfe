"""Fan-out of one weight change to a fleet of simulated Envoys: PUT -> every ADS client ACKed.

A fleet of Envoys all connect to one control plane; a weight change is only live once the
last of them runs it, and `PUT /v1/models/{m}/weights` answers only then. Goals (issue 17):
1,000 clients p99 to the last ACK <= 100 ms; control-plane CPU per client push <= 30 us; a
10,000-client run reported (time to the last ACK, CPU per push) even where this 2-core box
is the limit.

    python bench/bench_fanout.py [--clients 1,100,1000,10000] [--changes 100]
                                 [--large-changes 20] [--processes 2] [--per-process 2500]
    python bench/bench_fanout.py --clients 1000 --changes 20      # quick

Starts one sim and `switchyard serve` with `--models` models (two `url` versions each, both
on that sim), then, for each count in `--clients` in turn (1 and 100 are the anchors),
processes of bench/ads_clients.py holding that many real gRPC ADS streams between them
(`--processes`, more when a process would hold over `--per-process` streams; each stream
with its own channel and node id, subscribing like Envoy: CDS, EDS, LDS, then RDS, or
SRDS then RDS when the listener uses scoped routes, ACKing every response). Once every
client runs every route configuration, it makes `--changes` weight changes on the first
model (`--large-changes` above 1,000 clients) over one keep-alive connection, each with a
new split, `--gap` s apart, and measures:

- PUT -> 200: the API answers after every connected client ACKed, so this is the time to
  the last ACK as the server saw it (a 504 after its 10 s ACK timeout is counted, not fatal);
- PUT sent -> RDS received and -> ACK written, per client and change (clocks:
  time.monotonic() in every process, one host); the max per change is the last client;
- bytes: the serialized RDS responses each client received per change, and the server's
  `switchyard_xds_pushed_bytes_total` when it has that counter;
- CPU: the control plane's utime+stime per change, and per client push (/ clients):
  gross, the whole process over the window of changes; and marginal, gross minus what
  the same process used per second idle (every client connected, no change, `--idle` s
  measured just before), times the window's length.

Also checks that every client received exactly one route configuration response per change
and nothing else (reported, not fatal, so that an overloaded run still gives its figures).
"""

from __future__ import annotations

import argparse
import bisect
import http.client
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_weights import counter_total, histogram
from common import ROOT, cpu_seconds, percentile, sim, stop, switchyard_up

MODEL_PREFIX = "fanout-model"
PUSHED_BYTES = "switchyard_xds_pushed_bytes_total"


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


def start_clients(
    xds: str, clients: int, processes: int, nice: int, timeout: float, connect_rate: float,
    transport: str = "grpc",
) -> tuple[list[subprocess.Popen], str]:
    """`processes` client processes holding `clients` streams between them; once all ready.
    Also the layout they found ('rds' or 'scoped' and how many route configurations)."""
    started = []
    processes = min(processes, clients)
    per, extra = divmod(clients, processes)
    first = 0
    for index in range(processes):
        count = per + (index < extra)
        argv = ["nice", "-n", str(nice), sys.executable, str(ROOT / "bench" / "ads_clients.py"),
                "--xds", xds, "--count", str(count), "--first", str(first),
                "--connect-rate", str(connect_rate / processes),
                "--give-up", str(timeout), "--transport", transport]  # fmt: skip
        started.append(
            subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        )
        first += count
    layout = ""
    deadline = time.monotonic() + timeout
    for process in started:
        line = process.stdout.readline().strip()  # blocks; the client gives up on its own
        if not line.startswith("ready") or time.monotonic() > deadline:
            for other in started:
                stop(other)
            raise SystemExit(f"an ADS client process did not get ready (said {line!r})")
        layout = line.removeprefix("ready").strip()
    return started, layout


def collect(processes: list[subprocess.Popen]) -> list[dict]:
    """Close their stdin; each prints its report as one JSON line and exits."""
    reports = []
    for process in processes:
        process.stdin.close()
    for process in processes:
        line = process.stdout.readline()
        process.wait(60)
        if process.returncode != 0 or not line:
            raise SystemExit(f"an ADS client process failed (exit {process.returncode})")
        reports += json.loads(line)
    return reports


def connected(admin: str) -> int:
    with urllib.request.urlopen(f"{admin}/v1/envoys", timeout=60) as response:
        envoys = json.loads(response.read())["envoys"]
    return sum(1 for envoy in envoys if envoy["node_id"].startswith("bench-ads-"))


def weight_changes(hostport: str, model: str, changes: int, gap: float) -> list[tuple]:
    """(sent, answered, status) in time.monotonic() per PUT, each with a new split."""
    connection = http.client.HTTPConnection(hostport, timeout=60)
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
            if response.status not in (200, 504):  # 504: not every ACK within 10 s
                raise SystemExit(f"PUT failed: {response.status} {payload[:300]!r}")
            windows.append((sent, answered, response.status))
            time.sleep(gap)
    finally:
        connection.close()
    return windows


def per_change(windows: list[tuple], reports: list[dict]) -> tuple[list[list[tuple]], list[str]]:
    """Per change, every client's (received ms, ACK written ms, bytes) after the PUT was sent
    (a push belongs to the last change sent before it arrived); and what looked wrong."""
    starts = [sent for sent, _, _ in windows]
    received: list[list[tuple]] = [[] for _ in windows]
    problems = []
    for report in reports:
        if report["others"]:
            problems.append(f"{report['node']}: other pushes {report['others']}")
        if report.get("reconnects"):
            problems.append(f"{report['node']}: {report['reconnects']} streams failed")
        seen = [0] * len(windows)
        for _version, at, acked, size, _resources in report["rds"]:
            index = bisect.bisect_right(starts, at) - 1
            if index < 0:
                continue  # a warm-up change's push
            seen[index] += 1
            sent = starts[index]
            received[index].append(((at - sent) * 1000, (acked - sent) * 1000, size))
        if seen != [1] * len(windows):
            problems.append(f"{report['node']}: RDS responses per change {seen}")
    return received, problems


def row(label: str, values: list[float]) -> str:
    values = sorted(values)
    if not values:
        return f"{label:<46} (none)"
    return (
        f"{label:<46} {percentile(values, 50):8.1f} {percentile(values, 90):8.1f} "
        f"{percentile(values, 99):8.1f} {values[-1]:8.1f} {statistics.mean(values):8.1f}"
    )


def measure(stack, clients: int, changes: int, args: argparse.Namespace) -> dict:
    """Start `clients` ADS clients, make the changes, stop the clients; the figures."""
    model = f"{MODEL_PREFIX}-0"
    hostport = stack.config["listen"]["admin"]
    processes = min(clients, max(args.processes, math.ceil(clients / args.per_process)))
    began = time.monotonic()
    started, layout = start_clients(
        stack.config["listen"]["xds"], clients, processes, args.nice, args.sync_timeout,
        args.connect_rate, args.client_transport,
    )  # fmt: skip
    try:
        synced_s = time.monotonic() - began
        streams = connected(stack.admin)
        if streams != clients:
            raise SystemExit(f"{streams} ADS clients connected, not {clients}")
        weight_changes(hostport, model, args.warmup, args.gap)
        idle_s = args.changes * args.gap if args.idle is None else args.idle
        idle_rate = 0.0  # the control plane's CPU s per s with every client connected, no change
        if idle_s > 0:
            time.sleep(1.0)  # the warm-up's ACKs and folds done
            idle_cpu, idle_began = cpu_seconds(stack.process.pid), time.monotonic()
            time.sleep(idle_s)
            idle_rate = (cpu_seconds(stack.process.pid) - idle_cpu) / (
                time.monotonic() - idle_began
            )
        before_ack = histogram(stack.admin, "switchyard_xds_push_ack_seconds", 'type="rds"')
        before_bytes = counter_total(stack.admin, PUSHED_BYTES)
        pids = [stack.process.pid] + [process.pid for process in started]
        cpu_before = [cpu_seconds(pid) for pid in pids]
        window_began = time.monotonic()
        windows = weight_changes(hostport, model, changes, args.gap)
        time.sleep(0.5)  # pushes still on the way after a 504
        cpu = [cpu_seconds(pid) - b for pid, b in zip(pids, cpu_before, strict=True)]
        window_s = time.monotonic() - window_began
        after_ack = histogram(stack.admin, "switchyard_xds_push_ack_seconds", 'type="rds"')
        after_bytes = counter_total(stack.admin, PUSHED_BYTES)
        reports = collect(started)
    finally:
        for process in started:
            stop(process)
    deadline = time.monotonic() + 60
    while connected(stack.admin) and time.monotonic() < deadline:
        time.sleep(0.2)  # the server has let go of every stream before the next count
    received, problems = per_change(windows, reports)
    acks = after_ack["count"] - before_ack["count"]
    cpu_server = cpu[0] / changes * 1000  # ms per change
    idle_server = idle_rate * window_s / changes * 1000  # of it, what idling would have cost
    return {
        "processes": processes,
        "layout": layout,
        "changes": changes,
        "synced_s": synced_s,
        "puts": [(answered - sent) * 1000 for sent, answered, _ in windows],
        "timeouts": sum(1 for *_, status in windows if status != 200),
        "last": [max(r for r, _, _ in values) for values in received if values],
        "last_ack": [max(a for _, a, _ in values) for values in received if values],
        "every": [r for values in received for r, _, _ in values],
        "bytes": [size for values in received for _, _, size in values],
        "server_bytes": (
            None if after_bytes is None else (after_bytes - (before_bytes or 0)) / changes
        ),
        "ack_mean": (after_ack["sum"] - before_ack["sum"]) / acks * 1000 if acks else 0.0,
        "cpu_server": cpu_server,
        "cpu_per_push_us": cpu_server * 1000 / clients,
        "idle_s": idle_s,
        "idle_ms_per_s": idle_rate * 1000,
        "window_s": window_s,
        "cpu_marginal": cpu_server - idle_server,
        "cpu_marginal_us": (cpu_server - idle_server) * 1000 / clients,
        "cpu_clients": sum(cpu[1:]) / changes * 1000,
        "problems": problems,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,100,1000,10000", help="simulated Envoys, a list")
    parser.add_argument("--processes", type=int, default=2, help="client processes (at least)")
    parser.add_argument("--per-process", type=int, default=2500,
                        help="most streams in one client process")  # fmt: skip
    parser.add_argument("--changes", type=int, default=100, help="timed weight changes")
    parser.add_argument("--large-changes", type=int, default=20,
                        help="timed weight changes above 1,000 clients")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=3, help="untimed changes first")
    parser.add_argument("--models", type=int, default=3, help="models configured")
    parser.add_argument("--gap", type=float, default=0.1, help="seconds between changes")
    parser.add_argument("--idle", type=float, default=None,
                        help="seconds of idle baseline (clients connected, no change) before "
                             "the changes; default changes x gap, 0: none")  # fmt: skip
    parser.add_argument("--nice", type=int, default=0, help="niceness of the client processes")
    parser.add_argument("--connect-rate", type=float, default=500,
                        help="new streams per second, all processes together")  # fmt: skip
    parser.add_argument("--sync-timeout", type=float, default=300,
                        help="seconds for every client to get its configuration")  # fmt: skip
    parser.add_argument("--client-transport", choices=("grpc", "h2"), default="grpc",
                        help="the simulated Envoys' gRPC: grpc.aio, or bench/h2_client.py "
                             "(cheaper per response, nearer a real Envoy's share)")  # fmt: skip
    args = parser.parse_args()
    counts = [int(count) for count in args.clients.split(",")]

    print(f"fan-out: {args.models} models, weight changes {args.gap} s apart "
          f"({args.warmup} warm-up) per client count, clients on {args.client_transport}",
          flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        tmp_path = Path(tmp)
        with (
            sim(tmp_path, "fanout") as backend,
            switchyard_up(tmp_path, model_config(args.models, backend), "serve") as stack,
        ):
            for count in counts:
                changes = args.changes if count <= 1000 else min(args.changes, args.large_changes)
                report(count, measure(stack, count, changes, args))


def report(count: int, result: dict) -> None:
    print(f"\n{count} clients in {result['processes']} processes, {result['changes']} "
          f"changes, layout {result['layout']} (all synced {result['synced_s']:.1f} s "
          "after start)")  # fmt: skip
    print(f"{'ms':<46} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'mean':>8}")
    print(row("PUT -> 200 (after every client ACKed)", result["puts"]))
    print(row("PUT sent -> last client received, per change", result["last"]))
    print(row("PUT sent -> last client's ACK written", result["last_ack"]))
    print(row("PUT sent -> RDS received, every client", result["every"]))
    if result["timeouts"]:
        print(f"{result['timeouts']} of {result['changes']} PUTs answered 504 (ACK timeout)")
    sizes = sorted(result["bytes"]) or [0]
    server = result["server_bytes"]
    server_text = f"n/a (no {PUSHED_BYTES})" if server is None else f"{server:.0f}"
    print(f"RDS bytes per client per change: p50 {percentile(sizes, 50):.0f}, max "
          f"{sizes[-1]}; server pushed bytes per change: {server_text}")  # fmt: skip
    print(f"server push -> ACK (rds) mean {result['ack_mean']:.1f} ms; CPU per change: "
          f"control plane {result['cpu_server']:.1f} ms = {result['cpu_per_push_us']:.1f} "
          f"us per client push; client processes {result['cpu_clients']:.0f} ms")  # fmt: skip
    if result["idle_s"] > 0:
        print(f"idle baseline (clients connected, no change, {result['idle_s']:.0f} s): "
              f"{result['idle_ms_per_s']:.1f} ms CPU per s; over the {result['window_s']:.1f} s "
              f"window, marginal CPU per change {result['cpu_marginal']:.1f} ms = "
              f"{result['cpu_marginal_us']:.1f} us per client push (gross above)")  # fmt: skip
    if result["problems"]:
        print(f"NOT one RDS response per change for {len(result['problems'])} clients, e.g.:")
        for problem in result["problems"][:5]:
            print(f"  {problem}")
    else:
        print(f"every client received exactly one route configuration response per change "
              f"({len(result['every'])} responses) and nothing else")  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
