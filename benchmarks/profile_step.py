"""Where the time of one small SHL training step goes on a GPU (issue 4's B=16 target):
host time per step, GPU kernel time, and the torch.profiler table of the ops it launches.

Usage: python benchmarks/profile_step.py [--shape 16,8192,64] [--backends cuda,triton]
       [--cprofile N] [--direct-ab]
"""
from __future__ import annotations

import argparse
import time

import torch
from bench_loss import make_inputs, time_fb
from torch.profiler import ProfilerActivity, profile

import shl_kernels as shl
from shl_kernels.backends import why_unavailable
from shl_kernels.reference import shl_loss_reference


def _host_us(fn, sync, n: int = 200) -> float:
    """Host time of fn in microseconds (median of 5 batches of n calls; queued, not synced)."""
    for _ in range(20):
        fn()
    sync()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n * 1e6)
        sync()
    return sorted(times)[2]


def host_costs(z, pos, seg, w, eta, backend, sync) -> dict[str, float]:
    """Where a step's host time goes: one small torch op (the unit a launch costs), the fused
    loss forward alone, its backward alone, and the kernel wrapper alone."""
    from shl_kernels.backends import fused_kernel
    from shl_kernels.loss import _seg_tensors

    small = torch.zeros(16, device=z.device)
    out = {"one small op (x.mul_(1))": _host_us(lambda: small.mul_(1.0), sync)}

    def forward():
        return shl.segmented_harmonic_loss(z, pos, seg, label_weights=w, null_logits=eta,
                                           backend=backend)

    out["loss forward"] = _host_us(forward, sync)
    losses = []

    def backward():
        z.grad = None
        losses.pop().backward()

    def fb():
        losses.append(forward())
        backward()

    out["forward + backward"] = _host_us(fb, sync)
    out["backward (difference)"] = out["forward + backward"] - out["loss forward"]
    order, offsets = _seg_tensors(seg, z.device)
    kernel = fused_kernel(backend)
    pos8 = pos.view(torch.uint8)
    out["kernel wrapper alone"] = _host_us(
        lambda: kernel(z.detach(), pos8, None, order, offsets, w, eta.detach(), None,
                       1.0 / z.shape[0], True), sync)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="16,8192,64")
    p.add_argument("--backends", default="cuda,triton")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cprofile", type=int, default=0, metavar="N",
                   help="also print the N Python functions of most own time in 200 steps")
    p.add_argument("--direct-ab", action="store_true",
                   help="only compare Triton steps with and without direct launches "
                        "(triton_launch.DirectLaunch) side by side, with eager beside them")
    args = p.parse_args()
    B, C, m = map(int, args.shape.split(","))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of the script
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if args.direct_ab:
        direct_ab(B, C, m, device)
        return
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    seg, z0, pos, w, eta = make_inputs(B, C, m, torch.float32, device)
    for backend in args.backends.split(","):
        if why_unavailable(backend) is not None:
            print(f"{backend}: unavailable ({why_unavailable(backend)})")
            continue
        z = z0.clone().requires_grad_(True)

        def step(backend=backend, z=z):
            z.grad = None
            shl.segmented_harmonic_loss(z, pos, seg, label_weights=w, null_logits=eta,
                                        backend=backend).backward()

        for _ in range(5):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        host = (time.perf_counter() - t0) / args.steps * 1e6
        sync()
        wall = (time.perf_counter() - t0) / args.steps * 1e6
        with profile(activities=activities) as prof:
            for _ in range(10):
                step()
            sync()
        print(f"\n{backend} B={B} C={C} m={m}: host {host:.0f} us/step (no sync), "
              f"{wall:.0f} us/step with the final sync")
        for name, us in host_costs(z, pos, seg, w, eta, backend, sync).items():
            print(f"  host {name}: {us:.1f} us")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18,
                                        max_name_column_width=48))
        if args.cprofile:
            python_profile(step, sync, args.cprofile)


def direct_ab(B: int, C: int, m: int, device: str, rounds: int = 7, steps: int = 30) -> None:
    """Forward+backward ms (bench_loss.time_fb: synced steps, median) of the Triton SHL and
    BCE losses with direct launches on and off, interleaved round by round, and of the eager
    SHL reference; prints the median over rounds of each."""
    why = why_unavailable("triton")
    if device != "cuda" or why is not None:
        print(f"direct-ab: needs the triton backend on a GPU ({why or 'no GPU'})")
        return
    from shl_kernels.triton_launch import direct_launches

    seg, z0, pos, w, eta = make_inputs(B, C, m, torch.float32, device)
    z = z0.clone().requires_grad_(True)
    runs = {
        "shl triton": lambda: shl.segmented_harmonic_loss(z, pos, seg, label_weights=w,
                                                          null_logits=eta, backend="triton"),
        "bce triton": lambda: shl.bce_loss(z, pos, backend="triton"),
        "shl eager": lambda: shl_loss_reference(z, pos, seg, w, eta),
    }
    cases = [(name, on) for name in runs for on in ((True, False) if "triton" in name else
                                                       (True,))]
    times: dict[tuple, list[float]] = {c: [] for c in cases}
    for _ in range(rounds):
        for name, on in cases:
            with direct_launches(on):
                times[(name, on)].append(time_fb(runs[name], z, steps, warmup=3))
    med = {c: sorted(t)[len(t) // 2] for c, t in times.items()}
    eager = med[("shl eager", True)]
    print(f"\ndirect launches A/B, B={B} C={C} m={m} fp32, ms per forward+backward "
          f"(median of {rounds} interleaved rounds of {steps} synced steps)")
    for name in ("shl triton", "bce triton"):
        on, off = med[(name, True)], med[(name, False)]
        print(f"  {name}: direct {on:.3f}, Triton's launch path {off:.3f} "
              f"({off / on:.2f}x); shl eager {eager:.3f} = {eager / on:.2f}x / {eager / off:.2f}x")


def python_profile(step, sync, top: int, n: int = 200) -> None:
    """cProfile of n steps: the Python functions (and C calls) of most own time per step."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        step()
    sync()
    prof.disable()
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    print(f"  cProfile, own time per step (us), {n} steps:")
    for (file, line, fn), (_, ncalls, tottime, cumtime, _) in rows:
        where = f"{file.rsplit('/', 1)[-1]}:{line}"
        print(f"  {tottime / n * 1e6:8.1f} own {cumtime / n * 1e6:8.1f} cum "
              f"{ncalls / n:5.1f}x  {fn} ({where})")


if __name__ == "__main__":
    main()
