"""derived.py: the tensors the GPU launchers derive from order / offsets / label weights,
and their cache."""
import gc

import pytest
import torch

from shl_kernels import derived
from shl_kernels.derived import in_segment_order, order32, segment_position, segment_schedule


def test_segment_position_widths():
    order = torch.randperm(40000)
    p16, p32 = segment_position(order), segment_position(order, 32)
    assert p16.dtype == torch.int16 and p32.dtype == torch.int32
    assert torch.equal(p16.to(torch.int32) & 0xFFFF, p32)  # the uint16 bits
    assert torch.equal(order[p32.long()], torch.arange(40000))
    assert segment_position(torch.arange((1 << 16) + 1)).dtype == torch.int32
    with pytest.raises(ValueError, match="^bits: "):
        segment_position(torch.arange((1 << 16) + 1), 16)


def test_segment_position_inverts_order_and_is_cached():
    order = torch.randperm(1000)
    position = segment_position(order, 32)
    assert position.dtype == torch.int32
    assert torch.equal(order[position.long()], torch.arange(1000))
    assert segment_position(order, 32) is position  # same tensor, same version: cached
    order[:2] = order[:2].flip(0)  # in-place change: recomputed
    assert torch.equal(order[segment_position(order, 32).long()], torch.arange(1000))


def test_segment_schedule_lists_segments_largest_first():
    offsets = torch.tensor([0, 2, 7, 8, 13, 13])  # sizes 2, 5, 1, 5, 0
    assert segment_schedule(offsets).tolist() == [1, 3, 0, 2, 4]  # ties keep segment order
    assert segment_schedule(offsets).dtype == torch.int32


def test_cache_follows_every_source():
    """A value derived from two tensors is remade when either changes in place, and dropped
    when either is freed."""
    w, order = torch.rand(6), torch.randperm(6)
    first = in_segment_order(w, order)
    assert torch.equal(first, w[order])
    assert in_segment_order(w, order) is first
    w.mul_(2)
    again = in_segment_order(w, order)
    assert again is not first and torch.equal(again, w[order])
    order[:2] = order[:2].flip(0)
    assert torch.equal(in_segment_order(w, order), w[order])
    n = len(derived._derived)
    del order
    gc.collect()
    assert len(derived._derived) == n - 1
    assert in_segment_order(None, torch.arange(3)) is None


def test_order32():
    order = torch.randperm(100)
    assert order32(order).dtype == torch.int32 and torch.equal(order32(order).long(), order)
    assert order32(order) is order32(order)
