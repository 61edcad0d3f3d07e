"""Fused SHL forward + backward in Triton (backend "triton"); implements `fused.FusedKernel`.

Scheduling: one program per (row, work item). A work item is either one segment
(`window=0`, grid B*m) or every segment whose first position lies in a window of `window`
segment-ordered positions (grid B*ceil(C/window); `window >= C` gives one program per row).
Programs find their segments by binary search over `offsets`, so nothing is precomputed on
the host and a call costs no device sync. Per segment:

- size <= BLOCK: one load into registers, then max, sums, loss and gradient from there;
- larger: pass 1 keeps a per-lane online max and sum of exp over the negatives (one exp per
  element), the positive count and, for a single positive, its u and w; pass 2 (only with
  two or more positives) sums the positive terms and S = sum_p w_p / D_p; pass 3 writes
  the gradient.

Each element of z is read before the same program writes its gradient, and programs own
disjoint elements, so `grad_out` may alias z. Row losses are written per (row, item) and
summed afterwards: deterministic, no atomics.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
import triton
import triton.language as tl
from triton import knobs

from .fused import on_device, stream_handle
from .triton_launch import DirectLaunch, TunedLaunch

_ACC = {torch.float32: torch.float32, torch.float16: torch.float32,
        torch.bfloat16: torch.float32, torch.float64: torch.float64}


@triton.jit
def _chunk(z_ptr, pos_ptr, ign_ptr, order_ptr, delta_ptr, row_off, j, end,
           acc_ty: tl.constexpr, BLOCK: tl.constexpr, HAS_IGN: tl.constexpr,
           HAS_ORDER: tl.constexpr, HAS_DELTA: tl.constexpr, BITS: tl.constexpr = False):
    """Positions [j, j+BLOCK) of a segment ending at `end`: see _load_at."""
    idx = j + tl.arange(0, BLOCK)
    return _load_at(z_ptr, pos_ptr, ign_ptr, order_ptr, delta_ptr, row_off, idx, idx < end,
                    acc_ty, HAS_IGN, HAS_ORDER, HAS_DELTA, BITS)


@triton.jit
def _flag(ptr, off, mask, other, BITS: tl.constexpr):
    """The pos / ign flag at element offsets `off` (nonzero = set): a byte each, or with
    BITS one bit each (bit off % 8 of byte off // 8)."""
    if BITS:
        byte = tl.load(ptr + (off >> 3), mask=mask, other=other).to(tl.int32)
        return (byte >> (off & 7).to(tl.int32)) & 1
    else:
        return tl.load(ptr + off, mask=mask, other=other)


@triton.jit
def _load_at(z_ptr, pos_ptr, ign_ptr, order_ptr, delta_ptr, row_off, idx, inr,
             acc_ty: tl.constexpr, HAS_IGN: tl.constexpr, HAS_ORDER: tl.constexpr,
             HAS_DELTA: tl.constexpr, BITS: tl.constexpr):
    """Segment positions idx (any shape; inr: in range): original column, element offset,
    inr, valid (in range, not ignored), positive, u = z + delta (-inf if not valid).
    BITS: pos / ign hold a bit per element (see _flag)."""
    if HAS_ORDER:
        col = tl.load(order_ptr + idx, mask=inr, other=0).to(tl.int64)
    else:
        col = idx.to(tl.int64)
    off = row_off + col
    valid = inr
    if HAS_IGN:
        valid = inr & (_flag(ign_ptr, off, inr, 1, BITS) == 0)
    p = valid & (_flag(pos_ptr, off, valid, 0, BITS) != 0)
    u = tl.load(z_ptr + off, mask=valid, other=0.0).to(acc_ty)
    if HAS_DELTA:
        u += tl.load(delta_ptr + col, mask=valid, other=0.0).to(acc_ty)
    return col, off, inr, valid, p, tl.where(valid, u, float("-inf"))


@triton.jit
def _pos_weight(w_ptr, col, p, acc_ty: tl.constexpr, HAS_W: tl.constexpr):
    """w at positives, 0 elsewhere."""
    if HAS_W:
        return tl.load(w_ptr + col, mask=p, other=0.0).to(acc_ty)
    else:
        return p.to(acc_ty)


@triton.jit
def _negatives_max(u, p, eta, axis: tl.constexpr):
    """The shift M: max of eta and the negatives' u along `axis` (positives out: see
    csrc/shl_event.h), floored at float32's lowest finite value so that a segment of
    positives alone with eta = -inf gets A = 0 (loss 0), not exp(-inf - -inf) = NaN."""
    M = tl.maximum(tl.max(tl.where(p, float("-inf"), u), axis=axis), eta)
    return _floored(M)


@triton.jit
def _floored(M):
    return tl.where(M == float("-inf"), -3.4028234663852886e38, M)


@triton.jit
def _pos_loss(w, A, t):
    """w (log D_p - u_p) for a positive with t = u_p - M (csrc/shl_event.h positive_event,
    the same formula): log(A + exp(t)) - t while exp(t) <= A, else log1p(A / exp(t)) (also
    when exp(t) overflows); +inf logits give NaN. log1p(z) as log(1 + z) z / ((1 + z) - 1)
    (Triton has no log1p)."""
    e = tl.exp(t)
    z = A / e
    v = 1.0 + z
    log1p = tl.where(v == 1.0, z, tl.log(v) * (z / (v - 1.0)))
    loss = tl.where(e <= A, tl.log(A + e) - t, log1p)
    return tl.where(t == float("inf"), float("nan"), w * loss)


@triton.jit
def _store_grad(grad_ptr, off, inr, valid, p, e, wp, A, S, scale):
    # g_p = -w_p A / D_p (no cancellation), g_c = exp(u_c - M) * S, ignored labels 0.
    g = tl.where(p, -wp * A / (A + e), e * S)
    g = tl.where(valid, g, 0.0) * scale
    tl.store(grad_ptr + off, g.to(grad_ptr.dtype.element_ty), mask=inr)


@triton.jit
def _segment_small(z_ptr, pos_ptr, ign_ptr, order_ptr, w_ptr, delta_ptr, grad_ptr, row_off,
                   start, end, eta, scale, acc_ty: tl.constexpr, BLOCK: tl.constexpr,
                   HAS_IGN: tl.constexpr, HAS_ORDER: tl.constexpr, HAS_W: tl.constexpr,
                   HAS_DELTA: tl.constexpr):
    col, off, inr, valid, p, u = _chunk(z_ptr, pos_ptr, ign_ptr, order_ptr, delta_ptr, row_off,
                                        start, end, acc_ty, BLOCK, HAS_IGN, HAS_ORDER, HAS_DELTA)
    M = _negatives_max(u, p, eta, 0)
    e = tl.where(valid, tl.exp(u - M), 0.0)  # inf at a positive far above M: g_p = -0
    e_eta = tl.exp(eta - M)
    A = tl.sum(tl.where(p, 0.0, e), axis=0) + e_eta
    wp = _pos_weight(w_ptr, col, p, acc_ty, HAS_W)
    npos = tl.sum(p.to(tl.int32), axis=0)
    D = A + e
    loss = tl.where(npos == 0, tl.log(A) + M - eta,
                    tl.sum(tl.where(p, _pos_loss(wp, A, u - M), 0.0), axis=0))
    S = tl.where(npos == 0, 1.0 / A, tl.sum(tl.where(p, wp / D, 0.0), axis=0))
    _store_grad(grad_ptr, off, inr, valid, p, e, wp, A, S, scale)
    return loss, e_eta * S - (npos == 0).to(acc_ty)


@triton.jit
def _online_step(m_l, s_l, u, p):
    """Per lane (any shape): running max m_l and sum s_l of exp(u - m_l) over the negatives
    (~p; positives stay out of the max, see _negatives_max), updated by one element u; one
    exp: exp(m_l - u) rescales s_l when u is the new max, exp(u - m_l) is u's term
    otherwise."""
    # -inf terms add nothing (and exp(-inf - -inf) would be NaN); NaN stays active so it
    # reaches the sum (NaN > m_l is false, so NaN never becomes the max).
    neg = (u != float("-inf")) & ~p
    big = neg & (u > m_l)
    t = tl.exp(tl.where(big, m_l - u, u - m_l))
    s_l = tl.where(neg, tl.where(big, s_l * t + 1.0, s_l + t), s_l)
    return tl.where(big, u, m_l), s_l


@triton.jit
def _finish(M, A, eta, npos, pu_sum, pw):
    """Per segment (any shape), from the max M, the negatives' sum A of exp(u - M), the
    positives' count, sum of u and sum of w: (exp(eta - M), A with the null class, loss, S)
    for zero or one positive (with one, the sums over positives are its u and w)."""
    e_eta = tl.exp(eta - M)
    A += e_eta
    pu = tl.where(npos == 1, pu_sum, M)
    D1 = A + tl.exp(pu - M)
    loss = tl.where(npos == 0, tl.log(A) + M - eta, _pos_loss(pw, A, pu - M))
    S = tl.where(npos == 0, 1.0 / A, pw / D1)
    return e_eta, A, loss, S


@triton.jit
def _segment_large(z_ptr, pos_ptr, ign_ptr, order_ptr, w_ptr, delta_ptr, grad_ptr, row_off,
                   start, end, eta, scale, acc_ty: tl.constexpr, BLOCK: tl.constexpr,
                   HAS_IGN: tl.constexpr, HAS_ORDER: tl.constexpr, HAS_W: tl.constexpr,
                   HAS_DELTA: tl.constexpr, BITS: tl.constexpr = False):
    # Pass 1, per lane: running max m_l and sum s_l of exp(u - m_l) over the negatives
    # (_online_step), the positives' count and sums.
    m_l = tl.full([BLOCK], float("-inf"), acc_ty)
    s_l = tl.zeros([BLOCK], acc_ty)
    np_l = tl.zeros([BLOCK], tl.int32)
    pu_l = tl.zeros([BLOCK], acc_ty)
    pw_l = tl.zeros([BLOCK], acc_ty)
    for j in range(start, end, BLOCK):
        col, off, inr, valid, p, u = _chunk(z_ptr, pos_ptr, ign_ptr, order_ptr, delta_ptr,
                                            row_off, j, end, acc_ty, BLOCK, HAS_IGN, HAS_ORDER,
                                            HAS_DELTA, BITS)
        m_l, s_l = _online_step(m_l, s_l, u, p)
        np_l += p.to(tl.int32)
        pu_l += tl.where(p, u, 0.0)
        pw_l += _pos_weight(w_ptr, col, p, acc_ty, HAS_W)
    M = _floored(tl.maximum(tl.max(m_l, axis=0), eta))
    # s_l == 0: nothing summed on that lane (and m_l may be -inf); a NaN s_l must survive.
    A = tl.sum(tl.where(s_l == 0.0, 0.0, s_l * tl.exp(m_l - M)), axis=0)
    npos = tl.sum(np_l, axis=0)
    e_eta, A, loss, S = _finish(M, A, eta, npos, tl.sum(pu_l, axis=0), tl.sum(pw_l, axis=0))
    if npos > 1:  # pass 2: several positives
        l_l = tl.zeros([BLOCK], acc_ty)
        sp_l = tl.zeros([BLOCK], acc_ty)
        for j in range(start, end, BLOCK):
            col, off, inr, valid, p, u = _chunk(z_ptr, pos_ptr, ign_ptr, order_ptr, delta_ptr,
                                                row_off, j, end, acc_ty, BLOCK, HAS_IGN,
                                                HAS_ORDER, HAS_DELTA, BITS)
            wp = _pos_weight(w_ptr, col, p, acc_ty, HAS_W)
            D = A + tl.exp(u - M)
            l_l += tl.where(p, _pos_loss(wp, A, u - M), 0.0)
            sp_l += tl.where(p, wp / D, 0.0)
        loss = tl.sum(l_l, axis=0)
        S = tl.sum(sp_l, axis=0)
    for j in range(start, end, BLOCK):  # pass 3: gradient
        col, off, inr, valid, p, u = _chunk(z_ptr, pos_ptr, ign_ptr, order_ptr, delta_ptr,
                                            row_off, j, end, acc_ty, BLOCK, HAS_IGN, HAS_ORDER,
                                            HAS_DELTA, BITS)
        wp = _pos_weight(w_ptr, col, p, acc_ty, HAS_W)
        _store_grad(grad_ptr, off, inr, valid, p, tl.exp(u - M), wp, A, S, scale)
    return loss, e_eta * S - (npos == 0).to(acc_ty)


@triton.jit
def _segment_at(off_ptr, eta_ptr, k, acc_ty: tl.constexpr, HAS_ETA: tl.constexpr):
    """Segment k's first and end positions and its null logit (0 without eta)."""
    if HAS_ETA:
        eta = tl.load(eta_ptr + k).to(acc_ty)
    else:
        eta = tl.zeros([], acc_ty)
    return tl.load(off_ptr + k), tl.load(off_ptr + k + 1), eta


@triton.jit
def _lower_bound(off_ptr, n, target, n_iter):
    """First i in [0, n] with off[i] >= target; off sorted and off[n] >= target."""
    lo = tl.zeros([], tl.int32)
    hi = n
    for _ in range(n_iter):
        mid = (lo + hi) // 2
        right = tl.load(off_ptr + mid) < target
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit
def _reduce_last(part_ptr, geta_ptr, loss_ptr, geta_sum_ptr, count_ptr, n_programs, n_parts,
                 B, m, acc_ty: tl.constexpr, NEED_GETA: tl.constexpr, RBLOCK: tl.constexpr,
                 loss_scale):
    """The last of the launch's n_programs programs to get here sums the n_parts partial
    losses into loss_ptr (times loss_scale) and the [B, m] geta rows over rows into
    geta_sum_ptr, in a fixed order (deterministic), then puts the counter back to 0 for the
    next launch."""
    # The barrier orders every thread's stores before the ticket's release (the lock
    # pattern of Triton's layer-norm backward tutorial); the last ticket's acquire then
    # sees every program's partial sums.
    tl.debug_barrier()
    ticket = tl.atomic_add(count_ptr, 1)
    if ticket == n_programs - 1:
        lanes = tl.arange(0, RBLOCK)
        total = tl.zeros([RBLOCK], acc_ty)
        for i in range(0, n_parts, RBLOCK):
            total += tl.load(part_ptr + i + lanes, mask=i + lanes < n_parts, other=0.0,
                             cache_modifier=".cg")
        tl.store(loss_ptr, tl.sum(total) * loss_scale)
        if NEED_GETA:
            for j in range(0, m, RBLOCK):
                inm = j + lanes < m
                g = tl.zeros([RBLOCK], acc_ty)
                at = geta_ptr + j + lanes
                for _ in range(B):
                    g += tl.load(at, mask=inm, other=0.0, cache_modifier=".cg")
                    at += m
                tl.store(geta_sum_ptr + j + lanes, g, mask=inm)
        tl.atomic_xchg(count_ptr, 0)


@triton.jit(do_not_specialize=["C", "m", "n_items", "window", "n_iter", "seg_bucket",
                               "win_bucket", "par_bucket", "B"])
def _shl_kernel(z_ptr, pos_ptr, ign_ptr, order_ptr, off_ptr, w_ptr, eta_ptr, delta_ptr,
                grad_ptr, part_ptr, geta_ptr, scale_hi, scale_lo, C, m, n_items, window, n_iter,
                seg_bucket, win_bucket, par_bucket, loss_ptr, geta_sum_ptr, count_ptr, B,
                HAS_IGN: tl.constexpr, HAS_ORDER: tl.constexpr, HAS_W: tl.constexpr,
                HAS_ETA: tl.constexpr, HAS_DELTA: tl.constexpr, NEED_GETA: tl.constexpr,
                SEG_MODE: tl.constexpr, REDUCE: tl.constexpr, BLOCK: tl.constexpr):
    # seg_bucket, win_bucket, par_bucket only key the autotuner. REDUCE: also sum the
    # partial losses and geta rows on the device (loss_ptr, geta_sum_ptr; B rows).
    acc_ty = part_ptr.dtype.element_ty
    pid = tl.program_id(0)
    row = pid // n_items
    item = pid % n_items
    if SEG_MODE:
        k0 = item
        k1 = item + 1
    else:
        # A window takes the segments that start in it; the last one also those that start
        # at C (empty segments at the end, which no window holds).
        lo = item.to(tl.int64) * window
        k0 = _lower_bound(off_ptr, m, lo, n_iter)
        k1 = tl.where(lo + window >= C, m, _lower_bound(off_ptr, m, lo + window, n_iter))
    row_off = row.to(tl.int64) * C
    # grad_scale arrives as two fp32 halves so fp64 keeps ~48 bits of it.
    scale = tl.cast(scale_hi, acc_ty) + tl.cast(scale_lo, acc_ty)
    row_loss = tl.zeros([], acc_ty)
    for k in range(k0, k1):
        start, end, eta = _segment_at(off_ptr, eta_ptr, k, acc_ty, HAS_ETA)
        if end - start <= BLOCK:
            loss, geta = _segment_small(z_ptr, pos_ptr, ign_ptr, order_ptr, w_ptr, delta_ptr,
                                        grad_ptr, row_off, start, end, eta, scale, acc_ty,
                                        BLOCK, HAS_IGN, HAS_ORDER, HAS_W, HAS_DELTA)
        else:
            loss, geta = _segment_large(z_ptr, pos_ptr, ign_ptr, order_ptr, w_ptr, delta_ptr,
                                        grad_ptr, row_off, start, end, eta, scale, acc_ty,
                                        BLOCK, HAS_IGN, HAS_ORDER, HAS_W, HAS_DELTA)
        row_loss += loss
        if NEED_GETA:
            tl.store(geta_ptr + row.to(tl.int64) * m + k, geta * scale)
    tl.store(part_ptr + pid, row_loss * scale)
    if REDUCE:
        _reduce_last(part_ptr, geta_ptr, loss_ptr, geta_sum_ptr, count_ptr, B * n_items,
                     B * n_items, B, m, acc_ty, NEED_GETA, BLOCK, 1.0)


# At most 4 elements per thread: the loop path keeps five per-lane accumulators, and more
# elements per thread cost occupancy (sm_90: ~70-100 registers at 2-4 elements, 160 at 8).
_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w)
            for b, w in ((128, 1), (256, 2), (256, 4), (512, 4), (1024, 8), (2048, 16))]
