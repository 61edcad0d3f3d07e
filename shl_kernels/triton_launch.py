"""Launching autotuned Triton kernels without the autotuner's per-call work.

Triton's `Autotuner.run` rebuilds, on every call, a dict of all arguments and probes each for
a dtype to form its cache key: on the H100 host of issue 4, 46 us of a 16 x 8192 SHL step's
~400 us of host time (cProfile, benchmarks/results/h100-2026-11-27/run5/profile.log), in a
step that is bound by host time. `TunedLaunch` lets the autotuner choose once per key, then
launches the kernel with the chosen config directly.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence


class TunedLaunch:
    """`launch(grid, args, flags, extra_key)`: runs `tuned` (a `triton.autotune`d kernel)
    with positional `args` and keyword `flags`. The first call per key goes through the
    autotuner (benchmarking its configs when it has not seen the key); later ones launch the
    kernel with the config it chose. The key is the autotuner's own (the values of its key
    arguments) plus `extra_key` (the caller's dtypes and flags: Triton's key also holds the
    dtype of each tensor argument)."""

    def __init__(self, tuned) -> None:
        self.tuned = tuned
        self.key_at = [tuned.arg_names.index(k) for k in tuned.keys]
        self.chosen: dict[Hashable, dict] = {}

    def __call__(self, grid: tuple, args: Sequence, flags: dict, extra_key: Hashable) -> None:
        key = (tuple(args[i] for i in self.key_at), extra_key)
        config = self.chosen.get(key)
        if config is None:
            self.tuned[grid](*args, **flags)
            self.chosen[key] = self.tuned.best_config.all_kwargs()
        else:
            self.tuned.fn[grid](*args, **flags, **config)
