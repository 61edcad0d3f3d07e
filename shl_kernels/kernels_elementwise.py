"""Fused elementwise multi-label losses (BCE, sigmoid focal, asymmetric) on the native CPU,
native CUDA and Triton backends, and the autograd Function they share.

A kernel writes the loss (per-row sums, or the [B, C] losses for reduction="none") and, in
the same pass, the gradient already multiplied by `grad_scale` (1/(B*C) for "mean").
Backward only rescales it by the upstream gradient, like fused.FusedSHL.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Protocol

import torch
from torch.autograd.function import once_differentiable

from .backends import BACKENDS, native, resolve, why_unavailable
from .fused import Recompute, capsule, stream_handle, take_grad

KINDS = {"bce": 0, "focal": 1, "asl": 2}
_NATIVE_FN = {"cpu": "elementwise_fused_cpu", "cuda": "elementwise_fused_cuda"}


@dataclass(frozen=True)
class ElemSpec:
    """Which loss and its constants (elementwise.h ElemParams)."""

    kind: int
    alpha: float = -1.0  # focal: weight of positives, 1 - alpha for negatives; < 0 = none
    gamma: float = 0.0  # focal exponent
    gamma_pos: float = 0.0  # ASL exponents
    gamma_neg: float = 0.0
    clip: float = 0.0  # ASL probability margin (0 = off)
    eps: float = 1e-8  # ASL clamp inside the logs
    detach: bool = False  # ASL: focal weight is a constant in the gradient


class ElementwiseKernel(Protocol):
    def __call__(self, z: torch.Tensor, pos: torch.Tensor, ign: torch.Tensor | None,
                 weight: torch.Tensor | None, pos_weight: torch.Tensor | None, spec: ElemSpec,
                 grad_scale: float, *, loss_rows: torch.Tensor | None = None,
                 loss_el: torch.Tensor | None = None, grad: torch.Tensor | None = None,
                 loss_total: torch.Tensor | None = None) -> None:
        """z [B, C] fp32/fp64/fp16/bf16; pos/ign uint8 [B, C]; weight/pos_weight [C] in the
        accumulation dtype (fp64 for fp64 z, else fp32) or None; all on z's device, contiguous.
        Writes every element of the outputs given: loss_rows [B] (acc dtype, per-row sums),
        loss_el [B, C] and grad [B, C] (z dtype, grad times grad_scale), loss_total (0-dim,
        acc dtype: grad_scale times the sum of the row losses, summed in the same call; B >= 1
        and loss_rows given, which then may serve as scratch: its values are unspecified)."""
        ...


def _native_args(z, pos, ign, weight, pos_weight, spec, grad_scale, loss_rows, loss_el, grad,
                 loss_total):
    kind, alpha, gamma, gamma_pos, gamma_neg, clip, eps, detach = astuple(spec)
    return ((capsule(z), capsule(pos), capsule(ign), capsule(weight), capsule(pos_weight),
             capsule(loss_rows), capsule(loss_el), capsule(grad)),
            {"kind": kind, "alpha": alpha, "gamma": gamma, "gamma_pos": gamma_pos,
             "gamma_neg": gamma_neg, "clip": clip, "eps": eps, "detach": detach,
             "grad_scale": float(grad_scale), "loss_total": capsule(loss_total)})


def elementwise_cpu(z, pos, ign, weight, pos_weight, spec, grad_scale, *, loss_rows=None,
                    loss_el=None, grad=None, loss_total=None) -> None:
    """csrc/elementwise_cpu.cpp as an `ElementwiseKernel`."""
    caps, kw = _native_args(z, pos, ign, weight, pos_weight, spec, grad_scale, loss_rows,
                            loss_el, grad, loss_total)
    native().elementwise_fused_cpu(*caps, **kw, num_threads=torch.get_num_threads())


def elementwise_cuda(z, pos, ign, weight, pos_weight, spec, grad_scale, *, loss_rows=None,
                     loss_el=None, grad=None, loss_total=None) -> None:
    """csrc/elementwise_cuda.cu as an `ElementwiseKernel` (on z's device and current stream)."""
    caps, kw = _native_args(z, pos, ign, weight, pos_weight, spec, grad_scale, loss_rows,
                            loss_el, grad, loss_total)
    stream = stream_handle(z.device)
    native().elementwise_fused_cuda(*caps, **kw, stream=stream)


def elementwise_triton(z, pos, ign, weight, pos_weight, spec, grad_scale, *, loss_rows=None,
                       loss_el=None, grad=None, loss_total=None) -> None:
    """shl_kernels/triton_elementwise.py as an `ElementwiseKernel` (imported on first use)."""
    from .triton_elementwise import elementwise_fused_triton

    elementwise_fused_triton(z, pos, ign, weight, pos_weight, spec, grad_scale,
                             loss_rows=loss_rows, loss_el=loss_el, grad=grad,
                             loss_total=loss_total)


_KERNELS = {"cpu": elementwise_cpu, "cuda": elementwise_cuda, "triton": elementwise_triton}


def why_unavailable_elementwise(backend: str) -> str | None:
    """None when the fused elementwise losses can run on `backend` here, else why not."""
    if backend not in BACKENDS:
        return f"unknown backend; choose one of {list(BACKENDS)} or 'auto'"
    if backend in _NATIVE_FN:
        ext = native()
        if ext is None or backend == "cuda":  # not built / no CUDA: the SHL kernels' reason
            reason = why_unavailable(backend)
            if reason is not None:
                return reason
        if not hasattr(ext, _NATIVE_FN[backend]):
            return (f"this build of shl_kernels._C has no {backend} elementwise kernel; "
                    "rebuild from a full checkout: pip install --no-build-isolation -e .")
        return None
    return why_unavailable(backend)


def resolve_elementwise(backend: str, device: torch.device) -> str:
    """backends.resolve for the elementwise kernels."""
    return resolve(backend, device, why_unavailable_elementwise)


class FusedElementwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: ElementwiseKernel, z: torch.Tensor, pos: torch.Tensor,
                ign: torch.Tensor | None, weight: torch.Tensor | None,
                pos_weight: torch.Tensor | None, spec: ElemSpec, reduction: str):
        B, C = z.shape
        acc = torch.float64 if z.dtype == torch.float64 else torch.float32
        scale = 1.0 / (B * C) if (reduction == "mean" and B * C > 0) else 1.0
        need_grad = ctx.needs_input_grad[1]

        def run(z, pos, ign, factor=1.0, with_grad=True):
            grad = torch.empty_like(z) if with_grad else None
            if reduction == "none":
                out = torch.empty_like(z)
                kernel(z, pos, ign, weight, pos_weight, spec, 1.0, loss_el=out, grad=grad)
                return out, grad
            rows = torch.empty(B, dtype=acc, device=z.device)
            # The kernel sums the rows too (no torch op after it: a launch each on a GPU,
            # where a small batch's step is launch-bound); an empty batch sums to 0 here.
            total = torch.empty((), dtype=acc, device=z.device) if B else \
                torch.zeros((), dtype=acc, device=z.device)
            kernel(z, pos, ign, weight, pos_weight, spec, scale * factor, loss_rows=rows,
                   grad=grad, loss_total=total if B else None)
            return total, grad

        out, grad = run(z, pos, ign, with_grad=need_grad)
        if out.dtype != z.dtype:  # (the loss in the logits' dtype, as torch's losses)
            out = out.to(z.dtype)
        ctx.grad_buffer, ctx.reduction, ctx.grad_dtype = grad, reduction, z.dtype  # take_grad
        ctx.recompute = Recompute(lambda *t: (run(*t)[1], None), z, pos, ign)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, go):
        gz, _, _ = take_grad(ctx, go, ctx.reduction)
        return None, gz, None, None, None, None, None, None


def fused_elementwise(backend: str, z: torch.Tensor, pos: torch.Tensor, ign: torch.Tensor | None,
                      weight: torch.Tensor | None, pos_weight: torch.Tensor | None,
                      spec: ElemSpec, reduction: str) -> torch.Tensor:
    """The loss through the fused kernel of `backend` ('cpu', 'cuda' or 'triton')."""
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32

    def cast(x):
        return None if x is None else x.to(acc).contiguous()

    return FusedElementwise.apply(_KERNELS[backend], z.contiguous(), pos, ign, cast(weight),
                                  cast(pos_weight), spec, reduction)
