#!/usr/bin/env bash
# One-shot check on an H100 (issue 4): build the CUDA extension, run the GPU tests (training
# shapes, then every kernel test file), fuzz cuda and triton against the float64 reference
# (benchmarks/fuzz_backends.py), run the loss benchmark, measure the kernels' own time
# and bandwidth against the device copy bandwidth (benchmarks/kernel_bandwidth.py), profile
# the staged CUDA kernel with Nsight Compute.
# Knobs for a targeted rerun: STEPS, DEVICE_SECONDS, BENCH_LOSSES, KERNEL_TESTS_K, GIT_COMMIT.
# Every step is timed and bounded; a failing step is reported and the next ones still run.
# The whole script stays under ~8 minutes. Logs and results go to ${OUT:-benchmarks/results}:
# one log per step plus bench_loss's CSV; a device run brings back at most 8 files from $OUT,
# so pick steps with STEPS (all of them make 13).
# Usage: bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
# The device image's interpreter with torch is `python3`; a bare `python` may be missing there.
PY="${PYTHON:-$(command -v python3 || echo python)}"
# CMake finds nvcc on PATH (SHL_CUDA=1 makes a missing one a build error).
if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
# Output of a step killed by its time limit would stay in Python's buffer and be lost.
export PYTHONUNBUFFERED=1
# The package from this tree also when the build step is skipped (STEPS without build: the
# Triton paths need no build; the editable build puts shl_kernels._C here too).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# pytest-xdist (in the device image) spreads the many small Triton compiles over the cores.
XDIST=() XDIST4=()  # expanded as ${X[@]+...}: empty arrays are "unbound" under set -u (bash < 4.4)
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8) XDIST4=(-n 4)
# DEVICE_SECONDS bounds the whole script; STEPS="build bench_loss" runs only the named steps
# (a targeted rerun after a fix, when little device time is left).
DEADLINE=$((SECONDS + ${DEVICE_SECONDS:-460}))
STEPS="${STEPS:-}"
SUMMARY=()

# step NAME MAX_SECONDS CMD...: run CMD with a limit (cut to the time left), log to
# $OUT_DIR/NAME.log, show its tail, record status and duration.
step() {
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS)) t0=$SECONDS rc
  shift 2
  if [[ -n $STEPS && " $STEPS " != *" $name "* ]]; then
    return
  fi
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

