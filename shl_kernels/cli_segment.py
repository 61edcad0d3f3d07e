"""`shl-segment`: segment the labels of a training set (SPEC section 2) from the shell.

    shl-segment LABELS --num-labels C [--tau 0] [--max-segment-size K]
                [--max-freq-ratio R] --out seg.npz [--plot freq.png]

LABELS is JSONL (one JSON list of label ids per document, or an object with a "labels"
list; blank lines are skipped, write [] for a document without labels) or a .npz
written by scipy.sparse.save_npz ([N, C], nonzero entries are labels).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tqdm import tqdm

from .segmentation import segment_labels


def read_jsonl(path: str, *, progress: bool = True) -> list[list[int]]:
    """Label-id lists from a JSONL file, with a tqdm progress bar over the bytes read."""
    rows = []
    pending = 0
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                                     desc="reading", disable=not progress) as bar:
        for lineno, line in enumerate(f, 1):
            pending += len(line)
            if pending >= 1 << 20:  # per-line updates would cost more than the parsing
                bar.update(pending)
                pending = 0
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if isinstance(row, dict):
                row = row.get("labels")
            if isinstance(row, list):
                rows.append(row)
                continue
            raise ValueError(f"{path}:{lineno}: expected a JSON list of label ids")
        bar.update(pending)
    return rows


def read_labels(path: str, *, progress: bool = True):
    """A scipy sparse matrix for .npz files, else label-id lists from JSONL."""
    if path.endswith(".npz"):
        import scipy.sparse as sp

        return sp.load_npz(path)
    return read_jsonl(path, progress=progress)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shl-segment", description=__doc__.split("\n\n")[0])
    p.add_argument("labels", metavar="LABELS", help="JSONL of label-id lists, or a scipy "
                   "sparse .npz [N, C]")
    p.add_argument("--num-labels", type=int, required=True, metavar="C",
                   help="number of labels C (ids are 0..C-1)")
    p.add_argument("--tau", type=float, default=0.0,
                   help="pairs with co-occurrence strength above tau conflict (default 0)")
    p.add_argument("--max-segment-size", type=int, metavar="K")
    p.add_argument("--max-freq-ratio", type=float, metavar="R")
    p.add_argument("--out", required=True, help="where to save the segmentation (.npz)")
    p.add_argument("--plot", metavar="PNG", help="also write a label-frequency plot")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        labels = read_labels(args.labels, progress=not args.quiet)
        t0 = time.perf_counter()
        seg = segment_labels(labels, args.num_labels, tau=args.tau,
                             max_segment_size=args.max_segment_size,
                             max_freq_ratio=args.max_freq_ratio)
        elapsed = time.perf_counter() - t0
        out = args.out if args.out.endswith(".npz") else args.out + ".npz"  # as np.savez
        seg.save(out)
        print(seg.summary())
        print(f"segmented in {elapsed:.2f} s; saved {out}")
        if args.plot:
            from .segment_plot import plot_segments

            plot_segments(seg, args.plot)
            print(f"plot: {args.plot}")
    except (OSError, ValueError) as e:
        print(f"shl-segment: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"shl-segment: error: {e}; --plot needs matplotlib "
              "(pip install 'shl-kernels[plot]')", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
