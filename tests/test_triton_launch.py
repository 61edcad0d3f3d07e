"""TunedLaunch (triton_launch.py): the autotuner chooses once per key, later launches take
its choice directly. A fake autotuner stands in for Triton's (which needs a GPU to time
configs); the GPU tests run the real one through every Triton launch."""
from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")
import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import JITFunction, create_function_from_signature

from shl_kernels import triton_launch
from shl_kernels.triton_launch import DirectLaunch, TunedLaunch

DEV = torch.device("cuda", 0)  # a device index for the keys; nothing runs on it


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
    launch((4,), ("x", 10, 1), {"FLAG": True}, "fp32", DEV)
    launch((8,), ("y", 11, 1), {"FLAG": True}, "fp32", DEV)  # same key: another n, grid, tensor
    launch((4,), ("x", 10, 2), {"FLAG": True}, "fp32", DEV)  # another bucket: tunes
    launch((4,), ("x", 10, 2), {"FLAG": False}, "bf16", DEV)  # another dtype/flags: tunes
    launch((2,), ("z", 12, 2), {"FLAG": True}, "fp32", DEV)
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


# DirectLaunch: Triton launches the first time per key; later calls that specialize the same
# way go to the compiled kernel's launcher. The key logic runs against Triton's own binder
# (real JITFunction parameters, no GPU); the GPU tests launch real kernels both ways.

def _probe(x_ptr, y_ptr, n, k, f, flag, BLOCK: tl.constexpr, EXTRA: tl.constexpr = 3):
    pass


_PROBE = JITFunction(_probe, do_not_specialize=["k"])


def _triton_specialization(args, kwargs):
    """What Triton's binder keys a compiled kernel on, for these arguments."""
    binder = create_function_from_signature(_PROBE.signature, _PROBE.params, BaseBackend)
    return binder(*args, **kwargs)[1]


class _FakeKernel:
    def __init__(self, fn, n: int) -> None:
        self.function, self.packed_metadata = f"function{n}", f"meta{n}"
        self.run = lambda *a: fn.launches.append(a)


class _FakeJit:
    """A JITFunction's parameters, caches and hooks; `fn[grid](...)` records a launch through
    Triton ("triton", grid, args, kwargs) and returns a compiled kernel whose launcher records
    the direct ones."""

    def __init__(self) -> None:
        self.params = _PROBE.params
        self.device_caches = {i: (None, None, None, BaseBackend, None) for i in range(2)}
        self.pre_run_hooks, self.calls, self.launches = [], [], []

    def __getitem__(self, grid):
        def run(*a, **k):
            self.calls.append(("triton", grid, a, k))
            return _FakeKernel(self, len(self.calls))
        return run


@pytest.fixture
def direct(monkeypatch):
    monkeypatch.setattr(triton_launch, "stream_handle", lambda device: 100 + device.index)
    monkeypatch.setattr(triton_launch, "DIRECT", True)  # (whatever the Triton release)
    fn = _FakeJit()
    return fn, DirectLaunch(fn)


def _tensor(dtype=torch.float32, offset=0):
    return torch.zeros(64, dtype=dtype)[offset:]


def test_direct_launch_hands_the_launcher_what_triton_run_would(direct):
    fn, launch = direct
    x, y = _tensor(), _tensor(torch.uint8)
    launch((5,), (x, y, 17, 4, 0.5, True), {"BLOCK": 64, "num_warps": 2}, DEV)
    assert fn.calls == [("triton", (5,), (x, y, 17, 4, 0.5, True), {"BLOCK": 64, "num_warps": 2})]
    x2, y2 = _tensor(), _tensor(torch.uint8)
    launch((7, 2), (x2, y2, 33, 4, 0.25, False), {"BLOCK": 64, "num_warps": 2}, DEV)
    assert len(fn.calls) == 1
    # grid as 3 dims, the stream, the kernel's handle and metadata, no launch hooks, then
    # every parameter in order: the args, then constexprs from kwargs or their defaults
    assert fn.launches == [(7, 2, 1, 100, "function1", "meta1", None, None, None,
                            x2, y2, 33, 4, 0.25, False, 64, 3)]


