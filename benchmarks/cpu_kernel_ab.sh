#!/usr/bin/env bash
# A/B of the CPU SHL kernel: csrc/shl_cpu.cpp of the working tree against the same file at
# another commit (default HEAD~1), both compiled with the flags of the extension build into
# one program that times them side by side (benchmarks/cpu_kernel_ab.cpp).
#   bash benchmarks/cpu_kernel_ab.sh [base-commit] [threads]
set -euo pipefail
base=${1:-HEAD~1}
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git -C "$root" show "$base:csrc/shl_cpu.cpp" > "$tmp/base.cpp"
flags=(-std=gnu++17 -O3 -march=native -fno-math-errno -fopenmp -DSHL_WITH_OPENMP -I"$root/csrc")
cat > "$tmp/base_entry.cpp" <<'CPP'
#include "shl_args.h"
namespace shl { const char* shl_fused_cpu(const ShlArgs& a); }
extern "C" const char* base_shl_fused_cpu(const void* a) {
  return shl::shl_fused_cpu(*static_cast<const shl::ShlArgs*>(a));
}
CPP
# the base version lives in namespace shl_base (its ShlArgs has the same layout)
g++ "${flags[@]}" -Dshl=shl_base -c "$tmp/base.cpp" -o "$tmp/base.o"
g++ "${flags[@]}" -Dshl=shl_base -c "$tmp/base_entry.cpp" -o "$tmp/base_entry.o"
g++ "${flags[@]}" -c "$root/csrc/shl_cpu.cpp" -o "$tmp/new.o"
g++ "${flags[@]}" "$root/benchmarks/cpu_kernel_ab.cpp" "$tmp/new.o" "$tmp/base.o" \
  "$tmp/base_entry.o" -o "$tmp/ab"
echo "new: working tree; base: $base ($(git -C "$root" rev-parse --short "$base"))"
"$tmp/ab" "${2:-1}"
