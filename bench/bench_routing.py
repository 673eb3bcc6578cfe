"""Inference-aware routing inside a version: round robin, least request and prefix-aware picking,
side by side on the same multi-turn workloads (issue 18).

    python bench/bench_routing.py                       # both workloads, the three modes,
                                                        # a picker kill, a 20 % canary
    python bench/bench_routing.py --rate 20 --seconds 60 --workloads rag
    python bench/bench_routing.py --modes pa --transports http,grpc,http,grpc --no-kill \
        --no-canary                                     # Envoy -> picker over HTTP vs gRPC

One `switchyard up` runs three models of one version each with `--replicas` simulated
replicas (default 4), identical but for `routing`: `rr` (round_robin), `lr` (least_request),
`pa` (prefix_aware, plus a 2-replica v2 at 0 % for the canary). The simulators behave like an
8B model on a 24 GB GPU: time to first token = 10 ms + 0.1 ms per uncached prompt token,
prefills taking turns on each replica, a prefix cache of 32,768 tokens (about a third of the
chats' prefixes fit in one replica, all of them in four).

Workloads, open loop at `--rate` requests per second (Poisson arrivals, the same seeded
schedule and texts for every mode): `--conversations` chats are active at once; an arrival
is the next turn of a random idle one (each turn resends the whole history and waits for the
answer); a chat ends after `--turns` turns and a new one takes its place.
- `shared`: every chat starts with the same 1,000-word system prompt;
- `rag`: every chat starts with its own 1,200-1,600-word document (retrieval-augmented chat).
Questions are 40-120 words, answers 48 tokens; a token is a word for the simulator's counts.

Measured per mode: time to first token p50/p90 (streamed, to the first byte of the stream),
completed requests/s, failures, the engines' prefix-cache hit rate (vLLM counters of the
model's replicas), and for `pa` the time Envoy waited for the picker per request (Envoy's own
ext_proc timing, from `proxy.access_log`) and the picker's CPU per request (/proc). With
`--kill`, the picker is SIGKILLed halfway through the last `pa` run (its failures are
counted). Then (unless `--no-canary`) the `shared` workload runs again on `pa`, twice as
long, during a canary at 20 %: the share v2 served, and each version's hit rate.

`--transports` (default `http`, the default of `picker.transport`): how Envoy asks the
picker; with several (e.g. `http,grpc,http,grpc`), a fresh stack runs everything for each,
one after the other, so the transports are compared in one run. `--engines` (default
`auto`): `picker.engine` likewise (`native,python`: a stack of each, for every transport).

Not a test: nothing fails on a missed goal; the load average is printed first and last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from common import cpu_seconds, percentile, switchyard_up

MODES = {"rr": "round_robin", "lr": "least_request", "pa": "prefix_aware"}
ANSWER_TOKENS = 48  # each answer joins the history the next turn resends
# An 8B model on a 24 GB GPU: ~10,000 prefill tokens/s, ~32K tokens of KV cache left beside
# the weights, so one replica holds about a third of the chats' prefixes, the four together
# all of them.
CACHE_TOKENS = 32768
SIM = {"ttft_ms": 10, "itl_ms": 0, "prefill_ms_per_token": 0.1, "max_tokens_default": 16,
       "kv_cache_tokens": CACHE_TOKENS}  # fmt: skip
VOCABULARY = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ta", "ve", "zo")
              for b in ("ra", "den", "pix", "mol", "ust", "fen", "gor", "bly")]  # fmt: skip


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(VOCABULARY) + str(rng.randrange(100)) for _ in range(count))


@dataclass
class Chat:
    """One conversation: its messages so far, resent whole at every turn."""

    messages: list[dict]
    rng: random.Random
    turns_left: int
    busy: bool = False

    def next_question(self) -> None:
        question = words(self.rng, self.rng.randint(40, 120))
        self.messages.append({"role": "user", "content": question})


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)  # version -> requests
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Workload:
    """A seeded stream of chats of one kind: the same for every mode."""

    def __init__(self, kind: str, seed: int, turns: int) -> None:
        self.kind, self.seed, self.turns = kind, seed, turns
        self.system = words(random.Random(seed), 1000)
        self.created = 0

    def new_chat(self) -> Chat:
        rng = random.Random(self.seed * 1_000_003 + self.created)
        self.created += 1
        if self.kind == "shared":
            messages = [{"role": "system", "content": self.system},
                        {"role": "user", "content": words(rng, rng.randint(40, 80))}]  # fmt: skip
        else:
            document = words(rng, rng.randint(1200, 1600))
            messages = [{"role": "system", "content": "Answer from the document."},
                        {"role": "user", "content": f"Document: {document}\nQuestion: "
                                                    + words(rng, 30)}]  # fmt: skip
        return Chat(messages, rng, self.turns)


async def run_load(proxy: str, model: str, workload: Workload, rate: float, seconds: float,
                   conversations: int, on_half=None) -> Result:  # fmt: skip
    """Open-loop turns at `rate`/s for `seconds`; every turn streamed, TTFT measured."""
    result = Result()
    arrivals = random.Random(workload.seed)
    chats = [workload.new_chat() for _ in range(conversations)]
    pending: set[asyncio.Task] = set()
    url = f"{proxy}/v1/chat/completions"

    async def turn(session: aiohttp.ClientSession, slot: int) -> None:
        chat = chats[slot]
        chat.busy = True
        body = {"model": model, "messages": chat.messages, "max_tokens": ANSWER_TOKENS,
                "stream": True}  # fmt: skip
        started = time.perf_counter()
        try:
            async with session.post(url, json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"{response.status} {(await response.text())[:200]}")
                first = await response.content.readline()
                result.ttft.append(time.perf_counter() - started)
                text = [first.decode()]
                async for line in response.content:
                    text.append(line.decode())
                version = response.headers.get("x-switchyard-version", "?")
                result.served[version] = result.served.get(version, 0) + 1
            answer = "".join(
                json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                for line in "".join(text).splitlines()
                if line.startswith("data: {") and '"choices":[{' in line
            )
            chat.messages.append({"role": "assistant", "content": answer})
            chat.turns_left -= 1
        except Exception as exc:  # a benchmark counts failures, whatever they are
            result.failed += 1
            result.errors.append(repr(exc)[:200])
        if chat.turns_left <= 0:
            chats[slot] = workload.new_chat()
        else:
            chat.next_question()
        chats[slot].busy = False

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        next_at, halved = start, on_half is None
        while next_at - start < seconds:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if not halved and next_at - start >= seconds / 2:
                halved = True
                on_half()
            idle = [slot for slot, chat in enumerate(chats) if not chat.busy]
            if idle:
                task = asyncio.create_task(turn(session, arrivals.choice(idle)))
                pending.add(task)
                task.add_done_callback(pending.discard)
            next_at += arrivals.expovariate(rate)
        await asyncio.gather(*pending)
        result.seconds = loop.time() - start
    return result


def endpoints(admin: str, model: str) -> dict[str, list[str]]:
    """version -> its replicas' base URLs."""
    with urllib.request.urlopen(f"{admin}/v1/models/{model}", timeout=10) as response:
        doc = json.load(response)
    return {version["name"]: version["endpoints"] for version in doc["versions"]}


def prefix_counters(urls: list[str]) -> tuple[float, float]:
    """(hits, queries) of vLLM's prefix cache, summed over servers."""
    hits = queries = 0.0
    for url in urls:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("vllm:prefix_cache_hits_total"):
                    hits += float(line.rsplit(" ", 1)[1])
                elif line.startswith("vllm:prefix_cache_queries_total"):
                    queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


def picker_waits(access_log: Path, model: str, since: int) -> list[float]:
    """Microseconds Envoy waited for the picker, per request of `model`, from byte `since`."""
    waits = []
    with open(access_log, "rb") as log:
        log.seek(since)
        for line in log:
            entry = json.loads(line)
            if entry.get("model") == model and entry.get("picker_us") not in (None, "", "-"):
                waits.append(float(entry["picker_us"]))
    return waits


def picker_histogram(admin: str) -> dict[float, float]:
    """The picker's own time per request (switchyard_picker_pick_seconds): bucket -> count."""
    buckets = {}
    with urllib.request.urlopen(f"{admin}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("switchyard_picker_pick_seconds_bucket{"):
                bound = line.split('le="', 1)[1].split('"', 1)[0]
                buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
    return buckets


def histogram_quantiles(before: dict[float, float], after: dict[float, float]) -> str:
    """p50/p99 of the requests between two readings, as the bucket bounds they fall under."""
    counts = {bound: after[bound] - before.get(bound, 0.0) for bound in sorted(after)}
    total = counts.get(float("inf"), 0.0)
    if not total:
        return "-"

    def quantile(q: float) -> str:
        bound = next(b for b, count in counts.items() if count >= q * total)
        return "inf" if bound == float("inf") else f"<={bound * 1e6:.0f}"

    return f"{quantile(0.5)} / {quantile(0.99)}"


def size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def show_row(name: str, result: Result, hit_rate: float, extra: str = "") -> None:
    ttft = sorted(result.ttft)
    done = len(ttft)
    p50 = percentile(ttft, 50) * 1000 if ttft else float("nan")
    p90 = percentile(ttft, 90) * 1000 if ttft else float("nan")
    print(f"  {name:<14} {p50:>9.0f} {p90:>9.0f} {done / result.seconds:>8.1f} "
          f"{result.failed:>7} {hit_rate:>9.1%}  {extra}", flush=True)  # fmt: skip


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=24.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=45.0, help="per mode and workload")
    parser.add_argument("--conversations", type=int, default=32, help="chats active at once")
    parser.add_argument("--turns", type=int, default=12, help="turns per chat")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--workloads", default="shared,rag")
    parser.add_argument("--modes", default="rr,lr,pa")
    parser.add_argument("--no-kill", dest="kill", action="store_false",
                        help="do not kill the picker during the last prefix-aware run")
    parser.add_argument("--no-canary", dest="canary", action="store_false")
    parser.add_argument("--transports", default="http",
                        help="picker.transport of each stack, in turn: http, grpc or a list")
    parser.add_argument("--engines", default="auto",
                        help="picker.engine of each stack: auto, native, python or a list")
    args = parser.parse_args()
    transports, engines = args.transports.split(","), args.engines.split(",")
    if not set(transports) <= {"http", "grpc"}:
        parser.error(f"--transports: http or grpc, got {args.transports!r}")
    if not set(engines) <= {"auto", "native", "python"}:
        parser.error(f"--engines: auto, native or python, got {args.engines!r}")

    modes = args.modes.split(",")
    models = [{"name": mode, "routing": MODES[mode], "versions": [
        {"name": "v1", "weight": 100, "replicas": args.replicas, "backend": {"sim": SIM}}]}
        for mode in modes]  # fmt: skip
    if "pa" in modes and args.canary:
        models[modes.index("pa")]["versions"].append(
            {"name": "v2", "weight": 0, "replicas": 2, "backend": {"sim": SIM}})
    print(f"bench_routing: {args.replicas} replicas per model, {args.rate:g} req/s open loop, "
          f"{args.seconds:g} s per run, {args.conversations} chats of {args.turns} turns; "
          f"load average {load_average()}", flush=True)  # fmt: skip
    for transport in transports:
        for engine in engines:
            print(f"\n== picker.transport: {transport}, engine: {engine} (load average "
                  f"{load_average()})", flush=True)  # fmt: skip
            run_stack(args, modes, models, transport, engine)
    print(f"\nload average at the end {load_average()}")


def run_stack(args, modes: list[str], models: list[dict], transport: str, engine: str) -> None:
    """One `switchyard up`: every workload in every mode, then the canary."""
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        access_log = Path(tmp) / "access.log"
        base = {"proxy": {"access_log": str(access_log)},
                "picker": {"cache_tokens": CACHE_TOKENS, "transport": transport,
                           "engine": engine}}  # fmt: skip
        with switchyard_up(Path(tmp), models, base=base, timeout=120) as stack:
            pids = Path(stack.config["state_dir"]) / "pids"
            for mode in modes:
                stack.wait_routed(mode)
            header = (f"  {'routing':<14} {'TTFT p50':>9} {'TTFT p90':>9} {'req/s':>8} "
                      f"{'failed':>7} {'prefix hit':>9}  picker: Envoy's wait p50/p99 (us), "
                      "its own time p50/p99 (us), CPU/request (us)")  # fmt: skip
            workloads = args.workloads.split(",")
            for index, kind in enumerate(workloads):
                print(f"\nworkload {kind} (load average {load_average()})\n{header}", flush=True)
                for mode in modes:
                    workload = Workload(kind, seed=1 + index, turns=args.turns)
                    urls = endpoints(stack.admin, mode)["v1"]
                    hits0, queries0 = prefix_counters(urls)
                    log_at = size(access_log)
                    picker_pid = int((pids / "picker.pid").read_text()) if mode == "pa" else 0
                    cpu0 = cpu_seconds(picker_pid) if picker_pid else 0.0
                    kill = None
                    if mode == "pa" and args.kill and index == len(workloads) - 1:
                        def kill(pid=picker_pid):
                            os.kill(pid, signal.SIGKILL)
                            print("    (picker killed: SIGKILL)", flush=True)
                    own0 = picker_histogram(stack.admin) if mode == "pa" else {}
                    result = asyncio.run(run_load(stack.proxy, mode, workload, args.rate,
                                                  args.seconds, args.conversations,
                                                  kill))  # fmt: skip
                    hits, queries = prefix_counters(urls)
                    rate = (hits - hits0) / max(1.0, queries - queries0)
                    extra = ""
                    if mode == "pa":
                        waits = sorted(picker_waits(access_log, mode, log_at))
                        # A killed picker's histogram starts again from zero: no figure.
                        own = "-" if kill else histogram_quantiles(
                            own0, picker_histogram(stack.admin))  # fmt: skip
                        extra = (f"{percentile(waits, 50):.0f} / {percentile(waits, 99):.0f} "
                                 f"({len(waits)} picked), {own}") if waits else "-"  # fmt: skip
                        if not kill:
                            used = cpu_seconds(picker_pid) - cpu0
                            extra += f", {used / max(1, len(result.ttft)) * 1e6:.0f}"
                    show_row(MODES[mode], result, rate, extra)
                    if result.errors:
                        print(f"    first errors: {result.errors[:2]}", flush=True)
            if "pa" in modes and args.canary:
                canary(stack, args)


def canary(stack, args) -> None:
    """A canary at 20 % on the prefix-aware model: the split, and picking in each version."""
    body = json.dumps({"model": "pa", "to": "v2", "strategy": "canary",
                       "steps": [{"set_weight": 20}, {"pause": {}}]}).encode()  # fmt: skip
    request = urllib.request.Request(f"{stack.admin}/v1/rollouts", body,
                                     {"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        rollout = json.load(response)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{stack.admin}/v1/rollouts/{rollout['id']}") as r:
                if json.load(r)["phase"] == "paused":
                    break
            time.sleep(0.1)
        urls = endpoints(stack.admin, "pa")
        before = {version: prefix_counters(found) for version, found in urls.items()}
        result = asyncio.run(run_load(stack.proxy, "pa", Workload("shared", 7, args.turns),
                                      args.rate, 2 * args.seconds,
                                      args.conversations))  # fmt: skip
        total = sum(result.served.values())
        share = result.served.get("v2", 0) / max(1, total)
        rates = []
        for version, found in urls.items():
            hits, queries = prefix_counters(found)
            hit_rate = (hits - before[version][0]) / max(1.0, queries - before[version][1])
            rates.append(f"{version} {hit_rate:.1%}")
        print(f"\ncanary at 20 % on pa (shared workload, load average {load_average()}): v2 "
              f"served {result.served.get('v2', 0)} of {total} = {share:.1%} "
              f"({(share - 0.2) * 100:+.1f} pp); failed {result.failed}; prefix hit rate "
              f"{', '.join(rates)}; TTFT p90 "
              f"{percentile(sorted(result.ttft), 90) * 1000:.0f} ms", flush=True)  # fmt: skip
    finally:
        abort = urllib.request.Request(f"{stack.admin}/v1/rollouts/{rollout['id']}/abort",
                                       b"", method="POST")  # fmt: skip
        urllib.request.urlopen(abort, timeout=30).close()


if __name__ == "__main__":
    main()
