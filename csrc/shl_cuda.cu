// CUDA backend of the fused SHL kernel: loss rows and gradients of SPEC section 3 in one
// launch; the contract (scaling, label order, nullable inputs) is in shl_args.h.
//
// Design: one block per row (grid-stride over rows). When the row fits shared memory
// (about C * (sizeof(z) + 1/8) bytes: bf16 up to ~109k labels on sm_90) it is staged there
// in segment order, read and written coalesced, with -inf in place of the ignored labels
// and the positives (marked in a bitmask, their logits read from global memory), so the
// per-element passes read no flags (shl_staged_kernel); a larger row is staged in windows
// of whole segments, one pass over the row each (the windowed shl_staged_kernel); rows
// that cannot be staged gather from global memory (shl_fused_kernel).
// Files: shl_cuda_passes.cuh (the segment passes, the group schedule), shl_cuda_flat.cuh
// (the flat schedule, windows), shl_cuda_staging.cuh (staging), this file (kernels, launch).
// Staged rows take the flat schedule by default (row_loss_flat): each thread an equal share
// of consecutive positions, whatever the segments; the segments crossing shares are joined
// by a segmented scan over the block. The group schedule (row_loss; the unstaged kernel's,
// and the staged kernel's with ShlArgs::cuda_flat = 0) deals whole segments out instead:
// segments of at least twice the block's threads first, each by the whole block
// (block-strided loops, reductions through shared memory), then the warps take the others,
// largest first, 32 at a time (one per lane). A segment of at most kSmall labels is handled
// by its lane alone, a larger one by the whole warp (lane-strided loops, shuffle
// reductions).
// Each segment takes three passes over its labels:
//   1. max M of eta and the negatives' u's, online sum of exp(u - M) over the
//      negatives, the number of positives (and where the last one is);
//   2. with two or more positives: D_p, the loss terms and S = sum_p w_p / D_p (one
//      positive: the same from the one found in pass 1; none: the null event, D = A,
//      S = 1 / D);
//   3. the gradient of every label (0 when ignored) and of eta.
// A given element is only ever touched by one thread (the same in every pass), and it is
// read before it is written, so grad may alias z; a value another thread needs (the only
// positive of a segment) is handed over by its owner. The row loss is summed per thread in
// a fixed order and then across the block in a fixed order: no atomics on values,
// deterministic (staging sets bitmask bits with atomicOr, which is order-free).
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "cuda_common.cuh"
#include "shl_args.h"
#include "shl_cuda_flat.cuh"
#include "shl_cuda_passes.cuh"
#include "shl_cuda_staging.cuh"

