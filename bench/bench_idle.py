"""What an idle controller costs: resident memory and CPU with nothing happening.

The controller runs next to every fleet all day, mostly waiting; it must stay small and
quiet. Goal: the controller process idle RSS <= 150 MB and CPU <= 1 % (of one core).

    python bench/bench_idle.py [--seconds 30] [--commands serve,up]

For each command, starts `switchyard <command>` with the repository's switchyard.yaml
(its models and settings; free ports and a temporary state_dir instead of its own), waits
for the ready line, lets it settle 2 s, then samples for `--seconds`: CPU % = utime + stime
(from /proc/<pid>/stat, all threads) over wall time, RSS = VmRSS from /proc/<pid>/status
(its mean and max over 1 s samples). The processes the controller started (the sims and,
for `up`, Envoy) are measured the same way and shown apart: only the controller's own
figures count for the goal.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml
from common import ROOT, cpu_seconds, switchyard_up


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def name_of(pid: int) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    words = [word.decode() for word in argv if word]
    if words and words[0].endswith("envoy"):
        return "envoy"
    if "sim" in words:
        return f"sim ({words[words.index('--model') + 1]})" if "--model" in words else "sim"
    return " ".join(Path(words[0]).name if i == 0 else w for i, w in enumerate(words[:3]))


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc's parent links."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return sorted(found)


def sample(pids: list[int], seconds: float) -> dict[int, dict]:
    """CPU % and RSS (mean, max) of each pid over `seconds`."""
    cpu_before = {pid: cpu_seconds(pid) for pid in pids}
    rss = {pid: [] for pid in pids}
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        for pid in pids:
            rss[pid].append(rss_mb(pid))
        time.sleep(1.0)
    elapsed = time.monotonic() - started
    return {
        pid: {
            "cpu_pct": (cpu_seconds(pid) - cpu_before[pid]) / elapsed * 100,
            "rss_mean": sum(rss[pid]) / len(rss[pid]),
            "rss_max": max(rss[pid]),
        }
        for pid in pids
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30, help="idle time sampled")
    parser.add_argument("--commands", default="serve,up", help="comma-separated")
    parser.add_argument("--config", default=str(ROOT / "switchyard.yaml"))
    args = parser.parse_args()
    base = yaml.safe_load(Path(args.config).read_text())
    results = {}
    for command in args.commands.split(","):
        with (
            tempfile.TemporaryDirectory(prefix=f"bench-idle-{command}-") as tmp,
            switchyard_up(Path(tmp), base["models"], command, base=base) as stack,
        ):
            time.sleep(2.0)
            controller = stack.process.pid
            children = descendants(controller)
            measured = sample([controller, *children], args.seconds)
            names = {pid: name_of(pid) for pid in children}
            results[command] = (controller, names, measured)

    print(f"idle for {args.seconds:g} s after the ready line (+2 s), {args.config}")
    print(f"{'command':<6} {'process':<28} {'CPU %':>6} {'RSS MB':>7} {'max MB':>7}")
    for command, (controller, names, measured) in results.items():
        rows = [("controller", measured[controller])]
        rows += [(names[pid], measured[pid]) for pid in sorted(names, key=names.get)]
        for label, figures in rows:
            print(f"{command:<6} {label:<28} {figures['cpu_pct']:6.2f} "
                  f"{figures['rss_mean']:7.1f} {figures['rss_max']:7.1f}")  # fmt: skip
        total_cpu = sum(f["cpu_pct"] for f in measured.values())
        total_rss = sum(f["rss_mean"] for f in measured.values())
        print(f"{command:<6} {'all of the above':<28} {total_cpu:6.2f} {total_rss:7.1f}")
        mine = measured[controller]
        verdict = "met" if mine["rss_max"] <= 150 and mine["cpu_pct"] <= 1 else "NOT met"
        print(f"{command}: controller RSS max {mine['rss_max']:.1f} MB (goal <= 150), "
              f"CPU {mine['cpu_pct']:.2f} % (goal <= 1): {verdict}")  # fmt: skip


if __name__ == "__main__":
    main()
