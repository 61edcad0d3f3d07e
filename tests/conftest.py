import os

import torch

# Triton runs on CPU only through its interpreter, which must be chosen before any
# @triton.jit decorator runs (i.e. before shl_kernels' Triton modules are imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
