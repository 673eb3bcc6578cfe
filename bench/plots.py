"""PNG plots for docs/benchmarks.md; optional: without matplotlib they are skipped with a note.

matplotlib is not a project dependency (`pip install "matplotlib>=3.8,<4"`, or the `bench`
extra), so every function here returns the path it wrote, or None after printing why not.
"""

from __future__ import annotations

from pathlib import Path

IMG = Path(__file__).resolve().parent.parent / "docs" / "img"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install 'matplotlib>=3.8,<4')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def canary_split(
    set_weight: list[tuple[float, float]],
    observed: list[tuple[float, float, int]],
    title: str,
    path: Path = IMG / "bench-canary-split.png",
) -> Path | None:
    """Set weight (steps) vs observed candidate share per time bin during a canary.

    `set_weight`: (seconds, weight %) at each ACKed change; `observed`: (bin start s,
    candidate share %, requests in the bin).
    """
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=110)
    times, weights = zip(*set_weight, strict=True)
    ax.step(times, weights, where="post", color="black", linewidth=2, label="set weight (ACKed)")
    bins, shares, counts = zip(*observed, strict=True)
    width = bins[1] - bins[0] if len(bins) > 1 else 0.5
    centers = [start + width / 2 for start in bins]
    ax.plot(centers, shares, "o-", color="tab:orange", markersize=3, linewidth=1,
            label=f"observed share of requests ({width:g} s bins)")  # fmt: skip
    ax.set_xlabel("seconds since the canary started")
    ax.set_ylabel("candidate (v2) share, %")
    ax.set_ylim(-3, 103)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    rate = ax.twinx()
    rate.bar(centers, [c / width for c in counts], width=width * 0.9, color="tab:blue",
             alpha=0.12, label="requests/s")  # fmt: skip
    rate.set_ylabel("requests/s (bars)", color="tab:blue")
    rate.set_ylim(0, max(counts) / width * 3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"plot written: {path}")
    return path


def rollback_timeline(
    errors: list[tuple[float, float, int]],
    candidate_share: list[tuple[float, float]],
    verdicts: list[tuple[float, str]],
    marks: dict[str, float],
    title: str,
    path: Path = IMG / "bench-rollback-timeline.png",
) -> Path | None:
    """One automatic rollback: 5xx per time bin, verdicts, fault onset and the ACKed rollback.

    `errors`: (bin start s, 5xx per s, requests per s); `candidate_share`: (bin start s,
    share % of answers from the candidate); `verdicts`: (s, result); `marks`: label -> s.
    """
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=110)
    bins = [start for start, _, _ in errors]
    width = bins[1] - bins[0] if len(bins) > 1 else 0.1
    ax.bar(bins, [r for _, _, r in errors], width=width, align="edge", color="tab:blue",
           alpha=0.25, label="requests/s answered")  # fmt: skip
    ax.bar(bins, [e for _, e, _ in errors], width=width, align="edge", color="tab:red",
           alpha=0.8, label="5xx/s answered")  # fmt: skip
    ax.set_xlabel("seconds since the fault was injected")
    ax.set_ylabel("answers per second")
    share = ax.twinx()
    share.plot([s for s, _ in candidate_share], [v for _, v in candidate_share], color="tab:green",
               linewidth=1.5, label="candidate share of answers, %")  # fmt: skip
    share.set_ylim(-3, 103)
    share.set_ylabel("candidate share, %", color="tab:green")
    colors = {"pass": "tab:green", "fail": "tab:red", "inconclusive": "tab:gray"}
    top = ax.get_ylim()[1]
    for result, color in colors.items():
        times = [at for at, seen in verdicts if seen == result]
        if times:
            ax.plot(times, [top * 0.95] * len(times), "v", color=color, markersize=9,
                    linestyle="none", label=f"verdict: {result}")  # fmt: skip
    styles = ["--", ":", "-."]
    for index, (label, at) in enumerate(marks.items()):
        ax.axvline(at, color="black", linestyle=styles[index % 3], linewidth=1.2,
                   label=f"{label} ({at:+.2f} s)")  # fmt: skip
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    more, more_labels = share.get_legend_handles_labels()
    ax.legend(handles + more, labels + more_labels, loc="center right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"plot written: {path}")
    return path
