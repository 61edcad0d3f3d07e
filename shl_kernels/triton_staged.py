"""The Triton SHL kernel for shuffled labels with rows staged on chip (backend "triton",
`staged=True`): one program per row (persistent over rows).

Gathering a shuffled row straight from global memory (triton_shl._shl_kernel with an
`order`) costs a 32-byte sector per 2-byte element; here a program reads its row in label
order (coalesced), puts it in segment order with `tl.gather` (lowered through shared memory,
where random access is cheap), and writes it into the row's own gradient buffer, the pos/ign
flags as bits into a small per-program scratch (C/4 bytes). The segments are then done,
largest first, with contiguous reads that hit L2: those of at least a program's lanes one
at a time by the whole program (the unstaged kernel's segment code), the rest in tiles side
by side (a warp per segment, with the unstaged kernel's loads, online max/sum step and
gradient formula), writing their gradient over the staged row in place; a last gather puts
the gradient back in label order.

Per row, global memory sees the ideal traffic (z and the targets read once, the gradient
written once); the staged row and its gradient travel between the SM and L2 only.

Rows too large for one gather (plan()) are staged in chunks of labels, each gathered into
place in a pass over the row's positions, into a scratch row per program (the gradient row
cannot hold the staged row while later chunks still read z, in place), and put back in
chunks of positions the same way.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .derived import in_segment_order, order32, segment_position, segment_schedule
from .triton_launch import TunedLaunch
from .triton_shl import (
    _finish,
    _floored,
    _load_at,
    _negatives_max,
    _online_step,
    _pos_loss,
    _pos_weight,
    _segment_at,
    _segment_large,
    _store_grad,
)


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
               SEGW: tl.constexpr, HAS_IGN: tl.constexpr, HAS_DELTA: tl.constexpr,
               BITS: tl.constexpr):
    idx = first[:, None] + tl.arange(0, SEGW)[None, :]
    return _load_at(z_ptr, pos_ptr, ign_ptr, None, delta_ptr, 0, idx, idx < end[:, None],
                    acc_ty, HAS_IGN, False, HAS_DELTA, BITS)


@triton.jit
def _tile_small(z_ptr, pos_ptr, ign_ptr, w_ptr, delta_ptr, start, end, eta, scale,
                acc_ty: tl.constexpr, SEGW: tl.constexpr, HAS_IGN: tl.constexpr,
                HAS_W: tl.constexpr, HAS_DELTA: tl.constexpr, BITS: tl.constexpr):
    """Segments of at most SEGW labels: one load each; the gradient goes over z."""
    col, off, inr, valid, p, u = _tile_load(z_ptr, pos_ptr, ign_ptr, delta_ptr, start, end,
                                            acc_ty, SEGW, HAS_IGN, HAS_DELTA, BITS)
    M = _negatives_max(u, p, eta, 1)
    e = tl.where(valid, tl.exp(u - M[:, None]), 0.0)
    e_eta = tl.exp(eta - M)
    A = tl.sum(tl.where(p, 0.0, e), axis=1) + e_eta
    wp = _pos_weight(w_ptr, col, p, acc_ty, HAS_W)
    npos = tl.sum(p.to(tl.int32), axis=1)
    D = A[:, None] + e
    loss = tl.where(npos == 0, tl.log(A) + M - eta,
                    tl.sum(tl.where(p, _pos_loss(wp, A[:, None], u - M[:, None]), 0.0), axis=1))
    S = tl.where(npos == 0, 1.0 / A, tl.sum(tl.where(p, wp / D, 0.0), axis=1))
    _store_grad(z_ptr, off, inr, valid, p, e, wp, A[:, None], S[:, None], scale)
    return loss, e_eta * S - (npos == 0).to(acc_ty)


@triton.jit
def _tile_large(z_ptr, pos_ptr, ign_ptr, w_ptr, delta_ptr, start, end, eta, scale,
                acc_ty: tl.constexpr, SEGW: tl.constexpr, HAS_IGN: tl.constexpr,
                HAS_W: tl.constexpr, HAS_DELTA: tl.constexpr, BITS: tl.constexpr):
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
                                                end, acc_ty, SEGW, HAS_IGN, HAS_DELTA, BITS)
        m_l, s_l = _online_step(m_l, s_l, u, p)
        np_l += p.to(tl.int32)
        pu_l += tl.where(p, u, 0.0)
        pw_l += _pos_weight(w_ptr, col, p, acc_ty, HAS_W)
    M = _floored(tl.maximum(tl.max(m_l, axis=1), eta))
    A = tl.sum(tl.where(s_l == 0.0, 0.0, s_l * tl.exp(m_l - M[:, None])), axis=1)
    npos = tl.sum(np_l, axis=1)
    e_eta, A, loss, S = _finish(M, A, eta, npos, tl.sum(pu_l, axis=1), tl.sum(pw_l, axis=1))
    if tl.max(npos, axis=0) > 1:  # segments with several positives: their sums
        l_l = tl.zeros([G, SEGW], acc_ty)
        sp_l = tl.zeros([G, SEGW], acc_ty)
        for j in range(0, n, SEGW):
            col, off, inr, valid, p, u = _tile_load(z_ptr, pos_ptr, ign_ptr, delta_ptr,
                                                    start + j, end, acc_ty, SEGW, HAS_IGN,
                                                    HAS_DELTA, BITS)
            wp = _pos_weight(w_ptr, col, p, acc_ty, HAS_W)
            D = A[:, None] + tl.exp(u - M[:, None])
            l_l += tl.where(p, _pos_loss(wp, A[:, None], u - M[:, None]), 0.0)
            sp_l += tl.where(p, wp / D, 0.0)
        several = npos > 1
        loss = tl.where(several, tl.sum(l_l, axis=1), loss)
        S = tl.where(several, tl.sum(sp_l, axis=1), S)
    for j in range(0, n, SEGW):  # gradient
        col, off, inr, valid, p, u = _tile_load(z_ptr, pos_ptr, ign_ptr, delta_ptr, start + j,
                                                end, acc_ty, SEGW, HAS_IGN, HAS_DELTA, BITS)
        wp = _pos_weight(w_ptr, col, p, acc_ty, HAS_W)
        _store_grad(z_ptr, off, inr, valid, p, tl.exp(u - M[:, None]), wp, A[:, None],
                    S[:, None], scale)
    return loss, e_eta * S - (npos == 0).to(acc_ty)


@triton.jit
def _stage_chunk(src, flags, dst_ptr, pos_ptr, ign_ptr, index_ptr, first, n,
                 SP: tl.constexpr, CHUNK: tl.constexpr, HAS_IGN: tl.constexpr):
    """Multi-chunk staging, one label chunk: for every position i < n whose label index[i]
    lies in [first, first + SP), dst[i] = src[index[i] - first] and its flags (bit 0
    positive, bit 1 ignored) as a byte each in pos / ign."""
    for j in range(0, n, CHUNK):
        i = j + tl.arange(0, CHUNK)
        label = tl.load(index_ptr + i, mask=i < n, other=-1)
        mine = (label >= first) & (label < first + SP)
        rel = tl.where(mine, label - first, 0)
        tl.store(dst_ptr + i, tl.gather(src, rel, 0), mask=mine)
        f = tl.gather(flags, rel, 0)
        tl.store(pos_ptr + i, f & 1, mask=mine)
        if HAS_IGN:
            tl.store(ign_ptr + i, f >> 1, mask=mine)


@triton.jit
def _unstage_chunk(src, dst_ptr, position_ptr, first, n, SP: tl.constexpr,
                   CHUNK: tl.constexpr):
    """Multi-chunk unstaging, one position chunk: dst[c] = src[position[c] - first] for every
    label c < n whose position lies in [first, first + SP)."""
    for j in range(0, n, CHUNK):
        c = j + tl.arange(0, CHUNK)
        at = tl.load(position_ptr + c, mask=c < n, other=-1)
        mine = (at >= first) & (at < first + SP)
        tl.store(dst_ptr + c, tl.gather(src, tl.where(mine, at - first, 0), 0), mask=mine)


@triton.jit
def _row_flags(pos_ptr, ign_ptr, off, mask, HAS_IGN: tl.constexpr):
    """uint8 flags of labels at `off`: bit 0 positive, bit 1 ignored."""
    flags = (tl.load(pos_ptr + off, mask=mask, other=0) != 0).to(tl.uint8)
    if HAS_IGN:
        ign = tl.load(ign_ptr + off, mask=mask, other=0) != 0
        flags = flags | (ign.to(tl.uint8) << 1)
    return flags


@triton.jit(do_not_specialize=["B", "m", "seg_bucket"])
def _shl_staged_kernel(z_ptr, pos_ptr, ign_ptr, order_ptr, position_ptr, off_ptr, sched_ptr,
                       w_ptr, eta_ptr, delta_ptr, grad_ptr, pbits_ptr, ibits_ptr, stage_ptr,
                       part_ptr, geta_ptr, scale_hi, scale_lo, B, C, m, seg_bucket,
                       HAS_IGN: tl.constexpr, HAS_W: tl.constexpr, HAS_ETA: tl.constexpr,
                       HAS_DELTA: tl.constexpr, NEED_GETA: tl.constexpr, CP: tl.constexpr,
                       MULTI: tl.constexpr, CHUNK: tl.constexpr, G: tl.constexpr,
                       SEGW: tl.constexpr):
    """order_ptr: int32 [C] label id at each segment position; position_ptr: its inverse;
    sched_ptr: int32 [m] segment ids, largest first (tiles of similar sizes); w_ptr /
    delta_ptr in segment order. seg_bucket only keys the autotuner.
    One chunk (MULTI false, C <= CP, 8 <= CP): the row is staged over its own gradient row;
    pbits_ptr / ibits_ptr: uint8 [programs, CP // 8], a program's pos / ign flags in segment
    order, a bit each.
    Several chunks (MULTI, CP < C: the row in chunks of CP labels, each gathered into place
    in a pass over the positions, and back): the row is staged in stage_ptr ([programs, C],
    z's dtype), pbits_ptr / ibits_ptr hold a byte per flag ([programs, C])."""
    acc_ty = part_ptr.dtype.element_ty
    pid = tl.program_id(0)
    scale = tl.cast(scale_hi, acc_ty) + tl.cast(scale_lo, acc_ty)
    cols = tl.arange(0, CP)
    if MULTI:
        slot = pid.to(tl.int64) * C
    else:
        slot = pid.to(tl.int64) * (CP // 8)
    pbits = pbits_ptr + slot
    ibits = ibits_ptr
    if HAS_IGN:
        ibits = ibits_ptr + slot
    # Segments of at least G x SEGW labels (the first n_big of the schedule) are done one at
    # a time by the whole program: in a tile one warp would take each while the others wait.
    n_big = tl.zeros([], tl.int32)
    size = tl.load(off_ptr + tl.load(sched_ptr) + 1) - tl.load(off_ptr + tl.load(sched_ptr))
    while (n_big < m) & (size >= G * SEGW):
        n_big += 1
        k = tl.load(sched_ptr + n_big, mask=n_big < m, other=0)
        size = tl.where(n_big < m, tl.load(off_ptr + k + 1) - tl.load(off_ptr + k), 0)
    for row in range(pid, B, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)
        row_off = row64 * C
        g_row = grad_ptr + row_off
        if MULTI:
            s_row = stage_ptr + slot
            for first in range(0, C, CP):  # z is only read here: grad_ptr may alias it
                inr = first + cols < C
                _stage_chunk(tl.load(z_ptr + row_off + first + cols, mask=inr, other=0.0),
                             _row_flags(pos_ptr, ign_ptr, row_off + first + cols, inr, HAS_IGN),
                             s_row, pbits, ibits, order_ptr, first, C, CP, CHUNK, HAS_IGN)
        else:
            s_row = g_row
            inr = cols < C
            # Stage: the whole row is loaded before any of it is stored (grad_ptr may alias z).
            zr = tl.load(z_ptr + row_off + cols, mask=inr, other=0.0)
            tl.debug_barrier()
            _permute_row(zr, g_row, order_ptr, C, CP, CHUNK)
            _permute_flags(_row_flags(pos_ptr, ign_ptr, row_off + cols, inr, HAS_IGN), pbits,
                           ibits, order_ptr, C, CP, CHUNK, HAS_IGN)
        tl.debug_barrier()  # the staged row is read by other threads of the program
        row_loss = tl.zeros([], acc_ty)
        for t in range(n_big):  # large segments, each by the whole program
            k = tl.load(sched_ptr + t)
            start, end, eta = _segment_at(off_ptr, eta_ptr, k, acc_ty, HAS_ETA)
            loss, geta = _segment_large(s_row, pbits, ibits, None, w_ptr, delta_ptr, s_row, 0,
                                        start, end, eta, scale, acc_ty, G * SEGW, HAS_IGN,
                                        False, HAS_W, HAS_DELTA, not MULTI)
            row_loss += loss
            if NEED_GETA:
                tl.store(geta_ptr + row64 * m + k, geta * scale)
        for t in range(n_big, m, G):  # the rest in tiles, a warp per segment
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
                loss, geta = _tile_small(s_row, pbits, ibits, w_ptr, delta_ptr, start, end, eta,
                                         scale, acc_ty, SEGW, HAS_IGN, HAS_W, HAS_DELTA,
                                         not MULTI)
            else:
                loss, geta = _tile_large(s_row, pbits, ibits, w_ptr, delta_ptr, start, end, eta,
                                         scale, acc_ty, SEGW, HAS_IGN, HAS_W, HAS_DELTA,
                                         not MULTI)
            row_loss += tl.sum(tl.where(live, loss, 0.0), axis=0)
            if NEED_GETA:
                tl.store(geta_ptr + row64 * m + k, geta * scale, mask=live)
        tl.store(part_ptr + row, row_loss * scale)
        tl.debug_barrier()  # every segment's gradient is written
        if MULTI:
            for first in range(0, C, CP):
                g = tl.load(s_row + first + cols, mask=first + cols < C, other=0.0)
                _unstage_chunk(g, g_row, position_ptr, first, C, CP, CHUNK)
            tl.debug_barrier()  # the stage is refilled for the next row
        else:
            # Unstage: the whole gradient row is loaded before it is overwritten in label
            # order.
            g = tl.load(g_row + cols, mask=inr, other=0.0)
            tl.debug_barrier()
            _permute_row(g, g_row, position_ptr, C, CP, CHUNK)


# Largest row (or chunk of a row) staged on chip: the gather's shared memory holds it
# (padded to a power of two: 64 KB at 32768 bf16 labels, 128 KB fp32).
STAGED_MAX_BYTES = 128 << 10
# Rows of up to this many chunks are staged in chunks (each chunk a pass over the row's
# positions, twice); longer rows take the window kernel.
MAX_CHUNKS = 4
# Labels per chunk at most (sm_90, ptxas: chunks of 65536 bf16 labels spill 64-736 bytes
# per thread, of 32768 none).
CHUNK_LABELS = 32768
# Programs per SM, each looping over rows (one per SM in chunks: each holds a staged row
# in global scratch).
PROGRAMS_PER_SM = 2


# Autotuned on a GPU (per row length and mean segment size): tiles of a segment per warp
# (16 or 32 warps, 32 or 64 lanes per segment), or of 64 small segments (8 lanes each) for
# rows of many small segments. sm_90 (benchmarks/triton_resources.py): 64-128 registers,
# 0-28 bytes per thread spilled (up to 64 in fp32 chunks); 8-warp programs hold twice the
# row per thread and spill more.
_CONFIGS = [triton.Config({"G": g, "SEGW": sw, "CHUNK": 2048}, num_warps=nw)
            for nw, g, sw in ((16, 16, 32), (16, 16, 64), (32, 32, 32), (16, 64, 8))]
_KEY = ["C", "seg_bucket"]
_tuned = triton.autotune(_CONFIGS, key=_KEY)(_shl_staged_kernel)
# Autotuning runs the kernel several times: with the gradient over z, z must be put back.
_tuned_inplace = triton.autotune(_CONFIGS, key=_KEY, restore_value=["z_ptr"])(
    _shl_staged_kernel)
_launch, _launch_inplace = TunedLaunch(_tuned), TunedLaunch(_tuned_inplace)
# Under the interpreter: small tiles and chunks, so tests reach every loop.
_INTERPRET = {"G": 4, "SEGW": 8, "CHUNK": 16}


def padded_labels(C: int) -> int:
    """The power of two a staged row is padded to (at least 8: a byte of flag bits)."""
    return max(8, 1 << max(C - 1, 0).bit_length())


def plan(C: int, itemsize: int) -> tuple[int, bool] | None:
    """How rows of C labels of `itemsize` bytes are staged: (CP, False) in one chunk of CP
    labels, (CP, True) in chunks of CP labels, None not at all (too many chunks)."""
    if padded_labels(C) * itemsize <= STAGED_MAX_BYTES:
        return padded_labels(C), False
    CP = min(STAGED_MAX_BYTES // itemsize, CHUNK_LABELS)
    return (CP, True) if -(-C // CP) <= MAX_CHUNKS else None


def launch_staged(z: torch.Tensor, pos: torch.Tensor, ign: torch.Tensor | None,
                  order: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor | None,
                  eta: torch.Tensor | None, delta: torch.Tensor | None, grad: torch.Tensor,
                  geta: torch.Tensor | None, part: torch.Tensor, scale: tuple[float, float],
                  how: tuple[int, bool], sms: int, aliased: bool, interpret: bool) -> None:
    """Runs _shl_staged_kernel on conforming inputs (triton_shl.shl_fused_triton checks
    them): writes grad, geta (or None) and part [B] (the row losses times the scale, given
    as fp32 halves). how: plan(C, itemsize); sms: the device's SM count."""
    B, C = z.shape
    m = offsets.numel() - 1
    CP, multi = how
    programs = max(1, min(B, sms if multi else PROGRAMS_PER_SM * sms))
    dev = z.device
    flag_bytes = C if multi else CP // 8
    pbits = torch.empty((programs, flag_bytes), dtype=torch.uint8, device=dev)
    ibits = torch.empty_like(pbits) if ign is not None else None
    stage = torch.empty((programs, C), dtype=z.dtype, device=dev) if multi else None
    args = (z, pos, ign, order32(order), segment_position(order, 32), offsets,
            segment_schedule(offsets), in_segment_order(w, order), eta,
            in_segment_order(delta, order), grad, pbits, ibits, stage, part, geta, *scale, B, C,
            m, (C // max(m, 1)).bit_length())
    flags = {"HAS_IGN": ign is not None, "HAS_W": w is not None, "HAS_ETA": eta is not None,
             "HAS_DELTA": delta is not None, "NEED_GETA": geta is not None, "CP": CP,
             "MULTI": multi}
    if interpret:
        _shl_staged_kernel[(programs,)](*args, **flags,
                                        **dict(_INTERPRET, CHUNK=min(CP, _INTERPRET["CHUNK"])))
    else:
        (_launch_inplace if aliased else _launch)((programs,), args, flags,
                                                  (z.dtype, *flags.values()), dev)
