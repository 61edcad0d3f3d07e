"""Differential fuzzing of the fused backends (SHL; BCE, focal, ASL) against the float64
reference.

Each case is a random problem drawn from its own seed (sizes from 1 label up, segments of
very unequal sizes, empty segments, shuffled or identity order, every dtype, logit scales up
to 1000 with -inf entries, positives from none to all, ignore masks, wide label weights,
null logits and logit offsets, dense/float/CSR targets, every reduction, in place,
column-major logits; or an elementwise loss with its weights and exponents, `--losses`).
Every backend asked for runs it through the public API; its loss and its gradients of the
logits, null logits and logit offsets must be no worse than the
reference at the case's dtype (`backend="torch"`) against the reference in float64, plus a
small margin (see `compare`).
A failure prints the case and the seed that replays it (`--replay SEED`); the exit status
is 1 when any case failed.

Usage: python benchmarks/fuzz_backends.py [--device cpu|cuda] [--backends cpu,triton,cuda]
       [--seconds 60 | --cases N] [--seed 0] [--max-labels N] [--replay SEED]
       [--losses shl,bce,focal,asl]
On CPU: the `cpu` kernel; Triton under TRITON_INTERPRET=1 (small cases: --max-labels 300).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import shl_kernels as shl
from shl_kernels.backends import why_unavailable
from shl_kernels.segmentation import Segmentation

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
LOSSES = ("shl", "bce", "focal", "asl")
ELEMENTWISE = {"bce": shl.bce_loss, "focal": shl.focal_loss, "asl": shl.asymmetric_loss}
# Relative tolerance per value the kernels compute in float32 (fast-math exp/log on GPUs) or
# float64, and for gradients rounded to a 16-bit logit dtype.
RTOL = {torch.float64: 1e-10, torch.float32: 3e-5}
# An error may be up to this factor above the reference's own at the case's dtype.
NO_WORSE = 2.0


@dataclass
class Case:
    """A drawn problem (CPU tensors; `z` in the case's dtype)."""

    seed: int
    seg: Segmentation
    z: torch.Tensor
    targets: object  # bool/float [B, C] or (indptr, indices)
    pos: torch.Tensor  # bool [B, C], the targets as a mask
    ignore: torch.Tensor | None
    w: torch.Tensor | None
    eta: torch.Tensor | None
    delta: torch.Tensor | None
    reduction: str
    upstream: torch.Tensor
    inplace: bool
    notes: dict = field(default_factory=dict)
    loss: str = "shl"  # or an elementwise loss: w is its `weight`, loss_kw the rest
    loss_kw: dict = field(default_factory=dict)

    def describe(self) -> str:
        B, C = self.z.shape
        return (f"seed={self.seed} loss={self.loss} B={B} C={C} m={self.seg.num_segments} "
                + " ".join(f"{k}={v}" for k, v in self.notes.items()))


def _segmentation(r: random.Random, C: int) -> tuple[Segmentation, str]:
    """Segments of one of several shapes; raw offsets may hold empty segments anywhere."""
    shape = r.choice(["cuts", "one_big", "singletons", "zipf", "one"])
    if shape == "one" or C == 1:
        sizes = [C]
    elif shape == "singletons":
        sizes = [1] * C
    elif shape == "one_big":
        big = r.randint(C // 2, C)
        sizes = [big] + [1] * (C - big)
    elif shape == "zipf":
        sizes, left = [], C
        while left:
            s = min(left, max(1, int(left * r.random() ** 2)))
            sizes.append(s)
            left -= s
    else:
        m = r.randint(1, C)
        cuts = sorted(r.sample(range(1, C), m - 1))
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, C], strict=True)]
    r.shuffle(sizes)
    if r.random() < 0.2:  # empty segments: leading, trailing, inside
        for _ in range(r.randint(1, 4)):
            sizes.insert(r.choice([0, len(sizes), r.randint(0, len(sizes))]), 0)
        shape += "+empty"
    order = list(range(C))
    identity = r.random() < 0.3
    if not identity:
        r.shuffle(order)
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    seg = Segmentation(C, torch.tensor(order, dtype=torch.int64), offsets,
                       torch.zeros(C, dtype=torch.int64))
    return seg, shape + ("/identity" if identity else "/shuffled")


