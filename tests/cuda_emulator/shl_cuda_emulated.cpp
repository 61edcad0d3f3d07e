// C entry point of the emulated CUDA SHL kernel (tests/test_cuda_emulated.py loads it with
// ctypes): csrc/shl_cuda.cu built as host C++ against tests/cuda_emulator/cuda_runtime.h.
// Pointers are host memory standing in for device memory.
#include <cstdint>

#include "shl_args.h"

extern "C" const char* shl_emulated_fused(
    const void* z, int z_dtype, int64_t B, int64_t C, int64_t m, const uint8_t* pos,
    const uint8_t* ign, const int64_t* order, const int64_t* offsets, const void* w,
    const void* eta, const void* delta, double grad_scale, void* loss, void* grad,
    void* grad_eta, const int32_t* position, int staged, const int32_t* schedule,
    int64_t block_min) {
  shl::ShlArgs a;
  a.z = z;
  a.z_dtype = static_cast<shl::DType>(z_dtype);
  a.B = B;
  a.C = C;
  a.m = m;
  a.pos = pos;
  a.ign = ign;
  a.order = order;
  a.offsets = offsets;
  a.w = w;
  a.eta = eta;
  a.delta = delta;
  a.grad_scale = grad_scale;
  a.loss = loss;
  a.grad = grad;
  a.grad_eta = grad_eta;
  a.position = position;
  a.cuda_staging = staged;
  a.schedule = schedule;
  a.cuda_block_min = block_min;
  a.device = 0;
  return shl::shl_fused_cuda(a, nullptr);
}
