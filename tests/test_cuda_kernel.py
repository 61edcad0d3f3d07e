"""The CUDA fused kernel (csrc/shl_cuda.cu): binding checks run anywhere the extension was
built with CUDA; numerical tests need a GPU and compare with the PyTorch reference."""
import ctypes
import functools
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.dlpack import to_dlpack

import shl_kernels as shl
from shl_kernels.backends import native
from shl_kernels.derived import segment_position, segment_schedule
from shl_kernels.fused import FusedSHL
from shl_kernels.kernels_cuda import cuda_available, host_offsets, shl_fused_cuda
from shl_kernels.reference import shl_loss_reference

_C = native()
BUILT = _C is not None and bool(_C.build_info.get("cuda"))
needs_build = pytest.mark.skipif(not BUILT, reason="shl_kernels._C was built without CUDA")
needs_gpu = pytest.mark.skipif(not (BUILT and torch.cuda.is_available()), reason="needs a CUDA GPU")
DEV = "cuda"


# ---------------------------------------------------------------- host-side (no GPU needed)

class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLTensorHead(ctypes.Structure):  # leading fields of DLTensor (python/dlpack_abi.h)
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice)]


_capsule_pointer = ctypes.PyDLL(None).PyCapsule_GetPointer  # own handle: restype is ours
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _fake_cuda(t: torch.Tensor):
    """Capsule of CPU tensor `t` relabelled as cuda:0, to drive the binding's host-side
    checks without a GPU (they must all run before any CUDA call)."""
    cap = to_dlpack(t)
    _DLTensorHead.from_address(_capsule_pointer(cap, b"dltensor")).device.device_type = 2
    return cap


def _binding_args(B=3, C=5, dtype=torch.float32, **override):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    args = {"z": torch.randn(B, C).to(dtype), "pos": torch.zeros(B, C, dtype=torch.uint8),
            "ign": torch.zeros(B, C, dtype=torch.bool), "order": torch.arange(C),
            "offsets": torch.tensor([0, 2, C]), "w": torch.ones(C, dtype=acc),
            "eta": torch.zeros(2, dtype=acc), "delta": torch.zeros(C, dtype=acc),
            "grad_scale": 1.0, "loss": torch.empty(B, dtype=acc),
            "grad": torch.empty(B, C, dtype=dtype), "grad_eta": torch.empty(B, 2, dtype=acc),
            "stream": 0}
    args.update(override)
    return args


def _call_binding(args, cpu=()):
    """Every tensor as a fake CUDA capsule, except the names in `cpu` (real CPU capsules)."""
    kw = {k: (to_dlpack(v) if k in cpu else _fake_cuda(v)) if isinstance(v, torch.Tensor) else v
          for k, v in args.items()}
    return _C.shl_fused_cuda(**kw)


@needs_build
def test_extension_exposes_cuda_kernel():
    assert hasattr(_C, "shl_fused_cuda")
    driver, runtime, devices = _C.cuda_runtime_info()
    assert isinstance(driver, int) and runtime >= 12000
    assert isinstance(devices, (int, str))


def test_cuda_available_says_why_not():
    ok, why = cuda_available()
    if torch.cuda.is_available() and BUILT:
        assert ok and why == ""
    else:
        assert not ok and len(why) > 10


_TENSORS = ("z", "pos", "ign", "order", "offsets", "w", "eta", "delta", "loss", "grad", "grad_eta")


@needs_build
@pytest.mark.parametrize("name", _TENSORS)
def test_binding_rejects_cpu_tensors(name):
    args = _binding_args()
    cpu = _TENSORS if name == "z" else (name,)  # z on CPU: the plain all-CPU call
    with pytest.raises(ValueError, match=f"^{name}: "):
        _call_binding(args, cpu=cpu)


