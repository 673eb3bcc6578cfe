"""Soak: hours of rollouts, rollbacks and dying backends leave the controller flat.

    python bench/bench_soak.py                # one hour, a rollout and a rollback a minute
    python bench/bench_soak.py --short        # 5 minutes, one cycle every 20 s
    python bench/bench_soak.py --minutes 180 --cycle 60 --rate 30

One `switchyard up` (one Envoy), `llama-3-8b` with two sim versions (`ttft_ms` 20, parked
with sleep level 1 after a rollout: the default). A background thread sends `--rate`
non-streaming completions per second through Envoy, open loop (a new request every 1/rate s
whatever the others do). Every `--cycle` seconds:

- a canary from the model's stable to the other version (`set_weight` 20, pause 2 s, 60,
  pause 2 s, 100) with an analysis (`max_error_rate` 0.5), which parks the old stable once
  it succeeds;
- half a cycle later, an emergency rollback (`POST /v1/rollback`), which wakes the parked
  version and sends it all the traffic again (and aborts the canary if it is still running);
- at a random moment of the cycle, one serving backend process (a version in state
  `active`) is killed with SIGKILL; the local runtime restarts it.

Every 5 s the controller process (not its children) is sampled: resident memory (VmRSS),
open file descriptors (/proc/<pid>/fd), threads, and its asyncio tasks
(`switchyard_asyncio_tasks` from /metrics). Growth is measured from the end of a warm-up
(two cycles) to the end, and as a least-squares slope per hour over the same span.

Requests lost: answers that are not 2xx, and connection errors or timeouts (30 s). The
documented case (docs/reliability.md): a backend that dies takes its version's requests with
it until the runtime has restarted it and it is back in EDS, when no other version can
answer them. A failed request counts under it when it was in flight between a kill and one
second after the killed version was ready again; every other failure is lost outside the
documented cases, and is listed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import statistics
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from common import post_json, switchyard_up

MODEL = "llama-3-8b"
SIM = {"sim": {"ttft_ms": 20}}
STEPS = [{"set_weight": 20}, {"pause": {"seconds": 2}}, {"set_weight": 60},
         {"pause": {"seconds": 2}}, {"set_weight": 100}]  # fmt: skip
ANALYSIS = {"interval_seconds": 1, "min_requests": 5, "max_error_rate": 0.5}
SAMPLE_S = 5.0
KILL_GRACE_S = 1.0  # after the killed version is ready again: EDS push and health check


def api(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    if method == "POST":
        status, payload = post_json(url, body or {}, timeout=30)
        return status, _json(payload)
    with urllib.request.urlopen(urllib.request.Request(url), timeout=10) as response:
        return response.status, _json(response.read())


def _json(payload: bytes):
    return json.loads(payload) if payload else None


class Load:
    """Open-loop completions from a background thread; every answer is kept."""

    def __init__(self, proxy: str, rate: float) -> None:
        self.url = f"{proxy}/v1/completions"
        self.rate = rate
        self.results: list[tuple[float, float, int]] = []  # (sent, answered, status); 0 = error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def one() -> None:
                sent = time.time()
                try:
                    async with session.post(self.url, json=body) as response:
                        await response.read()
                        self.results.append((sent, time.time(), response.status))
                except (aiohttp.ClientError, TimeoutError):
                    self.results.append((sent, time.time(), 0))

            tasks: set[asyncio.Task] = set()
            next_at = time.monotonic()
            while not self._stop.is_set():
                task = asyncio.create_task(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                next_at += 1 / self.rate
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if tasks:
                await asyncio.wait(tasks, timeout=35)


@dataclass
class Kill:
    at: float
    version: str
    ready_again: float | None = None


@dataclass
class Soak:
    admin: str
    pid: int
    state_dir: Path
    rng: random.Random
    kills: list[Kill] = field(default_factory=list)
    samples: list[tuple[float, float, int, int, int]] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)  # rollout phases, rollbacks
    problems: list[str] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)  # what the soak did, when
    kill_at: float | None = None  # when this cycle's backend dies

    def sample(self) -> None:
        """(time, RSS MB, open fds, threads, asyncio tasks) of the controller process."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
        threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        with urllib.request.urlopen(f"{self.admin}/metrics", timeout=10) as response:
            text = response.read().decode()
        tasks = int(float(re.search(r"^switchyard_asyncio_tasks (\S+)$", text, re.M).group(1)))
        self.samples.append((time.time(), rss, fds, threads, tasks))

    def versions(self) -> dict[str, dict]:
        return {v["name"]: v for v in api("GET", f"{self.admin}/v1/models/{MODEL}")[1]["versions"]}

    def count(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1

    def rollout(self, deadline: float) -> None:
        """A canary to the version that is not stable; followed until it ends or `deadline`."""
        model = api("GET", f"{self.admin}/v1/models/{MODEL}")[1]
        target = next(v["name"] for v in model["versions"] if v["name"] != model["stable"])
        spec = {"model": MODEL, "to": target, "strategy": "canary", "steps": STEPS,
                "analysis": ANALYSIS}  # fmt: skip
        status, doc = api("POST", f"{self.admin}/v1/rollouts", spec)
        self.events.append((time.time(), f"rollout to {target}: {status}"))
        if status != 201:
            self.problems.append(f"{time.strftime('%H:%M:%S')} POST /v1/rollouts: {status} {doc}")
            self.count("refused")
            return
        while doc["phase"] in ("progressing", "paused") and time.time() < deadline:
            self.wait(0.25)
            doc = api("GET", f"{self.admin}/v1/rollouts/{doc['id']}")[1]
        self.count(doc["phase"])
        self.events.append((time.time(), f"rollout {doc['phase']}: {doc['message']}"))
        if doc["phase"] not in ("succeeded", "rolled_back"):
            self.problems.append(
                f"{time.strftime('%H:%M:%S')} rollout {doc['id']} still {doc['phase']} "
                f"after {time.time() - doc['created_at']:.0f}s: {doc['message']}"
            )

    def rollback(self) -> None:
        status, body = api("POST", f"{self.admin}/v1/rollback", {"model": MODEL})
        self.events.append((time.time(), f"rollback: {status}"))
        self.count("rollback" if status == 200 else f"rollback_{status}")
        if status != 200:
            self.problems.append(f"{time.strftime('%H:%M:%S')} POST /v1/rollback: {status} {body}")

    def kill_one(self) -> None:
        """SIGKILL one backend of a version that is serving."""
        active = [name for name, v in self.versions().items() if v["state"] == "active"]
        if not active:
            return
        version = self.rng.choice(active)
        pid_file = self.state_dir / "pids" / f"sim-{MODEL}@{version}.pid"
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            return
        self.kills.append(Kill(time.time(), version))
        self.events.append((time.time(), f"killed {version}"))

    def wait(self, seconds: float) -> None:
        """Sleep `seconds`, sampling, killing at `kill_at` and noting when killed versions
        are ready again."""
        end = time.time() + seconds
        while True:
            if self.kill_at is not None and time.time() >= self.kill_at:
                self.kill_at = None
                self.kill_one()
            pending = [k for k in self.kills if k.ready_again is None]
            if pending:
                versions = self.versions()
                for kill in pending:
                    if time.time() - kill.at > 1.0 and versions[kill.version]["ready"]:
                        kill.ready_again = time.time()
            if not self.samples or time.time() - self.samples[-1][0] >= SAMPLE_S:
                self.sample()
            if time.time() >= end:
                return
            time.sleep(min(0.25, max(0.0, end - time.time())))


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (time, value) points, per hour."""
    if len(points) < 2:
        return 0.0
    mean_t = statistics.fmean(t for t, _ in points)
    mean_v = statistics.fmean(v for _, v in points)
    var = sum((t - mean_t) ** 2 for t, _ in points)
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 3600 if var else 0.0


def report(soak: Soak, results: list[tuple[float, float, int]], args, started: float) -> None:
    warm = started + 2 * args.cycle
    kept = [s for s in soak.samples if s[0] >= warm] or soak.samples
    print(f"soak: {args.minutes:g} min, a cycle every {args.cycle:g} s (canary, rollback, one "
          f"backend killed), ~{args.rate:g} req/s open-loop; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    print(f"\n{'minute':>6} {'RSS MB':>7} {'fds':>5} {'threads':>7} {'tasks':>6}")
    shown = -1
    for at, rss, fds, threads, tasks in soak.samples:
        minute = int((at - started) // 60)
        if minute != shown:
            print(f"{minute:6d} {rss:7.1f} {fds:5d} {threads:7d} {tasks:6d}")
            shown = minute
    first, last = kept[0], kept[-1]
    print(f"\nafter the warm-up ({2 * args.cycle:g} s) to the end, {len(kept)} samples:")
    for index, label in ((1, "RSS MB"), (2, "open fds"), (3, "threads"), (4, "asyncio tasks")):
        values = [s[index] for s in kept]
        slope = slope_per_hour([(s[0], s[index]) for s in kept])
        print(f"  {label:<14} start {first[index]:8.1f}  end {last[index]:8.1f}  "
              f"min {min(values):8.1f}  max {max(values):8.1f}  slope {slope:+8.1f}/hour")
    kills = soak.kills
    windows = [(k.at, (k.ready_again or time.time()) + KILL_GRACE_S, k) for k in kills]
    failed = [r for r in results if not 200 <= r[2] < 300]
    documented = [r for r in failed if any(r[0] <= end and r[1] >= at for at, end, _ in windows)]
    other = [r for r in failed if r not in documented]
    print(f"\nrequests: {len(results)} sent, {len(results) - len(failed)} answered 2xx, "
          f"{len(failed)} failed")  # fmt: skip
    per_kill = [sum(1 for r in documented if r[0] <= end and r[1] >= at) for at, end, _ in windows]
    downtime = [(k.ready_again - k.at) for k in kills if k.ready_again]
    print(f"  backend killed: {len(kills)} times ({', '.join(sorted({k.version for k in kills}))}"
          f"), back in EDS after p50 {statistics.median(downtime) if downtime else 0:.2f} s; "
          f"failed while a killed version was down (documented): {len(documented)} "
          f"(per kill: max {max(per_kill, default=0)}, "
          f"{sum(1 for n in per_kill if n == 0)} kills cost none)")  # fmt: skip
    print(f"  failed outside the documented cases: {len(other)}")
    for bunch in _bunches(sorted(other)):
        first, last = bunch[0][0], max(r[1] for r in bunch)
        statuses = sorted({r[2] for r in bunch})
        print(f"    {len(bunch)} sent {_clock(first)}-{_clock(bunch[-1][0])}, answered by "
              f"{_clock(last)}, status {statuses}; what the soak did around then:")
        for at, what in soak.events:
            if first - 15 <= at <= last + 5:
                print(f"      {_clock(at)} {what}")
    print(f"\ncycles: {soak.outcomes}")
    for problem in soak.problems[:20]:
        print(f"  {problem}")


def _bunches(failed: list[tuple[float, float, int]]) -> list[list[tuple[float, float, int]]]:
    """Failures grouped by time: a gap of more than 5 s starts a new group."""
    groups: list[list[tuple[float, float, int]]] = []
    for result in failed:
        if groups and result[0] - groups[-1][-1][0] <= 5:
            groups[-1].append(result)
        else:
            groups.append([result])
    return groups


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at % 1 * 1000):03d}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--cycle", type=float, default=60, help="seconds per rollout+rollback")
    parser.add_argument("--rate", type=float, default=20, help="requests per second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--short", action="store_true", help="5 minutes, a cycle every 20 s")
    args = parser.parse_args()
    if args.short:
        args.minutes, args.cycle = 5, 20
    versions = [{"name": "v1", "weight": 100, "backend": SIM},
                {"name": "v2", "weight": 0, "backend": SIM}]  # fmt: skip
    with (
        tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp,
        switchyard_up(Path(tmp), [{"name": MODEL, "versions": versions}]) as stack,
    ):
        soak = Soak(stack.admin, stack.process.pid, Path(stack.config["state_dir"]),
                    random.Random(args.seed))  # fmt: skip
        with Load(stack.proxy, args.rate) as load:
            started = time.time()
            end = started + args.minutes * 60
            while time.time() + args.cycle <= end + 0.5:
                cycle_start = time.time()
                soak.kill_at = cycle_start + soak.rng.uniform(0, args.cycle)
                soak.rollout(deadline=cycle_start + args.cycle / 2)
                soak.wait(cycle_start + args.cycle / 2 - time.time())
                soak.rollback()
                soak.wait(cycle_start + args.cycle - time.time())
            soak.wait(2.0)  # the last answers and a last sample
        kept = Path(tempfile.gettempdir()) / f"bench-soak-{time.strftime('%Y%m%d-%H%M%S')}"
        kept.mkdir()
        for log in [stack.log_path, *Path(stack.config["state_dir"]).glob("**/*.log")]:
            shutil.copy(log, kept / log.name)
    report(soak, load.results, args, started)
    print(f"\nthe stack's logs: {kept}")


if __name__ == "__main__":
    main()
