"""Targets and ignore masks to the uint8 masks the kernels read, in one native pass that also
checks them. Dense 0/1 tensors of a floating dtype: the extension's conversion (csrc/targets*:
OpenMP C++, CUDA) or, on GPUs without its CUDA build, Triton's (triton_masks.py); with torch
ops the conversion and its check took five passes over the batch, more than the fused loss
itself (CPU, 512 x 8192 fp32: 6.1 ms against 3.5 ms for the loss and its gradient). CSR pairs
(indptr, indices): the extension's or Triton's (`csr_mask`), where torch took ~20 small
ops."""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .backends import native
from .fused import capsule, stream_handle

# convert(t, out) -> whether some value of t is neither 0 nor 1 (on GPUs: a flag read back)
Converter = Callable[[torch.Tensor, torch.Tensor], bool]


@functools.cache
def _converter(device_type: str) -> Converter | None:
    """The conversion for tensors on `device_type`, or None (torch ops then)."""
    ext = native()
    fn = None if ext is None else getattr(ext, f"targets_to_mask_{device_type}", None)
    if fn is not None and device_type == "cpu":
        return lambda t, out: fn(capsule(t), capsule(out), torch.get_num_threads())
    if fn is not None and _cuda_kernels_run():
        def cuda(t, out):
            flag = torch.empty(1, dtype=torch.int32, device=t.device)
            fn(capsule(t), capsule(out), capsule(flag), stream_handle(t.device))
            return bool(flag.item())
        return cuda
    if device_type == "cuda":
        try:
            from . import triton_masks
        except ImportError:
            return None
        return lambda t, out: bool(triton_masks.to_mask(t, out).item())
    return None


def _cuda_kernels_run() -> bool:
    from .kernels_cuda import cuda_available  # (its checks: the build, driver and device)

    return cuda_available()[0]


# Under torch.compile (backend="torch" traces the input checks) this runs eagerly behind one
# graph break, as the data-dependent torch check did: Dynamo cannot trace the native call.
@torch.compiler.disable
def float_mask(t: torch.Tensor, name: str) -> torch.Tensor | None:
    """(t != 0) as uint8 for a floating `t` of 0s and 1s; ValueError naming `name` when some
    value is neither (soft labels, NaN). None when there is no conversion for t's device
    (the caller falls back to torch ops). On GPUs the check reads one flag back (a host sync,
    as the torch check had)."""
    convert = _converter(t.device.type)
    if convert is None:
        return None
    t = t.contiguous()
    out = torch.empty(t.shape, dtype=torch.uint8, device=t.device)
    if convert(t, out):
        raise not_binary(name)
    return out


# convert(indptr, indices, B, C) -> (uint8 [B, C] mask, (indptr malformed, smallest id,
# largest id, an id twice in a row))
CsrConverter = Callable[[torch.Tensor, torch.Tensor, int, int], tuple]


@functools.cache
def _csr_converter(device_type: str) -> CsrConverter | None:
    ext = native()
    fn = None if ext is None else getattr(ext, f"csr_to_mask_{device_type}", None)
    if fn is not None and device_type == "cpu":
        def cpu(p, i, B, C):
            out = torch.empty((B, C), dtype=torch.uint8)
            return out, fn(capsule(p), capsule(i), capsule(out), torch.get_num_threads())
        return cpu
    if fn is not None and _cuda_kernels_run():
        def cuda(p, i, B, C):
            # whole 4-byte words: the kernel sets ids with word-wide atomics
            out = torch.empty(-(-B * C // 4) * 4, dtype=torch.uint8, device=p.device)
            out = out[:B * C].view(B, C)
            check = torch.empty(4, dtype=torch.int64, device=p.device)
            fn(capsule(p), capsule(i), capsule(out), capsule(check), stream_handle(p.device))
            return out, check.tolist()  # one host read
        return cuda
    if device_type == "cuda":
        try:
            from . import triton_masks
        except ImportError:
            return None

        def triton(p, i, B, C):
            out, check = triton_masks.csr_to_mask(p, i, B, C)
            return out, check.tolist()
        return triton
    return None


# A native call: behind a graph break under torch.compile (see float_mask).
@torch.compiler.disable
def csr_mask(indptr: torch.Tensor, indices: torch.Tensor, B: int, C: int):
    """(uint8 [B, C] mask, (indptr malformed, smallest id or None, largest id or None, an id
    twice in a row)) of a CSR pair of 1-D int32/int64 tensors on one device, indptr of B+1
    entries, in one native pass; None where the extension has no conversion for the device
    or B is 0 (the caller uses torch ops). The mask is complete only when the checks pass."""
    convert = _csr_converter(indptr.device.type) if B > 0 else None
    if convert is None:
        return None
    out, (bad, lo, hi, dup) = convert(indptr.contiguous(), indices.contiguous(), B, C)
    empty = indices.numel() == 0
    return out, (bool(bad), None if empty else lo, None if empty else hi, bool(dup))


def not_binary(name: str) -> ValueError:
    """The error for dense targets or ignore masks holding values other than 0 and 1."""
    return ValueError(f"{name}: dense targets must hold only 0 and 1 (soft labels are not part "
                      "of SHL)")
