"""Start-up and idle cost at fleet size: 1,000 models x 2 versions, ready and routed.

Goals (issue 17): 1,000 models x 2 versions ready and routed through Envoy in <= 10 s; the
controller's RSS at that size <= 300 MB; its idle CPU <= 2 % of one core (backend probing
and vLLM scraping included).

    python bench/bench_startup.py [--models 1000] [--backends 2] [--idle-seconds 30]
    python bench/bench_startup.py --models 200 --idle-seconds 10      # quick

Starts `--backends` sims, each answering for every model (each model name is loaded as a
LoRA adapter, as vLLM serves adapters), then `switchyard up` with `--models` models of two
`url` versions (v1 100 %, v2 0 %; model i's v1 on sim i mod B, its v2 on the next sim). Times,
from the moment `switchyard up` is started:

- ready: its ready line (every backend ready and Envoy running our configuration; the
  common helper also waits for the first model to answer);
- routed: every version answered a pinned chat completion through Envoy with its own
  `x-switchyard-version` (2 x models requests, `--concurrency` at a time, each retried until
  it does, at most `--route-timeout` s; the sweep starts at the ready line and its own
  duration is shown);

then leaves it idle for `--settle` s and samples `--idle-seconds`: CPU % = utime + stime of
the process (all threads, /proc/<pid>/stat) over wall time, of one core; RSS = VmRSS, mean
and max over 1 s samples; for the controller, Envoy and the sims apart. Also counts the
versions the controller took out of EDS meanwhile (`backend.unready` in its log): a
controller too busy to probe its backends in time flaps them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
from bench_idle import descendants, name_of, sample
from common import background, free_port, post_json, rss_mb, switchyard_up

BASE_MODEL = "startup-base"


def model_config(count: int, backends: list[str]) -> list[dict]:
    b = len(backends)
    return [
        {
            "name": f"model-{index:04d}",
            "versions": [
                {"name": "v1", "weight": 100, "backend": {"url": backends[index % b]}},
                {"name": "v2", "weight": 0, "backend": {"url": backends[(index + 1) % b]}},
            ],
        }
        for index in range(count)
    ]


def max_loras(count: int) -> list[str]:
    """`--max-loras` for a sim that has it (like vLLM's, it holds 8 adapters by default)."""
    usage = subprocess.run(
        [sys.executable, "-m", "controlplane", "sim", "--help"], capture_output=True, text=True
    ).stdout
    return ["--max-loras", str(count)] if "--max-loras" in usage else []


def load_adapters(backend: str, names: list[str], adapter_dir: Path) -> None:
    """Every model name answers on `backend`, as a LoRA adapter does on vLLM."""
    for name in names:
        status, payload = post_json(
            f"{backend}/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(adapter_dir)}
        )
        if status != 200:
            raise SystemExit(f"{backend}: loading adapter {name}: {status} {payload[:200]!r}")


async def sweep(
    proxy: str, models: list[dict], concurrency: int, timeout: float
) -> tuple[float, list[str]]:
    """Until every version answered a pinned request through Envoy, or `timeout` seconds;
    the seconds it took and the versions that never did."""
    started = time.monotonic()
    deadline = started + timeout
    todo: asyncio.Queue = asyncio.Queue()
    for model in models:
        for version in model["versions"]:
            todo.put_nowait((model["name"], version["name"]))
    failures: list[str] = []

    async def routed(session: aiohttp.ClientSession, model: str, version: str) -> bool:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 1}  # fmt: skip
        try:
            async with session.post(
                f"{proxy}/v1/chat/completions", json=body,
                headers={"x-switchyard-version": version},
            ) as response:  # fmt: skip
                await response.read()
                served = response.headers.get("x-switchyard-version")
                return response.status == 200 and served == version
        except (TimeoutError, aiohttp.ClientError):
            if asyncio.current_task().cancelling():
                raise  # stopped (Ctrl-C), not a timeout
            return False

    async def worker(session: aiohttp.ClientSession) -> None:
        while not todo.empty():
            model, version = todo.get_nowait()
            while not await routed(session, model, version):
                if time.monotonic() > deadline:
                    failures.append(f"{model}@{version}")
                    break
                await asyncio.sleep(0.05)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return time.monotonic() - started, failures


def envoy_stat_count(envoy_admin: str) -> int:
    """How many stats Envoy has (every used one goes to the controller each stats flush)."""
    try:
        with urllib.request.urlopen(f"http://{envoy_admin}/stats?usedonly", timeout=60) as answer:
            return sum(1 for line in answer.read().splitlines() if line.strip())
    except OSError:
        return -1