@needs_build
@pytest.mark.parametrize("name, bad, exc", [
    ("z", torch.zeros(3, 5, dtype=torch.int64), TypeError),
    ("z", torch.zeros(15), ValueError),
    ("pos", torch.zeros(3, 5), TypeError),
    ("pos", torch.zeros(3, 4, dtype=torch.uint8), ValueError),
    ("ign", torch.zeros(5, 3, dtype=torch.uint8), ValueError),
    ("order", torch.arange(5, dtype=torch.int32), TypeError),
    ("order", torch.arange(4), ValueError),
    ("offsets", torch.tensor([[0, 2, 5]]), ValueError),
    ("offsets", torch.tensor([0, 2, 5], dtype=torch.int32), TypeError),
    ("w", torch.ones(5, dtype=torch.float64), TypeError),
    ("w", torch.ones(4), ValueError),
    ("eta", torch.zeros(3), ValueError),
    ("delta", torch.zeros(5, dtype=torch.float16), TypeError),
    ("loss", torch.empty(3, dtype=torch.float64), TypeError),
    ("loss", torch.empty(2), ValueError),
    ("grad", torch.empty(3, 5, dtype=torch.float64), TypeError),
    ("grad", torch.empty(5, 3), ValueError),
    ("grad_eta", torch.empty(3, 3), ValueError),
    ("grad_eta", torch.empty(3, 5).t(), ValueError),  # not contiguous
])
def test_binding_checks_dtype_and_shape(name, bad, exc):
    with pytest.raises(exc, match=f"^{name}: "):
        _call_binding(_binding_args(**{name: bad}))


@needs_build
@pytest.mark.parametrize("bad, exc", [(torch.arange(5, dtype=torch.int64), TypeError),
                                      (torch.arange(5, dtype=torch.int8), TypeError),
                                      (torch.arange(4, dtype=torch.int32), ValueError),
                                      (torch.arange(4, dtype=torch.int16), ValueError)])
def test_binding_checks_position(bad, exc):
    with pytest.raises(exc, match="^position: "):
        _call_binding(_binding_args(position=bad))


@needs_build
def test_binding_rejects_16_bit_positions_past_65536_labels():
    C = (1 << 16) + 1
    with pytest.raises(ValueError, match="^position: 16-bit positions need C <= 65536"):
        _call_binding(_binding_args(C=C, order=torch.arange(C), offsets=torch.tensor([0, 2, C]),
                                    w=None, delta=None, position=torch.zeros(C, dtype=torch.int16)))


@needs_build
def test_binding_checks_block_min_and_staged_threads():
    with pytest.raises(ValueError, match="^block_min: "):
        _call_binding(_binding_args(block_min=-2))
    with pytest.raises(ValueError, match="^staged_threads: "):
        _call_binding(_binding_args(staged_threads=128))


@needs_build
def test_binding_checks_row_sum_outputs():
    with pytest.raises(ValueError, match="^loss_total: "):
        _call_binding(_binding_args(loss_total=torch.empty(1)))  # must be 0-dim
    with pytest.raises(TypeError, match="^loss_total: "):
        _call_binding(_binding_args(loss_total=torch.empty((), dtype=torch.float64)))
    with pytest.raises(ValueError, match="^grad_eta_total: "):
        _call_binding(_binding_args(grad_eta_total=torch.empty(3)))  # m = 2
    with pytest.raises(ValueError, match="^grad_eta_total: given without grad_eta"):
        _call_binding(_binding_args(grad_eta=None, grad_eta_total=torch.empty(2)))


@needs_build
def test_binding_checks_host_offsets_and_window_bytes():
    with pytest.raises(ValueError, match="^window_bytes: "):
        _call_binding(_binding_args(window_bytes=-1))
    with pytest.raises(ValueError, match="^offsets_host: expected a CPU tensor"):
        _call_binding(_binding_args(offsets_host=torch.tensor([0, 2, 5])))  # on the "GPU"
    with pytest.raises(TypeError, match="^offsets_host: "):
        _call_binding(_binding_args(offsets_host=torch.tensor([0, 2, 5], dtype=torch.int32)),
                      cpu=("offsets_host",))
    with pytest.raises(ValueError, match="^offsets_host: expected shape"):
        _call_binding(_binding_args(offsets_host=torch.tensor([0, 5])), cpu=("offsets_host",))


def test_host_offsets_is_a_cached_cpu_copy():
    offsets = torch.tensor([0, 2, 5])
    host = host_offsets(offsets)
    assert host.device.type == "cpu" and torch.equal(host, offsets)
    assert host_offsets(offsets) is host


