"""The Triton SHL kernel for shuffled labels with rows staged on chip (backend "triton",
`staged=True`): one program per row (persistent over rows).

Gathering a shuffled row straight from global memory (triton_shl._shl_kernel with an
`order`) costs a 32-byte sector per 2-byte element; here a program reads its row in label
order (coalesced), puts it in segment order with `tl.gather` (lowered through shared memory,
where random access is cheap), and writes it into the row's own gradient buffer, the pos/ign
flags as bits into a small per-program scratch (C/4 bytes). The segments are then done in
tiles side by side (a warp per segment; contiguous reads that hit L2) with the unstaged
kernel's loads, online max/sum step and gradient formula, writing their gradient over the
staged row in place, and a last gather puts the gradient back in label order.

Per row, global memory sees the ideal traffic (z and the targets read once, the gradient
written once); the staged row and its gradient travel between the SM and L2 only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .derived import in_segment_order, order32, segment_position, segment_schedule
from .triton_shl import _finish, _load_at, _online_step, _pos_weight, _store_grad


@triton.jit
def _permute_row(src, dst_ptr, index_ptr, n, CP: tl.constexpr, CHUNK: tl.constexpr):
    """dst[i] = src[index[i]] for i < n; src is a row held by the program ([CP], registers)."""
    for j in range(0, CP, CHUNK):
        i = j + tl.arange(0, CHUNK)
        inr = i < n
        idx = tl.load(index_ptr + i, mask=inr, other=0)
        tl.store(dst_ptr + i, tl.gather(src, idx, 0), mask=inr)


@triton.jit
def _permute_flags(src, pos_bits_ptr, ign_bits_ptr, index_ptr, n, CP: tl.constexpr,
                   CHUNK: tl.constexpr, HAS_IGN: tl.constexpr):
    """_permute_row for a row of flags (bit 0 positive, bit 1 ignored), stored as two bit
    arrays (bit i % 8 of byte i // 8: what triton_shl._flag reads with BITS)."""
    shifts = tl.arange(0, 8)[None, :]
    for j in range(0, CP, CHUNK):
        i = j + tl.arange(0, CHUNK)
        inr = i < n
        idx = tl.load(index_ptr + i, mask=inr, other=0)
        f = tl.where(inr, tl.gather(src, idx, 0).to(tl.int32), 0)
        b = j // 8 + tl.arange(0, CHUNK // 8)
        live = b < (n + 7) // 8
        pos = tl.sum(tl.reshape(f & 1, [CHUNK // 8, 8]) << shifts, axis=1)
        tl.store(pos_bits_ptr + b, pos.to(tl.uint8), mask=live)
        if HAS_IGN:
            ign = tl.sum(tl.reshape((f >> 1) & 1, [CHUNK // 8, 8]) << shifts, axis=1)
            tl.store(ign_bits_ptr + b, ign.to(tl.uint8), mask=live)


# Tiles: G segments side by side, a [G, SEGW] chunk of positions per step, reduced along
# axis 1 (SEGW lanes per segment: a warp each where SEGW = 32).
# The maths is triton_shl._segment_small / _segment_large's, per tile row; start, end and
# eta are [G]; padding rows (start == end, eta 0) give loss 0.
@triton.jit
def _tile_load(z_ptr, pos_ptr, ign_ptr, delta_ptr, first, end, acc_ty: tl.constexpr,
               SEGW: tl.constexpr, HAS_IGN: tl.constexpr, HAS_DELTA: tl.constexpr):
    idx = first[:, None] + tl.arange(0, SEGW)[None, :]
    return _load_at(z_ptr, pos_ptr, ign_ptr, None, delta_ptr, 0, idx, idx < end[:, None],
                    acc_ty, HAS_IGN, False, HAS_DELTA, True)


@triton.jit
def _tile_small(z_ptr, pos_ptr, ign_ptr, w_ptr, delta_ptr, start, end, eta, scale,
                acc_ty: tl.constexpr, SEGW: tl.constexpr, HAS_IGN: tl.constexpr,
                HAS_W: tl.constexpr, HAS_DELTA: tl.constexpr):
    """Segments of at most SEGW labels: one load each; the gradient goes over z."""
    col, off, inr, valid, p, u = _tile_load(z_ptr, pos_ptr, ign_ptr, delta_ptr, start, end,
                                            acc_ty, SEGW, HAS_IGN, HAS_DELTA)
    M = tl.maximum(tl.max(u, axis=1), eta)
    e = tl.where(valid, tl.exp(u - M[:, None]), 0.0)
    e_eta = tl.exp(eta - M)
    A = tl.sum(tl.where(p, 0.0, e), axis=1) + e_eta
    wp = _pos_weight(w_ptr, col, p, acc_ty, HAS_W)
    npos = tl.sum(p.to(tl.int32), axis=1)
    D = A[:, None] + e
    loss = tl.where(npos == 0, tl.log(A) + M - eta,
                    tl.sum(tl.where(p, wp * (tl.log(D) + M[:, None] - u), 0.0), axis=1))
    S = tl.where(npos == 0, 1.0 / A, tl.sum(tl.where(p, wp / D, 0.0), axis=1))
    _store_grad(z_ptr, off, inr, valid, p, e, wp, A[:, None], S[:, None], scale)
    return loss, e_eta * S - (npos == 0).to(acc_ty)


@triton.jit
def _tile_large(z_ptr, pos_ptr, ign_ptr, w_ptr, delta_ptr, start, end, eta, scale,
                acc_ty: tl.constexpr, SEGW: tl.constexpr, HAS_IGN: tl.constexpr,
                HAS_W: tl.constexpr, HAS_DELTA: tl.constexpr):
    """Segments of any size: passes over the tile's longest; the gradient goes over z."""
    G: tl.constexpr = start.shape[0]
    m_l = tl.full([G, SEGW], float("-inf"), acc_ty)
    s_l = tl.zeros([G, SEGW], acc_ty)
    np_l = tl.zeros([G, SEGW], tl.int32)
    pu_l = tl.zeros([G, SEGW], acc_ty)
    pw_l = tl.zeros([G, SEGW], acc_ty)
    n = tl.max(end - start, axis=0)
    for j in range(0, n, SEGW):
        col, off, inr, valid, p, u = _tile_load(z_ptr, pos_ptr, ign_ptr, delta_ptr, start + j,
                                                end, acc_ty, SEGW, HAS_IGN, HAS_DELTA)
        m_l, s_l = _online_step(m_l, s_l, u, p)
        np_l += p.to(tl.int32)
        pu_l += tl.where(p, u, 0.0)
        pw_l += _pos_weight(w_ptr, col, p, acc_ty, HAS_W)
    M = tl.maximum(tl.max(m_l, axis=1), eta)
    A = tl.sum(tl.where(s_l == 0.0, 0.0, s_l * tl.exp(m_l - M[:, None])), axis=1)
    npos = tl.sum(np_l, axis=1)
    e_eta, A, loss, S = _finish(M, A, eta, npos, tl.sum(pu_l, axis=1), tl.sum(pw_l, axis=1))
    if tl.max(npos, axis=0) > 1:  # segments with several positives: their sums
        l_l = tl.zeros([G, SEGW], acc_ty)
        sp_l = tl.zeros([G, SEGW], acc_ty)
        for j in range(0, n, SEGW):
            col, off, inr, valid, p, u = _tile_load(z_ptr, pos_ptr, ign_ptr, delta_ptr,
                                                    start + j, end, acc_ty, SEGW, HAS_IGN,
                                                    HAS_DELTA)
            wp = _pos_weight(w_ptr, col, p, acc_ty, HAS_W)
            D = A[:, None] + tl.exp(u - M[:, None])
            l_l += tl.where(p, wp * (tl.log(D) + M[:, None] - u), 0.0)
            sp_l += tl.where(p, wp / D, 0.0)
        several = npos > 1
        loss = tl.where(several, tl.sum(l_l, axis=1), loss)
        S = tl.where(several, tl.sum(sp_l, axis=1), S)
    for j in range(0, n, SEGW):  # gradient
        col, off, inr, valid, p, u = _tile_load(z_ptr, pos_ptr, ign_ptr, delta_ptr, start + j,
                                                end, acc_ty, SEGW, HAS_IGN, HAS_DELTA)
        wp = _pos_weight(w_ptr, col, p, acc_ty, HAS_W)
        _store_grad(z_ptr, off, inr, valid, p, tl.exp(u - M[:, None]), wp, A[:, None],
                    S[:, None], scale)
    return loss, e_eta * S - (npos == 0).to(acc_ty)


@triton.jit(do_not_specialize=["B", "m", "seg_bucket"])
def _shl_staged_kernel(z_ptr, pos_ptr, ign_ptr, order_ptr, position_ptr, off_ptr, sched_ptr,
                       w_ptr, eta_ptr, delta_ptr, grad_ptr, pbits_ptr, ibits_ptr, part_ptr,
                       geta_ptr, scale_hi, scale_lo, B, C, m, seg_bucket,
                       HAS_IGN: tl.constexpr, HAS_W: tl.constexpr, HAS_ETA: tl.constexpr,
                       HAS_DELTA: tl.constexpr, NEED_GETA: tl.constexpr, CP: tl.constexpr,
                       CHUNK: tl.constexpr, G: tl.constexpr, SEGW: tl.constexpr):
    """order_ptr: int32 [C] label id at each segment position; position_ptr: its inverse;
    sched_ptr: int32 [m] segment ids, largest first (tiles of similar sizes); w_ptr /
    delta_ptr in segment order; pbits_ptr / ibits_ptr: uint8 [programs, CP // 8] scratch, a
    program's row of pos / ign flags in segment order, a bit each. C <= CP, 8 <= CP.
    seg_bucket only keys the autotuner."""
    acc_ty = part_ptr.dtype.element_ty
    pid = tl.program_id(0)
    scale = tl.cast(scale_hi, acc_ty) + tl.cast(scale_lo, acc_ty)
    cols = tl.arange(0, CP)
    inr = cols < C
    pbits = pbits_ptr + pid.to(tl.int64) * (CP // 8)
    ibits = ibits_ptr
    if HAS_IGN:
        ibits = ibits_ptr + pid.to(tl.int64) * (CP // 8)
    for row in range(pid, B, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)
        row_off = row64 * C
        g_row = grad_ptr + row_off
        # Stage: the whole row is loaded before any of it is stored (grad_ptr may alias z).
        zr = tl.load(z_ptr + row_off + cols, mask=inr, other=0.0)
        tl.debug_barrier()
        _permute_row(zr, g_row, order_ptr, C, CP, CHUNK)
        flags = (tl.load(pos_ptr + row_off + cols, mask=inr, other=0) != 0).to(tl.uint8)
        if HAS_IGN:
            ign = tl.load(ign_ptr + row_off + cols, mask=inr, other=0) != 0
            flags = flags | (ign.to(tl.uint8) << 1)
        _permute_flags(flags, pbits, ibits, order_ptr, C, CP, CHUNK, HAS_IGN)
        tl.debug_barrier()  # the staged row is read by other threads of the program
        row_loss = tl.zeros([], acc_ty)
        for t in range(0, m, G):
            kt = t + tl.arange(0, G)
            live = kt < m
            k = tl.load(sched_ptr + kt, mask=live, other=0)
            start = tl.load(off_ptr + k, mask=live, other=0)
            end = tl.load(off_ptr + k + 1, mask=live, other=0)
            if HAS_ETA:
                eta = tl.load(eta_ptr + k, mask=live, other=0.0).to(acc_ty)
            else:
                eta = tl.zeros([G], acc_ty)
            if tl.max(end - start, axis=0) <= SEGW:
                loss, geta = _tile_small(g_row, pbits, ibits, w_ptr, delta_ptr, start, end, eta,
                                         scale, acc_ty, SEGW, HAS_IGN, HAS_W, HAS_DELTA)
            else:
                loss, geta = _tile_large(g_row, pbits, ibits, w_ptr, delta_ptr, start, end, eta,
                                         scale, acc_ty, SEGW, HAS_IGN, HAS_W, HAS_DELTA)
            row_loss += tl.sum(tl.where(live, loss, 0.0), axis=0)
            if NEED_GETA:
                tl.store(geta_ptr + row64 * m + k, geta * scale, mask=live)
        tl.store(part_ptr + row, row_loss * scale)
        tl.debug_barrier()  # every segment's gradient is written
        # Unstage: the whole gradient row is loaded before it is overwritten in label order.
        g = tl.load(g_row + cols, mask=inr, other=0.0)
        tl.debug_barrier()
        _permute_row(g, g_row, position_ptr, C, CP, CHUNK)


# Largest row staged on chip: the gather's shared memory holds the row (padded to a power
# of two: 64 KB at 32768 bf16 labels, 128 KB fp32).
STAGED_MAX_BYTES = 128 << 10

# Autotuned on a GPU (per row length and mean segment size): tiles of a segment per warp
# (16 or 32 warps, 32 or 64 lanes per segment), or of 64 small segments (8 lanes each) for
# rows of many small segments. sm_90, ptxas: 63-128 registers, at most 4 bytes spilled;
# 8-warp programs hold twice the row per thread and spill more.
_CONFIGS = [triton.Config({"G": g, "SEGW": sw, "CHUNK": 2048}, num_warps=nw)
            for nw, g, sw in ((16, 16, 32), (16, 16, 64), (32, 32, 32), (16, 64, 8))]
_KEY = ["C", "seg_bucket"]
_tuned = triton.autotune(_CONFIGS, key=_KEY)(_shl_staged_kernel)
# Autotuning runs the kernel several times: with the gradient over z, z must be put back.
_tuned_inplace = triton.autotune(_CONFIGS, key=_KEY, restore_value=["z_ptr"])(
    _shl_staged_kernel)
# Under the interpreter: small tiles and chunks, so tests reach every loop.
_INTERPRET = {"G": 4, "SEGW": 8, "CHUNK": 16}


def padded_labels(C: int) -> int:
    """The power of two a staged row is padded to (at least 8: a byte of flag bits)."""
    return max(8, 1 << max(C - 1, 0).bit_length())


def fits(C: int, itemsize: int) -> bool:
    """Whether rows of C labels of `itemsize` bytes can be staged on chip."""
    return padded_labels(C) * itemsize <= STAGED_MAX_BYTES


def launch_staged(z: torch.Tensor, pos: torch.Tensor, ign: torch.Tensor | None,
                  order: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor | None,
                  eta: torch.Tensor | None, delta: torch.Tensor | None, grad: torch.Tensor,
                  geta: torch.Tensor | None, part: torch.Tensor, scale: tuple[float, float],
                  programs: int, aliased: bool, interpret: bool) -> None:
    """Runs _shl_staged_kernel on conforming inputs (triton_shl.shl_fused_triton checks
    them): writes grad, geta (or None) and part [B] (the row losses times the scale, given
    as fp32 halves). `programs`: at most this many programs (each loops over rows)."""
    B, C = z.shape
    m = offsets.numel() - 1
    CP = padded_labels(C)
    programs = max(1, min(B, programs))
    pbits = torch.empty((programs, CP // 8), dtype=torch.uint8, device=z.device)
    ibits = torch.empty_like(pbits) if ign is not None else None
    args = (z, pos, ign, order32(order), segment_position(order, 32), offsets,
            segment_schedule(offsets), in_segment_order(w, order), eta,
            in_segment_order(delta, order), grad, pbits, ibits, part, geta, *scale, B, C, m,
            (C // max(m, 1)).bit_length())
    flags = {"HAS_IGN": ign is not None, "HAS_W": w is not None, "HAS_ETA": eta is not None,
             "HAS_DELTA": delta is not None, "NEED_GETA": geta is not None, "CP": CP}
    if interpret:
        _shl_staged_kernel[(programs,)](*args, **flags,
                                        **dict(_INTERPRET, CHUNK=min(CP, _INTERPRET["CHUNK"])))
    else:
        (_tuned_inplace if aliased else _tuned)[(programs,)](*args, **flags)
