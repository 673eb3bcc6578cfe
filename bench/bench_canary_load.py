"""Failed requests during a full canary under load, and set weight vs observed split.

A canary must be invisible to clients: no request fails or breaks off while the weights
move. Goal: 0 failed of >= 10,000 requests sent during a canary 10 -> 50 -> 100 % with
pauses.

    python bench/bench_canary_load.py [--pause 12] [--sdk-clients 8] [--raw-clients 24]

One `switchyard up` (one Envoy), `llama-3-8b` with two sim versions (`ttft_ms` 5,
`itl_ms` 2; 8 tokens per answer). Closed-loop clients run all the time, half of each kind
streaming: `--sdk-clients` use the openai SDK (`AsyncOpenAI`, `max_retries=0`, so no
failure is hidden by a retry), `--raw-clients` use aiohttp and read the SSE by hand. After
2 s the canary starts (`set_weight` 10, pause, 50, pause, 100); the load runs 2 s past its
end. Every request is checked:

- failed: an exception (connection error, timeout) or a status other than 200;
- broken: a 200 without `x-switchyard-version`, or with fewer than 8 tokens (streams: 8
  content chunks and a finish reason; aiohttp streams also need `data: [DONE]`).

The share of requests that v2 served is printed per step (requests sent after the step's
ACKed history entry and before the next one) next to the set weight, and plotted per
0.5 s over the whole run against the set weight in docs/img/bench-canary-split.png
(unless --no-plot).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import openai
import plots
from common import follow_rollout, switchyard_up

MODEL = "llama-3-8b"
TOKENS = 8
SIM = {"ttft_ms": 5, "itl_ms": 2}
MESSAGES = [{"role": "user", "content": "Say hello."}]
BIN_S = 0.5


def model_config() -> list[dict]:
    versions = [
        {"name": "v1", "weight": 100, "backend": {"sim": SIM}},
        {"name": "v2", "weight": 0, "backend": {"sim": SIM}},
    ]
    return [{"name": MODEL, "versions": versions}]


class Load:
    """Closed-loop clients; every request is kept as (sent, kind, version, outcome, detail)."""

    def __init__(self, proxy: str, sdk_clients: int, raw_clients: int) -> None:
        self.proxy = proxy
        self.sdk_clients, self.raw_clients = sdk_clients, raw_clients
        self.stopping = False
        self.requests: list[tuple[float, str, str, str, str]] = []

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        connector = aiohttp.TCPConnector(limit=0)
        sdk = openai.AsyncOpenAI(
            base_url=f"{self.proxy}/v1", api_key="bench", max_retries=0, timeout=30
        )
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            clients = [self._loop(self._sdk, sdk, i % 2 == 0) for i in range(self.sdk_clients)]
            clients += [self._loop(self._raw, session, i % 2 == 0) for i in range(self.raw_clients)]
            await asyncio.gather(*clients)
        await sdk.close()

    async def _loop(self, one, client, stream: bool) -> None:
        kind = f"{'sdk' if one == self._sdk else 'aiohttp'}-{'stream' if stream else 'plain'}"
        while not self.stopping:
            sent = time.time()
            try:
                version, outcome, detail = await one(client, stream)
            except (openai.APIError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                version, outcome, detail = "?", "failed", f"{type(exc).__name__}: {exc}"
            self.requests.append((sent, kind, version, outcome, detail))

    @staticmethod
    async def _sdk(client: openai.AsyncOpenAI, stream: bool) -> tuple[str, str, str]:
        create = dict(model=MODEL, messages=MESSAGES, max_tokens=TOKENS)
        if not stream:
            raw = await client.chat.completions.with_raw_response.create(**create)
            version = raw.headers.get("x-switchyard-version", "?")
            completion = raw.parse()
            tokens = completion.usage.completion_tokens if completion.usage else 0
            return version, *check(version, tokens, True)
        async with client.chat.completions.with_streaming_response.create(
            **create, stream=True
        ) as response:
            version = response.headers.get("x-switchyard-version", "?")
            tokens, finished = 0, False
            async for chunk in await response.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    tokens += 1
                if chunk.choices and chunk.choices[0].finish_reason:
                    finished = True
            return version, *check(version, tokens, finished)

    async def _raw(self, session: aiohttp.ClientSession, stream: bool) -> tuple[str, str, str]:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": TOKENS, "stream": stream}
        async with session.post(f"{self.proxy}/v1/chat/completions", json=body) as response:
            version = response.headers.get("x-switchyard-version", "?")
            if response.status != 200:
                text = (await response.read())[:200]
                return version, "failed", f"{response.status}: {text!r}"
            if not stream:
                usage = (await response.json()).get("usage") or {}
                return version, *check(version, usage.get("completion_tokens", 0), True)
            tokens, done = 0, False
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    done = True
                elif (json.loads(data).get("choices") or [{}])[0].get("delta", {}).get("content"):
                    tokens += 1
            return version, *check(version, tokens, done)


def check(version: str, tokens: int, finished: bool) -> tuple[str, str]:
    if version not in ("v1", "v2"):
        return "broken", f"x-switchyard-version {version!r}"
    if tokens < TOKENS or not finished:
        return "broken", f"{version}: {tokens} tokens, finished {finished}"
    return "ok", ""


async def canary_under_load(stack, args) -> dict:
    steps = [{"set_weight": 10}, {"pause": {"seconds": args.pause}}, {"set_weight": 50},
             {"pause": {"seconds": args.pause}}, {"set_weight": 100}]  # fmt: skip
    load = Load(stack.proxy, args.sdk_clients, args.raw_clients)
    runner = asyncio.create_task(load.run())
    async with aiohttp.ClientSession() as admin:
        await asyncio.sleep(2.0)
        spec = {"model": MODEL, "to": "v2", "strategy": "canary", "steps": steps}
        started = time.time()
        doc = await follow_rollout(admin, stack.admin, spec)
        await asyncio.sleep(2.0)
    load.stopping = True
    await runner
    if doc["phase"] != "succeeded":
        raise SystemExit(f"canary ended {doc['phase']}: {doc['message']}")
    return {"started": started, "doc": doc, "requests": load.requests}


def report(result: dict, args) -> None:
    started, doc, requests = result["started"], result["doc"], result["requests"]
    # (time, v2 weight) of every ACKed change; the rollout began with v2 at 0
    changes = [(requests[0][0], 0)] + [
        (entry["time"], entry["weights"].get("v2", 0))
        for entry in doc["history"]
        if entry["event"] in ("step", "succeeded")
    ]
    ordered = sorted(set(changes))  # one row per weight: `succeeded` repeats the last 100
    changes = [c for i, c in enumerate(ordered) if i == 0 or c[1] != ordered[i - 1][1]]
    ended = next(e["time"] for e in doc["history"] if e["event"] == "succeeded")
    during = [r for r in requests if started <= r[0] <= ended]
    span = requests[-1][0] - requests[0][0] if requests else 0
    print(f"canary 10 -> 50 -> 100 % with {args.pause:g} s pauses under load: "
          f"{args.sdk_clients} openai-SDK + {args.raw_clients} aiohttp closed-loop clients, "
          f"half streaming; sims ttft {SIM['ttft_ms']} ms, itl {SIM['itl_ms']} ms, "
          f"{TOKENS} tokens")  # fmt: skip
    rate = len(requests) / span
    enough = "enough" if len(during) >= 10_000 else "FEWER than the 10,000 the goal asks"
    print(f"canary took {ended - started:.2f} s; {len(requests)} requests in {span:.1f} s "
          f"({rate:.0f}/s), {len(during)} of them sent during the canary ({enough})")  # fmt: skip

    print(f"\n{'client kind':<15} {'requests':>8} {'during':>7} {'failed':>6} {'broken':>6}")
    kinds = sorted({r[1] for r in requests})
    for kind in [*kinds, "all"]:
        rows = [r for r in requests if kind in ("all", r[1])]
        outcomes = Counter(r[3] for r in rows)
        during_kind = sum(1 for r in rows if started <= r[0] <= ended)
        print(f"{kind:<15} {len(rows):8d} {during_kind:7d} {outcomes['failed']:6d} "
              f"{outcomes['broken']:6d}")  # fmt: skip
    problems = [r for r in requests if r[3] != "ok"]
    for sent, kind, _, outcome, detail in problems[:10]:
        print(f"  {outcome} at {sent - started:+.2f} s ({kind}): {detail}")

    print(f"\n{'v2 weight (ACKed)':<18} {'from s':>7} {'to s':>7} {'requests':>8} "
          f"{'v2 share':>8} {'error pp':>8}")  # fmt: skip
    bounds = [*changes, (requests[-1][0] + 1, None)]
    for (at, weight), (until, _) in itertools.pairwise(bounds):
        rows = [r for r in requests if at <= r[0] < until and r[3] == "ok"]
        if not rows:
            continue
        share = sum(1 for r in rows if r[2] == "v2") / len(rows) * 100
        print(f"{weight:<18} {at - started:7.2f} {until - started:7.2f} {len(rows):8d} "
              f"{share:7.2f}% {share - weight:+8.2f}")  # fmt: skip

    origin = requests[0][0]
    bins: dict[int, Counter] = {}
    for sent, _, version, outcome, _ in requests:
        if outcome == "ok":
            bins.setdefault(int((sent - origin) / BIN_S), Counter())[version] += 1
    full = max(sum(c.values()) for c in bins.values())
    observed = [  # without the last, partial bin
        (index * BIN_S + origin - started, c["v2"] / sum(c.values()) * 100, sum(c.values()))
        for index, c in sorted(bins.items())
        if sum(c.values()) >= full / 4
    ]
    set_line = [(at - started, weight) for at, weight in changes]
    set_line.append((requests[-1][0] - started, set_line[-1][1]))
    if args.no_plot:
        return
    failed = sum(1 for r in requests if r[3] != "ok")
    plots.canary_split(
        set_line, observed,
        f"canary 10/50/100 % under load: {len(during)} requests during the canary, "
        f"{failed} failed or broken",
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pause", type=float, default=12, help="seconds at 10 %% and at 50 %%")
    parser.add_argument("--sdk-clients", type=int, default=8, help="openai SDK clients")
    parser.add_argument("--raw-clients", type=int, default=24, help="aiohttp clients")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="bench-canary-") as tmp,
        switchyard_up(Path(tmp), model_config()) as stack,
    ):
        result = asyncio.run(canary_under_load(stack, args))
    report(result, args)


if __name__ == "__main__":
    main()
