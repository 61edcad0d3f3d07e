"""Fused kernels (Triton, and CUDA when built) on a GPU at training shapes against the
PyTorch reference; everything here is skipped without CUDA."""
from __future__ import annotations

import functools
import itertools

import pytest
import torch

import shl_kernels as shl
from shl_kernels.backends import resolve
from shl_kernels.fused import FusedSHL
from shl_kernels.reference import shl_loss_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEV = "cuda"
F64 = torch.float64


def _triton():
    from shl_kernels.triton_shl import shl_fused_triton
    return functools.partial(shl_fused_triton, staged=False)


def _triton_staged():
    """Shuffled labels with rows staged on chip (triton_staged.py); segment order and rows
    too large take the window kernel."""
    from shl_kernels.triton_shl import shl_fused_triton
    return functools.partial(shl_fused_triton, staged=True)


def _cuda():
    mod = pytest.importorskip("shl_kernels.kernels_cuda")
    if not hasattr(mod, "shl_fused_cuda"):
        pytest.skip("shl_kernels.kernels_cuda has no shl_fused_cuda")
    ok, why = mod.cuda_available()
    if not ok:
        pytest.skip(why)
    return mod.shl_fused_cuda


@pytest.fixture(params=["triton", "triton_staged", "cuda"])
def kernel(request):
    return {"triton": _triton, "triton_staged": _triton_staged, "cuda": _cuda}[request.param]()


def _sizes(C: int, m: int, gen: torch.Generator) -> list[int]:
    """One segment of C/3 labels, ten singletons, the rest cut at random: 1 to >10k labels."""
    big, rest = C // 3, C - C // 3 - 10
    cuts = (torch.randperm(rest - 1, generator=gen)[:m - 12] + 1).sort().values.tolist()
    edges = [0, *cuts, rest]
    return [big] + [1] * 10 + [b - a for a, b in itertools.pairwise(edges)]


def _problem(B: int, C: int, m: int, dtype: torch.dtype, *, seed: int = 0,
             identity: bool = False, scale: float = 3.0, pos_p: float = 0.002,
             ign_p: float = 0.01) -> dict:
    gen = torch.Generator().manual_seed(seed)
    sizes = _sizes(C, m, gen)
    labels = list(range(C)) if identity else torch.randperm(C, generator=gen).tolist()
    segs, at = [], 0
    for s in sizes:
        segs.append(labels[at:at + s])
        at += s
    seg = shl.Segmentation.from_segments(segs, C)
    g = torch.Generator(device=DEV).manual_seed(seed)
    acc = F64 if dtype == F64 else torch.float32
    pos = torch.rand(B, C, generator=g, device=DEV) < pos_p
    pos[::2, seg.order[:50].to(DEV)] = True  # several positives in the big segment (pass 2)
    return {"seg": seg, "order": None if identity else seg.order.to(DEV),
            "offsets": seg.offsets.to(DEV),
            "z": (torch.randn(B, C, generator=g, device=DEV, dtype=F64) * scale).to(dtype),
            "pos": pos, "ign": torch.rand(B, C, generator=g, device=DEV) < ign_p,
            "w": (torch.rand(C, generator=g, device=DEV, dtype=F64) + 0.5).to(acc),
            "eta": torch.randn(m, generator=g, device=DEV, dtype=F64).to(acc),
            "delta": (torch.randn(C, generator=g, device=DEV, dtype=F64) * 0.5).to(acc)}


def _call(kernel, x: dict, grad_scale: float, grad_out=None):
    """(row losses, grad, grad_eta rows): the kernel's loss comes times grad_scale, possibly
    as [B, n] partial sums (FusedKernel); here it is turned back into plain row losses."""
    loss, grad, geta = kernel(x["z"], x["pos"].view(torch.uint8), x["ign"].view(torch.uint8),
                              x["order"], x["offsets"], x["w"], x["eta"], x["delta"],
                              grad_scale, True, grad_out)
    return (loss if loss.dim() == 1 else loss.sum(1)) / grad_scale, grad, geta


