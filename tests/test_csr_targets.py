"""CSR targets and ignore masks (SPEC section 1) to the kernels' dense uint8 masks:
loss._csr_to_dense, through the extension's conversion (masks.csr_mask: csrc/targets_cpu.cpp
here, csrc/targets_cuda.cu on GPUs and under the CUDA emulator) and through torch ops (devices
without it), against a per-row oracle, every error it raises, and its cost (no reduction over
the dense [B, C] mask, no host read but one)."""
from __future__ import annotations

import pytest
import torch
from test_api import Ops

import shl_kernels as shl
from shl_kernels import loss as loss_module
from shl_kernels.backends import native
from shl_kernels.loss import _status


@pytest.fixture(params=["native", "torch"], autouse=True)
def conversion(request, monkeypatch):
    """Every test twice: the extension's conversion, and torch ops (as without it)."""
    if request.param == "native":
        if native() is None or not hasattr(native(), "csr_to_mask_cpu"):
            pytest.skip("the extension has no CSR conversion")
    else:
        monkeypatch.setattr(loss_module, "csr_mask", lambda *a: None)
    return request.param


def random_csr(B, C, seed, dtype=torch.int64, max_per_row=6):
    """(indptr, indices) with rows of 0..max_per_row distinct ids in random order (empty
    rows included), and the dense 0/1 oracle built row by row."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_per_row + 1, (B,), generator=g)
    dense = torch.zeros(B, C, dtype=torch.uint8)
    parts = []
    for i, k in enumerate(counts.tolist()):
        ids = torch.randperm(C, generator=g)[:k]
        dense[i, ids] = 1
        parts.append(ids)
    indices = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return (indptr.to(dtype), indices.to(dtype)), dense


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("B, C", [(0, 5), (1, 1), (7, 9), (40, 301)], ids=str)
def test_matches_the_row_oracle(dtype, B, C):
    for seed in range(3):
        csr, want = random_csr(B, C, seed, dtype, max_per_row=min(C, 6))
        got = _status(csr, B, C, "targets", torch.device("cpu"))
        assert got.dtype == torch.uint8 and torch.equal(got, want)


def test_no_entries_and_the_same_id_in_different_rows():
    assert torch.equal(_status((torch.zeros(4, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)),
                               3, 5, "targets", torch.device("cpu")),
                       torch.zeros(3, 5, dtype=torch.uint8))
    got = _status((torch.tensor([0, 1, 2]), torch.tensor([3, 3])), 2, 4, "targets",
                  torch.device("cpu"))
    assert torch.equal(got, torch.tensor([[0, 0, 0, 1], [0, 0, 0, 1]], dtype=torch.uint8))


@pytest.mark.parametrize("indptr, indices, match", [
    ([1, 1, 2], [0, 1], "CSR indptr must start at 0, not decrease and end at len"),
    ([0, 2, 1], [0, 1], "CSR indptr must start at 0, not decrease"),
    ([0, 1, 3], [0, 1], r"CSR indptr must start at 0, not decrease and end at len\(indices\)=2"),
    ([0, 1, 2], [0, 4], r"label ids must be in \[0, 4\), got \[0, 4\]"),
    ([0, 1, 2], [-2, 1], r"label ids must be in \[0, 4\), got \[-2, 1\]"),
    ([0, 2, 3], [1, 1, 2], "duplicate label ids in a row"),
    ([0, 2, 4], [0, 3, 2, 2], "duplicate label ids in a row"),
    ([0, 2, 1], [9, 9], "CSR indptr must start at 0"),  # the indptr error comes first
    ([0, 1, 2], [5, 5], r"label ids must be in \[0, 4\), got \[5, 5\]"),  # before duplicates
    ([-1, 0, 2], [0, 1], "CSR indptr must start at 0"),
    ([0, 3, 2], [0, 1], "CSR indptr must start at 0"),  # beyond the ids, then back
])
def test_errors_name_the_argument(indptr, indices, match):
    with pytest.raises(ValueError, match=f"^ignore: {match}"):
        _status((torch.tensor(indptr), torch.tensor(indices)), 2, 4, "ignore",
                torch.device("cpu"))


def test_cost_stays_with_the_entries():
    # The former conversion summed the dense [B, C] mask (as int64) to find duplicates and
    # read six values back one by one: on CPU 8.2 ms at 512 x 8192, more than the fused
    # loss. Now: no reduction over [B, C] and no scalar reads (one small tensor comes back).
    csr, want = random_csr(64, 1000, seed=5)
    with Ops() as seen:
        got = _status(csr, 64, 1000, "targets", torch.device("cpu"))
    assert torch.equal(got, want)
    assert "sum.default" not in seen.ops and "_local_scalar_dense.default" not in seen.ops, \
        seen.ops


def test_loss_with_csr_targets_and_ignore_equals_dense():
    seg = shl.Segmentation.from_segments([[0, 2], [1], [3, 4]], 5)
    z = torch.randn(6, 5, dtype=torch.float64)
    (tp, ti), t = random_csr(6, 5, seed=6, max_per_row=2)
    for backend in [b for b in shl.available_backends() if b != "triton"]:
        want = shl.segmented_harmonic_loss(z, t.bool(), seg, backend=backend)
        assert torch.equal(shl.segmented_harmonic_loss(z, (tp, ti), seg, backend=backend), want)


def test_native_binding_names_bad_arguments(conversion):
    if conversion != "native":
        pytest.skip("the binding itself")
    from torch.utils.dlpack import to_dlpack

    ext = native()

    def call(indptr, indices, out):
        return ext.csr_to_mask_cpu(*(to_dlpack(t) for t in (indptr, indices, out)))

    ptr, ids = torch.tensor([0, 1, 3]), torch.tensor([2, 0, 1], dtype=torch.int32)
    out = torch.full((2, 4), 7, dtype=torch.uint8)
    assert call(ptr, ids, out) == (False, 0, 2, False)
    assert torch.equal(out, torch.tensor([[0, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.uint8))
    assert call(torch.zeros(3, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                out) == (False, 2**63 - 1, -2**63, False)  # no ids: min/max unset
    with pytest.raises(ValueError, match="indptr: expected B\\+1=3 entries"):
        call(ptr[:2], ids, out)
    with pytest.raises(TypeError, match="indices"):
        call(ptr, ids.float(), out)
    with pytest.raises(TypeError, match="out"):
        call(ptr, ids, out.bool().float())
    with pytest.raises(ValueError, match="indptr: expected 1-D"):
        call(ptr.view(3, 1), ids, out)


@pytest.mark.parametrize("dtypes", [(torch.int64, torch.int64), (torch.int32, torch.int32),
                                    (torch.int32, torch.int64)], ids=str)
def test_triton_conversion_matches_the_native_one(conversion, dtypes):
    """triton_masks.csr_to_mask (GPUs without the extension's CUDA build; on CPU under the
    interpreter): the mask and every check's value, as the CPU conversion, on good pairs
    (rows sharing 4-byte words, more ids in a row than one block of lanes, no ids) and bad
    ones (checks start poisoned: the conversion sets them)."""
    if conversion != "native":
        pytest.skip("compares with the native conversion")
    triton_masks = pytest.importorskip("shl_kernels.triton_masks")
    from shl_kernels.masks import _csr_converter

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cases = [(*random_csr(B, C, seed=C, max_per_row=k)[0], C)
             for B, C, k in [(5, 7, 7), (2, 700, 600), (1, 1, 1), (3, 5, 0)]]
    cases += [(torch.tensor(p), torch.tensor(i), 4) for p, i in
              [([0, 2, 1], [1, 2]), ([1, 1, 2], [0, 1]), ([0, 1, 3], [0, 1]),
               ([0, 1, 2], [-3, 9]), ([0, 2, 4], [0, 3, 2, 2]), ([0, 2, 4], [1, 2, 2, 1])]]
    for ptr, ids, C in cases:
        ptr, ids = ptr.to(dtypes[0]), ids.to(dtypes[1])
        B = ptr.numel() - 1
        want_mask, want = _csr_converter("cpu")(ptr, ids, B, C)
        got_mask, got = triton_masks.csr_to_mask(ptr.to(dev), ids.to(dev), B, C)
        got = got.tolist()
        assert bool(got[0]) == bool(want[0]), (ptr, ids)
        if want[0]:
            continue
        assert got[1:3] == list(want[1:3])
        if ids.numel() == 0 or (want[1] >= 0 and want[2] < C):
            assert bool(got[3]) == bool(want[3]), (ptr, ids)
            if not want[3]:
                assert torch.equal(got_mask.cpu(), want_mask)