def draw(seed: int, max_labels: int, max_rows: int,
         losses: tuple[str, ...] = LOSSES) -> Case:
    """The case of `seed` (the same for the same arguments): C up to max_labels (log-uniform),
    B up to max_rows, the loss one of `losses`."""
    r = random.Random(seed)
    loss = r.choice(losses)
    g = torch.Generator().manual_seed(seed)
    C = max(1, round(max_labels ** r.random()))
    B = r.choice([1, 2, 3, r.randint(1, max_rows)])
    seg, shape = _segmentation(r, C)
    dtype = r.choice(DTYPES)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = r.choice([1.0, 5.0, 30.0, 150.0, 1000.0])
    z = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    if loss == "shl" and r.random() < 0.1:  # some -inf logits (SPEC 3 says what they do)
        z[torch.rand(B, C, generator=g) < 0.05] = float("-inf")
    z = z.to(dtype)
    density = r.choice([0.0, 0.001, 0.01, 0.1, 0.5, 1.0])
    pos = torch.rand(B, C, generator=g) < density
    if r.random() < 0.1:  # every label of one row's largest segment positive
        k = int(seg.segment_sizes.argmax())
        pos[0, seg.order[seg.offsets[k]:seg.offsets[k + 1]]] = True
    ign_p = r.choice([None, 0.0, 0.01, 0.2])
    ignore = None if ign_p is None else torch.rand(B, C, generator=g) < ign_p
    form = r.choice(["bool", "float", "csr"])
    if form == "float":
        targets = pos.to(r.choice([torch.float32, dtype]))
    elif form == "csr":
        idx = pos.nonzero()
        indptr = torch.zeros(B + 1, dtype=torch.int64)
        indptr[1:] = pos.sum(1).cumsum(0)
        targets = (indptr, idx[:, 1].contiguous())
    else:
        targets = pos
    wmode = r.choice(["none", "near1", "wide"])
    w = None
    if wmode == "near1":
        w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(acc)
    elif wmode == "wide":  # 1e-3 .. 1e3
        w = (10 ** (torch.rand(C, generator=g, dtype=torch.float64) * 6 - 3)).to(acc)
    eta = None
    if r.random() < 0.7:
        eta = (torch.randn(seg.num_segments, generator=g, dtype=torch.float64)
               * r.choice([0.5, scale])).to(acc)
    delta = None
    if r.random() < 0.4:
        delta = (torch.randn(C, generator=g, dtype=torch.float64) * 0.5).to(acc)
    reduction = r.choice(["mean", "sum", "none"])
    upstream = (torch.rand(B if reduction == "none" else (), generator=g, dtype=torch.float64)
                + 0.5)
    notes = {"dtype": str(dtype).removeprefix("torch."), "segments": shape, "scale": scale,
             "positives": density, "ignore": ign_p, "targets": form, "weights": wmode,
             "eta": eta is not None, "delta": delta is not None, "reduction": reduction}
    inplace = loss == "shl" and r.random() < 0.2
    notes["inplace"] = inplace
    notes["strided"] = not inplace and r.random() < 0.15  # column-major logits
    loss_kw = {}
    if loss != "shl":  # no segments, null logits or offsets; an upstream per element
        eta = delta = None
        notes["eta"] = notes["delta"] = False
        if loss != "bce":  # (label weights: BCE's only)
            w, notes["weights"] = None, "none"
        if reduction == "none":
            upstream = torch.rand(B, C, generator=g, dtype=torch.float64) + 0.5
        loss_kw = {
            "bce": lambda: {"pos_weight": None if r.random() < 0.5 else
                            (torch.rand(C, generator=g, dtype=torch.float64) * 3).to(acc)},
            "focal": lambda: {"alpha": r.choice([0.25, 0.9, -1.0]),
                              "gamma": r.choice([0.0, 0.5, 2.0])},
            "asl": lambda: {"gamma_neg": r.choice([0.0, 4.0]), "gamma_pos": r.choice([0.0, 1.0]),
                            "clip": r.choice([0.0, 0.05]),
                            "detach_focal_weight": r.random() < 0.5},
        }[loss]()
        notes.update({k: v for k, v in loss_kw.items() if not isinstance(v, torch.Tensor)})
    return Case(seed, seg, z, targets, pos, ignore, w, eta, delta, reduction, upstream,
                inplace, notes, loss, loss_kw)


