"""Automatic rollback speed: from a fault on the candidate to the candidate at 0 %, ACKed.

    python bench/bench_auto_rollback.py [--runs 20] [--hang-runs 10] [--rate 50] [--adapters]

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

With `--adapters` the same runs are made, side by side in the same stack and under the same
load, on a second model under test (issue 19, docs/lora.md): `support-bot`, whose v1 and v2
are LoRA adapters (`backend: {adapter: {base: lora-base, path: ...}}`) on `lora-base`, a
sim model (`ttft_ms` 20) with `--base-replicas` replicas (2). Its fault is one adapter's:
`POST <each lora-base sim>/sim/faults {"adapter": "support-bot--v2", ...}` (the same error
or hang), cleared with `DELETE <sim>/sim/faults?adapter=support-bot--v2`; v1 and the base
keep serving. The two modes alternate run by run (plain, adapters, adapters, plain, ...),
each with its own random injection phases from the same `--seed`; the load (still
`--rate` req/s in total) is sent to the model of the mode being measured, switched 1 s
before its run.
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
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import plots
from common import percentile, post_json, switchyard_up

MODEL = "llama-3-8b"
SIM = {"sim": {"ttft_ms": 20}}
BASE = "lora-base"  # --adapters: the base model whose sims serve the adapters
ADAPTER_MODEL = "support-bot"  # --adapters: the model whose versions are adapters on BASE
ANALYSIS = {"interval_seconds": 1, "min_requests": 10, "max_error_rate": 0.05, "failure_limit": 1}
FAULTS = {"error": {"error_rate": 1.0, "status": 500}, "hang": {"hang": True}}
POLL_S = 0.02
SLOW_S = 1.0
WINDOW_FIGURES = ("window_seconds", "requests", "errors", "in_flight")  # of the failing verdict


def model_config(
    idle_timeout: float | None = None, adapters: Path | None = None, base_replicas: int = 2
) -> list[dict]:
    """The plain model; with `adapters` (a directory), also the base and the adapter model."""
    versions = [
        {"name": "v1", "weight": 100, "backend": SIM},
        {"name": "v2", "weight": 0, "backend": SIM},
    ]
    models = [{"name": MODEL, "versions": versions}]
    if adapters is not None:
        base = {"name": "v1", "weight": 100, "replicas": base_replicas, "backend": SIM}
        models.append({"name": BASE, "versions": [base]})
        versions = [
            {"name": name, "weight": weight,
             "backend": {"adapter": {"base": BASE, "path": adapter_dir(adapters, name)}}}
            for name, weight in (("v1", 100), ("v2", 0))
        ]  # fmt: skip
        models.append({"name": ADAPTER_MODEL, "versions": versions})
    if idle_timeout is not None:
        for model in models:
            if model["name"] != BASE:
                model["retries"] = {"idle_timeout_seconds": idle_timeout}
    return models


def adapter_dir(root: Path, name: str) -> str:
    """An adapter's directory as the simulator checks it: it holds adapter_config.json."""
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    return str(path)


@dataclass
class Mode:
    """A model under test and where its candidate's fault goes."""

    name: str  # "plain" or "adapters"
    model: str
    sims: list[str]  # the sims the fault is injected into
    adapter: str | None = None  # the candidate's lora name: a per-adapter fault

    def inject(self, fault: str) -> None:
        body = {**({"adapter": self.adapter} if self.adapter else {}), **FAULTS[fault]}
        for url in self.sims:
            status, _ = api("POST", f"{url}/sim/faults", body)
            if status != 200:
                raise SystemExit(f"POST {url}/sim/faults {body}: {status}")

    def clear(self) -> None:
        query = f"?adapter={self.adapter}" if self.adapter else ""
        for url in self.sims:
            req = urllib.request.Request(f"{url}/sim/faults{query}", method="DELETE")
            urllib.request.urlopen(req, timeout=10).close()


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
        self.model = MODEL  # where the requests go; switched between modes
        # (sent, answered, version, status, model); status 0 = connection error or timeout
        self.results: list[tuple[float, float, str, int, str]] = []
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
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def one() -> None:
                sent, model = time.time(), self.model
                body = {"model": model, "prompt": "x", "max_tokens": 2}
                try:
                    async with session.post(self.url, json=body) as response:
                        await response.read()
                        version = response.headers.get("x-switchyard-version", "?")
                        self.results.append((sent, time.time(), version, response.status, model))
                except (aiohttp.ClientError, TimeoutError):
                    self.results.append((sent, time.time(), "?", 0, model))

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


