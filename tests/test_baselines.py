"""Baseline losses (PyTorch backend) against their published formulas, computed by hand here
with plain `math` on tiny inputs, plus gradcheck, API semantics and input errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import shl_kernels as shl

Z = [[1.0, -2.0, 0.5, -4.0], [0.0, 3.0, -1.5, 2.5]]
Y = [[1, 0, 0, 0], [0, 1, 1, 0]]


def _t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _by_hand(f):
    """The [B, C] tensor of f(z, y, c) over Z, Y."""
    return _t([[f(z, y, c) for c, (z, y) in enumerate(zip(zr, yr))] for zr, yr in zip(Z, Y)])


def _close(a, b, tol=1e-12):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_bce_by_hand():
    w, pw = [1.0, 0.5, 2.0, 0.25], [2.0, 1.0, 3.0, 0.5]

    def f(z, y, c):
        return w[c] * (pw[c] * y * math.log1p(math.exp(-z)) + (1 - y) * math.log1p(math.exp(z)))

    want = _by_hand(f)
    got = shl.bce_loss(_t(Z), _t(Y), weight=_t(w), pos_weight=_t(pw), reduction="none",
                       backend="torch")
    _close(got, want)
    _close(shl.bce_loss(_t(Z), _t(Y), weight=_t(w), pos_weight=_t(pw), backend="torch"),
           want.sum() / 8)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1.0, 2.0), (0.6, 0.5), (0.25, 0.0)])
def test_focal_by_hand(alpha, gamma):
    # Lin et al. 2017 / torchvision.ops.sigmoid_focal_loss.
    def f(z, y, c):
        p = _sig(z)
        ce = -math.log(p) if y else -math.log(1 - p)
        p_t = p if y else 1 - p
        a_t = 1.0 if alpha < 0 else (alpha if y else 1 - alpha)
        return a_t * (1 - p_t) ** gamma * ce

    got = shl.focal_loss(_t(Z), _t(Y), alpha=alpha, gamma=gamma, reduction="none",
                         backend="torch")
    _close(got, _by_hand(f))


def _asl_by_hand(gamma_neg, gamma_pos, clip, eps):
    # Ridnik et al. 2021: positives -log(p) (1-p)^g+, negatives with the shifted probability.
    def f(z, y, c):
        p = _sig(z)
        if y:
            return -math.log(max(p, eps)) * (1 - p) ** gamma_pos
        x = min(1 - p + clip, 1.0)
        return -math.log(max(x, eps)) * (1 - x) ** gamma_neg

    return _by_hand(f)


@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("gn, gp, clip", [(4.0, 1.0, 0.05), (2.0, 0.0, 0.0), (3.0, 2.0, 0.2)])
def test_asl_by_hand(gn, gp, clip, detach):
    got = shl.asymmetric_loss(_t(Z), _t(Y), gamma_neg=gn, gamma_pos=gp, clip=clip,
                              detach_focal_weight=detach, reduction="none", backend="torch")
    want = _asl_by_hand(gn, gp, clip, 1e-8)
    _close(got, want)
    if clip == 0.05:
        assert got[0, 3] == 0  # p = sigmoid(-4) < clip: the negative costs nothing
    _close(shl.asymmetric_loss(_t(Z), _t(Y), gamma_neg=gn, gamma_pos=gp, clip=clip,
                               reduction="sum", backend="torch"), want.sum())


def test_asl_detached_gradient_by_hand():
    # With the focal weight constant: d/dz of -log(p) is -(1 - p); of -log(1 - p + clip) it is
    # p (1 - p) / (1 - p + clip) while unclamped; each times its (constant) weight.
    gn, gp, clip = 4.0, 1.0, 0.05

    def f(z, y, c):
        p = _sig(z)
        if y:
            return -(1 - p) * (1 - p) ** gp
        x = 1 - p + clip
        return 0.0 if x >= 1 else p * (1 - p) / x * (1 - x) ** gn

    z = _t(Z).requires_grad_()
    shl.asymmetric_loss(z, _t(Y), gamma_neg=gn, gamma_pos=gp, clip=clip,
                        detach_focal_weight=True, reduction="sum", backend="torch").backward()
    _close(z.grad, _by_hand(f))


def test_class_balanced_weights_by_hand():
    counts, beta = [10, 1, 100, 0], 0.99
    raw = [(1 - beta) / (1 - beta ** max(n, 1)) for n in counts]
    want = [r * 4 / sum(raw) for r in raw]
    got = shl.class_balanced_weights(counts, beta=beta)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _t(want, torch.float32))
    torch.testing.assert_close(shl.class_balanced_weights(counts, beta=0.0), torch.ones(4))
    w = shl.class_balanced_weights([5, 50, 5000], beta=0.9999)
    assert w[0] > w[1] > w[2] and abs(float(w.sum()) - 3) < 1e-5


@pytest.mark.parametrize("loss", ["bce", "focal"])
def test_class_balanced_loss_by_hand(loss):
    counts, beta, gamma = [10, 1, 100, 3], 0.9, 2.0
    raw = [(1 - beta) / (1 - beta ** n) for n in counts]
    w = [r * 4 / sum(raw) for r in raw]

    def f(z, y, c):
        p = _sig(z)
        ce = -math.log(p) if y else -math.log(1 - p)
        focal = 1.0 if loss == "bce" else (1 - (p if y else 1 - p)) ** gamma
        return w[c] * focal * ce

    got = shl.class_balanced_loss(_t(Z), _t(Y), counts, beta=beta, loss=loss, gamma=gamma,
                                  reduction="none", backend="torch")
    _close(got, _by_hand(f))


def _db_by_hand(z_rows, y_rows, counts, N, ign=None, alpha=0.1, beta=10.0, mu=0.3, lam=5.0,
                kappa=0.05, gamma=2.0, balance=2.0):
    # Wu et al. ECCV 2020: re-balanced weights + negative-tolerant regularisation + focal.
    out = []
    for i, (zr, yr) in enumerate(zip(z_rows, y_rows)):
        pos = [bool(y) and not (ign and ign[i][c]) for c, y in enumerate(yr)]
        repeat = sum(1 / counts[c] for c in range(len(zr)) if pos[c])
        row = []
        for c, z in enumerate(zr):
            if ign and ign[i][c]:
                row.append(0.0)
                continue
            r = (1 / counts[c]) / repeat if repeat > 0 else math.inf
            r_hat = alpha + (1.0 if r == math.inf else _sig(beta * (r - mu)))
            u = z - kappa * math.log(N / counts[c] - 1)
            if pos[c]:
                ce, wt = math.log1p(math.exp(-u)), r_hat
            else:
                ce, wt = math.log1p(math.exp(lam * u)), r_hat / lam
            row.append(balance * (1 - math.exp(-ce)) ** gamma * wt * ce)
        out.append(row)
    return _t(out)


def test_distribution_balanced_by_hand():
    z = [[0.5, -1.0, 2.0], [-0.3, 0.8, -2.0]]
    y = [[1, 0, 1], [0, 0, 0]]  # the second row has no positive: r = inf, r_hat = 1 + alpha
    counts, N = [4, 1, 2], 10
    got = shl.distribution_balanced_loss(_t(z), _t(y), counts, N, reduction="none",
                                         backend="torch")
    _close(got, _db_by_hand(z, y, counts, N))
    # An ignored positive leaves the repeat rate and costs nothing.
    ign = [[0, 0, 1], [0, 0, 0]]
    got = shl.distribution_balanced_loss(_t(z), _t(y), counts, N, ignore=_t(ign),
                                         reduction="none", backend="torch")
    _close(got, _db_by_hand(z, y, counts, N, ign=ign))
    kw = {"alpha": 0.2, "beta": 4.0, "mu": 0.5, "neg_scale": 2.0, "init_bias": 0.1,
          "gamma": 1.0, "balance": 1.0}
    got = shl.distribution_balanced_loss(_t(z), _t(y), counts, N, reduction="none",
                                         backend="torch", **kw)
    want = _db_by_hand(z, y, counts, N, alpha=0.2, beta=4.0, mu=0.5, lam=2.0, kappa=0.1,
                       gamma=1.0, balance=1.0)
    _close(got, want)


def test_sanity_anchors():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 7, generator=g, dtype=torch.float64) * 3
    y = torch.rand(4, 7, generator=g) < 0.4
    bce = F.binary_cross_entropy_with_logits(z, y.double(), reduction="none")
    kw = {"reduction": "none", "backend": "torch"}
    _close(shl.focal_loss(z, y, alpha=-1, gamma=0, **kw), bce)
    _close(shl.asymmetric_loss(z, y, gamma_neg=0, gamma_pos=0, clip=0, eps=1e-300, **kw), bce)
    _close(shl.class_balanced_loss(z, y, [3] * 7, beta=0.0, **kw), bce)
    db = shl.distribution_balanced_loss(z, y, [3] * 7, 10, alpha=1.0, beta=0.0, neg_scale=1.0,
                                        init_bias=0.0, gamma=0.0, balance=1.0, **kw)
    _close(db, 1.5 * bce)  # r_hat = alpha + sigmoid(0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_is_torch_bce(reduction):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 6, generator=g) * 4
    y = (torch.rand(5, 6, generator=g) < 0.3).float()
    w, pw = torch.rand(6, generator=g), torch.rand(6, generator=g) * 3
    want = F.binary_cross_entropy_with_logits(z, y, weight=w, pos_weight=pw, reduction=reduction)
    for backend in shl.available_backends():
        if backend in ("torch", "cpu"):
            got = shl.bce_loss(z, y, weight=w, pos_weight=pw, reduction=reduction,
                               backend=backend)
            torch.testing.assert_close(got, want)


def _gradcheck_cases():
    return [
        ("bce", lambda z, y, **k: shl.bce_loss(z, y, pos_weight=torch.full((5,), 2.0,
                                                                          dtype=z.dtype), **k)),
        ("focal", lambda z, y, **k: shl.focal_loss(z, y, **k)),
        ("focal_g05", lambda z, y, **k: shl.focal_loss(z, y, alpha=0.4, gamma=0.5, **k)),
        ("asl", lambda z, y, **k: shl.asymmetric_loss(z, y, **k)),
        ("asl_noclip", lambda z, y, **k: shl.asymmetric_loss(z, y, clip=0.0, gamma_pos=2.0, **k)),
        ("cb_focal", lambda z, y, **k: shl.class_balanced_loss(z, y, [1, 5, 9, 30, 2],
                                                               loss="focal", **k)),
        ("db", lambda z, y, **k: shl.distribution_balanced_loss(z, y, [1, 5, 9, 30, 2], 40, **k)),
    ]


@pytest.mark.parametrize("name, fn", _gradcheck_cases(), ids=lambda x: x if isinstance(x, str)
                         else "")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_torch(name, fn, reduction):
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(3, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    y = torch.rand(3, 5, generator=g) < 0.4
    ign = torch.zeros(3, 5, dtype=torch.bool)
    ign[1, 2] = ign[0, 0] = True
    assert torch.autograd.gradcheck(
        lambda t: fn(t, y, ignore=ign, reduction=reduction, backend="torch"), (z,))


def test_focal_gradient_finite_at_saturated_logits():
    # gamma < 1 and sigmoid(s) = 0 in float32: torchvision's pow(0, gamma) gives a NaN
    # gradient; the limit is 0 (the fused kernels' value too)
    z = torch.tensor([[200.0, -200.0, 5.0, -3.0]], requires_grad=True)
    y = torch.tensor([[False, False, True, False]])
    shl.focal_loss(z, y, gamma=0.5, reduction="sum", backend="torch").backward()
    assert z.grad.isfinite().all() and z.grad[0, 1] == 0
    zd = z.detach().double().requires_grad_()  # float64: sigmoid(-200) > 0, pow is fine
    p = torch.sigmoid(zd)
    q = torch.where(y, 1 - p, p)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(zd, y.double(), reduction="none")
    (0.25 * ce * q ** 0.5).where(y, 0.75 * ce * q ** 0.5).sum().backward()
    torch.testing.assert_close(z.grad.double(), zd.grad, rtol=1e-5, atol=1e-7)


def test_ignore_semantics_and_csr():
    z = _t(Z).requires_grad_()
    y = _t(Y)
    ign = torch.zeros(2, 4, dtype=torch.bool)
    ign[1, 1] = True  # a positive: ignore wins
    for fn in (shl.bce_loss, shl.focal_loss, shl.asymmetric_loss):
        z.grad = None
        el = fn(z, y, ignore=ign, reduction="none", backend="torch")
        assert el[1, 1] == 0
        el.sum().backward()
        assert z.grad[1, 1] == 0
        full = fn(z.detach(), y, reduction="none", backend="torch")
        _close(el.detach()[~ign], full[~ign])
        # "mean" divides by B*C: ignored pairs count, as zeros.
        _close(fn(z.detach(), y, ignore=ign, backend="torch"), el.detach().sum() / 8)
        csr_y = (torch.tensor([0, 1, 3]), torch.tensor([0, 2, 1]))
        csr_i = (torch.tensor([0, 0, 1], dtype=torch.int32), torch.tensor([1], dtype=torch.int32))
        _close(fn(z.detach(), csr_y, ignore=csr_i, reduction="none", backend="torch"),
               el.detach())


def test_dtype_shape_and_inputs_untouched():
    z = _t(Z, torch.bfloat16)
    y = _t(Y, torch.bool)
    z0, y0 = z.clone(), y.clone()
    out = shl.focal_loss(z, y, reduction="none", backend="torch")
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4)
    assert shl.asymmetric_loss(z, y, backend="torch").dtype == torch.bfloat16
    assert shl.distribution_balanced_loss(z, y, [1, 2, 3, 4], 9).dtype == torch.bfloat16
    assert torch.equal(z, z0) and torch.equal(y, y0)
    e = torch.zeros(0, 4)
    assert shl.bce_loss(e, e, reduction="sum", backend="torch").item() == 0
    assert shl.bce_loss(e, e, backend="torch").isnan()  # like torch's mean of nothing


Z2, Y2 = torch.zeros(2, 3), torch.zeros(2, 3)


@pytest.mark.parametrize("call, match", [
    (lambda: shl.bce_loss(torch.zeros(3), torch.zeros(3)), "logits"),
    (lambda: shl.bce_loss(Z2.long(), Y2), "logits"),
    (lambda: shl.bce_loss(Z2, Y2, reduction="avg"), "reduction"),
    (lambda: shl.bce_loss(Z2, torch.zeros(3, 2)), "targets"),
    (lambda: shl.bce_loss(Z2, Y2 + 0.5), "targets"),
    (lambda: shl.bce_loss(Z2, (torch.tensor([0, 1, 1]), torch.tensor([7]))), "targets"),
    (lambda: shl.bce_loss(Z2, Y2, ignore=torch.zeros(2, 2)), "ignore"),
    (lambda: shl.bce_loss(Z2, Y2, pos_weight=torch.ones(4)), "pos_weight"),
    (lambda: shl.bce_loss(Z2, Y2, pos_weight=-torch.ones(3)), "pos_weight"),
    (lambda: shl.bce_loss(Z2, Y2, weight=torch.tensor([1.0, math.inf, 1.0])), "weight"),
    (lambda: shl.bce_loss(Z2, Y2, weight=torch.ones(3, requires_grad=True)), "weight"),
    (lambda: shl.bce_loss(Z2, Y2, backend="gpu"), "backend"),
    (lambda: shl.focal_loss(Z2, Y2, gamma=-1.0), "gamma"),
    (lambda: shl.focal_loss(Z2, Y2, alpha=1.5), "alpha"),
    (lambda: shl.asymmetric_loss(Z2, Y2, clip=1.0), "clip"),
    (lambda: shl.asymmetric_loss(Z2, Y2, eps=0.0), "eps"),
    (lambda: shl.asymmetric_loss(Z2, Y2, gamma_neg=-1.0), "gamma_neg"),
    (lambda: shl.class_balanced_weights([1, 2], beta=1.0), "beta"),
    (lambda: shl.class_balanced_weights([[1, 2]]), "label_counts"),
    (lambda: shl.class_balanced_loss(Z2, Y2, [1, 2]), "label_counts"),
    (lambda: shl.class_balanced_loss(Z2, Y2, [1, -2, 3]), "label_counts"),
    (lambda: shl.class_balanced_loss(Z2, Y2, [1, 2, 3], loss="ce"), "loss"),
    (lambda: shl.distribution_balanced_loss(Z2, Y2, [1, 2, 3], 1), "num_docs"),
    (lambda: shl.distribution_balanced_loss(Z2, Y2, [1, 2, 30], 10), "num_docs"),
    (lambda: shl.distribution_balanced_loss(Z2, Y2, [1, 2, 3], 10, backend="cpu"), "backend"),
    (lambda: shl.distribution_balanced_loss(Z2, Y2, [1, 2, 3], 10, neg_scale=0.0), "neg_scale"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
