"""TunedLaunch (triton_launch.py): the autotuner chooses once per key, later launches take
its choice directly. A fake autotuner stands in for Triton's (which needs a GPU to time
configs); the GPU tests run the real one through every Triton launch."""
from __future__ import annotations

import pytest

pytest.importorskip("triton")
from shl_kernels.triton_launch import TunedLaunch


class _Config:
    def __init__(self, kw: dict) -> None:
        self.kw = kw

    def all_kwargs(self) -> dict:
        return dict(self.kw)


class _FakeTuned:
    """Records launches: ("tuner", grid, args, kwargs) or ("direct", grid, args, kwargs).
    Its choice depends on the key argument's value, as a real autotuner's would."""

    def __init__(self) -> None:
        self.arg_names, self.keys = ["x_ptr", "n", "bucket", "FLAG"], ["bucket"]
        self.calls, self.best_config = [], None
        outer = self

        class _Fn:
            def __getitem__(self, grid):
                return lambda *a, **k: outer.calls.append(("direct", grid, a, k))

        self.fn = _Fn()

    def __getitem__(self, grid):
        def run(*a, **k):
            self.calls.append(("tuner", grid, a, k))
            self.best_config = _Config({"BLOCK": 64 * a[2], "num_warps": a[2]})
        return run


def test_tunes_once_per_key_then_launches_directly():
    tuned = _FakeTuned()
    launch = TunedLaunch(tuned)
    launch((4,), ("x", 10, 1), {"FLAG": True}, "fp32")
    launch((8,), ("y", 11, 1), {"FLAG": True}, "fp32")  # same key: another n, grid, tensor
    launch((4,), ("x", 10, 2), {"FLAG": True}, "fp32")  # another bucket: tunes
    launch((4,), ("x", 10, 2), {"FLAG": False}, "bf16")  # another dtype/flags: tunes
    launch((2,), ("z", 12, 2), {"FLAG": True}, "fp32")
    assert [c[0] for c in tuned.calls] == ["tuner", "direct", "tuner", "tuner", "direct"]
    # direct launches: the caller's args and flags plus the config chosen for that key
    assert tuned.calls[1] == ("direct", (8,), ("y", 11, 1),
                              {"FLAG": True, "BLOCK": 64, "num_warps": 1})
    assert tuned.calls[4] == ("direct", (2,), ("z", 12, 2),
                              {"FLAG": True, "BLOCK": 128, "num_warps": 2})
    assert tuned.calls[0][3] == {"FLAG": True}  # the tuner gets no config of ours


def test_key_arguments_found_by_name():
    tuned = _FakeTuned()
    tuned.arg_names = ["bucket", "x_ptr", "n", "FLAG"]
    launch = TunedLaunch(tuned)
    assert launch.key_at == [0]
    with pytest.raises(ValueError):
        tuned.keys = ["missing"]
        TunedLaunch(tuned)
