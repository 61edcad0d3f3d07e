"""Which fused backends exist on this machine, why not when they don't, and `auto`."""
from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")


def native():
    """The compiled extension, or None when it was not built / does not import."""
    try:
        return importlib.import_module("shl_kernels._C")
    except ImportError:
        return None


def _why_not_cpu() -> str | None:
    ext = native()
    if ext is None:
        return ("the native extension shl_kernels._C is not built; reinstall with a C++ "
                "compiler and cmake present: pip install --no-build-isolation -e .")
    if not hasattr(ext, "shl_fused_cpu"):
        return "this build of shl_kernels._C has no CPU kernel; rebuild from a full checkout"
    return None


def _why_not_triton() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed: pip install triton"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (Triton runs on CPU only under TRITON_INTERPRET=1, for tests)"
    return None


def _why_not_cuda() -> str | None:
    from .kernels_cuda import cuda_available

    ok, why = cuda_available()
    return None if ok else why


@functools.cache
def why_unavailable(backend: str) -> str | None:
    """None when `backend` can run here, else the reason and what to do about it."""
    if backend == "torch":
        return None
    check = {"cpu": _why_not_cpu, "triton": _why_not_triton, "cuda": _why_not_cuda}.get(backend)
    if check is None:
        return f"unknown backend; choose one of {list(BACKENDS)} or 'auto'"
    return check()


def available_backends() -> list[str]:
    """Backends usable on this machine, e.g. ["torch", "cpu", "triton", "cuda"]."""
    return [b for b in BACKENDS if why_unavailable(b) is None]


def resolve(backend: str, device: torch.device,
            why: Callable[[str], str | None] | None = None) -> str:
    """SPEC section 4: auto = Triton for CUDA tensors, else the native CPU kernel, else torch.
    `why` says why a backend is unavailable (default: the SHL kernels' availability).
    Raises ValueError for an unavailable backend or one for the other device."""
    name, error = _resolved(backend, device, why)
    if error:
        raise ValueError(error)
    return name


def _resolve(backend: str, device: torch.device,
             why: Callable[[str], str | None] | None = None) -> str:
    """What `resolve` returns or raises."""
    why = why or why_unavailable
    if backend == "auto":
        prefs = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
        for b in prefs:
            if why(b) is None:
                return b
        return "torch"
    reason = why(backend)
    if reason is not None:
        raise ValueError(f"backend: {backend!r} is not available: {reason}")
    wants_cuda = backend == "cuda" or (backend == "triton" and torch.cuda.is_available())
    if backend != "torch" and wants_cuda != (device.type == "cuda"):
        raise ValueError(f"backend: {backend!r} runs on {'CUDA' if wants_cuda else 'CPU'} "
                         f"tensors, the logits are on {device}; move them or pick another backend")
    return backend


# A constant to torch.compile: Dynamo calls it while tracing (the backends present do not
# change) instead of tracing into the cached availability checks; an error comes back as a
# message for resolve to raise in the traced code (raised in here, Dynamo would wrap it).
@torch.compiler.assume_constant_result
def _resolved(backend: str, device: torch.device,
              why: Callable[[str], str | None] | None) -> tuple[str, str]:
    try:
        return _resolve(backend, device, why), ""
    except ValueError as e:
        return "", str(e)


def fused_kernel(backend: str) -> Callable:
    """The FusedKernel (see fused.py) implementing `backend`."""
    if backend == "cpu":
        from .kernels_cpu import shl_fused_cpu
        return shl_fused_cpu
    if backend == "cuda":
        from .kernels_cuda import shl_fused_cuda
        return shl_fused_cuda
    if backend == "triton":
        from .triton_shl import shl_fused_triton
        return shl_fused_triton
    raise ValueError(f"backend: {backend!r} has no fused kernel")
