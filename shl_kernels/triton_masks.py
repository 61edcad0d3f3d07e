"""masks.float_mask and masks.csr_mask in Triton, for GPUs where the extension was built
without its CUDA kernels (no nvcc at install): the passes of csrc/targets_cuda.cu. Imported
lazily."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused import on_device
from .triton_launch import DirectLaunch

BLOCK = 2048


@triton.jit
def _to_mask_kernel(t_ptr, out_ptr, bad_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    v = tl.load(t_ptr + offs, mask=inside, other=0.0)
    tl.store(out_ptr + offs, (v != 0).to(tl.uint8), mask=inside)
    bad = tl.max(((v != 0) & (v != 1)).to(tl.int32), axis=0)  # NaN too: it is neither
    if bad != 0:  # only programs that saw one: no atomic per program on one address
        tl.atomic_or(bad_ptr, 1)


_launch = DirectLaunch(_to_mask_kernel)


def to_mask(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = (t != 0) as uint8 (t contiguous, floating; out uint8 of t's size); returns an
    int32 [1] flag on t's device, 1 where some value of t is neither 0 nor 1."""
    flag = torch.zeros(1, dtype=torch.int32, device=t.device)
    n = t.numel()
    if n:
        with on_device(t.device):
            _launch((triton.cdiv(n, BLOCK),), (t, out, flag, n), {"BLOCK": BLOCK}, t.device)
    return flag


@triton.jit
def _csr_kernel(ptr_ptr, ids_ptr, words_ptr, check_ptr, B, C, nnz, BLOCK_IDS: tl.constexpr):
    """A program per row: its indptr checked, then its ids set in the zeroed mask (int32
    words) with atomic_or, whose old value shows an id set before (a duplicate); the ids' min
    and max, one atomic each. check: (indptr malformed, min id, max id, duplicate)."""
    r = tl.program_id(0).to(tl.int64)
    p0 = tl.load(ptr_ptr + r).to(tl.int64)
    p1 = tl.load(ptr_ptr + r + 1).to(tl.int64)
    bad = (p1 < p0) | (p0 < 0) | (p1 > nnz) | ((r == 0) & (p0 != 0)) | \
        ((r == B - 1) & (p1 != nnz))
    if bad:  # the row's ids are not read
        tl.atomic_max(check_ptr, 1)
    else:
        lanes = tl.arange(0, BLOCK_IDS)
        lo = tl.full([BLOCK_IDS], 9223372036854775807, tl.int64)
        hi = tl.full([BLOCK_IDS], -9223372036854775807 - 1, tl.int64)
        dup = tl.zeros([BLOCK_IDS], tl.int32)
        for k0 in range(p0, p1, BLOCK_IDS):
            k = k0 + lanes
            live = k < p1
            ids = tl.load(ids_ptr + k, mask=live, other=0).to(tl.int64)
            lo = tl.where(live, tl.minimum(lo, ids), lo)
            hi = tl.where(live, tl.maximum(hi, ids), hi)
            ok = live & (ids >= 0) & (ids < C)
            o = r * C + ids
            shift = ((o & 3) * 8).to(tl.int32)
            old = tl.atomic_or(words_ptr + (o >> 2), (1 << shift), mask=ok)
            dup = dup | (ok & (((old >> shift) & 255) != 0)).to(tl.int32)
        if p1 > p0:
            tl.atomic_min(check_ptr + 1, tl.min(lo, axis=0))
            tl.atomic_max(check_ptr + 2, tl.max(hi, axis=0))
        if tl.max(dup, axis=0) != 0:
            tl.atomic_max(check_ptr + 3, 1)


_launch_csr = DirectLaunch(_csr_kernel)
_CSR_BLOCK = 256
_CHECK_START: dict[torch.device, torch.Tensor] = {}  # (0, max, min, 0) per device


def csr_to_mask(indptr: torch.Tensor, indices: torch.Tensor, B: int, C: int):
    """(uint8 [B, C] mask, int64 [4] checks on the device) of a CSR pair (contiguous 1-D
    int32/int64 tensors on one device, indptr of B+1 >= 2 entries): masks.csr_mask's pass."""
    dev = indptr.device
    start = _CHECK_START.get(dev)
    if start is None:
        start = _CHECK_START[dev] = torch.tensor([0, 2**63 - 1, -2**63, 0], dtype=torch.int64,
                                                 device=dev)
    check = start.clone()
    words = torch.zeros(-(-B * C // 4), dtype=torch.int32, device=dev)
    with on_device(dev):
        _launch_csr((B,), (indptr, indices, words, check, B, C, indices.numel()),
                    {"BLOCK_IDS": _CSR_BLOCK}, dev)
    return words.view(torch.uint8)[:B * C].view(B, C), check

