"""Registers, spills and shared memory of the Triton SHL kernels for sm_90, from Triton's own
compiler and ptxas (no GPU needed): the window kernel (triton_shl.py) at each autotune
config, and the staged kernel (triton_staged.py) at each config, for rows staged in one
gather and in chunks. Pointers and C are taken as 16-aligned, as Triton specializes them at
run time for aligned tensors. Registers above 65536 / threads per block spill; fewer
resident blocks leave memory idle while rows compute.
Usage: python benchmarks/triton_resources.py [--out FILE]
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

from shl_kernels import triton_shl, triton_staged

PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16", "fp64": "*fp64"}
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int):
    """fn compiled for sm_90 (pointers and C 16-aligned)."""
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n, t in signature.items()
             if (t.startswith("*") and n not in constexprs) or n == "C"}
    sig = dict(signature, **{n: "constexpr" for n in constexprs})
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps})


def window_kernel(zt: str, has: bool, seg_mode: bool, cfg: triton.Config,
                  reduce: bool = False):
    """triton_shl._shl_kernel with every optional input (has) or none; reduce: with the
    device-side sums."""
    acc = "*fp64" if zt == "fp64" else "*fp32"
    sig = {"z_ptr": PTR[zt], "pos_ptr": "*u8", "ign_ptr": "*u8", "order_ptr": "*i64",
           "off_ptr": "*i64", "w_ptr": acc, "eta_ptr": acc, "delta_ptr": acc,
           "grad_ptr": PTR[zt], "part_ptr": acc, "geta_ptr": acc, "scale_hi": "fp32",
           "scale_lo": "fp32", "loss_ptr": acc, "geta_sum_ptr": acc, "count_ptr": "*i32"}
    sig.update({n: "i32" for n in ["C", "m", "n_items", "window", "n_iter", "seg_bucket",
                                   "win_bucket", "par_bucket", "B"]})
    const = {n: has for n in ["HAS_IGN", "HAS_ORDER", "HAS_W", "HAS_ETA", "HAS_DELTA",
                              "NEED_GETA"]}
    const.update(SEG_MODE=seg_mode, REDUCE=reduce, BLOCK=cfg.kwargs["BLOCK"])
    const.update({n: None for n in ["ign_ptr", "order_ptr", "w_ptr", "eta_ptr", "delta_ptr",
                                    "geta_ptr", "geta_sum_ptr"] if not has})
    const.update({n: None for n in ["loss_ptr", "geta_sum_ptr", "count_ptr"] if not reduce})
    return compile_sm90(triton_shl._shl_kernel, sig, const, cfg.num_warps)


def staged_kernel(zt: str, has: bool, cfg: triton.Config, C: int):
    """triton_staged._shl_staged_kernel for rows of C labels (one gather or chunks, as
    triton_staged.plan says)."""
    acc = "*fp64" if zt == "fp64" else "*fp32"
    CP, multi = triton_staged.plan(C, BYTES[zt])
    sig = {"z_ptr": PTR[zt], "pos_ptr": "*u8", "ign_ptr": "*u8", "order_ptr": "*i32",
           "position_ptr": "*i32", "off_ptr": "*i64", "sched_ptr": "*i32", "w_ptr": acc,
           "eta_ptr": acc, "delta_ptr": acc, "grad_ptr": PTR[zt], "pbits_ptr": "*u8",
           "ibits_ptr": "*u8", "stage_ptr": PTR[zt], "part_ptr": acc, "geta_ptr": acc,
           "scale_hi": "fp32", "scale_lo": "fp32", "B": "i32", "C": "i32", "m": "i32",
           "seg_bucket": "i32"}
    const = {n: has for n in ["HAS_IGN", "HAS_W", "HAS_ETA", "HAS_DELTA", "NEED_GETA"]}
    const.update(CP=CP, MULTI=multi, **cfg.kwargs)
    const.update({n: None for n in ["ign_ptr", "ibits_ptr", "w_ptr", "eta_ptr", "delta_ptr",
                                    "geta_ptr"] if not has})
    if not multi:
        const["stage_ptr"] = None
    return compile_sm90(triton_staged._shl_staged_kernel, sig, const, cfg.num_warps)


def ptxas(kernel) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) per thread, from ptxas -v."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        res = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(ptx),
                              "-o", str(Path(d) / "k.o")], capture_output=True, text=True,
                             check=True)
    regs = stores = loads = 0
    for line in res.stderr.splitlines():
        if "Used" in line:
            regs = int(line.split("Used")[1].split("registers")[0])
        if "spill stores" in line:
            stores = int(line.split("bytes spill stores")[0].split(",")[-1])
            loads = int(line.split("bytes spill loads")[0].split(",")[-1])
    return regs, stores, loads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args()
    rows = [f"{'kernel':<40} {'config':<20} {'regs':>5}  {'spill(st/ld)':>12}  {'smem':>6}"]

    def row(name: str, cfg: triton.Config, kernel) -> None:
        regs, st, ld = ptxas(kernel)
        conf = ", ".join(f"{k}={v}" for k, v in cfg.kwargs.items() if k != "CHUNK")
        rows.append(f"{name:<40} {conf + f', {cfg.num_warps}w':<20} {regs:>5}  "
                    f"{f'{st}/{ld}':>12}  {kernel.metadata.shared:>6}")
        print(rows[-1], flush=True)

    print(rows[0])
    for zt in ("bf16", "fp32"):
        for cfg in triton_shl._CONFIGS:
            row(f"window, {zt}, all inputs", cfg, window_kernel(zt, True, False, cfg))
    for cfg in triton_shl._CONFIGS:
        row("window, fp32, all inputs, sums", cfg, window_kernel("fp32", True, False, cfg, True))
    for zt, C in (("bf16", 32768), ("fp32", 32768), ("bf16", 8922), ("bf16", 74000),
                  ("fp32", 40000)):
        multi = triton_staged.plan(C, BYTES[zt])[1]
        for cfg in triton_staged._CONFIGS:
            row(f"staged, {zt}, C={C}{' (chunks)' if multi else ''}", cfg,
                staged_kernel(zt, True, cfg, C))
    if args.out:
        Path(args.out).write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
