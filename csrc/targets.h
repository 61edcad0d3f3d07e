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

}  // namespace shl