@needs_build
def test_binding_rejects_position_without_order():
    with pytest.raises(ValueError, match="^position: given without order"):
        _call_binding(_binding_args(order=None, position=torch.arange(5, dtype=torch.int32)))


@needs_build
def test_binding_checks_schedule():
    with pytest.raises(ValueError, match="^schedule: "):
        _call_binding(_binding_args(schedule=torch.arange(3, dtype=torch.int32)))


@needs_build
def test_staged_occupancy_checks_its_arguments():
    with pytest.raises(ValueError, match="^dtype: "):
        _C.cuda_staged_occupancy("int8", 5)
    with pytest.raises(ValueError, match="^C: "):
        _C.cuda_staged_occupancy("float32", 0)


@needs_gpu
def test_staged_occupancy():
    blocks, nbytes = _C.cuda_staged_occupancy("bfloat16", 32768)
    assert nbytes == 32768 * 2 + 32768 // 8 and blocks >= 1  # z, then the positives' bits
    # each rounded up to 16-byte words: 2002 -> 2016 bytes of z, 1001 bits -> 128 bytes
    assert _C.cuda_staged_occupancy("bfloat16", 1001)[1] == 2016 + 128
    assert _C.cuda_staged_occupancy("float32", 10**6) == (0, 0)  # too large: unstaged kernel


@needs_build
def test_binding_rejects_grad_partly_overlapping_z():
    buf = torch.randn(16)
    with pytest.raises(ValueError, match="^grad: overlaps z"):
        _call_binding(_binding_args(z=buf[:15].view(3, 5), grad=buf[1:].view(3, 5)))


@needs_build
def test_binding_reports_cuda_errors_as_runtime_error():
    # Valid arguments reach the CUDA side; host memory (or no driver here) is an error there.
    with pytest.raises(RuntimeError, match="^shl_fused_cuda: "):
        _call_binding(_binding_args())


@needs_build
def test_binding_zero_rows_touches_nothing():
    assert _call_binding(_binding_args(B=0)) is None


# ---------------------------------------------------------------- GPU: against the reference

@pytest.fixture(autouse=True, params=[(True, 0, True, True), (True, 256, True, True),
                                      (True, 0, False, True), (True, 0, True, False),
                                      (False, 0, True, True)],
                ids=["staged", "staged256", "groups", "sync", "unstaged"])
def _staging(request, monkeypatch):
    """Every GPU test runs with rows staged in shared memory (flat schedule, blocks of 512
    threads and of 256; group schedule; plain loads instead of cp.async) and with the
    unstaged kernel; the fixture's value says whether staged."""
    from shl_kernels import kernels_cuda
    staged, threads, flat, async_staging = request.param
    monkeypatch.setattr(kernels_cuda, "STAGED", staged)
    monkeypatch.setattr(kernels_cuda, "STAGED_THREADS", threads)
    monkeypatch.setattr(kernels_cuda, "FLAT", flat)
    monkeypatch.setattr(kernels_cuda, "ASYNC_STAGING", async_staging)
    return staged


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def with_empty_segments(offsets: torch.Tensor, eta: torch.Tensor, empty_before: list[int]):
    """Raw offsets and null logits with an empty segment inserted before each segment id in
    `empty_before` (only raw offsets can have empty segments; their null logits 0).
    Returns (offsets, eta, keep: the new id of each old segment, empty: the new ids)."""
    new = offsets.tolist()
    for k in reversed(empty_before):
        new.insert(k, new[k])
    m = eta.numel()
    keep = [k + sum(e <= k for e in empty_before) for k in range(m)]
    eta_e = torch.zeros(len(new) - 1, dtype=eta.dtype)
    eta_e[keep] = eta.cpu()
    empty = [k for k in range(len(new) - 1) if k not in keep]
    return torch.tensor(new), eta_e, keep, empty