def _reference_rows(x: dict, rows: torch.Tensor, dtype: torch.dtype = F64):
    """Reference loss rows, d(sum of rows)/dz and d/d eta on a subset of rows."""
    z = x["z"][rows].to(dtype).requires_grad_()
    eta = x["eta"].to(dtype).requires_grad_()
    loss = shl_loss_reference(z, x["pos"][rows], x["seg"], x["w"].to(dtype), eta,
                              x["delta"].to(dtype), x["ign"][rows], "none")
    gz, geta = torch.autograd.grad(loss.sum(), (z, eta))
    return loss.detach(), gz, geta


def _check_rows(kernel, x: dict, rows, loss_rtol: float, grad_rtol: float,
                grad_atol: float = 1e-12):
    """Kernel with grad_scale 1/B (B a power of two, so rescaling is exact) vs reference;
    grad_out starts as NaN so that any element left unwritten shows."""
    B = x["z"].shape[0]
    loss, grad, geta = _call(kernel, x, 1.0 / B, torch.full_like(x["z"], float("nan")))
    rl, rg, reta = _reference_rows(x, rows)
    torch.testing.assert_close(loss[rows].double(), rl, rtol=loss_rtol, atol=loss_rtol)
    torch.testing.assert_close(grad[rows].double() * B, rg, rtol=grad_rtol, atol=grad_atol * B)
    torch.testing.assert_close(geta[rows].sum(0).double() * B, reta, rtol=loss_rtol,
                               atol=loss_rtol * len(rows))
    assert grad.dtype == x["z"].dtype and not grad.isnan().any()


