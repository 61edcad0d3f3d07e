"""Autograd wrapper shared by every fused backend (cpu, cuda, triton).

A backend kernel has the signature of `FusedKernel`: it computes the per-row SHL loss and,
in the same pass, the gradient already multiplied by `grad_scale` (1/B for "mean").
Backward only rescales it by the upstream gradient, so the common case (upstream 1) is free.
"""
from __future__ import annotations

from typing import Protocol

import torch


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
        Returns loss_rows [B] (acc dtype, unscaled), grad [B, C] (z dtype, times grad_scale),
        grad_eta_rows [B, m] (acc dtype, times grad_scale) or None when not needed.
        grad_out: where to write grad (z itself for in-place; must then be safe to alias z);
        None = allocate. Every output element must be written (callers may pass torch.empty)."""
        ...


class FusedSHL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: FusedKernel, z: torch.Tensor, pos: torch.Tensor,
                ign: torch.Tensor | None, order: torch.Tensor | None, offsets: torch.Tensor,
                w: torch.Tensor | None, eta: torch.Tensor | None, delta: torch.Tensor | None,
                reduction: str, inplace: bool = False):
        B = z.shape[0]
        scale = 1.0 / B if (reduction == "mean" and B > 0) else 1.0
        need_eta = eta is not None and ctx.needs_input_grad[7]
        acc = torch.float64 if z.dtype == torch.float64 else torch.float32
        loss_rows, grad, grad_eta = kernel(z, pos, ign, order, offsets, w, eta, delta, scale,
                                           need_eta, z if inplace else None)
        if inplace:
            # z now holds the gradient: make autograd raise if anything saved z for backward.
            torch.autograd.graph.increment_version(z)
        ctx.save_for_backward(grad, grad_eta)
        ctx.reduction, ctx.factor = reduction, None
        ctx.delta_dtype = None if delta is None else delta.dtype
        if reduction == "none":
            return loss_rows
        return loss_rows.sum(dtype=acc) * scale

    @staticmethod
    def backward(ctx, go, *unused):
        grad, grad_eta = ctx.saved_tensors
        if ctx.reduction == "none":
            gz = grad * go.to(grad.dtype).unsqueeze(1)
            geta = None if grad_eta is None else (grad_eta * go.to(grad_eta.dtype).unsqueeze(1)).sum(0)
        else:
            # Rescale the saved buffer in place (no second B x C buffer); remember the
            # factor so a second backward (retain_graph=True) still gets the right answer.
            g = go.to(torch.float64).item()
            applied = 1.0 if ctx.factor is None else ctx.factor
            if g == 0.0:
                gz = torch.zeros_like(grad)
            else:
                if g != applied:
                    grad.mul_(g / applied)
                    ctx.factor = g
                gz = grad
            geta = None if grad_eta is None else grad_eta.sum(0) * g
        gdelta = None
        if ctx.needs_input_grad[8]:
            gdelta = gz.sum(0, dtype=torch.float32 if gz.dtype != torch.float64 else None)
            gdelta = gdelta.to(ctx.delta_dtype)
        return None, gz, None, None, None, None, None, geta, gdelta, None, None
