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
    cases = 20 if small else 400
    for seed in range(cases):
        case = fuzz.draw(seed, 120 if small else 3000, 8 if small else 64)
        problems = fuzz.check(case, backend, _device(backend))
        assert not problems, f"{case.describe()}: {problems}"


def test_draw_covers_the_options(fuzz):
    cases = [fuzz.draw(seed, 3000, 64) for seed in range(300)]
    notes = [c.notes for c in cases]
    assert {c.loss for c in cases} == set(fuzz.LOSSES)
    for key in ("dtype", "targets", "weights", "reduction", "inplace", "eta", "delta"):
        assert len({n[key] for n in notes}) > 1, key
    assert any("empty" in n["segments"] for n in notes)
    assert any(n["scale"] == 1000.0 for n in notes)


@pytest.mark.parametrize("loss, what, delta", [
    ("shl", "loss", 1e-4), ("shl", "grad z", 1e-4), ("shl", "grad eta", 1e-3),
    ("focal", "loss", 1e-4), ("bce", "grad z", 1e-4)])
def test_checker_catches_a_small_error(fuzz, loss, what, delta):
    # a backend returning the float64 reference with one value off by a relative delta
    index = fuzz.OUTPUTS.index(what)

    def off(case, backend, device):
        out = fuzz.run(case, "torch", "cpu", torch.float64)
        flat = out[index].view(-1)
        k = int(flat.abs().argmax())
        flat[k] += delta * flat[k].abs() + 1e-30
        return out

    def usable(c):
        return (c.z.dtype == torch.float32 and c.reduction != "none"
                and (what != "grad eta" or c.eta is not None))

    case = next(c for c in (fuzz.draw(s, 300, 16, (loss,)) for s in range(100)) if usable(c))
    assert fuzz.check(case, "torch", "cpu", runner=lambda *a: fuzz.run(
        case, "torch", "cpu", torch.float64)) == []
    problems = fuzz.check(case, "torch", "cpu", runner=off)
    assert len(problems) == 1 and problems[0].startswith(what), problems
