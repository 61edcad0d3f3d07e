"""Native CPU kernel (backend "cpu") against the PyTorch reference of SPEC section 3."""
from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from torch.utils.dlpack import to_dlpack

import shl_kernels
from shl_kernels.fused import FusedSHL
from shl_kernels.reference import shl_loss_reference

_C = pytest.importorskip("shl_kernels._C")
if not hasattr(_C, "shl_fused_cpu"):
    pytest.skip("shl_kernels._C was built without the CPU kernel", allow_module_level=True)

from test_cuda_kernel import with_empty_segments

from shl_kernels.kernels_cpu import shl_fused_cpu

SEEDS = [0, 1, 2]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def random_seg(C: int, m: int, g: torch.Generator, identity: bool = False,
               sizes: list[int] | None = None) -> shl_kernels.Segmentation:
    """m segments from a random permutation (or 0..C-1) split at random points."""
    ids = list(range(C)) if identity else torch.randperm(C, generator=g).tolist()
    if sizes is None:
        cuts = (torch.randperm(C - 1, generator=g)[: m - 1] + 1).sort().values.tolist()
        bounds = [0, *cuts, C]
    else:
        bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    return shl_kernels.Segmentation.from_segments(
        [ids[a:b] for a, b in pairwise(bounds)], C)


def make(B: int, C: int, m: int, seed: int, dtype=torch.float64, p_pos=0.1, p_ign=0.1,
         extras=True, scale=3.0, identity=False, sizes=None):
    g = torch.Generator().manual_seed(seed)
    seg = random_seg(C, m, g, identity, sizes)
    acc = _acc(dtype)
    z = (torch.randn(B, C, generator=g, dtype=torch.float64) * scale).to(dtype)
    pos = torch.rand(B, C, generator=g) < p_pos
    ign = torch.rand(B, C, generator=g) < p_ign if p_ign > 0 else None
    w = eta = delta = None
    if extras:
        w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(acc)
        eta = torch.randn(seg.num_segments, generator=g, dtype=torch.float64).to(acc)
        delta = torch.randn(C, generator=g, dtype=torch.float64).to(acc)
    return seg, z, pos, ign, w, eta, delta


def run_ref(seg, z, pos, ign, w, eta, delta, reduction="mean", upstream=None, dtype=None):
    """Loss and gradients (z, eta, delta) of the reference, computed in `dtype`."""
    dtype = dtype or z.dtype
    acc = _acc(dtype)
    zr = z.detach().to(dtype).requires_grad_()
    er = None if eta is None else eta.detach().to(acc).requires_grad_()
    dr = None if delta is None else delta.detach().to(acc).requires_grad_()
    wr = None if w is None else w.to(acc)
    loss = shl_loss_reference(zr, pos, seg, wr, er, dr, ign, reduction)
    loss.backward(upstream if reduction == "none" else None)
    return (loss.detach(), zr.grad, None if er is None else er.grad,
            None if dr is None else dr.grad)


def run_cpu(seg, z, pos, ign, w, eta, delta, reduction="mean", upstream=None, order="seg",
            inplace=False):
    """Loss and gradients through FusedSHL with the native kernel."""
    zk = z.detach().clone().requires_grad_(not inplace)
    ek = None if eta is None else eta.detach().clone().requires_grad_()
    dk = None if delta is None else delta.detach().clone().requires_grad_()
    o = seg.order if order == "seg" else order
    u8 = None if ign is None else ign.view(torch.uint8)
    args = (zk, pos.view(torch.uint8), u8, o, seg.offsets, w, ek, dk, reduction)
    if inplace:  # z is overwritten with its gradient: take it from there
        loss = FusedSHL.apply(shl_fused_cpu, *args, True)
        return loss.detach(), zk, None, None
    loss = FusedSHL.apply(shl_fused_cpu, *args)
    loss.backward(upstream if reduction == "none" else None)
    return (loss.detach(), zk.grad, None if ek is None else ek.grad,
            None if dk is None else dk.grad)


