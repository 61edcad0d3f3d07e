"""PyTorch reference of SPEC section 3: defines correctness; gradients come from autograd."""
from __future__ import annotations

import torch

from .segmentation import Segmentation


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _seg_index(seg: Segmentation, B: int, device) -> torch.Tensor:
    return seg.on(device)[2].unsqueeze(0).expand(B, -1)


def _segment_max(u: torch.Tensor, eta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[B, m] max over each segment's u's (-inf: left out) and its eta, detached (the results
    do not depend on the shift, only their rounding does)."""
    M = torch.full(eta.shape, float("-inf"), dtype=u.dtype, device=u.device)
    M = M.scatter_reduce(1, idx, u.detach(), "amax", include_self=True)
    return torch.maximum(M, eta.detach())


def shl_loss_reference(z: torch.Tensor, pos: torch.Tensor, seg: Segmentation,
                       w: torch.Tensor | None = None, eta: torch.Tensor | None = None,
                       delta: torch.Tensor | None = None, ign: torch.Tensor | None = None,
                       reduction: str = "mean") -> torch.Tensor:
    """Loss of SPEC section 3; `pos`/`ign` are dense bool [B, C] in original label order."""
    B, C = z.shape
    m = seg.num_segments
    acc = _acc_dtype(z.dtype)
    dev = z.device
    order = seg.on(dev)[0]
    u = z.to(acc) if delta is None else z.to(acc) + delta.to(acc)
    u = u[:, order]
    ig = torch.zeros_like(u, dtype=torch.bool) if ign is None else ign.bool()[:, order]
    p = pos.bool()[:, order] & ~ig
    wp = (torch.ones(C, dtype=acc, device=dev) if w is None else w.to(acc)[order]).expand(B, -1)
    e_eta = torch.zeros(m, dtype=acc, device=dev) if eta is None else eta.to(acc)
    e_eta = e_eta.expand(B, -1)
    idx = _seg_index(seg, B, dev)
    um = u.masked_fill(ig, float("-inf"))  # ignored labels take no part
    un = um.masked_fill(p, float("-inf"))  # the negatives
    # The shift M: the max of eta and the negatives' u (SPEC's "eta and the u's" without
    # the positives). With a positive in it, a positive far above the rest of its segment
    # made A and another positive's exp(u_p - M) underflow together: D_p = 0, loss -inf.
    # Floored at the lowest finite value: a segment of positives alone with eta = -inf gets
    # A = 0 (loss 0), not NaN.
    M = _segment_max(un, e_eta, idx)
    M = torch.where(M == float("-inf"), torch.finfo(acc).min, M)
    Mg = M.gather(1, idx)
    en = torch.exp(un - Mg)
    A = torch.exp(e_eta - M) + torch.zeros((B, m), dtype=acc, device=dev).scatter_add(1, idx, en)
    npos = torch.zeros((B, m), dtype=acc, device=dev).scatter_add(1, idx, p.to(acc))
    # log A, with log 0 = -inf and no NaN gradient from it
    logA = torch.where(A > 0, torch.log(A.clamp_min(torch.finfo(acc).tiny)), float("-inf"))
    null_term = torch.where(npos == 0, logA + M - e_eta, 0.0)
    # log D_p - u_p = log(1 + A exp(M - u_p)): softplus(log A - (u_p - M)), no exp(u_p - M)
    # to overflow; a +inf positive gives NaN (SPEC: inf propagates to the loss).
    x = torch.where(p, logA.gather(1, idx) - (u - Mg), 0.0)
    pos_loss = torch.where(u == float("inf"), float("nan"), torch.logaddexp(torch.zeros_like(x), x))
    pos_term = torch.where(p, wp * pos_loss, 0.0)
    rows = null_term.sum(1) + pos_term.sum(1)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / B
    raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")


def segment_probs(logits: torch.Tensor, seg: Segmentation,
                  null_logits: torch.Tensor | None = None) -> torch.Tensor:
    """p_c = exp(z_c) / (exp(eta_k) + sum over segment k of exp(z)), original label order."""
    B, _C = logits.shape
    acc = _acc_dtype(logits.dtype)
    dev = logits.device
    order = seg.on(dev)[0]
    u = logits.to(acc)[:, order]
    m = seg.num_segments
    eta = (torch.zeros(m, dtype=acc, device=dev) if null_logits is None
           else null_logits.to(acc)).expand(B, -1)
    idx = _seg_index(seg, B, dev)
    M = _segment_max(u, eta, idx)
    e = torch.exp(u - M.gather(1, idx))
    D = torch.exp(eta - M).scatter_add(1, idx, e)
    p = e / D.gather(1, idx)
    out = torch.empty_like(p)
    out[:, order] = p
    return out


def harmonic_weights(label_counts, *, beta: float) -> torch.Tensor:
    """w_c = (n_H / max(n_c, 1)) ** beta with n_H the harmonic mean of the nonzero counts."""
    n = torch.as_tensor(label_counts, dtype=torch.float64)
    seen = n[n >= 1]
    if seen.numel() == 0:
        raise ValueError("label_counts: no label has a count >= 1")
    n_h = seen.numel() / (1.0 / seen).sum()
    return ((n_h / n.clamp(min=1)) ** beta).to(torch.float32)
