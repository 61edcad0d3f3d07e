"""Noise detection (`find_noisy_labels`) at MIMIC-like scale: time, FAISS vs a torch
brute-force neighbour search, and how many planted label errors it finds.

Synthetic data (see make_data): notes of topics of very unequal sizes, each topic with its
profile codes, on top of Zipf background codes (as in bench_segmentation); planted wrong
and missing codes. How many of them are found depends on this generator: the figures show
the detector works where similar notes do share codes, not how noisy real data is.
Times: one run after a small warm-up. Appends rows to benchmarks/results/noise-<host>.csv.
Usage: python benchmarks/bench_noise.py [--N 50000] [--C 8000] [--dim 384] [--k 30]
"""
from __future__ import annotations

import argparse
import csv
import datetime
import time
from pathlib import Path

import numpy as np
import torch
from bench_loss import commit
from bench_segmentation import host, zipf_labels

from shl_kernels.noise import _neighbors, find_noisy_labels

RESULTS = Path(__file__).resolve().parent / "results"


def make_data(N: int, C: int, dim: int, n_plant: int, topics: int = 50, seed: int = 0):
    """Documents of `topics` topics of very unequal sizes; a topic's note embeddings scatter
    around its centre and its notes carry its 3 profile codes
    on top of Zipf background codes. Planted: a profile code of one of the 10 largest
    topics added to notes of other topics (wrong codes), and one of a note's own profile
    codes removed (missing codes)."""
    rng = np.random.default_rng(seed)
    size = rng.dirichlet(np.full(topics, 0.2))
    topic = rng.choice(topics, N, p=size)
    profile = rng.permutation(C)[: 3 * topics].reshape(topics, 3)
    y = zipf_labels(N, C, mean_labels=10.0, seed=seed).tolil()
    rows = [sorted(set(r) | set(profile[t].tolist()))
            for r, t in zip(y.rows, topic)]
    centers = rng.normal(size=(topics, dim)).astype(np.float32) * 0.25
    x = (centers[topic] + rng.normal(size=(N, dim)) / np.sqrt(dim)).astype(np.float32)
    big = np.argsort(-size)[:10]
    wrong, missing = set(), set()
    docs = rng.permutation(N)
    for i in docs[:n_plant]:
        t = int(rng.choice([b for b in big if b != topic[i]]))
        c = int(rng.choice([c for c in profile[t] if c not in rows[i]] or [profile[t][0]]))
        if c not in rows[i]:
            rows[i] = sorted([*rows[i], c])
            wrong.add((int(i), c))
    for i in docs[n_plant:]:
        own = [c for c in profile[topic[i]] if c in rows[i]]
        if own and len(missing) < n_plant:
            c = int(rng.choice(own))
            rows[i] = [d for d in rows[i] if d != c]
            missing.add((int(i), c))
    return x, rows, wrong, missing


def torch_neighbors(x: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    """Brute force with torch: cosine similarities chunk by chunk, top k + 1, self dropped."""
    t = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    out = []
    for s in range(0, len(t), chunk):
        sim = t[s:s + chunk] @ t.T
        sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = -float("inf")
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--N", type=int, default=50_000)
    p.add_argument("--C", type=int, default=8_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=30)
    p.add_argument("--plant", type=int, default=500)
    args = p.parse_args()
    x, rows, wrong, missing = make_data(args.N, args.C, args.dim, args.plant)
    find_noisy_labels(x[:2000], rows[:2000], num_labels=args.C, k=args.k)  # warm-up

    t0 = time.perf_counter()
    rep = find_noisy_labels(x, rows, num_labels=args.C, k=args.k, progress=True)
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids, _ = _neighbors(x.copy(), args.k, "cosine", "auto", 4096, False)
    faiss_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids_torch = torch_neighbors(x, args.k)
    torch_s = time.perf_counter() - t0
    same = float((np.sort(ids, 1) == np.sort(ids_torch, 1)).all(1).mean())

    found_pos, found_miss = (set(map(tuple, a.tolist()))
                             for a in (rep.suspect_positive, rep.suspect_missing))
    rec_pos = len(found_pos & wrong) / len(wrong)
    rec_miss = len(found_miss & missing) / len(missing)
    prec = len((found_pos & wrong) | (found_miss & missing)) / max(1, rep.num_flagged)
    print(rep.summary(top=5))
    print(f"\nN={args.N} C={args.C} dim={args.dim} k={args.k} torch threads "
          f"{torch.get_num_threads()}")
    print(f"find_noisy_labels total {total:.2f} s; neighbour search: faiss {faiss_s:.2f} s, "
          f"torch brute force {torch_s:.2f} s ({torch_s / faiss_s:.2f}x faiss); "
          f"same neighbour sets for {100 * same:.1f}% of documents")
    print(f"planted: {len(wrong)} wrong codes, recall {rec_pos:.2f}; {len(missing)} removed "
          f"codes, recall {rec_miss:.2f}; flagged {rep.num_flagged} pairs "
          f"({100 * rep.num_flagged / sum(map(len, rows)):.2f}% of labels), of which "
          f"{100 * prec:.1f}% planted")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"noise-{host()}.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        wr = csv.writer(f)
        if new:
            wr.writerow(["N", "C", "dim", "k", "total_s", "faiss_s", "torch_s", "recall_wrong",
                         "recall_missing", "flagged", "planted_share", "commit", "date"])
        wr.writerow([args.N, args.C, args.dim, args.k, round(total, 3), round(faiss_s, 3),
                     round(torch_s, 3), round(rec_pos, 3), round(rec_miss, 3), rep.num_flagged,
                     round(prec, 3), commit(), datetime.date.today().isoformat()])
    print(f"appended a row to {path}")


if __name__ == "__main__":
    main()
