"""Forward+backward time of every loss backend against eager PyTorch and torch.compile.

Same inputs for every backend, median of repeats after warm-up; prints a table of ratios
and appends rows to benchmarks/results/<device>.csv.
Usage: python benchmarks/bench_loss.py [--device cpu|cuda] [--quick-gpu] [--losses shl,bce]
       [--float-targets | --csr-targets]
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import shl_kernels as shl
from shl_kernels.backends import available_backends
from shl_kernels.reference import shl_loss_reference

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["benchmark", "backend", "baseline", "device", "dtype", "B", "C", "m", "ms",
           "baseline_ms", "speedup", "commit", "date"]


def device_name(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = platform.processor() or "cpu"
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            for line in cpuinfo.read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        name = f"{name} x{torch.get_num_threads()}"
    return name


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def commit() -> str:
    """Short commit of the code measured (GIT_COMMIT overrides: a device run's copy of the
    tree may carry an older .git)."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def unequal_segmentation(C: int, m: int, gen: torch.Generator,
                         ordered: bool = False) -> shl.Segmentation:
    """m segments of very unequal sizes (Dirichlet split), labels shuffled like a real head
    (ordered=True: a head already in segment order, see Segmentation.reorder_head)."""
    share = torch.distributions.Dirichlet(torch.full((m,), 0.5)).sample()
    sizes = (share * (C - m)).floor().long() + 1
    sizes[0] += C - int(sizes.sum())
    perm = (torch.arange(C) if ordered else torch.randperm(C, generator=gen)).tolist()
    segs, start = [], 0
    for s in sizes.tolist():
        segs.append(perm[start:start + s])
        start += s
    return shl.Segmentation.from_segments(segs, C)


def make_inputs(B: int, C: int, m: int, dtype: torch.dtype, device: str, seed: int = 0,
                ordered: bool = False):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    seg = unequal_segmentation(C, m, gen, ordered)
    z = (torch.randn(B, C, generator=gen) * 3).to(device=device, dtype=dtype)
    # ~15 positives per row at most one per segment, like a coding model's targets
    pos = torch.zeros(B, C, dtype=torch.bool)
    seg_of = seg.segment_of
    for i in range(B):
        cand = torch.randperm(C, generator=gen)[:60]
        chosen, used = [], set()
        for c in cand.tolist():
            k = int(seg_of[c])
            if k not in used:
                used.add(k)
                chosen.append(c)
            if len(chosen) == 15:
                break
        pos[i, chosen] = True
    w = shl.harmonic_weights(torch.randint(1, 5000, (C,), generator=gen), beta=0.5).to(device)
    eta = torch.zeros(seg.num_segments, device=device, requires_grad=True)
    return seg, z, pos.to(device), w, eta


