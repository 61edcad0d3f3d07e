"""Label segmentation (SPEC section 2) at MIMIC scale: Numba vs networkx vs plain Python.

Synthetic Zipf-like label sets (default N=200,000 documents, C=30,000 labels, ~15 labels
per document). Times are medians of repeats after JIT warm-up:
- numba: `segment_labels` from a scipy CSR matrix: input canonicalisation, co-occurrence
  counts, conflict graph and greedy placement, all included;
- networkx: `greedy_color(G, strategy="largest_first")` on the same conflict graph, the
  colouring only (building G is excluded, which favours networkx); compared both with
  the whole numba pipeline above and, like for like, with numba's greedy placement alone
  on its prebuilt conflict CSR (row "coloring_only numba_greedy");
- python: `segment_labels_python`, the plain-Python oracle, on the first documents only
  (--python-docs) because it is slow; compared with numba on that same subset.
Prints a table and appends rows to benchmarks/results/segmentation-<host>.csv.
Usage: python benchmarks/bench_segmentation.py [--quick] [--tau 0] [--repeats 5]
"""
from __future__ import annotations

import argparse
import csv
import datetime
import re
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
import scipy.sparse as sp
from bench_loss import commit  # one git-commit helper for every benchmark CSV

import shl_kernels as shl
from shl_kernels import segment_numba
from shl_kernels.segment_numba import conflict_graph
from shl_kernels.segmentation import segment_labels_python

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["benchmark", "impl", "N", "C", "nnz", "ms", "speedup", "commit", "date"]


