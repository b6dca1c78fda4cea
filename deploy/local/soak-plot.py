#!/usr/bin/env python3
"""Plots a soak's samples (tests/soak.rs writes them): resident memory, open
descriptors and Tokio tasks of every meshkit process, and the count of etcd
keys, over time, with a line at each restart.

    soak-plot.py DIR OUT.png     DIR holds samples.csv and restarts.csv
"""

import csv
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NOT_OURS = ("kafka", "etcd", "prometheus")


def main(directory: Path, out: Path) -> None:
    series = defaultdict(lambda: defaultdict(list))  # process -> column -> [(t, v)]
    with open(directory / "samples.csv", newline="") as f:
        for row in csv.DictReader(f):
            t = float(row["t_secs"]) / 60.0
            for column in ("rss_kib", "fds", "tasks"):
                if row[column]:
                    series[row["process"]][column].append((t, float(row[column])))
    restarts = []
    with open(directory / "restarts.csv", newline="") as f:
        restarts = [(float(r["t_secs"]) / 60.0, r["restarted"]) for r in csv.DictReader(f)]

    panels = [
        ("rss_kib", "resident memory (MiB)", 1 / 1024.0),
        ("fds", "open descriptors", 1.0),
        ("tasks", "Tokio tasks", 1.0),
    ]
    fig, axes = plt.subplots(len(panels) + 1, 1, figsize=(11, 12), sharex=True)
    processes = sorted(p for p in series if p != "etcd-keys" and not p.startswith(NOT_OURS))
    # One colour per process, the same in every panel (tab10 would repeat past ten).
    palette = plt.get_cmap("tab20")
    colours = {p: palette(i % 20) for i, p in enumerate(processes)}
    for ax, (column, title, scale) in zip(axes, panels):
        for process in processes:
            points = series[process][column]
            if points:
                ax.plot(
                    [t for t, _ in points],
                    [v * scale for _, v in points],
                    label=process,
                    linewidth=1,
                    color=colours[process],
                )
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
    keys = series["etcd-keys"]["fds"]
    axes[-1].plot([t for t, _ in keys], [v for _, v in keys], color="black", linewidth=1)
    axes[-1].set_ylabel("etcd keys under /meshkit/")
    axes[-1].grid(True, alpha=0.3)
    axes[-1].set_xlabel("minutes")
    for ax in axes:
        for t, _ in restarts:
            ax.axvline(t, color="grey", alpha=0.25, linewidth=0.8)
    axes[0].legend(loc="upper left", fontsize=7, ncol=4)
    minutes = max((t for p in series.values() for c in p.values() for t, _ in c), default=0)
    fig.suptitle(
        f"meshkit soak: {minutes:.0f} min of steady load through the gateway, "
        f"{len(restarts)} rolling restarts (grey lines)"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    print(f"soak-plot: {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
