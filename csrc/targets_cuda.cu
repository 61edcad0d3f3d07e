// targets.h on CUDA: a grid-stride pass, the flag set by the threads that saw a bad value; CSR
// targets a block per row.
#include <cuda_runtime.h>

#include "cuda_common.cuh"
#include "targets.h"

namespace shl {
namespace {

constexpr unsigned kBlock = 256;
constexpr int64_t kMaxBlocks = 4096;

template <class S>
__global__ void __launch_bounds__(kBlock) to_mask_kernel(const S* t, uint8_t* out, int64_t n,
                                                          int32_t* bad) {
  bool any = false;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const auto v = DevConv<S>::load(t[i]);
    out[i] = v != 0;
    any |= (v != 0) & (v != 1);  // NaN too: it is neither
  }
  if (any) atomicOr(reinterpret_cast<unsigned*>(bad), 1u);
}

template <class S>
cudaError_t launch(const MaskArgs& a, int32_t* bad, cudaStream_t s) {
  cudaError_t e = cudaMemsetAsync(bad, 0, sizeof(int32_t), s);
  if (e != cudaSuccess || a.n == 0) return e;
  const int64_t blocks = (a.n + kBlock - 1) / kBlock;
  launch_kernel(to_mask_kernel<S>, static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks),
                kBlock, 0, s, static_cast<const S*>(a.t), a.out, a.n, bad);
  return cudaGetLastError();
}

// CSR: check[] starts as {0, INT64_MAX, INT64_MIN, 0}.
__global__ void csr_init_kernel(int64_t* check) {
  check[kCsrBadIndptr] = 0;
  check[kCsrMinId] = INT64_MAX;
  check[kCsrMaxId] = INT64_MIN;
  check[kCsrDuplicate] = 0;
}

// A block per row (grid-stride): its indptr checked, then its ids set in the zeroed mask with
// word-wide atomicOr, whose old value shows an id set before (a duplicate); the ids' min and
// max reduced per block, one atomic each.
template <class P, class I>
__global__ void __launch_bounds__(kBlock) csr_kernel(const P* ptr, const I* ids, int64_t B,
                                                     int64_t C, int64_t nnz, uint8_t* out,
                                                     int64_t* check) {
  __shared__ long long lo_s[kBlock / 32], hi_s[kBlock / 32];
  for (int64_t r = blockIdx.x; r < B; r += gridDim.x) {
    const int64_t p0 = ptr[r], p1 = ptr[r + 1];
    const bool bad = (r == 0 && p0 != 0) || (r == B - 1 && p1 != nnz) || p1 < p0 || p0 < 0 ||
                     p1 > nnz;
    if (bad) {  // block-uniform: the row's ids are not read
      if (threadIdx.x == 0) atomicMax(reinterpret_cast<long long*>(check + kCsrBadIndptr), 1LL);
      continue;
    }
    long long lo = INT64_MAX, hi = INT64_MIN;
    bool dup = false;
    for (int64_t k = p0 + threadIdx.x; k < p1; k += kBlock) {
      const long long id = ids[k];
      lo = id < lo ? id : lo;
      hi = id > hi ? id : hi;
      if (id >= 0 && id < C) {
        const int64_t o = r * C + id;
        const unsigned shift = unsigned(o & 3) * 8u;
        const unsigned old =
            atomicOr(reinterpret_cast<unsigned*>(out + (o & ~int64_t(3))), 1u << shift);
        dup |= ((old >> shift) & 0xffu) != 0;
      }
    }
    if (dup) atomicMax(reinterpret_cast<long long*>(check + kCsrDuplicate), 1LL);
    for (int o = 16; o > 0; o >>= 1) {
      const long long l = __shfl_down_sync(0xffffffffu, lo, o);
      const long long h = __shfl_down_sync(0xffffffffu, hi, o);
      lo = l < lo ? l : lo;
      hi = h > hi ? h : hi;
    }
    if (threadIdx.x % 32 == 0) {
      lo_s[threadIdx.x / 32] = lo;
      hi_s[threadIdx.x / 32] = hi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (unsigned w = 1; w < kBlock / 32; ++w) {
        lo = lo_s[w] < lo ? lo_s[w] : lo;
        hi = hi_s[w] > hi ? hi_s[w] : hi;
      }
      if (p1 > p0) {
        atomicMin(reinterpret_cast<long long*>(check + kCsrMinId), lo);
        atomicMax(reinterpret_cast<long long*>(check + kCsrMaxId), hi);
      }
    }
    __syncthreads();  // lo_s / hi_s are reused by the next row
  }
}

template <class P, class I>
cudaError_t launch_csr(const CsrArgs& a, int64_t* check, cudaStream_t s) {
  cudaError_t e = cudaMemsetAsync(a.out, 0, static_cast<size_t>(a.B * a.C), s);
  if (e != cudaSuccess) return e;
  launch_kernel(csr_init_kernel, 1, 1, 0, s, check);
  const int64_t blocks = a.B < kMaxBlocks ? a.B : kMaxBlocks;
  launch_kernel(csr_kernel<P, I>, static_cast<unsigned>(blocks), kBlock, 0, s,
                static_cast<const P*>(a.indptr), static_cast<const I*>(a.indices), a.B, a.C,
                a.nnz, a.out, check);
  return cudaGetLastError();
}

}  // namespace

const char* csr_to_mask_cuda(const CsrArgs& a, int64_t* check, void* stream) {
  if (a.B < 1 || a.C < 0 || a.nnz < 0) return "csr_to_mask_cuda: needs B >= 1, C and nnz >= 0";
  if (!check || !a.indptr || !a.out || (a.nnz > 0 && !a.indices))
    return "csr_to_mask_cuda: indptr, indices, out and check are required";
  if (reinterpret_cast<uintptr_t>(a.out) % 4 != 0) return "out: must be 4-byte aligned";
  const bool p32 = a.indptr_type == DType::kI32, i32 = a.indices_type == DType::kI32;
  if ((!p32 && a.indptr_type != DType::kI64) || (!i32 && a.indices_type != DType::kI64))
    return "csr_to_mask_cuda: indptr and indices must be int32 or int64";
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return on_device_of(a.device, check, "check: not in CUDA device memory", [&]() -> cudaError_t {
    if (p32) return i32 ? launch_csr<int32_t, int32_t>(a, check, s)
                        : launch_csr<int32_t, int64_t>(a, check, s);
    return i32 ? launch_csr<int64_t, int32_t>(a, check, s)
               : launch_csr<int64_t, int64_t>(a, check, s);
  });
}

const char* targets_to_mask_cuda(const MaskArgs& a, int32_t* bad, void* stream) {
  if (a.n < 0) return "targets_to_mask_cuda: negative size";
  if (!bad) return "bad: required";
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return on_device_of(a.device, bad, "bad: not in CUDA device memory", [&]() -> cudaError_t {
    switch (a.t_dtype) {
      case DType::kF32: return launch<float>(a, bad, s);
      case DType::kF64: return launch<double>(a, bad, s);
      case DType::kF16: return launch<__half>(a, bad, s);
      case DType::kBF16: return launch<__nv_bfloat16>(a, bad, s);
      default: return cudaErrorInvalidValue;
    }
  });
}

}  // namespace shl
