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

// R threads per row: 32 (a warp) or kBlock (the whole block).
template <DType ZT>
using AccOf = typename DevConv<typename DevStorage<ZT>::type>::A;

template <DType ZT, ElemKind K, int R>
__global__ void __launch_bounds__(kBlock) elementwise_kernel(ElemArgs a, ElemCoef<AccOf<ZT>> c) {
  using S = typename DevStorage<ZT>::type;
  using Tr = DevConv<S>;
  using A = typename Tr::A;
  constexpr int kRowsPerBlock = kBlock / R;
  __shared__ A partial[kBlock / 32];
  const S* z = static_cast<const S*>(a.z);
  const A* wt = static_cast<const A*>(a.weight);
  const A* pw = static_cast<const A*>(a.pos_weight);
  A* rows = static_cast<A*>(a.loss_rows);
  S* lel = static_cast<S*>(a.loss_el);
  S* g = static_cast<S*>(a.grad);
  const A gscale = A(a.grad_scale);
  const int lane = threadIdx.x % R;
  // With R == kBlock every thread sees the same i, so the loop exit and the
  // __syncthreads below are block-uniform.
  for (int64_t i = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / R; i < a.B;
       i += int64_t(gridDim.x) * kRowsPerBlock) {
    A sum = A(0);
    for (int64_t j = lane; j < a.C; j += R) {
      const int64_t o = i * a.C + j;
      const bool y = a.pos[o] != 0;
      const A w = wt ? wt[j] : A(1);
      const A ap = (pw ? w * pw[j] : w) * c.alpha_pos;
      A l, gr;
      elem_loss_grad<K>(Tr::load(z[o]), y, y ? ap : w * c.alpha_neg, c, l, gr);
      const bool skip = a.ign && a.ign[o];
      l = skip ? A(0) : l;
      if (lel) lel[o] = Tr::store(l);
      if (g) g[o] = Tr::store(skip ? A(0) : gr * gscale);
      sum += l;
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
  if (long_rows)
    launch_kernel(elementwise_kernel<ZT, K, kBlock>, grid, kBlock, 0, stream, a, c);
  else
    launch_kernel(elementwise_kernel<ZT, K, 32>, grid, kBlock, 0, stream, a, c);
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
