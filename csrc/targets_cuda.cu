// targets.h on CUDA: a grid-stride pass, the flag set by the threads that saw a bad value.
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

}  // namespace

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
