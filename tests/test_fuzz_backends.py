"""benchmarks/fuzz_backends.py, the differential fuzzer of the fused backends: a short run
passes on every fused backend here (Triton on small cases under its interpreter), and its
checker catches a backend that is off by a little."""
from __future__ import annotations

import pytest
import torch
from conftest import benchmark_module

import shl_kernels as shl

FUSED = [b for b in shl.available_backends() if b != "torch"]


@pytest.fixture(scope="module")
def fuzz():
    return benchmark_module("fuzz_backends")


def _device(backend: str) -> str:
    return "cpu" if backend == "cpu" or not torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize("backend", FUSED)
def test_short_fuzz_run_passes(fuzz, backend):
    small = backend == "triton" and not torch.cuda.is_available()  # the interpreter: slow
    cases = 15 if small else 150
    for seed in range(cases):
        case = fuzz.draw(seed, 120 if small else 3000, 8 if small else 64)
        problems = fuzz.check(case, backend, _device(backend))
        assert not problems, f"{case.describe()}: {problems}"


def test_draw_covers_the_options(fuzz):
    notes = [fuzz.draw(seed, 3000, 64).notes for seed in range(300)]
    for key in ("dtype", "targets", "weights", "reduction", "inplace", "eta", "delta"):
        assert len({n[key] for n in notes}) > 1, key
    assert any("empty" in n["segments"] for n in notes)
    assert any(n["scale"] == 1000.0 for n in notes)


@pytest.mark.parametrize("what, delta", [("loss", 1e-4), ("grad z", 1e-4), ("grad eta", 1e-3)])
def test_checker_catches_a_small_error(fuzz, what, delta):
    # a backend returning the float64 reference with one value off by a relative delta
    index = fuzz.OUTPUTS.index(what)

    def off(case, backend, device):
        out = fuzz.run(case, "torch", "cpu", torch.float64)
        flat = out[index].view(-1)
        k = int(flat.abs().argmax())
        flat[k] += delta * flat[k].abs() + 1e-30
        return out

    seed = next(s for s in range(100) if fuzz.draw(s, 300, 16).eta is not None
                and fuzz.draw(s, 300, 16).z.dtype == torch.float32)
    case = fuzz.draw(seed, 300, 16)
    assert fuzz.check(case, "torch", "cpu", runner=lambda *a: fuzz.run(
        case, "torch", "cpu", torch.float64)) == []
    problems = fuzz.check(case, "torch", "cpu", runner=off)
    assert len(problems) == 1 and problems[0].startswith(what), problems
