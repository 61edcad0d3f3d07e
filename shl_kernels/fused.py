"""Autograd wrapper shared by every fused backend (cpu, cuda, triton).

A backend kernel has the signature of `FusedKernel`: it computes the per-row SHL loss and,
in the same pass, the gradient, both already multiplied by `grad_scale` (1/B for "mean"), so
the reduced loss is one sum. Backward only rescales the gradient by the upstream gradient, so
the common case (upstream 1) is free. fp16 logits under a loss scale (GradScaler) are the
exception: see take_grad.
"""
from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from typing import Protocol

import torch
from torch.autograd.function import once_differentiable
from torch.utils.dlpack import to_dlpack


class FusedKernel(Protocol):
    def __call__(self, z: torch.Tensor, pos: torch.Tensor, ign: torch.Tensor | None,
                 order: torch.Tensor | None, offsets: torch.Tensor, w: torch.Tensor | None,
                 eta: torch.Tensor | None, delta: torch.Tensor | None, grad_scale: float,
                 need_grad_eta: bool, grad_out: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Inputs (all on z's device, contiguous):
        z [B, C] fp32/fp64/fp16/bf16, original label order; pos/ign uint8 [B, C] (nonzero =
        positive / ignored; ign may be None); order int64 [C] (original id at each segment
        position; None = identity); offsets int64 [m+1]; w, delta [C] and eta [m] in the
        accumulation dtype (fp64 for fp64 z, else fp32) or None.
        Returns loss [B] or [B, n] (acc dtype, times grad_scale: the row losses, or per row n
        partial sums of them), grad [B, C] (z dtype, times grad_scale),
        grad_eta_rows [B, m] (acc dtype, times grad_scale) or None when not needed.
        grad_out: where to write grad (z itself for in-place; must then be safe to alias z);
        None = allocate. Every output element must be written (callers may pass torch.empty).
        A kernel whose `reduces` attribute is true also takes reduce=True and then returns the
        loss summed over rows (0-dim) and grad_eta summed over rows ([m]) instead."""
        ...


def kernel_outputs(z: torch.Tensor, offsets: torch.Tensor, need_grad_eta: bool,
                   grad_out: torch.Tensor | None = None):
    """Uninitialised (loss [B], grad, grad_eta_rows) for a FusedKernel, on z's device."""
    B, C = z.shape
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    loss = torch.empty(B, dtype=acc, device=z.device)
    grad = torch.empty((B, C), dtype=z.dtype, device=z.device) if grad_out is None else grad_out
    grad_eta = (torch.empty((B, offsets.numel() - 1), dtype=acc, device=z.device)
                if need_grad_eta else None)
    return loss, grad, grad_eta


def on_device(device: torch.device):
    """Context making `device` current for a launch (Triton launches on the current device):
    a no-op when it already is, which spares two device switches per call."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


# torch's own raw-stream getter (what torch.compile's generated code calls): an int, where
# torch.cuda.current_stream builds a Stream object per call. Absent from CPU-only builds.
_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def stream_handle(device: torch.device) -> int:
    """The cudaStream_t of the current stream on `device`, as an int (for native launches)."""
    if _RAW_STREAM is not None:
        return _RAW_STREAM(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def capsule(t: torch.Tensor | None):
    """DLPack capsule for the native bindings (None stays None: an absent optional input)."""
    return None if t is None else to_dlpack(t)


class FusedSHL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: FusedKernel, z: torch.Tensor, pos: torch.Tensor,
                ign: torch.Tensor | None, order: torch.Tensor | None, offsets: torch.Tensor,
                w: torch.Tensor | None, eta: torch.Tensor | None, delta: torch.Tensor | None,
                reduction: str, inplace: bool = False):
        B = z.shape[0]
        scale = 1.0 / B if (reduction == "mean" and B > 0) else 1.0
        need_eta = eta is not None and ctx.needs_input_grad[7]
        # Kernels that can reduce on the device do, for "mean"/"sum": no torch op follows.
        kw = {"reduce": True} if reduction != "none" and getattr(kernel, "reduces", False) \
            else {}
        loss_rows, grad, grad_eta = kernel(z, pos, ign, order, offsets, w, eta, delta, scale,
                                           need_eta, z if inplace else None, **kw)
        if inplace:
            # z now holds the gradient: make autograd raise if anything saved z for backward.
            torch.autograd.graph.increment_version(z)
        # Kept on ctx, not saved: backward hands this buffer to autograd as the gradient,
        # so no second [B, C] buffer is ever made (save_for_backward would force a copy).
        ctx.grad_buffer, ctx.grad_eta, ctx.grad_dtype = grad, grad_eta, z.dtype
        # Summed over rows by the kernel (reduce): take_grad scales it with the gradient.
        ctx.eta_summed = grad_eta is not None and grad_eta.dim() == 1
        ctx.reduction = reduction
        if not inplace:  # a second backward (retain_graph, gradcheck) recomputes the buffer
            ctx.recompute = Recompute(lambda z, pos, ign, factor=1.0: kernel(
                z, pos, ign, order, offsets, w, eta, delta, scale * factor, need_eta, **kw)[1:],
                z, pos, ign)
        ctx.delta_dtype = None if delta is None else delta.dtype
        if reduction == "none":  # scale 1: the row losses
            return loss_rows if loss_rows.dim() == 1 else loss_rows.sum(1)
        # Rows already carry 1/B for "mean": one op (a launch on GPUs, where a small batch's
        # step is launch-bound), in the accumulation dtype; none when the kernel reduced.
        return loss_rows if loss_rows.dim() == 0 else loss_rows.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, go):
        gz, g, grad_eta = take_grad(ctx, go, ctx.reduction, scale_extra=ctx.eta_summed)
        geta = None
        if grad_eta is not None:
            if ctx.reduction == "none":  # g: the rows' upstream gradient left to apply
                geta = (grad_eta * g.to(grad_eta.dtype).unsqueeze(1)).sum(0)
            elif ctx.eta_summed:  # scaled by take_grad
                geta = grad_eta
            else:
                geta = grad_eta.sum(0)
                if isinstance(g, torch.Tensor) or g != 1.0:
                    geta.mul_(g)
        gdelta = None
        if ctx.needs_input_grad[8]:
            gdelta = gz.sum(0, dtype=torch.float32 if gz.dtype != torch.float64 else None)
            gdelta = gdelta.to(ctx.delta_dtype)
        return None, gz, None, None, None, None, None, geta, gdelta, None, None


class Recompute:
    """Runs the forward kernel again, for a second backward or with the upstream gradient
    folded into its scale (`factor`); `fn(z, *masks, factor)` returns (grad, extra buffer or
    None). The logits are held by a weak reference (a strong one
    would keep them alive until backward), except fp16 logits, whose gradient take_grad
    recomputes under a loss scale; the uint8 target and ignore masks (a quarter of an fp32
    gradient at most) are held."""

    def __init__(self, fn, z: torch.Tensor, *masks: torch.Tensor | None) -> None:
        self.fn, self.masks = fn, masks
        self.z = (lambda: z) if z.dtype == torch.float16 else weakref.ref(z)
        self.versions = [t._version for t in (z, *masks) if t is not None]

    def ready(self) -> bool:
        """The logits are alive and neither they nor the masks changed since the forward."""
        z = self.z()
        return z is not None and [t._version for t in (z, *self.masks)
                                  if t is not None] == self.versions

    def __call__(self, factor: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if not self.ready():
            return None
        with torch.no_grad():
            return self.fn(self.z(), *self.masks, factor)


def take_grad(ctx, go: torch.Tensor, reduction: str, scale_extra: bool = False):
    """The gradient buffer the forward left in `ctx.grad_buffer` (and `ctx.grad_eta`, for
    SHL), times the upstream gradient `go`, rescaled in place and handed over to autograd
    (no copy). A second backward recomputes the buffers with `ctx.recompute`.
    scale_extra: for "mean"/"sum", scale the extra buffer by `go` too (in the same op on
    the device).
    Returns (grad, upstream gradient (a float, or a 0-dim tensor when not read on the host;
    for reduction "none" the tensor applied to the rows; 1.0 once folded into a recomputed
    buffer), extra buffer).
    The Function's forward sets ctx.grad_dtype (the logits' dtype).
    Shared by every fused loss Function."""
    grad = ctx.__dict__.pop("grad_buffer", None)
    extra = ctx.__dict__.pop("grad_eta", None)
    recompute = getattr(ctx, "recompute", None)
    if ctx.grad_dtype == torch.float16 and recompute is None and reduction != "none" \
            and abs(float(go)) > 16.0:
        warnings.warn("inplace=True with fp16 logits and a loss scale (upstream gradient "
                      f"{float(go):g}): the gradient was rounded to fp16 before the scale, so "
                      "its small entries lost precision or became 0; pass inplace=False "
                      "(the kernel then runs again with the scale) or use bf16", stacklevel=3)
    if (ctx.grad_dtype == torch.float16 and recompute is not None and recompute.ready()
            and go.dim() <= 1 and go.numel()):
        # fp16 gradients were rounded at the forward's scale (1/B for "mean"), where many are
        # subnormal or 0; a loss scale (GradScaler: 2^16) would only scale that rounding up.
        # The kernel runs again with the upstream gradient folded into its scale, as torch
        # rounds after scaling; rows ("none") take their smallest nonzero magnitude (no
        # overflow where torch's gradient has none), then the rest of theirs.
        factor = float(go.abs().where(go != 0, math.inf).min()) if go.dim() else float(go)
        if factor not in (0.0, 1.0) and math.isfinite(factor):
            grad = extra = None  # (freed before the kernel allocates the new ones)
            grad, extra = recompute(factor)
            if reduction != "none":
                return grad, 1.0, extra
            go = go / factor
    if grad is None:
        again = recompute() if recompute is not None else None
        if again is None:
            raise RuntimeError(
                "second backward through a fused loss: its gradient was handed to autograd "
                "and cannot be recomputed (logits overwritten in place, freed or modified "
                "since the forward); use backend='torch' or compute the loss again")
        grad, extra = again
    if reduction == "none":
        # (go in its own dtype: rounded to fp16 first, a loss scale of 2^16 would be inf)
        grad.mul_(go if go.dim() == grad.dim() else go.unsqueeze(1))
        return grad, go, extra
    both = scale_extra and extra is not None
    if not sync_for_upstream(grad):
        # small GPU buffer: a pass costs less than stalling the host; one op for both
        # buffers (a launch-bound step pays per op)
        if both:
            torch._foreach_mul_([grad, extra], go)
        else:
            grad.mul_(go)
        return grad, go, extra
    g = float(go)  # one host sync; skips a full pass over the buffer when g == 1
    if g != 1.0:
        grad.mul_(g)
        if both:
            extra.mul_(g)
    return grad, g, extra


# Below this many elements a GPU gradient buffer is scaled by the upstream gradient on the
# device (a few microseconds) instead of reading the upstream value on the host, which would
# wait for the forward kernel and leave the GPU idle while the backward is launched.
NO_SYNC_NUMEL = 1 << 22


def sync_for_upstream(grad: torch.Tensor) -> bool:
    """Whether take_grad reads the scalar upstream gradient on the host (CPU tensors: free;
    large GPU buffers: the sync saves a full pass over the buffer when it is 1)."""
    return grad.device.type == "cpu" or grad.numel() > NO_SYNC_NUMEL
