import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton runs on CPU only through its interpreter, which must be chosen before any
# @triton.jit decorator runs (i.e. before shl_kernels' Triton modules are imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def compile_sm90():
    """Runs a script that compiles Triton kernels to real sm_90 code (ptxas ships with
    triton) in a fresh interpreter without TRITON_INTERPRET: the interpreter checks no types.
    The script must print "compiled" when every kernel compiled."""
    pytest.importorskip("triton.backends.nvidia.compiler")

    def run(script: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        res = subprocess.run([sys.executable, "-c", script], env=env, cwd=root,
                             capture_output=True, text=True, timeout=300, check=False)
        assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]

    return run


def benchmark_module(name: str):
    """benchmarks/<name>.py imported as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod
