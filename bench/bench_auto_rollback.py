"""Automatic rollback speed: from a fault on the candidate to the candidate at 0 %, ACKed.

    python bench/bench_auto_rollback.py [--runs 20] [--hang-runs 10] [--rate 50]

One `switchyard up` (one Envoy), `llama-3-8b` with two sim versions (`ttft_ms` 20). A
background thread sends `--rate` non-streaming completions per second (open loop: a new
request every 1/rate s whatever the others do, so a hung candidate does not slow the load).
Each run starts a canary (`set_weight` 50, then a long pause) with the analysis
`{interval_seconds: 1, min_requests: 10, max_error_rate: 0.05, failure_limit: 1}`, waits
for a `pass` verdict and then a random 0-1 s (so that the fault starts at any phase of the
1 s verdict cycle), then injects a fault into the candidate's sim
(`POST /sim/faults {"error_rate": 1.0, "status": 500}`, or `{"hang": true}`), and measures
the rollback two ways:

- polled: `GET /v1/rollouts/{id}` every 20 ms until `phase` is `rolled_back` (the time the
  answer arrived);
- server: the `time` of the rollout's `rolled_back` history entry, which the engine records
  after every Envoy ACKed the route that gives the candidate 0 %.

Client-visible errors are the 5xx answers (and connection errors) the load generator saw
from the injection until the fault was cleared, split into those that arrived before and
after the server-side rollback time. For the hang fault no answer fails: the requests sent
to the candidate hang until the fault is cleared, so the table counts the requests that took
longer than 1 s. Between runs the fault is cleared and the bench waits 2 s (1.5 s after an
error storm, which leaves no request behind).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import aiohttp
import plots
from common import percentile, post_json, switchyard_up

MODEL = "llama-3-8b"
SIM = {"sim": {"ttft_ms": 20}}
ANALYSIS = {"interval_seconds": 1, "min_requests": 10, "max_error_rate": 0.05, "failure_limit": 1}
FAULTS = {"error": {"error_rate": 1.0, "status": 500}, "hang": {"hang": True}}
POLL_S = 0.02
SLOW_S = 1.0
WINDOW_FIGURES = ("window_seconds", "requests", "errors", "in_flight")  # of the failing verdict


def model_config(idle_timeout: float | None = None) -> list[dict]:
    versions = [
        {"name": "v1", "weight": 100, "backend": SIM},
        {"name": "v2", "weight": 0, "backend": SIM},
    ]
    model = {"name": MODEL, "versions": versions}
    if idle_timeout is not None:
        model["retries"] = {"idle_timeout_seconds": idle_timeout}
    return [model]


def api(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    if method == "POST":
        status, payload = post_json(url, body or {})
        return status, json.loads(payload or b"null")
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read() or b"null")


class Load:
    """Open-loop completions from a background thread; every answer is kept."""

    def __init__(self, proxy: str, rate: float) -> None:
        self.url = f"{proxy}/v1/completions"
        self.rate = rate
        # (sent, answered, version, status); status 0 = connection error or timeout
        self.results: list[tuple[float, float, str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(40)

    async def _run(self) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=30)
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def one() -> None:
                sent = time.time()
                try:
                    async with session.post(self.url, json=body) as response:
                        await response.read()
                        version = response.headers.get("x-switchyard-version", "?")
                        self.results.append((sent, time.time(), version, response.status))
                except (aiohttp.ClientError, TimeoutError):
                    self.results.append((sent, time.time(), "?", 0))

            tasks: set[asyncio.Task] = set()
            next_at = time.monotonic()
            while not self._stop.is_set():
                task = asyncio.create_task(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                next_at += 1 / self.rate
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if tasks:
                await asyncio.wait(tasks, timeout=30)


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(POLL_S)
    raise SystemExit(f"timed out after {timeout}s waiting for {what}")


def one_run(
    stack, load: Load, candidate: str, fault: str, rng: random.Random, stuck_s: float
) -> dict:
    spec = {
        "model": MODEL, "to": "v2", "strategy": "canary",
        "steps": [{"set_weight": 50}, {"pause": {"seconds": 600}}], "analysis": ANALYSIS,
    }  # fmt: skip
    status, doc = api("POST", f"{stack.admin}/v1/rollouts", spec)
    if status != 201:
        raise SystemExit(f"POST /v1/rollouts: {status} {doc}")
    url = f"{stack.admin}/v1/rollouts/{doc['id']}"
    verdicts: dict[float, str] = {}  # every verdict a poll saw: time -> result

    def poll() -> dict:
        now = api("GET", url)[1]
        if status := now["analysis_status"]:
            verdicts[status["time"]] = status["result"]
        return now

    def healthy():
        now = poll()
        if now["phase"] not in ("progressing", "paused"):
            raise SystemExit(f"rollout ended before the fault: {now['message']}")
        return (now["analysis_status"] or {}).get("result") == "pass"

    wait_for(healthy, 15, "a passing verdict")
    # Verdicts come every interval_seconds: inject at a random phase of that cycle, not
    # always just after the verdict that passed.
    time.sleep(rng.uniform(0, ANALYSIS["interval_seconds"]))
    injected = time.time()
    status, _ = api("POST", f"{candidate}/sim/faults", FAULTS[fault])
    if status != 200:
        raise SystemExit(f"POST /sim/faults: {status}")

    def rolled_back():
        now = poll()
        if now["phase"] == "rolled_back":
            return now, time.time()
        if now["phase"] not in ("progressing", "paused"):
            raise SystemExit(f"rollout ended {now['phase']}: {now['message']}")
        return None

    done, polled = wait_for(rolled_back, 30, "the automatic rollback")
    # The engine sets the phase before it pushes the change and writes the history entry
    # after the ACK, so a GET can see `rolled_back` without that entry yet.
    early = not any(item["event"] == "rolled_back" for item in done["history"])
    if early:
        done = wait_for(
            lambda: (now := api("GET", url)[1])["history"][-1]["event"] == "rolled_back" and now,
            10, "the rolled_back history entry",
        )  # fmt: skip
    time.sleep(0.3)  # answers already on their way arrive
    cleared = time.time()
    req = urllib.request.Request(f"{candidate}/sim/faults", method="DELETE")
    urllib.request.urlopen(req, timeout=10).close()
    # released requests finish, Envoy flushes their stats (an error storm leaves none)
    time.sleep(2.0 if fault == "hang" else 1.5)
    entry = next(item for item in done["history"] if item["event"] == "rolled_back")
    figures = (done["analysis_status"] or {}).get("figures", {}).get("candidate", {})
    server = entry["time"]
    before = [r for r in load.results if injected - 1.0 <= r[0] < injected]
    during = [r for r in load.results if injected <= r[1] and r[0] <= cleared]
    errors = [r for r in during if r[3] >= 500 or r[3] == 0]
    return {
        "polled_s": polled - injected,
        "server_s": server - injected,
        "poll_minus_server_ms": (polled - server) * 1000,
        "early": early,
        "candidate_rps": sum(1 for r in before if r[2] == "v2"),
        "total_rps": len(before),
        "errors_before": sum(1 for r in errors if r[1] <= server),
        "errors_after": sum(1 for r in errors if r[1] > server),
        "slow": sum(1 for r in load.results if r[0] >= injected and r[1] - r[0] > stuck_s),
        "weights": entry["weights"],
        "message": done["message"],
        "window": {key: figures.get(key) for key in WINDOW_FIGURES},
        "injected": injected,
        "server": server,
        "verdicts": sorted(verdicts.items()),
    }


def summary(rows: list[dict], fault: str, stuck_s: float) -> None:
    polled = sorted(row["polled_s"] for row in rows)
    server = sorted(row["server_s"] for row in rows)
    print(f"\nfault {json.dumps(FAULTS[fault])}: {len(rows)} rollbacks, candidate at "
          f"{statistics.mean(r['candidate_rps'] for r in rows):.0f} req/s of "
          f"{statistics.mean(r['total_rps'] for r in rows):.0f} (mean over the 1 s before "
          "each injection)")  # fmt: skip
    print(f"{'fault -> rolled back (s)':<34} {'p50':>6} {'p90':>6} {'max':>6} {'min':>6} "
          f"{'mean':>6}")  # fmt: skip
    for label, values in (
        ("server: history entry (after ACK)", server),
        ("client: GET poll every 20 ms", polled),
    ):
        print(
            f"{label:<34} {percentile(values, 50):6.2f} {percentile(values, 90):6.2f} "
            f"{values[-1]:6.2f} {values[0]:6.2f} {statistics.mean(values):6.2f}"
        )
    gaps = sorted(row["poll_minus_server_ms"] for row in rows)
    early = sum(row["early"] for row in rows)
    print(f"poll - server: min {gaps[0]:.1f} ms, p50 {percentile(gaps, 50):.1f} ms, "
          f"max {gaps[-1]:.1f} ms; {early} of {len(rows)} polls saw rolled_back before its "
          "history entry (before the ACK)")  # fmt: skip
    if fault == "error":
        before = sorted(row["errors_before"] for row in rows)
        after = [row["errors_after"] for row in rows]
        print(f"client-visible 5xx per rollback: p50 {percentile(before, 50)}, "
              f"max {before[-1]}, mean {statistics.mean(before):.1f}; "
              f"after the rollback entry: total {sum(after)} over {len(rows)} runs")  # fmt: skip
    else:
        slow = sorted(row["slow"] for row in rows)
        print(f"requests stuck > {stuck_s:g} s per rollback (held until the fault was cleared): "
              f"p50 {percentile(slow, 50)}, max {slow[-1]}")  # fmt: skip
    reasons = {row["message"].split(" ", 3)[2] for row in rows}
    weights = {json.dumps(row["weights"], sort_keys=True) for row in rows}
    print(f"rollback reasons: {sorted(reasons)}; weights after: {sorted(weights)}")


def plot_run(rows: list[dict], results: list[tuple], rate: float) -> None:
    """The timeline of the median error-storm rollback: answers, verdicts, rollback ACK."""
    row = sorted(rows, key=lambda r: r["server_s"])[len(rows) // 2]
    start, end, width = -2.0, row["server_s"] + 1.5, 0.25
    bins = [start + i * width for i in range(int((end - start) / width))]
    counts = {b: [0, 0, 0] for b in bins}  # answers, 5xx, from the candidate
    for _, answered, version, status in results:
        at = answered - row["injected"]
        if start <= at < bins[-1] + width:
            slot = counts[bins[min(len(bins) - 1, int((at - start) / width))]]
            slot[0] += 1
            slot[1] += status >= 500 or status == 0
            slot[2] += version == "v2"
    errors = [(b, c[1] / width, c[0] / width) for b, c in counts.items()]
    share = [(b + width / 2, c[2] / c[0] * 100) for b, c in counts.items() if c[0]]
    verdicts = [(at - row["injected"], result) for at, result in row["verdicts"]]
    verdicts = [(at, result) for at, result in verdicts if start <= at <= end]
    marks = {"fault injected": 0.0, "candidate at 0 %, ACKed": row["server_s"]}
    plots.rollback_timeline(
        errors, share, verdicts, marks,
        f"automatic rollback (median of {len(rows)} error storms): canary at 50 %, "
        f"{rate:g} req/s, analysis interval_seconds {ANALYSIS['interval_seconds']}",
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="rollbacks on an error storm")
    parser.add_argument("--hang-runs", type=int, default=10, help="rollbacks on a hang")
    parser.add_argument("--rate", type=float, default=50, help="total requests per second")
    parser.add_argument("--seed", type=int, default=1, help="for the injection phases")
    parser.add_argument("--verbose", action="store_true", help="print every run")
    parser.add_argument("--no-plot", action="store_true", help="skip the timeline PNG")
    parser.add_argument(
        "--stats-flush", type=float, default=1.0,
        help="health.stats_flush_seconds: how often Envoy reports (0.25-1)",
    )  # fmt: skip
    parser.add_argument(
        "--idle-timeout", type=float, default=None,
        help="the model's retries.idle_timeout_seconds (default: Switchyard's, 300 s); a "
        "request is counted stuck when it took longer than this + 1 s",
    )  # fmt: skip
    args = parser.parse_args()
    base = {"health": {"stats_flush_seconds": args.stats_flush}}
    stuck_s = args.idle_timeout + 1.0 if args.idle_timeout is not None else SLOW_S

    with (
        tempfile.TemporaryDirectory(prefix="bench-auto-rollback-") as tmp,
        switchyard_up(Path(tmp), model_config(args.idle_timeout), base=base) as stack,
    ):
        model = api("GET", f"{stack.admin}/v1/models/{MODEL}")[1]
        candidate = next(v for v in model["versions"] if v["name"] == "v2")["endpoints"][0]
        results: dict[str, list[dict]] = {}
        rng = random.Random(args.seed)
        with Load(stack.proxy, args.rate) as load:
            time.sleep(1.0)
            for fault, runs in (("error", args.runs), ("hang", args.hang_runs)):
                results[fault] = []
                for index in range(runs):
                    row = one_run(stack, load, candidate, fault, rng, stuck_s)
                    results[fault].append(row)
                    if args.verbose:
                        print(
                            f"{fault} {index + 1:2d}: server {row['server_s']:.3f} s, polled "
                            f"{row['polled_s']:.3f} s, cand {row['candidate_rps']:.0f}/s, "
                            f"5xx {row['errors_before']}+{row['errors_after']}, "
                            f"slow {row['slow']}, window {row['window']}",
                            flush=True,
                        )
    print(
        f"automatic rollback, 1 Envoy flushing stats every {args.stats_flush:g} s, canary at "
        f"50 %, ~{args.rate:g} req/s open-loop load, analysis {json.dumps(ANALYSIS)}, "
        f"retries.idle_timeout_seconds {args.idle_timeout or 'default (300)'}"
    )
    for fault, rows in results.items():
        if rows:
            summary(rows, fault, stuck_s)
    if results["error"] and not args.no_plot:
        plot_run(results["error"], load.results, args.rate)


if __name__ == "__main__":
    main()
