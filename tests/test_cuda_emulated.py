"""The CUDA SHL kernel (csrc/shl_cuda.cu) run without a GPU: built as host C++ against the
emulator in tests/cuda_emulator (one std::thread per CUDA thread, real barriers for
__syncthreads and the warp shuffles), checked against the PyTorch reference on small
problems. This covers the kernel's logic (staging, segment passes, block/warp/lane groups,
reductions, in place, every output written) wherever g++ and the CUDA headers are; the GPU
runs of tests/test_cuda_kernel.py and tests/test_gpu.py cover the real device."""
from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import subprocess
from dataclasses import astuple
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_cuda_kernel import (
    DTYPES,
    SIZES,
    _acc,
    _assert_matches,
    _problem,
    _reference,
    block_wide_problem,
    tight_window_bytes,
    with_empty_segments,
    without_delta,
)
from test_elementwise_kernels import at_offset

from shl_kernels.derived import segment_position, segment_schedule
from shl_kernels.fused import FusedSHL, kernel_outputs
from shl_kernels.kernels_elementwise import KINDS, ElemSpec, elementwise_cpu
from shl_kernels.reference import shl_loss_reference
from shl_kernels.segmentation import Segmentation

ROOT = Path(__file__).resolve().parent.parent
# SHL_EMU_CSRC: another csrc/ (e.g. an older checkout's) to build, for differential runs.
CSRC = Path(os.environ.get("SHL_EMU_CSRC", ROOT / "csrc"))
_DTYPE_ENUM = {torch.float32: 1, torch.float64: 2, torch.float16: 3, torch.bfloat16: 4,
               torch.int32: 6, torch.int64: 7}


def _cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (from nvcc's own settings), or None."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    run = subprocess.run([nvcc, "-v", "-x", "cu", "-E", "/dev/null", "-o", "/dev/null"],
                         capture_output=True, text=True, check=False)
    for inc in re.findall(r'-I"?([^" ]+)', run.stderr):
        if (Path(inc) / "cuda_bf16.h").exists():
            return Path(inc)
    return None


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    inc, gxx = _cuda_include(), shutil.which("g++")
    if inc is None or gxx is None:
        pytest.skip("needs nvcc's CUDA headers and g++")
    out = tmp_path_factory.mktemp("cuda_emulated") / "shl_cuda_emulated.so"
    emu = ROOT / "tests" / "cuda_emulator"
    cmd = [gxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-pthread", "-DSHL_CUDA_EMULATION",
           "-DSHL_WITH_CUDA", "-Wno-unknown-pragmas", "-Wno-attributes", f"-I{emu}",
           f"-I{CSRC}", f"-I{inc}", "-x", "c++", str(CSRC / "shl_cuda.cu"),
           str(CSRC / "elementwise_cuda.cu"), str(CSRC / "targets_cuda.cu"), "-x", "none",
           str(emu / "shl_cuda_emulated.cpp"),
           "-o", str(out)]
    build = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr[-4000:]
    so = ctypes.CDLL(str(out))
    so.shl_emulated_fused.restype = ctypes.c_char_p
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    so.shl_emulated_fused.argtypes = [p, ctypes.c_int, i64, i64, i64, p, p, p, p, p, p, p,
                                      ctypes.c_double, p, p, p, p, ctypes.c_int, ctypes.c_int,
                                      p, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int, p, p,
                                      ctypes.c_int, i64, ctypes.c_int]
    d = ctypes.c_double
    so.emulated_take_max_smem.restype = ctypes.c_int64
    so.targets_emulated_to_mask.restype = ctypes.c_char_p
    so.targets_emulated_to_mask.argtypes = [p, ctypes.c_int, i64, p, p]
    so.csr_emulated_to_mask.restype = ctypes.c_char_p
    so.csr_emulated_to_mask.argtypes = [p, ctypes.c_int, p, ctypes.c_int, i64, i64, i64, p, p]
    so.elementwise_emulated_fused.restype = ctypes.c_char_p
    so.elementwise_emulated_fused.argtypes = [p, ctypes.c_int, i64, i64, p, p, p, p, ctypes.c_int,
                                              d, d, d, d, d, d, ctypes.c_int, d, p, p, p, p]
    return so


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def emulated_kernel(so, z, pos, ign, order, offsets, w, eta, delta, grad_scale, need_grad_eta,
                    grad_out=None, *, reduce=False, staged=True, block_min=-1, staged_threads=0,
                    flat=True, position_bits=None, async_staging=True, window_bytes=0,
                    windows=True, staging_only=False):
    """fused.FusedKernel over the emulated CUDA kernel (CPU tensors standing in for device
    memory); the same extra arguments as kernels_cuda.shl_fused_cuda (window_bytes="tight":
    tight_window_bytes), and windows=False to withhold the host offsets (no windows)."""
    if window_bytes == "tight":
        window_bytes = tight_window_bytes(offsets, z.dtype)
    loss, grad, grad_eta = kernel_outputs(z, offsets, need_grad_eta, grad_out)
    total = torch.empty((), dtype=loss.dtype) if reduce else None
    geta_total = (torch.empty(grad_eta.shape[1], dtype=loss.dtype)
                  if reduce and grad_eta is not None else None)
    for t in (loss, grad_eta, total, geta_total):  # poisoned: every element must be written
        if t is not None:
            t.fill_(float("nan"))
    if grad_out is None:
        grad.fill_(float("nan"))
    position = (segment_position(order, position_bits) if staged and order is not None
                else None)
    err = so.shl_emulated_fused(
        _ptr(z), _DTYPE_ENUM[z.dtype], z.shape[0], z.shape[1], offsets.numel() - 1, _ptr(pos),
        _ptr(ign), _ptr(order), _ptr(offsets), _ptr(w), _ptr(eta), _ptr(delta),
        float(grad_scale), _ptr(loss), _ptr(grad), _ptr(grad_eta), _ptr(position),
        0 if position is None else 8 * position.element_size(), int(staged),
        _ptr(segment_schedule(offsets)), block_min, staged_threads, int(flat),
        int(async_staging), _ptr(total), _ptr(geta_total), int(windows), window_bytes,
        int(staging_only))
    if err:
        raise RuntimeError(err.decode())
    return (total, grad, geta_total) if reduce else (loss, grad, grad_eta)