def assert_close(got, want, rtol, atol, what):
    for name, a, b in zip(("loss", "grad z", "grad eta", "grad delta"), got, want):
        if b is None:
            assert a is None, f"{what}: {name} should be None"
            continue
        torch.testing.assert_close(a.to(torch.float64), b.to(torch.float64), rtol=rtol,
                                   atol=atol, msg=lambda m, name=name: f"{what}: {name}: {m}")


SHAPES = [  # (B, C, m, segment sizes or None = random)
    (1, 1, 1, None),
    (1, 37, 5, None),
    (3, 37, 37, None),              # every segment a singleton
    (4, 37, 1, None),               # one segment of all labels
    (5, 100, 7, None),
    (3, 5000, 3, [4500, 1, 499]),   # a segment of > 4096 labels
    (7, 257, 19, None),             # C not a multiple of 8 or 16
    (4, 300, 20, [120, 60, 30, 20, 12, 9, 8, 8, 6, 5, 4, 4, 3, 3, 2, 2, 1, 1, 1, 1]),
                                    # realistic mix: a few big segments, many small ones
    (2, 300, 300, None),            # all singletons, more than one vector block of them
    (3, 3001, 700, None),           # mostly short segments (done in runs) over several
                                    # groups of segments (csrc/shl_cpu.cpp kGroup)
    (2, 2609, 14, [15, 16, 17, 1, 1100, 2, 3, 31, 33, 1000, 5, 8, 369, 9]),
                                    # around a block of lanes (16 fp32), beyond a group
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B, C, m, sizes", SHAPES)
@pytest.mark.parametrize("identity", [False, True])
def test_fp64_matches_reference(B, C, m, sizes, identity, seed):
    data = make(B, C, m, seed, sizes=sizes, identity=identity)
    assert_close(run_cpu(*data, order=None if identity else "seg"), run_ref(*data), 1e-10,
                 1e-12, f"B={B} C={C} m={m}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B, C, m, sizes", SHAPES)
def test_fp32_matches_reference(B, C, m, sizes, seed):
    data = make(B, C, m, seed, dtype=torch.float32, sizes=sizes)
    assert_close(run_cpu(*data), run_ref(*data, dtype=torch.float64), 1e-4, 1e-6,
                 f"B={B} C={C} m={m}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("extras", [False, True])
@pytest.mark.parametrize("p_ign", [0.0, 0.2])
def test_optional_inputs(seed, extras, p_ign):
    data = make(6, 53, 6, seed, p_ign=p_ign, extras=extras)
    assert_close(run_cpu(*data), run_ref(*data), 1e-10, 1e-12, f"extras={extras}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(seed, reduction):
    data = make(5, 64, 6, seed)
    up = torch.randn(5, generator=torch.Generator().manual_seed(seed + 100),
                     dtype=torch.float64)
    assert_close(run_cpu(*data, reduction=reduction, upstream=up),
                 run_ref(*data, reduction=reduction, upstream=up), 1e-10, 1e-12, reduction)


@pytest.mark.parametrize("seed", SEEDS)
def test_nontrivial_upstream_for_scalar_reductions(seed):
    data = make(4, 40, 4, seed)
    for red in ("mean", "sum"):
        got = run_cpu(*data, reduction=red)
        seg, z, pos, ign, w, eta, delta = data
        zk = z.clone().requires_grad_()
        loss = FusedSHL.apply(shl_fused_cpu, zk, pos.view(torch.uint8), ign.view(torch.uint8),
                              seg.order, seg.offsets, w, eta, delta, red)
        (loss * 2.5).backward()
        torch.testing.assert_close(zk.grad, got[1] * 2.5, rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_fp32_error_no_worse_than_reference_in_fp32(seed):
    data64 = make(8, 700, 9, seed, scale=4.0)
    seg, z, pos, ign, w, eta, delta = data64
    data32 = (seg, z.float(), pos, ign, w.float(), eta.float(), delta.float())
    exact = run_ref(*data32, dtype=torch.float64)  # fp64 maths on the same fp32 inputs
    ref32 = run_ref(*data32)
    got = run_cpu(*data32)
    for name, a, r, e in zip(("loss", "grad z", "grad eta", "grad delta"), got, ref32, exact):
        err = (a.double() - e).abs().max().item()
        ref_err = (r.double() - e).abs().max().item()
        assert err <= 2 * ref_err + 1e-6 * max(1.0, e.abs().max().item()), \
            f"{name}: fp32 kernel error {err:.3g} vs fp32 reference error {ref_err:.3g}"


@pytest.mark.parametrize("identity", [False, True])
def test_huge_logits_with_several_positives(identity):
    """Logits at scale 150 with many positives: positives hundreds apart in one segment,
    negatives far below the top one (with the positives in the shift, A and the lower
    positives' exp(u_p - M) underflowed together in fp32: loss -inf). Short segments, runs
    and blocks of lanes, as the fp64 reference."""
    data = make(3, 2609, 14, 5, dtype=torch.float32, p_pos=0.3, scale=150.0,
                sizes=SHAPES[-1][3], identity=identity)
    got = run_cpu(*data, order=None if identity else "seg")
    assert torch.isfinite(got[0]).all()
    assert_close(got, run_ref(*data, dtype=torch.float64), 1e-5, 1e-6, "scale 150")


HALF_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def assert_close_half(got, want, dtype):
    """Kernel on bf16/fp16 z vs the fp32 reference on the same (upcast) values: the loss and
    eta gradient are fp32, the z gradient is rounded to `dtype`, and the delta gradient
    sums rounded z gradients."""
    tol = HALF_TOL[dtype]
    assert got[1].dtype == dtype
    gmax = want[1].abs().max().item()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1].float(), want[1], rtol=tol, atol=tol * gmax * 1e-2)
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-6)
    assert got[3].dtype == torch.float32
    torch.testing.assert_close(got[3], want[3], rtol=tol, atol=tol * gmax)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("identity", [False, True])
def test_half_precision_inputs(seed, dtype, identity):
    seg, z, pos, ign, w, eta, delta = make(6, 300, 8, seed, dtype=dtype, identity=identity)
    got = run_cpu(seg, z, pos, ign, w, eta, delta, order=None if identity else "seg")
    assert_close_half(got, run_ref(seg, z.float(), pos, ign, w, eta, delta), dtype)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("identity", [False, True])
def test_half_precision_rounds_the_fp32_result(seed, dtype, identity):
    """bf16/fp16 z is upcast exactly and the maths runs in fp32, so the kernel on half z
    must give the fp32 kernel's loss on the upcast z, and its gradient rounded to nearest
    even (torch's .to) bit for bit; also covers halves' subnormals, infinities and NaN."""
    seg, z, pos, ign, w, eta, delta = make(5, 400, 9, seed, dtype=dtype, identity=identity)
    special = torch.tensor([0.0, -0.0, 1e-7, -3e-6, 65504.0, float("inf"), float("nan")])
    z[4, :7] = special.to(dtype)  # row 4: inf/NaN make its loss NaN
    order = None if identity else seg.order
    args = (pos.view(torch.uint8), ign.view(torch.uint8), order, seg.offsets, w, eta, delta,
            0.125, True)
    l16, g16, e16 = shl_fused_cpu(z, *args)
    l32, g32, e32 = shl_fused_cpu(z.float(), *args)
    assert torch.isnan(l16[4])
    for a, b in ((l16, l32), (e16, e32), (g16, g32.to(dtype))):
        assert _same_bits(a, b)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, except that NaN payloads (which follow operand order) may differ."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(_bits(a)[~nan], _bits(b)[~nan])


@pytest.mark.parametrize("seed", SEEDS)
def test_rows_without_positive_and_all_positive(seed):
    seg, z, pos, ign, w, eta, delta = make(6, 45, 5, seed)
    pos[0] = False  # null events only
    pos[1] = True   # every label positive
    pos[2, seg.order[seg.offsets[1]:seg.offsets[2]]] = False  # one segment without positive
    data = (seg, z, pos, ign, w, eta, delta)
    assert_close(run_cpu(*data), run_ref(*data), 1e-10, 1e-12, "null events")


@pytest.mark.parametrize("seed", SEEDS)
def test_ignored_labels(seed):
    seg, z, pos, ign, w, eta, delta = make(5, 60, 6, seed, p_pos=0.3)
    seg_labels = seg.order[seg.offsets[2]:seg.offsets[3]]
    ign[0, seg_labels] = True            # every label of a segment ignored
    ign[1] |= pos[1]                     # ignored positives: ignore wins
    ign[2] = True                        # a whole row ignored
    data = (seg, z, pos, ign, w, eta, delta)
    got, want = run_cpu(*data), run_ref(*data)
    assert_close(got, want, 1e-10, 1e-12, "ignored")
    assert (got[1][ign] == 0).all(), "ignored labels must get exactly zero gradient"
    assert got[0] is not None


@pytest.mark.parametrize("seed", SEEDS)
def test_large_logits_stay_finite(seed):
    seg, z, pos, ign, w, eta, delta = make(6, 90, 7, seed, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    z = torch.where(torch.rand(z.shape, generator=g) < 0.5, 80.0, -80.0)
    z[0, :] = 80.0
    z[1, :] = -80.0
    data = (seg, z, pos, ign, w, eta, delta)
    got = run_cpu(*data, reduction="none", upstream=torch.ones(6))
    want = run_ref(*data, reduction="none", upstream=torch.ones(6), dtype=torch.float64)
    for t in got:
        assert torch.isfinite(t).all()
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got[1].double(), want[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bad", [float("nan"), -float("nan"), float("inf")])  # both NaN signs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("role", ["negative", "positive"])
def test_nan_and_inf_propagate(seed, bad, dtype, role):
    seg, z, pos, ign, w, eta, delta = make(4, 70, 6, seed, dtype=dtype, p_ign=0.0)
    c = int(seg.order[seg.offsets[3]])  # a label in segment 3
    pos[1, c] = role == "positive"
    z[1, c] = bad
    ign = torch.zeros_like(pos)
    ign[2, c] = True
    z[2, c] = bad  # ignored: takes no part, so row 2 stays finite
    loss = run_cpu(seg, z, pos, ign, w, eta, delta, reduction="none",
                   upstream=torch.ones(4, dtype=_acc(dtype)))[0]
    assert torch.isnan(loss[1]), f"row loss {loss[1]} should be NaN"
    assert torch.isfinite(loss[[0, 2, 3]]).all()
    ref = run_ref(seg, z, pos, ign, w, eta, delta, reduction="none",
                  upstream=torch.ones(4, dtype=_acc(dtype)))[0]
    torch.testing.assert_close(loss[[0, 2, 3]], ref[[0, 2, 3]])


@pytest.mark.parametrize("seed", SEEDS)
def test_minus_inf_logits(seed):
    seg, z, pos, _, w, eta, delta = make(4, 50, 5, seed, p_ign=0.0)
    neg = ~pos
    z[neg & (torch.rand(z.shape, generator=torch.Generator().manual_seed(seed)) < 0.3)] = \
        float("-inf")
    data = (seg, z, pos, None, w, eta, delta)
    got, want = run_cpu(*data), run_ref(*data)
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
    assert_close(got, want, 1e-10, 1e-12, "-inf logits")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_identity_order_none_equals_explicit(seed, dtype):
    seg, z, pos, ign, w, eta, delta = make(5, 97, 6, seed, dtype=dtype, identity=True)
    data = (seg, z, pos, ign, w, eta, delta)
    a = run_cpu(*data, order=None)
    b = run_cpu(*data, order=torch.arange(97))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    if dtype == torch.bfloat16:
        assert_close_half(a, run_ref(seg, z.float(), pos, ign, w, eta, delta), dtype)
    else:
        assert_close(a, run_ref(*data, dtype=torch.float64), 1e-4, 1e-6, "identity")


def _set_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    return old


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("identity", [False, True])
def test_threads_bitwise_identical(seed, dtype, identity):
    data = make(37, 1111, 13, seed, dtype=dtype, identity=identity)
    old = _set_threads(1)
    try:
        one = run_cpu(*data)
        torch.set_num_threads(2)
        two = run_cpu(*data)
    finally:
        torch.set_num_threads(old)
    for x, y in zip(one, two):
        assert torch.equal(_bits(x), _bits(y))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("identity", [False, True])
def test_every_output_written(seed, dtype, identity):
    seg, z, pos, ign, w, eta, delta = make(9, 301, 11, seed, dtype=dtype, identity=identity)
    acc = _acc(dtype)
    order = None if identity else seg.order
    grad_out = torch.full(z.shape, float("nan"), dtype=dtype)
    loss, grad, geta = shl_fused_cpu(z, pos.view(torch.uint8), ign.view(torch.uint8), order,
                                     seg.offsets, w, eta, delta, 0.5, True, grad_out=grad_out)
    assert grad is grad_out
    assert torch.isfinite(grad).all()
    # every output of the binding, poisoned
    outs = {"loss": torch.full((9,), float("nan"), dtype=acc),
            "grad": grad_out.fill_(float("nan")),
            "grad_eta": torch.full((9, 11), float("nan"), dtype=acc)}
    _C.shl_fused_cpu(*(None if t is None else to_dlpack(t) for t in (
        z, pos, ign, order, seg.offsets, w, eta, delta)), 0.5,
        *(to_dlpack(t) for t in outs.values()), 2)
    for name, t in outs.items():
        assert torch.isfinite(t).all(), f"{name} not fully written"
    torch.testing.assert_close(outs["loss"], loss, rtol=0, atol=0)
    torch.testing.assert_close(outs["grad_eta"], geta, rtol=0, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("identity", [False, True])
def test_inplace_equals_out_of_place(seed, dtype, identity):
    data = make(6, 211, 7, seed, dtype=dtype, identity=identity)
    ref = run_cpu(*data)
    got = run_cpu(*data, inplace=True)
    assert torch.equal(got[0], ref[0])
    assert torch.equal(got[1], ref[1])


def test_grad_scale_and_grad_eta_rows():
    seg, z, pos, ign, w, eta, delta = make(4, 30, 3, 0)
    args = (z, pos.view(torch.uint8), ign.view(torch.uint8), seg.order, seg.offsets, w, eta,
            delta)
    l1, g1, e1 = shl_fused_cpu(*args, 1.0, True)
    l2, g2, e2 = shl_fused_cpu(*args, 0.25, True)
    torch.testing.assert_close(l2, l1 * 0.25, rtol=1e-15, atol=0)  # so the loss is one sum
    torch.testing.assert_close(g2, g1 * 0.25, rtol=1e-15, atol=0)
    torch.testing.assert_close(e2, e1 * 0.25, rtol=1e-15, atol=0)
    er = eta.clone().requires_grad_()
    rows = shl_loss_reference(z, pos, seg, w, er, delta, ign, "none")
    for i in range(4):  # grad_eta row i is d(loss_i)/d(eta)
        (gi,) = torch.autograd.grad(rows[i], er, retain_graph=True)
        torch.testing.assert_close(e1[i], gi, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 9, 300])
def test_row_sums(dtype, B):
    # reduce=True (what FusedSHL asks for "mean"/"sum"): the loss and grad_eta summed over
    # rows by the kernel call, rows in order in double: the double sums of the rows it
    # returns otherwise, rounded once. The totals start poisoned: every one is written.
    seg, z, pos, ign, w, eta, delta = make(B, 301, 11, 4, dtype=dtype)
    acc = _acc(dtype)
    args = (z, pos.view(torch.uint8), ign.view(torch.uint8), seg.order, seg.offsets, w, eta,
            delta, 1.0 / B, True)
    loss, grad, geta = shl_fused_cpu(*args)
    total = torch.full((), float("nan"), dtype=acc)
    geta_total = torch.full((11,), float("nan"), dtype=acc)
    outs = (torch.empty_like(loss), torch.empty_like(grad), torch.empty_like(geta))
    _C.shl_fused_cpu(*(None if t is None else to_dlpack(t) for t in (*args[:8],)), 1.0 / B,
                     *(to_dlpack(t) for t in outs), 2, to_dlpack(total), to_dlpack(geta_total))

    def in_order(values):  # Python floats are doubles: the kernel's sum, term by term
        t = 0.0
        for v in values:
            t += v
        return t

    assert total.item() == torch.tensor(in_order(loss.tolist()), dtype=acc).item()
    want = torch.tensor([in_order(col) for col in geta.t().tolist()], dtype=acc)
    assert torch.equal(geta_total, want)
    assert torch.equal(outs[1], grad) and torch.equal(outs[2], geta)
    got = shl_fused_cpu(*args, reduce=True)
    assert torch.equal(got[0], total) and torch.equal(got[1], grad)
    assert torch.equal(got[2], geta_total)
    no_eta = shl_fused_cpu(*args[:9], False, reduce=True)  # grad_eta not asked: no sums
    assert no_eta[2] is None and torch.equal(no_eta[0], total)


def test_row_sums_of_no_rows():
    seg = shl_kernels.Segmentation.from_segments([[0, 1]], 2)
    loss, grad, geta = shl_fused_cpu(torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.uint8),
                                     None, None, seg.offsets, None, torch.zeros(1), None, 1.0,
                                     True, reduce=True)
    assert torch.equal(loss, torch.zeros(())) and torch.equal(geta, torch.zeros(1))
    assert grad.shape == (0, 2)


def test_empty_shapes():
    seg = shl_kernels.Segmentation.from_segments([[0, 1]], 2)
    loss, grad, geta = shl_fused_cpu(torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.uint8),
                                     None, None, seg.offsets, None, torch.zeros(1), None, 1.0,
                                     True)
    assert loss.shape == (0,) and grad.shape == (0, 2) and geta.shape == (0, 1)
    seg0 = shl_kernels.Segmentation.from_segments([], 0)
    loss, grad, _ = shl_fused_cpu(torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.uint8),
                                  None, None, seg0.offsets, None, None, None, 1.0, False)
    assert torch.equal(loss, torch.zeros(3)) and grad.shape == (3, 0)


