import pytest
import torch

import shl_kernels as shl


def _seg():
    return shl.Segmentation.from_segments([[0, 2], [1], [3]], 4, label_counts=[5, 1, 3, 0])


def test_auto_backend_and_unavailable():
    assert "torch" in shl.available_backends()
    z = torch.randn(2, 4)
    shl.segmented_harmonic_loss(z, torch.zeros(2, 4), _seg(), backend="auto")
    with pytest.raises(ValueError, match="backend"):
        shl.segmented_harmonic_loss(z, torch.zeros(2, 4), _seg(), backend="cuda")


@pytest.mark.parametrize("bad, match", [
    ({"logits": torch.randn(4)}, "logits"),
    ({"logits": torch.randn(2, 5)}, "logits"),
    ({"targets": torch.zeros(3, 4)}, "targets"),
    ({"targets": (torch.tensor([0, 1, 1]), torch.tensor([9]))}, "targets"),
    ({"targets": (torch.tensor([0, 2, 2]), torch.tensor([1, 1]))}, "duplicate"),
    ({"label_weights": -torch.ones(4)}, "label_weights"),
])
def test_bad_input(bad, match):
    args = {"logits": torch.randn(2, 4), "targets": torch.zeros(2, 4)}
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        shl.segmented_harmonic_loss(args["logits"], args["targets"], _seg(),
                                    label_weights=bad.get("label_weights"))


def test_segmentation_roundtrip_and_spec(tmp_path):
    docs = [[0, 1], [0, 2], [3], [0, 1, 3], []]
    seg = shl.segment_labels(docs, 5, tau=0.0)
    seen = sorted(seg.order.tolist())
    assert seen == list(range(5))
    for d in docs:  # no two positives of a document in one segment
        s = seg.segment_of[d].tolist()
        assert len(s) == len(set(s))
    assert seg.num_segments >= 3
    seg.save(tmp_path / "s.npz")
    back = shl.Segmentation.load(tmp_path / "s.npz")
    assert torch.equal(back.order, seg.order) and torch.equal(back.offsets, seg.offsets)
    assert "segments" in seg.summary()


def test_module_learns_null():
    crit = shl.SegmentedHarmonicLoss(_seg(), beta=0.5)
    z = torch.randn(3, 4, requires_grad=True)
    crit(z, torch.eye(4)[:3]).backward()
    assert crit.null_logits.grad is not None and z.grad is not None
    w = shl.harmonic_weights(torch.tensor([5, 1, 3, 0]), beta=1.0)
    assert w[1] > w[2] > w[0]