def _problem(sizes, B, dtype, seed, *, identity=False, pos_p=0.15, ign_p=0.1, scale=3.0):
    """Random problem on the CPU: segments of the given sizes (shuffled labels unless
    identity), with a row without positive, a fully ignored segment, an ignored positive."""
    gen = torch.Generator().manual_seed(seed)
    C = sum(sizes)
    labels = list(range(C)) if identity else torch.randperm(C, generator=gen).tolist()
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    seg = shl.Segmentation.from_segments([labels[a:b] for a, b in itertools.pairwise(starts)], C)
    acc = _acc(dtype)
    z = (torch.randn(B, C, generator=gen, dtype=torch.float64) * scale).to(dtype)
    pos = torch.rand(B, C, generator=gen) < pos_p
    ign = torch.rand(B, C, generator=gen) < ign_p
    pos[0] = False
    if B > 2:
        ign[1, seg.order[seg.offsets[-2]:]] = True
        first = seg.order[0]
        pos[2, first] = ign[2, first] = True
    return SimpleNamespace(
        seg=seg, z=z, pos=pos, ign=ign,
        w=(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(acc),
        eta=torch.randn(seg.num_segments, generator=gen, dtype=torch.float64).to(acc),
        delta=(torch.randn(C, generator=gen, dtype=torch.float64) * 0.5).to(acc))


def without_delta(p):
    """The problem without logit offsets (delta None): the CUDA kernels' variant compiled
    without them."""
    return SimpleNamespace(**{**vars(p), "delta": None})


def tight_window_bytes(offsets: torch.Tensor, dtype: torch.dtype) -> int:
    """Shared memory for a window of the largest segment and about 40 more labels (and the
    statistics of 8 segments): small enough that rows of a few hundred labels take windows
    (the window_bytes argument of shl_fused_cuda)."""
    labels = int((offsets[1:] - offsets[:-1]).max()) + 40
    acc = 8 if dtype == torch.float64 else 4
    z_bytes = (labels * dtype.itemsize + 15) // 16 * 16
    return z_bytes + (labels + 31 + 127) // 128 * 16 + 8 * 4 * acc


def _fused(p, reduction="mean", *, inplace=False, order=True, upstream=None, params=True,
           window_bytes=0):
    """Loss and (z, eta, delta) gradients from FusedSHL with the CUDA kernel."""
    z = p.z.to(DEV).clone().requires_grad_()
    eta = p.eta.to(DEV).requires_grad_() if params else None
    delta = p.delta.to(DEV).requires_grad_() if params and p.delta is not None else None
    w = p.w.to(DEV) if params else None
    ign = p.ign.to(DEV, torch.uint8) if params else None
    kernel = shl_fused_cuda
    if window_bytes:
        kernel = functools.partial(shl_fused_cuda, window_bytes=window_bytes)
        kernel.reduces = True
    loss = FusedSHL.apply(kernel, z, p.pos.to(DEV, torch.uint8), ign,
                          p.seg.order.to(DEV) if order else None, p.seg.offsets.to(DEV), w, eta,
                          delta, reduction, inplace)
    inputs = [t for t in (z, eta, delta) if t is not None]
    up = torch.ones_like(loss) if upstream is None else upstream.to(DEV)
    grads = torch.autograd.grad(loss, inputs, up)
    return [loss.detach().cpu(), *(g.cpu() for g in grads)], z


def _reference(p, reduction="mean", upstream=None, params=True):
    """The same in float64 on the CPU (autograd through the reference)."""
    z = p.z.double().requires_grad_()
    eta = p.eta.double().requires_grad_() if params else None
    delta = p.delta.double().requires_grad_() if params and p.delta is not None else None
    loss = shl_loss_reference(z, p.pos, p.seg, p.w.double() if params else None, eta, delta,
                              p.ign if params else None, reduction)
    inputs = [t for t in (z, eta, delta) if t is not None]
    up = torch.ones_like(loss) if upstream is None else upstream
    return [loss.detach(), *torch.autograd.grad(loss, inputs, up)]


def _close_sums(got, ref, bound, rtol, atol):
    """Gradients summed over rows: an error of rtol per summand adds up to rtol * bound,
    bound being the sum over the rows of |summand|."""
    excess = (got.double() - ref).abs() - (rtol * bound + atol)
    assert (excess <= 0).all(), f"max excess over the tolerance: {excess.max().item():.3g}"


def _assert_matches(got, ref, dtype, seg):
    """loss, grad z[, grad eta, grad delta]. Per computed value: float64 all but exact,
    float32 within the fast-math exp/log error; grad z of half dtypes is rounded."""
    rtol, atol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 1e-6)
    loss, gz, *rest = got
    rloss, rgz, *rrest = ref
    torch.testing.assert_close(loss.double(), rloss, rtol=rtol, atol=10 * atol)
    assert gz.dtype == dtype
    zrtol, zatol = rtol, atol
    if dtype in (torch.float16, torch.bfloat16):
        # Rounded to z's dtype by the kernel, then by FusedSHL's backward when it scales
        # by the upstream gradient (itself rounded): up to 3 unit roundoffs.
        zrtol, zatol = 2 * torch.finfo(dtype).eps, 1e-5
    torch.testing.assert_close(gz.double(), rgz, rtol=zrtol, atol=zatol)
    if rest:
        B = rgz.shape[0]
        col = rgz.abs().sum(0)
        # Per row and segment |g_eta| <= sum over the segment's labels of |g_c|.
        per_seg = torch.zeros(seg.num_segments, dtype=torch.float64).index_add_(
            0, seg.segment_of, col)
        _close_sums(rest[0], rrest[0], per_seg, rtol, B * atol)
        if len(rest) > 1:  # (a problem without_delta has no delta gradient)
            _close_sums(rest[1], rrest[1], col, zrtol, B * zatol)


