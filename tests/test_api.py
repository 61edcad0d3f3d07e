import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import shl_kernels as shl


def _seg():
    return shl.Segmentation.from_segments([[0, 2], [1], [3]], 4, label_counts=[5, 1, 3, 0])


class Ops(TorchDispatchMode):
    """Records the name of every torch op run inside it (ops.ops)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_auto_backend_and_unavailable():
    assert "torch" in shl.available_backends()
    z = torch.randn(2, 4)
    shl.segmented_harmonic_loss(z, torch.zeros(2, 4), _seg(), backend="auto")
    with pytest.raises(ValueError, match="backend"):
        shl.segmented_harmonic_loss(z, torch.zeros(2, 4), _seg(), backend="cuda")


@pytest.mark.parametrize("bad, match", [
    ({"logits": torch.randn(4)}, "logits"),
    ({"logits": torch.randn(2, 5)}, "logits: has 5 labels.*num_labels"),
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


@pytest.mark.parametrize("usable, device, expect", [
    ({"triton", "cuda", "cpu"}, "cuda", "triton"),
    ({"cuda", "cpu"}, "cuda", "cuda"),
    ({"cpu"}, "cuda", "torch"),
    ({"cpu", "triton"}, "cpu", "cpu"),
    (set(), "cpu", "torch"),
])
def test_auto_follows_spec(monkeypatch, usable, device, expect):
    from shl_kernels import backends

    monkeypatch.setattr(backends, "why_unavailable",
                        lambda b: None if b == "torch" or b in usable else "not here")
    assert backends.resolve("auto", torch.device(device)) == expect


def test_unavailable_backend_says_why_and_how(monkeypatch):
    from shl_kernels import backends

    backends.why_unavailable.cache_clear()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    try:
        if not torch.cuda.is_available():
            with pytest.raises(ValueError, match="backend: 'triton' is not available: no CUDA"):
                backends.resolve("triton", torch.device("cpu"))
        with pytest.raises(ValueError, match="unknown backend"):
            shl.segmented_harmonic_loss(torch.randn(2, 4), torch.zeros(2, 4), _seg(),
                                        backend="tpu")
    finally:
        backends.why_unavailable.cache_clear()


def _call(**kw):
    args = {"logits": torch.randn(2, 4), "targets": torch.zeros(2, 4), "seg": _seg()}
    args.update(kw)
    return shl.segmented_harmonic_loss(args.pop("logits"), args.pop("targets"),
                                       args.pop("seg"), **args)


meta = torch.device("meta")


@pytest.mark.parametrize("kw, err, match", [
    ({"logits": torch.randint(0, 3, (2, 4))}, TypeError, "logits: unsupported dtype"),
    ({"targets": torch.full((2, 4), 0.5)}, ValueError, "targets: dense targets must hold only 0"),
    ({"targets": torch.zeros(2, 4, device=meta)}, ValueError, "targets: on meta"),
    ({"ignore": torch.zeros(2, 3)}, ValueError, "ignore: expected shape"),
    ({"targets": (torch.tensor([0, 1, 1], dtype=torch.int16), torch.tensor([1]))}, TypeError,
     "targets: CSR indptr must be"),
    ({"targets": (torch.tensor([0, 2, 1]), torch.tensor([1]))}, ValueError,
     "targets: CSR indptr must start at 0"),
    ({"targets": (torch.tensor([0, 1, 1]), torch.tensor([-1]))}, ValueError,
     r"targets: label ids must be in \[0, 4\)"),
    ({"targets": "abc"}, TypeError, "targets: expected"),
    ({"null_logits": torch.zeros(2)}, ValueError, r"null_logits: expected shape \(3,\)"),
    ({"null_logits": torch.zeros(3, dtype=torch.int64)}, TypeError, "null_logits: expected a floating"),
    ({"logit_offsets": torch.zeros(4, device=meta)}, ValueError, "logit_offsets: on meta"),
    ({"label_weights": torch.tensor([1.0, float("inf"), 1.0, 1.0])}, ValueError,
     "label_weights: must be finite"),
    ({"label_weights": torch.tensor([1.0, 0.0, 1.0, 1.0])}, ValueError, "label_weights"),
    ({"reduction": "avg"}, ValueError, "reduction"),
    ({"seg": [[0, 1], [2, 3]]}, TypeError, "seg: expected a shl_kernels.Segmentation"),
    ({"inplace": True, "backend": "torch"}, ValueError, "inplace: needs a fused backend"),
    ({"inplace": True, "backend": "cpu", "logits": torch.randn(2, 4, requires_grad=True)},
     ValueError, "inplace: logits is a leaf that requires grad"),
])
def test_every_spec_error_names_the_argument(kw, err, match):
    with pytest.raises(err, match=match):
        _call(**kw)


def test_inputs_are_not_modified():
    z = torch.randn(3, 4, requires_grad=True)
    t = torch.eye(4)[:3]
    eta = torch.zeros(3, requires_grad=True)
    before = (z.detach().clone(), t.clone(), eta.detach().clone())
    for b in shl.available_backends():
        _call(logits=z, targets=t, null_logits=eta, backend=b).backward()
    assert torch.equal(z.detach(), before[0]) and torch.equal(t, before[1])
    assert torch.equal(eta.detach(), before[2])


def test_info_reports_backends():
    from shl_kernels.info import build_report

    rep = build_report()
    assert rep["backend torch"] == "usable"
    assert set(rep) >= {"shl_kernels", "OpenMP", "CUDA kernels", "torch", "triton", "numba"}


@pytest.mark.parametrize("backend", shl.available_backends())
def test_second_backward_with_other_upstream_grad(backend):
    seg = _seg()
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.eye(4)[:3]
    loss = shl.segmented_harmonic_loss(z, t, seg, backend=backend)
    (g1,) = torch.autograd.grad(loss * 3.0, z, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * -0.5, z, retain_graph=True)
    (g3,) = torch.autograd.grad(loss, z, retain_graph=True)
    torch.testing.assert_close(g1, 3.0 * g3, rtol=1e-12, atol=0)
    torch.testing.assert_close(g2, -0.5 * g3, rtol=1e-12, atol=0)
    if backend != "torch":  # the buffer cannot be recomputed once the logits changed
        with torch.no_grad():
            z.add_(1.0)
        with pytest.raises(RuntimeError, match="second backward through a fused loss"):
            torch.autograd.grad(loss, z)


@pytest.mark.parametrize("backend", [b for b in shl.available_backends() if b != "torch"])
def test_fused_gradcheck_and_inplace(backend):
    seg = _seg()
    t = torch.eye(4)[:3]
    eta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z, e, d: shl.segmented_harmonic_loss(z, t, seg, null_logits=e, logit_offsets=d,
                                                    backend=backend, reduction="none"),
        (z, eta, delta))
    ref = z.detach().clone().requires_grad_()
    shl.segmented_harmonic_loss(ref, t, seg, backend="torch").backward()
    buf = z.detach().clone()
    loss = shl.segmented_harmonic_loss(buf, t, seg, backend=backend, inplace=True)
    expect = shl.segmented_harmonic_loss(z.detach(), t, seg, backend="torch")
    torch.testing.assert_close(loss, expect, rtol=1e-12, atol=0)
    torch.testing.assert_close(buf, ref.grad, rtol=1e-12, atol=1e-15)  # gradient in place


@pytest.mark.parametrize("backend", [b for b in shl.available_backends() if b != "torch"])
def test_fused_backends_refuse_learnable_weights(backend):
    w = torch.ones(4, requires_grad=True)
    with pytest.raises(ValueError, match="label_weights: requires grad"):
        _call(label_weights=w, backend=backend)
    _call(label_weights=w.detach(), backend=backend)  # constants are fine
    _call(label_weights=w, backend="torch").backward()  # the reference learns them
    assert w.grad is not None


@pytest.mark.parametrize("sync", [True, False], ids=["host-read", "on-device"])
@pytest.mark.parametrize("backend", [b for b in shl.available_backends() if b != "torch"])
def test_upstream_gradient_scaling_without_host_sync(backend, sync, monkeypatch):
    # Small GPU buffers are scaled by the upstream gradient on the device (no host sync);
    # forced here on CPU tensors: same gradients as the reference, for SHL (with null
    # logits) and an elementwise loss.
    from shl_kernels import fused
    monkeypatch.setattr(fused, "sync_for_upstream", lambda grad: sync)
    seg = _seg()
    t = torch.eye(4)[:3]
    z0 = torch.randn(3, 4, dtype=torch.float64)
    eta0 = torch.randn(3, dtype=torch.float64)
    grads = {}
    for b in (backend, "torch"):
        z, eta = z0.clone().requires_grad_(), eta0.clone().requires_grad_()
        loss = shl.segmented_harmonic_loss(z, t, seg, null_logits=eta, backend=b)
        (loss * 2.5 + shl.bce_loss(z, t, backend=b if b != "torch" else "torch") * -0.5
         ).backward()
        grads[b] = (z.grad, eta.grad)
    for got, want in zip(grads[backend], grads["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", [b for b in shl.available_backends() if b != "torch"])
def test_fused_backward_scales_both_gradients_in_one_op(backend, monkeypatch):
    # Kernels that sum over rows themselves (all fused ones) leave the backward one op on a
    # GPU's small buffers: the gradient and the eta gradient times the upstream gradient.
    from shl_kernels import fused

    monkeypatch.setattr(fused, "sync_for_upstream", lambda grad: False)  # as on a GPU
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    z = torch.randn(3, 4, device=dev, requires_grad=True)
    eta = torch.zeros(3, device=dev, requires_grad=True)
    loss = shl.segmented_harmonic_loss(z, torch.eye(4, dtype=torch.bool, device=dev)[:3],
                                       _seg(), null_logits=eta, backend=backend)
    go = torch.tensor(0.7, device=dev)
    with Ops() as seen:
        loss.backward(go)
    work = [op for op in seen.ops if not op.startswith(("detach", "alias", "view"))]
    assert work == ["_foreach_mul_.Tensor"], seen.ops
    want = torch.autograd.grad(shl.segmented_harmonic_loss(
        z, torch.eye(4, dtype=torch.bool, device=dev)[:3], _seg(), null_logits=eta,
        backend="torch"), (z, eta), go)
    torch.testing.assert_close(z.grad, want[0])
    torch.testing.assert_close(eta.grad, want[1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", [  # the Triton interpreter runs torch ops of its own
    b for b in shl.available_backends() if b != "torch" and
    not (b == "triton" and os.environ.get("TRITON_INTERPRET") == "1")])
def test_fused_forward_is_one_kernel_and_at_most_one_reduction(backend, reduction):
    # A small batch's step is launch-bound on a GPU (issue 4's B=16 target) and bound by
    # host time on a CPU: the fused forward allocates its outputs and runs the kernel (not a
    # torch op, so not seen here), which also sums over rows for "mean" and "sum": no torch
    # op computes ("none": at most one, Triton's partial row losses summed per row). Dense
    # bool targets and fp32 buffers need no conversion. (On a GPU the loss, targets and
    # weights are moved there by the test.)
    seg = _seg()
    dev = "cpu" if backend == "cpu" else "cuda"
    z = torch.randn(3, 4, device=dev, requires_grad=True)
    t = torch.eye(4, dtype=torch.bool, device=dev)[:3]
    w, eta = torch.rand(4, device=dev) + 0.5, torch.zeros(3, device=dev)

    def loss():
        return shl.segmented_harmonic_loss(z, t, seg, label_weights=w, null_logits=eta,
                                           reduction=reduction, backend=backend)

    loss()  # the weights' check runs once per buffer version, as in a training loop
    with Ops() as seen:
        loss()
    work = [op for op in seen.ops if not op.startswith(("empty", "view", "alias", "detach"))]
    assert len(work) <= (1 if reduction == "none" else 0), seen.ops
    # the elementwise losses likewise (their fused kernels sum "mean" and "sum" too)
    for fn in (shl.bce_loss, shl.focal_loss, shl.asymmetric_loss):
        fn(z, t, reduction=reduction, backend=backend)
        with Ops() as seen:
            fn(z, t, reduction=reduction, backend=backend)
        work = [op for op in seen.ops
                if not op.startswith(("empty", "zeros", "view", "alias", "detach"))]
        assert work == [], (fn.__name__, seen.ops)


def _device(backend: str) -> str:
    """Where `backend` runs here (Triton on CPU tensors under its interpreter)."""
    return "cpu" if backend in ("cpu", "torch") or not torch.cuda.is_available() else "cuda"


def _fp16_problem(B=24, C=900, m=30, seed=0):
    """fp16 logits whose mean-reduced gradients are mostly below fp16's smallest normal
    (6.1e-5): the range a loss scale (GradScaler) lifts them out of."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(C, generator=g)
    cuts = (torch.randperm(C - 1, generator=g)[: m - 1] + 1).sort().values
    seg = shl.Segmentation(C, order, torch.cat([torch.tensor([0]), cuts, torch.tensor([C])]),
                           torch.zeros(C, dtype=torch.int64))
    z = (torch.randn(B, C, generator=g) * 2 - 4).half()
    return seg, z, torch.rand(B, C, generator=g) < 0.01


