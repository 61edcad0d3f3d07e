"""Float targets and ignore masks to the kernels' uint8 masks in one native pass
(shl_kernels.masks, csrc/targets*): the same masks and the same 0/1 check as torch ops."""
from __future__ import annotations

import os
import textwrap

import pytest
import torch
from torch.utils.dlpack import to_dlpack

import shl_kernels as shl
from shl_kernels import masks

_C = pytest.importorskip("shl_kernels._C")
if not hasattr(_C, "targets_to_mask_cpu"):
    pytest.skip("shl_kernels._C was built without the mask conversion", allow_module_level=True)

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Values that are not 0/1 (each makes a batch invalid): soft labels, out of range, NaN, inf,
# tiny (nonzero), one ulp below 1.
BAD = [0.5, 2.0, -1.0, float("nan"), float("inf"), 1e-30, 0.99999994]


def binary(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    t = (torch.rand(shape, generator=g) < 0.3).to(dtype)
    t.view(-1)[::7] = -0.0  # negative zero is zero
    return t


def expected(t):
    """(mask, some value is neither 0 nor 1) by torch ops, the former implementation."""
    return (t != 0).to(torch.uint8), bool(((t != 0) & (t != 1)).any())


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (7, 143), (3, 70001)], ids=str)
def test_mask_of_binary_targets(dtype, shape):
    # (3, 70001): over 2^16 elements, split between OpenMP threads
    t = binary(shape, dtype, seed=shape[1])
    got = masks.float_mask(t, "targets")
    assert got.dtype == torch.uint8 and got.shape == t.shape
    assert torch.equal(got, expected(t)[0])


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("value", BAD, ids=str)
@pytest.mark.parametrize("where", [0, 500, 70000 * 3 - 1], ids=["first", "middle", "last"])
def test_values_other_than_0_and_1_raise(dtype, value, where):
    t = binary((3, 70000), dtype, seed=1)
    t.view(-1)[where] = value
    if not expected(t)[1]:  # the value rounds to 0 or 1 in this dtype: a valid batch
        assert torch.equal(masks.float_mask(t, "ignore"), expected(t)[0])
        return
    with pytest.raises(ValueError, match="^ignore: dense targets must hold only 0 and 1"):
        masks.float_mask(t, "ignore")


def test_non_contiguous_targets():
    t = binary((6, 40), torch.float32, seed=2)[:, ::2]
    assert torch.equal(masks.float_mask(t, "targets"), expected(t)[0])


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts_agree(threads):
    t = binary((5, 30011), torch.float32, seed=3)
    out = torch.full(t.shape, 7, dtype=torch.uint8)
    assert _C.targets_to_mask_cpu(to_dlpack(t), to_dlpack(out), threads) is False
    assert torch.equal(out, expected(t)[0])
    t[4, 30010] = 0.25
    assert _C.targets_to_mask_cpu(to_dlpack(t), to_dlpack(out), threads) is True


@pytest.mark.parametrize("t, out, exc, match", [
    (torch.zeros(3, dtype=torch.int64), torch.empty(3, dtype=torch.uint8), TypeError, "^t:"),
    (torch.zeros(3), torch.empty(3, dtype=torch.bool), ValueError, None),
    (torch.zeros(3), torch.empty(3), TypeError, "^out:"),
    (torch.zeros(3), torch.empty(4, dtype=torch.uint8), ValueError, "^out: expected 3"),
])
def test_binding_rejects_bad_arguments(t, out, exc, match):
    if match is None:  # a bool out is fine (same storage as uint8)
        _C.targets_to_mask_cpu(to_dlpack(t), to_dlpack(out), 1)
        return
    with pytest.raises(exc, match=match):
        _C.targets_to_mask_cpu(to_dlpack(t), to_dlpack(out), 1)


@pytest.mark.parametrize("backend", [b for b in shl.available_backends() if b != "triton"])
def test_loss_with_float_targets_and_ignore_equals_bool(backend):
    # Through the public API: float targets and ignore give what bool ones give; soft ones
    # raise before any kernel runs.
    seg = shl.Segmentation.from_segments([[0, 2], [1], [3, 4]], 5)
    z = torch.randn(4, 5, dtype=torch.float64)
    t = binary((4, 5), torch.float64, seed=4)
    ign = binary((4, 5), torch.float32, seed=5) * (1 - t.float())
    want = shl.segmented_harmonic_loss(z, t.bool(), seg, ignore=ign.bool(), backend=backend)
    got = shl.segmented_harmonic_loss(z, t, seg, ignore=ign, backend=backend)
    assert torch.equal(got, want)
    t[1, 1] = 0.7
    with pytest.raises(ValueError, match="^targets: dense targets must hold only 0 and 1"):
        shl.segmented_harmonic_loss(z, t, seg, backend=backend)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("n", [1, 2048, 5000], ids=str)