class _Reducing:
    """The emulated kernel as FusedSHL sees kernels_cuda.shl_fused_cuda: it reduces on the
    device for "mean"/"sum" (the row-sums launch)."""

    reduces = True

    def __init__(self, so, **kw):
        self.so, self.kw = so, kw

    def __call__(self, *args, **kw):
        return emulated_kernel(self.so, *args, **self.kw, **kw)


def _fused(so, p, reduction="mean", *, order=True, inplace=False, **kw):
    """Loss and (z, eta, delta) gradients through FusedSHL with the emulated kernel."""
    z = p.z.clone().requires_grad_()
    eta = p.eta.clone().requires_grad_()
    delta = p.delta.clone().requires_grad_() if p.delta is not None else None
    kernel = _Reducing(so, **kw)
    zin = z * 1.0 if inplace else z  # in place needs a non-leaf to overwrite
    loss = FusedSHL.apply(kernel, zin, p.pos.to(torch.uint8), p.ign.to(torch.uint8),
                          p.seg.order if order else None, p.seg.offsets, p.w, eta, delta,
                          reduction, inplace)
    up = torch.ones_like(loss)
    grads = torch.autograd.grad(loss, [t for t in (z, eta, delta) if t is not None], up)
    return [loss.detach(), *grads]


# staged with the flat schedule and 512 threads per block (default) or 256, staged with the
# group schedule, staged with 32-bit positions (the default's are 16-bit at these sizes),
# staged with plain loads instead of cp.async (where the row is vectorised), staged in
# windows of a few segments (as rows too large for shared memory are), or the unstaged kernel
KERNELS = {"staged": {"staged": True}, "staged256": {"staged": True, "staged_threads": 256},
           "groups": {"staged": True, "flat": False},
           "position32": {"staged": True, "position_bits": 32},
           "sync": {"staged": True, "async_staging": False},
           "windows": {"staged": True, "window_bytes": "tight"},
           "unstaged": {"staged": False}}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(lib, dtype, kernel):
    p = _problem(SIZES, 5, dtype, seed=0)
    for reduction in ("mean", "none"):
        _assert_matches(_fused(lib, p, reduction, **KERNELS[kernel]), _reference(p, reduction),
                        dtype, p.seg)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_matches_reference_without_logit_offsets(lib, dtype, kernel):
    """No delta (the usual call) with weights, null logits and ignored labels: the staged
    kernels' 16-byte variants compiled without logit offsets."""
    p = without_delta(_problem(SIZES + [300], 5, dtype, seed=40))
    for reduction in ("mean", "none"):
        _assert_matches(_fused(lib, p, reduction, **KERNELS[kernel]), _reference(p, reduction),
                        dtype, p.seg)


