"""Tensors the GPU kernels derive from the segmentation (and the label weights), cached per
source tensor: the loss passes the same order / offsets / weights every step (cached per
device on the Segmentation), so each is made once; an entry is dropped with its source and
remade when a source is modified in place (its version changes)."""
from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

_derived: dict[tuple, tuple[list[weakref.ref], list[int], torch.Tensor]] = {}


def cached(sources: tuple[torch.Tensor, ...], what: str,
           make: Callable[..., torch.Tensor]) -> torch.Tensor:
    """make(*sources), remembered while every source lives unmodified."""
    key = (*map(id, sources), what)
    hit = _derived.get(key)
    if hit is not None and all(r() is t and v == t._version
                               for r, v, t in zip(hit[0], hit[1], sources)):
        return hit[2]
    out = make(*sources)
    refs = [weakref.ref(t, lambda _, k=key: _derived.pop(k, None)) for t in sources]
    _derived[key] = (refs, [t._version for t in sources], out)
    return out


# Up to this many labels the CUDA kernel reads positions as 16-bit (half the reads per row).
POSITION16_MAX = 1 << 16


def _inverse(order: torch.Tensor, bits: int) -> torch.Tensor:
    C = order.numel()
    position = torch.empty(C, dtype=torch.int32, device=order.device)
    position[order] = torch.arange(C, dtype=torch.int32, device=order.device)
    if bits == 16:  # uint16 bits in an int16 tensor (torch has few uint16 ops)
        position = torch.where(position >= 1 << 15, position - (1 << 16), position)
        return position.to(torch.int16)
    return position


def segment_position(order: torch.Tensor, bits: int | None = None) -> torch.Tensor:
    """[C]: the segment position of each original label id (the inverse of `order`), in
    `bits` 16 (int16 holding the uint16 value; C <= POSITION16_MAX) or 32 (int32); default:
    16 where it fits."""
    if bits is None:
        bits = 16 if order.numel() <= POSITION16_MAX else 32
    if bits not in (16, 32) or (bits == 16 and order.numel() > POSITION16_MAX):
        raise ValueError(f"bits: 16 (C <= {POSITION16_MAX}) or 32, got {bits} for "
                         f"C={order.numel()}")
    return cached((order,), f"position{bits}", lambda o: _inverse(o, bits))


def _largest_first(offsets: torch.Tensor) -> torch.Tensor:
    sizes = offsets[1:] - offsets[:-1]
    return torch.argsort(sizes, descending=True, stable=True).to(torch.int32)


def segment_schedule(offsets: torch.Tensor) -> torch.Tensor:
    """int32 [m]: segment ids, largest first (the order the GPU kernels take them in)."""
    return cached((offsets,), "schedule", _largest_first)


def order32(order: torch.Tensor) -> torch.Tensor:
    """`order` as int32 (the label id at each segment position)."""
    return cached((order,), "int32", lambda o: o.to(torch.int32))


def in_segment_order(x: torch.Tensor | None, order: torch.Tensor) -> torch.Tensor | None:
    """x[order] for a per-label vector x (label weights, logit offsets); None stays None."""
    return None if x is None else cached((x, order), "segment order", lambda x, o: x[o])
