// The fused SHL kernel's arguments, shared by the CPU (csrc/shl_cpu.cpp) and CUDA
// (csrc/shl_cuda.cu) implementations. Plain pointers; the bindings check shapes/dtypes.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace shl {

// One fused pass: per row, the SHL loss (SPEC section 3) and its gradient.
// "acc" is float64 when z is float64, else float32.
struct ShlArgs {
  const void* z = nullptr;  // [B, C] logits, original label order, dtype z_dtype
  DType z_dtype = DType::kF32;
  int64_t B = 0, C = 0, m = 0;
  const uint8_t* pos = nullptr;      // [B, C] nonzero = positive (bool/uint8 storage)
  const uint8_t* ign = nullptr;      // [B, C] nonzero = ignored; null = none ignored
  const int64_t* order = nullptr;    // [C] original label id at segment position; null = identity
  const int64_t* offsets = nullptr;  // [m + 1] segment boundaries over positions
  const void* w = nullptr;           // [C] acc, label weights by original id; null = 1
  const void* eta = nullptr;         // [m] acc, null logits; null = 0
  const void* delta = nullptr;       // [C] acc, logit offsets by original id; null = 0
  double grad_scale = 1.0;           // multiplies grad and grad_eta (1/B for "mean")
  void* loss = nullptr;              // out [B] acc: grad_scale * l_i (summed: the reduced loss)
  void* grad = nullptr;              // out [B, C] z dtype: grad_scale * dl_i/dz, original order
  void* grad_eta = nullptr;          // out [B, m] acc: grad_scale * dl_i/deta_k; null = skip
  int num_threads = 0;               // CPU: OpenMP threads (0 = runtime default)
  // CUDA only: the device holding the tensors (DLPack device_id); -1 = ask the driver.
  int device = -1;
  // CUDA only: [C] segment position of each original id (the inverse of order), which lets
  // the kernel stage a row in shared memory in segment order; null with a non-null order
  // = no staging. cuda_staging = 0 forces the unstaged kernel (tests, comparisons).
  const int32_t* position = nullptr;
  // CUDA only: the same map in 16 bits (C <= 65536): half the reads of position; either may
  // be given (position16 first).
  const uint16_t* position16 = nullptr;
  int cuda_staging = 1;
  // CUDA only: [m] segment ids in the order the warps take them (largest first balances
  // them); null = 0..m-1. Changes only which warp does a segment, never the results.
  const int32_t* schedule = nullptr;
  // CUDA only: segments of at least this many labels are done by a whole block, the others
  // by a warp or a lane; -1 = twice the block's threads (also a tuning knob for benchmarks).
  int64_t cuda_block_min = -1;
  // CUDA only: threads per block of the staged kernel, 512 (0 = default) or 256.
  int cuda_staged_threads = 0;
  // CUDA only: how a staged row's segments are spread over the block's threads: 1 (default)
  // the flat schedule (equal shares of positions, a segmented scan joins the segments that
  // cross shares), 0 the group schedule (block, warps and lanes take whole segments; uses
  // schedule and cuda_block_min). Never changes results beyond rounding.
  int cuda_flat = 1;
  // CUDA only: staged rows of 2- and 4-byte z in 16-byte packs are copied in with cp.async,
  // two packs ahead per thread and the next row's first packs during the current row's
  // work, where shared memory has room (1, default), or with plain loads (0).
  int cuda_async_staging = 1;
  // CUDA only, a benchmark probe (benchmarks/kernel_bandwidth.py), never for training: the
  // staged kernel stages and unstages every row without computing it (loss and grad_eta
  // rows 0, grad the staged bits: garbage), which times the row's way in and out alone.
  int cuda_staging_only = 0;
  // Optional: the reductions a "mean"/"sum" loss needs (deterministic, fixed order; CUDA:
  // by a second launch on the same stream), so that no torch op follows the kernel:
  // loss_total (0-dim acc) = sum of loss over rows; grad_eta_total ([m] acc, needs
  // grad_eta) = sum of grad_eta over rows. Null = skip.
  void* loss_total = nullptr;
  void* grad_eta_total = nullptr;
  // CUDA only, optional: a host copy of offsets ([m + 1], the same values). With it, rows
  // too large for shared memory are staged in windows (consecutive segments that fit, the
  // row read once per window; flat schedule only) instead of taking the unstaged kernel.
  const int64_t* offsets_host = nullptr;
  // CUDA only: at most this many bytes of shared memory for a staged row or window (its
  // labels, bitmask and segment statistics); 0 = all the device allows. Smaller values make
  // rows take windows (tests, comparisons).
  int64_t cuda_window_bytes = 0;
};

// Returns nullptr on success, else a static error message.
const char* shl_fused_cpu(const ShlArgs& a);
#ifdef SHL_WITH_CUDA
const char* shl_fused_cuda(const ShlArgs& a, void* stream);
#endif

}  // namespace shl