def csr_of(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (indptr, indices) CSR form of dense 0/1 targets, on their device."""
    rows, cols = pos.nonzero(as_tuple=True)
    indptr = torch.zeros(pos.shape[0] + 1, dtype=torch.int64, device=pos.device)
    indptr[1:] = torch.bincount(rows, minlength=pos.shape[0]).cumsum(0)
    return indptr, cols.contiguous()


def time_fb(fn: Callable[[], torch.Tensor], z: torch.Tensor, repeats: int, warmup: int) -> float:
    """Median ms of forward+backward."""
    cuda = z.is_cuda
    times = []
    for i in range(warmup + repeats):
        z.grad = None
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn().backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def shl_runners(seg, z, pos, w, eta, backends: list[str],
                fused_targets=None) -> dict[str, Callable]:
    """fused_targets: what the fused backends get instead of pos (e.g. its CSR form)."""
    t = pos if fused_targets is None else fused_targets
    runners = {
        b: (lambda b=b: shl.segmented_harmonic_loss(z, t, seg, label_weights=w,
                                                     null_logits=eta, backend=b))
        for b in backends if b != "torch"
    }
    runners["eager"] = lambda: shl_loss_reference(z, pos, seg, w, eta)
    compiled = torch.compile(lambda z, pos, w, eta: shl_loss_reference(z, pos, seg, w, eta))
    runners["torch.compile"] = lambda: compiled(z, pos, w, eta)
    return runners


def elementwise_runners(loss: str, z, pos, backends: list[str]) -> dict[str, Callable]:
    """BCE / focal / ASL: fused backends against the torch formulas of baselines.py."""
    from shl_kernels import baselines
    from shl_kernels.kernels_elementwise import KINDS, ElemSpec, why_unavailable_elementwise

    public = {"bce": shl.bce_loss, "focal": shl.focal_loss, "asl": shl.asymmetric_loss}[loss]
    spec = {"bce": ElemSpec(KINDS["bce"]),
            "focal": ElemSpec(KINDS["focal"], alpha=0.25, gamma=2.0),
            "asl": ElemSpec(KINDS["asl"], gamma_pos=1.0, gamma_neg=4.0, clip=0.05)}[loss]
    formula = baselines._TORCH[spec.kind]
    y = pos.bool()

    def reference(z, y):
        acc = torch.float64 if z.dtype == torch.float64 else torch.float32
        return baselines._reduce(formula(z.to(acc), y, spec, None, None), "mean", z.dtype)

    runners = {b: (lambda b=b: public(z, pos, backend=b))
               for b in backends if why_unavailable_elementwise(b) is None}
    runners["eager"] = lambda: reference(z, y)
    compiled = torch.compile(reference)
    runners["torch.compile"] = lambda: compiled(z, y)
    return runners


def append_csv(rows: list[dict], out_dir: str) -> None:
    """Append rows to <out_dir>/<device>.csv (per shape, so a run cut short keeps them)."""
    if not rows:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{slug(rows[0]['device'])}.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            wr.writeheader()
        wr.writerows(rows)
    print(f"appended {len(rows)} rows to {path}", flush=True)


def run(args) -> list[dict]:
    device = args.device
    dev_name = device_name(device)
    shapes = ([(4096, 32768, 100, torch.bfloat16), (16, 8192, 64, torch.float32)]
              if args.quick_gpu else
              [(512, 8192, 64, torch.float32), (16, 8192, 64, torch.float32)])
    if args.shape:
        B, C, m = map(int, args.shape.split(","))
        shapes = [(B, C, m, getattr(torch, args.dtype))]
    backends = [b for b in available_backends() if b != "torch" and
                (b == "cpu") == (device == "cpu")]
    rows, stamp, sha = [], datetime.date.today().isoformat(), commit()
    print(f"device: {dev_name}; backends: {backends}; torch {torch.__version__}")
    inputs: dict = {}
    n_written = 0
    # SHL first over every shape (a time-limited device run keeps what matters most); inputs
    # are built once per shape (the targets take a Python loop over rows: seconds at B=4096).
    for loss, (B, C, m, dtype) in ((k, s) for k in args.losses.split(",") for s in shapes):
        if (B, C, m, dtype) not in inputs:
            inputs[B, C, m, dtype] = make_inputs(B, C, m, dtype, device,
                                                 ordered=args.segment_ordered)
        seg, z0, pos, w, eta = inputs[B, C, m, dtype]
        if args.float_targets:  # what BCE-style data pipelines hand over
            pos = pos.float()
        z = z0.clone().requires_grad_(True)
        runners = (shl_runners(seg, z, pos, w, eta, backends,
                               csr_of(pos) if args.csr_targets else None) if loss == "shl" else
                   elementwise_runners(loss, z, pos, backends))
        ms = {}
        for name, fn in runners.items():
            warm = args.warmup + (2 if name == "torch.compile" else 0)
            try:
                ms[name] = time_fb(fn, z, args.repeats, warm)
            except Exception as e:  # noqa: BLE001 - a failing backend is reported, not fatal
                print(f"  {name}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        for b in backends:
            if b not in ms:
                continue
            for base in ("eager", "torch.compile"):
                if base not in ms:
                    continue
                name = loss + ("_segment_ordered" if args.segment_ordered else "") + (
                    "_float_targets" if args.float_targets else "") + (
                    "_csr_targets" if args.csr_targets and loss == "shl" else "")
                rows.append({"benchmark": f"{name}_fwd_bwd", "backend": b, "baseline": base,
                             "device": dev_name, "dtype": str(dtype).replace("torch.", ""),
                             "B": B, "C": C, "m": seg.num_segments, "ms": round(ms[b], 4),
                             "baseline_ms": round(ms[base], 4),
                             "speedup": round(ms[base] / ms[b], 2), "commit": sha,
                             "date": stamp})
        print(f"\n{loss} B={B} C={C} m={seg.num_segments} {dtype}: " +
              ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()), flush=True)
        append_csv(rows[n_written:], args.out)
        n_written = len(rows)
    print(f"\n{'loss':<6} {'backend':<8} {'baseline':<14} {'shape':<18} {'dtype':<9} "
          f"{'ms':>9} {'base ms':>9} {'speedup':>8}")
    for r in rows:
        shape = f"{r['B']}x{r['C']}/{r['m']}"
        print(f"{r['benchmark'].split('_')[0]:<6} {r['backend']:<8} {r['baseline']:<14} "
              f"{shape:<18} {r['dtype']:<9} "
              f"{r['ms']:>9.3f} {r['baseline_ms']:>9.3f} {r['speedup']:>7.2f}x")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick-gpu", action="store_true", help="the H100 shapes of issue 4")
    p.add_argument("--shape", help="B,C,m (overrides the presets)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--losses", default="shl,bce,focal,asl",
                   help="comma list of shl, bce, focal, asl")
    p.add_argument("--float-targets", action="store_true",
                   help="targets as float32 0/1 (converted and checked by the fused losses)")
    p.add_argument("--csr-targets", action="store_true",
                   help="SHL: the fused losses get the targets as CSR (indptr, indices), "
                        "converted and checked per call; eager and compiled take them dense")
    p.add_argument("--segment-ordered", action="store_true",
                   help="logits already in segment order (identity-order fast path)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=os.environ.get("OUT") or str(RESULTS))
    args = p.parse_args()
    run(args)

if __name__ == "__main__":
    main()
