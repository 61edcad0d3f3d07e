"""The native CPU kernel (csrc/shl_cpu.cpp) as a `FusedKernel` (see fused.py)."""
from __future__ import annotations

import torch
from torch.utils.dlpack import to_dlpack

from . import _C


def _cap(t: torch.Tensor | None):
    return None if t is None else to_dlpack(t)


def shl_fused_cpu(z: torch.Tensor, pos: torch.Tensor, ign: torch.Tensor | None,
                  order: torch.Tensor | None, offsets: torch.Tensor, w: torch.Tensor | None,
                  eta: torch.Tensor | None, delta: torch.Tensor | None, grad_scale: float,
                  need_grad_eta: bool, grad_out: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row losses, scaled gradient and (when asked) scaled per-row eta gradient. The kernel
    reads every logit before writing the gradient over it, so grad_out may be z. Bad
    arguments raise ValueError/TypeError naming them; a kernel failure (invalid order or
    offsets, out of memory) raises RuntimeError with its message."""
    B, C = z.shape
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    loss = torch.empty(B, dtype=acc)
    grad = torch.empty((B, C), dtype=z.dtype) if grad_out is None else grad_out
    grad_eta = torch.empty((B, offsets.numel() - 1), dtype=acc) if need_grad_eta else None
    _C.shl_fused_cpu(_cap(z), _cap(pos), _cap(ign), _cap(order), _cap(offsets), _cap(w),
                     _cap(eta), _cap(delta), float(grad_scale), _cap(loss), _cap(grad),
                     _cap(grad_eta), torch.get_num_threads())
    return loss, grad, grad_eta