@pytest.mark.parametrize("identity", [False, True])
def test_empty_segments_add_only_a_null_event(identity):
    """Empty segments (only raw offsets have them: at the start, between short and long
    segments, at the end) change nothing else: loss, gradient and the other segments' eta
    gradient as without them (up to rounding: a segment's exp may run in a vector lane or
    in a loop's remainder), their own eta gradient exactly 0."""
    sizes = [3, 40, 1, 1, 2, 1200, 7, 16, 5, 300]
    B, C = 4, sum(sizes)
    seg, z, pos, ign, w, eta, delta = make(B, C, len(sizes), 11, sizes=sizes,
                                           identity=identity)
    args = (z, pos.view(torch.uint8), ign.view(torch.uint8), seg.order)
    base = shl_fused_cpu(*args, seg.offsets, w, eta, delta, 0.5, True)
    # new empty segments go before these segment ids
    offsets, eta_e, keep, empty = with_empty_segments(seg.offsets, eta, [0, 2, 5, 6, 10])
    loss, grad, geta = shl_fused_cpu(*args, offsets, w, eta_e, delta, 0.5, True)
    for got, want in ((loss, base[0]), (grad, base[1]), (geta[:, keep], base[2])):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    assert torch.equal(geta[:, empty], torch.zeros(B, len(empty), dtype=geta.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_positives_in_one_segment_no_worse_than_torch(dtype):
    """A segment of 18475 labels, 90% of them positive: its positives' losses are summed in
    double (a float32 sum lost 3e-6 of the row loss, 4e-5 with bf16 logits; torch 1e-7)."""
    g = torch.Generator().manual_seed(3)
    C = 18475
    seg = shl_kernels.Segmentation.from_segments([list(range(C))], C)
    z = torch.randn(3, C, generator=g, dtype=torch.float64).to(dtype)
    pos = torch.rand(3, C, generator=g) < 0.9
    exact = shl_loss_reference(z.double(), pos, seg, reduction="none")

    def rel(loss):
        return ((loss.double() - exact).abs() / exact.abs()).max().item()

    acc = shl_loss_reference(z.to(torch.float32), pos, seg, reduction="none")
    got = shl_kernels.segmented_harmonic_loss(z, pos, seg, reduction="none", backend="cpu")
    assert rel(got) <= 3 * rel(acc) + 1e-7


def test_sum_matches_bce_with_singletons():
    g = torch.Generator().manual_seed(5)
    C = 23
    seg = shl_kernels.Segmentation.from_segments([[c] for c in range(C)], C)
    z = torch.randn(4, C, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.rand(4, C, generator=g) < 0.4
    loss = FusedSHL.apply(shl_fused_cpu, z, y.view(torch.uint8), None, None, seg.offsets, None,
                          None, None, "sum")
    (gz,) = torch.autograd.grad(loss, z)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y.double(), reduction="sum")
    (gb,) = torch.autograd.grad(bce, z)
    torch.testing.assert_close(loss, bce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gz, gb, rtol=1e-12, atol=1e-12)


# ---- argument checks of the binding (DLPack capsules straight to _C) ----

def _valid(B=4, C=7, m=3, dtype=torch.float32):
    acc = _acc(dtype)
    seg = random_seg(C, m, torch.Generator().manual_seed(0))
    return {"z": torch.randn(B, C, dtype=dtype), "pos": torch.zeros(B, C, dtype=torch.uint8),
            "ign": torch.zeros(B, C, dtype=torch.bool), "order": seg.order,
            "offsets": seg.offsets, "w": torch.ones(C, dtype=acc),
            "eta": torch.zeros(m, dtype=acc), "delta": torch.zeros(C, dtype=acc),
            "grad_scale": 1.0, "loss": torch.empty(B, dtype=acc),
            "grad": torch.empty(B, C, dtype=dtype), "grad_eta": torch.empty(B, m, dtype=acc),
            "num_threads": 1}


def _call(kw):
    caps = {k: (to_dlpack(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return _C.shl_fused_cpu(**caps)


def test_binding_accepts_valid_and_none():
    _call(_valid())
    kw = _valid()
    for k in ("ign", "order", "w", "eta", "delta", "grad_eta"):
        kw[k] = None
    _call(kw)


@pytest.mark.parametrize("name, bad, exc", [
    ("z", torch.randn(4, 7, dtype=torch.float32).to(torch.int32), TypeError),
    ("z", torch.randn(28), ValueError),
    ("z", torch.randn(7, 4).t(), ValueError),  # non-contiguous
    ("pos", torch.zeros(4, 7, dtype=torch.float32), TypeError),
    ("pos", torch.zeros(4, 6, dtype=torch.uint8), ValueError),
    ("pos", torch.zeros(7, 4, dtype=torch.uint8).t(), ValueError),
    ("ign", torch.zeros(3, 7, dtype=torch.bool), ValueError),
    ("order", torch.arange(7, dtype=torch.int32), TypeError),
    ("order", torch.arange(8), ValueError),
    ("offsets", torch.tensor([0, 7], dtype=torch.int32), TypeError),
    ("offsets", torch.zeros(0, dtype=torch.int64), ValueError),
    ("w", torch.ones(7, dtype=torch.float64), TypeError),
    ("w", torch.ones(6), ValueError),
    ("eta", torch.zeros(4), ValueError),
    ("delta", torch.zeros(7, 1), ValueError),
    ("loss", torch.empty(4, dtype=torch.float64), TypeError),
    ("loss", torch.empty(5), ValueError),
    ("grad", torch.empty(4, 7, dtype=torch.float64), TypeError),
    ("grad", torch.empty(4, 8), ValueError),
    ("grad", torch.empty(7, 4).t(), ValueError),
    ("grad_eta", torch.empty(4, 2), ValueError),
    ("grad_eta", torch.empty(4, 3, dtype=torch.bfloat16), TypeError),
    ("loss_total", torch.empty(1), ValueError),
    ("loss_total", torch.empty((), dtype=torch.float64), TypeError),
    ("grad_eta_total", torch.empty(4), ValueError),
    ("grad_eta_total", torch.empty(3, dtype=torch.float16), TypeError),
])
def test_binding_rejects_bad_arguments(name, bad, exc):
    kw = _valid()
    kw[name] = bad
    with pytest.raises(exc, match=f"^{name}:"):
        _call(kw)


def test_binding_rejects_grad_eta_total_without_grad_eta():
    kw = _valid()
    kw["grad_eta"], kw["grad_eta_total"] = None, torch.empty(3)
    with pytest.raises(ValueError, match="^grad_eta_total: given without grad_eta"):
        _call(kw)


def test_binding_rejects_non_capsules_and_missing():
    kw = _valid()
    caps = {k: (to_dlpack(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    caps["z"] = kw["z"]  # a tensor, not a capsule
    with pytest.raises(TypeError, match="^z:"):
        _C.shl_fused_cpu(**caps)
    kw = _valid()
    kw["pos"] = None
    with pytest.raises(ValueError, match="^pos:"):
        _call(kw)


def test_fp64_acc_dtype_required_for_fp64_z():
    kw = _valid(dtype=torch.float64)
    _call(kw)
    kw["eta"] = torch.zeros(3, dtype=torch.float32)
    with pytest.raises(TypeError, match="^eta:"):
        _call(kw)


def test_order_changed_in_place_between_calls():
    """The kernel reuses the index it built for the last order only if its contents match."""
    seg, z, pos, ign, w, eta, delta = make(3, 50, 4, 0)
    order = seg.order.clone()
    args = (z, pos.view(torch.uint8), ign.view(torch.uint8), order, seg.offsets, w, eta, delta,
            1.0, False)
    first = shl_fused_cpu(*args)[0]
    torch.testing.assert_close(first, shl_loss_reference(z, pos, seg, w, eta, delta, ign, "none"))
    order.copy_(order.flip(0))  # same tensor, same pointer, new segmentation
    flipped = shl_kernels.Segmentation.from_segments(
        [order[a:b].tolist() for a, b in pairwise(seg.offsets.tolist())], 50)
    torch.testing.assert_close(shl_fused_cpu(*args)[0],
                               shl_loss_reference(z, pos, flipped, w, eta, delta, ign, "none"))
    order[0] = order[1]  # no longer a permutation
    with pytest.raises(RuntimeError, match="^order:"):
        shl_fused_cpu(*args)


@pytest.mark.parametrize("field, value, match", [
    ("order", torch.tensor([0, 1, 2, 3, 4, 5, 5]), "order"),
    ("order", torch.tensor([0, 1, 2, 3, 4, 5, 7]), "order"),
    ("offsets", torch.tensor([0, 3, 2, 7]), "offsets"),
    ("offsets", torch.tensor([0, 3, 5, 6]), "offsets"),
])
def test_kernel_rejects_invalid_segmentation(field, value, match):
    kw = _valid()
    kw[field] = value
    with pytest.raises(RuntimeError, match=f"^{match}:"):
        _call(kw)