def unready_events(log_path: Path) -> int:
    """backend.unready lines so far in the controller's log: versions that left EDS."""
    return log_path.read_text(errors="replace").count("backend.unready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=1000, help="models, two versions each")
    parser.add_argument("--backends", type=int, default=2, help="sims the versions share")
    parser.add_argument("--concurrency", type=int, default=32, help="requests of the sweep")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before sampling")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="idle time sampled")
    parser.add_argument("--timeout", type=float, default=600.0, help="for the ready line (s)")
    parser.add_argument("--route-timeout", type=float, default=60.0,
                        help="seconds the sweep keeps trying a version")  # fmt: skip
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        tmp_path = Path(tmp)
        adapter_dir = tmp_path / "adapter"
        adapter_dir.mkdir()
        (adapter_dir / "adapter_config.json").write_text(json.dumps({"r": 8}))
        backends, sims = [], []
        for _ in range(args.backends):
            port = free_port()
            argv = [sys.executable, "-m", "controlplane", "sim", "--port", str(port),
                    "--model", BASE_MODEL, *max_loras(args.models)]  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            log = tmp_path / f"sim-{port}.log"
            sims.append(stack.enter_context(background(argv, f"{url}/health", log)).pid)
            backends.append(url)
        models = model_config(args.models, backends)
        for backend in backends:
            load_adapters(backend, [model["name"] for model in models], adapter_dir)
        started = time.monotonic()
        up = stack.enter_context(switchyard_up(tmp_path, models, timeout=args.timeout))
        ready_s = time.monotonic() - started
        with urllib.request.urlopen(f"{up.admin}/v1/models", timeout=60) as response:
            listed = json.loads(response.read())["models"]
        unready = [
            f"{m['name']}@{v['name']}" for m in listed for v in m["versions"] if not v["ready"]
        ]
        sweep_s, never = asyncio.run(sweep(up.proxy, models, args.concurrency, args.route_timeout))
        routed_s = time.monotonic() - started
        rss_after_start = rss_mb(up.process.pid)
        time.sleep(args.settle)
        controller = up.process.pid
        children = descendants(controller)
        flaps = unready_events(up.log_path)
        measured = sample([controller, *children, *sims], args.idle_seconds)
        flaps = unready_events(up.log_path) - flaps
        stats = envoy_stat_count(up.config["listen"]["envoy_admin"])
        names = {pid: name_of(pid) for pid in children}
        names.update({pid: f"shared sim {index}" for index, pid in enumerate(sims)})

    versions = 2 * args.models
    print(f"start-up: {args.models} models x 2 url versions on {args.backends} shared sims "
          f"(each model a LoRA adapter on every sim)")  # fmt: skip
    print(f"ready line after {ready_s:.2f} s ({len(unready)} of {versions} versions not ready "
          f"then{': ' + ', '.join(unready[:3]) if unready else ''})")  # fmt: skip
    if never:
        print(f"NOT every version routed: {len(never)} of {versions} never answered a pinned "
              f"request in {args.route_timeout:g} s (e.g. {', '.join(never[:3])}); the sweep "
              f"ended {routed_s:.2f} s after the start")  # fmt: skip
    else:
        print(f"every version routed through Envoy after {routed_s:.2f} s (the sweep of "
              f"{versions} pinned requests took {sweep_s:.2f} s); goal <= 10 s: "
              f"{'met' if routed_s <= 10 else 'NOT met'}")  # fmt: skip
    print(f"\nidle for {args.idle_seconds:g} s, {args.settle:g} s after the sweep")
    print(f"{'process':<28} {'CPU %':>6} {'RSS MB':>7} {'max MB':>7}")
    rows = [("controller", measured[controller])]
    rows += [(names[pid], measured[pid]) for pid in sorted(names, key=names.get)]
    for label, figures in rows:
        print(f"{label:<28} {figures['cpu_pct']:6.2f} {figures['rss_mean']:7.1f} "
              f"{figures['rss_max']:7.1f}")  # fmt: skip
    mine = measured[controller]
    print(f"controller RSS after start-up {rss_after_start:.1f} MB, max while idle "
          f"{mine['rss_max']:.1f} MB (goal <= 300): "
          f"{'met' if mine['rss_max'] <= 300 else 'NOT met'}; idle CPU {mine['cpu_pct']:.2f} % "
          f"(goal <= 2): {'met' if mine['cpu_pct'] <= 2 else 'NOT met'}")  # fmt: skip
    print(f"versions taken out of EDS while idle (backend.unready in the controller's log): "
          f"{flaps}; Envoy's used stats (each flush sends them all to the controller): "
          f"{stats}")  # fmt: skip


if __name__ == "__main__":
    main()
