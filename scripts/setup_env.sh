#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package with its pinned dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0          # CPU wheel from local disk; must come first
pip install -q "numpy<2.4" pytest ruff
pip install -q --no-build-isolation -e .