_KEY = ["seg_bucket", "win_bucket", "par_bucket"]
_tuned = triton.autotune(_CONFIGS, key=_KEY)(_shl_kernel)
# Autotuning runs the kernel several times: with grad_out aliasing z, z must be put back.
_tuned_inplace = triton.autotune(_CONFIGS, key=_KEY, restore_value=["z_ptr"])(_shl_kernel)
_launch, _launch_inplace = TunedLaunch(_tuned), TunedLaunch(_tuned_inplace)
_launch_fixed = DirectLaunch(_shl_kernel)  # BLOCK given (tests, tuning)

_INTERPRET_BLOCK = 32  # the interpreter cannot autotune; small so tests reach the loop path
# Whether the kernels above were made for the interpreter (TRITON_INTERPRET=1 when they were
# decorated): read once, the knob reads the environment on every access.
_INTERPRET = bool(knobs.runtime.interpret)


@functools.lru_cache(maxsize=64)
def _fp32_halves(x: float) -> tuple[float, float]:
    """x as hi + lo, two fp32 values (the kernels scale in fp32 with an fp64-exact sum)."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


@functools.cache
def _staged_module():
    from . import triton_staged  # (it imports this module's segment code: not at the top)

    return triton_staged


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


_MAX_WINDOW = 2048

# Shuffled labels (an `order`): True = the staged kernel (triton_staged.py) wherever a row
# fits, False = the window schedule, None = the measured rule (_staged_wins). Environment:
# SHL_TRITON_STAGED=1 or 0.
STAGED = {"1": True, "0": False}.get(os.environ.get("SHL_TRITON_STAGED", ""))


def _staged_wins(B: int, C: int, itemsize: int, multi: bool, sms: int) -> bool:
    """Where the staged kernel beat the window schedule on shuffled labels (H100, bf16,
    benchmarks/results/h100-2026-11-27 runs 4-5, kernel only): rows of >= 16384 labels
    staged in one piece, with at least a row per SM. 4096 x 32768: 3.31 vs 4.59 ms (100
    segments), 4.89 vs 6.17 (1000); 132 x 32768: 0.110 vs 0.159; 4096 x 16384: 1.72 vs 1.83.
    Lost: 64 x 32768 (0.109 vs 0.083: half the SMs idle), rows of 8922 and 12000 labels
    (0.41-1.48 vs 0.35-1.30), 16 x 8192. Even: 1024 x 74000 in chunks (2.74 vs 2.73). Other
    dtypes were not measured: they keep the window schedule."""
    return itemsize == 2 and not multi and C >= 16384 and B >= sms


_WINDOW_ENV = os.environ.get("SHL_TRITON_WINDOW")  # read once: a launch-bound step calls often


def _default_window(B: int, C: int, m: int, device: torch.device) -> int:
    """Windows of at most _MAX_WINDOW positions, fewer positions when B is small so that the
    grid keeps ~8 programs per SM. Several programs per row, launched next to each other,
    share the row in L2 while they run, which matters when `order` gathers."""
    if _WINDOW_ENV is not None:
        return int(_WINDOW_ENV)
    n_items = min(max(1, -(-8 * _num_sms(device) // max(B, 1))), max(m, 1))
    return min(_MAX_WINDOW, -(-C // n_items))


def _u8(t: torch.Tensor, name: str, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    if t.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, z on {device}")
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    if t.dtype != torch.uint8:
        raise TypeError(f"{name}: expected uint8 (or bool), got {t.dtype}")
    return t if t.is_contiguous() else t.contiguous()


def _vec(t: torch.Tensor | None, name: str, n: int, dtype: torch.dtype,
         device: torch.device) -> torch.Tensor | None:
    if t is None:
        return None
    if t.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, z on {device}")
    # The loss hands over conforming tensors: skip the no-op conversions (a few microseconds
    # each, which add up in a launch-bound small step).
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def shl_fused_triton(z: torch.Tensor, pos: torch.Tensor, ign: torch.Tensor | None,
                     order: torch.Tensor | None, offsets: torch.Tensor, w: torch.Tensor | None,
                     eta: torch.Tensor | None, delta: torch.Tensor | None, grad_scale: float,
                     need_grad_eta: bool, grad_out: torch.Tensor | None = None, *,
                     window: int | None = None, block: int | None = None,
                     num_warps: int | None = None, staged: bool | None = None,
                     reduce: bool = False,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`fused.FusedKernel` in Triton. Extra knobs (the defaults are meant to be right):
    window: 0 = one program per (row, segment); W > 0 = one per (row, W-position window);
    >= C = one per row (default: `_default_window`, or the SHL_TRITON_WINDOW environment
    variable). block/num_warps: fix BLOCK instead of autotuning. staged: True = shuffled
    labels (an `order`) take the staged kernel (triton_staged.py: a program per row, the row
    put in segment order on chip) where the row fits, False = never, None = `STAGED` (by
    default where it was measured faster: `_staged_wins`); window/block/num_warps do not
    apply to it. reduce: return the loss summed over rows (0-dim) and grad_eta summed over
    rows ([m]) (fused.FusedSHL asks for it): small grids sum on the device in the same
    launch (no torch op after it, for launch-bound small batches), others with torch.

    The first call per shape bucket and dtype autotunes BLOCK; with grad_out aliasing z that
    first call holds a temporary copy of z (the autotuner restores z between trial runs)."""
    if z.dtype not in _ACC:
        raise TypeError(f"z: the triton backend takes float32/float16/bfloat16/float64 logits, "
                        f"got {z.dtype}")
    if z.dim() != 2:
        raise ValueError(f"z: expected [B, C], got shape {tuple(z.shape)}")
    dev = z.device
    if dev.type != "cuda" and not _INTERPRET:
        raise ValueError(f"z: the triton backend needs CUDA tensors, got {dev} "
                         "(or set TRITON_INTERPRET=1 before importing triton to emulate)")
    B, C = z.shape
    acc = _ACC[z.dtype]
    m = offsets.numel() - 1
    if offsets.dim() != 1 or m < 0 or offsets.device != dev:
        raise ValueError(f"offsets: expected int64 [m+1] on {dev}")
    pos = _u8(pos, "pos", (B, C), dev)
    ign = None if ign is None else _u8(ign, "ign", (B, C), dev)
    order = _vec(order, "order", C, torch.int64, dev)
    if offsets.dtype != torch.int64 or not offsets.is_contiguous():
        offsets = offsets.to(torch.int64).contiguous()
    w = _vec(w, "w", C, acc, dev)
    eta = _vec(eta, "eta", m, acc, dev)
    delta = _vec(delta, "delta", C, acc, dev)
    if grad_out is None:
        grad = torch.empty((B, C), dtype=z.dtype, device=dev)
    elif grad_out.shape != z.shape or grad_out.dtype != z.dtype or grad_out.device != dev \
            or not grad_out.is_contiguous():
        raise ValueError("grad_out: must be a contiguous tensor of z's shape, dtype and device")
    else:
        grad = grad_out
    # (a fresh buffer cannot alias z: skip two storage objects per call)
    aliased = grad_out is not None and \
        grad.untyped_storage().data_ptr() == z.untyped_storage().data_ptr()
    if aliased and (grad.data_ptr() != z.data_ptr() or not z.is_contiguous()):
        raise ValueError("grad_out: in place it must be z itself, and z contiguous")
    z = z.contiguous()
    need_geta = bool(need_grad_eta) and eta is not None
    if B == 0 or C == 0:
        grad.zero_()
        geta = torch.zeros((B, m), dtype=acc, device=dev) if need_geta else None
        return _summed(torch.zeros(B, dtype=acc, device=dev), grad, geta, reduce)
    if m == 0:
        raise ValueError(f"offsets: no segments for {C} labels")

    hi, lo = _fp32_halves(grad_scale)
    if staged is None:
        staged = STAGED
    if order is not None and staged is not False:
        triton_staged = _staged_module()
        how = triton_staged.plan(C, z.element_size())
        if how is not None and (staged or _staged_wins(B, C, z.element_size(), how[1],
                                                       _num_sms(dev))):
            part = torch.empty(B, dtype=acc, device=dev)
            geta = torch.empty((B, m), dtype=acc, device=dev) if need_geta else None
            with on_device(dev):
                triton_staged.launch_staged(
                    z, pos, ign, order, offsets, w, eta, delta, grad, geta, part, (hi, lo),
                    how, _num_sms(dev), aliased, _INTERPRET)
            return _summed(part, grad, geta, reduce)

    win = _default_window(B, C, m, dev) if window is None else window
    seg_mode = win <= 0
    n_items = m if seg_mode else -(-C // win)
    if B * n_items >= 2**31:
        raise ValueError(f"window: {B} x {n_items} programs exceed the grid; use a larger window")
    counter = (_launch_counter(dev)
               if reduce and B * max(n_items, m if need_geta else 0) <= REDUCE_MAX else None)
    on_chip = counter is not None
    loss = geta_sum = None
    if on_chip:
        # The partial losses, the geta rows (the kernel's scratch) and geta's sum in one
        # allocation: this is the launch-bound small-batch path, where an allocation costs a
        # GPU step several microseconds and a view about one. The loss has its own (an
        # output that is a view could not be modified in place by the caller).
        loss = torch.empty((), dtype=acc, device=dev)
        # (pieces start at multiples of 16 bytes: Triton specializes on pointer alignment)
        at_geta, at_sum = _align4(B * n_items), _align4(B * n_items) + _align4(B * m)
        part = torch.empty(at_sum + m if need_geta else B * n_items, dtype=acc, device=dev)
        geta = part[at_geta:] if need_geta else None
        geta_sum = part[at_sum:] if need_geta else None
    else:
        part = torch.empty((B, n_items), dtype=acc, device=dev)
        geta = torch.empty((B, m), dtype=acc, device=dev) if need_geta else None
    args = (z, pos, ign, order, offsets, w, eta, delta, grad, part, geta, hi, lo, C, m, n_items,
            max(win, 0), (m + 1).bit_length(), (C // max(m, 1)).bit_length(),
            max(win, 0).bit_length(), (B * n_items).bit_length(), loss, geta_sum, counter, B)
    flags = {"HAS_IGN": ign is not None, "HAS_ORDER": order is not None, "HAS_W": w is not None,
             "HAS_ETA": eta is not None, "HAS_DELTA": delta is not None, "NEED_GETA": need_geta,
             "SEG_MODE": seg_mode, "REDUCE": on_chip}
    grid = (B * n_items,)
    if block is None and _INTERPRET:
        block = _INTERPRET_BLOCK
    # Triton launches on the current device: make it z's (multi-GPU).
    with on_device(dev):
        if block is not None:
            _launch_fixed(grid, args, {**flags, "BLOCK": block, "num_warps": num_warps or 4}, dev)
        else:
            (_launch_inplace if aliased else _launch)(grid, args, flags,
                                                      (z.dtype, *flags.values()), dev)
    if on_chip:
        return loss, grad, geta_sum
    # [B, n] partial row losses: FusedSHL sums them with the batch in one op
    return _summed(part.view(B) if n_items == 1 else part, grad, geta, reduce)


shl_fused_triton.reduces = True  # accepts reduce=True (see fused.FusedSHL)

# Device-side sums (reduce=True) for grids of at most this many partial losses and geta
# rows of at most this many values: one program adds them up at the end of the launch, which
# costs less than a torch op's launch only while they are few (launch-bound small batches).
REDUCE_MAX = 1 << 15


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _summed(part: torch.Tensor, grad: torch.Tensor, geta: torch.Tensor | None, reduce: bool):
    """The kernel's outputs, with the loss and geta summed over rows by torch if `reduce`."""
    if not reduce:
        return part, grad, geta
    return part.sum(), grad, None if geta is None else geta.sum(0)


# One int32 ticket counter per (device, stream) for the device-side sums: at 0 between
# launches (the last program puts it back), so launches on one stream can share it.
_COUNTERS: dict[tuple, torch.Tensor] = {}


def _launch_counter(device: torch.device) -> torch.Tensor | None:
    """The stream's counter; None (sum with torch instead) where a new one would be made
    while the stream is captured into a CUDA graph: its zeroing would not run until replay."""
    cuda = device.type == "cuda"
    key = (device.type, device.index, stream_handle(device) if cuda else 0)
    counter = _COUNTERS.get(key)
    if counter is None:
        if cuda and torch.cuda.is_current_stream_capturing():
            return None
        counter = _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter
