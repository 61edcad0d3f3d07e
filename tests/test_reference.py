import math

import pytest
import torch
import torch.nn.functional as F

import shl_kernels as shl

# The backends that take CPU tensors here (Triton through its interpreter, see conftest).
CPU_BACKENDS = [b for b in shl.available_backends() if b != "cuda"]


def _seg(C, sizes, gen):
    perm = torch.randperm(C, generator=gen).tolist()
    segs, at = [], 0
    for s in sizes:
        segs.append(perm[at:at + s])
        at += s
    return shl.Segmentation.from_segments(segs, C)


def test_singletons_equal_bce():
    gen = torch.Generator().manual_seed(0)
    B, C = 5, 7
    seg = shl.Segmentation.from_segments([[c] for c in range(C)], C)
    z = (torch.randn(B, C, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    y = torch.rand(B, C, generator=gen) < 0.3
    loss = shl.segmented_harmonic_loss(z, y, seg, reduction="sum")
    (g,) = torch.autograd.grad(loss, z)
    z2 = z.detach().requires_grad_()
    ref = F.binary_cross_entropy_with_logits(z2, y.double(), reduction="sum")
    (g2,) = torch.autograd.grad(ref, z2)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g, g2)


def test_hand_computed_case():
    # one segment {0, 1}, label 0 positive, eta = 0.5, w0 = 2
    seg = shl.Segmentation.from_segments([[0, 1]], 2)
    z = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
    y = torch.tensor([[1, 0]])
    eta = torch.tensor([0.5], dtype=torch.float64)
    w = torch.tensor([2.0, 1.0], dtype=torch.float64)
    loss = shl.segmented_harmonic_loss(z, y, seg, label_weights=w, null_logits=eta,
                                       reduction="sum")
    import math
    expect = 2.0 * (math.log(math.exp(0.5) + math.exp(1.0) + math.exp(-0.5)) - 1.0)
    assert abs(loss.item() - expect) < 1e-12
    # no positive: null event
    loss0 = shl.segmented_harmonic_loss(z, torch.zeros(1, 2), seg, null_logits=eta,
                                        reduction="sum")
    expect0 = math.log(math.exp(0.5) + math.exp(1.0) + math.exp(-0.5)) - 0.5
    assert abs(loss0.item() - expect0) < 1e-12


def test_gradcheck_all_inputs():
    gen = torch.Generator().manual_seed(1)
    B, C = 4, 9
    seg = _seg(C, [3, 1, 5], gen)
    z = torch.randn(B, C, generator=gen, dtype=torch.float64, requires_grad=True)
    eta = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(C, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
    y = torch.rand(B, C, generator=gen) < 0.3
    ign = torch.rand(B, C, generator=gen) < 0.2

    def f(z, eta, delta):
        return shl.segmented_harmonic_loss(z, y, seg, label_weights=w, null_logits=eta,
                                           logit_offsets=delta, ignore=ign, reduction="none")
    assert torch.autograd.gradcheck(f, (z, eta, delta))


def test_ignore_semantics():
    gen = torch.Generator().manual_seed(2)
    B, C = 3, 6
    seg = _seg(C, [4, 2], gen)
    z = torch.randn(B, C, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(B, C, dtype=torch.bool)
    y[0, 1] = True
    ign = torch.zeros(B, C, dtype=torch.bool)
    ign[0, 1] = True  # ignored positive: acts as absent
    loss = shl.segmented_harmonic_loss(z, y, seg, ignore=ign, reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), z)
    assert g[0, 1] == 0
    # same as dropping the label from the problem: logits of -inf for it
    z2 = z.detach().clone()
    z2[0, 1] = float("-inf")
    loss2 = shl.segmented_harmonic_loss(z2, torch.zeros_like(y), seg, reduction="none")
    torch.testing.assert_close(loss.detach(), loss2)
    # a fully ignored segment contributes 0
    segA = seg.order[seg.offsets[1]:seg.offsets[2]]
    ign2 = torch.zeros(B, C, dtype=torch.bool)
    ign2[:, segA] = True
    full = shl.segmented_harmonic_loss(z.detach(), y, seg, ignore=ign2, reduction="none")
    z3 = z.detach().clone()
    z3[:, segA] = float("-inf")  # a segment with no live label and no positive costs 0
    without = shl.segmented_harmonic_loss(z3, y & ~ign2, seg, reduction="none")
    torch.testing.assert_close(full, without)


def test_reductions_and_csr():
    gen = torch.Generator().manual_seed(3)
    B, C = 4, 5
    seg = _seg(C, [2, 3], gen)
    z = torch.randn(B, C, generator=gen)
    y = torch.zeros(B, C, dtype=torch.bool)
    y[0, 1] = y[2, 4] = y[2, 0] = True
    rows = shl.segmented_harmonic_loss(z, y, seg, reduction="none")
    torch.testing.assert_close(shl.segmented_harmonic_loss(z, y, seg, reduction="sum"), rows.sum())
    torch.testing.assert_close(shl.segmented_harmonic_loss(z, y, seg), rows.mean())
    csr = (torch.tensor([0, 1, 1, 3, 3]), torch.tensor([1, 4, 0]))
    torch.testing.assert_close(shl.segmented_harmonic_loss(z, csr, seg, reduction="none"), rows)


def test_nan_propagates_and_huge_logits():
    seg = shl.Segmentation.from_segments([[0, 1], [2]], 3)
    z = torch.tensor([[80.0, -80.0, 80.0], [float("nan"), 0.0, 0.0]])
    loss = shl.segmented_harmonic_loss(z, torch.tensor([[1, 0, 0], [0, 0, 0]]), seg,
                                       reduction="none")
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])


def _spec_loss(u, pos, eta):
    """SPEC section 3 for one segment, term by term with logsumexp in float64 (an oracle
    that shares no code with the reference)."""
    neg = [x for x, y in zip(u, pos, strict=True) if not y]
    if not any(pos):
        return torch.logsumexp(torch.tensor([eta, *u], dtype=torch.float64), 0).item() - eta
    return sum(torch.logsumexp(torch.tensor([eta, x, *neg], dtype=torch.float64), 0).item() - x
               for x, y in zip(u, pos, strict=True) if y)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_huge_logits_with_several_positives(backend):
    """Two positives far apart above negatives far below: the shift is the max of eta and
    the negatives (with the top positive in it, A and the lower positive's exp(u_p - M) both
    underflowed in float32: loss -inf). Loss and gradient in float32 as in float64; the
    float64 loss as the spec's formula term by term."""
    seg = shl.Segmentation.from_segments([[0, 1, 2, 3, 4, 5], [6, 7]], 8)
    z = torch.tensor([[200.0, -100.0, -100.5, -150.0, 50.0, -300.0, 120.0, -90.0],
                      [-300.0, 300.0, -200.0, -250.0, -320.0, 0.0, 1e4, -1e4]])
    y = torch.tensor([[1, 1, 0, 0, 1, 0, 1, 1], [1, 1, 0, 0, 0, 0, 1, 0]])
    eta = torch.tensor([0.0, -400.0])
    got = {}
    for dt in (torch.float32, torch.float64):
        zz = z.to(dt).requires_grad_()
        loss = shl.segmented_harmonic_loss(zz, y, seg, null_logits=eta.to(dt), reduction="none",
                                           backend=backend)
        got[dt] = (loss.detach(), torch.autograd.grad(loss.sum(), zz)[0])
    assert torch.isfinite(got[torch.float32][0]).all()
    for a, b in zip(got[torch.float32], got[torch.float64], strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)
    for i in range(2):
        want = sum(_spec_loss(z[i, c].tolist(), y[i, c].tolist(), eta[k].item())
                   for k, c in enumerate(([0, 1, 2, 3, 4, 5], [6, 7])))
        assert abs(got[torch.float64][0][i].item() - want) <= 1e-12 * abs(want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_infinite_positive_logits_and_segments_of_positives_alone(backend):
    """A +inf positive makes the loss NaN and a -inf one +inf (inf propagates); a segment of
    positives alone with eta = -inf has D_p = exp(u_p): loss 0, gradient 0, no NaN."""
    seg = shl.Segmentation.from_segments([[0, 1], [2, 3]], 4)
    y = torch.tensor([[1, 0, 1, 1]])
    eta = torch.tensor([0.0, float("-inf")])

    def loss(z):
        return shl.segmented_harmonic_loss(z, y, seg, null_logits=eta, reduction="sum",
                                           backend=backend)

    assert loss(torch.tensor([[float("inf"), 0.0, 1.0, 2.0]])).isnan()
    assert loss(torch.tensor([[float("-inf"), 0.0, 1.0, 2.0]])) == math.inf
    z = torch.tensor([[3.0, 0.0, 1.0, 2.0]], requires_grad=True)
    total = loss(z)
    (g,) = torch.autograd.grad(total, z)
    assert abs(total.item() - _spec_loss([3.0, 0.0], [1, 0], 0.0)) < 1e-6
    assert torch.equal(g[0, 2:], torch.zeros(2))


def test_segment_probs_follow_the_spec_formula():
    gen = torch.Generator().manual_seed(3)
    seg = shl.Segmentation.from_segments([[4, 0], [2], [1, 3, 5]], 6)
    z = torch.randn(3, 6, generator=gen, dtype=torch.float64) * 5
    eta = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    p = shl.segment_probs(z, seg, eta)
    for i in range(3):
        for k, members in enumerate([[4, 0], [2], [1, 3, 5]]):
            denom = math.exp(eta[k]) + sum(math.exp(z[i, c]) for c in members)
            for c in members:  # original label order in, original label order out
                assert abs(p[i, c].item() - math.exp(z[i, c]) / denom) < 1e-12
            null = math.exp(eta[k]) / denom
            assert abs(sum(p[i, c].item() for c in members) + null - 1) < 1e-12
    big = shl.segment_probs(torch.full((1, 6), 1000.0), seg)  # max-shifted: no overflow
    assert torch.isfinite(big).all()
    torch.testing.assert_close(shl.segment_probs(z, seg), shl.segment_probs(z, seg, eta * 0))
