"""Triton fused kernel against the PyTorch reference: on CPU through the Triton interpreter
(tests/conftest.py), on the GPU when there is one (tests/test_gpu.py adds training shapes).

Shapes stay tiny (the interpreter is ~2000x slower than a GPU); BLOCK=16 makes segments
longer than 16 take the multi-pass loop path, shorter ones the single-load path.
"""
from __future__ import annotations

import functools
import textwrap

import pytest
import torch
from test_cuda_kernel import with_empty_segments

import shl_kernels as shl
from shl_kernels import triton_shl, triton_staged
from shl_kernels.fused import FusedSHL
from shl_kernels.reference import shl_loss_reference
from shl_kernels.triton_shl import shl_fused_triton

# Masked-out lanes compute inf - inf in numpy before tl.where drops them; the interpreter
# itself converts 1-element arrays to ints (a numpy deprecation).
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

F64 = torch.float64
DEV = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 16
EXTRAS = ("w", "eta", "delta", "ign")
# The two kernels: programs per window of segment positions (BLOCK 16), and per row with the
# row staged on chip (triton_staged.py; tiles of 4 segments x 8 lanes under the interpreter).
KERNELS = {"window": functools.partial(shl_fused_triton, block=BLOCK, staged=False),
           "staged": functools.partial(shl_fused_triton, staged=True)}


