"""`python -m shl_kernels.info`: what was built and what can run on this machine."""
from __future__ import annotations

import importlib
import importlib.metadata as md
import os

import torch

from .backends import BACKENDS, native, why_unavailable


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def build_report() -> dict:
    """The build and environment facts printed by `python -m shl_kernels.info`."""
    ext = native()
    info = dict(ext.build_info) if ext is not None else {}
    report = {
        "shl_kernels": importlib.import_module("shl_kernels").__version__,
        "native extension": "built" if ext is not None else "not built",
        "OpenMP": (f"yes, {info['omp_max_threads']} threads (torch uses "
                   f"{torch.get_num_threads()})") if info.get("openmp") else "no",
        "CPU -march": info.get("march") or "-",
        "CUDA kernels": (f"compiled for sm_{info['cuda_arch'].replace(',', ', sm_')}"
                         if info.get("cuda") else "not compiled"),
        "CUDA device": (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"),
    }
    if ext is not None and hasattr(ext, "cuda_runtime_info"):
        report["CUDA runtime"] = str(ext.cuda_runtime_info())
    for b in BACKENDS:
        why = why_unavailable(b)
        report[f"backend {b}"] = "usable" if why is None else f"unavailable: {why}"
    for pkg in ("torch", "triton", "numba", "faiss-cpu", "faiss-gpu", "transformers", "numpy"):
        report[pkg] = _version(pkg)
    report["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "unset")
    return report


def main() -> None:
    report = build_report()
    width = max(map(len, report))
    for k, v in report.items():
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