SIZES = [1, 3, 17, 40, 1, 2, 16, 33, 5, 100, 1]  # odd sizes, singletons, both paths


def block_wide_problem(dtype):
    """Segments of 3000, 1100 and 700 labels and small ones, 8 rows: no positive (row 0),
    one (found in pass 1), several (pass 2), one in each of two big segments, an ignored
    positive (its segment has none left), every label of the big segment positive, random
    positives (row 7). The 700-label segment is block-wide in blocks of 256 threads only."""
    p = _problem([3000, 1100, 700, 40, 1, 9], 8, dtype, seed=5, pos_p=0.0, ign_p=0.02)
    big, mid, third = p.seg.order[:3000], p.seg.order[3000:4100], p.seg.order[4100:4800]
    p.pos[:] = False
    chosen = {1: big[[17]], 2: big[[5, 2500, 2999]], 3: torch.stack([big[0], mid[1099]]),
              4: big[[100]], 5: third[[350]], 6: big}
    for row, labels in chosen.items():
        p.pos[row, labels] = True
        p.ign[row, labels] = row == 4  # row 4: the only positive is ignored
    p.pos[7] = torch.rand(p.pos.shape[1], generator=torch.Generator().manual_seed(6)) < 0.01
    return p
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(dtype, reduction):
    p = _problem(SIZES, 13, dtype, seed=0)
    up = torch.rand(13, dtype=_acc(dtype)) + 0.5 if reduction == "none" else torch.tensor(
        2.5, dtype=_acc(dtype))
    got, _ = _fused(p, reduction, upstream=up)
    _assert_matches(got, _reference(p, reduction, up.double()), dtype, p.seg)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("order", [True, False], ids=["shuffled", "identity"])
def test_without_logit_offsets(dtype, order):
    """delta None, everything else given: the staged kernels' variant compiled without
    logit offsets (16-byte packs; fp64 has none and takes the one with them)."""
    p = without_delta(_problem(SIZES + [3000, 700], 11, dtype, seed=41, identity=not order))
    got, _ = _fused(p, "none", order=order)
    _assert_matches(got, _reference(p, "none"), dtype, p.seg)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_large_segments(dtype):
    p = _problem([5000, 1, 300, 2, 4097], 6, dtype, seed=1, pos_p=0.01)
    got, _ = _fused(p, "sum")
    _assert_matches(got, _reference(p, "sum"), dtype, p.seg)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_block_wide_segments(dtype):
    """Segments of at least 2 x the block's threads go to the whole block (staged: 1024
    labels, unstaged: 512): see block_wide_problem."""
    p = block_wide_problem(dtype)
    got, _ = _fused(p, "none")
    _assert_matches(got, _reference(p, "none"), dtype, p.seg)