def test_triton_conversion(dtype, n):
    # triton_masks (GPUs without the CUDA build), here under TRITON_INTERPRET=1 on CPU
    # tensors: the mask, and the flag only where some value is neither 0 nor 1 (5000: three
    # programs, the last one partial).
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    from shl_kernels.triton_masks import to_mask

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for bad_value in [None, *BAD]:
        t = binary((1, n), dtype, seed=n).view(-1).to(dev)
        if bad_value is not None:
            t[n - 1] = bad_value
        out = torch.full((n,), 9, dtype=torch.uint8, device=dev)
        flag = to_mask(t, out)
        want, want_bad = expected(t)
        assert torch.equal(out, want) and flag.item() == int(want_bad)


def test_triton_conversion_compiles_for_sm90(compile_sm90):
    # the interpreter checks no types: real sm_90 code for every float dtype, and the CSR
    # conversion for every index dtype
    compile_sm90(textwrap.dedent("""
        import sys
        sys.path.insert(0, "benchmarks")
        from triton_resources import PTR, compile_sm90
        from shl_kernels.triton_masks import _CSR_BLOCK, BLOCK, _csr_kernel, _to_mask_kernel
        for dt in ("fp32", "fp64", "fp16", "bf16"):
            sig = {"t_ptr": PTR[dt], "out_ptr": "*u8", "bad_ptr": "*i32", "n": "i64"}
            assert compile_sm90(_to_mask_kernel, sig, {"BLOCK": BLOCK}, 4).asm["cubin"]
        for p, i in (("*i64", "*i64"), ("*i32", "*i32"), ("*i32", "*i64")):  # CSR
            sig = {"ptr_ptr": p, "ids_ptr": i, "words_ptr": "*i32", "check_ptr": "*i64",
                   "B": "i32", "C": "i32", "nnz": "i64"}
            assert compile_sm90(_csr_kernel, sig, {"BLOCK_IDS": _CSR_BLOCK}, 4).asm["cubin"]
        print("compiled")
    """))


ROUTES = [(True, True), (True, False), (False, False)]  # (extension built with CUDA, runs)


def _fake_extension(monkeypatch, built: bool, runs: bool, fn_name: str) -> list:
    """An extension that has (built) the CUDA function fn_name, which records its calls,
    on a machine where its CUDA kernels run or not; the stream handle is 7."""
    calls = []
    ext = type("Ext", (), {fn_name: staticmethod(lambda *a: calls.append(a))} if built else {})
    monkeypatch.setattr(masks, "native", lambda: ext)
    monkeypatch.setattr(masks, "_cuda_kernels_run", lambda: runs)
    monkeypatch.setattr(masks, "stream_handle", lambda device: 7)
    return calls


def _triton_masks_or_none(convert):
    """shl_kernels.triton_masks; None where Triton is missing (the route is then torch ops)."""
    try:
        from shl_kernels import triton_masks
    except ImportError:
        assert convert is None
        return None
    return triton_masks


@pytest.mark.parametrize("built, runs", ROUTES)
def test_gpu_conversion_routing(monkeypatch, built, runs):
    # CUDA tensors: the extension's kernel where it was built with CUDA and can run, else
    # Triton (GPUs without nvcc at install), else None (torch ops).
    calls = _fake_extension(monkeypatch, built, runs, "targets_to_mask_cuda")
    convert = masks._converter.__wrapped__("cuda")
    if built and runs:
        t = torch.zeros(3)
        assert convert(t, torch.empty(3, dtype=torch.uint8)) in (False, True)  # flag read
        assert len(calls) == 1 and calls[0][3] == 7
        return
    triton_masks = _triton_masks_or_none(convert)
    if triton_masks is None:
        return
    seen = []
    monkeypatch.setattr(triton_masks, "to_mask", lambda t, out: seen.append(t) or torch.ones(1))
    assert convert(torch.zeros(2), torch.empty(2, dtype=torch.uint8)) is True
    assert len(seen) == 1


@pytest.mark.parametrize("built, runs", ROUTES)
def test_gpu_csr_conversion_routing(monkeypatch, built, runs):
    # CSR pairs on CUDA tensors: the extension's kernel where it was built with CUDA and can
    # run (check[] read back once), else Triton's, else None (torch ops).
    calls = _fake_extension(monkeypatch, built, runs, "csr_to_mask_cuda")
    convert = masks._csr_converter.__wrapped__("cuda")
    ptr, ids = torch.tensor([0, 1]), torch.tensor([2])
    if built and runs:
        out, check = convert(ptr, ids, 1, 3)
        assert out.shape == (1, 3) and len(check) == 4
        assert len(calls) == 1 and calls[0][4] == 7
        return
    triton_masks = _triton_masks_or_none(convert)
    if triton_masks is None:
        return
    seen = []
    monkeypatch.setattr(triton_masks, "csr_to_mask", lambda p, i, B, C: seen.append(
        (B, C)) or (torch.zeros(B, C, dtype=torch.uint8), torch.tensor([0, 2, 2, 0])))
    assert convert(ptr, ids, 1, 3)[1] == [0, 2, 2, 0]
    assert seen == [(1, 3)]
