"""Triton fused elementwise losses (BCE, sigmoid focal, asymmetric); the formulas mirror
csrc/elementwise.h. Imported lazily (only when the Triton backend runs).

One program per [BLOCK_B, BLOCK_C] tile; each tile writes its row partial sums to a
[B, column blocks] buffer that torch then sums, so the row losses are deterministic.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .fused import on_device
from .kernels_elementwise import ElemSpec
from .triton_launch import DirectLaunch
from .triton_shl import REDUCE_MAX, _launch_counter, _reduce_last

_MAX_TILE = 4096
_MAX_BLOCK_C = 1024


@triton.jit
def _log1p01(e):
    # log1p for e in [0, 1] from log alone (Goldberg): exact where 1 + e rounds to 1.
    u = 1.0 + e
    d = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, e, tl.log(u) * (e / d))


@triton.jit
def _pow_pos(x, g):
    # x ** g for x >= 0 with 0 ** 0 = 1 (torch.pow).
    safe = tl.where(x > 0.0, x, 1.0)
    return tl.where(x > 0.0, tl.exp(g * tl.log(safe)), tl.where(g == 0.0, 1.0, 0.0))


@triton.jit
def _elementwise_kernel(z_ptr, pos_ptr, ign_ptr, w_ptr, pw_ptr, par_ptr, part_ptr, lel_ptr,
                        grad_ptr, B, C, n_cblocks, total_ptr, count_ptr,
                        KIND: tl.constexpr, DETACH: tl.constexpr, CLIP: tl.constexpr,
                        HAS_IGN: tl.constexpr,
                        HAS_W: tl.constexpr, HAS_PW: tl.constexpr, WRITE_ROWS: tl.constexpr,
                        WRITE_EL: tl.constexpr, WRITE_GRAD: tl.constexpr, ACC: tl.constexpr,
                        REDUCE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    # REDUCE: the last program also sums the [B, n_cblocks] partial row sums into total_ptr
    # times grad_scale (triton_shl._reduce_last; count_ptr its ticket counter).
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < B
    cmask = cols < C
    m = rmask[:, None] & cmask[None, :]
    off = rows[:, None].to(tl.int64) * C + cols[None, :]
    # Constants in the accumulation dtype (Python floats would arrive as fp32).
    alpha_pos = tl.load(par_ptr + 0)
    alpha_neg = tl.load(par_ptr + 1)
    gamma = tl.load(par_ptr + 2)
    gamma_pos = tl.load(par_ptr + 3)
    gamma_neg = tl.load(par_ptr + 4)
    clip = tl.load(par_ptr + 5)
    eps = tl.load(par_ptr + 6)
    log_eps = tl.load(par_ptr + 7)
    grad_scale = tl.load(par_ptr + 8)

    z = tl.load(z_ptr + off, mask=m, other=0.0).to(ACC)
    y = tl.load(pos_ptr + off, mask=m, other=0) != 0
    w = tl.full([BLOCK_B, BLOCK_C], 1.0, ACC)
    if HAS_W:
        w = w * tl.load(w_ptr + cols, mask=cmask, other=1.0)[None, :]
    ap = w * alpha_pos
    if HAS_PW:
        ap = ap * tl.load(pw_ptr + cols, mask=cmask, other=1.0)[None, :]
    a = tl.where(y, ap, w * alpha_neg)

    if KIND == 2:  # asymmetric loss
        e = tl.exp(-tl.abs(z))
        l1 = _log1p01(e)
        r = 1.0 / (1.0 + e)
        p = tl.where(z >= 0.0, r, e * r)
        q = tl.where(z >= 0.0, e * r, r)
        # positives: -log(max(p, eps)) * (1 - p)^gamma_pos
        in_p = ~(p < eps)
        L_p = tl.where(in_p, -(tl.maximum(-z, 0.0) + l1), log_eps)
        w_p = tl.where(gamma_pos == 0.0, 1.0, tl.exp(-gamma_pos * (tl.maximum(z, 0.0) + l1)))
        dL_p = tl.where(in_p, q, 0.0)
        if DETACH:
            g_p = -dL_p * w_p
        else:
            g_p = (gamma_pos * p * L_p - dL_p) * w_p
        # negatives: x = min(1 - p + clip, 1); -log(max(x, eps)) * (1 - x)^gamma_neg
        if CLIP:
            xs = q + clip
            clamped = xs > 1.0
            x = tl.where(clamped, 1.0, xs)
            pm = tl.where(clamped, 0.0, tl.maximum(p - clip, 0.0))
            in_n = ~(x < eps)
            L_n = tl.where(in_n, tl.log(tl.where(in_n, x, 1.0)), log_eps)
            dpm = tl.where(clamped, 0.0, p * q)  # d(1 - x)/dz
        else:
            x = q
            pm = p
            in_n = ~(x < eps)
            L_n = tl.where(in_n, -(tl.maximum(z, 0.0) + l1), log_eps)
            dpm = p * q
        w_n = _pow_pos(pm, gamma_neg)
        dL_n = tl.where(in_n, -dpm / tl.where(in_n, x, 1.0), 0.0)
        if DETACH:
            g_n = -dL_n * w_n
        else:
            dw = tl.where(gamma_neg == 0.0, 0.0,
                          tl.where(pm > 0.0, gamma_neg * _pow_pos(pm, gamma_neg - 1.0) * dpm, 0.0))
            g_n = -(dL_n * w_n + L_n * dw)
        loss = tl.where(y, -L_p * w_p, -L_n * w_n) * a
        grad = tl.where(y, g_p, g_n) * a
    else:  # BCE and focal, as functions of the logit pointing away from the target
        s = tl.where(y, -z, z)
        e = tl.exp(-tl.abs(s))
        l1 = _log1p01(e)
        r = 1.0 / (1.0 + e)
        sig_s = tl.where(s >= 0.0, r, e * r)
        sig_ms = tl.where(s >= 0.0, e * r, r)
        sp = tl.maximum(s, 0.0) + l1
        if KIND == 0:
            loss = a * sp
            gs = a * sig_s
        else:
            fw = tl.where(gamma == 0.0, 1.0, tl.exp(-gamma * (tl.maximum(-s, 0.0) + l1)))
            loss = a * fw * sp
            gs = a * fw * (gamma * sig_ms * sp + sig_s)
        grad = tl.where(y, -gs, gs)

    if HAS_IGN:
        skip = tl.load(ign_ptr + off, mask=m, other=0) != 0
        loss = tl.where(skip, 0.0, loss)
        grad = tl.where(skip, 0.0, grad)
    loss = tl.where(m, loss, 0.0)
    if WRITE_EL:
        tl.store(lel_ptr + off, loss.to(lel_ptr.dtype.element_ty), mask=m)
    if WRITE_GRAD:
        tl.store(grad_ptr + off, (grad * grad_scale).to(grad_ptr.dtype.element_ty), mask=m)
    if WRITE_ROWS:
        tl.store(part_ptr + rows.to(tl.int64) * n_cblocks + pid_c, tl.sum(loss, axis=1),
                 mask=rmask)
    if REDUCE:
        _reduce_last(part_ptr, part_ptr, total_ptr, total_ptr, count_ptr,
                     tl.num_programs(0) * tl.num_programs(1), B * n_cblocks, B, 0, ACC, False,
                     128, grad_scale)


_launch = DirectLaunch(_elementwise_kernel)


@functools.lru_cache(maxsize=64)
def _params(spec: ElemSpec, grad_scale: float, dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    alpha_pos = 1.0 if spec.alpha < 0 else spec.alpha
    alpha_neg = 1.0 if spec.alpha < 0 else 1.0 - spec.alpha
    vals = [alpha_pos, alpha_neg, spec.gamma, spec.gamma_pos, spec.gamma_neg, spec.clip,
            spec.eps, math.log(spec.eps), grad_scale]
    return torch.tensor(vals, dtype=dtype, device=device)


def elementwise_fused_triton(z: torch.Tensor, pos: torch.Tensor, ign: torch.Tensor | None,
                             weight: torch.Tensor | None, pos_weight: torch.Tensor | None,
                             spec: ElemSpec, grad_scale: float, *,
                             loss_rows: torch.Tensor | None = None,
                             loss_el: torch.Tensor | None = None,
                             grad: torch.Tensor | None = None,
                             loss_total: torch.Tensor | None = None) -> None:
    """`ElementwiseKernel` (kernels_elementwise.py) in Triton. loss_total: summed in the same
    launch where the grid is small (launch-bound batches; loss_rows is then left unwritten),
    else with torch."""
    B, C = z.shape
    if loss_total is not None and loss_rows is None:
        raise ValueError("loss_total: given without loss_rows (it sums the row losses)")
    if B == 0:
        return
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    block_c = min(triton.next_power_of_2(max(C, 1)), _MAX_BLOCK_C)
    block_b = max(1, min(triton.next_power_of_2(B), _MAX_TILE // block_c))
    n_cb = triton.cdiv(C, block_c) if C else 1
    part = torch.empty(B, n_cb, dtype=acc, device=z.device) if loss_rows is not None else None
    par = _params(spec, float(grad_scale), acc, z.device)
    grid = (triton.cdiv(B, block_b), n_cb)
    counter = (_launch_counter(z.device)
               if loss_total is not None and B * n_cb <= REDUCE_MAX else None)
    args = (z, pos, ign if ign is not None else pos, weight if weight is not None else par,
            pos_weight if pos_weight is not None else par, par,
            part if part is not None else par, loss_el if loss_el is not None else z,
            grad if grad is not None else z, B, C, n_cb,
            loss_total if counter is not None else par, counter if counter is not None else par)
    flags = {"KIND": spec.kind, "DETACH": spec.detach, "CLIP": spec.clip > 0,
             "HAS_IGN": ign is not None, "HAS_W": weight is not None,
             "HAS_PW": pos_weight is not None, "WRITE_ROWS": loss_rows is not None,
             "WRITE_EL": loss_el is not None, "WRITE_GRAD": grad is not None,
             "ACC": tl.float64 if acc == torch.float64 else tl.float32,
             "REDUCE": counter is not None, "BLOCK_B": block_b, "BLOCK_C": block_c}
    with on_device(z.device):
        _launch(grid, args, flags, z.device)
    if counter is not None:
        return
    if loss_rows is not None:
        torch.sum(part, dim=1, out=loss_rows)
    if loss_total is not None:
        torch.mul(loss_rows.sum(), grad_scale, out=loss_total)
