"""Public loss API (SPEC section 4): input checks, conversion for the kernels, dispatch."""
from __future__ import annotations

import torch

from .backends import available_backends, fused_kernel, resolve
from .fused import FusedSHL
from .masks import csr_mask, float_mask, not_binary
from .reference import harmonic_weights, shl_loss_reference
from .segmentation import Segmentation

__all__ = ["SegmentedHarmonicLoss", "available_backends", "segmented_harmonic_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def _csr_to_dense(t: tuple, B: int, C: int, name: str, device: torch.device) -> torch.Tensor:
    if len(t) != 2 or not all(isinstance(x, torch.Tensor) for x in t):
        raise TypeError(f"{name}: a CSR pair must be (indptr, indices) tensors")
    indptr, indices = t
    for part, x in (("indptr", indptr), ("indices", indices)):
        if x.dtype not in (torch.int32, torch.int64) or x.dim() != 1:
            raise TypeError(f"{name}: CSR {part} must be a 1-D int32/int64 tensor, got "
                            f"{x.dtype} with {x.dim()} dims")
        if x.device != device:
            raise ValueError(f"{name}: CSR {part} is on {x.device}, logits on {device}; "
                             "move it with .to(logits.device)")
    if indptr.numel() != B + 1:
        raise ValueError(f"{name}: CSR indptr must have B+1={B + 1} entries, got {indptr.numel()}")
    native = csr_mask(indptr, indices, B, C)
    if native is not None:
        out, (bad, lo, hi, dup) = native
    else:
        out, (bad, lo, hi, dup) = _csr_to_dense_torch(indptr, indices, B, C, device)
    nnz = indices.numel()
    if bad:
        raise ValueError(f"{name}: CSR indptr must start at 0, not decrease and end at "
                         f"len(indices)={nnz}")
    if nnz and (lo < 0 or hi >= C):
        raise ValueError(f"{name}: label ids must be in [0, {C}), got [{lo}, {hi}]")
    if dup:
        raise ValueError(f"{name}: duplicate label ids in a row")
    return out


def _csr_to_dense_torch(indptr: torch.Tensor, indices: torch.Tensor, B: int, C: int,
                        device: torch.device):
    """csr_mask with torch ops (no extension for the device, or B == 0)."""
    nnz = indices.numel()
    ptr, idx = indptr.long(), indices.long()
    # Each entry's flat position in [B, C] (its row from indptr: meaningful once indptr
    # passes its checks); a duplicate in a row is an equal neighbour after sorting. Every
    # check's value comes back in one small read (one host sync on GPUs, not six), and only
    # nnz-sized tensors are reduced (a sum over the dense [B, C] mask cost more than the
    # fused loss on CPU).
    rows = torch.searchsorted(ptr[1:], torch.arange(nnz, device=device), right=True)
    flat = rows * C + idx
    srt = flat.sort().values
    lo_hi = idx.aminmax() if nnz else (ptr[0], ptr[0])  # (no ids: unread placeholders)
    first, last, dec, lo, hi, dup = torch.stack([
        ptr[0], ptr[-1], (ptr.diff() < 0).any().long(), *lo_hi,
        (srt[1:] == srt[:-1]).any().long()]).tolist()
    bad = (B and first != 0) or dec or last != nnz
    out = torch.zeros(B * C, dtype=torch.uint8, device=device)
    if not bad and not (nnz and (lo < 0 or hi >= C)):
        out.index_fill_(0, flat, 1)
    return out.view(B, C), (bad, lo, hi, dup)


def _status(t, B: int, C: int, name: str, device: torch.device) -> torch.Tensor:
    """Dense uint8 [B, C] (1 = set) from a dense 0/1 tensor or a CSR pair; no copy for bool."""
    if isinstance(t, tuple | list):
        return _csr_to_dense(tuple(t), B, C, name, device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a [B, C] tensor or an (indptr, indices) tuple, "
                        f"got {type(t).__name__}")
    if t.shape != (B, C):
        raise ValueError(f"{name}: expected shape ({B}, {C}), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, logits on {device}; move it with .to()")
    if t.dtype == torch.bool:
        return t.contiguous().view(torch.uint8)
    if t.dtype == torch.uint8:
        return t.contiguous()
    if t.is_complex():
        raise TypeError(f"{name}: complex dtype {t.dtype} is not a 0/1 tensor")
    if t.is_floating_point() and t.dtype in _SUPPORTED:
        mask = float_mask(t, name)  # one native pass where the extension has it
        if mask is not None:
            return mask
    if bool(((t != 0) & (t != 1)).any()):
        raise not_binary(name)
    return (t != 0).view(torch.uint8)


def _param(x, shape: tuple, name: str, z: torch.Tensor, positive: bool = False):
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, device=z.device)
    if x.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
    if x.device != z.device:
        raise ValueError(f"{name}: on {x.device}, logits on {z.device}; move it with .to()")
    # Weights are usually one buffer reused every step: check each version once (a check
    # costs two host syncs, a third of a small batch's loss on CPU).
    if positive and getattr(x, "_shl_checked_version", None) != x._version:
        if not bool(((x > 0) & torch.isfinite(x)).all()):
            raise ValueError(f"{name}: must be finite and > 0")
        x._shl_checked_version = x._version
    return x