@pytest.mark.parametrize("B", [64, 4096])
def test_bf16_large(kernel, B):
    x = _problem(B, 32768, 100, torch.bfloat16, seed=B)
    # bf16 round-to-nearest of an fp32 value: 2^-9 relative, 2^-8 leaves room for fp32 error
    _check_rows(kernel, x, torch.arange(0, B, max(1, B // 256), device=DEV), 1e-5, 2**-8)


def test_odd_label_count(kernel):
    """C = 8922 (MIMIC-III's full code set): rows that are no multiple of a vector, padded to
    16384 when staged."""
    x = _problem(512, 8922, 300, torch.bfloat16, seed=11)
    _check_rows(kernel, x, torch.arange(0, 512, 3, device=DEV), 1e-5, 2**-8)


@pytest.mark.parametrize("C, dtype", [(74000, torch.bfloat16), (40000, torch.float32)])
def test_rows_beyond_one_staged_chunk(kernel, C, dtype):
    """All ICD-10-CM codes in bf16, 40000 labels in fp32: the staged Triton kernel takes
    these rows in chunks."""
    x = _problem(64, C, 300, dtype, seed=12)
    _check_rows(kernel, x, torch.arange(0, 64, 3, device=DEV), 1e-5,
                2**-8 if dtype == torch.bfloat16 else 1e-5)


def test_fp32_no_worse_than_reference_fp32(kernel):
    x = _problem(64, 32768, 100, torch.float32, seed=1, scale=5.0)
    rows = torch.arange(64, device=DEV)
    loss, grad, geta = _call(kernel, x, 1.0)
    exact = _reference_rows(x, rows)
    ref32 = _reference_rows(x, rows, torch.float32)
    for got, e, r in zip((loss, grad, geta.sum(0)), exact, ref32, strict=True):
        err_k = (got.double() - e).abs().max().item()
        err_r = (r.double() - e).abs().max().item()
        # the kernel's exp/log are the GPU's fast fp32 ones (~2 ulp, plus x*log2(e) rounding)
        assert err_k <= 2 * err_r + 5e-6 * e.abs().max().item(), (err_k, err_r)


def test_fp64_through_autograd(kernel):
    x = _problem(64, 8192, 50, F64, seed=2)
    leaves = [x["z"].clone().requires_grad_(), x["eta"].clone().requires_grad_(),
              x["delta"].clone().requires_grad_()]
    loss = FusedSHL.apply(kernel, leaves[0], x["pos"].view(torch.uint8),
                          x["ign"].view(torch.uint8), x["order"], x["offsets"], x["w"],
                          leaves[1], leaves[2], "sum")
    got = [loss.detach(), *torch.autograd.grad(loss, leaves)]
    refs = [t.clone().requires_grad_() for t in (x["z"], x["eta"], x["delta"])]
    ref = shl_loss_reference(refs[0], x["pos"], x["seg"], x["w"], refs[1], refs[2], x["ign"],
                             "sum")
    want = [ref.detach(), *torch.autograd.grad(ref, refs)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_fp16_extreme_logits(kernel):
    x = _problem(256, 4096, 40, torch.float16, seed=3)
    sign = torch.where(torch.rand(x["z"].shape, device=DEV) < 0.5, 80.0, -80.0)
    x["z"] = (sign + torch.rand(x["z"].shape, device=DEV) * 0.5).half()
    loss, grad, geta = _call(kernel, x, 1.0)
    assert loss.isfinite().all() and grad.isfinite().all() and geta.isfinite().all()
    # fp16 subnormals are 2^-24 apart
    _check_rows(kernel, x, torch.arange(256, device=DEV), 1e-5, 2**-10, 2**-24)


def test_nan_and_inf_propagate(kernel):
    x = _problem(6, 32768, 100, torch.float32, seed=4, pos_p=0.0, ign_p=0.0)
    seg = x["seg"]
    big, single = seg.order[:100].tolist(), seg.order[seg.offsets[1]].item()  # a singleton
    x["pos"][:] = False
    z, pos, ign = x["z"], x["pos"], x["ign"]
    z[0, big[60]] = float("nan")                  # negative in the big segment
    z[1, big[3]] = float("inf")                   # +inf negative
    pos[2, big[7]] = True
    z[2, big[7]] = float("nan")                   # the only positive of the big segment
    pos[3, single] = True
    z[3, single] = float("inf")                   # +inf positive in a small segment
    ign[4, big[9]] = True
    z[4, big[9]] = float("nan")                   # ignored: takes no part
    z[5, big[11]] = float("-inf")                 # a -inf negative is just absent
    loss, grad, _ = _call(kernel, x, 1.0)
    assert loss[:4].isnan().all()
    assert grad[4, big[9]] == 0
    z[4, big[9]] = 0.0  # the reference's autograd would spread the ignored NaN
    rl, rg, _ = _reference_rows(x, torch.tensor([4, 5], device=DEV))
    torch.testing.assert_close(loss[4:].double(), rl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[4:].double(), rg, rtol=1e-5, atol=1e-7)


def test_identity_order_matches_explicit(kernel):
    x = _problem(512, 16384, 80, torch.float32, seed=5, identity=True)
    ident = _call(kernel, x, 0.5)
    explicit = _call(kernel, dict(x, order=torch.arange(16384, device=DEV)), 0.5)
    for a, b in zip(ident, explicit, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    _check_rows(kernel, x, torch.arange(0, 512, 4, device=DEV), 1e-5, 1e-5)


def test_inplace_zero_extra_memory(kernel):
    B, C, m = 4096, 32768, 100
    x = _problem(B, C, m, torch.bfloat16, seed=6)
    want = _call(kernel, x, 1.0 / B)
    z = x["z"].clone()
    _call(kernel, dict(x, z=z), 1.0 / B, grad_out=z)  # compile / autotune outside the count
    z.copy_(x["z"])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss, grad, _ = _call(kernel, dict(x, z=z), 1.0 / B, grad_out=z)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    # only [B]- and [B, m]-sized outputs and partial sums: no [B, C] buffer
    assert extra <= 4 * B * (m + 1) * 4 + 2**20, extra
    assert grad is z
    torch.testing.assert_close(z, want[1], rtol=2**-7, atol=1e-12)
    torch.testing.assert_close(loss, want[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window", [0, 512, 1 << 30])
def test_triton_schedules(window):
    from shl_kernels.triton_shl import shl_fused_triton

    def k(*a):
        return shl_fused_triton(*a, window=window)

    x = _problem(256, 32768, 100, torch.bfloat16, seed=7)
    _check_rows(k, x, torch.arange(0, 256, 2, device=DEV), 1e-5, 2**-8)


@pytest.mark.parametrize("staged", [False, True])
def test_triton_autotune_inplace_restores_logits(staged):
    """The first in-place call autotunes, i.e. runs the kernel several times on the same
    buffer: the autotuner must restore z between runs."""
    from shl_kernels.triton_shl import shl_fused_triton
    kernel = functools.partial(shl_fused_triton, staged=staged)
    x = _problem(1000, 20000, 60, torch.float32, seed=8)
    want = _call(kernel, x, 1e-3)
    z = x["z"].clone()
    got = _call(kernel, dict(x, z=z), 1e-3, grad_out=z)
    # the in-place autotuner may pick another BLOCK: same maths, other summation order
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_public_api_triton():
    assert resolve("auto", torch.device(DEV)) == "triton"
    x = _problem(128, 16384, 80, torch.float32, seed=9)
    seg, B = x["seg"], 128
    go = torch.randn(B, device=DEV)
    out = {}
    for backend in ("torch", "triton"):
        z = x["z"].clone().requires_grad_()
        eta = x["eta"].clone().requires_grad_()
        loss = shl.segmented_harmonic_loss(z, x["pos"], seg, label_weights=x["w"],
                                           null_logits=eta, logit_offsets=x["delta"],
                                           ignore=x["ign"], reduction="none", backend=backend)
        out[backend] = [loss.detach(), *torch.autograd.grad(loss, (z, eta), go)]
    for a, b in zip(out["triton"], out["torch"], strict=True):  # both in fp32
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_public_api_triton_inplace():
    B, C, m = 2048, 32768, 100
    x = _problem(B, C, m, torch.bfloat16, seed=10)
    eta = x["eta"].clone().requires_grad_()

    def run(z):
        return shl.segmented_harmonic_loss(z, x["pos"], x["seg"], label_weights=x["w"],
                                           null_logits=eta, ignore=x["ign"], backend="triton",
                                           inplace=True)

    want_loss = shl.segmented_harmonic_loss(x["z"].float(), x["pos"], x["seg"],
                                            label_weights=x["w"], null_logits=eta,
                                            ignore=x["ign"], backend="torch")
    run(x["z"].clone())  # compile / autotune outside the count
    z = x["z"].clone()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = run(z)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= 4 * B * (m + 1) * 4 + 2**20, extra
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    (geta,) = torch.autograd.grad(loss, eta)
    (want_geta,) = torch.autograd.grad(want_loss, eta)
    torch.testing.assert_close(geta, want_geta, rtol=1e-4, atol=1e-6)


def test_stream_handle_is_the_current_stream():
    """The raw stream getter used by the native launches agrees with torch.cuda's streams."""
    from shl_kernels.fused import stream_handle
    dev = torch.device(DEV, torch.cuda.current_device())
    assert stream_handle(dev) == torch.cuda.current_stream(dev).cuda_stream
    side = torch.cuda.Stream(dev)
    with torch.cuda.stream(side):
        assert stream_handle(dev) == side.cuda_stream != torch.cuda.default_stream(dev).cuda_stream


@pytest.mark.parametrize("counter_first", [True, False], ids=["device-sums", "torch-sums"])
def test_triton_sums_in_a_cuda_graph(counter_first):
    """The Triton loss with reduce=True (what FusedSHL asks) captured in a CUDA graph
    replays to the eager results. On a stream that has launched before, its device-side sums
    are captured (their counter exists); on a fresh one they are not made inside the capture
    (their zeroing would not run until replay): torch sums are captured instead."""
    from shl_kernels.triton_shl import shl_fused_triton
    x = _problem(16, 8192, 64, torch.float32, seed=14)

    def run():  # (loss summed over rows, grad, grad_eta summed over rows)
        return shl_fused_triton(x["z"], x["pos"].view(torch.uint8), x["ign"].view(torch.uint8),
                                x["order"], x["offsets"], x["w"], x["eta"], x["delta"],
                                1 / 16, True, staged=False, reduce=True)

    want = run()  # also autotunes, outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    if counter_first:
        with torch.cuda.stream(stream):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        got = run()
    for _ in range(3):  # the counter is back at 0 after each replay
        graph.replay()
        torch.cuda.synchronize()
        assert got[0].dim() == 0 and got[2].shape == (64,)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_float_targets_to_masks_on_the_gpu():
    # masks.float_mask on CUDA tensors (the extension's kernel when built, else torch ops):
    # the masks of bool targets for every float dtype, and the 0/1 check through the flag.
    from test_masks import BAD, FLOATS, binary, expected

    from shl_kernels import masks

    for dtype, shape in itertools.product(FLOATS, [(0, 3), (5, 7), (64, 70001)]):
        t = binary(shape, dtype, seed=shape[1]).to(DEV)
        got = masks.float_mask(t, "targets")
        if got is None:
            pytest.skip("this build of shl_kernels._C has no CUDA mask conversion")
        assert torch.equal(got, expected(t)[0])
        for value in BAD:
            if not t.numel():
                continue
            bad = t.clone()
            bad.view(-1)[t.numel() // 3] = value
            if expected(bad)[1]:
                with pytest.raises(ValueError, match="^targets: dense targets must hold only"):
                    masks.float_mask(bad, "targets")


def test_csr_targets_on_the_gpu():
    # CSR on CUDA tensors (the extension's kernel where it has the CUDA build, else
    # Triton's): the dense mask of the row oracle, and every error in its priority.
    # (tests/test_csr_targets.py runs Triton's against the CPU one on the GPU too.)
    from test_csr_targets import random_csr

    from shl_kernels.loss import _status
    from shl_kernels.masks import _csr_converter

    assert _csr_converter("cuda") is not None
    for dtype, (B, C) in ((torch.int32, (300, 2000)), (torch.int64, (4097, 7))):
        (indptr, indices), want = random_csr(B, C, seed=7, dtype=dtype, max_per_row=min(C, 6))
        got = _status((indptr.to(DEV), indices.to(DEV)), B, C, "targets", torch.device(DEV))
        assert torch.equal(got.cpu(), want)
    for ptr, ids, match in (([0, 2], [5, 5], "duplicate label ids in a row"),
                            ([0, 2], [5, 9], r"label ids must be in \[0, 9\), got \[5, 9\]"),
                            ([0, 3], [1, 2], "CSR indptr must start at 0"),
                            ([1, 2], [1, 2], "CSR indptr must start at 0")):
        with pytest.raises(ValueError, match=f"^targets: {match}"):
            _status((torch.tensor(ptr, device=DEV), torch.tensor(ids, device=DEV)), 1, 9,
                    "targets", torch.device(DEV))


@pytest.mark.parametrize("loss", ["shl", "bce"])
def test_triton_direct_launches_match_tritons_own(monkeypatch, loss):
    """triton_launch.DirectLaunch: after Triton's first launch per key, later ones go to the
    compiled kernel's launcher. Same results as Triton's own launch path (the same binary);
    a logits view off 16-byte alignment gets its own binary (Triton specializes on it)."""
    from shl_kernels import triton_elementwise, triton_launch, triton_shl

    direct = triton_shl._launch.direct if loss == "shl" else triton_elementwise._launch
    fast = []
    stream = triton_launch.stream_handle
    monkeypatch.setattr(triton_launch, "stream_handle", lambda d: fast.append(d) or stream(d))
    x = _problem(16, 8192, 64, torch.float32, seed=21)

    def run(z):
        z = z.detach().requires_grad_()
        if loss == "shl":
            out = shl.segmented_harmonic_loss(z, x["pos"], x["seg"], label_weights=x["w"],
                                              ignore=x["ign"], backend="triton")
        else:
            out = shl.bce_loss(z, x["pos"], ignore=x["ign"], backend="triton")
        out.backward()
        return out.detach(), z.grad

    monkeypatch.setattr(direct, "native", False)  # Triton's own launch path
    want = run(x["z"])
    assert not fast
    monkeypatch.setattr(direct, "native", True)
    for _ in range(3):
        got = run(x["z"])
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fast, "no direct launch"
    n_kernels, n_fast = len(direct.kernels), len(fast)
    unaligned = torch.empty(x["z"].numel() + 1, device=DEV)[1:].view_as(x["z"])
    unaligned.copy_(x["z"])
    assert unaligned.data_ptr() % 16 != 0
    for _ in range(2):
        got = run(unaligned)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert len(direct.kernels) == n_kernels + 1 and len(fast) == n_fast + 1
