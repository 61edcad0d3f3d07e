#!/usr/bin/env bash
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m shl_kernels.demo
# End to end: fine-tune the bundled encoder with SHL on the built-in notes (~2 minutes on
# 2 CPU cores); metrics.json and curve.png land in runs/demo/.
.venv/bin/shl-train --notes 300 --codes 40 --epochs 3 --chunk-tokens 64 --max-chunks 4 \
    --out runs/demo
