"""Bar chart (PNG) of the newest bench_loss.py run in a results CSV: time per backend and
baseline for each loss and shape, log scale.

Usage: python benchmarks/plot_loss.py benchmarks/results/<device>.csv [--out fig.png]
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def newest_rows(path: Path) -> list[dict]:
    """Rows of the newest measurement of each (benchmark, shape, dtype, backend, baseline)."""
    latest: dict[tuple, dict] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):  # appended in time order: later rows win
            latest[r["benchmark"], r["B"], r["C"], r["dtype"], r["backend"], r["baseline"]] = r
    return list(latest.values())


def plot(rows: list[dict], out: Path) -> None:
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        loss = r["benchmark"].removesuffix("_fwd_bwd").replace("_segment_ordered", " (ordered)")
        key = (loss, f"{r['B']}x{r['C']}", r["dtype"])
        g = groups.setdefault(key, {})
        g[r["backend"]] = float(r["ms"])
        g[r["baseline"]] = float(r["baseline_ms"])
    names = sorted({n for g in groups.values() for n in g},
                   key=lambda n: (n in ("eager", "torch.compile"), n))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups)), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j, g in enumerate(groups.values()) if name in g]
        ys = [g[name] for g in groups.values() if name in g]
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{k[0]}\n{k[1]}\n{k[2]}" for k in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("forward + backward, ms (log)")
    commits = sorted({r["commit"] for r in rows})
    dates = sorted({r["date"] for r in rows})
    ax.set_title(f"{rows[0]['device']}: newest run of each bar (commits {', '.join(commits)}; "
                 f"{dates[0]}..{dates[-1]})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("csv", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    plot(newest_rows(args.csv), args.out or args.csv.with_suffix(".png"))


if __name__ == "__main__":
    main()