step env 30 bash -c "nvidia-smi -L; nvcc --version | tail -n 1; cmake --version | head -n 1; $PY -c '
import os, sysconfig, torch, triton
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)
print(torch.cuda.get_device_name(0))
inc = sysconfig.get_paths()[\"include\"]  # the build needs Python.h
print(\"Python.h:\", os.path.exists(os.path.join(inc, \"Python.h\")), inc)
try:
    import pybind11
    print(\"pybind11\", pybind11.__version__)
except ImportError:
    print(\"pybind11 missing: no native build\")'"

# Build the native extension with the CUDA kernels for sm_90 (plain 90, not 90a: the kernels
# use no wgmma/setmaxnreg, and an older CMake rejects the "a" suffix). The machine is offline: no
# index, no dependency resolution, no pip self-check (each would wait on the network); if
# pybind11/cmake are missing the build fails, and the Triton steps still run. setup.py falls
# back to a system cmake when the pip one is absent.
TAIL=5 step build 150 env SHL_CUDA=1 SHL_CUDA_ARCH=90 PIP_NO_INPUT=1 \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index --disable-pip-version-check -e .
if [[ -f $OUT_DIR/build.log ]] && ! grep -q "Successfully installed" "$OUT_DIR/build.log"; then
  echo "pip could not build shl_kernels._C (see $OUT_DIR/build.log): CUDA-backend tests skip,"
  echo "Triton continues from the source tree."
fi


if [[ -f benchmarks/bench_loss.py ]]; then
  TAIL=12 step bench_loss 150 "$PY" benchmarks/bench_loss.py --device cuda --quick-gpu \
    --losses "${BENCH_LOSSES:-shl,bce,focal,asl}"
  # The same SHL shapes with float 0/1 targets, then CSR targets: the fused losses convert
  # and check them (one pass of the extension's CUDA kernels; without the build, Triton's).
  TAIL=16 step bench_float 150 bash -c "$PY benchmarks/bench_loss.py --device cuda \
    --quick-gpu --losses shl --float-targets; $PY benchmarks/bench_loss.py --device cuda \
    --quick-gpu --losses shl --csr-targets"
else
  SUMMARY+=("$(printf '%-14s %-22s %5s' bench_loss "skipped: no script" -)")
fi

# Right after the benchmarks (issue 4's B=16 Triton target is host-bound): where the host
# time of a B=16 step goes. Triton steps with and without direct launches
# (triton_launch.DirectLaunch) beside eager, then per-op host costs, torch.profiler, cProfile.
TAIL=90 step profile 90 bash -c "$PY benchmarks/profile_step.py --direct-ab; \
  $PY benchmarks/profile_step.py --steps 30 --cprofile 30"

# Training shapes, Triton and CUDA backends; the public API's GPU cases (op counts of a
# small step, the one-op backward, target forms, torch.compile). With xdist the tests run in
# 4 processes (their memory checks read each process's own allocator, so they are not
# disturbed).
TAIL=25 step gpu_tests 150 "$PY" -m pytest -q -rs -p no:cacheprovider ${XDIST4[@]+"${XDIST4[@]}"} \
  tests/test_gpu.py tests/test_api.py tests/test_masks.py tests/test_csr_targets.py \
  tests/test_compile.py

# Differential fuzzing of cuda and triton against the float64 reference (random shapes up
# to 40000 labels, every dtype, option and edge: benchmarks/fuzz_backends.py); a failure
# prints the seed that replays it.
TAIL=12 step fuzz 75 "$PY" benchmarks/fuzz_backends.py --device cuda --seconds 60

# Every kernel test file on the GPU: the CUDA kernel's own tests, the small-shape Triton SHL
# tests (lane and chunk edge cases, tiny BLOCKs) and the GPU backends (cuda, triton) of the
# elementwise losses. "-k 'cuda or triton'" keeps every test of test_cuda_kernel.py and
# test_triton_kernel.py (their file names match) and drops the elementwise cpu-backend ones
# (CI runs those). Many small Triton variants to compile: xdist spreads them over the cores.
TAIL=15 step kernel_tests 150 "$PY" -m pytest -q -rs -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} \
  -k "${KERNEL_TESTS_K:-cuda or triton}" tests/test_cuda_kernel.py tests/test_triton_kernel.py \
  tests/test_elementwise_kernels.py

# Kernel-only time and bandwidth of every SHL kernel (CUDA staged with the flat schedule at
# 512 and 256 threads, with plain loads instead of cp.async, with the group schedule
# (block-wide segments from 1024 labels, the default; off; from 2048), unstaged; Triton's
# window schedule and its staged kernel; `cuda staging only`: rows staged and unstaged
# without the passes, the floor of the staged design), in shuffled and in segment order,
# against the copy bandwidth, at 100 and 1000 segments, at C=8922 (not a multiple of 8: rows with a
# head and a tail) and at B=16, with `cuda windows/2` (rows that fit staged in windows of
# about half a row: what a window pass costs). (It measures the device copy bandwidth
# first.)
TAIL=60 step kernel_bw 200 "$PY" benchmarks/kernel_bandwidth.py --block-mins off,2048 \
  --shape 4096,32768,100 --shape 4096,32768,1000 --shape 2048,8922,300 --shape 16,8192,64

# Rows beyond shared memory: fp32 rows of 150000 labels (cuda staged takes windows;
# windows/100KB: smaller ones, two blocks per SM) against the unstaged kernel and Triton,
# bf16 rows of 74000 labels (all ICD-10-CM codes: the staged Triton kernel in chunks).
# A separate step, so a slow kernel_bw leaves these.
TAIL=30 step kernel_big 100 bash -c "$PY benchmarks/kernel_bandwidth.py --dtype float32 \
  --shape 512,150000,300 --kernels 'cuda staged,cuda windows/100KB,cuda unstaged,triton' \
  --repeats 10; $PY benchmarks/kernel_bandwidth.py --shape 1024,74000,300 --orders shuffled \
  --kernels 'cuda staged,triton,triton staged' --repeats 10"

# Where Triton's staged kernel beats its window schedule on shuffled labels (the default's
# rule, triton_shl._staged_wins): row lengths and batch sizes around the measured points.
TAIL=40 step triton_sched 90 "$PY" benchmarks/kernel_bandwidth.py --orders shuffled \
  --kernels "triton,triton staged" --repeats 10 --shape 4096,16384,100 \
  --shape 4096,12000,100 --shape 1024,32768,100 --shape 264,32768,100 --shape 132,32768,100 \
  --shape 64,32768,100 --shape 1024,8922,300

# Nsight Compute on the staged CUDA kernel (4096 x 32768, bf16, shuffled labels, flat
# schedule; its two launches): what bounds it. Static counts (cuobjdump of an sm_90 build)
# put it at ~60 instructions per label, which at full issue would take ~0.25 ms of its 0.8:
# issue slots, pipe use (MUFU, LSU), warp stalls by reason and by source line (-lineinfo)
# say whether it waits on latency (phases, barriers), shared memory or issue.
if command -v ncu >/dev/null; then
  TAIL=80 step ncu 120 ncu -k regex:shl_staged_kernel -c 2 --section SpeedOfLight \
    --section Occupancy --section LaunchStats --section SchedulerStats \
    --section WarpStateStats --section ComputeWorkloadAnalysis --section InstructionStats \
    --section MemoryWorkloadAnalysis --section SourceCounters \
    "$PY" benchmarks/kernel_bandwidth.py --kernels "cuda staged" \
    --orders shuffled --shape 4096,32768,100 --repeats 1 --warmup 0
else
  SUMMARY+=("$(printf '%-14s %-22s %5s' ncu "skipped: no ncu" -)")
fi

echo
echo "=== summary (logs in $OUT_DIR)"
printf '%-14s %-22s %6s\n' step status time
printf '%s\n' "${SUMMARY[@]}"