def one_run(stack, load: Load, mode: Mode, fault: str, rng: random.Random, stuck_s: float) -> dict:
    spec = {
        "model": mode.model, "to": "v2", "strategy": "canary",
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
    mode.inject(fault)

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
    mode.clear()
    # released requests finish, Envoy flushes their stats (an error storm leaves none)
    time.sleep(2.0 if fault == "hang" else 1.5)
    entry = next(item for item in done["history"] if item["event"] == "rolled_back")
    figures = (done["analysis_status"] or {}).get("figures", {}).get("candidate", {})
    server = entry["time"]
    results = [r for r in load.results if r[4] == mode.model]
    before = [r for r in results if injected - 1.0 <= r[0] < injected]
    during = [r for r in results if injected <= r[1] and r[0] <= cleared]
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
        "slow": sum(1 for r in results if r[0] >= injected and r[1] - r[0] > stuck_s),
        "weights": entry["weights"],
        "message": done["message"],
        "window": {key: figures.get(key) for key in WINDOW_FIGURES},
        "injected": injected,
        "server": server,
        "verdicts": sorted(verdicts.items()),
    }


def summary(rows: list[dict], fault: str, stuck_s: float, label: str = "") -> None:
    polled = sorted(row["polled_s"] for row in rows)
    server = sorted(row["server_s"] for row in rows)
    print(f"\n{label}fault {json.dumps(FAULTS[fault])}: {len(rows)} rollbacks, candidate at "
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
    for _, answered, version, status, _ in results:
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
    parser.add_argument(
        "--adapters", action="store_true",
        help="also measure a model whose versions are LoRA adapters, run by run alternating "
        "with the plain one (issue 19)",
    )  # fmt: skip
    parser.add_argument(
        "--base-replicas", type=int, default=2,
        help="--adapters: sim replicas of the adapters' base model",
    )  # fmt: skip
    args = parser.parse_args()
    base = {"health": {"stats_flush_seconds": args.stats_flush}}
    stuck_s = args.idle_timeout + 1.0 if args.idle_timeout is not None else SLOW_S
    load_before = Path("/proc/loadavg").read_text().split()[:3]

    with (
        tempfile.TemporaryDirectory(prefix="bench-auto-rollback-") as tmp,
        switchyard_up(
            Path(tmp),
            model_config(
                args.idle_timeout, Path(tmp) / "adapters" if args.adapters else None,
                args.base_replicas,
            ),
            base=base,
        ) as stack,
    ):  # fmt: skip
        model = api("GET", f"{stack.admin}/v1/models/{MODEL}")[1]
        candidate = next(v for v in model["versions"] if v["name"] == "v2")["endpoints"][0]
        modes = [Mode("plain", MODEL, [candidate])]
        if args.adapters:
            modes.append(adapter_mode(stack, args.base_replicas))
        results: dict[str, dict[str, list[dict]]] = {mode.name: {} for mode in modes}
        # each mode its own injection phases, the same for every mode
        rngs = {mode.name: random.Random(args.seed) for mode in modes}
        with Load(stack.proxy, args.rate) as load:
            time.sleep(1.0)
            for fault, runs in (("error", args.runs), ("hang", args.hang_runs)):
                for mode in modes:
                    results[mode.name][fault] = []
                for index in range(runs):
                    # plain, adapters, adapters, plain, ...: one switch of the load per run
                    for mode in modes if index % 2 == 0 else modes[::-1]:
                        if load.model != mode.model:
                            load.model = mode.model
                            time.sleep(1.0)
                        row = one_run(stack, load, mode, fault, rngs[mode.name], stuck_s)
                        results[mode.name][fault].append(row)
                        if args.verbose:
                            print(
                                f"{mode.name + ' ' if args.adapters else ''}{fault} "
                                f"{index + 1:2d}: server {row['server_s']:.3f} s, polled "
                                f"{row['polled_s']:.3f} s, cand {row['candidate_rps']:.0f}/s, "
                                f"5xx {row['errors_before']}+{row['errors_after']}, "
                                f"slow {row['slow']}, window {row['window']}",
                                flush=True,
                            )
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    print(
        f"automatic rollback, 1 Envoy flushing stats every {args.stats_flush:g} s, canary at "
        f"50 %, ~{args.rate:g} req/s open-loop load, analysis {json.dumps(ANALYSIS)}, "
        f"retries.idle_timeout_seconds {args.idle_timeout or 'default (300)'}"
    )
    print(f"load average (1/5/15 min): {' '.join(load_before)} before, "
          f"{' '.join(load_after)} after")  # fmt: skip
    if args.adapters:
        print(f"modes: plain = {MODEL} v1/v2 on their own sims; adapters = {ADAPTER_MODEL} "
              f"v1/v2 LoRA adapters on {BASE} ({args.base_replicas} sims), fault "
              f"{{\"adapter\": \"{modes[1].adapter}\", ...}} on each")  # fmt: skip
    for mode in modes:
        for fault, rows in results[mode.name].items():
            if rows:
                summary(rows, fault, stuck_s, f"[{mode.name}] " if args.adapters else "")
    if args.adapters:
        side_by_side(results, stuck_s)
    plain = results["plain"]
    if plain["error"] and not args.no_plot:
        rows = [r for r in load.results if r[4] == MODEL]
        plot_run(plain["error"], rows, args.rate)


def adapter_mode(stack, replicas: int) -> Mode:
    """The adapter model once both adapters are loaded on every base replica and routed."""

    def loaded():
        versions = api("GET", f"{stack.admin}/v1/models/{ADAPTER_MODEL}")[1]["versions"]
        ready = all(v["ready"] and len(v["endpoints"]) == replicas for v in versions)
        return ready and versions

    versions = wait_for(loaded, 30, f"{ADAPTER_MODEL} v1 and v2 loaded on every {BASE} sim")
    stack.wait_routed(ADAPTER_MODEL)
    base_doc = api("GET", f"{stack.admin}/v1/models/{BASE}")[1]
    sims = sorted(url for v in base_doc["versions"] for url in v["endpoints"])
    v2 = next(v for v in versions if v["name"] == "v2")
    lora = v2["backend"]["adapter"].get("lora_name") or f"{ADAPTER_MODEL}--v2"
    if sorted(v2["endpoints"]) != sims:
        raise SystemExit(f"v2's endpoints {v2['endpoints']} are not {BASE}'s sims {sims}")
    return Mode("adapters", ADAPTER_MODEL, sims, lora)


def side_by_side(results: dict[str, dict[str, list[dict]]], stuck_s: float) -> None:
    """Plain and adapter versions in one table: fault -> rolled back (server), clients."""
    print("\nside by side, server fault -> rolled back (s) and what clients saw")
    print(f"{'fault':<6} {'mode':<9} {'runs':>4} {'p50':>6} {'p90':>6} {'max':>6} {'min':>6} "
          f"{'mean':>6}  clients")  # fmt: skip
    for fault in ("error", "hang"):
        for name, by_fault in results.items():
            rows = by_fault.get(fault) or []
            if not rows:
                continue
            values = sorted(row["server_s"] for row in rows)
            if fault == "error":
                seen = sorted(row["errors_before"] + row["errors_after"] for row in rows)
                clients = f"5xx per rollback p50 {percentile(seen, 50)} max {seen[-1]}"
            else:
                seen = sorted(row["slow"] for row in rows)
                clients = f"stuck > {stuck_s:g} s p50 {percentile(seen, 50)} max {seen[-1]}"
            print(f"{fault:<6} {name:<9} {len(rows):>4} {percentile(values, 50):6.2f} "
                  f"{percentile(values, 90):6.2f} {values[-1]:6.2f} {values[0]:6.2f} "
                  f"{statistics.mean(values):6.2f}  {clients}")  # fmt: skip
            print(
                f"{'':<6} {'':<9} every run: " + " ".join(f"{row['server_s']:.2f}" for row in rows)
            )


if __name__ == "__main__":
    main()
