#!/usr/bin/env bash
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check shl_kernels tests benchmarks
.venv/bin/python -m pytest -q tests
