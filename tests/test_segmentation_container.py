"""Segmentation container: stats, persistence, summary and the segment-ordered head."""
import numpy as np
import pytest
import torch

import shl_kernels as shl

DOCS = [[0, 1, 5], [0, 2], [3], [0, 1, 3], [], [4, 6, 0], [6, 7], [1, 2]]
C = 9  # label 8 is never seen


def _seg(**kw) -> shl.Segmentation:
    return shl.segment_labels(DOCS, C, **kw)


def test_stats_and_derived_figures():
    seg = _seg(tau=0.0)
    st = seg.stats
    assert st.num_documents == 8 and st.num_positives == sum(map(len, DOCS)) == 16
    assert st.max_labels_per_document == 3
    pairs = {(a, b) for d in DOCS for a in d for b in d if a < b}
    assert st.num_cooccurring_pairs == st.num_conflicting_pairs == len(pairs)
    assert seg.cooccurrence_density == pytest.approx(len(pairs) / (C * (C - 1) / 2))
    assert seg.segment_sizes.sum() == C and seg.segment_sizes.tolist() == \
        (seg.offsets[1:] - seg.offsets[:-1]).tolist()
    rng = seg.segment_count_range
    for k in range(seg.num_segments):
        cnt = seg.label_counts[seg.order[seg.offsets[k]:seg.offsets[k + 1]]]
        assert rng[k].tolist() == [int(cnt.min()), int(cnt.max())]
    loose = _seg(tau=0.5, max_segment_size=3, max_freq_ratio=2.0)
    assert loose.stats.num_conflicting_pairs < st.num_conflicting_pairs
    assert (loose.stats.tau, loose.stats.max_segment_size, loose.stats.max_freq_ratio) == \
        (0.5, 3, 2.0)
    assert shl.Segmentation.from_segments([[0], [1]], 2).cooccurrence_density is None


def test_summary_prints_stats():
    text = _seg(tau=0.25, max_segment_size=4).summary()
    for part in ("9 labels in", "segments", "segment sizes", "8, positives 16",
                 "at most 3 labels on one document", "density", "tau=0.25",
                 "max_segment_size=4", "segment 0:", "counts"):
        assert part in text
    seg = _seg()
    assert seg.num_segments > 1
    assert f"... {seg.num_segments - 1} more" in seg.summary(max_segments=1)


def test_save_load_roundtrip_with_stats(tmp_path):
    seg = _seg(tau=0.1, max_freq_ratio=3.0)
    seg.save(tmp_path / "s.npz")
    back = shl.Segmentation.load(tmp_path / "s.npz")
    for name in ("order", "offsets", "label_counts"):
        assert torch.equal(getattr(back, name), getattr(seg, name))
    assert back.stats == seg.stats and back.num_labels == C
    assert back.summary() == seg.summary()


def test_load_old_file_without_stats(tmp_path):
    seg = _seg()
    np.savez(tmp_path / "old.npz", num_labels=seg.num_labels, order=seg.order.numpy(),
             offsets=seg.offsets.numpy(), label_counts=seg.label_counts.numpy())
    back = shl.Segmentation.load(tmp_path / "old.npz")
    assert back.stats is None and torch.equal(back.order, seg.order)
    assert "segments" in back.summary() and back.cooccurrence_density is None
    plain = shl.Segmentation.from_segments([[0, 2], [1]], 3)
    plain.save(tmp_path / "plain.npz")
    assert shl.Segmentation.load(tmp_path / "plain.npz").stats is None


def test_identity_order_and_segment_ordered():
    seg = _seg()
    assert not seg.is_identity_order
    so = seg.segment_ordered()
    assert so.is_identity_order and torch.equal(so.order, torch.arange(C))
    assert torch.equal(so.offsets, seg.offsets)
    assert torch.equal(so.label_counts, seg.label_counts[seg.order])
    assert torch.equal(so.segment_of, seg.segment_at_position)
    assert torch.equal(seg.order[seg.position_of], torch.arange(C))
    assert shl.Segmentation.from_segments([[0, 1], [2]], 3).is_identity_order
    assert not shl.Segmentation.from_segments([[1, 0], [2]], 3).is_identity_order


