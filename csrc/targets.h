// Dense 0/1 targets (and ignore masks) of a floating dtype to the uint8 masks the kernels
// read, in one pass: out[i] = (t[i] != 0), and whether any t[i] is neither 0 nor 1 (soft
// labels, NaN), which the caller reports. Done with torch ops this took five passes over
// the batch and cost more than the fused loss itself (CPU, 512 x 8192 fp32: 6.1 ms against
// 3.5 ms for the loss and its gradient).
#pragma once
#include <cstdint>

#include "dtype.h"

namespace shl {

struct MaskArgs {
  const void* t = nullptr;  // [n] targets, dtype t_dtype (float32/64, float16, bfloat16)
  DType t_dtype = DType::kF32;
  int64_t n = 0;
  uint8_t* out = nullptr;  // [n] 1 where t != 0
  int num_threads = 0;     // CPU: OpenMP threads (0 = runtime default)
  int device = -1;         // CUDA: the device holding the tensors (-1 = ask the driver)
};

// *bad = 1 when some value is neither 0 nor 1, else 0. Returns nullptr or an error.
const char* targets_to_mask_cpu(const MaskArgs& a, int* bad);
#ifdef SHL_WITH_CUDA
// *bad (an int32 in device memory) becomes 1, asynchronously on `stream`, when some value
// is neither 0 nor 1, else 0. Returns nullptr or the CUDA error text.
const char* targets_to_mask_cuda(const MaskArgs& a, int32_t* bad, void* stream);
#endif

// CSR targets (indptr [B+1] and indices [nnz], each int32 or int64) to the dense uint8 [B, C]
// mask, with the checks the caller reports, in this order: indptr starts at 0, does not
// decrease and ends at nnz; every id in [0, C); no id twice in a row. With torch ops this took
// ~20 small ops (on a GPU, a launch each) for the dense pass of a few.
struct CsrArgs {
  const void* indptr = nullptr;
  DType indptr_type = DType::kI64;
  const void* indices = nullptr;
  DType indices_type = DType::kI64;
  int64_t B = 0, C = 0, nnz = 0;
  uint8_t* out = nullptr;  // [B, C]: every element written when the checks pass
  int num_threads = 0;     // CPU: OpenMP threads (0 = runtime default)
  int device = -1;         // CUDA: the device holding the tensors (-1 = ask the driver)
};

// The checks' results, check[kCsr...]: indptr malformed (0/1); the smallest and largest id
// (INT64_MAX / INT64_MIN without ids; valid when indptr is well formed); an id twice in a row
// (0/1; valid when the ids are in range).
enum : int { kCsrBadIndptr = 0, kCsrMinId = 1, kCsrMaxId = 2, kCsrDuplicate = 3, kCsrChecks = 4 };

// Returns nullptr or an error.
const char* csr_to_mask_cpu(const CsrArgs& a, int64_t* check);
#ifdef SHL_WITH_CUDA
// check: int64 [kCsrChecks] in device memory, written asynchronously on `stream` (B >= 1).
// out must be 4-byte aligned and its allocation cover whole 4-byte words (ids are set with
// word-wide atomics, which also find duplicates; bytes past B * C are OR-ed with 0).
const char* csr_to_mask_cuda(const CsrArgs& a, int64_t* check, void* stream);
#endif

}  // namespace shl
