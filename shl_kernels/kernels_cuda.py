"""The CUDA fused kernel (csrc/shl_cuda.cu) behind the FusedKernel protocol of fused.py."""
from __future__ import annotations

import torch

from .backends import native
from .fused import capsule, kernel_outputs


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


def shl_fused_cuda(z: torch.Tensor, pos: torch.Tensor, ign: torch.Tensor | None,
                   order: torch.Tensor | None, offsets: torch.Tensor, w: torch.Tensor | None,
                   eta: torch.Tensor | None, delta: torch.Tensor | None, grad_scale: float,
                   need_grad_eta: bool, grad_out: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """FusedKernel on CUDA tensors (see fused.FusedKernel); runs on z's current stream."""
    loss, grad, grad_eta = kernel_outputs(z, offsets, need_grad_eta, grad_out)
    c = capsule
    native().shl_fused_cuda(
        c(z), c(pos), c(ign), c(order), c(offsets), c(w), c(eta), c(delta), float(grad_scale),
        c(loss), c(grad), c(grad_eta), torch.cuda.current_stream(z.device).cuda_stream)
    return loss, grad, grad_eta
