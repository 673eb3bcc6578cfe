"""Emergency rollback latency, and what clients see while a canary walks under load.

    python bench/bench_rollback.py [--runs 100] [--load-runs 3] [--clients 50]

One `switchyard up` (one Envoy) with two models, each with two sim versions (`itl_ms` 10).

(a) Emergency rollback: a canary (`set_weight` 50, then `pause {}`) is started on both models;
once both are `paused`, `POST /v1/rollback` is timed from send to its 200, which the API
sends only after every Envoy ACKed. Twice: `{"all": true}` (both models in one snapshot) and
`{"model": ...}` (one model; the other rollout is then rolled back untimed). Next to the
client's percentiles, the server's own view from /metrics (deltas around each call): the
admin handler, snapshot builds and RDS push -> ACK.

(b) A full canary under load: `--clients` concurrent streaming chat completions
(aiohttp, SSE, `max_tokens` 10: about 100 ms each) run while a canary goes
10 -> 25 -> 50 -> 75 -> 100 % with 0.5 s pauses. Every request is checked: a failed request
is a non-200 or a connection error; a broken stream is a 200 whose stream has fewer than
`max_tokens` content chunks or no `[DONE]`. Runs alternate direction (v1 -> v2, then back).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
from bench_weights import histogram
from common import follow_rollout, percentile, switchyard_up

MODELS = ("llama-3-8b", "mistral-7b")
MAX_TOKENS = 10
SIM = {"sim": {"itl_ms": 10}}
PAUSED_CANARY = [{"set_weight": 50}, {"pause": {}}]
WALK = [
    {"set_weight": 10}, {"pause": {"seconds": 0.5}}, {"set_weight": 25},
    {"pause": {"seconds": 0.5}}, {"set_weight": 50}, {"pause": {"seconds": 0.5}},
    {"set_weight": 75}, {"pause": {"seconds": 0.5}}, {"set_weight": 100},
]  # fmt: skip
SERVER = {
    "admin": ("switchyard_admin_request_seconds", 'route="/v1/rollback"'),
    "build": ("switchyard_snapshot_build_seconds", ""),
    "ack": ("switchyard_xds_push_ack_seconds", 'type="rds"'),
}


def model_config() -> list[dict]:
    return [
        {
            "name": name,
            "versions": [
                {"name": "v1", "weight": 100, "backend": SIM},
                {"name": "v2", "weight": 0, "backend": SIM},
            ],
        }
        for name in MODELS
    ]


class Admin:
    """JSON calls over one keep-alive connection."""

    def __init__(self, hostport: str) -> None:
        self.connection = http.client.HTTPConnection(hostport, timeout=30)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        payload = json.dumps(body) if body is not None else None
        self.connection.request(method, path, payload, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        return response.status, json.loads(response.read() or b"null")

    def close(self) -> None:
        self.connection.close()


def start_canary(admin: Admin, model: str, to: str, steps: list[dict]) -> str:
    spec = {"model": model, "to": to, "strategy": "canary", "steps": steps}
    status, doc = admin.call("POST", "/v1/rollouts", spec)
    if status != 201:
        raise SystemExit(f"POST /v1/rollouts: {status} {doc}")
    return doc["id"]


def wait_phase(admin: Admin, rollout_id: str, phases: tuple[str, ...], timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = admin.call("GET", f"/v1/rollouts/{rollout_id}")[1]
        if doc["phase"] in phases:
            return doc
        time.sleep(0.005)
    raise SystemExit(f"rollout {rollout_id} not {phases} after {timeout}s: {doc}")


def server_view(admin_url: str) -> dict:
    return {key: histogram(admin_url, *query) for key, query in SERVER.items()}


def add_delta(total: dict, before: dict, after: dict) -> None:
    for key in SERVER:
        for field in ("sum", "count"):
            total[(key, field)] += after[key][field] - before[key][field]


def timed_rollbacks(stack, admin: Admin, runs: int, warmup: int, scope: str):
    """Milliseconds per POST /v1/rollback (sorted), and the server-side sums over the runs."""
    took: list[float] = []
    server: Counter = Counter()
    for index in range(warmup + runs):
        ids = [start_canary(admin, model, "v2", PAUSED_CANARY) for model in MODELS]
        for rollout_id in ids:
            wait_phase(admin, rollout_id, ("paused",))
        target = MODELS[index % len(MODELS)]
        body = {"all": True} if scope == "all" else {"model": target}
        before = server_view(stack.admin)
        started = time.perf_counter()
        status, answer = admin.call("POST", "/v1/rollback", body)
        elapsed = (time.perf_counter() - started) * 1000
        after = server_view(stack.admin)
        if status != 200:
            raise SystemExit(f"POST /v1/rollback {body}: {status} {answer}")
        for model in answer["models"]:
            weights = {version["name"]: version["weight"] for version in model["versions"]}
            if weights != {"v1": 100, "v2": 0}:
                raise SystemExit(f"rollback left {model['name']} at {weights}")
        if scope == "model":  # the other model's canary, untimed
            other = next(model for model in MODELS if model != target)
            status, answer = admin.call("POST", "/v1/rollback", {"model": other})
            if status != 200:
                raise SystemExit(f"POST /v1/rollback: {status} {answer}")
        for rollout_id in ids:
            wait_phase(admin, rollout_id, ("aborted",))
        if index >= warmup:
            took.append(elapsed)
            add_delta(server, before, after)
    return sorted(took), server


# -- (b) streaming clients during a canary ------------------------------------------------------


class StreamLoad:
    """`clients` closed-loop streaming chat completions; every outcome is counted."""

    def __init__(self, proxy: str, model: str, clients: int) -> None:
        self.url = f"{proxy}/v1/chat/completions"
        self.body = {
            "model": model, "stream": True, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": "Say hello."}],
        }  # fmt: skip
        self.clients = clients
        self.stopping = False
        self.outcomes: Counter = Counter()  # ok / failed / broken
        self.versions: Counter = Counter()
        self.problems: list[str] = []

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(self._client(session) for _ in range(self.clients)))

    async def _client(self, session: aiohttp.ClientSession) -> None:
        while not self.stopping:
            outcome, detail = await self._one(session)
            self.outcomes[outcome] += 1
            if outcome != "ok" and len(self.problems) < 10:
                self.problems.append(detail)

    async def _one(self, session: aiohttp.ClientSession) -> tuple[str, str]:
        try:
            async with session.post(self.url, json=self.body) as response:
                version = response.headers.get("x-switchyard-version", "?")
                if response.status != 200:
                    text = (await response.read())[:200]
                    return "failed", f"{response.status} from {version}: {text!r}"
                tokens, done = 0, False
                async for line in response.content:
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        done = True
                        continue
                    choices = json.loads(data).get("choices") or [{}]
                    if choices[0].get("delta", {}).get("content"):
                        tokens += 1
                self.versions[version] += 1
                if tokens < MAX_TOKENS or not done:
                    return "broken", f"{version}: {tokens} tokens, [DONE] {done}"
                return "ok", ""
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return "failed", f"{type(exc).__name__}: {exc}"


async def canary_under_load(stack, model: str, source: str, to: str, clients: int) -> dict:
    load = StreamLoad(stack.proxy, model, clients)
    runner = asyncio.create_task(load.run())
    async with aiohttp.ClientSession() as admin:
        await asyncio.sleep(1.0)
        spec = {"model": model, "to": to, "strategy": "canary", "steps": WALK}
        started = time.monotonic()
        doc = await follow_rollout(admin, stack.admin, spec, poll=0.02)
        walked = time.monotonic() - started
        await asyncio.sleep(1.0)
    load.stopping = True
    await runner
    if doc["phase"] != "succeeded":
        raise SystemExit(f"canary ended {doc['phase']}: {doc['message']}")
    seconds = walked + 2.0
    total = sum(load.outcomes.values())
    return {
        "direction": f"{source}->{to}",
        "canary_s": walked,
        "requests": total,
        "rps": total / seconds,
        "failed": load.outcomes["failed"],
        "broken": load.outcomes["broken"],
        "versions": dict(sorted(load.versions.items())),
        "problems": load.problems,
    }


def print_rollbacks(results: dict, runs: int) -> None:
    print(f"\n(a) POST /v1/rollback -> 200 (after every Envoy ACKed), 1 Envoy, "
          f"{len(MODELS)} models x 2 versions, {runs} runs each (ms)")  # fmt: skip
    print(f"{'body':<24} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} {'mean':>7}   "
          f"server means: {'admin':>6} {'build':>6} {'rds ack':>7} {'builds':>6}")  # fmt: skip
    for scope, (ms, server) in results.items():
        label = '{"all": true}' if scope == "all" else '{"model": ...}'
        count = server[("admin", "count")] or 1
        mean = {key: server[(key, "sum")] / count * 1000 for key in SERVER}
        builds = server[("build", "count")] / count
        print(
            f"{label:<24} {percentile(ms, 50):7.2f} {percentile(ms, 90):7.2f} "
            f"{percentile(ms, 99):7.2f} {ms[-1]:7.2f} {sum(ms) / len(ms):7.2f}   "
            f"{'':14}{mean['admin']:6.2f} {mean['build']:6.2f} {mean['ack']:7.2f} {builds:6.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="timed rollbacks per body")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rollbacks first")
    parser.add_argument("--load-runs", type=int, default=3, help="canaries under load")
    parser.add_argument("--clients", type=int, default=50, help="concurrent streaming clients")
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="bench-rollback-") as tmp,
        switchyard_up(Path(tmp), model_config()) as stack,
    ):
        for model in MODELS[1:]:
            stack.wait_routed(model)
        admin = Admin(stack.config["listen"]["admin"])
        try:
            results = {
                scope: timed_rollbacks(stack, admin, args.runs, args.warmup, scope)
                for scope in ("all", "model")
            }
        finally:
            admin.close()
        print_rollbacks(results, args.runs)

        print(f"\n(b) {args.clients} streaming clients (max_tokens {MAX_TOKENS}, itl 10 ms) "
              "during a canary 10/25/50/75/100 % with 0.5 s pauses")  # fmt: skip
        print(f"{'run':>3} {'direction':<9} {'canary s':>8} {'requests':>8} {'req/s':>6} "
              f"{'failed':>6} {'broken':>6}  served by")  # fmt: skip
        source, to = "v1", "v2"
        for run in range(1, args.load_runs + 1):
            row = asyncio.run(canary_under_load(stack, MODELS[0], source, to, args.clients))
            print(
                f"{run:3d} {row['direction']:<9} {row['canary_s']:8.2f} {row['requests']:8d} "
                f"{row['rps']:6.0f} {row['failed']:6d} {row['broken']:6d}  {row['versions']}"
            )
            for problem in row["problems"]:
                print(f"      {problem}")
            source, to = to, source


if __name__ == "__main__":
    main()
