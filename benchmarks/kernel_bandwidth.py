"""Kernel-only time of the fused SHL kernels on a GPU and the bandwidth it amounts to.

Bytes counted: z read, targets (uint8) read, gradient written, once each: the least any
fused kernel must move. Compared with a device-to-device copy measured in the same run.
Variants: CUDA staged (rows in shared memory; flat schedule, or the group schedule where
--block-mins adds ones with other thresholds for block-wide segments) and unstaged, Triton; each on logits in the original (shuffled)
label order and in segment order (`Segmentation.reorder_head`). Times are GPU time of calls
queued back to back (see cuda_ms), so small shapes show the kernel, not the launch rate.
Usage: python benchmarks/kernel_bandwidth.py [--shape B,C,m] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from bench_loss import make_inputs

from shl_kernels.backends import why_unavailable


def cuda_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median GPU time in ms of one call, from CUDA events (warm-up runs excluded). The calls
    are queued behind a GPU sleep longer than it takes the host to enqueue them, so they run
    back to back and the events time the GPU work alone: timed one by one, a small shape
    would measure the host's launch rate instead."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    host_ms = (time.perf_counter() - t0) * 1e3  # an upper bound of the host time per call
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    torch.cuda._sleep(int(2e6 * (2 * repeats * host_ms + 1)))  # >= 2x that in ms at <= 2 GHz
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def copy_gbps(nbytes: int = 1 << 30) -> float:
    x = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * nbytes / cuda_ms(lambda: y.copy_(x)) / 1e6


def with_zero_delta(fn: Callable) -> Callable:
    """fn called with logit offsets of zeros where it gets none: the same answer through the
    kernel compiled for logit offsets (what every call took before the variant without)."""
    zeros: dict = {}

    def call(z, pos, ign, order, offsets, w, eta, delta, *rest, **kw):
        if delta is None:
            acc = torch.float64 if z.dtype == torch.float64 else torch.float32
            key = (z.shape[1], acc, z.device)
            if key not in zeros:
                zeros[key] = torch.zeros(z.shape[1], dtype=acc, device=z.device)
            delta = zeros[key]
        return fn(z, pos, ign, order, offsets, w, eta, delta, *rest, **kw)

    return call


def kernels(block_mins: list[int], row_bytes: int = 0) -> dict[str, Callable]:
    """Kernel variants by name: "cuda staged" (flat schedule, cp.async staging; rows larger
    than shared memory in windows), "cuda windows/2" (a row of `row_bytes` in shared memory
    in windows of about half of it: what a window costs; rows larger than shared memory:
    "cuda windows/100KB", windows of at most 100 KB, two blocks per SM, against the default's
    largest windows at one block per SM), "cuda staged/delta" (with logit offsets of zeros:
    the kernel compiled for them), "cuda staged/256t" (blocks of 256
    threads: three rows per SM), "cuda staged/sync" (plain loads), "cuda staging only" (rows
    staged and unstaged, not computed: the time of the way in and out, a floor for the
    staged kernel; wrong results), "cuda groups" (the group schedule), "cuda groups/B" (segments of >= B labels block-wide; "off": never), "triton"
    (programs per window of segment positions), "triton staged" (shuffled rows staged on chip,
    triton_staged.py; segment order or rows too large: as "triton"): for choosing these on
    the device."""
    out = {}
    if why_unavailable("cuda") is None:
        from shl_kernels.kernels_cuda import shl_fused_cuda
        out["cuda staged"] = partial(shl_fused_cuda, staged=True, flat=True)
        if row_bytes > 200 << 10:
            out["cuda windows/100KB"] = partial(shl_fused_cuda, staged=True, flat=True,
                                                window_bytes=100 << 10)
        elif row_bytes:
            out["cuda windows/2"] = partial(shl_fused_cuda, staged=True, flat=True,
                                            window_bytes=row_bytes // 2 + 4096)
        out["cuda staged/delta"] = with_zero_delta(partial(shl_fused_cuda, staged=True,
                                                           flat=True))
        out["cuda staged/256t"] = partial(shl_fused_cuda, staged=True, flat=True,
                                          staged_threads=256)
        out["cuda staged/sync"] = partial(shl_fused_cuda, staged=True, flat=True,
                                          async_staging=False)
        # the floor of the staged design: rows in and out, nothing computed (wrong results)
        out["cuda staging only"] = partial(shl_fused_cuda, staged=True, flat=True,
                                           staging_only=True)
        out["cuda groups"] = partial(shl_fused_cuda, staged=True, flat=False)
        for b in block_mins:
            out[f"cuda groups/{'off' if b >= 1 << 40 else b}"] = partial(
                shl_fused_cuda, staged=True, flat=False, block_min=b)
        out["cuda unstaged"] = partial(shl_fused_cuda, staged=False)
    if why_unavailable("triton") is None:
        from shl_kernels.triton_shl import shl_fused_triton
        out["triton"] = partial(shl_fused_triton, staged=False)
        out["triton staged"] = partial(shl_fused_triton, staged=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", action="append",
                   help="B,C,m (repeatable; default 4096,32768,100 and 16,8192,64)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kernels", help="comma list of kernel names (see kernels())")
    p.add_argument("--orders", default="shuffled,segment", help="shuffled, segment or both")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--block-mins", default="",
                   help="extra staged variants: comma list of block-wide segment sizes or off")
    args = p.parse_args()
    block_mins = [1 << 40 if b.strip() == "off" else int(b)
                  for b in args.block_mins.split(",") if b.strip()]
    wanted = None if args.kernels is None else {k.strip() for k in args.kernels.split(",")}
    shapes = [tuple(map(int, s.split(","))) for s in args.shape or
              ["4096,32768,100", "16,8192,64"]]
    dtype = getattr(torch, args.dtype)
    bw = copy_gbps()
    print(f"{torch.cuda.get_device_name(0)}: copy {bw:.0f} GB/s (read + write)")
    print(f"{'shape':<18} {'dtype':<9} {'labels':<9} {'kernel':<18} {'ms':>8} {'GB/s':>7} "
          f"{'% copy':>7}", flush=True)
    for B, C, m in shapes:
        if why_unavailable("cuda") is None:
            from shl_kernels.backends import native
            blocks, nbytes = native().cuda_staged_occupancy(args.dtype, C)
            print(f"staged CUDA kernel, C={C}: {nbytes} B shared memory, {blocks} blocks/SM")
        for ordered in [o == "segment" for o in args.orders.split(",")]:
            seg, z, pos, w, eta = make_inputs(B, C, m, dtype, "cuda", ordered=ordered)
            order = None if seg.is_identity_order else seg.order.cuda()
            offsets = seg.offsets.cuda()
            nbytes = B * C * (2 * z.element_size() + 1)
            for name, fn in kernels(block_mins, C * z.element_size()).items():
                if wanted is not None and name not in wanted:
                    continue
                call = partial(fn, z, pos.view(torch.uint8), None, order, offsets, w,
                               eta.detach(), None, 1.0 / B, True)
                try:
                    ms = cuda_ms(call, args.repeats, args.warmup)
                except Exception as e:  # noqa: BLE001 - one failing kernel is reported
                    print(f"  {name}: failed: {type(e).__name__}: {e}", flush=True)
                    continue
                gbps = nbytes / ms / 1e6
                print(f"{f'{B}x{C}/{m}':<18} {args.dtype:<9} "
                      f"{'segment' if ordered else 'shuffled':<9} {name:<18} {ms:>8.3f} "
                      f"{gbps:>7.0f} {100 * gbps / bw:>6.0f}%", flush=True)


if __name__ == "__main__":
    main()
