// One positive event of SHL (SPEC section 3), shared by the CPU (shl_cpu.cpp) and CUDA
// (shl_cuda_passes.cuh) kernels.
#pragma once
#include <math.h>

#ifdef __CUDACC__
#define SHL_EVENT_HD __host__ __device__ __forceinline__
#else
#define SHL_EVENT_HD inline
#endif

namespace shl {

template <class A>
struct PositiveEvent {
  A loss;  // w (log D - u)
  A f;     // w / D (in units of exp(-M)): the event's part of S
};

// The event of a positive with u = M + t, where M is the max of eta and the segment's
// negatives' u and Aden = A / exp(M) (A = exp(eta) + sum_N exp(u_c)), so Aden >= 1, or 0
// when the segment has neither null class nor negatives; D = A + exp(u).
// log D - u = log(Aden + exp(t)) - t: directly while exp(t) <= Aden (then t <= log Aden:
// no cancellation), else log1p(Aden / exp(t)), which also holds when exp(t) overflows
// (inf: loss and f 0, the limits). With the positives in M, a positive far above the rest
// of its segment made Aden and a lower positive's exp(u - M) underflow together: log 0.
// A +inf logit gives NaN, a -inf one +inf (SPEC: inf propagates to the loss).
template <class A>
SHL_EVENT_HD PositiveEvent<A> positive_event(A w, A Aden, A t) {
  const A e = exp(t);
  const A D = Aden + e;
  // t * 0: NaN for t = +inf (then exp(t) > Aden), 0 for finite t.
#ifdef __CUDA_ARCH__
  // One log, of D or 1 + Aden / exp(t) (an absolute error of an ulp of 1): log1p's accurate
  // path, or both logs, made the flat schedule's kernels spill 6-30 bytes per thread.
  const bool direct = e <= Aden;  // NaN e: false, log(NaN)
  const A l = log(direct ? D : A(1) + Aden / e) - (direct ? t : t * A(0));
#else
  const A l = e <= Aden ? log(D) - t : log1p(Aden / e) - t * A(0);
#endif
  return {w * l, w / D};
}

}  // namespace shl
