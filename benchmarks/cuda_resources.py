"""Registers, spills and resident blocks per SM of the CUDA kernels, from ptxas (no GPU needed).

Compiles csrc/*.cu for one architecture with `ptxas -v` and prints, per kernel, registers
per thread, spill bytes, static shared memory and, for the staged SHL kernel, how many
blocks fit on an SM for a row of C labels (sm_90 limits: 64K registers, 228 KB shared
memory, 1 KB of it reserved per block; the row and its bitmask only: the flat schedule's
16 bytes per segment and the cp.async ring come on top, the ring only where it keeps as
many blocks resident). A spill in the per-element loops costs local-memory
traffic; fewer resident blocks leave memory idle while rows compute.
Where nvdisasm is found (PATH, or the nvidia-cuda-nvdisasm wheel scripts/setup_env.sh
installs), it also counts each kernel's global stores by width in its SASS: the gradient
must leave in 16-byte stores (nvcc 13.0 once split a 16-byte pack of gathered values into
eight 2-byte stores, unseen by ptxas -v).
Usage: python benchmarks/cuda_resources.py [--arch 90] [--C 32768]
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_DTYPES = {"13__nv_bfloat16f": "bf16", "6__halff": "fp16", "ff": "fp32", "dd": "fp64"}
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}


@dataclass
class Kernel:
    name: str  # e.g. "shl_staged_kernel<V=8, 512 threads, flat, bf16>"
    registers: int
    spill_stores: int
    spill_loads: int
    static_smem: int
    # global stores in the SASS by opcode (e.g. {"STG.E.128": 6}); None without nvdisasm
    stores: dict[str, int] | None = None


_ENUM_DTYPES = {"1": "fp32", "2": "fp64", "3": "fp16", "4": "bf16"}  # csrc/dtype.h DType
_KINDS = {"0": "bce", "1": "focal", "2": "asl"}  # csrc/elementwise.h ElemKind


def _pretty(mangled: str) -> str:
    """shl_staged_kernel<V=8, 512 threads, flat, bf16> (", windows" for the windowed kernel,
    ", delta" for the one compiled for logit offsets), elementwise_kernel<bf16, asl, 256>
    from a mangled name."""
    if m := re.search(r"(shl_(?:staged|fused)_kernel)I(?:Li(\d+)E)?(?:Li(\d+)E)?(?:Lb(\d)E)?"
                      r"(?:Lb(\d)E)?(?:Lb(\d)E)?(.*?)EEvNS", mangled):
        kernel, vec, threads, flat, windows, delta, rest = m.groups()
        dtype = next((v for k, v in _DTYPES.items() if rest.startswith(k)), rest)
        schedule = {"1": "flat, ", "0": "groups, "}.get(flat, "")
        schedule += "windows, " if windows == "1" else ""
        schedule += "delta, " if delta == "1" else ""
        return (f"{kernel}<{'V=' + vec + ', ' if vec else ''}"
                f"{threads + ' threads, ' if threads else ''}{schedule}{dtype}>")
    if m := re.search(r"(elementwise_kernel)ILNS_5DTypeE(\d)ELNS_8ElemKindE(\d)ELi(\d+)E"
                      r"(?:Li(\d+)E)?", mangled):
        kernel, dtype, kind, block, vec = m.groups()
        return (f"{kernel}<{_ENUM_DTYPES.get(dtype, dtype)}, {_KINDS.get(kind, kind)}, {block}"
                f"{', V=' + vec if vec else ''}>")
    return mangled


def ptxas_report(source: Path, arch: str = "90") -> list[Kernel]:
    """ptxas -v figures of every kernel in `source` (raises when nvcc is missing or fails)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found: install the CUDA toolkit or put it on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run(
            [nvcc, "-O3", "--use_fast_math", "-std=c++17", f"-arch=sm_{arch}", "-cubin",
             "-Xptxas", "-v", f"-I{ROOT / 'csrc'}", str(source), "-o", f"{tmp}/k.cubin"],
            capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source.name}:\n{run.stderr[-3000:]}")
        stores = sass_stores(Path(tmp) / "k.cubin")
    out, name, spill = [], None, (0, 0)
    for line in run.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            name = _pretty(m.group(1))
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            spill = (int(m.group(1)), int(m.group(2)))
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            smem = re.search(r"(\d+) bytes smem", line)
            out.append(Kernel(name, int(m.group(1)), *spill, int(smem.group(1)) if smem else 0,
                              None if stores is None else stores.get(name, {})))
            name, spill = None, (0, 0)
    return out


def nvdisasm() -> str | None:
    """nvdisasm from PATH or from the nvidia-cuda-nvdisasm wheel, or None."""
    if found := shutil.which("nvdisasm"):
        return found
    try:
        import nvidia  # the namespace package of NVIDIA's CUDA wheels
    except ImportError:
        return None
    found = [c for base in nvidia.__path__ for c in sorted(Path(base).glob("cu*/bin/nvdisasm"))]
    return str(found[0]) if found else None


def sass_stores(cubin: Path) -> dict[str, dict[str, int]] | None:
    """Global store instructions (STG.*) of every kernel in `cubin`, by opcode, keyed by the
    kernel's pretty name; None without nvdisasm."""
    tool = nvdisasm()
    if tool is None:
        return None
    run = subprocess.run([tool, "-c", str(cubin)], capture_output=True, text=True, check=True)
    out: dict[str, dict[str, int]] = {}
    counts = None
    for line in run.stdout.splitlines():
        if m := re.match(r"\s*\.text\.(\S+):", line):
            counts = out.setdefault(_pretty(m.group(1)), {})
        elif counts is not None and (m := re.search(r"\b(STG(?:\.[A-Z0-9]+)*)\s", line)):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return out


def staged_blocks_per_sm(k: Kernel, C: int, smem_per_sm: int = 228 * 1024) -> tuple[int, int]:
    """(resident blocks per SM, dynamic shared memory) of the staged kernel for C labels."""
    dtype = k.name.split(", ")[-1].rstrip(">")
    dyn = -(-C * _BYTES[dtype] // 16) * 16 + (C + 31 + 127) // 128 * 16  # z + positives' bits
    threads = int(re.search(r"(\d+) threads", k.name).group(1))
    per_warp = -(-k.registers * 32 // 256) * 256  # registers are allocated per warp, by 256
    by_regs = 65536 // (per_warp * threads // 32)
    by_smem = smem_per_sm // (dyn + k.static_smem + 1024)
    return min(by_regs, by_smem, 2048 // threads), dyn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90")
    p.add_argument("--C", type=int, default=32768, help="labels per row for the occupancy column")
    args = p.parse_args()
    print(f"sm_{args.arch}; blocks/SM of the staged kernel for rows of C={args.C} labels")
    print(f"{'kernel':<52} {'regs':>4} {'spill st/ld':>11} {'smem':>5} {'blocks/SM':>9} "
          f"{'16B st':>7}")
    for source in sorted((ROOT / "csrc").glob("*.cu")):
        for k in ptxas_report(source, args.arch):
            occ = ""
            if k.name.startswith("shl_staged_kernel"):
                blocks, dyn = staged_blocks_per_sm(k, args.C)
                occ = f"{blocks} ({dyn // 1024} KB)"
            wide = "" if k.stores is None else str(k.stores.get("STG.E.128", 0))
            print(f"{k.name:<52} {k.registers:>4} {f'{k.spill_stores}/{k.spill_loads}':>11} "
                  f"{k.static_smem:>5} {occ:>9} {wide:>7}")


if __name__ == "__main__":
    main()