def _rel_error(got, exact):
    """Largest relative error over the entries of magnitude >= 1e-3 (the others: fp16's
    subnormals after scaling, where torch rounds too)."""
    big = exact.abs() >= 1e-3
    assert got[big].isfinite().all()  # (where torch would overflow, the test is void)
    return ((got.double() - exact).abs() / exact.abs())[big].max().item()


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", [b for b in shl.available_backends() if b != "torch"])
def test_fp16_gradients_under_a_loss_scale_no_worse_than_torch(backend, reduction):
    # The fused forward rounds the gradient to fp16 at scale 1/B, where most entries are
    # subnormal; times GradScaler's 2^16 that rounding was 100% of some entries (and an
    # upstream of 2^16 rounded to fp16 was inf). Backward now runs the kernel again with
    # the scale folded in (rows: their smallest), as torch rounds after scaling.
    seg, z, pos = _fp16_problem()
    eta0 = torch.zeros(seg.num_segments)
    if reduction == "mean":
        up = torch.tensor(65536.0)
    else:  # per-row weights under the scale, one row left out
        up = 16384.0 * (torch.rand(z.shape[0], generator=torch.Generator().manual_seed(1))
                        + 0.5)
        up[0] = 0.0
    grads = {}
    for b, dt in ((backend, torch.float16), ("torch", torch.float16),
                  ("torch", torch.float64)):
        dev = _device(b)
        x = z.to(dev, dt).clone().requires_grad_()
        eta = eta0.to(dev, torch.float64 if dt == torch.float64 else torch.float32)
        eta.requires_grad_()
        loss = shl.segmented_harmonic_loss(x, pos.to(dev), seg, null_logits=eta,
                                           reduction=reduction, backend=b)
        grads[(b, dt)] = [g.cpu() for g in torch.autograd.grad(loss, (x, eta),
                                                               up.to(dev, loss.dtype))]
    exact = grads[("torch", torch.float64)]
    ours, torch16 = grads[(backend, torch.float16)], grads[("torch", torch.float16)]
    assert _rel_error(ours[0], exact[0]) <= 2 * _rel_error(torch16[0], exact[0]) + 1e-6
    torch.testing.assert_close(ours[1].double(), exact[1], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", [b for b in shl.available_backends() if b != "torch"])
def test_fp16_loss_scale_recomputes_each_backward(backend):
    # the elementwise losses take the same path; a second backward (retain_graph) with
    # another scale gets its own recomputation; logits changed in place since the forward
    # leave the forward's buffer, scaled (no recomputation from other values)
    seg, z, pos = _fp16_problem(C=300, m=10)
    dev = _device(backend)
    z, pos = z.to(dev), pos.to(dev)
    for fn in (lambda x, b: shl.segmented_harmonic_loss(x, pos, seg, backend=b),
               lambda x, b: shl.bce_loss(x, pos, backend=b)):
        exact = z.double().requires_grad_()
        gx = torch.autograd.grad(fn(exact, "torch"), exact)[0].cpu()
        x = z.clone().requires_grad_()
        loss = fn(x, backend)
        # (BCE's loss is fp16, as torch's: its upstream gradient too, so below 65504)
        (g1,) = torch.autograd.grad(loss, x, torch.tensor(16384.0, device=dev),
                                    retain_graph=True)
        (g2,) = torch.autograd.grad(loss, x, torch.tensor(1024.0, device=dev))
        for g, s in ((g1, 16384.0), (g2, 1024.0)):
            assert _rel_error(g.cpu(), gx * s) < 2e-3  # fp16 rounding once, not 100%
        loss = fn(x, backend)
        with torch.no_grad():
            x.add_(0)
        (g3,) = torch.autograd.grad(loss, x, torch.tensor(16384.0, device=dev))
        g3 = g3.cpu()
        assert g3.isfinite().all() and _rel_error(g3, gx * 16384.0) > 2e-3  # (rounded first)


@pytest.mark.parametrize("backend", [b for b in shl.available_backends() if b != "torch"])
def test_fp16_inplace_under_a_loss_scale_warns(backend):
    seg, z, pos = _fp16_problem(C=300, m=10)
    dev = _device(backend)
    x = z.to(dev).requires_grad_()
    loss = shl.segmented_harmonic_loss(x.clone(), pos.to(dev), seg, backend=backend,
                                       inplace=True)
    with pytest.warns(UserWarning, match="pass inplace=False"):
        loss.backward(torch.tensor(65536.0, device=dev))
    assert x.grad.isfinite().all()