@needs_gpu
@pytest.mark.parametrize("block_min", [0, 1 << 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_or_warp_for_every_segment(dtype, block_min, monkeypatch):
    """block_min 0: every segment (singletons, ignored ones, ...) by the whole block;
    2^40: none (warps and lanes only). Both give the reference's answer."""
    from shl_kernels import kernels_cuda
    monkeypatch.setattr(kernels_cuda, "BLOCK_MIN", block_min)
    p = _problem(SIZES + [1500], 9, dtype, seed=21)
    got, _ = _fused(p, "mean")
    _assert_matches(got, _reference(p, "mean"), dtype, p.seg)


@needs_gpu
def test_many_segments():
    # More than 256 segments: each warp walks several slices of 32.
    p = _problem([1] * 600 + [20] * 7 + [3] * 50, 4, torch.float64, seed=2)
    got, _ = _fused(p, "mean")
    _assert_matches(got, _reference(p, "mean"), torch.float64, p.seg)


@needs_gpu
def test_singletons_without_optional_inputs_equal_bce():
    p = _problem([1] * 37, 9, torch.float64, seed=3)
    (loss, gz), _ = _fused(p, "sum", params=False)
    z = p.z.clone().requires_grad_()
    ref = F.binary_cross_entropy_with_logits(z, p.pos.double(), reduction="sum")
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gz, torch.autograd.grad(ref, z)[0], rtol=1e-10, atol=1e-10)
    _assert_matches([loss, gz], _reference(p, "sum", params=False), torch.float64, p.seg)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_logits_of_plus_minus_80(dtype):
    p = _problem([7, 1, 30, 2], 8, dtype, seed=4)
    gen = torch.Generator().manual_seed(5)
    p.z = torch.where(torch.rand(p.z.shape, generator=gen) < 0.5, 80.0, -80.0).to(dtype)
    got, _ = _fused(p, "none")
    assert all(torch.isfinite(t).all() for t in got)
    _assert_matches(got, _reference(p, "none"), dtype, p.seg)


@needs_gpu
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_inf_logits_poison_their_row(bad):
    p = _problem([7, 1, 30, 2], 6, torch.float32, seed=6)
    ref = _reference(p, "none")
    seg0 = p.seg.order[:7]
    p.z[3, seg0[0]] = bad  # negative or positive, row 3
    p.pos[3, seg0[0]] = math.isnan(bad)
    p.ign[3, seg0[0]] = False
    p.z[4, p.seg.order[-1]] = bad
    p.ign[4, p.seg.order[-1]] = False
    got, _ = _fused(p, "none")
    loss, gz = got[0], got[1]
    assert torch.isnan(loss[3]) and torch.isnan(loss[4])
    keep = [0, 1, 2, 5]
    torch.testing.assert_close(loss[keep].double(), ref[0][keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gz[keep].double(), ref[1][keep], rtol=1e-5, atol=1e-6)
    assert not torch.isfinite(gz[3, seg0]).all()


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_matches_out_of_place(dtype):
    p = _problem(SIZES, 13, dtype, seed=7)
    got, _ = _fused(p, "mean")
    got_inplace, z = _fused(p, "mean", inplace=True)
    for a, b in zip(got, got_inplace):
        assert torch.equal(a, b)
    assert torch.equal(z.detach().cpu(), got[1])  # z's memory now holds the gradient


@needs_gpu
def test_outputs_fully_overwritten(_staging):
    # NaN-prefilled outputs, plus an empty segment that only the raw kernel can be given.
    p = _problem(SIZES, 13, torch.float32, seed=8)
    z, pos, ign = p.z.to(DEV), p.pos.to(DEV, torch.uint8), p.ign.to(DEV, torch.uint8)
    order, w, delta = p.seg.order.to(DEV), p.w.to(DEV), p.delta.to(DEV)
    loss, grad, geta = shl_fused_cuda(z, pos, ign, order, p.seg.offsets.to(DEV), w,
                                      p.eta.to(DEV), delta, 0.5, True)
    offsets = torch.cat([p.seg.offsets[:3], p.seg.offsets[2:]]).to(DEV)  # segment 2 empty
    eta = torch.cat([p.eta[:2], torch.tensor([0.3]), p.eta[2:]]).to(DEV)
    B, C, m = 13, z.shape[1], eta.numel()
    out = [torch.full((B,), float("nan"), device=DEV), torch.full((B, C), float("nan"), device=DEV),
           torch.full((B, m), float("nan"), device=DEV)]
    _C.shl_fused_cuda(*(to_dlpack(t) for t in (z, pos, ign, order, offsets, w, eta, delta)), 0.5,
                      *(to_dlpack(t) for t in out), torch.cuda.current_stream().cuda_stream,
                      to_dlpack(segment_position(order)), _staging,
                      to_dlpack(segment_schedule(offsets)))
    # Segments move to other lanes, so the row sums may round differently.
    torch.testing.assert_close(out[0], loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1], grad)
    assert torch.equal(out[2][:, 2], torch.zeros(B, device=DEV))
    assert torch.equal(torch.cat([out[2][:, :2], out[2][:, 3:]], 1), geta)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vector_staging_and_its_scalar_fallback(dtype):
    # C = 224, a multiple of 16 / sizeof(z): the staged kernel moves z and grad 16 bytes at a
    # time; z one element off 16-byte alignment takes the scalar path, with the same numbers.
    p = _problem([*SIZES, 5], 13, dtype, seed=21)
    got, _ = _fused(p, "mean")
    _assert_matches(got, _reference(p, "mean"), dtype, p.seg)
    B, C = p.z.shape
    args = (p.pos.to(DEV, torch.uint8), p.ign.to(DEV, torch.uint8), p.seg.order.to(DEV),
            p.seg.offsets.to(DEV), p.w.to(DEV), p.eta.to(DEV), p.delta.to(DEV), 1 / B, True)
    shifted = torch.empty(B * C + 1, dtype=dtype, device=DEV)[1:].view(B, C)
    shifted.copy_(p.z)
    for a, b in zip(shl_fused_cuda(p.z.to(DEV), *args), shl_fused_cuda(shifted, *args)):
        assert torch.equal(a, b)


@needs_gpu
def test_32_bit_positions_past_65536_labels(_staging):
    # bf16 rows of 70000 labels still fit shared memory; past 65536 the position map is int32.
    p = _problem([40000, 20000, 9000, 999, 1], 3, torch.bfloat16, seed=22)
    assert segment_position(p.seg.order).dtype == torch.int32
    got, _ = _fused(p, "sum")
    _assert_matches(got, _reference(p, "sum"), torch.bfloat16, p.seg)


@needs_gpu
def test_flat_schedule_falls_back_when_its_statistics_do_not_fit(_staging):
    # fp32 rows of 40000 labels fit shared memory, not with the flat schedule's statistics
    # of 5000 segments: the group schedule takes them.
    p = _problem([8] * 4999 + [40000 - 8 * 4999], 3, torch.float32, seed=23, pos_p=0.001)
    got, _ = _fused(p, "none")
    _assert_matches(got, _reference(p, "none"), torch.float32, p.seg)


@needs_gpu
@pytest.mark.parametrize("last", [1000, 1003], ids=["whole_packs", "head_and_tail"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_staging_across_rows(dtype, last, _staging):
    # 16-byte packs: cp.async staging, and a grid cut to the resident blocks, each staging its
    # next row while it works (1000 rows: several per block); C = 4099: rows start at every
    # offset from a 16-byte boundary (head and tail one element at a time).
    p = _problem([2000, 1, 1000, 95, last], 1000, dtype, seed=25)
    got, _ = _fused(p, "mean")
    _assert_matches(got, _reference(p, "mean"), dtype, p.seg)


WINDOW_SIZES = [3, 300, 1, 1, 40, 120, 250, 7, 300, 16, 200, 62, 300]


@needs_gpu
@pytest.mark.parametrize("case", ["out", "inplace", "identity"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_windows(dtype, case, _staging):
    # Rows of 1600 labels in windows of a few segments (window_bytes): each window a pass
    # over the row; 300 rows (several per block: ring copies of the next window or row);
    # identity order (1603 labels: rows at every offset from 16 bytes): a window's pass
    # reads only the packs of its columns.
    identity = case == "identity"
    p = _problem(WINDOW_SIZES + [3] * identity, 300, dtype, seed=26, identity=identity)
    p.pos[3, p.seg.order[[5, 100, 250]]] = True
    p.ign[3, p.seg.order[[5, 100, 250]]] = False
    win = tight_window_bytes(p.seg.offsets, dtype)
    got, _ = _fused(p, "none", inplace=case == "inplace", order=not identity,
                    window_bytes=win)
    _assert_matches(got, _reference(p, "none"), dtype, p.seg)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rows_larger_than_shared_memory(dtype, _staging):
    # fp32 rows of 150000 labels (600 KB) and fp64 rows of 40000 (320 KB): windows of the
    # device's size (fp32 about 49000 labels).
    C = 150_000 if dtype == torch.float32 else 40_000
    sizes = [5000] * (C // 10_000) + [50, 1] * 300 + [C - 5000 * (C // 10_000) - 51 * 300]
    p = _problem(sizes, 8, dtype, seed=27, pos_p=0.0005)
    got, _ = _fused(p, "mean")
    _assert_matches(got, _reference(p, "mean"), dtype, p.seg)


@needs_gpu
def test_identity_order_as_none():
    p = _problem(SIZES, 13, torch.float32, seed=9, identity=True)
    got, _ = _fused(p, "mean")
    got_none, _ = _fused(p, "mean", order=False)
    for a, b in zip(got, got_none):
        assert torch.equal(a, b)
    _assert_matches(got_none, _reference(p, "mean"), torch.float32, p.seg)


@needs_gpu
def test_deterministic():
    p = _problem([5000, 1, 300, 2, 4097] + [1] * 300, 64, torch.float32, seed=10)
    args = (p.z.to(DEV), p.pos.to(DEV, torch.uint8), p.ign.to(DEV, torch.uint8), p.seg.order.to(DEV),
            p.seg.offsets.to(DEV), p.w.to(DEV), p.eta.to(DEV), p.delta.to(DEV), 1 / 64, True)
    first, second = shl_fused_cuda(*args), shl_fused_cuda(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_gpu
def test_runs_on_the_current_stream():
    p = _problem(SIZES, 13, torch.float32, seed=11)
    expect, _ = _fused(p, "sum")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got, _ = _fused(p, "sum")
    for a, b in zip(expect, got):
        assert torch.equal(a, b)


@needs_gpu
def test_public_api_cuda_backend():
    p = _problem(SIZES, 5, torch.float32, seed=12)
    z = p.z.to(DEV).requires_grad_()
    loss = shl.segmented_harmonic_loss(z, p.pos.to(DEV), p.seg, label_weights=p.w.to(DEV),
                                       ignore=p.ign.to(DEV), backend="cuda")
    loss.backward()
    zr = p.z.double().requires_grad_()
    ref = shl_loss_reference(zr, p.pos, p.seg, p.w.double(), ign=p.ign)
    ref.backward()
    torch.testing.assert_close(loss.detach().cpu().double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.grad.cpu().double(), zr.grad, rtol=1e-5, atol=1e-6)


@needs_gpu
def test_more_than_2_31_elements():
    # B * C > 2^31: offsets into z/pos/grad need 64-bit indexing; checks the last row.
    B, C = 32769, 65537
    if torch.cuda.mem_get_info()[0] < 20 * 2**30:
        pytest.skip("needs 20 GiB of free GPU memory")
    z = torch.randn(B, C, dtype=torch.bfloat16, device=DEV)
    pos = torch.zeros(B, C, dtype=torch.uint8, device=DEV)
    pos[-1, ::97] = 1
    pos[0, 5] = 1
    offsets = torch.cat([torch.arange(0, C, 64), torch.tensor([C])]).to(DEV)  # 1024 x 64, 1
    grad = torch.full((B, C), float("nan"), dtype=torch.bfloat16, device=DEV)
    loss, grad, _ = shl_fused_cuda(z, pos, None, None, offsets, None, None, None, 1.0, False,
                                   grad)
    assert not torch.isnan(grad).any()
    seg = shl.Segmentation(C, torch.arange(C), offsets.cpu(), torch.zeros(C, dtype=torch.int64))
    for row in (0, B - 1):
        zr = z[row:row + 1].cpu().double().requires_grad_()
        ref = shl_loss_reference(zr, pos[row:row + 1].cpu().bool(), seg, reduction="sum")
        (rg,) = torch.autograd.grad(ref, zr)
        torch.testing.assert_close(loss[row].cpu().double(), ref.detach(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grad[row].cpu().double(), rg[0], rtol=2 ** -7, atol=1e-5)
