// Shared by the CUDA kernels (shl_cuda.cu, elementwise_cuda.cu): device storage types and
// conversions (DevConv<S> mirrors the host Conv<S> of dtype.h with the cuda_fp16.h /
// cuda_bf16.h intrinsics, round to nearest even on store), and launching on the device that
// holds the outputs.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstring>
#include <utility>

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

// N elements of T moved as one access (16 bytes at most; aligned to its size).
template <int N, class T>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Whether p is a multiple of n bytes (host side: may a kernel move packs there); null counts
// as aligned.
inline bool aligned(const void* p, int64_t n) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(n) == 0;
}

// Pack accesses at p (a multiple of the pack's size: the emulator checks it, as a GPU would).
template <int N, class T>
__device__ __forceinline__ Pack<N, T> load_pack(const T* p) {
#ifdef SHL_CUDA_EMULATION
  shl_emu::check_aligned(p, sizeof(Pack<N, T>));
#endif
  return *reinterpret_cast<const Pack<N, T>*>(p);
}

// In global memory. 16-byte packs go out as one vector store written in PTX: assigning the
// struct (or a uint4 of it) let nvcc 13.0 split the store of gathered values into 2- or
// 4-byte stores (the staged SHL kernel's unstaging: eight stores per pack where one writes
// whole sectors).
template <int N, class T>
__device__ __forceinline__ void store_pack(T* p, const Pack<N, T>& v) {
#ifdef SHL_CUDA_EMULATION
  shl_emu::check_aligned(p, sizeof(Pack<N, T>));
#endif
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(Pack<N, T>) == 16) {
    uint4 w;
    memcpy(&w, &v, 16);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y),
                 "r"(w.z), "r"(w.w)
                 : "memory");
    return;
  }
#endif
  *reinterpret_cast<Pack<N, T>*>(p) = v;
}

// The unsigned integer of N bytes (N flag bytes read as one value).
template <int N> struct UintOf;
template <> struct UintOf<1> { using type = uint8_t; };
template <> struct UintOf<2> { using type = uint16_t; };
template <> struct UintOf<4> { using type = uint32_t; };
template <> struct UintOf<8> { using type = uint64_t; };

// N flag bytes at p (N-byte aligned) as one integer, byte t in bits 8t..8t+7.
template <int N>
__device__ __forceinline__ typename UintOf<N>::type load_flags(const uint8_t* p) {
  return load_pack<1>(reinterpret_cast<const typename UintOf<N>::type*>(p)).v[0];
}

// The sum of every thread's v over a block of N threads (N a power of two) in a fixed order
// (deterministic): a tree over the shared array part [N]. Every thread of the block calls it;
// every thread gets the sum.
template <int N, class A>
__device__ __forceinline__ A block_sum_fixed(A v, A* part) {
  part[threadIdx.x] = v;
  __syncthreads();
  for (int half = N / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
    __syncthreads();
  }
  return part[0];
}

// Runs launch() (returning a cudaError_t) with the device holding the outputs current (the
// caller's current device may differ: torch tracks its own), then restores the current
// device. `device` is that device when the caller knows it (the bindings read it from
// DLPack), else -1: the driver is asked where `out` lives (a pointer-attribute query per
// launch), and not_device_msg is the error when it is not device memory.
// Returns nullptr or the CUDA error text.
template <class Launch>
const char* on_device_of(int device, const void* out, const char* not_device_msg,
                         Launch&& launch) {
  cudaError_t e;
  if (device < 0) {
    cudaPointerAttributes attr;
    if ((e = cudaPointerGetAttributes(&attr, out)) != cudaSuccess) {
      cudaGetLastError();
      return cudaGetErrorString(e);
    }
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
      return not_device_msg;
    device = attr.device;
  }
  int current = 0;
  if ((e = cudaGetDevice(&current)) != cudaSuccess) return cudaGetErrorString(e);
  if (device != current && (e = cudaSetDevice(device)) != cudaSuccess)
    return cudaGetErrorString(e);
  e = launch();
  if (device != current) cudaSetDevice(current);
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

// kernel<<<grid, block, smem, stream>>>(args...), and the block's dynamic shared memory
// (the kernels' extern __shared__ array). Under SHL_CUDA_EMULATION (tests/cuda_emulator:
// the .cu files built as host C++) both come from the emulator.
// async_copy<N>(smem, gmem), async_commit(), async_wait<N>(): N-byte (4, 8, 16) copies from
// global to shared memory that run while the thread goes on (cp.async, sm_80+), grouped by
// commit; wait<N> returns once at most the N latest groups are still in flight. The copied
// bytes are the issuing thread's to read after the wait (other threads: after a barrier).
#ifdef SHL_CUDA_EMULATION
using shl_emu::async_commit;
using shl_emu::async_copy;
using shl_emu::async_wait;
using shl_emu::dynamic_smem;
using shl_emu::launch_kernel;
#else
template <int N>
__device__ __forceinline__ void async_copy(void* smem, const void* gmem) {
  static_assert(N == 4 || N == 8 || N == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  if constexpr (N == 16)  // .cg: through L2 only (the row is read once)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(s), "l"(gmem), "n"(N)
                 : "memory");
#else  // older devices: a plain copy (the kernels are built for sm_80 and up)
  struct alignas(N) Bytes { unsigned char b[N]; };
  *static_cast<Bytes*>(smem) = *static_cast<const Bytes*>(gmem);
#endif
}

__device__ __forceinline__ void async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

template <class... Params, class... Args>
inline void launch_kernel(void (*kernel)(Params...), unsigned grid, unsigned block, size_t smem,
                          cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
}

__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char smem[];
  return smem;
}
#endif

// A per-device int the launchers compute once (device attributes, function attributes set);
// 0 = not yet. Races only repeat the computation.
constexpr int kMaxCachedDevices = 64;
struct PerDevice {
  std::atomic<int> v[kMaxCachedDevices] = {};
  int get(int dev) const {
    return dev >= 0 && dev < kMaxCachedDevices ? v[dev].load(std::memory_order_relaxed) : 0;
  }
  void set(int dev, int x) {
    if (dev >= 0 && dev < kMaxCachedDevices) v[dev].store(x, std::memory_order_relaxed);
  }
};

// Device attribute Attr of device dev, queried once per device (0 on error).
template <cudaDeviceAttr Attr>
inline int device_attr(int dev) {
  static PerDevice cache;
  int v = cache.get(dev);
  if (v == 0 && dev >= 0) {
    if (cudaDeviceGetAttribute(&v, Attr, dev) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    cache.set(dev, v);
  }
  return v;
}
}  // namespace shl
