"""Label-frequency plot of a segmentation (needs matplotlib: pip install shl-kernels[plot])."""
from __future__ import annotations

import numpy as np

from .segmentation import Segmentation


def plot_segments(seg: Segmentation, path, *, title: str | None = None) -> None:
    """Write a PNG of label count vs frequency rank (log-log), coloured by segment.

    Labels never seen (count 0) have no place on a log axis and are left out.
    """
    # Figure + Agg canvas directly: no global backend switch in the caller's process
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = seg.label_counts.numpy()
    segment = seg.segment_of.numpy()
    by_rank = np.argsort(-counts, kind="stable")
    seen = by_rank[counts[by_rank] > 0]
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    m = seg.num_segments
    cmap = "tab10" if m <= 10 else "viridis"
    pts = ax.scatter(np.arange(1, seen.size + 1), counts[seen], c=segment[seen], s=6,
                     cmap=cmap, vmin=-0.5 if m <= 10 else 0,
                     vmax=9.5 if m <= 10 else max(m - 1, 1), linewidths=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("frequency rank")
    ax.set_ylabel("label count n_c")
    unseen = int(counts.size - seen.size)
    ax.set_title(title or f"{seg.num_labels} labels in {m} segments"
                 + (f" ({unseen} unseen labels not shown)" if unseen else ""))
    fig.colorbar(pts, ax=ax, label="segment")
    fig.tight_layout()
    fig.savefig(path, format="png")
