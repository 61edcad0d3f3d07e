"""masks.float_mask in Triton, for GPUs where the extension was built without its CUDA
kernels (no nvcc at install): the pass of csrc/targets_cuda.cu. Imported lazily."""
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