def _variants():
    """Arguments that specialize alike or not: alignment and dtype of tensors, None, ints
    around 1, 16 and 2**31 (specialized and not: k is do_not_specialize), floats, bools."""
    x, y = _tensor(), _tensor(torch.uint8)
    base = (x, y, 17, 4, 0.5, True)
    swaps = {0: [_tensor(), _tensor(offset=1), _tensor(offset=4), _tensor(torch.float16), None],
             1: [_tensor(torch.uint8, 16), _tensor(torch.uint8, 3), None],
             2: [1, 16, 32, 0, -16, 18, 2**31, 2**31 + 16, 2**63],
             3: [1, 5, 16, 2**31, -3],
             4: [2.0, 1, 0.0],
             5: [False, 1]}
    out = [base]
    for i, vals in swaps.items():
        out += [base[:i] + (v,) + base[i + 1:] for v in vals]
    return out


def test_direct_launch_key_is_at_least_as_fine_as_tritons(direct):
    _fn, launch = direct
    variants = _variants()
    launch((1,), variants[0], {"BLOCK": 64}, DEV)  # first launch: learns the backend
    keys = [launch.key(a, {"BLOCK": 64}, DEV) for a in variants]
    specs = [_triton_specialization(a, {"BLOCK": 64}) for a in variants]
    for (ka, sa), (kb, sb) in itertools.combinations(zip(keys, specs), 2):
        if ka == kb:  # one binary for both: Triton must specialize them alike
            assert sa == sb
    # and no finer than Triton's (each key launches the binary compiled for it)
    assert len(set(keys)) == len({repr(s) for s in specs}) > 10
    assert keys[0] == launch.key((_tensor(), _tensor(torch.uint8), 33, 5, 0.1, False),
                                 {"BLOCK": 64}, DEV)


@pytest.mark.parametrize("change", ["alignment", "dtype", "none", "int", "kwargs", "device"])
def test_direct_launch_goes_through_triton_for_a_new_specialization(direct, change):
    fn, launch = direct
    args, kw, dev = [_tensor(), _tensor(torch.uint8), 17, 4, 0.5, True], {"BLOCK": 64}, DEV
    launch((1,), tuple(args), kw, dev)
    launch((1,), tuple(args), kw, dev)
    assert (len(fn.calls), len(fn.launches)) == (1, 1)
    if change == "alignment":
        args[0] = _tensor(offset=2)
    elif change == "dtype":
        args[0] = _tensor(torch.bfloat16)
    elif change == "none":
        args[1] = None
    elif change == "int":
        args[2] = 32  # divisible by 16
    elif change == "kwargs":
        kw = {"BLOCK": 128}
    else:
        dev = torch.device("cuda", 1)
    launch((1,), tuple(args), kw, dev)
    launch((1,), tuple(args), kw, dev)
    assert (len(fn.calls), len(fn.launches)) == (2, 2)
    assert fn.launches[1][4] == "function2"  # the binary Triton gave for the new key


def test_direct_launch_leaves_hooks_and_interpreter_to_triton(direct, monkeypatch):
    fn, launch = direct
    args = (_tensor(), _tensor(torch.uint8), 17, 4, 0.5, True)
    launch((1,), args, {"BLOCK": 64}, DEV)
    hook = lambda *a: None
    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):  # Triton 3.5+: a chain of hooks, empty unless a profiler adds
        chain.add(hook)
        try:
            launch((1,), args, {"BLOCK": 64}, DEV)  # Triton calls the hook
        finally:
            chain.remove(hook)
    else:
        launch((1,), args, {"BLOCK": 64}, DEV)  # (keeps the counts below alike)
    monkeypatch.setattr(knobs.runtime, "launch_exit_hook", hook)  # a hook set by assignment
    launch((1,), args, {"BLOCK": 64}, DEV)
    monkeypatch.undo()
    monkeypatch.setattr(triton_launch, "stream_handle", lambda device: 100 + device.index)
    fn.pre_run_hooks.append(lambda *a, **k: None)
    launch((1,), args, {"BLOCK": 64}, DEV)
    fn.pre_run_hooks.clear()
    launch((1,), args, {"BLOCK": 64}, DEV)
    assert (len(fn.calls), len(fn.launches)) == (4, 1)
    monkeypatch.setattr(triton_launch, "DIRECT", False)  # SHL_TRITON_DIRECT=0
    off = DirectLaunch(fn)
    off((1,), args, {"BLOCK": 64}, DEV)
    off((1,), args, {"BLOCK": 64}, DEV)
    assert (len(fn.calls), len(fn.launches)) == (6, 1)
    # the interpreter's kernels (no device caches) always go through Triton
    interpreted = DirectLaunch(triton.jit(_probe)) if knobs.runtime.interpret else None
    assert interpreted is None or not interpreted.native


