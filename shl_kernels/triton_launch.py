"""Launching Triton kernels with less host work per call than Triton's own launch path.

A launch-bound step (B=16 on the H100 of issue 4: ~0.4 ms of host time for ~0.03 ms of
kernels) pays for every microsecond of it. Triton's `JITFunction.run` binds every argument
into a dict, specializes each, formats the options into a cache key string, looks up the
device and stream and checks hooks and globals on every call (~60 us of the step's host time
besides the launcher itself, cProfile in benchmarks/results/h100-2026-11-27/run6/profile.log),
and `Autotuner.run` adds its own dict of all arguments (46 us, run5).

`DirectLaunch` lets Triton do the first launch per key and keeps the compiled kernel it
returns; later calls whose arguments specialize the same way launch that binary through its
launcher, the call `JITFunction.run` itself ends with. `TunedLaunch` lets the autotuner choose
a config once per key and then launches through a `DirectLaunch`.
"""
from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Hashable, Iterator, Sequence

import torch
import triton
from triton import knobs
from triton._C.libtriton import native_specialize_impl

from .fused import stream_handle

# The Triton releases whose launch path DirectLaunch mirrors (JITFunction.run's call of the
# compiled kernel's launcher, read from their source): others launch through Triton itself.
MIRRORED = ("3.6.",)


def direct_by_default(version: str, env: str) -> bool:
    """SHL_TRITON_DIRECT (`env`)=0: every launch through Triton's own path (to compare, or as
    an escape hatch); =1: direct launches on an unlisted Triton release too; unset: on the
    MIRRORED releases."""
    return env == "1" or (env != "0" and version.startswith(MIRRORED))


DIRECT = direct_by_default(triton.__version__, os.environ.get("SHL_TRITON_DIRECT", ""))


class DirectLaunch:
    """`launch(grid, args, kwargs, device)`: runs the @triton.jit kernel `fn` as
    `fn[grid](*args, **kwargs)` would, with `args` its leading parameters and `kwargs` the
    rest (constexprs, defaults left out) and launch options (num_warps...), on `device`, which
    must be the current CUDA device (`fused.on_device`).

    The key of a compiled kernel is everything Triton's own key holds: how each argument
    specializes (Triton's `native_specialize_impl` with each parameter's flags: the dtype and
    16-byte alignment of tensors, the integer type and divisibility of ints, None, the value
    of constexprs), the kwargs' values, the debug and instrumentation knobs and the device.
    Triton itself launches where it has no binary for a key yet, where launch hooks are set
    (profilers read them), under the interpreter and when `DIRECT` is off."""

    def __init__(self, fn) -> None:
        self.fn = fn
        # The interpreter's InterpretedFunction compiles nothing: it always goes through fn.
        self.capable = hasattr(fn, "device_caches") and hasattr(fn, "params")
        self.native = DIRECT and self.capable
        _ALL.add(self)
        if self.capable:
            # per parameter: None for a constexpr (its value keys), else the flags
            # native_specialize_impl takes after the argument, as JITFunction's binder passes
            self.spec_flags = [None if p.is_constexpr else
                               (p.is_const, not p.do_not_specialize,
                                not p.do_not_specialize_on_alignment) for p in fn.params]
            self.names = [p.name for p in fn.params]
            self.defaults = [p.default for p in fn.params]
        self.kernels: dict[Hashable, tuple] = {}
        self.backend = None  # the compiler backend Triton specializes with, from its launch

    def key(self, args: Sequence, kwargs: dict, device: torch.device) -> tuple:
        impl, backend = native_specialize_impl, self.backend
        spec = tuple(a if f is None else impl(backend, a, *f)
                     for a, f in zip(args, self.spec_flags))
        return (device.index, spec, tuple(kwargs.items()), knobs.runtime.debug,
                knobs.compilation.instrumentation_mode)

    def __call__(self, grid: tuple, args: Sequence, kwargs: dict, device: torch.device) -> None:
        rt = knobs.runtime
        if not (self.native and _idle(rt.launch_enter_hook) and _idle(rt.launch_exit_hook)) \
                or self.fn.pre_run_hooks:
            self.fn[grid](*args, **kwargs)
            return
        key = None if self.backend is None else self.key(args, kwargs, device)
        entry = self.kernels.get(key)
        if entry is None:
            kernel = self.fn[grid](*args, **kwargs)
            if self.backend is None:
                self.backend = self.fn.device_caches[device.index][3]
                key = self.key(args, kwargs, device)
            self.kernels[key] = self.entry(kernel, len(args), kwargs)
            return
        launcher, function, packed, tail = entry
        launcher(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                 stream_handle(device), function, packed, None, None, None, *args, *tail)

    def entry(self, kernel, n_args: int, kwargs: dict) -> tuple:
        """(launcher, CUfunction, packed metadata, the values of the parameters after the
        leading args): what JITFunction.run hands the launcher, fixed for a key."""
        tail = tuple(kwargs.get(name, default)
                     for name, default in zip(self.names[n_args:], self.defaults[n_args:]))
        return kernel.run, kernel.function, kernel.packed_metadata, tail


_ALL: weakref.WeakSet[DirectLaunch] = weakref.WeakSet()


@contextlib.contextmanager
def direct_launches(on: bool) -> Iterator[None]:
    """Turns the direct launches of every DirectLaunch on or off within the block (A/B
    measurements of one process: benchmarks/profile_step.py --direct-ab)."""
    saved = {d: d.native for d in _ALL}
    for d in saved:
        d.native = on and d.capable
    try:
        yield
    finally:
        for d, native in saved.items():
            d.native = native


def _idle(hook) -> bool:
    """No launch hook: None, or (Triton 3.5+) an empty HookChain, which Triton's own path
    still calls on every launch."""
    return hook is None or not getattr(hook, "calls", True)


class TunedLaunch:
    """`launch(grid, args, flags, extra_key, device)`: runs `tuned` (a `triton.autotune`d
    kernel) with positional `args` and keyword `flags`. The first call per key goes through
    the autotuner (benchmarking its configs when it has not seen the key); later ones launch
    the kernel with the config it chose through a `DirectLaunch`. The key is the autotuner's
    own (the values of its key arguments) plus `extra_key` (the caller's dtypes and flags:
    Triton's key also holds the dtype of each tensor argument)."""

    def __init__(self, tuned) -> None:
        self.tuned = tuned
        self.key_at = [tuned.arg_names.index(k) for k in tuned.keys]
        self.chosen: dict[Hashable, dict] = {}
        self.direct = DirectLaunch(tuned.fn)

    def __call__(self, grid: tuple, args: Sequence, flags: dict, extra_key: Hashable,
                 device: torch.device) -> None:
        key = (tuple(args[i] for i in self.key_at), extra_key)
        config = self.chosen.get(key)
        if config is None:
            self.tuned[grid](*args, **flags)
            self.chosen[key] = self.tuned.best_config.all_kwargs()
        else:
            self.direct(grid, args, {**flags, **config}, device)
