"""The native CPU kernel (csrc/shl_cpu.cpp) as a `FusedKernel` (see fused.py)."""
from __future__ import annotations

import torch

from . import _C
from .fused import capsule, kernel_outputs


def shl_fused_cpu(z: torch.Tensor, pos: torch.Tensor, ign: torch.Tensor | None,
                  order: torch.Tensor | None, offsets: torch.Tensor, w: torch.Tensor | None,
                  eta: torch.Tensor | None, delta: torch.Tensor | None, grad_scale: float,
                  need_grad_eta: bool, grad_out: torch.Tensor | None = None, *,
                  reduce: bool = False,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row losses, scaled gradient and (when asked) scaled per-row eta gradient. The kernel
    reads every logit before writing the gradient over it, so grad_out may be z. reduce:
    return the loss summed over rows (0-dim) and grad_eta summed over rows ([m]) instead,
    summed by the kernel call (rows in order, in double): fused.FusedSHL asks for it, so no
    torch op follows the kernel (two fewer ops in a small batch's step). Bad arguments raise
    ValueError/TypeError naming them; a kernel failure (invalid order or offsets, out of
    memory) raises RuntimeError with its message."""
    loss, grad, grad_eta = kernel_outputs(z, offsets, need_grad_eta, grad_out)
    total = torch.empty((), dtype=loss.dtype) if reduce else None
    geta_total = (torch.empty(grad_eta.shape[1], dtype=loss.dtype)
                  if reduce and grad_eta is not None else None)
    c = capsule
    _C.shl_fused_cpu(c(z), c(pos), c(ign), c(order), c(offsets), c(w), c(eta), c(delta),
                     float(grad_scale), c(loss), c(grad), c(grad_eta), torch.get_num_threads(),
                     c(total), c(geta_total))
    if reduce:
        return total, grad, geta_total
    return loss, grad, grad_eta


shl_fused_cpu.reduces = True  # accepts reduce=True (see fused.FusedSHL)
