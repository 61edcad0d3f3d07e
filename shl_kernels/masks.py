"""Dense 0/1 targets and ignore masks of a floating dtype to the uint8 masks the kernels read,
in one native pass (csrc/targets*): with torch ops the conversion and its 0/1 check took
five passes over the batch, more than the fused loss itself (CPU, 512 x 8192 fp32: 6.1 ms
against 3.5 ms for the loss and its gradient)."""
from __future__ import annotations

import functools

import torch

from .backends import native
from .fused import capsule, stream_handle


@functools.cache
def _converter(device_type: str):
    """The extension's conversion for tensors on `device_type`, or None (not built there)."""
    ext = native()
    return None if ext is None else getattr(ext, f"targets_to_mask_{device_type}", None)


def float_mask(t: torch.Tensor, name: str) -> torch.Tensor | None:
    """(t != 0) as uint8 for a floating `t` of 0s and 1s; ValueError naming `name` when some
    value is neither (soft labels, NaN). None when the extension has no conversion for t's
    device (the caller falls back to torch ops). On CUDA the check reads one flag back (a
    host sync, as the torch check had)."""
    convert = _converter(t.device.type)
    if convert is None:
        return None
    t = t.contiguous()
    out = torch.empty(t.shape, dtype=torch.uint8, device=t.device)
    if t.device.type == "cpu":
        bad = convert(capsule(t), capsule(out), torch.get_num_threads())
    else:
        flag = torch.empty(1, dtype=torch.int32, device=t.device)
        convert(capsule(t), capsule(out), capsule(flag), stream_handle(t.device))
        bad = bool(flag.item())
    if bad:
        raise not_binary(name)
    return out


def not_binary(name: str) -> ValueError:
    """The error for dense targets or ignore masks holding values other than 0 and 1."""
    return ValueError(f"{name}: dense targets must hold only 0 and 1 (soft labels are not part "
                      "of SHL)")
