"""Baseline multi-label losses, in the API style of `segmented_harmonic_loss`.

Common to every function here:
- `logits [B, C]` in label order (float32/float64/float16/bfloat16); `targets` and `ignore`
  dense 0/1 `[B, C]` or CSR `(indptr, indices)` (SPEC section 1).
- `ignore`: ignored (row, label) pairs contribute 0 loss and 0 gradient.
- `reduction`: as torch's BCEWithLogitsLoss: "mean" = sum of the [B, C] elementwise losses
  divided by B*C (ignored pairs count in the denominator, as zeros), "sum", or "none" = the
  [B, C] losses. The result has the logits' dtype; internally float32 (float64 for float64
  logits) is used.
- `backend`: "auto" | "torch" | "cpu" | "cuda" | "triton". BCE, focal, asymmetric and
  class-balanced losses have fused kernels (loss and gradient in one pass); "auto" picks
  Triton for CUDA tensors (else the CUDA kernel), the native kernel for CPU tensors, else the
  PyTorch reference below. The distribution-balanced loss is PyTorch only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kernels_elementwise import KINDS, ElemSpec, fused_elementwise, resolve_elementwise
from .loss import _status

__all__ = ["asymmetric_loss", "bce_loss", "class_balanced_loss", "class_balanced_weights",
           "distribution_balanced_loss", "focal_loss"]

_REDUCTIONS = ("mean", "sum", "none")
_SUPPORTED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_logits(logits, reduction: str) -> tuple[int, int]:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("logits: expected a 2-D tensor [B, C]")
    if logits.dtype not in _SUPPORTED:
        raise TypeError(f"logits: unsupported dtype {logits.dtype}; use float32, float64, "
                        "float16 or bfloat16")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    return logits.shape


def _label_vector(x, C: int, name: str, z: torch.Tensor) -> torch.Tensor | None:
    """A per-label [C] weight: floating, on the logits' device, finite and >= 0."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, dtype=_acc(z.dtype), device=z.device)
    if x.shape != (C,):
        raise ValueError(f"{name}: expected shape ({C},), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
    if x.device != z.device:
        raise ValueError(f"{name}: on {x.device}, logits on {z.device}; move it with .to()")
    if x.requires_grad:
        raise ValueError(f"{name}: requires grad, but weights are constants here (as in "
                         f"torch's BCEWithLogits); pass {name}.detach()")
    if not bool(torch.isfinite(x).all()) or bool((x < 0).any()):
        raise ValueError(f"{name}: must be finite and >= 0")
    return x


def _counts(label_counts, C: int | None, name: str = "label_counts") -> torch.Tensor:
    n = torch.as_tensor(label_counts).detach().cpu()
    if n.dim() != 1 or (C is not None and n.numel() != C):
        want = "a 1-D [C] tensor" if C is None else f"shape ({C},)"
        raise ValueError(f"{name}: expected {want}, got {tuple(n.shape)}")
    if n.is_complex() or n.dtype == torch.bool:
        raise TypeError(f"{name}: expected real counts, got {n.dtype}")
    n = n.to(torch.float64)
    if not bool(torch.isfinite(n).all()) or bool((n < 0).any()):
        raise ValueError(f"{name}: counts must be finite and >= 0")
    return n


def _reduce(el: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    if reduction == "none":
        return el.to(dtype)
    total = el.sum()
    return (total if reduction == "sum" else total / el.numel()).to(dtype)


# --- PyTorch references: elementwise [B, C] losses in the accumulation dtype -------------

def _bce_torch(z, y, spec, weight, pos_weight):
    return F.binary_cross_entropy_with_logits(z, y.to(z.dtype), weight=weight,
                                              pos_weight=pos_weight, reduction="none")


def _focal_torch(z, y, spec, weight, pos_weight):
    # torchvision.ops.sigmoid_focal_loss; (1 - p_t)^gamma taken as exp(gamma logsigmoid(s)),
    # s = -z / z (the same value, without the cancellation of 1 - sigmoid(z), and with a
    # finite gradient where sigmoid(s) is 0: pow(0, gamma < 1)'s is inf * 0 = NaN).
    ce = F.binary_cross_entropy_with_logits(z, y.to(z.dtype), reduction="none")
    loss = ce * torch.exp(spec.gamma * F.logsigmoid(torch.where(y, -z, z)))
    if spec.alpha >= 0:
        loss = loss * torch.full_like(z, 1 - spec.alpha).masked_fill(y, spec.alpha)
    return loss if weight is None else loss * weight


def _asl_torch(z, y, spec, weight, pos_weight):
    # Official AsymmetricLoss (Ridnik et al. 2021, github.com/Alibaba-MIIL/ASL), with
    # 1 - sigmoid(z) taken as sigmoid(-z): the same value, but without the cancellation that
    # sends it to 0 (and into the eps clamp) for float32 logits above ~17.
    t = y.to(z.dtype)
    xs_pos = torch.sigmoid(z)
    xs_neg = torch.sigmoid(-z)
    if spec.clip > 0:
        xs_neg = (xs_neg + spec.clip).clamp(max=1)
    loss = t * torch.log(xs_pos.clamp(min=spec.eps)) + (1 - t) * torch.log(
        xs_neg.clamp(min=spec.eps))
    if spec.gamma_neg > 0 or spec.gamma_pos > 0:
        pt = xs_pos * t + xs_neg * (1 - t)
        focal = torch.pow(1 - pt, spec.gamma_pos * t + spec.gamma_neg * (1 - t))
        loss = loss * (focal.detach() if spec.detach else focal)
    return -loss if weight is None else -loss * weight


_TORCH = {KINDS["bce"]: _bce_torch, KINDS["focal"]: _focal_torch, KINDS["asl"]: _asl_torch}


def _elementwise(spec: ElemSpec, logits, targets, ignore, reduction: str, backend: str,
                 weight=None, pos_weight=None) -> torch.Tensor:
    _check_logits(logits, reduction)
    name = resolve_elementwise(backend, logits.device)
    if name == "torch":
        return _elementwise_torch(spec, logits, targets, ignore, reduction, weight, pos_weight)
    return _elementwise_fused(name, spec, logits, targets, ignore, reduction, weight, pos_weight)


def _elementwise_inputs(logits, targets, ignore, weight, pos_weight):
    """The checked (weight, pos_weight, pos, ign) of an elementwise loss."""
    B, C = logits.shape
    weight = _label_vector(weight, C, "weight", logits)
    pos_weight = _label_vector(pos_weight, C, "pos_weight", logits)
    pos = _status(targets, B, C, "targets", logits.device)
    ign = None if ignore is None else _status(ignore, B, C, "ignore", logits.device)
    return weight, pos_weight, pos, ign


def _elementwise_torch(spec: ElemSpec, logits, targets, ignore, reduction: str, weight,
                       pos_weight) -> torch.Tensor:
    weight, pos_weight, pos, ign = _elementwise_inputs(logits, targets, ignore, weight,
                                                       pos_weight)
    acc = _acc(logits.dtype)

    def cast(x):
        return None if x is None else x.to(acc)

    el = _TORCH[spec.kind](logits.to(acc), pos.bool(), spec, cast(weight), cast(pos_weight))
    if ign is not None:
        el = el.masked_fill(ign.bool(), 0.0)
    return _reduce(el, reduction, logits.dtype)


# Run eagerly under torch.compile (one graph break), as loss._fused_loss.
@torch.compiler.disable
def _elementwise_fused(name: str, spec: ElemSpec, logits, targets, ignore, reduction: str,
                       weight, pos_weight) -> torch.Tensor:
    if logits.numel() == 0:
        return _elementwise_torch(spec, logits, targets, ignore, reduction, weight, pos_weight)
    weight, pos_weight, pos, ign = _elementwise_inputs(logits, targets, ignore, weight,
                                                       pos_weight)
    return fused_elementwise(name, logits, pos, ign, weight, pos_weight, spec, reduction)


def bce_loss(logits: torch.Tensor, targets, *, weight: torch.Tensor | None = None,
             pos_weight: torch.Tensor | None = None, ignore=None, reduction: str = "mean",
             backend: str = "auto") -> torch.Tensor:
    """torch.nn.functional.binary_cross_entropy_with_logits with per-label `weight [C]`
    (multiplies every term of label c) and `pos_weight [C]` (multiplies the positive term):
    l = -weight_c * (pos_weight_c * y * log sigmoid(z) + (1 - y) * log(1 - sigmoid(z))).
    Both weights are constants (no gradient), as in torch."""
    return _elementwise(ElemSpec(KINDS["bce"]), logits, targets, ignore, reduction, backend,
                        weight, pos_weight)


def focal_loss(logits: torch.Tensor, targets, *, alpha: float = 0.25, gamma: float = 2.0,
               ignore=None, reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017) with torchvision.ops.sigmoid_focal_loss semantics:
    l = alpha_t * (1 - p_t)^gamma * BCE(z, y), p = sigmoid(z), p_t = y ? p : 1 - p,
    alpha_t = y ? alpha : 1 - alpha (alpha < 0: no alpha weighting). The focal factor is
    differentiated, as in torchvision."""
    if not gamma >= 0:
        raise ValueError(f"gamma: must be >= 0, got {gamma}")
    if not alpha <= 1:
        raise ValueError(f"alpha: must be <= 1 (< 0 disables it), got {alpha}")
    spec = ElemSpec(KINDS["focal"], alpha=float(alpha), gamma=float(gamma))
    return _elementwise(spec, logits, targets, ignore, reduction, backend)


def asymmetric_loss(logits: torch.Tensor, targets, *, gamma_neg: float = 4.0,
                    gamma_pos: float = 1.0, clip: float = 0.05, eps: float = 1e-8,
                    detach_focal_weight: bool = False, ignore=None, reduction: str = "mean",
                    backend: str = "auto") -> torch.Tensor:
    """Asymmetric loss (Ridnik et al., "Asymmetric Loss For Multi-Label Classification",
    ICCV 2021), as the official AsymmetricLoss: p = sigmoid(z), shifted negative probability
    x = min(1 - p + clip, 1) (clip = 0: x = 1 - p),
    l = -(y log(max(p, eps)) + (1 - y) log(max(x, eps))) * (1 - p_t)^gamma_t
    with p_t = y ? p : x and gamma_t = y ? gamma_pos : gamma_neg.

    detach_focal_weight=True treats (1 - p_t)^gamma_t as a constant in the gradient, like the
    official `disable_torch_grad_focal_loss=True` (the official class default); the official
    reduction is "sum", here the default is "mean" like every loss of this module."""
    if not (gamma_neg >= 0 and gamma_pos >= 0):
        raise ValueError(f"gamma_neg, gamma_pos: must be >= 0, got {gamma_neg}, {gamma_pos}")
    if not 0 <= clip < 1:
        raise ValueError(f"clip: must be in [0, 1), got {clip}")
    if not 0 < eps < 1:
        raise ValueError(f"eps: must be in (0, 1), got {eps}")
    spec = ElemSpec(KINDS["asl"], gamma_pos=float(gamma_pos), gamma_neg=float(gamma_neg),
                    clip=float(clip), eps=float(eps), detach=bool(detach_focal_weight))
    return _elementwise(spec, logits, targets, ignore, reduction, backend)


def _cb_weights(n: torch.Tensor, beta: float) -> torch.Tensor:
    if not 0 <= beta < 1:
        raise ValueError(f"beta: must be in [0, 1), got {beta}")
    if n.numel() == 0:
        return n.clone()
    n = n.clamp(min=1)
    # (1 - beta) / (1 - beta^n), with 1 - beta^n = -expm1(n log beta) (no cancellation).
    w = torch.ones_like(n) if beta == 0 else (1 - beta) / -torch.expm1(n * math.log(beta))
    return w * (n.numel() / w.sum())


def class_balanced_weights(label_counts, beta: float = 0.9999) -> torch.Tensor:
    """Class-balanced weights of Cui et al., "Class-Balanced Loss Based on Effective Number of
    Samples" (CVPR 2019): w_c = (1 - beta) / (1 - beta^n_c), normalised so that they sum to C.
    Labels never seen (n_c = 0) are weighted as if seen once. float32 [C]."""
    return _cb_weights(_counts(label_counts, None), beta).to(torch.float32)


def class_balanced_loss(logits: torch.Tensor, targets, label_counts, *, beta: float = 0.9999,
                        loss: str = "bce", gamma: float = 2.0, ignore=None,
                        reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Class-balanced loss (Cui et al. 2019) for multi-label data: every term of label c (its
    positive and its negatives) is weighted by `class_balanced_weights(label_counts, beta)[c]`
    (the per-class sigmoid form). loss="bce": weighted BCE; loss="focal": weighted sigmoid focal
    loss with exponent `gamma` and no alpha (the class weight takes alpha's place, as in the
    paper)."""
    _, C = _check_logits(logits, reduction)
    w = _cb_weights(_counts(label_counts, C), beta).to(device=logits.device,
                                                       dtype=_acc(logits.dtype))
    if loss == "bce":
        spec = ElemSpec(KINDS["bce"])
    elif loss == "focal":
        if not gamma >= 0:
            raise ValueError(f"gamma: must be >= 0, got {gamma}")
        spec = ElemSpec(KINDS["focal"], gamma=float(gamma))
    else:
        raise ValueError(f"loss: expected 'bce' or 'focal', got {loss!r}")
    return _elementwise(spec, logits, targets, ignore, reduction, backend, weight=w)


def distribution_balanced_loss(logits: torch.Tensor, targets, label_counts, num_docs: int, *,
                               alpha: float = 0.1, beta: float = 10.0, mu: float = 0.3,
                               neg_scale: float = 5.0, init_bias: float = 0.05,
                               gamma: float = 2.0, balance: float = 2.0, ignore=None,
                               reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Distribution-balanced loss (Wu et al., "Distribution-Balanced Loss for Multi-Label
    Classification in Long-Tailed Datasets", ECCV 2020; defaults: the authors' VOC-MLT config,
    also used for text by Huang et al., EMNLP 2021). For row i and label c, with n_c the label
    counts, N = num_docs and P_i the row's (non-ignored) positives:

    - re-balanced weight: r_ic = (1/n_c) / sum_{j in P_i} 1/n_j,
      r_hat = alpha + sigmoid(beta * (r_ic - mu))  (rows without positives: r = inf);
    - negative-tolerant regularisation: class bias nu_c = init_bias * log(N/n_c - 1),
      u = z - nu; positives: s = u with weight r_hat, negatives: s = neg_scale * u with
      weight r_hat / neg_scale;
    - focal: l = balance * (1 - p_t)^gamma * weight * BCE(s, y), p_t = exp(-BCE(s, y)).

    Counts are clamped to [1, N-1] in the bias and to >= 1 in the weights, so labels never seen
    stay finite. The weights are constants (no gradient). PyTorch only (backend 'auto'/'torch').
    """
    B, C = _check_logits(logits, reduction)
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend: {backend!r} is not available for distribution_balanced_loss; "
                         "it has only the 'torch' implementation")
    n = _counts(label_counts, C)
    if isinstance(num_docs, bool) or not isinstance(num_docs, int) or num_docs < 2:
        raise ValueError(f"num_docs: expected an int >= 2, got {num_docs!r}")
    if n.numel() and float(n.max()) > num_docs:
        raise ValueError(f"num_docs: {num_docs} is less than the largest label count "
                         f"{int(n.max())}")
    if not neg_scale > 0:
        raise ValueError(f"neg_scale: must be > 0, got {neg_scale}")
    if not gamma >= 0:
        raise ValueError(f"gamma: must be >= 0, got {gamma}")
    acc = _acc(logits.dtype)
    dev = logits.device
    pos = _status(targets, B, C, "targets", dev).bool()
    ign = None if ignore is None else _status(ignore, B, C, "ignore", dev).bool()
    y = pos if ign is None else pos & ~ign
    inv = (1.0 / n.clamp(min=1)).to(device=dev, dtype=acc)
    repeat = (y * inv).sum(1, keepdim=True)
    r = torch.where(repeat > 0, inv / repeat, math.inf)
    r_hat = alpha + torch.sigmoid(beta * (r - mu))
    nu = (init_bias * torch.log(num_docs / n.clamp(1, num_docs - 1) - 1)).to(device=dev,
                                                                             dtype=acc)
    u = logits.to(acc) - nu
    s = torch.where(y, u, neg_scale * u)
    wt = torch.where(y, r_hat, r_hat / neg_scale)
    ce = F.binary_cross_entropy_with_logits(s, y.to(acc), reduction="none")
    el = balance * (-torch.expm1(-ce)) ** gamma * wt * ce
    if ign is not None:
        el = el.masked_fill(ign, 0.0)
    return _reduce(el, reduction, logits.dtype)