def run(case: Case, backend: str, device: str, dtype: torch.dtype | None = None):
    """[loss, grad z, grad eta, grad delta] (None where absent) through the public API,
    as float64 CPU tensors; `dtype` recasts the logits (the references)."""
    dev = torch.device(device)
    zdt = dtype or case.z.dtype
    acc = torch.float64 if zdt == torch.float64 else torch.float32

    def to(x, dt=None):
        if x is None:
            return None
        if isinstance(x, tuple):
            return tuple(t.to(dev) for t in x)
        return x.to(dev, dt) if dt is not None and x.is_floating_point() else x.to(dev)

    leaf = case.z.to(dev, zdt).requires_grad_()
    z = leaf.clone() if case.inplace and backend != "torch" else leaf
    if case.notes.get("strided"):
        z = z.t().contiguous().t()
    eta = None if case.eta is None else to(case.eta, acc).requires_grad_()
    delta = None if case.delta is None else to(case.delta, acc).requires_grad_()
    if case.loss != "shl":
        kw = {k: to(v, acc) if isinstance(v, torch.Tensor) else v
              for k, v in case.loss_kw.items()}
        if case.w is not None:
            kw["weight"] = to(case.w, acc)
        loss = ELEMENTWISE[case.loss](z, to(case.targets), ignore=to(case.ignore),
                                      reduction=case.reduction, backend=backend, **kw)
    else:
        loss = shl.segmented_harmonic_loss(
            z, to(case.targets), case.seg, label_weights=to(case.w, acc), null_logits=eta,
            logit_offsets=delta, ignore=to(case.ignore), reduction=case.reduction,
            backend=backend, inplace=case.inplace and backend != "torch")
    wrt = [t for t in (leaf, eta, delta) if t is not None]
    grads = iter(torch.autograd.grad(loss, wrt, case.upstream.to(dev, loss.dtype)))
    out = [loss.detach(), next(grads)]
    out += [next(grads) if t is not None else None for t in (case.eta, case.delta)]
    return [None if t is None else t.detach().double().cpu() for t in out]


OUTPUTS = ("loss", "grad z", "grad eta", "grad delta")


def _bounds(case: Case, ref64: list) -> tuple[list, list]:
    """Per output, the bounds of compare's error terms: what an error of one unit of
    rounding per term adds up to (times rtol), and what flushing a float32 exp(u - M) below
    its smallest normal to 0 can cost (times that normal). Both from the per-row and
    segment F = upstream * (1 + the segment's positive weights), which bounds the
    gradient's factor S of a segment (SPEC 3: D_p >= A >= 1) and e^eta S + [no positive]:
    the loss: |value|, and its count of terms for the flush (log1p of a flushed ratio);
    grad z: |value| and F; grad eta: the sum of F over rows;
    grad delta: the sums over rows of |grad z| and of F."""
    B = case.z.shape[0]
    gz = ref64[1].abs().nan_to_num(0, 0, 0)
    if case.loss != "shl":
        return _elementwise_bounds(case, ref64, gz)
    up = case.upstream.expand(B) / (B if case.reduction == "mean" else 1)
    pos = case.pos & ~case.ignore if case.ignore is not None else case.pos
    pw = pos.double() * (1.0 if case.w is None else case.w.double())
    seg_of = case.seg.segment_at_position
    per_seg = torch.zeros(B, case.seg.num_segments, dtype=torch.float64).index_add_(
        1, seg_of, pw[:, case.seg.order])
    F = up[:, None] * (1 + per_seg)
    loss_terms = (1 + per_seg).sum(1)  # a row's loss: a term per segment and positive
    if case.reduction != "none":
        loss_terms = loss_terms.sum() / (B if case.reduction == "mean" else 1)
    F_label = torch.empty(B, case.z.shape[1], dtype=torch.float64)
    F_label[:, case.seg.order] = F[:, seg_of]  # original label order
    rounding = [ref64[0].abs(), gz, F.sum(0), gz.sum(0)]
    flush = [loss_terms, F_label, F.sum(0), F_label.sum(0)]
    return rounding, flush


def _elementwise_bounds(case: Case, ref64: list, gz: torch.Tensor) -> tuple[list, list]:
    """_bounds of an elementwise loss: |value| for rounding; for the flush (and the torch
    formulas' own error, see compare), per element (1 + |z|) weight (1 + pos_weight) (a
    loss term grows like |z|) for the loss, and that times upstream * (1 + gamma) for its
    gradient (the focal factors times BCE's)."""
    B, C = case.z.shape
    n = B * C if case.reduction == "mean" else 1
    elem = 1 + case.z.double().abs().nan_to_num(0, 0, 0)
    if case.w is not None:
        elem = elem * case.w.double()
    pw = case.loss_kw.get("pos_weight")
    if pw is not None:
        elem = elem * (1 + pw.double())
    gamma = max([v for k, v in case.loss_kw.items() if k.startswith("gamma")], default=0.0)
    factor = case.upstream.expand(B, C) / n * elem * (1 + gamma)
    terms = elem if case.reduction == "none" else elem.sum() / n
    return [ref64[0].abs(), gz, None, None], [terms, factor, None, None]


