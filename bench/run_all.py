"""Run the whole benchmark suite, one benchmark after the other, each printing its table.

    python bench/run_all.py            # short runs (~7 min): fewer repetitions, no plots
    python bench/run_all.py --full     # the scripts' defaults (~30 min: fleet sizes), plots
    python bench/run_all.py --only fanout,split
    make bench                         # the same as the first line (BENCH_ARGS=--full for full)

Benchmarks are not tests: nothing here fails on a missed goal; a benchmark fails only when
it cannot measure (a process did not start, a request was refused). The automatic rollback
runs last because it is the most sensitive to what else the machine does. Every benchmark
starts its own processes on free ports and stops them; the load average before each one is
printed, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name, script, goal, arguments for the short run (the full run uses the script's defaults)
SUITE = [
    ("weights", "bench_weights.py",
     "push -> ACK p50 <= 2 ms, p99 <= 5 ms (1 Envoy) at 1, 200, 1,000 models",
     ["--changes", "50", "--sizes", "1,200"]),
    ("fanout", "bench_fanout.py",
     "1,000 ADS clients: p99 to the last ACK <= 100 ms; CPU per client push <= 30 us",
     ["--clients", "1,1000", "--changes", "20"]),
    ("startup", "bench_startup.py",
     "1,000 models x 2 versions routed <= 10 s; RSS <= 300 MB; idle CPU <= 2 %",
     ["--models", "200", "--idle-seconds", "10"]),
    ("snapshot", "bench_snapshot.py", "100-model snapshot <= 5 ms",
     ["--builds", "100"]),
    ("envoy_hop", "bench_envoy_hop.py",
     "Envoy adds <= 0.3 ms p50; CPU/request <= 0.4x aiohttp's; 1,000 models within +10 %",
     ["--seconds", "3", "--sizes", "1,200"]),
    ("split", "bench_split.py", "split within +-1 pp at 10,000 requests", ["--runs", "1"]),
    ("canary_load", "bench_canary_load.py", "0 failed of >= 10,000 requests during a canary",
     ["--no-plot"]),
    ("rollback", "bench_rollback.py", "emergency rollback like a weight change; 0 failed",
     ["--runs", "30", "--load-runs", "1"]),
    ("idle", "bench_idle.py", "idle controller RSS <= 150 MB, CPU <= 1 %", ["--seconds", "10"]),
    ("routing", "bench_routing.py",
     "prefix_aware TTFT p90 <= 0.5x least_request's; picker wait p50 <= 0.5 ms, p99 <= 2 ms; "
     "0 failed with the picker killed; canary split +-2 pp", ["--seconds", "20"]),
    ("auto_rollback", "bench_auto_rollback.py",
     "fault -> rollback ACKed p50 <= 1.5 s, worst <= 2 s",
     ["--runs", "6", "--hang-runs", "2", "--no-plot"]),
]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the documented (longer) runs")
    parser.add_argument("--only", default="", help="comma-separated names to run")
    parser.add_argument("--skip", default="", help="comma-separated names to leave out")
    parser.add_argument("--list", action="store_true", help="print the names and goals")
    args = parser.parse_args()
    names = [name for name, *_ in SUITE]
    only = [n for n in args.only.split(",") if n]
    skip = [n for n in args.skip.split(",") if n]
    unknown = sorted(set(only + skip) - set(names))
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(names)}")
    if args.list:
        for name, script, goal, _ in SUITE:
            print(f"{name:<14} bench/{script:<24} {goal}")
        return 0

    outcomes = []
    for name, script, goal, short in SUITE:
        if (only and name not in only) or name in skip:
            continue
        if name == "envoy_hop" and shutil.which("wrk") is None:
            print(f"\n{name}: skipped, wrk is not installed (apt-get install wrk)")
            outcomes.append((name, "skipped", 0.0))
            continue
        argv = [sys.executable, str(HERE / script), *([] if args.full else short)]
        shown = " ".join(["python", f"bench/{script}", *argv[2:]])
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"\n{'=' * 100}\n{name}: {goal}\n$ {shown}    (load average {load})\n", flush=True)
        started = time.monotonic()
        code = subprocess.run(argv, cwd=HERE.parent).returncode
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"\n({name} done; load average {load})", flush=True)
        outcomes.append((name, "ok" if code == 0 else f"exit {code}", time.monotonic() - started))

    print(f"\n{'=' * 100}\n{'benchmark':<14} {'result':<10} {'seconds':>7}")
    for name, result, seconds in outcomes:
        print(f"{name:<14} {result:<10} {seconds:7.0f}")
    return 1 if any(result.startswith("exit") for _, result, _ in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
