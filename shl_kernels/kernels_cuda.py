"""The CUDA fused kernel (csrc/shl_cuda.cu) behind the FusedKernel protocol of fused.py."""
from __future__ import annotations

import os

import torch

from .backends import native
from .derived import cached, segment_position, segment_schedule
from .fused import capsule, kernel_outputs, stream_handle


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


# SHL_CUDA_STAGED=0 turns the shared-memory staging of rows off (the unstaged kernel gathers
# from global memory); for comparisons and as an escape hatch.
STAGED = os.environ.get("SHL_CUDA_STAGED", "1") != "0"
# SHL_CUDA_BLOCK_MIN: segments of at least this many labels are each done by a whole block
# (-1: the kernel's default, twice the block's threads); for tuning on a GPU.
BLOCK_MIN = int(os.environ.get("SHL_CUDA_BLOCK_MIN", "-1"))
# SHL_CUDA_STAGED_THREADS: threads per block of the staged kernel, 512 (default) or 256
# (three rows per SM instead of two where they fit shared memory); for tuning on a GPU.
STAGED_THREADS = int(os.environ.get("SHL_CUDA_STAGED_THREADS", "0"))
# SHL_CUDA_FLAT=0: the staged kernel's group schedule (a block, warp or lane per segment, see
# csrc/shl_cuda.cu) instead of the flat one (equal shares of each row per thread); kept to
# compare the two on a GPU.
FLAT = os.environ.get("SHL_CUDA_FLAT", "1") != "0"
# SHL_CUDA_ASYNC=0: stage rows with plain loads instead of cp.async copies running ahead.
ASYNC_STAGING = os.environ.get("SHL_CUDA_ASYNC", "1") != "0"


def host_offsets(offsets: torch.Tensor) -> torch.Tensor:
    """A CPU copy of offsets (once per tensor: the loss passes the same one every step), from
    which the kernel plans the windows of rows too large for shared memory."""
    return cached((offsets,), "host", lambda o: o.cpu())


# Rows of at most this many bytes of logits fit shared memory on every GPU the kernel runs
# on (sm_70 and later allow >= 96 KB per block): no windows, so no host copy of offsets (its
# one device-to-host copy, e.g. under CUDA graph capture, is never needed for them).
WINDOWLESS_ROW_BYTES = 64 << 10


def shl_fused_cuda(z: torch.Tensor, pos: torch.Tensor, ign: torch.Tensor | None,
                   order: torch.Tensor | None, offsets: torch.Tensor, w: torch.Tensor | None,
                   eta: torch.Tensor | None, delta: torch.Tensor | None, grad_scale: float,
                   need_grad_eta: bool, grad_out: torch.Tensor | None = None, *,
                   reduce: bool = False, staged: bool | None = None,
                   block_min: int | None = None, staged_threads: int | None = None,
                   flat: bool | None = None, async_staging: bool | None = None,
                   window_bytes: int = 0, staging_only: bool = False,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """FusedKernel on CUDA tensors (see fused.FusedKernel); runs on z's current stream.
    reduce: return the loss summed over rows (0-dim) and grad_eta summed over rows ([m]),
    reduced on the device in the same call (fused.FusedSHL asks for it: no torch op then
    follows the kernel). staged: stage rows in shared memory when they fit (default
    `STAGED`); block_min: the smallest segment a whole block takes (default `BLOCK_MIN`);
    staged_threads: 512 or 256 threads per staged block (default `STAGED_THREADS`, 0 = 512);
    flat: the flat schedule of staged rows (default `FLAT`), else the group schedule, which
    block_min tunes; async_staging: copy staged rows in with cp.async where shared memory has
    room (default `ASYNC_STAGING`); window_bytes: at most this many bytes of shared memory for
    a staged row or window (0: as the device allows; less makes rows take windows, tests);
    staging_only: a benchmark probe, wrong results (see ShlArgs::cuda_staging_only in
    csrc/shl_args.h): staged rows go in and out without being computed.
    Rows too large for shared memory are staged in windows of whole segments with the flat
    schedule (shuffled labels: the row read once per window; segment order: once in all),
    else (a segment alone too large, or more than 64 windows) gathered by the unstaged
    kernel."""
    staged = STAGED if staged is None else staged
    block_min = BLOCK_MIN if block_min is None else block_min
    staged_threads = STAGED_THREADS if staged_threads is None else staged_threads
    flat = FLAT if flat is None else flat
    async_staging = ASYNC_STAGING if async_staging is None else async_staging
    loss, grad, grad_eta = kernel_outputs(z, offsets, need_grad_eta, grad_out)
    total = geta_total = None
    if reduce:
        total = torch.zeros((), dtype=loss.dtype, device=z.device) if z.shape[0] == 0 else \
            torch.empty((), dtype=loss.dtype, device=z.device)
        if grad_eta is not None:
            geta_total = torch.empty(grad_eta.shape[1], dtype=loss.dtype, device=z.device)
            if z.shape[0] == 0:
                geta_total.zero_()
    position = segment_position(order) if staged and order is not None else None
    c = capsule
    native().shl_fused_cuda(
        c(z), c(pos), c(ign), c(order), c(offsets), c(w), c(eta), c(delta), float(grad_scale),
        c(loss), c(grad), c(grad_eta), stream_handle(z.device),
        c(position), staged, c(segment_schedule(offsets)), block_min, staged_threads, flat,
        async_staging, c(total), c(geta_total),
        c(host_offsets(offsets)) if staged and (
            window_bytes or z.shape[1] * z.element_size() > WINDOWLESS_ROW_BYTES) else None,
        window_bytes, staging_only)
    if reduce:
        return total, grad, geta_total
    return loss, grad, grad_eta


shl_fused_cuda.reduces = True  # accepts reduce=True (see fused.FusedSHL)
