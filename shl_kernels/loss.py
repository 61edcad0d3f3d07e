"""Public loss API (SPEC section 4). Only the "torch" backend exists so far."""
from __future__ import annotations

import torch

from .reference import harmonic_weights, shl_loss_reference
from .segmentation import Segmentation


def available_backends() -> list[str]:
    return ["torch"]


def _dense(t, B: int, C: int, name: str, device) -> torch.Tensor:
    if isinstance(t, tuple):
        indptr, indices = t
        if indptr.numel() != B + 1:
            raise ValueError(f"{name}: CSR indptr must have B+1={B + 1} entries")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= C):
            raise ValueError(f"{name}: label ids must be in [0, {C})")
        rows = torch.repeat_interleave(torch.arange(B, device=device), indptr.diff().long())
        out = torch.zeros(B, C, dtype=torch.bool, device=device)
        if torch.bincount(rows * C + indices.long(), minlength=1).max() > 1 if indices.numel() else False:
            raise ValueError(f"{name}: duplicate label ids in a row")
        out[rows, indices.long()] = True
        return out
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor or an (indptr, indices) tuple")
    if t.shape != (B, C):
        raise ValueError(f"{name}: expected shape ({B}, {C}), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, logits on {device}; move it with .to()")
    return t != 0


def segmented_harmonic_loss(logits: torch.Tensor, targets, seg: Segmentation, *,
                            label_weights=None, null_logits=None, logit_offsets=None,
                            ignore=None, reduction: str = "mean",
                            backend: str = "auto") -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("logits: expected a 2-D tensor [B, C]")
    if not logits.is_floating_point():
        raise TypeError(f"logits: expected a floating dtype, got {logits.dtype}")
    B, C = logits.shape
    if C != seg.num_labels:
        raise ValueError(f"logits: has {C} labels, the segmentation {seg.num_labels}")
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend: {backend!r} is not available; available: {available_backends()}")
    if label_weights is not None:
        w = torch.as_tensor(label_weights)
        if w.shape != (C,) or not torch.isfinite(w).all() or (w <= 0).any():
            raise ValueError("label_weights: expected [C] finite positive weights")
    pos = _dense(targets, B, C, "targets", logits.device)
    ign = None if ignore is None else _dense(ignore, B, C, "ignore", logits.device)
    return shl_loss_reference(logits, pos, seg, label_weights, null_logits, logit_offsets,
                              ign, reduction)


class SegmentedHarmonicLoss(torch.nn.Module):
    def __init__(self, seg: Segmentation, *, beta: float, learn_null: bool = True,
                 backend: str = "auto", reduction: str = "mean") -> None:
        super().__init__()
        self.seg, self.backend, self.reduction = seg, backend, reduction
        self.register_buffer("label_weights", harmonic_weights(seg.label_counts, beta=beta))
        eta = torch.zeros(seg.num_segments)
        if learn_null:
            self.null_logits = torch.nn.Parameter(eta)
        else:
            self.register_buffer("null_logits", eta)

    def forward(self, logits, targets, ignore=None, logit_offsets=None):
        return segmented_harmonic_loss(
            logits, targets, self.seg, label_weights=self.label_weights,
            null_logits=self.null_logits, logit_offsets=logit_offsets, ignore=ignore,
            reduction=self.reduction, backend=self.backend)