def _seg_tensors(seg: Segmentation, device: torch.device):
    """(order or None for identity, offsets) on `device`, kept on the Segmentation."""
    order, offsets, _ = seg.on(device)
    return None if seg.is_identity_order else order, offsets


_SUPPORTED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def segmented_harmonic_loss(logits: torch.Tensor, targets, seg: Segmentation, *,
                            label_weights: torch.Tensor | None = None,
                            null_logits: torch.Tensor | None = None,
                            logit_offsets: torch.Tensor | None = None,
                            ignore=None, reduction: str = "mean", backend: str = "auto",
                            inplace: bool = False) -> torch.Tensor:
    """Segmented Harmonic Loss of SPEC section 3 (targets/ignore dense 0/1 or CSR).

    inplace=True (fused backends only) overwrites `logits` with the gradient to save its
    memory: `logits` must not be used afterwards.
    """
    if not isinstance(seg, Segmentation):
        raise TypeError(f"seg: expected a shl_kernels.Segmentation, got {type(seg).__name__}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("logits: expected a 2-D tensor [B, C]")
    if logits.dtype not in _SUPPORTED:
        raise TypeError(f"logits: unsupported dtype {logits.dtype}; use float32, float64, "
                        "float16 or bfloat16")
    C = logits.shape[1]
    if C != seg.num_labels:
        raise ValueError(f"logits: has {C} labels, the segmentation {seg.num_labels}; segment "
                         "the label set the model predicts (num_labels = logits.shape[1])")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    name = resolve(backend, logits.device)
    if name == "torch":
        w, eta, delta, pos, ign = _inputs(logits, targets, seg, label_weights, null_logits,
                                          logit_offsets, ignore)
        if inplace:
            raise ValueError("inplace: needs a fused backend ('cpu', 'triton' or 'cuda')")
        return shl_loss_reference(logits, pos, seg, w, eta, delta, ign, reduction)
    return _fused_loss(name, logits, targets, seg, label_weights, null_logits, logit_offsets,
                       ignore, reduction, inplace)


def _inputs(logits: torch.Tensor, targets, seg: Segmentation, label_weights, null_logits,
            logit_offsets, ignore):
    """The checked (w, eta, delta, pos, ign) of segmented_harmonic_loss."""
    B, C = logits.shape
    w = _param(label_weights, (C,), "label_weights", logits, positive=True)
    eta = _param(null_logits, (seg.num_segments,), "null_logits", logits)
    delta = _param(logit_offsets, (C,), "logit_offsets", logits)
    pos = _status(targets, B, C, "targets", logits.device)
    ign = None if ignore is None else _status(ignore, B, C, "ignore", logits.device)
    return w, eta, delta, pos, ign


# Run eagerly under torch.compile (one graph break): the checks read values on the host and
# the kernels are native calls, neither of which Dynamo traces.
@torch.compiler.disable
def _fused_loss(name: str, logits: torch.Tensor, targets, seg: Segmentation, label_weights,
                null_logits, logit_offsets, ignore, reduction: str,
                inplace: bool) -> torch.Tensor:
    w, eta, delta, pos, ign = _inputs(logits, targets, seg, label_weights, null_logits,
                                      logit_offsets, ignore)
    if logits.shape[0] == 0:
        return shl_loss_reference(logits, pos, seg, w, eta, delta, ign, reduction)
    if w is not None and w.requires_grad and torch.is_grad_enabled():
        raise ValueError("label_weights: requires grad, but the fused backends treat label "
                         "weights as constants; pass label_weights.detach() or use "
                         "backend='torch' to learn them")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    order, offsets = _seg_tensors(seg, logits.device)

    def cast(x):  # the usual fp32 buffers pass through without a dispatcher call
        if x is None or (x.dtype == acc and x.is_contiguous()):
            return x
        return x.to(acc).contiguous()

    z = logits if logits.is_contiguous() else logits.contiguous()
    if inplace and z is not logits:
        raise ValueError("inplace: logits must be contiguous to be overwritten")
    if inplace and logits.is_leaf and logits.requires_grad and torch.is_grad_enabled():
        # as torch's own in-place ops on such leaves: its values would become the gradient
        raise ValueError("inplace: logits is a leaf that requires grad (a parameter?), whose "
                         "values would be replaced by the gradient; pass a layer's output or "
                         "inplace=False")
    return FusedSHL.apply(fused_kernel(name), z, pos, ign, order, offsets, cast(w), cast(eta),
                          cast(delta), reduction, inplace)


class SegmentedHarmonicLoss(torch.nn.Module):
    """nn.Module form: harmonic label weights (beta) and learnable null logits per segment."""

    def __init__(self, seg: Segmentation, *, beta: float, learn_null: bool = True,
                 backend: str = "auto", reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
        self.seg, self.backend, self.reduction = seg, backend, reduction
        self.register_buffer("label_weights", harmonic_weights(seg.label_counts, beta=beta))
        eta = torch.zeros(seg.num_segments)
        if learn_null:
            self.null_logits = torch.nn.Parameter(eta)
        else:
            self.register_buffer("null_logits", eta)

    def forward(self, logits: torch.Tensor, targets, ignore=None,
                logit_offsets: torch.Tensor | None = None) -> torch.Tensor:
        return segmented_harmonic_loss(
            logits, targets, self.seg, label_weights=self.label_weights,
            null_logits=self.null_logits, logit_offsets=logit_offsets, ignore=ignore,
            reduction=self.reduction, backend=self.backend)