def _acc(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else torch.float32


def _problem(B: int, sizes: list[int], *, seed: int = 0, shuffle: bool = True,
             pos_p: float = 0.2, ign_p: float = 0.15, scale: float = 3.0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    C = sum(sizes)
    ids = torch.randperm(C, generator=gen).tolist() if shuffle else list(range(C))
    segs, at = [], 0
    for s in sizes:
        segs.append(ids[at:at + s])
        at += s
    return {"seg": shl.Segmentation.from_segments(segs, C),
            "z": torch.randn(B, C, generator=gen, dtype=F64) * scale,
            "pos": torch.rand(B, C, generator=gen) < pos_p,
            "ign": torch.rand(B, C, generator=gen) < ign_p,
            "w": torch.rand(C, generator=gen, dtype=F64) + 0.5,
            "eta": torch.randn(len(sizes), generator=gen, dtype=F64),
            "delta": torch.randn(C, generator=gen, dtype=F64) * 0.5}


def _inputs(p: dict, dtype: torch.dtype, extras=EXTRAS) -> dict:
    """What the kernel gets, on DEV: z in `dtype`, w/eta/delta in its accumulation dtype."""
    acc = _acc(dtype)
    return dict(z=p["z"].to(DEV, dtype), pos=p["pos"].to(DEV), seg=p["seg"],
                ign=p["ign"].to(DEV) if "ign" in extras else None,
                **{k: p[k].to(DEV, acc) if k in extras else None for k in ("w", "eta", "delta")})


def _upstream(reduction: str, B: int, dtype: torch.dtype) -> torch.Tensor:
    if reduction == "none":
        return torch.linspace(-1.5, 2.0, B, dtype=dtype, device=DEV)
    return torch.tensor(0.7, dtype=dtype, device=DEV)


def _grads(loss, x: dict, reduction: str):
    leaves = [t for t in (x["z"], x["eta"], x["delta"]) if t is not None]
    grads = torch.autograd.grad(loss, leaves, _upstream(reduction, x["z"].shape[0], loss.dtype))
    return [loss.detach()] + list(grads)


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def run_fused(x: dict, reduction: str, kernel=None, identity: bool = False, inplace=False):
    """Loss and grads (z, eta, delta) through FusedSHL with the Triton kernel (a KERNELS
    name or a function; default: the window kernel)."""
    kernel = KERNELS[kernel or "window"] if isinstance(kernel, str | None) else kernel
    x = dict(x, z=_leaf(x["z"]), eta=_leaf(x["eta"]), delta=_leaf(x["delta"]))
    ign = None if x["ign"] is None else x["ign"].to(torch.uint8)
    seg = x["seg"]
    loss = FusedSHL.apply(kernel, x["z"], x["pos"].to(torch.uint8), ign,
                          None if identity else seg.order.to(DEV), seg.offsets.to(DEV),
                          x["w"], x["eta"],
                          x["delta"], reduction)
    return _grads(loss, x, reduction)


def run_reference(x: dict, reduction: str, dtype: torch.dtype = F64):
    """The same through autograd on the reference, inputs cast to `dtype`."""
    x = dict(x, **{k: None if x[k] is None else _leaf(x[k].to(dtype))
                   for k in ("z", "eta", "delta", "w")})
    loss = shl_loss_reference(x["z"], x["pos"], x["seg"], x["w"], x["eta"], x["delta"],
                              x["ign"], reduction)
    return _grads(loss, x, reduction)


def assert_all_close(got, want, rtol, atol):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.to(F64), w.to(F64), rtol=rtol, atol=atol, equal_nan=True)


def assert_delta_close(got, want, rtol):
    """grad delta sums rounded z gradients over rows: bound the error by rtol * sum |g|."""
    bound = rtol * want[1].abs().sum(0) + 1e-7
    assert ((got[3].double() - want[3]).abs() <= bound).all()


SHAPES = {  # name: (B, segment sizes)
    "B1C1": (1, [1]),
    "odd": (3, [1, 1, 20, 3, 12]),
    "singletons": (4, [1] * 9),
    "big": (2, [70]),
    "mixed": (5, [17, 1, 33, 2, 16, 5]),
    # staged tiles, largest first: [30, 12, 11, 10] [9, 8, 3, 2] [1]: one just over the 8
    # lanes, one at most 8
    "tiles": (3, [12, 9, 30, 2, 11, 10, 1, 3, 8]),
}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fp64_matches_reference(shape, reduction, kernel):
    B, sizes = SHAPES[shape]
    x = _inputs(_problem(B, sizes, seed=len(sizes)), F64)
    assert_all_close(run_fused(x, reduction, kernel), run_reference(x, reduction), 1e-10,
                     1e-12)


@pytest.mark.parametrize("window", [0, 1, 9, 40, 10**6])
def test_schedules_agree(window):
    """Per-segment, windowed and per-row programs give the reference's answer."""
    x = _inputs(_problem(3, [17, 1, 33, 2, 16, 5], seed=7), F64)
    kernel = functools.partial(shl_fused_triton, block=BLOCK, window=window)
    assert_all_close(run_fused(x, "none", kernel), run_reference(x, "none"), 1e-10, 1e-12)


@pytest.mark.parametrize("block", [4, 32, 128])
def test_block_sizes(block):
    x = _inputs(_problem(2, [40, 3, 1, 9], seed=3), F64)
    kernel = functools.partial(shl_fused_triton, block=block)
    assert_all_close(run_fused(x, "mean", kernel), run_reference(x, "mean"), 1e-10, 1e-12)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("extras", [(), ("w",), ("eta", "ign"), ("delta",)])
def test_optional_inputs(extras, kernel):
    x = _inputs(_problem(3, [20, 4, 1], seed=5), F64, extras)
    assert_all_close(run_fused(x, "sum", kernel), run_reference(x, "sum"), 1e-10, 1e-12)


def test_identity_order_matches_explicit():
    x = _inputs(_problem(3, [18, 2, 1, 7], seed=11, shuffle=False), F64)
    assert torch.equal(x["seg"].order, torch.arange(28))
    ident = run_fused(x, "none", identity=True)
    assert_all_close(ident, run_fused(x, "none"), 0, 0)
    assert_all_close(ident, run_reference(x, "none"), 1e-10, 1e-12)


def _special_cases() -> dict:
    """Rows with: no positive; several / one / ignored positives; fully ignored segments;
    segments where every label is positive. Segment 0 (20 labels) takes the loop path."""
    p = _problem(5, [20, 3, 1, 5], seed=13, pos_p=0.0, ign_p=0.0)
    seg_labels = [p["seg"].order[a:b].tolist() for a, b in
                  zip(p["seg"].offsets[:-1].tolist(), p["seg"].offsets[1:].tolist())]
    pos, ign = p["pos"], p["ign"]
    s0, s1, s2, s3 = seg_labels
    pos[1, s0[:3]] = True            # several positives in the big segment (pass 2)
    ign[1, s1] = True                # fully ignored small segment
    pos[1, s2] = True
    pos[2, s0[5]] = True             # one positive in the big segment (no pass 2)
    pos[2, s1[0]] = ign[2, s1[0]] = True  # ignored positive = absent
    pos[2, s3] = True                # no negatives
    ign[3, s0] = True                # fully ignored big segment
    pos[3, s1[:2]] = True
    pos[4, s0] = True                # big segment, all positive
    ign[4, s0[::4]] = True
    pos[4, s3[0]] = ign[4, s3[1]] = True
    return p


@pytest.mark.parametrize("window", [0, 10**6, "staged"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_special_rows(reduction, window):
    x = _inputs(_special_cases(), F64)
    kernel = "staged" if window == "staged" else functools.partial(
        shl_fused_triton, block=BLOCK, window=window)
    got = run_fused(x, reduction, kernel)
    assert_all_close(got, run_reference(x, reduction), 1e-10, 1e-12)
    assert (got[1][x["ign"]] == 0).all()  # ignored: exactly zero gradient


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extreme_logits(dtype, kernel):
    p = _problem(4, [20, 3, 1, 6], seed=17)
    gen = torch.Generator().manual_seed(1)
    p["z"] = torch.where(torch.rand(p["z"].shape, generator=gen) < 0.5, 80.0, -80.0) \
        + torch.rand(p["z"].shape, generator=gen, dtype=F64) * 0.5
    x = _inputs(p, dtype)
    got = run_fused(x, "sum", kernel)
    assert all(torch.isfinite(g).all() for g in got)
    # fp16 gradients are rounded to fp16; the loss is computed in fp32 either way
    grad_tol = 1e-3 if dtype == torch.float16 else 1e-5
    want = run_reference(x, "sum")
    assert_all_close(got[:1] + got[2:3], want[:1] + want[2:3], 1e-5, 1e-4)  # loss, eta
    assert_all_close(got[1:2], want[1:2], grad_tol, 1e-6)
    assert_delta_close(got, want, grad_tol)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_huge_logits_with_several_positives(kernel):
    """Logits at scale 150 with many positives (with the positives in the shift, A and the
    lower positives' exp(u_p - M) underflowed together in fp32: loss -inf): single-load
    and loop paths, as the fp64 reference."""
    x = _inputs(_problem(3, [17, 1, 33, 2, 70, 5], seed=29, pos_p=0.3, scale=150.0),
                torch.float32)
    got = run_fused(x, "none", kernel)
    assert torch.isfinite(got[0]).all()
    want = run_reference(x, "none")
    assert_all_close(got[:1] + got[2:3], want[:1] + want[2:3], 1e-5, 1e-4)  # loss, eta
    assert_all_close(got[1:2], want[1:2], 1e-5, 1e-6)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_nan_and_inf_propagate(kernel):
    p = _problem(9, [20, 4, 1, 7], seed=19, pos_p=0.0, ign_p=0.0)
    off = p["seg"].offsets.tolist()
    s0, s1, s2, s3 = (p["seg"].order[off[k]:off[k + 1]].tolist() for k in range(4))
    z, pos, ign = p["z"], p["pos"], p["ign"]
    pos[:, s1[0]] = True
    z[0, s0[4]] = float("nan")           # negative, loop path, alone on its lane
    z[1, s1[0]] = float("inf")           # positive, single-load path
    pos[2, s2[0]] = True
    z[2, s2[0]] = float("nan")           # positive, singleton segment
    z[3, s0[7]] = float("nan")           # ignored: takes no part
    ign[3, s0[7]] = True
    z[4, s3[2]] = float("-inf")          # a -inf negative is just absent
    z[5, s0[9]] = float("inf")           # +inf negative, loop path
    pos[6, s0[2]] = True
    z[6, s0[2]] = float("nan")           # positive, loop path (single-positive shortcut)
    z[7, s0[16]] = float("nan")          # negative, second chunk, after a finite one on its lane
    z[8, s0[1]] = float("nan")           # negative, first chunk, before a finite one on its lane
    x = _inputs(p, torch.float32)
    loss, gz = run_fused(x, "none", kernel)[:2]
    bad = [0, 1, 2, 5, 6, 7, 8]
    assert torch.isnan(loss[bad]).all()
    assert gz[3, s0[7]] == 0
    clean = x["z"].clone()
    clean[3, s0[7]] = 0.0  # the reference's autograd would spread the ignored NaN
    want = run_reference(dict(x, z=clean), "none")
    good = [3, 4]
    torch.testing.assert_close(loss[good].double(), want[0][good], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gz[good].double(), want[1][good], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_fp32_no_worse_than_reference_fp32(kernel):
    x = _inputs(_problem(4, [30, 7, 1, 12, 2], seed=23, scale=5.0), torch.float32)
    got = run_fused(x, "none", kernel)
    exact = run_reference(x, "none", F64)
    ref32 = run_reference(x, "none", torch.float32)
    for g, e, r in zip(got, exact, ref32):
        err_k = (g.double() - e).abs().max().item()
        err_r = (r.double() - e).abs().max().item()
        # margin: on a GPU the kernel's fp32 exp/log are the fast ones (a few ulp)
        assert err_k <= 2 * err_r + 5e-6 * e.abs().max().item(), (err_k, err_r)


# Gradients are rounded twice: by the kernel's store and by FusedSHL's rescale with the
# upstream 0.7. The interpreter truncates fp32 -> bf16 (GPUs round to nearest), so bf16 gets
# two bf16 ulps; test_gpu.py checks the rounding on hardware.
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("dtype, grad_rtol", [(torch.bfloat16, 2**-6),
                                              (torch.float16, 2**-10 + 1e-5)])
def test_low_precision(dtype, grad_rtol, kernel):
    x = _inputs(_problem(4, [30, 7, 1, 12, 2], seed=29), dtype)
    got = run_fused(x, "mean", kernel)
    want = run_reference(x, "mean")  # fp64 on the same (upcast) inputs
    assert got[1].dtype == dtype
    assert_all_close(got[:1] + got[2:3], want[:1] + want[2:3], 1e-5, 1e-6)  # loss, eta
    assert_all_close(got[1:2], want[1:2], grad_rtol, 1e-7)
    assert_delta_close(got, want, grad_rtol)


def _direct(x: dict, scale: float = 0.25, grad_out=None, **kw):
    seg = x["seg"]
    return shl_fused_triton(x["z"], x["pos"].to(torch.uint8), x["ign"].to(torch.uint8),
                            seg.order.to(DEV), seg.offsets.to(DEV), x["w"], x["eta"], x["delta"],
                            scale, True,
                            grad_out, block=BLOCK, **kw)


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_poisoned_grad_out_fully_written(dtype, staged):
    x = _inputs(_problem(3, [20, 1, 4, 9], seed=31), dtype)
    fresh = _direct(x, staged=staged)
    poisoned = torch.full_like(x["z"], float("nan"))
    loss, grad, geta = _direct(x, grad_out=poisoned, staged=staged)
    assert grad is poisoned and not torch.isnan(grad).any()
    assert torch.equal(grad, fresh[1]) and torch.equal(loss, fresh[0])
    assert torch.equal(geta, fresh[2])


@pytest.mark.parametrize("window", [None, 0, 1, 9, 40, 10**6, "staged"])
def test_empty_segments_add_only_a_null_event(window, monkeypatch):
    """Empty segments (raw offsets only) at the start, in the middle and at the end (at C:
    no window holds them, the last one takes them) change nothing else, and their own eta
    gradient is exactly 0: every output allocated NaN-poisoned, so each must be written."""
    x = _inputs(_problem(3, [20, 1, 4, 9], seed=41), F64)
    kw = {"staged": True} if window == "staged" else {"window": window, "staged": False}
    base = _direct(x, **kw)
    offsets, eta, keep, empty = with_empty_segments(x["seg"].offsets, x["eta"], [0, 2, 4, 4])
    assert offsets[-2] == offsets[-1]  # two empty segments at the end
    seg = shl.Segmentation(x["seg"].num_labels, x["seg"].order, offsets, x["seg"].label_counts)
    empty_alloc = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty_alloc(*a, **k).fill_(
        float("nan") if (k.get("dtype") or torch.get_default_dtype()).is_floating_point else -1))
    loss, grad, geta = _direct(dict(x, seg=seg, eta=eta.to(DEV)), **kw)
    def rows(part):  # window 0: [B, m] partial losses, a program per segment
        return part.sum(1) if part.dim() == 2 else part

    for got, want in ((rows(loss), rows(base[0])), (grad, base[1]), (geta[:, keep], base[2])):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    assert torch.equal(geta[:, empty], torch.zeros(3, len(empty), dtype=F64, device=DEV))


@pytest.mark.parametrize("window", [0, 10**6, "staged"])
def test_inplace(window):
    x = _inputs(_problem(3, [20, 1, 4, 9], seed=37), torch.float32)
    kw = {"staged": True} if window == "staged" else {"window": window}
    fresh = _direct(x, **kw)
    z = x["z"].clone()
    loss, grad, geta = _direct(dict(x, z=z), grad_out=z, **kw)
    assert grad is z
    assert torch.equal(z, fresh[1]) and torch.equal(loss, fresh[0])
    assert torch.equal(geta, fresh[2])


def test_inplace_through_autograd():
    """FusedSHL(inplace=True) on a non-leaf: z is overwritten, the leaf's grad is right."""
    x = _inputs(_problem(3, [20, 1, 4, 9], seed=41), F64)
    base = x["z"].clone().requires_grad_()
    z = base * 1.0
    seg = x["seg"]
    loss = FusedSHL.apply(functools.partial(shl_fused_triton, block=BLOCK), z,
                          x["pos"].to(torch.uint8), x["ign"].to(torch.uint8),
                          seg.order.to(DEV), seg.offsets.to(DEV), x["w"], x["eta"],
                          x["delta"], "mean", True)
    loss.backward()
    want = run_reference(x, "mean")
    torch.testing.assert_close(loss.detach(), want[0], rtol=1e-10, atol=1e-12)
    upstream = _upstream("mean", 3, F64)
    torch.testing.assert_close(base.grad, want[1] / upstream, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_public_api(inplace, staged, monkeypatch):
    """segmented_harmonic_loss(backend="triton") with the launcher's default schedule/BLOCK,
    and with SHL_TRITON_STAGED's default (staged rows) turned on."""
    monkeypatch.setattr(triton_shl, "STAGED", staged)
    x = _inputs(_problem(3, [40, 1, 5, 12], seed=43), F64)
    out = {}
    for backend in ("torch", "triton"):
        z = x["z"].clone().requires_grad_()
        logits = z * 1.0 if inplace else z  # in place needs a non-leaf
        eta = x["eta"].clone().requires_grad_()
        loss = shl.segmented_harmonic_loss(
            logits, x["pos"], x["seg"], label_weights=x["w"], null_logits=eta,
            logit_offsets=x["delta"], ignore=x["ign"], reduction="sum", backend=backend,
            inplace=inplace and backend == "triton")
        out[backend] = [loss.detach(), *torch.autograd.grad(loss, (z, eta))]
    assert_all_close(out["triton"], out["torch"], 1e-10, 1e-12)


@pytest.mark.parametrize("per_sm", [1, 2, 100])
def test_staged_programs_loop_over_rows(per_sm, monkeypatch):
    """One program for every row, two for five, one per row: the same answer (the interpreter
    has one 'SM')."""
    monkeypatch.setattr(triton_staged, "PROGRAMS_PER_SM", per_sm)
    x = _inputs(_special_cases(), F64)
    got = run_fused(x, "none", "staged")
    assert_all_close(got, run_reference(x, "none"), 1e-10, 1e-12)


def test_staged_many_segments():
    """A wider row (300 labels in 40 segments of 1 to ~100): many staging chunks, tiles of
    mixed sizes, ignored labels and positives everywhere."""
    gen = torch.Generator().manual_seed(53)
    cuts = sorted(torch.randperm(298, generator=gen)[:39].add(1).tolist())
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, 300], strict=True)]
    x = _inputs(_problem(5, sizes, seed=53, pos_p=0.05), F64)
    assert_all_close(run_fused(x, "none", "staged"), run_reference(x, "none"), 1e-10, 1e-12)


@pytest.fixture
def chunked(monkeypatch):
    """Staged rows in chunks of 16 fp64 / 32 fp32 / 64 bf16 labels (rows larger than that
    take the multi-chunk staging)."""
    monkeypatch.setattr(triton_staged, "STAGED_MAX_BYTES", 128)
    monkeypatch.setattr(triton_staged, "MAX_CHUNKS", 100)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shape", ["odd", "big", "mixed", "tiles"])
def test_staged_in_chunks(shape, reduction, chunked):
    B, sizes = SHAPES[shape]
    x = _inputs(_problem(B, sizes, seed=len(sizes)), F64)
    assert triton_staged.plan(sum(sizes), 8)[1]  # several chunks
    assert_all_close(run_fused(x, reduction, "staged"), run_reference(x, reduction), 1e-10,
                     1e-12)


def test_staged_in_chunks_special_rows_and_nan(chunked):
    x = _inputs(_special_cases(), F64)
    got = run_fused(x, "none", "staged")
    assert_all_close(got, run_reference(x, "none"), 1e-10, 1e-12)
    assert (got[1][x["ign"]] == 0).all()
    test_nan_and_inf_propagate("staged")  # fp32: chunks of 32 labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_staged_in_chunks_in_place_and_poisoned(dtype, chunked):
    x = _inputs(_problem(3, [40, 1, 4, 25, 30], seed=59), dtype)
    assert triton_staged.plan(100, x["z"].element_size())[1]
    fresh = _direct(x, staged=True)
    poisoned = torch.full_like(x["z"], float("nan"))
    got = _direct(x, grad_out=poisoned, staged=True)
    assert not torch.isnan(poisoned).any()
    z = x["z"].clone()
    inplace = _direct(dict(x, z=z), grad_out=z, staged=True)
    for a, b, c in zip(fresh, got, inplace, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    want = run_reference(x, "none")
    torch.testing.assert_close(fresh[0].double() / 0.25, want[0], rtol=1e-5, atol=1e-5)


def test_staged_plan():
    assert triton_staged.plan(5, 4) == (8, False)
    assert triton_staged.plan(32768, 2) == (32768, False)
    assert triton_staged.plan(32769, 4) == (32768, True)  # 128 KB chunks of fp32
    assert triton_staged.plan(65536, 2) == (65536, False)
    assert triton_staged.plan(74000, 2) == (32768, True)  # all ICD-10-CM codes, bf16
    assert triton_staged.plan(4 * 32768 + 1, 4) is None  # more than MAX_CHUNKS


def test_staged_only_where_it_applies(monkeypatch):
    """Rows too large for the chip and labels already in segment order take the window
    kernel; shuffled rows that fit take the staged one."""
    calls = []
    real = triton_staged.launch_staged
    monkeypatch.setattr(triton_staged, "launch_staged",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    x = _inputs(_problem(3, [18, 2, 1, 7], seed=47), F64)
    want = run_reference(x, "none")
    assert_all_close(run_fused(x, "none", "staged"), want, 1e-10, 1e-12)
    assert len(calls) == 1
    ident = _inputs(_problem(3, [18, 2, 1, 7], seed=47, shuffle=False), F64)
    assert_all_close(run_fused(ident, "none", "staged", identity=True),
                     run_reference(ident, "none"), 1e-10, 1e-12)
    monkeypatch.setattr(triton_staged, "STAGED_MAX_BYTES", 8 * 16)  # 16 fp64 labels
    monkeypatch.setattr(triton_staged, "MAX_CHUNKS", 1)  # and no chunks
    assert_all_close(run_fused(x, "none", "staged"), want, 1e-10, 1e-12)
    assert len(calls) == 1


def test_default_schedule_follows_the_measured_rule(monkeypatch):
    """staged=None (the default): shuffled rows take the staged kernel where _staged_wins
    says so, else the window kernel; both give the reference's results."""
    calls = []
    real = triton_staged.launch_staged
    monkeypatch.setattr(triton_staged, "launch_staged",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(triton_shl, "STAGED", None)
    x = _inputs(_problem(3, [18, 2, 1, 7], seed=47), F64)
    want = run_reference(x, "none")
    for wins in (False, True):
        monkeypatch.setattr(triton_shl, "_staged_wins", lambda *a, wins=wins: wins)
        assert_all_close(run_fused(x, "none", shl_fused_triton), want, 1e-10, 1e-12)
        assert len(calls) == wins
    monkeypatch.setattr(triton_shl, "STAGED", False)  # SHL_TRITON_STAGED=0 overrides the rule
    assert_all_close(run_fused(x, "none", shl_fused_triton), want, 1e-10, 1e-12)
    assert len(calls) == 1


def test_staged_rule_is_the_measured_one():
    """Staged where the H100 measured it faster (16-bit rows of >= 16384 labels in one piece,
    a row per SM at least), not where it measured slower or even, nor where unmeasured."""
    wins = triton_shl._staged_wins
    assert wins(4096, 32768, 2, False, 132) and wins(132, 32768, 2, False, 132)
    assert wins(4096, 16384, 2, False, 132)
    assert not wins(64, 32768, 2, False, 132)  # fewer rows than SMs
    assert not wins(4096, 12000, 2, False, 132) and not wins(16, 8192, 2, False, 132)
    assert not wins(1024, 74000, 2, True, 132)  # in chunks: even
    assert not wins(4096, 32768, 4, False, 132)  # fp32: not measured


@pytest.mark.parametrize("how", ["window", "segments", "rows", "staged", "torch sums"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_reduce_sums_rows(how, dtype, monkeypatch):
    """reduce=True (what FusedSHL asks for "mean"/"sum"): the loss summed over rows (0-dim)
    and geta summed over rows ([m]) equal the sums of the unreduced outputs, the gradient is
    the same. Small grids sum in the launch (here more partial losses and segments than the
    program's lanes, so its loops run twice), leaving the ticket counter at 0; the staged
    kernel and larger grids ("torch sums") sum with torch."""
    summed = []
    real = triton_shl._summed
    monkeypatch.setattr(triton_shl, "_summed", lambda *a: summed.append(a[-1]) or real(*a))
    if how == "torch sums":
        monkeypatch.setattr(triton_shl, "REDUCE_MAX", 8)
    kw = {"window": {"segments": 0, "rows": 10**6}.get(how, 8), "staged": how == "staged"}
    x = _inputs(_problem(5, [3, 1, 2] * 6, seed=51), dtype)  # 18 segments > BLOCK lanes
    for eta in (x["eta"], None):
        y = dict(x, eta=eta)
        want = _direct(y, **kw)
        got = _direct(y, reduce=True, **kw)
        rtol, atol = (1e-12, 1e-14) if dtype == F64 else (1e-5, 1e-6)
        assert got[0].dim() == 0
        torch.testing.assert_close(got[0], want[0].sum(), rtol=rtol, atol=atol)
        assert torch.equal(got[1], want[1])
        if eta is None:
            assert got[2] is None
        else:
            assert got[2].shape == (18,)
            torch.testing.assert_close(got[2], want[2].sum(0), rtol=rtol, atol=atol)
    on_device = how in ("window", "segments", "rows")
    assert summed.count(True) == (0 if on_device else 2)
    assert all(int(c) == 0 for c in triton_shl._COUNTERS.values())


def test_empty_batch():
    x = _inputs(_problem(1, [3, 2]), torch.float32)
    x["z"], x["pos"], x["ign"] = x["z"][:0], x["pos"][:0], x["ign"][:0]
    loss, grad, geta = _direct(x)
    assert loss.shape == (0,) and grad.shape == (0, 5) and geta.shape == (0, 2)


def test_bad_input():
    x = _inputs(_problem(2, [3, 2]), torch.float32)
    with pytest.raises(TypeError, match="z"):
        _direct(dict(x, z=x["z"].to(torch.int32)))
    with pytest.raises(ValueError, match="pos"):
        _direct(dict(x, pos=x["pos"][:, :4]))
    with pytest.raises(ValueError, match="eta"):
        _direct(dict(x, eta=x["eta"][:1]))
    with pytest.raises(ValueError, match="grad_out"):
        _direct(x, grad_out=torch.empty(2, 5, dtype=F64, device=DEV))


_AOT = textwrap.dedent("""
    import sys
    sys.path.insert(0, "benchmarks")
    from triton_resources import BYTES, staged_kernel, window_kernel
    from shl_kernels.triton_shl import _CONFIGS
    from shl_kernels.triton_staged import _CONFIGS as STAGED_CONFIGS, plan

    for zt, has, seg_mode, cfg in [("bf16", True, False, _CONFIGS[-1]),
                                   ("fp32", False, True, _CONFIGS[0]),
                                   ("fp64", True, True, _CONFIGS[3]),
                                   ("fp16", False, False, _CONFIGS[1])]:
        assert window_kernel(zt, has, seg_mode, cfg).asm["cubin"]
        assert window_kernel(zt, has, seg_mode, cfg, reduce=True).asm["cubin"]
    for zt, has, cfg, C in [("bf16", True, STAGED_CONFIGS[0], 32768),
                            ("fp16", True, STAGED_CONFIGS[1], 40000),
                            ("fp32", False, STAGED_CONFIGS[2], 8922),
                            ("fp64", True, STAGED_CONFIGS[3], 1000),
                            ("bf16", True, STAGED_CONFIGS[2], 74000),  # in chunks
                            ("fp32", False, STAGED_CONFIGS[0], 40000)]:  # in chunks
        kernel = staged_kernel(zt, has, cfg, C)
        assert kernel.asm["cubin"]
        # the gather's shared memory holds the padded row, or a chunk of it
        assert kernel.metadata.shared >= plan(C, BYTES[zt])[0] * BYTES[zt]
    print("compiled")
""")


def test_compiles_for_h100(compile_sm90):
    """The interpreter checks no types: compile real sm_90 code."""
    compile_sm90(_AOT)