namespace shl {
namespace {

// Unstaged: one block per row (grid-stride), positions gathered from global memory. The
// fallback for rows that cannot be staged (not even in windows). At least 4 blocks per SM
// lets ptxas use up to 64 registers (with a bare bound of 256 it squeezed to 40 registers
// and spilled).
template <class T, class A>
__global__ void __launch_bounds__(kThreads, 4) shl_fused_kernel(const Params<T, A> P) {
  __shared__ BlockScratch<kThreads, A> scratch;
  for (int64_t row = blockIdx.x; row < P.B; row += gridDim.x)
    row_loss<kThreads>(P, GlobalRow<T, A>{P, row * P.C}, row, &scratch);
}

// Staged: one block per row (grid-stride). The row is read once, coalesced, and scattered
// into shared memory in segment order (position[c] = segment position of column c), -inf
// for ignored labels and positives (see StagedRow); the segments then work on shared memory
// (plus a global read per positive), writing their gradient over z there; the gradient goes
// out coalesced through the same map. Global traffic is z, pos, ign read once and grad
// written once, where the unstaged kernel gathers 2-byte elements at random (a 32-byte
// sector per element). C is below 2^31 here. Rows too large for shared memory take the
// windowed variant (see below).
// V elements per access: 16-byte loads and stores of z and grad when the pointers are
// aligned and either C % V == 0 or the asynchronous staging runs (checked on the host; see
// RowSplit), else V = 1; kUnroll accesses in flight per
// thread (a row is read in a few memory round trips, not one per 512 elements; one 16-byte
// access at a time keeps the 16-byte variants within 64 registers: sm_90 ptxas spilled
// with two). fp64 spills either way (a correctness path on GPUs).
// NT threads per block: 512 (two blocks per SM, 64 registers each) by default, or 256
// (three blocks, hence three rows, per SM when three rows fit shared memory; a knob to
// compare on a GPU, see ShlArgs::cuda_staged_threads).
// Delta: compiled for logit offsets (P.delta tested per label, null or not); the 16-byte
// variants of 2- and 4-byte types also come without them (Delta false, P.delta null: the
// per-label test was ~5 instructions of each segment pass's ~22 in the SASS; testing it once
// per row in one kernel with both made ptxas spill).
constexpr int kStagedThreads = 512;

template <int V, class T>
constexpr bool has_deltaless_variant() { return V > 1 && sizeof(T) <= 4; }

template <int NT>
constexpr int staged_min_blocks() { return NT >= 512 ? 2 : 3; }

// The flat schedule's per-segment statistics, after the L labels staged at zs.
template <class T, class A>
__device__ __forceinline__ Closed<A>* stats_after(T* zs, int L) {
  return reinterpret_cast<Closed<A>*>(reinterpret_cast<unsigned char*>(zs) + staged_z_bytes<T>(L));
}

// Windowed (flat schedule only): the row in P.n_windows windows, each a pass that reads
// the row and stages, computes and writes the window's positions; a separate kernel, so
// that the whole-row kernel keeps its registers (the windows' position tests spilled it).
template <int V, int NT, bool Flat, bool Windowed, bool Delta, class T, class A>
__global__ void __launch_bounds__(NT, staged_min_blocks<NT>())
    shl_staged_kernel(const Params<T, A> P) {
  static_assert(Flat || !Windowed, "windows take the flat schedule");
  using Keep = std::conditional_t<Windowed, WindowPositions, AllPositions>;
  unsigned char* smem = dynamic_smem();
  __shared__ BlockScratch<NT, A> scratch;
  __shared__ FlatShared<NT, A> flat;  // (the group schedule does not use it: dropped there)
  // Dynamic shared memory: the window's labels (at the start: addressed without a base
  // register), its segments' statistics (flat schedule), the bitmask (at bits_offset, after
  // the labels and statistics of the largest window).
  T* zs = reinterpret_cast<T*>(smem);
  uint32_t* pos_bits = reinterpret_cast<uint32_t*>(smem + P.bits_offset);
  clear_bits<NT>(pos_bits, P.window_labels);
  Window W = Windowed ? window(P, 0) : Window{0, static_cast<int>(P.m), 0, static_cast<int>(P.C)};
  FlatRange range{};
  if constexpr (Flat) {
    range = flat_range<NT>(P, W);
    if (threadIdx.x == 0) flat.any_empty = 0;
    __syncthreads();
    for (int k = threadIdx.x; k < P.m; k += NT)
      if (P.offsets[k] == P.offsets[k + 1]) flat.any_empty = 1;
  }
  __syncthreads();
  // The asynchronous staging's ring, when the host gave it room (Params::ring_offset).
  Ring<V, NT, T>* ring = nullptr;
  if constexpr (async_staging_ok<V, T>())
    if (P.ring_offset >= 0) ring = reinterpret_cast<Ring<V, NT, T>*>(smem + P.ring_offset);
  bool prefetched = false;
  const int passes = Windowed ? P.n_windows : 1;
  Closed<A>* const row_stats = stats_after<T, A>(zs, W.hi - W.lo);  // (whole rows)
  for (int64_t row = blockIdx.x; row < P.B; row += gridDim.x) {
    const int64_t base = row * P.C;
    A acc = 0;  // this thread's part of the row loss (flat schedule)
    for (int w = 0; w < passes; ++w) {
      if constexpr (Windowed) {
        W = window(P, w);
        range = flat_range<NT>(P, W);
      }
      const int L = W.hi - W.lo;
      Keep keep;
      if constexpr (Windowed) keep = WindowPositions{W.lo, L};
      // Indexed by the row's positions (see StagedRow).
      T* const zw = Windowed ? zs - W.lo : zs;
      uint32_t* const bw = Windowed ? pos_bits - (W.lo >> 5) : pos_bits;
      stage<V, NT>(P, base, keep, zw, bw, ring, prefetched);
      if constexpr (async_staging_ok<V, T>()) {
        if (ring) {  // the next pass over a row (this one's next window, or the block's next
                     // row) starts copying while this one computes
          const bool more = w + 1 < passes;
          prefetched = more || row + gridDim.x < P.B;
          if (prefetched) {
            const int64_t next = more ? base : base + int64_t(gridDim.x) * P.C;
            const bool mapped = P.position16 || P.position;
            Keep next_keep;
            if constexpr (Windowed) {
              const Window N = window(P, more ? w + 1 : 0);
              next_keep = WindowPositions{N.lo, N.hi - N.lo};
            }
            ring_prefetch<V, NT>(P, next, static_cast<int>(P.C), next_keep, mapped, ring);
          }
        }
      }
      __syncthreads();
      const StagedRow<T, A, Delta> R{P, zw, bw, base};
      if (P.staging_only) {  // the benchmark probe: the row's way in and out alone
        if (P.grad_eta && w == 0)
          for (int j = threadIdx.x; j < P.m; j += NT) P.grad_eta[row * P.m + j] = A(0);
        if (w + 1 == passes) store_row_loss<NT>(P, row, A(0), &scratch);
        else __syncthreads();
      } else if constexpr (Flat) {
        acc += row_loss_flat<NT>(P, R, row, W, range,
                                 Windowed ? stats_after<T, A>(zs, L) : row_stats, &flat);
        if (w + 1 == passes) store_row_loss<NT>(P, row, acc, &scratch);
        else __syncthreads();
      } else {
        row_loss<NT>(P, R, row, &scratch);
      }
      // The pass ended with a barrier: the segments are done with pos_bits, cleared for the
      // next pass while the gradient goes out.
      unstage<V, NT>(P, base, keep, zw);
      clear_bits<NT>(pos_bits, L);
      __syncthreads();  // shared memory is restaged for the next pass
    }
  }
}

// The current device (-1 on error) and its opt-in shared memory per block (queried once per
// device: a small batch's step is bound by host time, so launches avoid driver queries).
inline int current_device() {
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return dev;
}

inline int smem_optin(int dev) {
  return device_attr<cudaDevAttrMaxSharedMemoryPerBlockOptin>(dev);
}

// The staged kernel's static shared memory (at most this; the 256-thread variant has less).
template <class A>
constexpr int64_t static_smem() {
  return sizeof(BlockScratch<kStagedThreads, A>) + sizeof(FlatShared<kStagedThreads, A>) + 64;
}

// Dynamic shared memory for a staged row or window (labels, bitmask, statistics): `room`,
// or less where ShlArgs::cuda_window_bytes asks.
inline int64_t window_room(const ShlArgs& a, int64_t room) {
  return a.cuda_window_bytes > 0 ? std::min<int64_t>(room, a.cuda_window_bytes) : room;
}

// Whether rows can be staged at all (staging on, the inverse of any order given).
inline bool can_stage(const ShlArgs& a) {
  return a.cuda_staging && !(a.order && !a.position && !a.position16) && a.C < INT_MAX;
}

// The layout of dynamic shared memory: L staged labels, then (flat schedule) the statistics
// of n segments; the bitmask starts after them (Params::bits_offset).
template <class T, class A>
constexpr int64_t before_bits(int64_t L, int64_t n) {
  return staged_z_bytes<T>(L) + flat_stats_bytes<A>(n);
}

// Dynamic shared memory of L staged labels (the window, its bitmask) and, for the flat
// schedule, the statistics of n segments.
template <class T, class A>
constexpr int64_t window_bytes(int64_t L, int64_t n) {
  return before_bits<T, A>(L, n) + staged_bits_bytes(L);
}

// Dynamic shared memory the staged kernel needs for a whole row of C labels (with the flat
// schedule's per-segment statistics when `flat`), or 0 when it cannot run (staging off, an
// order without its inverse, or more than the device (`optin` bytes per block) allows).
template <class T, class A>
int staged_bytes(const ShlArgs& a, bool flat, int64_t optin) {
  if (!can_stage(a)) return 0;
  const int64_t bytes = window_bytes<T, A>(a.C, flat ? a.m : 0);
  return bytes <= window_room(a, optin - static_smem<A>()) ? static_cast<int>(bytes) : 0;
}

// A row too large for shared memory (`optin` bytes per block; flat schedule): windows of
// consecutive segments, each as long as shared memory holds (its labels, bitmask and
// segment statistics, with room left for the asynchronous staging's ring of NT threads when
// it may run), taken greedily from the host copy of offsets, into P (n_windows, windows,
// window_labels, bits_offset). Returns the dynamic shared memory to launch with, or 0 when
// there is no host copy, a segment alone does not fit or more than kMaxWindows windows would
// be needed (unstaged kernel then).
template <int V, int NT, class T, class A>
int plan_windows(const ShlArgs& a, int64_t optin, Params<T, A>& P) {
  const int64_t* off = a.offsets_host;
  if (!off || !can_stage(a) || !a.cuda_flat || a.m < 1) return 0;
  int64_t room = optin - static_smem<A>();
  if constexpr (async_staging_ok<V, T>())
    if (a.cuda_async_staging) room -= int64_t(sizeof(Ring<V, NT, T>)) + 16;
  room = window_room(a, room);
  // Each window's labels and statistics, then the bitmask with room for the longest window
  // (it stays in place): planned with the bitmask of the longest window there can be.
  const int64_t bits = staged_bits_bytes(room / int64_t(sizeof(T)));
  auto fits = [&](int64_t L, int64_t segments) {
    return before_bits<T, A>(L, segments) + bits <= room;
  };
  int n = 0;
  int64_t labels = 0, rest = 0;  // the longest window; the most bytes before the bitmask
  P.windows[0] = 0;
  for (int64_t k = 0; k < a.m;) {
    const int64_t k0 = k;
    while (k < a.m && fits(off[k + 1] - off[k0], k + 1 - k0)) ++k;
    if (k == k0 || n == kMaxWindows) return 0;
    labels = std::max(labels, off[k] - off[k0]);
    rest = std::max(rest, before_bits<T, A>(off[k] - off[k0], k - k0));
    P.windows[++n] = static_cast<int32_t>(k);
  }
  P.n_windows = n;
  P.window_labels = static_cast<int>(labels);
  P.bits_offset = static_cast<int>(rest);
  return static_cast<int>(rest + staged_bits_bytes(labels));
}

// With room for the asynchronous staging's ring after `bytes` of dynamic shared memory
// (sets P.ring_offset) where the ring fits without fewer blocks resident per SM than without
// it (the staged kernel's launch bounds ask for 2 of 512 threads or 3 of 256): the bytes to
// launch with, and in *grid the blocks to launch, cut to those resident at once: each block
// then stages its next row while it works on the current one.
template <int V, class T, class A>
int with_ring(Params<T, A>& P, int bytes, int threads, unsigned* grid) {
  P.ring_offset = -1;
  if constexpr (!async_staging_ok<V, T>()) {
    return bytes;
  } else {
    const bool small = threads == 256;
    const int64_t ring = small ? sizeof(Ring<V, 256, T>) : sizeof(Ring<V, kStagedThreads, T>);
    const int dev = current_device();
    const int64_t per_sm = device_attr<cudaDevAttrMaxSharedMemoryPerMultiprocessor>(dev);
    const int64_t sms = device_attr<cudaDevAttrMultiProcessorCount>(dev);
    const int64_t extra = static_smem<A>() + 1024;  // static, and the driver's 1 KB per block
    const int64_t offset = (bytes + 15) / 16 * 16, with = offset + ring;
    auto resident = [&](int64_t b) { return per_sm / (b + extra); };
    const int64_t want = std::min<int64_t>(resident(bytes), small ? 3 : 2);
    if (want < 1 || sms < 1 || with + static_smem<A>() > smem_optin(dev) || resident(with) < want)
      return bytes;
    P.ring_offset = static_cast<int>(offset);
    *grid = static_cast<unsigned>(std::min<int64_t>(*grid, want * sms));
    return static_cast<int>(with);
  }
}

// Lets shl_staged_kernel<V, NT, Flat, Windowed, Delta, T, A> take `bytes` of dynamic shared
// memory: above 48 KiB a kernel must opt in; the carveout hint asks for the largest
// shared-memory split so that two blocks fit per SM (the driver may otherwise pick a split
// that fits only one). Done once per device and size (then remembered: the attributes stay
// set).
template <int V, int NT, bool Flat, bool Windowed, bool Delta, class T, class A>
cudaError_t prepare_staged(int bytes) {
  static PerDevice allowed;  // largest `bytes` prepared so far, per device
  const int dev = current_device();
  if (dev >= 0 && allowed.get(dev) >= bytes) return cudaSuccess;
  if (bytes > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(shl_staged_kernel<V, NT, Flat, Windowed, Delta, T, A>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (e != cudaSuccess) return e;
  }
  if (cudaFuncSetAttribute(shl_staged_kernel<V, NT, Flat, Windowed, Delta, T, A>,
                           cudaFuncAttributePreferredSharedMemoryCarveout,
                           cudaSharedmemCarveoutMaxShared) != cudaSuccess)
    cudaGetLastError();  // only a hint
  allowed.set(dev, bytes);
  return cudaSuccess;
}

template <int V, int NT, bool Flat, bool Windowed, bool Delta, class T, class A>
cudaError_t launch_staged(const Params<T, A>& P, unsigned blocks, int bytes, cudaStream_t stream) {
  const cudaError_t e = prepare_staged<V, NT, Flat, Windowed, Delta, T, A>(bytes);
  if (e != cudaSuccess) return e;
  launch_kernel(shl_staged_kernel<V, NT, Flat, Windowed, Delta, T, A>, blocks, NT, bytes, stream,
                P);
  return cudaSuccess;
}

// The variant without logit offsets where there is one and P.delta is null.
template <int V, int NT, bool Flat, bool Windowed, class T, class A>
cudaError_t launch_staged(const Params<T, A>& P, unsigned blocks, int bytes, cudaStream_t stream) {
  if constexpr (has_deltaless_variant<V, T>())
    if (!P.delta) return launch_staged<V, NT, Flat, Windowed, false>(P, blocks, bytes, stream);
  return launch_staged<V, NT, Flat, Windowed, true>(P, blocks, bytes, stream);
}

template <int V, class T, class A>
cudaError_t launch_staged(const Params<T, A>& P, unsigned blocks, int bytes, int threads,
                          bool flat, cudaStream_t stream) {
  if (P.n_windows > 1)
    return launch_staged<V, kStagedThreads, true, true>(P, blocks, bytes, stream);
  if (threads == 256)
    return flat ? launch_staged<V, 256, true, false>(P, blocks, bytes, stream)
                : launch_staged<V, 256, false, false>(P, blocks, bytes, stream);
  return flat ? launch_staged<V, kStagedThreads, true, false>(P, blocks, bytes, stream)
              : launch_staged<V, kStagedThreads, false, false>(P, blocks, bytes, stream);
}

// Resident blocks per SM of the staged kernel (16-byte variant) for rows of C labels.
template <class T, class A>
const char* staged_occupancy(int64_t C, int* blocks_per_sm, int* bytes_out) {
  int devices = 0;
  const cudaError_t d = cudaGetDeviceCount(&devices);
  if (d != cudaSuccess || devices == 0) {
    cudaGetLastError();
    return d != cudaSuccess ? cudaGetErrorString(d) : "no CUDA device";
  }
  ShlArgs a;
  a.C = C;
  const int bytes = staged_bytes<T, A>(a, true, smem_optin(current_device()));  // the row alone
  *bytes_out = bytes;
  *blocks_per_sm = 0;
  if (!bytes) return nullptr;  // the row does not fit: unstaged kernel
  constexpr int V = 16 / sizeof(T);
  constexpr bool D = !has_deltaless_variant<V, T>();  // the variant a call without delta takes
  cudaError_t e = prepare_staged<V, kStagedThreads, true, false, D, T, A>(bytes);
  if (e == cudaSuccess)
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        blocks_per_sm, shl_staged_kernel<V, kStagedThreads, true, false, D, T, A>,
        kStagedThreads, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return cudaGetErrorString(e);
  }
  return nullptr;
}

template <class T, class A>
cudaError_t launch(const ShlArgs& a, cudaStream_t stream) {
  Params<T, A> P;
  P.z = static_cast<const T*>(a.z);
  P.grad = static_cast<T*>(a.grad);
  P.pos = a.pos;
  P.ign = a.ign;
  P.order = a.order;
  P.position = a.position16 ? nullptr : a.position;
  P.position16 = a.position16;
  P.schedule = a.schedule;
  P.offsets = a.offsets;
  P.w = static_cast<const A*>(a.w);
  P.eta = static_cast<const A*>(a.eta);
  P.delta = static_cast<const A*>(a.delta);
  P.loss = static_cast<A*>(a.loss);
  P.grad_eta = static_cast<A*>(a.grad_eta);
  P.C = a.C;
  P.B = a.B;
  P.m = a.m;
  P.scale = static_cast<A>(a.grad_scale);
  P.block_min = a.cuda_block_min;
  P.staging_only = a.cuda_staging_only;
  P.ring_offset = -1;
  P.n_windows = 1;  // the whole row
  P.window_labels = static_cast<int>(std::min<int64_t>(a.C, INT_MAX));
  P.windows[0] = 0;
  P.windows[1] = static_cast<int32_t>(std::min<int64_t>(a.m, INT_MAX));
  const unsigned blocks = static_cast<unsigned>(a.B < INT_MAX ? a.B : INT_MAX);
  cudaError_t e = cudaSuccess;
  constexpr int V = 16 / sizeof(T);
  const int64_t optin = smem_optin(current_device());
  int nt = a.cuda_staged_threads;
  // Staged with the flat schedule where the row and the segments' statistics fit shared
  // memory, else with the group schedule where the row fits, else in windows (flat
  // schedule), else unstaged.
  int bytes = a.cuda_flat ? staged_bytes<T, A>(a, true, optin) : 0;
  bool flat = bytes != 0;
  if (!bytes) bytes = staged_bytes<T, A>(a, false, optin);
  if (bytes) P.bits_offset = static_cast<int>(before_bits<T, A>(a.C, flat ? a.m : 0));
  if (!bytes) {
    bytes = plan_windows<V, kStagedThreads>(a, optin, P);  // (windows: 512 threads)
    flat = bytes != 0;
    nt = kStagedThreads;
  }
  if (bytes) {
    // 16-byte packs need aligned tensors; plain loads also whole packs per row (C a multiple
    // of V), cp.async takes any C (a row's head and tail go one element at a time).
    const bool aligned_inputs = aligned(a.z, 16) && aligned(a.grad, 16) && aligned(a.pos, V) &&
                                aligned(a.ign, V) && aligned(P.position, 4 * V) &&
                                aligned(a.position16, 2 * V);
    unsigned grid = blocks;
    const int total = aligned_inputs && a.cuda_async_staging
                          ? with_ring<V>(P, bytes, nt, &grid)
                          : bytes;
    if (aligned_inputs && (P.ring_offset >= 0 || a.C % V == 0)) {
      e = launch_staged<V>(P, grid, total, nt, flat, stream);
    } else {
      P.ring_offset = -1;
      e = launch_staged<1>(P, blocks, bytes, nt, flat, stream);
    }
  } else {
    launch_kernel(shl_fused_kernel<T, A>, blocks, kThreads, 0, stream, P);
  }
  return e == cudaSuccess ? cudaGetLastError() : e;
}

// The row sums of ShlArgs::loss_total / grad_eta_total: block j < m sums column j of
// grad_eta, block m the row losses; each thread its rows in order, then a fixed tree.
constexpr int kReduceThreads = 256;

template <class A>
__global__ void __launch_bounds__(kReduceThreads) shl_row_sums_kernel(
    const A* __restrict__ loss, const A* __restrict__ grad_eta, int64_t B, int64_t m,
    A* __restrict__ loss_total, A* __restrict__ grad_eta_total) {
  __shared__ A part[kReduceThreads];
  const int64_t j = blockIdx.x;
  const bool is_loss = j == m;
  if (is_loss ? !loss_total : !grad_eta_total) return;  // block-uniform
  A s = 0;
  for (int64_t b = threadIdx.x; b < B; b += kReduceThreads)
    s += is_loss ? loss[b] : grad_eta[b * m + j];
  s = block_sum_fixed<kReduceThreads>(s, part);
  if (threadIdx.x == 0) *(is_loss ? loss_total : grad_eta_total + j) = s;
}

template <DType D>
cudaError_t launch_dtype(const ShlArgs& a, cudaStream_t stream) {
  using T = typename DevStorage<D>::type;
  using A = typename DevConv<T>::A;
  cudaError_t e = launch<T, A>(a, stream);
  if (e == cudaSuccess && (a.loss_total || a.grad_eta_total)) {
    const unsigned blocks = static_cast<unsigned>(a.m + 1);
    launch_kernel(shl_row_sums_kernel<A>, blocks, kReduceThreads, 0, stream,
                  static_cast<const A*>(a.loss), static_cast<const A*>(a.grad_eta), a.B, a.m,
                  static_cast<A*>(a.loss_total), a.grad_eta ? static_cast<A*>(a.grad_eta_total)
                                                            : static_cast<A*>(nullptr));
    e = cudaGetLastError();
  }
  return e;
}

}  // namespace

const char* shl_fused_cuda(const ShlArgs& a, void* stream) {
  if (a.B <= 0) return nullptr;  // nothing to write; a zero-block launch would be an error
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.z_dtype) {
    case DType::kF32: case DType::kF64: case DType::kF16: case DType::kBF16: break;
    default: return "unsupported z dtype (expected float32, float64, float16 or bfloat16)";
  }
  return on_device_of(a.device, a.loss, "loss: not in CUDA device memory", [&]() -> cudaError_t {
    switch (a.z_dtype) {
      case DType::kF32: return launch_dtype<DType::kF32>(a, s);
      case DType::kF64: return launch_dtype<DType::kF64>(a, s);
      case DType::kF16: return launch_dtype<DType::kF16>(a, s);
      default: return launch_dtype<DType::kBF16>(a, s);
    }
  });
}

const char* shl_cuda_staged_occupancy(DType z_dtype, int64_t C, int* blocks_per_sm,
                                      int* smem_bytes) {
  switch (z_dtype) {
    case DType::kF32: return staged_occupancy<float, float>(C, blocks_per_sm, smem_bytes);
    case DType::kF64: return staged_occupancy<double, double>(C, blocks_per_sm, smem_bytes);
    case DType::kF16: return staged_occupancy<__half, float>(C, blocks_per_sm, smem_bytes);
    case DType::kBF16: return staged_occupancy<__nv_bfloat16, float>(C, blocks_per_sm, smem_bytes);
    default: return "unsupported z dtype (expected float32, float64, float16 or bfloat16)";
  }
}

const char* shl_cuda_runtime_info(int* driver, int* runtime, int* devices) {
  *driver = *runtime = *devices = 0;
  cudaDriverGetVersion(driver);  // 0 when no driver is installed
  cudaRuntimeGetVersion(runtime);
  const cudaError_t e = cudaGetDeviceCount(devices);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear it: it must not be reported by a later launch check
    *devices = 0;
    return *driver == 0 ? "no CUDA driver found (libcuda could not be loaded)" : cudaGetErrorString(e);
  }
  return nullptr;
}

}  // namespace shl
