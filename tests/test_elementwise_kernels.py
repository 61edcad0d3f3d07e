"""Fused elementwise kernels (cpu, triton, cuda) against the PyTorch references."""
import os

import pytest
import torch

import shl_kernels as shl
from shl_kernels.kernels_elementwise import (
    KINDS,
    ElemSpec,
    elementwise_cpu,
    elementwise_cuda,
    elementwise_triton,
    why_unavailable_elementwise,
)

HAS_CUDA = torch.cuda.is_available()


def _skip_unless(backend):
    why = why_unavailable_elementwise(backend)
    return pytest.mark.skipif(why is not None, reason=f"{backend}: {why}")


BACKENDS = [pytest.param("cpu", marks=_skip_unless("cpu")),
            pytest.param("triton", marks=_skip_unless("triton")),
            pytest.param("cuda", marks=_skip_unless("cuda"))]
KERNELS = {"cpu": elementwise_cpu, "triton": elementwise_triton, "cuda": elementwise_cuda}


def _device(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"


def _shapes(backend):
    # The Triton interpreter is slow on CPU: small shapes only there.
    if backend == "triton" and not HAS_CUDA:
        return [(8, 37), (3, 1)]
    return [(7, 37), (3, 1), (5, 601), (1, 1030)]


LOSSES = {
    "bce": (shl.bce_loss, {}),
    "bce_weighted": (shl.bce_loss, {"weight": "w", "pos_weight": "pw"}),
    "focal": (shl.focal_loss, {}),
    "focal_noalpha_g0": (shl.focal_loss, {"alpha": -1.0, "gamma": 0.0}),
    "focal_g05": (shl.focal_loss, {"alpha": 0.6, "gamma": 0.5}),
    "asl": (shl.asymmetric_loss, {}),
    "asl_detach": (shl.asymmetric_loss, {"detach_focal_weight": True}),
    "asl_noclip": (shl.asymmetric_loss, {"clip": 0.0, "gamma_pos": 0.0, "gamma_neg": 2.0}),
    # Every variant of the CPU kernel: integer exponents (0..15: by multiplication) or not,
    # clip > 0 or 0, exponent 0 and 1, eps clamps. Exponents in (0, 1) are left out (see
    # test_asl_exponents_below_one): the torch formula's 1 - p_t is 0 for saturated pairs,
    # where d pow(0, g)/dx = inf gives it a NaN gradient.
    "focal_g3": (shl.focal_loss, {"gamma": 3.0}),
    "focal_g15": (shl.focal_loss, {"alpha": -1.0, "gamma": 15.0}),
    "focal_g16": (shl.focal_loss, {"gamma": 16.0}),
    "asl_int": (shl.asymmetric_loss, {"gamma_pos": 2.0, "gamma_neg": 3.0, "clip": 0.1}),
    "asl_int_noclip": (shl.asymmetric_loss, {"gamma_pos": 1.0, "gamma_neg": 4.0, "clip": 0.0,
                                             "detach_focal_weight": True}),
    "asl_int15": (shl.asymmetric_loss, {"gamma_pos": 7.0, "gamma_neg": 15.0, "clip": 0.0}),
    "asl_g0": (shl.asymmetric_loss, {"gamma_pos": 0.0, "gamma_neg": 0.0, "clip": 0.05}),
    "asl_gn1": (shl.asymmetric_loss, {"gamma_pos": 0.0, "gamma_neg": 1.0, "clip": 0.05}),
    "asl_frac": (shl.asymmetric_loss, {"gamma_pos": 1.5, "gamma_neg": 3.5, "clip": 0.05}),
    "asl_frac_detach": (shl.asymmetric_loss, {"gamma_pos": 1.5, "gamma_neg": 2.5, "clip": 0.3,
                                              "detach_focal_weight": True}),
    "asl_frac_noclip": (shl.asymmetric_loss, {"gamma_pos": 1.5, "gamma_neg": 2.5, "clip": 0.0}),
    "asl_g16": (shl.asymmetric_loss, {"gamma_pos": 3.0, "gamma_neg": 16.0, "clip": 0.2}),
    "asl_eps": (shl.asymmetric_loss, {"eps": 0.05}),
    "asl_eps_frac_noclip": (shl.asymmetric_loss, {"eps": 0.05, "clip": 0.0, "gamma_pos": 1.5,
                                                  "gamma_neg": 2.5}),
    "cb_bce": (shl.class_balanced_loss, {"counts": True, "beta": 0.99}),
    "cb_focal": (shl.class_balanced_loss, {"counts": True, "beta": 0.999, "loss": "focal"}),
}


def _inputs(B, C, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, C, generator=g, dtype=torch.float64) * 25).clamp(-80, 80)
    z.view(-1)[:: 7] = 80.0  # saturated pairs, both signs, on both targets
    z.view(-1)[3:: 11] = -80.0
    y = torch.rand(B, C, generator=g) < 0.3
    ign = torch.rand(B, C, generator=g) < 0.15
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.1
    pw = torch.rand(C, generator=g, dtype=torch.float64) * 3 + 0.1
    counts = torch.randint(0, 500, (C,), generator=g)
    go = torch.randn(B, C, generator=g, dtype=torch.float64)
    return (z.to(device, dtype), y.to(device), ign.to(device), w.to(device), pw.to(device),
            counts, go.to(device, dtype))


