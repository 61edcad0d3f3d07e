// CUDA emulation for tests (no GPU): lets csrc/*.cu compile as host C++ (g++ -x c++
// -DSHL_CUDA_EMULATION, this directory first on the include path, so that this file stands
// in for the real <cuda_runtime.h>) and runs every block of a launch with one std::thread
// per CUDA thread. __syncthreads and the warp intrinsics (__shfl*_sync, __ballot_sync) are
// real barriers over the block / the 32 threads of a warp, so a barrier or shuffle reached
// by only part of its threads hangs here as on a GPU; it aborts after kBarrierTimeout with
// a message instead. Blocks run one after another; dynamic shared memory starts poisoned
// (0xA5 bytes), as nothing promises it is zero on a GPU.
// Not emulated: memory-model subtleties beyond barrier ordering, timing, occupancy limits.
#pragma once
// The real CUDA headers first (host-compilable; their include guards keep them from being
// read again): they define __device__ & co. as attributes, redefined below.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

// The CUDA headers define these as attributes for host compilers; here they must vanish,
// and __shared__ variables become function statics (one block runs at a time).
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

namespace shl_emu {

constexpr auto kBarrierTimeout = std::chrono::seconds(60);
constexpr int kSmemOptin = 232448;  // sm_90's shared memory per block (227 KB)

// A reusable barrier for n threads (generation counted), aborting on a timeout.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait(const char* what) {
    std::unique_lock<std::mutex> lock(m_);
    const uint64_t gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, kBarrierTimeout, [&] { return gen_ != gen; })) {
      std::fprintf(stderr, "CUDA emulation: %s timed out (reached by %d of %d threads: a "
                           "divergent barrier or shuffle?)\n", what, count_, n_);
      std::abort();
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  uint64_t gen_ = 0;
};

struct Warp {
  Barrier bar{32};
  uint64_t slot[32];
};

struct Block {
  Block(unsigned threads, size_t smem_bytes)
      : bar(static_cast<int>(threads)), warps((threads + 31) / 32),
        smem(new unsigned char[smem_bytes + 16]) {
    std::memset(smem.get(), 0xA5, smem_bytes + 16);
  }
  Barrier bar;
  std::vector<Warp> warps;
  std::unique_ptr<unsigned char[]> smem;
};

inline thread_local Block* tl_block = nullptr;

// cp.async: copies are queued per thread and done at the wait that covers their group, so a
// read of the destination before that wait sees the old bytes (poison), as it may on a GPU.
struct PendingCopy {
  void* dst;
  const void* src;
  int bytes;
  uint64_t group;  // the commit group (tl_groups at issue: the next commit closes it)
};
inline thread_local std::vector<PendingCopy> tl_pending;
inline thread_local uint64_t tl_groups = 0;  // groups committed so far

// A vector access of `bytes` bytes (a Pack) at p: a GPU raises a misaligned-address error
// where p is not a multiple of them; x86 would not notice.
inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes) {
    std::fprintf(stderr, "CUDA emulation: %zu-byte vector access at a misaligned address\n",
                 bytes);
    std::abort();
  }
}

template <int N>
void async_copy(void* smem, const void* gmem) {
  static_assert(N == 4 || N == 8 || N == 16, "cp.async copies 4, 8 or 16 bytes");
  if (reinterpret_cast<uintptr_t>(smem) % N || reinterpret_cast<uintptr_t>(gmem) % N) {
    std::fprintf(stderr, "CUDA emulation: cp.async of %d bytes from/to a misaligned address\n", N);
    std::abort();
  }
  tl_pending.push_back({smem, gmem, N, tl_groups});
}
inline void async_commit() { ++tl_groups; }
template <int N>
void async_wait() {  // groups older than the N latest committed ones complete
  std::vector<PendingCopy> left;
  for (const PendingCopy& c : tl_pending) {
    if (c.group + N < tl_groups) std::memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));
    else left.push_back(c);
  }
  tl_pending.swap(left);
}

}  // namespace shl_emu

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

inline void __syncthreads() { shl_emu::tl_block->bar.wait("__syncthreads"); }

namespace shl_emu {
inline Warp& my_warp() { return tl_block->warps[threadIdx.x / 32]; }
inline int my_lane() { return static_cast<int>(threadIdx.x % 32); }
inline void check_full(unsigned mask) {
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "CUDA emulation: only full-warp masks are emulated\n");
    std::abort();
  }
}
// Every lane publishes v, the warp meets, each lane reads lane src(lane)'s value, the warp
// meets again (so that the slots can be reused).
template <class T, class Src>
T exchange(T v, Src src) {
  static_assert(sizeof(T) <= 8, "shuffles of up to 8 bytes");
  Warp& w = my_warp();
  const int lane = my_lane();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slot[lane] = bits;
  w.bar.wait("warp shuffle");
  T out;
  const uint64_t got = w.slot[src(lane) & 31];
  std::memcpy(&out, &got, sizeof(T));
  w.bar.wait("warp shuffle");
  return out;
}
}  // namespace shl_emu

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  shl_emu::check_full(mask);
  return shl_emu::exchange(v, [&](int lane) { return lane ^ lane_mask; });
}

