// C entry points of the emulated CUDA kernels (tests/test_cuda_emulated.py loads them with
// ctypes): csrc/shl_cuda.cu, csrc/elementwise_cuda.cu and csrc/targets_cuda.cu built as host
// C++ against
// tests/cuda_emulator/cuda_runtime.h. Pointers are host memory standing in for device memory.
#include <cstdint>

#include "cuda_runtime.h"  // the emulator's (this directory comes first)
#include "shl_args.h"
#include "targets.h"

extern "C" const char* shl_emulated_fused(
    const void* z, int z_dtype, int64_t B, int64_t C, int64_t m, const uint8_t* pos,
    const uint8_t* ign, const int64_t* order, const int64_t* offsets, const void* w,
    const void* eta, const void* delta, double grad_scale, void* loss, void* grad,
    void* grad_eta, const void* position, int position_bits, int staged, const int32_t* schedule,
    int64_t block_min, int staged_threads, int flat, int async_staging, void* loss_total,
    void* grad_eta_total, int windows, int64_t window_bytes, int staging_only) {
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
  if (position_bits == 16) a.position16 = static_cast<const uint16_t*>(position);
  else a.position = static_cast<const int32_t*>(position);
  a.cuda_staging = staged;
  a.schedule = schedule;
  a.cuda_block_min = block_min;
  a.cuda_staged_threads = staged_threads;
  a.cuda_flat = flat;
  a.cuda_async_staging = async_staging;
  a.loss_total = loss_total;
  a.grad_eta_total = grad_eta_total;
  a.offsets_host = windows ? offsets : nullptr;  // host memory here
  a.cuda_window_bytes = window_bytes;
  a.cuda_staging_only = staging_only;
  a.device = 0;
  return shl::shl_fused_cuda(a, nullptr);
}

// The most dynamic shared memory a launch asked for since the last call (0: only unstaged
// launches), then reset.
extern "C" int64_t emulated_take_max_smem() {
  const auto v = static_cast<int64_t>(shl_emu::max_dynamic_smem());
  shl_emu::max_dynamic_smem() = 0;
  return v;
}

// The same for csrc/elementwise_cuda.cu (BCE, focal, ASL; see elementwise.h).
#include "elementwise.h"

extern "C" const char* elementwise_emulated_fused(
    const void* z, int z_dtype, int64_t B, int64_t C, const uint8_t* pos, const uint8_t* ign,
    const void* weight, const void* pos_weight, int kind, double alpha, double gamma,
    double gamma_pos, double gamma_neg, double clip, double eps, int detach, double grad_scale,
    void* loss_rows, void* loss_el, void* grad, void* loss_total) {
  shl::ElemArgs a;
  a.z = z;
  a.z_type = static_cast<shl::DType>(z_dtype);
  a.B = B;
  a.C = C;
  a.pos = pos;
  a.ign = ign;
  a.weight = weight;
  a.pos_weight = pos_weight;
  a.kind = static_cast<shl::ElemKind>(kind);
  a.p.alpha = alpha;
  a.p.gamma = gamma;
  a.p.gamma_pos = gamma_pos;
  a.p.gamma_neg = gamma_neg;
  a.p.clip = clip;
  a.p.eps = eps;
  a.p.detach = detach != 0;
  a.grad_scale = grad_scale;
  a.loss_rows = loss_rows;
  a.loss_total = loss_total;
  a.loss_el = loss_el;
  a.grad = grad;
  a.device = 0;
  return shl::elementwise_fused_cuda(a, nullptr);
}

extern "C" const char* targets_emulated_to_mask(const void* t, int t_dtype, int64_t n,
                                                uint8_t* out, int32_t* bad) {
  shl::MaskArgs a;
  a.t = t;
  a.t_dtype = static_cast<shl::DType>(t_dtype);
  a.n = n;
  a.out = out;
  a.device = 0;
  return shl::targets_to_mask_cuda(a, bad, nullptr);
}

extern "C" const char* csr_emulated_to_mask(const void* indptr, int indptr_dtype,
                                            const void* indices, int indices_dtype, int64_t B,
                                            int64_t C, int64_t nnz, uint8_t* out,
                                            int64_t* check) {
  shl::CsrArgs a;
  a.indptr = indptr;
  a.indptr_type = static_cast<shl::DType>(indptr_dtype);
  a.indices = indices;
  a.indices_type = static_cast<shl::DType>(indices_dtype);
  a.B = B;
  a.C = C;
  a.nnz = nnz;
  a.out = out;
  a.device = 0;
  return shl::csr_to_mask_cuda(a, check, nullptr);
}