def zipf_labels(N: int, C: int, mean_labels: float = 15.0, a: float = 1.0,
                seed: int = 0) -> sp.csr_array:
    """[N, C] 0/1 CSR: Poisson(mean) draws per document from p_r ~ 1 / r^a, label ids
    shuffled so that frequency is unrelated to id; repeated draws in a document merge."""
    rng = np.random.default_rng(seed)
    lens = np.maximum(rng.poisson(mean_labels, N), 1)
    cdf = np.cumsum(1.0 / np.arange(1, C + 1) ** a)
    cdf /= cdf[-1]
    draws = np.searchsorted(cdf, rng.random(int(lens.sum())), side="right")
    labels = rng.permutation(C)[np.minimum(draws, C - 1)]
    keys = np.unique(np.repeat(np.arange(N, dtype=np.int64), lens) * C + labels)
    indptr = np.zeros(N + 1, np.int64)
    np.cumsum(np.bincount(keys // C, minlength=N), out=indptr[1:])
    return sp.csr_array((np.ones(keys.size, np.int8), (keys % C).astype(np.int32), indptr),
                        shape=(N, C))


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def host() -> str:
    return re.sub(r"[^a-z0-9]+", "-", socket.gethostname().lower()).strip("-") or "cpu"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N=20,000, C=5,000")
    p.add_argument("--N", type=int, default=200_000)
    p.add_argument("--C", type=int, default=30_000)
    p.add_argument("--labels-per-doc", type=float, default=15.0)
    p.add_argument("--zipf", type=float, default=1.0, help="exponent a of p_r ~ 1/r^a")
    p.add_argument("--tau", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--python-docs", type=int, default=20_000,
                   help="documents given to the plain-Python implementation")
    p.add_argument("--no-networkx", action="store_true")
    p.add_argument("--no-python", action="store_true")
    args = p.parse_args(argv)
    N, C = (20_000, 5_000) if args.quick else (args.N, args.C)

    t0 = time.perf_counter()
    X = zipf_labels(N, C, args.labels_per_doc, args.zipf)
    print(f"data: N={N} C={C} nnz={X.nnz} ({X.nnz / N:.1f} labels/doc, Zipf a={args.zipf}) "
          f"generated in {time.perf_counter() - t0:.1f} s; numba threads "
          f"{numba.get_num_threads()}")
    shl.segment_labels([[0, 1], [1]], 2)  # JIT compile or load from the cache
    seg = shl.segment_labels(X, C, tau=args.tau)
    st = seg.stats
    print(f"tau={args.tau}: {seg.num_segments} segments, {st.num_conflicting_pairs} "
          f"conflicting pairs of {st.num_cooccurring_pairs} co-occurring, at most "
          f"{st.max_labels_per_document} labels/doc")
    rows = []

    suffix = f"@tau={args.tau:g}" if args.tau else ""  # the CSV has no tau column

    def row(bench, impl, n, nnz, ms, ref_ms):
        rows.append({"benchmark": bench + suffix, "impl": impl, "N": n, "C": C, "nnz": nnz,
                     "ms": f"{ms:.1f}", "speedup": f"{ms / ref_ms:.1f}"})

    numba_ms = median_ms(lambda: shl.segment_labels(X, C, tau=args.tau), args.repeats)
    row("segment", "numba", N, X.nnz, numba_ms, numba_ms)
    indptr, indices = X.indptr.astype(np.int64), X.indices.astype(np.int64)
    counts, visit, adj_ptr, adj, _ = segment_numba._conflicts(indptr, indices, C, args.tau)
    greedy_ms = median_ms(lambda: segment_numba._greedy(adj_ptr, adj, counts[visit], C + 1,
                                                        np.inf), args.repeats)
    row("coloring_only", "numba_greedy", N, X.nnz, greedy_ms, greedy_ms)

    if not args.no_networkx:
        import networkx as nx

        j, k = conflict_graph(indptr, indices, C, args.tau)
        t0 = time.perf_counter()
        G = nx.Graph()
        G.add_nodes_from(range(C))
        G.add_edges_from(zip(j.tolist(), k.tolist()))
        build_ms = 1e3 * (time.perf_counter() - t0)  # timed once: it is seconds at full size
        nx_ms = median_ms(lambda: nx.greedy_color(G, strategy="largest_first"),
                          max(1, min(args.repeats, 3)))
        colours = 1 + max(nx.greedy_color(G, strategy="largest_first").values())
        print(f"networkx largest_first: {colours} colours")
        del G
        row("coloring_only", "networkx_largest_first", N, X.nnz, nx_ms, greedy_ms)
        row("segment_vs_coloring", "networkx_largest_first", N, X.nnz, nx_ms, numba_ms)
        # what a networkx user pays given the conflict pairs: building G, then colouring
        row("segment_vs_build_and_color", "networkx_largest_first", N, X.nnz,
            build_ms + nx_ms, numba_ms)

    if not args.no_python:
        n = min(args.python_docs, N)
        Xs = X[:n]
        sub_ms = median_ms(lambda: shl.segment_labels(Xs, C, tau=args.tau), args.repeats)
        t0 = time.perf_counter()
        ref = segment_labels_python(Xs, C, tau=args.tau)
        py_ms = 1e3 * (time.perf_counter() - t0)
        fast = shl.segment_labels(Xs, C, tau=args.tau)
        same = (fast.order.tolist() == ref.order.tolist()
                and fast.offsets.tolist() == ref.offsets.tolist())
        print(f"python subset N={n}: output identical to numba: {same}")
        row("segment_subset", "numba", n, Xs.nnz, sub_ms, sub_ms)
        row("segment_subset", "python", n, Xs.nnz, py_ms, sub_ms)

    sha, date = commit(), datetime.datetime.now().isoformat(timespec="seconds")
    print(f"\n{'benchmark':<29}{'impl':<24}{'N':>8}{'C':>7}{'nnz':>10}{'ms':>10}"
          f"{'numba x':>9}")
    for r in rows:
        r.update(commit=sha, date=date)
        print(f"{r['benchmark']:<29}{r['impl']:<24}{r['N']:>8}{r['C']:>7}{r['nnz']:>10}"
              f"{r['ms']:>10}{r['speedup']:>9}")
    print("numba x = impl ms / numba ms on the same input: coloring_only against numba's "
          "greedy alone, segment_vs_coloring against the whole numba pipeline")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"segmentation-{host()}.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