def test_direct_launches_switch_for_every_instance(direct):
    """triton_launch.direct_launches(on): the A/B switch of benchmarks/profile_step.py."""
    fn, launch = direct
    interpreted = DirectLaunch(object())  # no device caches: never direct
    args = (_tensor(), _tensor(torch.uint8), 17, 4, 0.5, True)
    with triton_launch.direct_launches(False):
        assert not launch.native and not interpreted.native
        for _ in range(2):
            launch((1,), args, {"BLOCK": 64}, DEV)
    assert launch.native and not interpreted.native
    with triton_launch.direct_launches(True):
        assert not interpreted.native
        for _ in range(2):
            launch((1,), args, {"BLOCK": 64}, DEV)
    assert (len(fn.calls), len(fn.launches)) == (3, 1)


def test_package_launches_hand_the_launcher_tritons_bound_arguments(monkeypatch):
    """Every DirectLaunch of the package (SHL window and staged kernels, elementwise losses,
    float-target masks), recorded while the public API runs: the argument list the direct
    path hands the launcher (the args, then the remaining parameters from kwargs or their
    defaults) equals the one Triton's own binder builds from the same call, and the key
    covers Triton's specialization, for the real kernels' signatures (rebuilt as
    JITFunctions: under the interpreter they are InterpretedFunctions)."""
    if not knobs.runtime.interpret:
        pytest.skip("records the interpreter's launches (on a GPU tests/test_gpu.py launches)")
    import shl_kernels as shl
    from shl_kernels import triton_masks, triton_shl, triton_staged

    calls = []
    real = DirectLaunch.__call__

    def record(self, grid, args, kwargs, device):
        calls.append((self.fn, tuple(args), dict(kwargs)))
        return real(self, grid, args, kwargs, device)

    class Recorded:  # the staged kernel: the interpreter launches it without DirectLaunch
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def run(*a, **k):
                calls.append((self.fn, a, {n: v for n, v in k.items()}))
                return self.fn[grid](*a, **k)
            return run

    monkeypatch.setattr(DirectLaunch, "__call__", record)
    monkeypatch.setattr(triton_staged, "_shl_staged_kernel",
                        Recorded(triton_staged._shl_staged_kernel))
    monkeypatch.setattr(triton_shl, "_staged_wins", lambda *a: True)
    triton_masks.to_mask(torch.tensor([0.0, 1.0, 1.0]), torch.empty(3, dtype=torch.uint8))
    seg = shl.Segmentation.from_segments([[0, 5], [1], [2, 3, 4, 6]], 7)
    z = torch.randn(3, 7, requires_grad=True)
    t = torch.eye(7)[:3]
    for ign in (None, torch.zeros(3, 7, dtype=torch.bool)):
        for staged in (False, True):
            monkeypatch.setattr(triton_shl, "STAGED", staged)
            shl.segmented_harmonic_loss(z, t, seg, ignore=ign, null_logits=torch.zeros(3),
                                        backend="triton").backward()
    shl.bce_loss(z, t, backend="triton").backward()
    kernels = {id(fn) for fn, _, _ in calls}
    assert len(kernels) == 4, "expected the SHL window and staged, elementwise, mask kernels"
    for fn, args, kwargs in calls:
        if isinstance(fn, JITFunction):
            jit = fn
        else:  # the interpreter's: the same Python function and specialization flags
            jit = JITFunction(fn.fn, do_not_specialize=fn.kwargs["do_not_specialize"],
                              do_not_specialize_on_alignment=fn.kwargs[
                                  "do_not_specialize_on_alignment"])
        direct = DirectLaunch(jit)
        direct.backend = BaseBackend
        binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)
        bound, spec, _ = binder(*args, **kwargs)
        tail = direct.entry(_FakeKernel(_FakeJit(), 1), len(args), kwargs)[3]
        for a, b in zip(bound.values(), (*args, *tail), strict=True):
            assert a is b or (not isinstance(a, torch.Tensor) and a == b)
        # the key's specialization of the args is Triton's own
        assert list(direct.key(args, kwargs, DEV)[1]) == spec[:len(args)]


def test_direct_launches_only_on_mirrored_triton_releases():
    """Direct launches mirror Triton 3.6's launch path: other releases launch through Triton
    unless SHL_TRITON_DIRECT=1; SHL_TRITON_DIRECT=0 turns them off everywhere."""
    assert triton_launch.direct_by_default("3.6.0", "")
    assert not triton_launch.direct_by_default("3.8.0", "")
    assert triton_launch.direct_by_default("3.8.0", "1")
    assert not triton_launch.direct_by_default("3.6.0", "0")