template <class T>
T __shfl_sync(unsigned mask, T v, int src) {
  shl_emu::check_full(mask);
  return shl_emu::exchange(v, [&](int) { return src; });
}

template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  shl_emu::check_full(mask);
  // a lane past the warp's end reads its own value, as on the GPU
  return shl_emu::exchange(v, [&](int lane) { return lane + int(delta) < 32 ? lane + int(delta) : lane; });
}

template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
  shl_emu::check_full(mask);
  // a lane before the warp's start reads its own value, as on the GPU
  return shl_emu::exchange(v, [&](int lane) { return lane >= int(delta) ? lane - int(delta) : lane; });
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  shl_emu::check_full(mask);
  shl_emu::Warp& w = shl_emu::my_warp();
  w.slot[shl_emu::my_lane()] = pred ? 1 : 0;
  w.bar.wait("__ballot_sync");
  unsigned bits = 0;
  for (int j = 0; j < 32; ++j) bits |= static_cast<unsigned>(w.slot[j]) << j;
  w.bar.wait("__ballot_sync");
  return bits;
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  shl_emu::check_full(mask);
  shl_emu::my_warp().bar.wait("__syncwarp");
}

inline unsigned atomicOr(unsigned* address, unsigned v) {
  return __atomic_fetch_or(address, v, __ATOMIC_SEQ_CST);
}
inline long long atomicMax(long long* address, long long v) {
  long long old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
  while (old < v && !__atomic_compare_exchange_n(address, &old, v, false, __ATOMIC_SEQ_CST,
                                                 __ATOMIC_SEQ_CST)) {
  }
  return old;
}
inline long long atomicMin(long long* address, long long v) {
  long long old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
  while (old > v && !__atomic_compare_exchange_n(address, &old, v, false, __ATOMIC_SEQ_CST,
                                                 __ATOMIC_SEQ_CST)) {
  }
  return old;
}

inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }

// The runtime API calls of csrc/*.cu, answered for one emulated sm_90-like device.
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);  // launches run to completion in order: no stream to wait on
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "emulated CUDA error";
}
inline cudaError_t cudaDriverGetVersion(int* v) { *v = 13000; return cudaSuccess; }
inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = 13000; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  *v = attr == cudaDevAttrMaxSharedMemoryPerBlockOptin       ? shl_emu::kSmemOptin
       : attr == cudaDevAttrMaxSharedMemoryPerMultiprocessor ? 233472  // sm_90: 228 KB
       : attr == cudaDevAttrMultiProcessorCount          ? 4
                                                         : 0;
  return cudaSuccess;
}
inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void*) {
  std::memset(a, 0, sizeof(*a));
  a->type = cudaMemoryTypeDevice;
  return cudaSuccess;
}
template <class F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
template <class F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F, int, size_t) {
  *n = 1;
  return cudaSuccess;
}

namespace shl_emu {

inline unsigned char* dynamic_smem() {
  // 16-byte aligned, as the kernels' extern __shared__ __align__(16) array
  auto p = reinterpret_cast<uintptr_t>(tl_block->smem.get());
  return reinterpret_cast<unsigned char*>((p + 15) / 16 * 16);
}

// kernel<<<grid, block, smem>>>(args...): blocks one after another, run by the same `block`
// std::threads (created once per launch), each block with freshly poisoned dynamic shared
// memory.
// The most dynamic shared memory a launch asked for since the tests last took it (which
// kernel ran: the staged one asks for some, the unstaged one and the row sums for none).
inline size_t& max_dynamic_smem() {
  static size_t v = 0;
  return v;
}

template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), unsigned grid, unsigned block, size_t smem,
                   cudaStream_t, Args&&... args) {
  if (smem > max_dynamic_smem()) max_dynamic_smem() = smem;
  if (smem > kSmemOptin) {  // a GPU would refuse the launch
    std::fprintf(stderr, "CUDA emulation: %zu bytes of dynamic shared memory asked, the "
                         "device allows %d\n", smem, kSmemOptin);
    std::abort();
  }
  Block blk(block, smem);
  Barrier between(static_cast<int>(block));
  std::vector<std::thread> threads;
  threads.reserve(block);
  for (unsigned t = 0; t < block; ++t)
    threads.emplace_back([&, t] {
      tl_block = &blk;
      threadIdx = make_uint3(t, 0, 0);
      blockDim = dim3(block, 1, 1);
      gridDim = dim3(grid, 1, 1);
      for (unsigned b = 0; b < grid; ++b) {
        blockIdx = make_uint3(b, 0, 0);
        kernel(args...);
        if (!tl_pending.empty()) {
          std::fprintf(stderr, "CUDA emulation: a block ended with cp.async copies not waited for\n");
          std::abort();
        }
        between.wait("the end of a block");  // every thread done with this block
        if (t == 0) std::memset(blk.smem.get(), 0xA5, smem + 16);
        between.wait("the end of a block");
      }
    });
  for (auto& th : threads) th.join();
}

}  // namespace shl_emu