@pytest.mark.parametrize("staged", [True, False], ids=["staged", "unstaged"])
def test_identity_order_and_16_byte_staging(lib, staged):
    # C = 8 * 40: bf16 rows are staged 16 bytes at a time (V = 8); identity order: no
    # position map.
    p = _problem([40] * 8, 3, torch.bfloat16, seed=1, identity=True)
    _assert_matches(_fused(lib, p, "sum", order=False, staged=staged), _reference(p, "sum"),
                    torch.bfloat16, p.seg)
    _assert_matches(_fused(lib, p, "sum", staged=staged), _reference(p, "sum"),
                    torch.bfloat16, p.seg)


@pytest.mark.parametrize("block_min", [-1, 0, 1 << 40], ids=["default", "all", "none"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_block_wide_segments(lib, kernel, block_min):
    """test_cuda_kernel.block_wide_problem; block_min moves every segment to the whole block
    (0) or none (2^40)."""
    p = block_wide_problem(torch.float32)
    _assert_matches(_fused(lib, p, "none", block_min=block_min, **KERNELS[kernel]),
                    _reference(p, "none"), torch.float32, p.seg)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_flat_share_boundaries(lib, kernel):
    """fp32 rows of 1536 labels: the flat schedule gives each of 512 threads 3 positions.
    Segments ending exactly on a share boundary (no thread closes them from a head piece),
    ending one before or after it, spanning many shares and warps (the 900-label segment:
    several positives in row 3, closed by pass 2 over its bitmask), singletons."""
    sizes = [3, 6, 2, 4, 900, 1, 1, 1, 300, 5, 7, 150, 96, 60]
    assert sum(sizes) == 1536
    p = _problem(sizes, 5, torch.float32, seed=21)
    p.pos[3, p.seg.order[[20, 400, 700]]] = True
    p.ign[3, p.seg.order[[20, 400, 700]]] = False
    _assert_matches(_fused(lib, p, "none", **KERNELS[kernel]), _reference(p, "none"),
                    torch.float32, p.seg)


@pytest.mark.parametrize("delta", [True, False], ids=["offsets", "no_offsets"])
@pytest.mark.parametrize("kernel", ["staged", "staged256", "windows"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flat_runs(lib, dtype, kernel, delta):
    """Rows of 4600 labels: the flat schedule gives each thread 9-10 positions (18-20 in
    blocks of 256), stepped in runs of 4 (one max test and one rescale per run) where a run
    lies inside one segment and label by label where it holds a segment's end or the range's:
    segments of 1-13 labels end at every place in a run. Logits rising along each segment
    (a new max at every label, so within runs), falling, at scale 24 and at scale 3."""
    small = [1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 13] * 12
    sizes = small[:66] + [2000] + small[66:] + [900, 700, 148]
    assert sum(sizes) == 4600
    p = _problem(sizes, 5, dtype, seed=42)
    order = p.seg.order
    p.z[0, order] = torch.linspace(-4, 4, 4600).to(dtype)
    p.z[1, order] = torch.linspace(4, -4, 4600).to(dtype)
    p.z[2] = (p.z[2].double() * 8).to(dtype)  # scale 24: near one-hot softmaxes
    if not delta:
        p = without_delta(p)
    for reduction in ("mean", "none"):
        _assert_matches(_fused(lib, p, reduction, **KERNELS[kernel]), _reference(p, reduction),
                        dtype, p.seg)


@pytest.mark.parametrize("sizes", [[500, 1, 300, 7, 200, 16], [500, 1, 300, 7, 200, 19], [2, 3]],
                         ids=["whole_packs", "head_and_tail", "tiny"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_async_staging_across_rows(lib, dtype, sizes):
    """Rows in 16-byte packs are copied in with cp.async (the emulator does a copy only at
    the wait covering it: a read before would see poison), and the grid is cut to the
    resident blocks (4 emulated SMs x 2): 21 rows make blocks of 2-3 rows, each staging its
    next row's first packs while it works. With C = 1027 rows start at every offset from a
    16-byte boundary (a head and a tail of single elements); C = 5 is all head and tail.
    The same numbers as plain loads (one element at a time where C is not a multiple of
    the pack), bitwise."""
    p = _problem(sizes, 21, dtype, seed=24)
    want = _fused(lib, p, "none", async_staging=False)
    got = _fused(lib, p, "none")
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    _assert_matches(got, _reference(p, "none"), dtype, p.seg)


def test_flat_schedule_falls_back_when_its_statistics_do_not_fit(lib):
    """fp32 rows of 40000 labels fit shared memory (the emulated device's 227 KB), but not
    with the flat schedule's statistics of 5000 segments (16 bytes each): the group schedule
    takes them (a launch asking for more shared memory than the device has would abort)."""
    sizes = [8] * 4999 + [40000 - 8 * 4999]
    p = _problem(sizes, 2, torch.float32, seed=23, pos_p=0.001)
    _assert_matches(_fused(lib, p, "none"), _reference(p, "none"), torch.float32, p.seg)


@pytest.mark.parametrize("variant", [{}, {"async_staging": False}, {"staged_threads": 256},
                                     {"inplace": True}, {"identity": True},
                                     {"identity": True, "edges": True}],
                         ids=["async", "sync", "256threads", "inplace", "identity_order",
                              "identity_order_edges"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_windows(lib, dtype, variant):
    """Rows of 1600 labels (a multiple of every pack: plain loads take 16 bytes too) in
    windows of a few segments (window_bytes: a window holds at most 340 labels): the row is
    read once per window, each window's positions staged and their gradients written,
    packs of the gradient split between windows element by element; segments of one label,
    of 300 (several positives in row 3); ring copies of the next window of the same row while
    a window computes (async; in place: the gradient of the window before is already written
    over z; identity order: no position map, a window's pass visits only the packs of its
    columns; with 1603 labels rows start at every offset from a 16-byte boundary: packs
    and single head and tail elements). Results as the whole row staged at once and as the
    reference."""
    sizes = [3, 300, 1, 1, 40, 120, 250, 7, 300, 16, 200, 62, 300]
    assert sum(sizes) == 1600
    if variant.get("edges"):
        sizes.append(3)
    identity = variant.get("identity", False)
    p = _problem(sizes, 11, dtype, seed=31, identity=identity)
    p.pos[3, p.seg.order[[5, 100, 250]]] = True
    p.ign[3, p.seg.order[[5, 100, 250]]] = False
    win = (340 * dtype.itemsize + 15) // 16 * 16 + 3 * 16 + 8 * 16
    inplace = variant.get("inplace", False)
    kw = {k: v for k, v in variant.items() if k not in ("inplace", "identity", "edges")}
    if identity:
        kw["order"] = False
    lib.emulated_take_max_smem()
    got = _fused(lib, p, "none", window_bytes=win, inplace=inplace, **kw)
    smem = lib.emulated_take_max_smem()  # the window's (and the ring's, with cp.async)
    assert 0 < smem and (smem <= win or kw.get("async_staging", True))
    whole = _fused(lib, p, "none", **kw)
    # Segments crossing shares add up differently (so do runs of 4 where shares start
    # elsewhere): fp32 sums within 1e-5; a gradient rounded to 16 bits may then round the
    # other way (one unit roundoff), and the delta gradient sums those over rows.
    loss, gz, geta, gdelta = got
    half = torch.finfo(dtype).eps if dtype in (torch.bfloat16, torch.float16) else 0.0
    for a, b, rtol, atol in ((loss, whole[0], 1e-5, 1e-6), (gz, whole[1], max(half, 1e-5), 1e-6),
                             (geta, whole[2], 1e-5, 1e-6),
                             (gdelta, whole[3], 1e-5, 1e-6 + half * gz.abs().max().item())):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    _assert_matches(got, _reference(p, "none"), dtype, p.seg)


def test_windows_with_empty_segments(lib):
    """Empty segments (only raw offsets have them) at the start, inside and at the end of
    windows add nothing: the null event alone, loss 0, eta gradient 0. The windowed kernel
    with them gives the results of the kernel without them."""
    sizes = [3, 300, 1, 1, 40, 120, 250, 7, 300, 16, 200, 62, 300]
    p = _problem(sizes, 5, torch.float32, seed=34)
    args = (p.z, p.pos.to(torch.uint8), p.ign.to(torch.uint8), p.seg.order)
    base = emulated_kernel(lib, *args, p.seg.offsets, p.w, p.eta, p.delta, 1.0, True)
    # new empty segments go before these segment ids
    offsets, eta, keep, empty = with_empty_segments(p.seg.offsets, p.eta, [0, 3, 8, 11, 13])
    win = 340 * 4 + 3 * 16 + 8 * 16
    loss, grad, geta = emulated_kernel(lib, *args, offsets, p.w, eta, p.delta, 1.0, True,
                                       window_bytes=win)
    torch.testing.assert_close(loss, base[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, base[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(geta[:, keep], base[2], rtol=1e-5, atol=1e-6)
    assert torch.equal(geta[:, empty], torch.zeros(5, len(empty)))


@pytest.mark.parametrize("why", ["segment_too_large", "too_many_windows", "no_host_offsets"])
def test_windows_not_possible_fall_back_to_unstaged(lib, why):
    """Rows that cannot take windows (a segment alone larger than a window; more than 64
    windows; no host copy of offsets) are gathered by the unstaged kernel: same results."""
    sizes = [30] * 100 if why == "too_many_windows" else [10, 400, 20, 70]
    p = _problem(sizes, 4, torch.float32, seed=32)
    win = 200 * 4 + 2 * 16 + 4 * 16  # 200 labels
    kw = {"windows": False} if why == "no_host_offsets" else {}
    lib.emulated_take_max_smem()
    got = _fused(lib, p, "none", window_bytes=40 * 4 + 16 + 16 if why == "too_many_windows"
                 else win, **kw)
    assert lib.emulated_take_max_smem() == 0  # unstaged
    _assert_matches(got, _reference(p, "none"), torch.float32, p.seg)


def test_rows_larger_than_shared_memory(lib):
    """fp32 rows of 70000 labels (280 KB: more than the emulated device's 227 KB per block)
    take two windows of the device's own size (with room for the asynchronous staging's
    ring): the launch stays within the device's shared memory (an emulated launch asking for
    more aborts) and matches the reference."""
    sizes = [5000] * 10 + [50, 1] * 300 + [70000 - 50000 - 51 * 300]
    p = _problem(sizes, 2, torch.float32, seed=33, pos_p=0.0005)
    lib.emulated_take_max_smem()
    got = _fused(lib, p, "none")
    assert 150_000 < lib.emulated_take_max_smem() <= 232448  # staged, in windows
    _assert_matches(got, _reference(p, "none"), torch.float32, p.seg)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_null_logits_of_minus_infinity(lib, kernel):
    """eta = -inf (no null class): a row without a positive has an infinite loss, as in the
    reference, and the other rows stay finite although staged rows hold -inf for ignored
    labels and positives (the max starts at the lowest finite value, so exp(-inf - M) = 0)."""
    p = _problem([40, 1, 30, 3, 200], 4, torch.float32, seed=0)
    p.eta[:] = float("-inf")
    got, want = _fused(lib, p, "none", **KERNELS[kernel]), _reference(p, "none")
    assert torch.equal(got[0].isinf(), want[0].isinf()) and torch.equal(
        got[0].isnan(), want[0].isnan())
    finite = want[0].isfinite()
    assert finite.sum() >= 1
    torch.testing.assert_close(got[0][finite].double(), want[0][finite], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1][finite].double(), want[1][finite], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("staged", [True, False], ids=["staged", "unstaged"])
def test_inplace(lib, staged):
    p = _problem(SIZES, 4, torch.float32, seed=3)
    want = _fused(lib, p, "mean", staged=staged)
    got = _fused(lib, p, "mean", staged=staged, inplace=True)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_huge_logits_with_several_positives(lib, kernel):
    """Logits at scale 150 with many positives: positives hundreds apart in one segment,
    negatives far below the top one (with the positives in the shift, A and the lower
    positives' exp(u_p - M) underflowed together in fp32: loss -inf). As the reference."""
    p = _problem([40, 1, 7, 300, 3, 16, 2], 6, torch.float32, seed=43, pos_p=0.3, scale=150.0)
    got = _fused(lib, p, "none", **KERNELS[kernel])
    assert torch.isfinite(got[0]).all()
    _assert_matches(got, _reference(p, "none"), torch.float32, p.seg)


@pytest.mark.parametrize("staged", [True, False], ids=["staged", "unstaged"])
def test_special_values(lib, staged):
    """NaN and inf logits: the same NaN rows and finite rows as the reference."""
    p = _problem([1200, 1, 30, 3], 6, torch.float32, seed=9, pos_p=0.0, ign_p=0.0)
    big, single = p.seg.order[:1200], p.seg.order[1200]
    p.z[0, big[60]] = float("nan")      # negative, block-wide segment
    p.ign[0, big[61]] = True            # ignored in a NaN segment: its gradient stays 0
    p.z[1, big[3]] = float("inf")       # +inf negative
    p.pos[2, big[7]] = True
    p.z[2, big[7]] = float("nan")       # the only positive of the big segment
    p.pos[3, single] = True
    p.z[3, single] = float("inf")       # +inf positive, singleton segment
    p.ign[4, big[9]] = True
    p.z[4, big[9]] = float("nan")       # ignored: takes no part
    p.z[5, big[11]] = float("-inf")     # a -inf negative is just absent
    loss, gz, *_ = _fused(lib, p, "none", staged=staged)
    assert loss[:4].isnan().all()
    assert gz[4, big[9]] == 0 and gz[0, big[61]] == 0
    p.z[4, big[9]] = 0.0  # the reference's autograd would spread the ignored NaN
    want = _reference(p, "none")
    torch.testing.assert_close(loss[4:].double(), want[0][4:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gz[4:].double(), want[1][4:], rtol=1e-5, atol=1e-6)


def test_grad_scale_and_loss_scaling(lib):
    # The kernel's loss rows carry grad_scale (so the reduced loss is one sum), like the
    # gradient; an empty segment gets no gradient and a zero eta gradient.
    p = _problem(SIZES, 3, torch.float64, seed=4)
    offsets = torch.cat([p.seg.offsets[:3], p.seg.offsets[2:]])  # segment 2 empty
    eta = torch.cat([p.eta[:2], torch.tensor([0.3], dtype=_acc(torch.float64)), p.eta[2:]])
    args = (p.z, p.pos.to(torch.uint8), p.ign.to(torch.uint8), p.seg.order, offsets, p.w, eta,
            p.delta)
    l1, g1, e1 = emulated_kernel(lib, *args, 1.0, True)
    l2, g2, e2 = emulated_kernel(lib, *args, 0.25, True)
    torch.testing.assert_close(l2, l1 * 0.25, rtol=1e-15, atol=0)
    torch.testing.assert_close(g2, g1 * 0.25, rtol=1e-15, atol=0)
    torch.testing.assert_close(e2, e1 * 0.25, rtol=1e-15, atol=0)
    assert torch.equal(e1[:, 2], torch.zeros(3, dtype=torch.float64))


def _elementwise_emulated(so, z, pos, ign, weight, pos_weight, spec, grad_scale, *,
                          loss_rows=None, loss_el=None, grad=None, loss_total=None):
    """kernels_elementwise.ElementwiseKernel over the emulated csrc/elementwise_cuda.cu."""
    kind, alpha, gamma, gamma_pos, gamma_neg, clip, eps, detach = astuple(spec)
    err = so.elementwise_emulated_fused(
        _ptr(z), _DTYPE_ENUM[z.dtype], z.shape[0], z.shape[1], _ptr(pos), _ptr(ign),
        _ptr(weight), _ptr(pos_weight), kind, alpha, gamma, gamma_pos, gamma_neg, clip, eps,
        int(detach), grad_scale, _ptr(loss_rows), _ptr(loss_el), _ptr(grad), _ptr(loss_total))
    if err:
        raise RuntimeError(err.decode())


_SPECS = {"bce": ElemSpec(KINDS["bce"]), "focal": ElemSpec(KINDS["focal"], alpha=0.25, gamma=2.0),
          "asl": ElemSpec(KINDS["asl"], gamma_pos=1.0, gamma_neg=4.0, clip=0.05),
          "asl_frac": ElemSpec(KINDS["asl"], gamma_pos=1.5, gamma_neg=2.5, clip=0.0,
                               detach=True)}


@pytest.mark.parametrize("offset", [0, 1], ids=["packs", "unaligned"])
@pytest.mark.parametrize("shape", [(7, 37), (3, 1030), (1, 1), (5, 64), (2, 2056)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss", list(_SPECS))
def test_elementwise_matches_cpu_kernel(lib, loss, dtype, shape, offset):
    """The CUDA BCE/focal/ASL kernel (warp per row below 1024 labels, block per row above, and
    its row-sum launch) against the CPU kernel (tested against the PyTorch formulas in
    test_elementwise_kernels), with weights, positive weights and ignored pairs; every output
    written (NaN-poisoned). Aligned arrays move in 16-byte packs (rows starting inside a pack:
    single-element heads and tails); logits one element off alignment take the
    element-by-element kernel."""
    B, C = shape
    if offset and (loss != "bce" or C == 1):
        pytest.skip("the unaligned kernel is the same code for every loss")
    g = torch.Generator().manual_seed(B * C)
    acc = _acc(dtype)
    z = at_offset((torch.randn(B, C, generator=g, dtype=torch.float64) * 4).to(dtype), offset)
    pos = (torch.rand(B, C, generator=g) < 0.3).to(torch.uint8)
    ign = (torch.rand(B, C, generator=g) < 0.1).to(torch.uint8)
    w, pw = torch.rand(C, generator=g).to(acc) + 0.5, torch.rand(C, generator=g).to(acc) + 0.5
    out = {}
    for name, kernel in (("cpu", elementwise_cpu),
                         ("cuda", functools.partial(_elementwise_emulated, lib))):
        rows = torch.full((B,), float("nan"), dtype=acc)
        el = torch.full((B, C), float("nan"), dtype=dtype)
        grad = torch.full((B, C), float("nan"), dtype=dtype)
        kernel(z, pos, ign, w, pw, _SPECS[loss], 0.5, loss_rows=rows, grad=grad)
        kernel(z, pos, ign, w, pw, _SPECS[loss], 1.0, loss_el=el)
        # the rows' sum times grad_scale in the same call (a second launch on the GPU)
        total = torch.full((), float("nan"), dtype=acc)
        kernel(z, pos, ign, w, pw, _SPECS[loss], 0.5, loss_rows=torch.empty(B, dtype=acc),
               loss_total=total)
        torch.testing.assert_close(total, rows.sum() * 0.5, rtol=1e-12 if acc == torch.float64
                                   else 1e-5, atol=0)
        out[name] = (rows, el, grad, total)
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    for got, want in zip(out["cuda"], out["cpu"], strict=True):
        assert not got.isnan().any()
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("kernel", ["staged", "windows"])
def test_staging_only_probe(lib, kernel):
    """staging_only (kernel_bandwidth's floor of a staged row's way in and out): rows staged and
    unstaged without being computed: the gradient is the logits, with -inf at the positives
    and ignored labels (what staging writes there), loss and eta-gradient rows 0."""
    p = _problem(SIZES + [1100], 5, torch.bfloat16, seed=21)
    loss, grad, geta = emulated_kernel(lib, p.z, p.pos.to(torch.uint8), p.ign.to(torch.uint8),
                                       p.seg.order, p.seg.offsets, p.w, p.eta, None, 1.0, True,
                                       staging_only=True, **KERNELS[kernel])
    want = p.z.masked_fill(p.pos | p.ign, float("-inf"))
    assert torch.equal(grad, want)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(geta, torch.zeros_like(geta))


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_without_optional_inputs(lib, kernel):
    """No label weights, null logits, logit offsets or ignore mask (all null pointers)."""
    p = _problem(SIZES + [1100], 4, torch.float32, seed=12)
    loss, grad, geta = emulated_kernel(lib, p.z, p.pos.to(torch.uint8), None, p.seg.order,
                                       p.seg.offsets, None, None, None, 1.0, False,
                                       **KERNELS[kernel])
    assert geta is None
    z = p.z.double().requires_grad_()
    ref = shl_loss_reference(z, p.pos, p.seg, reduction="none")
    (gref,) = torch.autograd.grad(ref.sum(), z)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), gref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_huge_logits(lib, kernel):
    """Logits of +-100 and beyond: every exp is taken after the max shift, so nothing
    overflows; fp32 stays within fp32 error of the fp64 reference."""
    p = _problem(SIZES + [1500], 4, torch.float32, seed=13, scale=60.0)
    _assert_matches(_fused(lib, p, "none", **KERNELS[kernel]), _reference(p, "none"),
                    torch.float32, p.seg)


@pytest.mark.parametrize("B", [3, 257])
def test_row_sums_on_the_device(lib, B):
    """reduce=True: the loss and eta gradient summed over rows by the second launch (blocks
    of 256 threads: 257 rows take two rounds) equal the sums of the rows. (Unstaged, tiny
    rows: the emulator pays for every barrier of every block.)"""
    p = _problem([2, 1, 3], B, torch.float64, seed=14)
    args = (p.z, p.pos.to(torch.uint8), p.ign.to(torch.uint8), p.seg.order, p.seg.offsets, p.w,
            p.eta, p.delta, 1.0 / B, True)
    rows, grad, geta_rows = emulated_kernel(lib, *args, staged=False)
    total, grad2, geta = emulated_kernel(lib, *args, reduce=True, staged=False)
    assert total.dim() == 0 and geta.shape == (3,)
    torch.testing.assert_close(total, rows.sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(geta, geta_rows.sum(0), rtol=1e-12, atol=1e-15)
    assert torch.equal(grad, grad2)
    no_eta = emulated_kernel(lib, *args[:-1], False, reduce=True, staged=False)
    assert no_eta[2] is None and torch.equal(no_eta[0], total)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("n", [0, 1, 1300], ids=str)
def test_targets_to_mask(lib, dtype, n):
    """csrc/targets_cuda.cu: the mask (t != 0) and the flag of values other than 0 and 1,
    set by whichever thread sees one (the flag starts poisoned: the launch clears it)."""
    from test_masks import BAD, binary, expected

    for bad_value in [None, *BAD]:
        t = binary((1, n), dtype, seed=n).view(-1)
        if bad_value is not None and n:
            t[n // 2] = bad_value
        out = torch.full((n,), 9, dtype=torch.uint8)
        flag = torch.tensor([-5], dtype=torch.int32)
        err = lib.targets_emulated_to_mask(_ptr(t), _DTYPE_ENUM[dtype], n, _ptr(out), _ptr(flag))
        assert err is None, err
        want, want_bad = expected(t)
        assert torch.equal(out, want) and flag.item() == int(want_bad)


@pytest.mark.parametrize("ptr_dtype, ids_dtype", [(torch.int64, torch.int64),
                                                  (torch.int32, torch.int32),
                                                  (torch.int64, torch.int32)], ids=str)
def test_csr_to_mask(lib, ptr_dtype, ids_dtype):
    """csrc/targets_cuda.cu's CSR conversion (a block per row, ids set with word-wide atomics
    that also find duplicates) against the CPU one: the mask, and every check's value on good
    pairs (5 rows of up to 300 ids: rows sharing 4-byte words at C=7), malformed indptr, ids
    out of range and duplicates (check[] and the mask start poisoned)."""
    from test_csr_targets import random_csr

    from shl_kernels.backends import native

    def both(indptr, indices, B, C):
        out = {}
        for name in ("cpu", "cuda"):  # (whole 4-byte words, as masks.csr_mask allocates)
            mask = torch.full((-(-B * C // 4) * 4,), 9, dtype=torch.uint8)[:B * C].view(B, C)
            if name == "cpu":
                from torch.utils.dlpack import to_dlpack
                check = native().csr_to_mask_cpu(to_dlpack(indptr), to_dlpack(indices),
                                                 to_dlpack(mask))
                check = [int(v) for v in check]
            else:
                buf = torch.full((4,), -7, dtype=torch.int64)
                err = lib.csr_emulated_to_mask(
                    _ptr(indptr), _DTYPE_ENUM[indptr.dtype], _ptr(indices),
                    _DTYPE_ENUM[indices.dtype], B, C, indices.numel(), _ptr(mask), _ptr(buf))
                assert err is None, err
                check = buf.tolist()
            out[name] = (mask, check)
        return out

    for B, C, per_row in [(5, 7, 7), (3, 1000, 300), (1, 1, 1)]:
        (ptr, ids), want = random_csr(B, C, seed=C, max_per_row=per_row)
        ptr, ids = ptr.to(ptr_dtype), ids.to(ids_dtype)
        out = both(ptr, ids, B, C)
        for mask, check in out.values():
            assert torch.equal(mask, want)
            assert check[0] == 0 and check[3] == 0
            if ids.numel():
                assert (check[1], check[2]) == (int(ids.min()), int(ids.max()))
    bad_cases = [  # (indptr, indices, C): which check fires
        ([0, 2, 1], [1, 2], 4),  # decreasing indptr
        ([1, 1, 2], [0, 1], 4),  # not starting at 0
        ([0, 1, 3], [0, 1], 4),  # not ending at nnz
        ([0, 1, 2], [-3, 9], 4),  # ids out of range
        ([0, 2, 4], [0, 3, 2, 2], 4),  # duplicate in a row
        ([0, 2, 4], [1, 2, 2, 1], 4),  # the same ids in different rows: fine
    ]
    for indptr, indices, C in bad_cases:
        p, i = torch.tensor(indptr, dtype=ptr_dtype), torch.tensor(indices, dtype=ids_dtype)
        out = both(p, i, 2, C)
        cpu, cuda = out["cpu"][1], out["cuda"][1]
        assert bool(cuda[0]) == bool(cpu[0])
        if not cpu[0]:
            assert cuda[1:3] == cpu[1:3]
            if cpu[1] >= 0 and cpu[2] < C:
                assert cuda[3] == cpu[3] and torch.equal(out["cuda"][0], out["cpu"][0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_positives_in_one_segment_within_the_kept_limit(lib, dtype):
    """A segment of 18475 labels, 90% of them positive, in the flat schedule: one thread (the
    segment's closer) sums its positives' losses in a running float32 sum, 4e-5 of the row
    loss off with bf16 logits (torch: 2e-7). Kept (README, Numerics): segments of labels that
    never co-occur hold about one positive per row, and a compensated sum there made the
    default kernel recompute its ranges per row (SASS: +80 instructions). This pins the limit."""
    g = torch.Generator().manual_seed(3)
    C = 18475
    seg = Segmentation.from_segments([torch.randperm(C, generator=g).tolist()], C)
    z = torch.randn(3, C, generator=g, dtype=torch.float64).to(dtype)
    pos = torch.rand(3, C, generator=g) < 0.9
    p = SimpleNamespace(seg=seg, z=z, pos=pos, ign=torch.zeros_like(pos), w=None,
                        eta=torch.zeros(1), delta=None)
    exact = shl_loss_reference(z.double(), pos, seg, reduction="none")

    def rel(loss):
        return ((loss.double() - exact).abs() / exact.abs()).max().item()

    acc = shl_loss_reference(z.float(), pos, seg, reduction="none")
    got = _fused(lib, p, "none", **KERNELS["staged"])[0]
    assert rel(got) <= 3 * rel(acc) + 1e-4, (rel(got), rel(acc))
