"""Scratch timing (not a test): FusedSHL + native CPU kernel vs the eager reference,
forward + backward, median of repeats. Usage: python benchmarks/_scratch_cpu_timing.py"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from shl_kernels import Segmentation
from shl_kernels.fused import FusedSHL
from shl_kernels.kernels_cpu import shl_fused_cpu
from shl_kernels.reference import shl_loss_reference


def make(B: int, C: int, m: int, dtype: torch.dtype, identity: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(C - 1, generator=g)[: m - 1] + 1).values.tolist()
    ids = list(range(C)) if identity else torch.randperm(C, generator=g).tolist()
    bounds = [0, *cuts, C]
    seg = Segmentation.from_segments([ids[a:b] for a, b in zip(bounds, bounds[1:])], C)
    z = torch.randn(B, C, generator=g).to(dtype) * 3
    pos = (torch.rand(B, C, generator=g) < 5.0 / C).to(torch.uint8)
    eta = torch.zeros(m, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return seg, z, pos, eta


def timeit(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--no-ref", action="store_true")
    args = ap.parse_args()
    for B, C, m, dtype, identity in [(512, 8192, 64, torch.float32, False),
                                     (512, 8192, 64, torch.float32, True),
                                     (16, 8192, 64, torch.float32, False),
                                     (512, 8192, 64, torch.bfloat16, False),
                                     (512, 8192, 64, torch.float64, False)]:
        seg, z, pos, eta = make(B, C, m, dtype, identity)
        order = None if identity else seg.order
        zk = z.clone().requires_grad_()
        ek = eta.clone().requires_grad_()

        def fused():
            FusedSHL.apply(shl_fused_cpu, zk, pos, None, order, seg.offsets, None, ek, None,
                           "mean").backward()

        def ref():
            shl_loss_reference(zk, pos, seg, None, ek, None, None, "mean").backward()

        tf = timeit(fused, args.reps)
        line = f"B={B} C={C} m={m} {str(dtype):15s} order={'id ' if identity else 'perm'} fused {tf * 1e3:8.3f} ms"
        if not args.no_ref:
            tr = timeit(ref, max(3, args.reps // 3))
            line += f"  eager ref {tr * 1e3:8.2f} ms  speedup {tr / tf:6.1f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
