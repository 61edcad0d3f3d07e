"""The CUDA fused kernel (csrc/shl_cuda.cu) behind the FusedKernel protocol of fused.py."""
from __future__ import annotations

import torch
from torch.utils.dlpack import to_dlpack

from .backends import native


def cuda_available() -> tuple[bool, str]:
    """(True, "") when the CUDA kernel can run here, else (False, why and what to do)."""
    ext = native()
    if ext is None or not ext.build_info.get("cuda") or not hasattr(ext, "shl_fused_cuda"):
        return False, ("shl_kernels._C was built without CUDA kernels; reinstall with nvcc on "
                       "PATH (pip install --no-build-isolation -e .), or with SHL_CUDA=1 to make "
                       "a missing nvcc an error")
    _driver, _runtime, devices = ext.cuda_runtime_info()
    if isinstance(devices, str):
        return False, f"no usable CUDA driver/device: {devices}"
    if devices == 0:
        return False, "no CUDA device found"
    if not torch.cuda.is_available():
        return False, "torch cannot use CUDA (CPU-only torch build or no device visible to it)"
    return True, ""


def _dl(t: torch.Tensor | None):
    return None if t is None else to_dlpack(t)


def shl_fused_cuda(z: torch.Tensor, pos: torch.Tensor, ign: torch.Tensor | None,
                   order: torch.Tensor | None, offsets: torch.Tensor, w: torch.Tensor | None,
                   eta: torch.Tensor | None, delta: torch.Tensor | None, grad_scale: float,
                   need_grad_eta: bool, grad_out: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """FusedKernel on CUDA tensors (see fused.FusedKernel); runs on z's current stream."""
    B, C = z.shape
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    loss = torch.empty(B, dtype=acc, device=z.device)
    grad = torch.empty((B, C), dtype=z.dtype, device=z.device) if grad_out is None else grad_out
    grad_eta = (torch.empty((B, offsets.numel() - 1), dtype=acc, device=z.device)
                if need_grad_eta else None)
    native().shl_fused_cuda(
        to_dlpack(z), to_dlpack(pos), _dl(ign), _dl(order), to_dlpack(offsets), _dl(w), _dl(eta),
        _dl(delta), float(grad_scale), to_dlpack(loss), to_dlpack(grad), _dl(grad_eta),
        torch.cuda.current_stream(z.device).cuda_stream)
    return loss, grad, grad_eta
