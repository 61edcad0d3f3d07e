// Shared by the CUDA kernels (shl_cuda.cu, elementwise_cuda.cu): device storage types and
// conversions (DevConv<S> mirrors the host Conv<S> of dtype.h with the cuda_fp16.h /
// cuda_bf16.h intrinsics, round to nearest even on store), and launching on the device that
// holds the outputs.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dtype.h"

namespace shl {

template <class S>
struct DevConv;
template <>
struct DevConv<float> {
  using A = float;
  static __device__ __forceinline__ A load(float v) { return v; }
  static __device__ __forceinline__ float store(A v) { return v; }
};
template <>
struct DevConv<double> {
  using A = double;
  static __device__ __forceinline__ A load(double v) { return v; }
  static __device__ __forceinline__ double store(A v) { return v; }
};
template <>
struct DevConv<__half> {
  using A = float;
  static __device__ __forceinline__ A load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(A v) { return __float2half_rn(v); }
};
template <>
struct DevConv<__nv_bfloat16> {
  using A = float;
  static __device__ __forceinline__ A load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(A v) { return __float2bfloat16_rn(v); }
};

// Device storage type of each floating DType.
template <DType D>
struct DevStorage;
template <>
struct DevStorage<DType::kF32> {
  using type = float;
};
template <>
struct DevStorage<DType::kF64> {
  using type = double;
};
template <>
struct DevStorage<DType::kF16> {
  using type = __half;
};
template <>
struct DevStorage<DType::kBF16> {
  using type = __nv_bfloat16;
};

// Runs launch() (returning a cudaError_t) with the device holding `out` current (the
// caller's current device may differ: torch tracks its own), then restores the current
// device. Returns nullptr or the CUDA error text; not_device_msg is the error when `out` is not device memory.
template <class Launch>
const char* on_device_of(const void* out, const char* not_device_msg, Launch&& launch) {
  cudaPointerAttributes attr;
  cudaError_t e = cudaPointerGetAttributes(&attr, out);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return cudaGetErrorString(e);
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    return not_device_msg;
  int current = 0;
  if ((e = cudaGetDevice(&current)) != cudaSuccess) return cudaGetErrorString(e);
  if (attr.device != current && (e = cudaSetDevice(attr.device)) != cudaSuccess)
    return cudaGetErrorString(e);
  e = launch();
  if (attr.device != current) cudaSetDevice(current);
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}
}  // namespace shl