def test_to_and_from_segment_order():
    seg = _seg()
    t = torch.rand(4, C)
    so = seg.to_segment_order(t)
    assert torch.equal(so, t[:, seg.order])
    assert torch.equal(seg.from_segment_order(so), t)
    w = np.arange(C, dtype=np.float64)
    assert np.array_equal(seg.to_segment_order(w), w[seg.order.numpy()])
    assert torch.equal(seg.to_segment_order(t.T, dim=0), t.T[seg.order])
    indptr, indices = torch.tensor([0, 2, 3]), torch.tensor([5, 0, 8], dtype=torch.int32)
    dense = torch.zeros(2, C)
    dense[0, [5, 0]] = 1
    dense[1, 8] = 1
    p2, i2 = seg.to_segment_order((indptr, indices))
    assert p2 is indptr and i2.dtype == torch.int32
    back = torch.zeros(2, C)
    back[0, i2[:2].long()] = 1
    back[1, i2[2].long()] = 1
    assert torch.equal(back, seg.to_segment_order(dense))
    with pytest.raises(ValueError, match="x"):
        seg.to_segment_order(torch.zeros(2, C + 1))
    with pytest.raises(TypeError, match="x"):
        seg.to_segment_order([1.0] * C)


def test_reorder_head():
    seg = _seg()
    torch.manual_seed(0)
    head = torch.nn.Linear(5, C)
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    x = torch.randn(3, 5)
    new = seg.reorder_head(head)
    assert new is not head and torch.equal(head.weight, w0) and torch.equal(head.bias, b0)
    assert torch.allclose(new(x), head(x)[:, seg.order])
    assert torch.allclose(seg.from_segment_order(new(x)), head(x))
    nob = torch.nn.Linear(5, C, bias=False)
    assert torch.allclose(seg.reorder_head(nob)(x), nob(x)[:, seg.order])
    same = seg.reorder_head(head, inplace=True)
    assert same is head and torch.equal(head.weight, w0[seg.order])
    with pytest.raises(ValueError, match="linear"):
        seg.reorder_head(torch.nn.Linear(5, C + 1))
    with pytest.raises(TypeError, match="linear"):
        seg.reorder_head(torch.nn.Conv1d(5, C, 1))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_loss_same_with_segment_ordered_head(backend):
    seg = _seg(max_segment_size=3)
    torch.manual_seed(1)
    head = torch.nn.Linear(6, C).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    targets = (torch.rand(5, C) < 0.3).double()
    w = shl.harmonic_weights(seg.label_counts, beta=0.5).double()
    eta = torch.randn(seg.num_segments, dtype=torch.float64)
    ref = shl.segmented_harmonic_loss(head(x), targets, seg, label_weights=w,
                                      null_logits=eta, backend=backend)
    so = seg.segment_ordered()
    new = seg.reorder_head(head)
    w2 = seg.to_segment_order(w)
    assert torch.allclose(w2, shl.harmonic_weights(so.label_counts, beta=0.5).double())
    out = shl.segmented_harmonic_loss(new(x), seg.to_segment_order(targets), so,
                                      label_weights=w2, null_logits=eta, backend=backend)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # gradients flow to the same parameters, permuted
    ref.backward()
    out.backward()
    torch.testing.assert_close(new.weight.grad, head.weight.grad[seg.order])


def test_device_tensors_are_copied_once():
    # Segmentation.on: what the loss and the reference index with, on the logits' device,
    # made once per device (a copy per call is a blocking transfer on GPUs).
    seg = shl.Segmentation.from_segments([[3, 0], [1], [4, 2]], 5)
    first = seg.on("cpu")
    assert seg.on(torch.device("cpu")) is first
    order, offsets, at = first
    assert torch.equal(order, seg.order) and torch.equal(offsets, seg.offsets)
    assert torch.equal(at, seg.segment_at_position) and all(t.is_contiguous() for t in first)
    if torch.cuda.is_available():
        on_gpu = seg.on("cuda")
        assert on_gpu[0].is_cuda and seg.on("cuda") is on_gpu