def _kept_limits(case: Case, ref64: list, ref_dt: list) -> dict[str, tuple]:
    """The README's kept limits of 16-bit logits (Numerics), per output: (where a non-finite
    value is accepted, extra atol). fp16 in place under an upstream gradient other than 1:
    the gradient was rounded before the upstream scaled it, so its overflow and subnormal
    steps are those of the unscaled gradient; likewise the elementwise losses' "none" (an
    upstream per element). Logit offsets: their gradient sums the rounded
    grad z, inf where that overflowed (in place, or in torch's own fp16 grad z too)."""
    dt = case.z.dtype
    B, C = case.z.shape
    if dt not in (torch.float16, torch.bfloat16):
        return {}
    go = case.upstream
    if case.reduction == "none" and go.dim() == 1:
        go = go[:, None]
    unscaled_overflow = torch.zeros(B, C, dtype=torch.bool)
    step = torch.zeros(())
    # no recomputation in place; none for an upstream per element either
    rounded_first = case.inplace or (case.loss != "shl" and case.reduction == "none")
    if rounded_first and (go != 1).any():
        unscaled_overflow = (ref64[1] / go).abs() > torch.finfo(dt).max
        step = 2 * torch.finfo(dt).smallest_normal * torch.finfo(dt).eps * go.abs().max()
    col = (unscaled_overflow | ~ref_dt[1].isfinite()).any(0)
    return {"grad z": (unscaled_overflow, step), "grad delta": (col, B * step)}


def compare(case: Case, got: list, ref64: list, ref_dt: list) -> list[str]:
    """What is wrong with `got` (empty if nothing). Per element: where the float64 reference
    is not finite, the same value (NaN included); where it is finite, got must be finite
    unless the reference at the case's dtype is not either, and
    |got - ref64| <= NO_WORSE |ref_dt - ref64| + rtol * bound + atol (see _bounds). With
    16-bit logits, grad z is rounded to their dtype (subnormals included: atol) and grad
    delta sums the rounded grad z; float32 math flushes values below 1.2e-38 to 0 (atol;
    see README, Numerics); the kept limits of _kept_limits pass."""
    dt = case.z.dtype
    B = case.z.shape[0]
    half = dt in (torch.float16, torch.bfloat16)
    rtol = RTOL.get(dt, RTOL[torch.float32])
    tiny = 0.0 if dt == torch.float64 else torch.finfo(torch.float32).smallest_normal
    sub = 2 * torch.finfo(dt).smallest_normal * torch.finfo(dt).eps  # 2 subnormal steps
    upmax = float(case.upstream.max()) / (B if case.reduction == "mean" else 1)
    kept = _kept_limits(case, ref64, ref_dt)
    problems = []
    for name, g, r, t, bound, flush in zip(OUTPUTS, got, ref64, ref_dt, *_bounds(case, ref64),
                                           strict=True):
        if r is None:
            continue
        if g is None or g.shape != r.shape:
            problems.append(f"{name}: shape {None if g is None else tuple(g.shape)}, "
                            f"expected {tuple(r.shape)}")
            continue
        # float32 flushes: a flushed exp(u - M) costs up to tiny * its factor (flush), a
        # flushed result (GPU flush-to-zero; the Triton interpreter rounds such bf16 values
        # to ~1.4e-38) up to 2 tiny per summed value
        terms = B if name in ("grad eta", "grad delta") else 1
        tol, atol = rtol, 1e-300 + tiny * (flush + 2 * terms)
        if case.loss != "shl":
            # the elementwise references are torch formulas ((1 - y) z - log_sigmoid(z)):
            # off by float64's eps times |z| per term where the kernels are exact (checked
            # in mpmath)
            atol = atol + torch.finfo(torch.float64).eps * flush
        if half and (name in ("grad z", "grad delta") or case.loss != "shl"):
            # (elementwise losses return the loss in the logits' dtype too, as torch's)
            tol, atol = 2 * torch.finfo(dt).eps, atol + terms * sub * max(1.0, upmax)
        inf_ok, step = kept.get(name, (torch.zeros((), dtype=torch.bool), 0.0))
        atol = atol + step
        fin = r.isfinite()
        same = (g == r) | (g.isnan() & r.isnan())
        # (elementwise losses get finite inputs: a non-finite reference is its formula's,
        # e.g. torchvision focal's gradient of pow(0, gamma < 1), inf * 0; the kernels
        # give the limits)
        bad = ~fin & ~same & (case.loss == "shl")
        bad |= fin & ~g.isfinite() & t.isfinite() & ~inf_ok
        both = fin & g.isfinite()
        err = (g - r).abs().where(both, 0)
        allowed = NO_WORSE * (t - r).abs().nan_to_num(0, 0, 0) + tol * bound + atol
        bad |= both & (err > allowed)
        if bad.any():
            i = tuple(int(x) for x in bad.nonzero()[0]) if bad.dim() else ()
            problems.append(f"{name}: {int(bad.sum())} of {bad.numel()} wrong, first at {i}: "
                            f"got {g[i].item():.9g}, float64 {r[i].item():.9g}, "
                            f"torch at {dt} {t[i].item():.9g}")
    return problems


