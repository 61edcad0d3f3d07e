"""Scratch timing, not a test: forward + backward of FusedSHL with the native CPU kernel
against the eager reference (and torch.compile of it with --compile), median of repeats.

    python benchmarks/_scratch_cpu_timing.py [--reps 30] [--compile]
"""
from __future__ import annotations

import argparse
import statistics
import time
from itertools import pairwise

import torch

from shl_kernels import Segmentation
from shl_kernels.fused import FusedSHL
from shl_kernels.kernels_cpu import shl_fused_cpu
from shl_kernels.reference import shl_loss_reference

CASES = [  # B, C, m, dtype, identity order
    (512, 8192, 64, torch.float32, False),
    (512, 8192, 64, torch.float32, True),
    (16, 8192, 64, torch.float32, False),
    (512, 8192, 64, torch.bfloat16, False),
    (512, 8192, 64, torch.float64, False),
]


def make(B: int, C: int, m: int, dtype: torch.dtype, identity: bool, seed: int = 0):
    """Segments of unequal sizes (random cut points), ~5 positives per row."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(C - 1, generator=g)[: m - 1] + 1).values.tolist()
    ids = list(range(C)) if identity else torch.randperm(C, generator=g).tolist()
    seg = Segmentation.from_segments([ids[a:b] for a, b in pairwise([0, *cuts, C])], C)
    z = (torch.randn(B, C, generator=g) * 3).to(dtype)
    pos = (torch.rand(B, C, generator=g) < 5.0 / C).to(torch.uint8)
    eta = torch.zeros(m, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return seg, z, pos, eta


def median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def fwd_bwd(loss_fn, *args):
    """Forward + backward, leaves' .grad reset first (no accumulation between repeats)."""
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def step():
        for t in leaves:
            t.grad = None
        loss_fn(*args).backward()
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(reference)")
    args = ap.parse_args()
    ref_compiled = torch.compile(shl_loss_reference) if args.compile else None
    print(f"threads={torch.get_num_threads()}")
    for B, C, m, dtype, identity in CASES:
        seg, z, pos, eta = make(B, C, m, dtype, identity)
        order = None if identity else seg.order
        zk, ek = z.clone().requires_grad_(), eta.clone().requires_grad_()
        fused = fwd_bwd(FusedSHL.apply, shl_fused_cpu, zk, pos, None, order, seg.offsets,
                        None, ek, None, "mean")
        eager = fwd_bwd(shl_loss_reference, zk, pos, seg, None, ek, None, None, "mean")
        tf = median_time(fused, args.reps)
        te = median_time(eager, max(3, args.reps // 5))
        line = (f"B={B:4d} C={C} m={m} {dtype!s:15s} order={'identity' if identity else 'perm'}"
                f"  fused {tf * 1e3:7.3f} ms  eager {te * 1e3:8.2f} ms ({te / tf:5.1f}x)")
        if ref_compiled is not None:
            comp = fwd_bwd(ref_compiled, zk, pos, seg, None, ek, None, None, "mean")
            comp()  # compile outside the timing
            tc = median_time(comp, max(3, args.reps // 5))
            line += f"  compiled {tc * 1e3:7.2f} ms ({tc / tf:5.1f}x)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
