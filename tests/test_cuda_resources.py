"""Static resources of the CUDA kernels from ptxas (runs wherever nvcc is, no GPU): the
per-element loops must not spill, a bf16 row of 32768 labels must leave two staged blocks
of 512 threads (three of 256) resident per SM, and (where nvdisasm is) the kernels that move
16-byte packs must store them 16 bytes at a time in their SASS. Fails when a change to
csrc/shl_cuda.cu pushes ptxas past its 64 registers; benchmarks/cuda_resources.py shows all."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import benchmark_module

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


@pytest.fixture(scope="module")
def report():
    mod = benchmark_module("cuda_resources")
    kernels = {}
    for source in ("shl_cuda.cu", "elementwise_cuda.cu"):
        kernels.update({k.name: k for k in mod.ptxas_report(ROOT / "csrc" / source, "90")})
    return mod, kernels


def test_every_kernel_reported(report):
    _, kernels = report
    for dtype in ("bf16", "fp16", "fp32", "fp64"):
        assert f"shl_fused_kernel<{dtype}>" in kernels
        vec = 16 // {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}[dtype]
        # one element per access, compiled for logit offsets (null or not); 16-byte packs
        # also without them, except fp64
        variants = [(1, "delta, "), (vec, "delta, ")] + ([(vec, "")] if dtype != "fp64" else [])
        for v, delta in variants:
            for threads in (512, 256):
                for schedule in ("flat", "groups"):
                    name = f"shl_staged_kernel<V={v}, {threads} threads, {schedule}, {delta}{dtype}>"
                    assert name in kernels
            assert f"shl_staged_kernel<V={v}, 512 threads, flat, windows, {delta}{dtype}>" in kernels


# The whole-row flat kernels with logit offsets may spill a few bytes: at 64 registers ptxas
# spills the row loop's prefetch flag there (SASS: one 2-byte store and load per row, none
# in the per-label loops; since csrc/shl_event.h). Anything more fails.
ROW_FLAG_SPILL = 8


def _allowed(name: str, stores: int, loads: int) -> bool:
    return ("flat, delta, " in name and "windows" not in name
            and stores <= ROW_FLAG_SPILL and loads <= ROW_FLAG_SPILL)


def test_no_spills_outside_fp64(report):
    _, kernels = report
    spilling = {name: (k.spill_stores, k.spill_loads) for name, k in kernels.items()
                if "fp64" not in name and (k.spill_stores or k.spill_loads)
                and not _allowed(name, k.spill_stores, k.spill_loads)}
    assert not spilling, f"spill bytes (stores, loads) per kernel: {spilling}"


def test_staged_bf16_blocks_per_sm(report):
    # rows of 32768 bf16 labels: two resident blocks of 512 threads, three of 256
    mod, kernels = report
    for threads, want in ((512, 2), (256, 3)):
        for schedule in ("flat, ", "groups, ", "flat, delta, ", "groups, delta, "):
            k = kernels[f"shl_staged_kernel<V=8, {threads} threads, {schedule}bf16>"]
            blocks, dyn = mod.staged_blocks_per_sm(k, 32768)
            assert dyn == 32768 * 2 + (32768 + 31 + 127) // 128 * 16  # z, bitmask
            assert blocks == want, (threads, schedule, k.registers, k.static_smem)


def test_packed_kernels_store_16_bytes_at_once(report):
    """The kernels that move rows in 16-byte packs (staged SHL: the gradient's way back;
    BCE/focal/ASL: loss and gradient) have 16-byte global stores in their SASS: nvcc 13.0 had
    turned the staged kernel's pack stores into eight 2-byte stores each."""
    mod, kernels = report
    if mod.nvdisasm() is None:
        pytest.skip("needs nvdisasm (pip install nvidia-cuda-nvdisasm)")
    packed = {name: k for name, k in kernels.items()
              if "V=" in name and "V=1," not in name and "V=1>" not in name}
    # staged: 5 per dtype and delta variant (fp64: with delta only); elementwise: kind x R
    assert len(packed) == 7 * 5 + 4 * 3 * 2
    narrow = {name: k.stores for name, k in packed.items() if not k.stores.get("STG.E.128")}
    assert not narrow, f"no 16-byte store (global stores by opcode): {narrow}"