def check(case: Case, backend: str, device: str, runner=run) -> list[str]:
    """Problems of `backend` on `case` (an exception is one)."""
    ref64 = run(case, "torch", "cpu", torch.float64)
    ref_dt = run(case, "torch", "cpu")
    try:
        got = runner(case, backend, device)
    except Exception as e:  # noqa: BLE001 - a crash on a valid problem is a finding
        return [f"raised {type(e).__name__}: {e}"]
    return compare(case, got, ref64, ref_dt)


def _runs_on(backend: str) -> str:
    if backend == "triton":  # on CPU tensors only under the interpreter
        return "cuda" if torch.cuda.is_available() else "cpu"
    return backend


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", default=None,
                    help="comma-separated; default: every fused backend available")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--cases", type=int, default=None, help="a count instead of --seconds")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first case")
    ap.add_argument("--max-labels", type=int, default=None,
                    help="largest C (default 40000 on cuda, 3000 on cpu, 300 when Triton "
                         "runs under its interpreter)")
    ap.add_argument("--max-rows", type=int, default=None, help="largest B (64; cuda 256)")
    ap.add_argument("--replay", type=int, default=None, help="run the case of this seed only")
    ap.add_argument("--losses", default=",".join(LOSSES),
                    help="comma-separated, drawn from per case (a replay needs the same list)")
    a = ap.parse_args()
    losses = tuple(a.losses.split(","))
    if not set(losses) <= set(LOSSES):
        sys.exit(f"--losses: choose from {','.join(LOSSES)}, got {a.losses}")
    on_gpu = a.device == "cuda"
    want = a.backends.split(",") if a.backends else (
        ["cuda", "triton"] if on_gpu else ["cpu", "triton"])
    backends = []
    for b in want:
        why = why_unavailable(b)
        if why is None and _runs_on(b) != a.device:
            why = f"it runs on {_runs_on(b)} tensors"
        if why is None:
            backends.append(b)
        elif a.backends:
            sys.exit(f"--backends: {b!r} cannot run on {a.device} here: {why}")
    if not backends:
        sys.exit(f"no fused backend can run on {a.device}; build the extension "
                 "(pip install --no-build-isolation -e .) or pass --device")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and "triton" in backends
    max_labels = a.max_labels or (40000 if on_gpu else 300 if interpreted else 3000)
    max_rows = a.max_rows or (256 if on_gpu else 64)
    seeds = [a.replay] if a.replay is not None else None
    stop = time.monotonic() + a.seconds
    failures, counts, seed = [], dict.fromkeys(backends, 0), a.seed
    bar = tqdm(total=a.cases, desc="cases", unit="case")
    while True:
        if seeds is not None:
            if not seeds:
                break
            seed = seeds.pop()
        elif (a.cases is not None and bar.n >= a.cases) or (
                a.cases is None and time.monotonic() > stop):
            break
        case = draw(seed, max_labels, max_rows, losses)
        for b in backends:
            problems = check(case, b, a.device)
            counts[b] += 1
            if problems or a.replay is not None:
                print(f"\n[{b}] {case.describe()}" + "".join(f"\n    {p}" for p in problems)
                      + ("" if problems else "\n    ok"))
            if problems:
                failures.append((b, case.seed))
        bar.update()
        seed += 1
    bar.close()
    print(f"\n{'backend':<8} {'cases':>7} {'failed':>7}")
    for b in backends:
        print(f"{b:<8} {counts[b]:>7} {sum(f[0] == b for f in failures):>7}")
    if failures:
        print("replay: " + " ".join(f"--backends {b} --replay {s}" for b, s in failures[:10]))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
