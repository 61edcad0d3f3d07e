#!/usr/bin/env bash
# One-shot check on an H100 (issue 4): build the CUDA extension, run the GPU tests, measure
# device copy bandwidth, run the loss benchmark, time the Triton kernel's schedules, run the
# small-shape Triton kernel tests on the GPU.
# Every step is timed and bounded; a failing step is reported and the next ones still run.
# The whole script stays under ~8 minutes. Logs and results go to ${OUT:-benchmarks/results}.
# Usage: bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
DEADLINE=$((SECONDS + 460))
SUMMARY=()

# step NAME MAX_SECONDS CMD...: run CMD with a limit (cut to the time left), log to
# $OUT_DIR/NAME.log, show its tail, record status and duration.
step() {
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS)) t0=$SECONDS rc
  shift 2
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    SUMMARY+=("$(printf '%-14s %-22s %5s' "$name" "skipped: no time left" -)")
    return
  fi
  echo "=== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  tail -n "${TAIL:-15}" "$OUT_DIR/$name.log"
  local status="ok"
  ((rc == 124 || rc == 137)) && status="TIMEOUT after ${limit}s"
  ((rc != 0 && rc != 124 && rc != 137)) && status="FAILED (rc=$rc)"
  SUMMARY+=("$(printf '%-14s %-22s %5ss' "$name" "$status" $((SECONDS - t0)))")
}

step env 30 bash -c "nvidia-smi -L; nvcc --version | tail -n 1; $PY -c '
import torch, triton
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)
print(torch.cuda.get_device_name(0))'"

# Build the native extension with the CUDA kernels for sm_90a. The machine is offline: if
# pybind11/cmake are missing the build fails, and the Triton steps still run.
TAIL=5 step build 150 env SHL_CUDA=1 SHL_CUDA_ARCH=90a \
  "$PY" -m pip install --no-build-isolation --no-deps -e .
if ! grep -q "Successfully installed" "$OUT_DIR/build.log" 2>/dev/null; then
  echo "pip could not build shl_kernels._C (see $OUT_DIR/build.log): CUDA-backend tests skip,"
  echo "Triton continues from the source tree."
fi

TAIL=25 step gpu_tests 200 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py

step copy_bw 40 "$PY" - <<'EOF'
import statistics

import torch

x = torch.ones(1 << 30, dtype=torch.uint8, device="cuda")
times = []
for i in range(12):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    y = x.clone()
    end.record()
    torch.cuda.synchronize()
    del y
    if i >= 2:
        times.append(start.elapsed_time(end))
ms = statistics.median(times)
print(f"clone of 1 GiB: median {ms:.3f} ms = {2 * (1 << 30) / ms / 1e6:.0f} GB/s (read + write)")
EOF

if [[ -f benchmarks/bench_loss.py ]]; then
  TAIL=12 step bench_loss 150 "$PY" benchmarks/bench_loss.py --device cuda --quick-gpu
else
  SUMMARY+=("$(printf '%-14s %-22s %5s' bench_loss "skipped: no script" -)")
fi

# Kernel-only time of the Triton schedules (window: 0 = program per (row, segment), W =
# per W-position window, "row" = per row), to pick the default. Autotuning happens in warm-up.
TAIL=20 step triton_sched 90 "$PY" - <<'EOF'
import statistics
import time

import torch

from shl_kernels import Segmentation
from shl_kernels.triton_shl import _default_window, shl_fused_triton


def problem(B, C, m, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    share = torch.distributions.Dirichlet(torch.full((m,), 0.5)).sample()
    sizes = (share * (C - m)).floor().long() + 1
    sizes[0] += C - int(sizes.sum())
    perm = torch.randperm(C, generator=gen).tolist()
    segs, at = [], 0
    for s in sizes.tolist():
        segs.append(perm[at:at + s])
        at += s
    seg = Segmentation.from_segments(segs, C)
    z = (torch.randn(B, C, device="cuda") * 3).to(dtype)
    pos = (torch.rand(B, C, device="cuda") < 15 / C).view(torch.uint8)
    acc = torch.float32
    return (z, pos, None, seg.order.cuda(), seg.offsets.cuda(),
            torch.rand(C, device="cuda", dtype=acc) + 0.5, torch.zeros(m, device="cuda"), None)


print(f"{'shape':<24} {'window':>12} {'kernel ms':>10} {'GB/s':>7} {'host us/call':>13}")
for B, C, m, dtype in [(4096, 32768, 100, torch.bfloat16), (16, 8192, 64, torch.float32)]:
    args = problem(B, C, m, dtype)
    z = args[0]
    nbytes = B * C * (2 * z.element_size() + 1)  # read z and pos, write grad
    default = _default_window(B, C, m, z.device)
    for window in (None, 0, 1024, 4096, 1 << 30):
        def call():
            return shl_fused_triton(*args, 1.0 / B, True, window=window)
        for _ in range(3):
            call()
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        t0 = time.perf_counter()
        for _ in range(50):
            call()
        torch.cuda.synchronize()
        host_us = (time.perf_counter() - t0) / 50 * 1e6
        ms = statistics.median(times)
        name = {None: f"auto={default}", 0: "segment", 1 << 30: "row"}.get(window, str(window))
        shape = f"{B}x{C}/{m} {str(dtype)[6:]}"
        print(f"{shape:<24} {name:>12} {ms:>10.3f} {nbytes / ms / 1e6:>7.0f} {host_us:>13.1f}",
              flush=True)
EOF

# The small-shape kernel tests (lane and chunk edge cases, tiny BLOCKs) also run on the GPU;
# last because they compile many small variants.
TAIL=5 step kernel_tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py

echo
echo "=== summary (logs in $OUT_DIR)"
printf '%-14s %-22s %6s\n' step status time
printf '%s\n' "${SUMMARY[@]}"
