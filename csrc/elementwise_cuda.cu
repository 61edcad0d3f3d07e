// CUDA fused elementwise losses (see elementwise.h). A warp per row when rows are short, a
// block per row when they are long; both grid-stride over rows and reduce each row in a fixed
// order, so the row losses are deterministic; a second launch sums them when asked.
#include <cuda_runtime.h>

#include "cuda_common.cuh"
#include "elementwise.h"

namespace shl {
namespace {

constexpr int kBlock = 256;

template <class A>
__device__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <DType ZT>
using AccOf = typename DevConv<typename DevStorage<ZT>::type>::A;

// One (row, label) pair, label j, logit zv: its loss and gradient (as stored: loss_el,
// grad) into le and ge; returns its loss (0 when ignored) for the row sum.
template <ElemKind K, class S, class A>
__device__ __forceinline__ A one_pair(const ElemArgs& a, const ElemCoef<A>& c, int64_t j,
                                      S zv, bool y, bool skip, S& le, S& ge) {
  using Tr = DevConv<S>;
  const A* wt = static_cast<const A*>(a.weight);
  const A* pw = static_cast<const A*>(a.pos_weight);
  const A w = wt ? wt[j] : A(1);
  const A ap = (pw ? w * pw[j] : w) * c.alpha_pos;
  A l, gr;
  elem_loss_grad<K>(Tr::load(zv), y, y ? ap : w * c.alpha_neg, c, l, gr);
  l = skip ? A(0) : l;
  le = Tr::store(l);
  ge = Tr::store(skip ? A(0) : gr * A(a.grad_scale));
  return l;
}

// R threads per row: 32 (a warp) or kBlock (the whole block). V > 1: the row in packs of V
// elements (16 bytes of z, V flag bytes), kUnroll packs per thread and step (two on long
// rows; one per lane on a warp's rows, where two spilled registers), with a head
// (up to the first pack boundary of the flattened [B, C] array) and a tail of single
// elements: scalar 2-byte loads left too few bytes in flight per SM to keep HBM busy. V = 1
// (some pointer not aligned to its pack): element by element. Row sums in a fixed order
// for given B, C and V: deterministic.
template <DType ZT, ElemKind K, int R, int V>
__global__ void __launch_bounds__(kBlock) elementwise_kernel(ElemArgs a, ElemCoef<AccOf<ZT>> c) {
  using S = typename DevStorage<ZT>::type;
  using A = AccOf<ZT>;
  using Flags = typename UintOf<V>::type;
  constexpr int kRowsPerBlock = kBlock / R;
  constexpr int kUnroll = V > 1 && R > 32 ? 2 : 1;
  __shared__ A partial[kBlock / 32];
  const S* z = static_cast<const S*>(a.z);
  A* rows = static_cast<A*>(a.loss_rows);
  S* lel = static_cast<S*>(a.loss_el);
  S* g = static_cast<S*>(a.grad);
  const int lane = threadIdx.x % R;
  // With R == kBlock every thread sees the same i, so the loop exit and the
  // __syncthreads below are block-uniform.
  for (int64_t i = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / R; i < a.B;
       i += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t o0 = i * a.C;
    const int64_t h0 = (V - o0 % V) % V;
    const int64_t h = h0 < a.C ? h0 : a.C;  // head: single elements up to a pack boundary
    const int64_t n = (a.C - h) / V;         // whole packs
    A sum = A(0);
    for (int64_t q0 = lane; q0 < n; q0 += int64_t(R) * kUnroll) {
      Pack<V, S> zv[kUnroll];
      Flags pv[kUnroll], iv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // every load before any store (grad may be z)
        const int64_t q = q0 + int64_t(u) * R, o = o0 + h + q * V;
        if (q < n) {
          zv[u] = load_pack<V>(z + o);
          pv[u] = load_flags<V>(a.pos + o);
          iv[u] = a.ign ? load_flags<V>(a.ign + o) : Flags(0);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t q = q0 + int64_t(u) * R, o = o0 + h + q * V;
        if (q >= n) break;
        Pack<V, S> lv, gv;
#pragma unroll
        for (int t = 0; t < V; ++t)
          sum += one_pair<K>(a, c, h + q * V + t, zv[u].v[t], ((pv[u] >> (8 * t)) & 0xff) != 0,
                             ((iv[u] >> (8 * t)) & 0xff) != 0, lv.v[t], gv.v[t]);
        if (lel) store_pack(lel + o, lv);
        if (g) store_pack(g + o, gv);
      }
    }
    for (int64_t e = lane; e < a.C - n * V; e += R) {  // the head, then the tail
      const int64_t j = e < h ? e : h + n * V + (e - h), o = o0 + j;
      S le, ge;
      sum += one_pair<K>(a, c, j, z[o], a.pos[o] != 0, a.ign && a.ign[o], le, ge);
      if (lel) lel[o] = le;
      if (g) g[o] = ge;
    }
    sum = warp_sum(sum);
    if (R > 32) {
      if (lane % 32 == 0) partial[lane / 32] = sum;
      __syncthreads();
      if (threadIdx.x < 32) {
        A v = threadIdx.x < kBlock / 32 ? partial[threadIdx.x] : A(0);
        v = warp_sum(v);
        if (threadIdx.x == 0 && rows) rows[i] = v;
      }
      __syncthreads();
    } else if (lane == 0 && rows) {
      rows[i] = sum;
    }
  }
}

// ElemArgs::loss_total: one block sums the row losses (each thread its rows in order, then a
// fixed tree: deterministic) times grad_scale.
template <class A>
__global__ void __launch_bounds__(kBlock) total_kernel(const A* __restrict__ rows, int64_t B,
                                                       A scale, A* __restrict__ total) {
  __shared__ A part[kBlock];
  A s = A(0);
  for (int64_t b = threadIdx.x; b < B; b += kBlock) s += rows[b];
  s = block_sum_fixed<kBlock>(s, part);
  if (threadIdx.x == 0) *total = s * scale;
}

// Whether the [B, C] arrays can move in packs of V elements: z and the outputs 16-byte
// aligned, the flag bytes V-byte aligned (then a pack boundary of z is one of them all).
inline bool packs_aligned(const ElemArgs& a, int V) {
  return aligned(a.z, 16) && aligned(a.loss_el, 16) && aligned(a.grad, 16) &&
         aligned(a.pos, V) && aligned(a.ign, V);
}

template <DType ZT, ElemKind K>
cudaError_t launch(const ElemArgs& a, cudaStream_t stream) {
  int dev = 0;
  cudaGetDevice(&dev);
  // queried once per device (launches stay free of driver queries); 80 if the query fails
  int sms = device_attr<cudaDevAttrMultiProcessorCount>(dev);
  if (sms == 0) sms = 80;
  const ElemCoef<AccOf<ZT>> c(a.p);
  const bool long_rows = a.C >= 1024;
  const int64_t rows_per_block = long_rows ? 1 : kBlock / 32;
  const int64_t want = (a.B + rows_per_block - 1) / rows_per_block;
  const int grid = int(want < int64_t(sms) * 16 ? want : int64_t(sms) * 16);
  constexpr int V = 16 / int(sizeof(typename DevStorage<ZT>::type));
  if (packs_aligned(a, V)) {
    if (long_rows)
      launch_kernel(elementwise_kernel<ZT, K, kBlock, V>, grid, kBlock, 0, stream, a, c);
    else
      launch_kernel(elementwise_kernel<ZT, K, 32, V>, grid, kBlock, 0, stream, a, c);
  } else if (long_rows) {
    launch_kernel(elementwise_kernel<ZT, K, kBlock, 1>, grid, kBlock, 0, stream, a, c);
  } else {
    launch_kernel(elementwise_kernel<ZT, K, 32, 1>, grid, kBlock, 0, stream, a, c);
  }
  if (a.loss_total) {
    using A = AccOf<ZT>;
    launch_kernel(total_kernel<A>, 1, kBlock, 0, stream, static_cast<const A*>(a.loss_rows),
                  a.B, A(a.grad_scale), static_cast<A*>(a.loss_total));
  }
  return cudaGetLastError();
}

template <DType ZT>
cudaError_t launch_kind(const ElemArgs& a, cudaStream_t stream) {
  switch (a.kind) {
    case ElemKind::kBCE: return launch<ZT, ElemKind::kBCE>(a, stream);
    case ElemKind::kFocal: return launch<ZT, ElemKind::kFocal>(a, stream);
    case ElemKind::kASL: return launch<ZT, ElemKind::kASL>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

const char* elementwise_fused_cuda(const ElemArgs& a, void* stream) {
  if (a.B < 0 || a.C < 0) return "elementwise_fused_cuda: negative B or C";
  if (!a.loss_rows && !a.loss_el) return "elementwise_fused_cuda: no loss output";
  if (a.loss_total && !a.loss_rows) return "elementwise_fused_cuda: loss_total needs loss_rows";
  if (a.B == 0) return nullptr;  // nothing to write; a zero-block launch would be an error
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return on_device_of(a.device, a.z, "z: not in CUDA device memory", [&]() -> cudaError_t {
    switch (a.z_type) {
      case DType::kF32: return launch_kind<DType::kF32>(a, s);
      case DType::kF64: return launch_kind<DType::kF64>(a, s);
      case DType::kF16: return launch_kind<DType::kF16>(a, s);
      case DType::kBF16: return launch_kind<DType::kBF16>(a, s);
      default: return cudaErrorInvalidValue;
    }
  });
}

}  // namespace shl