def _call(name, z, y, ign, w, pw, counts, reduction, backend):
    fn, kw = LOSSES[name]
    kw = dict(kw)
    if kw.pop("counts", False):
        return fn(z, y, counts, ignore=ign, reduction=reduction, backend=backend, **kw)
    for k, v in list(kw.items()):
        if v in ("w", "pw"):
            kw[k] = w if v == "w" else pw
    return fn(z, y, ignore=ign, reduction=reduction, backend=backend, **kw)


def at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of t whose data starts `offset` elements into its storage (unaligned), on t's
    device."""
    out = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)[offset:]
    return out.view(t.shape).copy_(t)


def _tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]


def _close(out, ref, dtype):
    t = _tol(dtype)
    out, ref = out.double(), ref.double()
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    torch.testing.assert_close(out, ref, rtol=t, atol=t * scale, equal_nan=True)


def _run(name, z0, y, ign, w, pw, counts, go, reduction, backend):
    z = z0.detach().clone().requires_grad_()
    loss = _call(name, z, y, ign, w, pw, counts, reduction, backend)
    if reduction == "none":
        (loss * go).sum().backward()
    else:
        (loss * 1.7).backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_matches_torch(backend, dtype, name, reduction):
    dev = _device(backend)
    for seed, (B, C) in enumerate(_shapes(backend)):
        z, y, ign, w, pw, counts, go = _inputs(B, C, dtype, dev, seed)
        for ig in (None, ign):
            ref_l, ref_g = _run(name, z, y, ig, w, pw, counts, go, reduction, "torch")
            out_l, out_g = _run(name, z, y, ig, w, pw, counts, go, reduction, backend)
            assert out_l.dtype == ref_l.dtype == dtype and out_l.shape == ref_l.shape
            _close(out_l, ref_l, dtype)
            _close(out_g, ref_g, dtype)
            if ig is not None:
                assert bool((out_g[ig] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [1, 3])
def test_unaligned_logits_and_targets(backend, dtype, offset):
    """Logits and targets starting a few elements into their storage (views of a larger
    buffer: a model's output sliced): the GPU kernels' 16-byte packs need aligned arrays and
    must fall back, not fault or misread."""
    dev = _device(backend)
    B, C = (4, 37) if backend == "triton" and not HAS_CUDA else (6, 1029)
    z, y, ign, w, pw, counts, _ = _inputs(B, C, dtype, dev, 5)
    z1, y1, ign1 = (at_offset(t, offset) for t in (z, y, ign))
    assert z1.data_ptr() % 16 and y1.data_ptr() % 4
    ref = _run("bce", z, y, ign, w, pw, counts, None, "sum", "torch")
    out = _run("bce", z1, y1, ign1, w, pw, counts, None, "sum", backend)
    for got, want in zip(out, ref, strict=True):
        _close(got, want, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", [{"gamma_pos": 0.5, "gamma_neg": 1.5, "clip": 0.05},
                                {"gamma_pos": 0.25, "gamma_neg": 0.5, "clip": 0.0},
                                {"gamma_pos": 0.5, "gamma_neg": 0.75, "clip": 0.0,
                                 "detach_focal_weight": True}],
                         ids=["gp05", "gp025_gn05_noclip", "gp05_gn075_detach"])
def test_asl_exponents_below_one(backend, dtype, kw):
    # Unsaturated logits (1 - p_t > 0 in the torch formula), and no clamped negatives when
    # gamma_neg < 1, so that the reference gradient is finite.
    dev = _device(backend)
    g = torch.Generator().manual_seed(11)
    z0 = (torch.randn(6, 50, generator=g, dtype=torch.float64) * 4).to(dev, dtype)
    y = (torch.rand(6, 50, generator=g) < 0.3).to(dev)
    go = torch.randn(6, 50, generator=g, dtype=torch.float64).to(dev, dtype)
    out = []
    for b in ("torch", backend):
        z = z0.clone().requires_grad_()
        loss = shl.asymmetric_loss(z, y, reduction="none", backend=b, **kw)
        (loss * go).sum().backward()
        out.append((loss.detach(), z.grad))
    for got, ref in zip(out[1], out[0]):
        _close(got, ref, dtype)


SPECS = [ElemSpec(KINDS["bce"]), ElemSpec(KINDS["focal"], alpha=0.25, gamma=2.0),
         ElemSpec(KINDS["asl"], gamma_pos=1.0, gamma_neg=4.0, clip=0.05),
         ElemSpec(KINDS["asl"], gamma_neg=3.0, detach=True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", SPECS, ids=["bce", "focal", "asl", "asl_detach"])
def test_kernel_writes_every_output(backend, dtype, spec):
    dev = _device(backend)
    B, C = (5, 37) if backend == "triton" and not HAS_CUDA else (9, 300)
    z, y, ign, w, pw, _, _ = _inputs(B, C, torch.float64, dev, 3)
    z = z.clamp(-8, 8).to(dtype)  # finite in every dtype, including fp16
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rows = torch.full((B,), float("nan"), dtype=acc, device=dev)
    el = torch.full((B, C), float("nan"), dtype=dtype, device=dev)
    grad = torch.full((B, C), float("nan"), dtype=dtype, device=dev)
    u8 = y.to(torch.uint8)
    KERNELS[backend](z, u8, ign.to(torch.uint8), w.to(acc), pw.to(acc), spec, 0.5,
                     loss_rows=rows, loss_el=el, grad=grad)
    assert bool(torch.isfinite(rows).all() and torch.isfinite(el).all()
                and torch.isfinite(grad).all())
    low = dtype in (torch.float16, torch.bfloat16)  # el is rounded, rows are not
    torch.testing.assert_close(rows.double(), el.double().sum(1), rtol=1e-2 if low else 1e-5,
                               atol=1e-2 if low else 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", SPECS[:2], ids=["bce", "focal"])
@pytest.mark.parametrize("where", ["kernel", "torch"])
def test_kernel_sums_rows_in_the_call(backend, dtype, spec, where, monkeypatch):
    """loss_total (what FusedElementwise asks for "mean"/"sum"): grad_scale times the sum of
    the row losses, written by the same call (NaN-poisoned before); the gradient unchanged.
    where="torch": Triton's grids too large to sum in the launch (forced), summed by torch."""
    if where == "torch":
        if backend != "triton":
            pytest.skip("only Triton sums with torch (beyond its device-sum limit)")
        from shl_kernels import triton_elementwise
        monkeypatch.setattr(triton_elementwise, "REDUCE_MAX", 0)
    dev = _device(backend)
    B, C = (5, 37) if backend == "triton" and not HAS_CUDA else (9, 1100)
    z, y, ign, w, pw, _, _ = _inputs(B, C, torch.float64, dev, 4)
    z = z.clamp(-8, 8).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    args = (z, y.to(torch.uint8), ign.to(torch.uint8), w.to(acc), pw.to(acc), spec, 0.25)
    rows = torch.full((B,), float("nan"), dtype=acc, device=dev)
    grad = torch.full((B, C), float("nan"), dtype=dtype, device=dev)
    KERNELS[backend](*args, loss_rows=rows, grad=grad)
    scratch = torch.full((B,), float("nan"), dtype=acc, device=dev)
    total = torch.full((), float("nan"), dtype=acc, device=dev)
    grad2 = torch.full((B, C), float("nan"), dtype=dtype, device=dev)
    KERNELS[backend](*args, loss_rows=scratch, grad=grad2, loss_total=total)
    tol = 1e-12 if acc == torch.float64 else 1e-5
    torch.testing.assert_close(total, rows.sum() * 0.25, rtol=tol, atol=0)
    assert torch.equal(grad2, grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_unless_ignored(backend):
    dev = _device(backend)
    z = torch.zeros(2, 5, device=dev)
    z[0, 1] = float("nan")
    y = torch.zeros(2, 5, dtype=torch.bool, device=dev)
    ign = torch.zeros_like(y)
    for fn in (shl.bce_loss, shl.focal_loss, shl.asymmetric_loss):
        rows = fn(z, y, reduction="none", backend=backend).sum(1)
        assert bool(rows[0].isnan()) and bool(rows[1].isfinite())
        ign[0, 1] = True
        assert bool(fn(z, y, ignore=ign, backend=backend).isfinite())
        ign[0, 1] = False


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_and_zero_upstream(backend):
    dev = _device(backend)
    z0, y, *_ = _inputs(4, 9, torch.float64, dev, 5)
    z = z0.clone().requires_grad_()
    ref = z0.clone().requires_grad_()
    shl.focal_loss(ref, y, backend="torch").backward()
    loss = shl.focal_loss(z, y, backend=backend)
    (loss * 2).backward(retain_graph=True)
    first = z.grad
    torch.testing.assert_close(first, 2 * ref.grad)
    z.grad = None
    (loss * 3).backward(retain_graph=True)
    torch.testing.assert_close(z.grad, 3 * ref.grad)
    torch.testing.assert_close(first, 2 * ref.grad)  # not rescaled behind the caller's back
    (loss * 0).backward(retain_graph=True)
    torch.testing.assert_close(z.grad, 3 * ref.grad)
    (loss * 5).backward()
    torch.testing.assert_close(z.grad, 8 * ref.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fused(backend):
    dev = _device(backend)
    z0, y, ign, _, pw, _, _ = _inputs(3, 6, torch.float64, dev, 7)
    z = (z0 / 10).requires_grad_()
    for fn, kw in ((shl.bce_loss, {"pos_weight": pw}), (shl.focal_loss, {}),
                   (shl.asymmetric_loss, {})):
        assert torch.autograd.gradcheck(
            lambda t, fn=fn, kw=kw: fn(t, y, ignore=ign, reduction="sum", backend=backend, **kw),
            (z,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_empty(backend):
    dev = _device(backend)
    z, y, *_ = _inputs(4, 9, torch.float32, dev, 1)
    with torch.no_grad():
        torch.testing.assert_close(shl.bce_loss(z, y, backend=backend),
                                   shl.bce_loss(z, y, backend="torch"))
    e = torch.zeros(0, 9, device=dev)
    assert shl.bce_loss(e, e, reduction="sum", backend=backend).item() == 0
    assert shl.bce_loss(e, e, reduction="none", backend=backend).shape == (0, 9)


def test_weights_are_constants():
    z, y, _, w, _, _, _ = _inputs(3, 5, torch.float64, "cpu", 2)
    with pytest.raises(ValueError, match="pos_weight"):
        shl.bce_loss(z, y, pos_weight=w.requires_grad_())


def test_backend_errors():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="backend"):
        shl.bce_loss(z, z, backend="nope")
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="backend"):
            shl.focal_loss(z, z, backend="cuda")
    if why_unavailable_elementwise("cpu") is None and HAS_CUDA:
        with pytest.raises(ValueError, match="backend"):
            shl.focal_loss(z.cuda(), z.cuda(), backend="cpu")


@pytest.mark.skipif(why_unavailable_elementwise("cpu") is not None, reason="no native kernel")
def test_native_binding_names_bad_arguments():
    from torch.utils.dlpack import to_dlpack

    from shl_kernels import _C

    z = torch.zeros(2, 3)
    pos = torch.zeros(2, 3, dtype=torch.uint8)
    rows = torch.empty(2)
    kw = {"kind": 0, "alpha": -1.0, "gamma": 0.0, "gamma_pos": 0.0, "gamma_neg": 0.0,
          "clip": 0.0, "eps": 1e-8, "detach": False, "grad_scale": 1.0}

    def call(z=z, pos=pos, w=None, rows=rows, grad=None, total=None):
        cap = [None if t is None else to_dlpack(t) for t in (z, pos, w, rows, grad, total)]
        _C.elementwise_fused_cpu(cap[0], cap[1], None, cap[2], None, cap[3], None, cap[4], **kw,
                                 loss_total=cap[5])

    call()
    call(total=torch.empty(()))
    with pytest.raises(ValueError, match="loss_total: given without loss_rows"):
        call(rows=None, grad=torch.empty(2, 3), total=torch.empty(()))
    with pytest.raises(ValueError, match="loss_total"):
        call(total=torch.empty(1))
    with pytest.raises(TypeError, match="loss_total"):
        call(total=torch.empty((), dtype=torch.float64))
    with pytest.raises(ValueError, match="pos"):
        call(pos=torch.zeros(3, 2, dtype=torch.uint8))
    with pytest.raises(TypeError, match="pos"):
        call(pos=torch.zeros(2, 3))
    with pytest.raises(TypeError, match="weight"):
        call(w=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight"):
        call(w=torch.ones(4))
    with pytest.raises(TypeError, match="grad"):
        call(grad=torch.empty(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="z"):
        call(z=torch.zeros(3, 2).t())
    with pytest.raises(TypeError, match="z"):
        call(z=torch.zeros(2, 3, dtype=torch.int32))


def test_triton_module_is_lazy():
    import subprocess
    import sys

    code = ("import sys, shl_kernels, torch; shl_kernels.bce_loss(torch.zeros(2, 3), "
            "torch.zeros(2, 3)); print('shl_kernels.triton_elementwise' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ}, check=True)
    assert out.stdout.strip() == "False"


_AOT = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from shl_kernels.triton_elementwise import _elementwise_kernel

PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16", "fp64": "*fp64"}

def compile_for_h100(zt, kind, has, clip, detach, rows, block_b, block_c, num_warps=4):
    acc = "*fp64" if zt == "fp64" else "*fp32"
    sig = dict(z_ptr=PTR[zt], pos_ptr="*u8", ign_ptr="*u8", w_ptr=acc, pw_ptr=acc,
               par_ptr=acc, part_ptr=acc, lel_ptr=PTR[zt], grad_ptr=PTR[zt], B="i32", C="i32",
               n_cblocks="i32", total_ptr=acc, count_ptr="*i32")
    const = dict(KIND=kind, DETACH=detach, CLIP=clip, HAS_IGN=has, HAS_W=has, HAS_PW=has,
                 WRITE_ROWS=rows, WRITE_EL=not rows, WRITE_GRAD=True,
                 ACC=tl.float64 if zt == "fp64" else tl.float32, REDUCE=rows,
                 BLOCK_B=block_b, BLOCK_C=block_c)
    if block_c == 1:  # C == 1 arrives as a constexpr (Triton specialises ints equal to 1)
        const["C"] = 1
    if block_b == 1:
        const["B"] = 1
    sig.update({n: "constexpr" for n in const})
    src = triton.compiler.ASTSource(fn=_elementwise_kernel, signature=sig, constexprs=const)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps})
    assert kernel.asm["cubin"]

# the launcher's tiles: [8, 64] (C=37), [4, 1] (C=1), [4, 1024] (C=601), [1, 1024] (B=1)
compile_for_h100("fp32", 0, True, False, False, True, 8, 64)
compile_for_h100("bf16", 1, False, False, False, False, 4, 1)
compile_for_h100("fp64", 2, True, True, False, True, 4, 1024)
compile_for_h100("fp16", 2, False, False, True, False, 1, 1024)
compile_for_h100("fp32", 2, True, True, True, True, 4096, 1)
print("compiled")
"""


def test_triton_compiles_for_h100(compile_sm90):
    """The interpreter checks no types: compile real sm_90 code."""
    compile_sm90(_AOT)
