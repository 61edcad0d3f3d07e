// The CUDA SHL kernel's segment passes (see the top of shl_cuda.cu): kernel parameters,
// the two views of a row (global memory, staged), the lane / warp / block groups, the
// three passes over a segment, and the group schedule of a row (row_loss).
// Part of csrc/shl_cuda.cu, included only there (its helpers live in the same
// anonymous namespace).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "shl_event.h"

namespace shl {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSmall = 16;  // segments up to this size: one lane; larger: one warp
constexpr unsigned kFull = 0xffffffffu;
// A staged row too large for shared memory is done in at most this many windows (runs of
// consecutive segments that fit): 64 windows of fp32 rows hold over 3 million labels.
constexpr int kMaxWindows = 64;

// z and grad may alias (in-place): no __restrict__ on them, so no read-only-cache loads.
template <class T, class A>
struct Params {
  const T* z;
  T* grad;
  const uint8_t* __restrict__ pos;
  const uint8_t* __restrict__ ign;
  const int64_t* __restrict__ order;
  const int32_t* __restrict__ position;
  const uint16_t* __restrict__ position16;
  const int32_t* __restrict__ schedule;
  const int64_t* __restrict__ offsets;
  const A* __restrict__ w;
  const A* __restrict__ eta;
  const A* __restrict__ delta;
  A* loss;
  A* grad_eta;
  int64_t C, B, m;
  int64_t block_min;  // segments of at least this many labels go to the whole block
  int ring_offset;    // staged: where the asynchronous staging's ring is in dynamic shared
                      // memory; -1: synchronous staging
  A scale;
  // Staged: the row in n_windows windows, window w the segments [windows[w], windows[w + 1])
  // (windows[0] = 0, windows[n_windows] = m); one window (the whole row) when it fits.
  // window_labels: the longest window's labels (the bitmask has room for them).
  int n_windows, window_labels;
  int bits_offset;  // staged: where the bitmask is in dynamic shared memory
  int staging_only;  // ShlArgs::cuda_staging_only
  int32_t windows[kMaxWindows + 1];
};


// Inputs are max-shifted (arguments <= 0 except NaN/inf cases), where the fast
// single-precision intrinsics are accurate; fp64 keeps the full-precision functions.
__device__ __forceinline__ float exp_(float x) { return __expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return __logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }

template <class A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -HUGE_VALF; }
template <> __device__ __forceinline__ double neg_inf<double>() { return -HUGE_VAL; }

// Max that returns NaN when either side is NaN (fmax would drop it), like torch's amax.
template <class A>
__device__ __forceinline__ A nan_max(A a, A b) { return (a != a || a > b) ? a : b; }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// One instruction (max.NaN, sm_80+) where the generic form takes four: pass 1 runs it per
// label. NaN in, NaN out (the canonical NaN: the payload is not kept).
template <>
__device__ __forceinline__ float nan_max(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
#endif

// Merges (M2, s2) into (M, s), each s a sum of exp(x - M). Skipping the rescale of the
// side holding the max keeps a +inf max from turning 0 * exp(inf - inf) into NaN where
// the reference has an exact 0; NaN maxima still poison s.
template <class A>
__device__ __forceinline__ void merge(A& M, A& s, A M2, A s2) {
  const A Mn = nan_max(M, M2);
  s = (M == Mn ? s : s * exp_(M - Mn)) + (M2 == Mn ? s2 : s2 * exp_(M2 - Mn));
  M = Mn;
}

// Where segment position p of one row lives. Both views give the same four things:
// get(p) -> Elem (ignored / positive), u(p, e) = z + delta (only read where needed),
// weight(p, e), put(p, e, g) (stores g, already times grad_scale); and Index, the type of
// positions and segment ids: 64-bit in global memory, 32-bit for a staged row (C < 2^31
// there), which halves the index arithmetic and the registers it holds in the per-element
// loops.
struct Elem {
  bool ign, pos;
  int64_t id;  // original label id (GlobalRow only; StagedRow looks it up when needed)
};

// Straight from global memory: position p is column order[p] of the row (a gather).
template <class T, class A>
struct GlobalRow {
  using Index = int64_t;
  static constexpr bool kSparse = false;  // every element says whether it is positive
  const Params<T, A>& P;
  int64_t base;  // row * C
  __device__ __forceinline__ Elem get(int64_t p) const {
    Elem e;
    e.id = P.order ? P.order[p] : p;
    const int64_t i = base + e.id;
    e.ign = P.ign && P.ign[i];
    e.pos = !e.ign && P.pos[i];
    return e;
  }
  __device__ __forceinline__ A u(int64_t, const Elem& e) const {
    const A z = DevConv<T>::load(P.z[base + e.id]);
    return P.delta ? z + P.delta[e.id] : z;
  }
  __device__ __forceinline__ A weight(int64_t, const Elem& e) const {
    return P.w ? P.w[e.id] : A(1);
  }
  __device__ __forceinline__ A positive_u(int64_t p) const { return u(p, get(p)); }
  __device__ __forceinline__ void put(int64_t, const Elem& e, A g) const {
    P.grad[base + e.id] = DevConv<T>::store(g);
  }
};

// From the row staged in shared memory in segment order (see shl_staged_kernel in
// shl_cuda.cu): zs holds z for the negatives and -inf for the ignored labels and the
// positives, so the per-element passes read no flags (exp(-inf - M) = 0 keeps those out of
// every sum); the positives, few, are marked in a bitmask (bit p of word p / 32) and their
// logits read from global memory (intact until the row's gradient goes out). The gradient
// replaces z in zs. kSparse tells segment() to take the positives from the bitmask.
// zs[p] and bit p of pos_bits are position p of the row, also when only a window of the row
// is staged (see Params::windows): then zs and pos_bits point before shared memory, by the
// window's first position (bitmask: its word), so that the per-element passes index them as
// for a whole row.
// HasDelta false: P.delta is null, a compile-time fact (the null test, tested per label,
// took ~5 instructions of each pass's ~20 in the SASS); true: tested per label as before
// (with the test known true, ptxas kept delta and order in registers and spilled).
template <class T, class A, bool HasDelta>
struct StagedRow {
  using Index = int;
  static constexpr bool kSparse = true;
  const Params<T, A>& P;
  T* zs;
  const uint32_t* pos_bits;
  int64_t base;  // row * C
  __device__ __forceinline__ int64_t id(int p) const { return P.order ? P.order[p] : p; }
  __device__ __forceinline__ Elem get(int) const { return Elem{false, false, -1}; }
  // f(p) for every positive p in [s0, s1) of the bitmask words first, first + stride, ...
  // (word-relative to s0's): a group's threads split the words between them.
  template <class F>
  __device__ __forceinline__ void for_positives(int s0, int s1, int first, int stride,
                                                F&& f) const {
    const int w0 = s0 >> 5, w1 = (s1 - 1) >> 5;  // s1 > s0 >= 0 or the loop is empty
    for (int w = w0 + first; w <= w1 && s1 > s0; w += stride) {
      uint32_t bits = pos_bits[w];
      if (w == w0) bits &= ~0u << (s0 & 31);
      if (w == w1) bits &= ~0u >> (31 - ((s1 - 1) & 31));
      while (bits) {
        const int b = __ffs(bits) - 1;
        bits &= bits - 1;
        f((w << 5) + b);
      }
    }
  }
  __device__ __forceinline__ A positive_u(int p) const {
    const int64_t c = id(p);
    const A z = DevConv<T>::load(P.z[base + c]);
    if constexpr (HasDelta) return P.delta ? z + P.delta[c] : z;
    return z;
  }
  __device__ __forceinline__ A u(int p, const Elem&) const {
    const A z = DevConv<T>::load(zs[p]);
    if constexpr (HasDelta) return P.delta ? z + P.delta[id(p)] : z;
    return z;
  }
  __device__ __forceinline__ A weight(int p, const Elem&) const {
    return P.w ? P.w[id(p)] : A(1);
  }
  __device__ __forceinline__ void put(int p, const Elem&, A g) const {
    zs[p] = DevConv<T>::store(g);
  }
};

// Who works on one segment: one lane alone (LaneGroup), a warp (WarpGroup) or the whole
// block (BlockGroup). A group gives its threads' rank and stride over the segment's
// positions and the reductions of the passes; after a reduction every thread of the group
// holds the same value, combined in a fixed order (deterministic). The block's reductions
// contain barriers: every thread of the block must call them (segment-uniform branches).
struct LaneGroup {
  static constexpr int kSize = 1;
  __device__ __forceinline__ void sync() const {}  // orders the group's shared-memory writes
  __device__ __forceinline__ int rank() const { return 0; }
  __device__ __forceinline__ bool leader() const { return true; }
  template <class A>
  __device__ __forceinline__ void max_sum(A&, A&) const {}
  template <class V>
  __device__ __forceinline__ V sum(V v) const { return v; }
  // The group's only positive (position and u), from the thread that saw it in pass 1:
  // the others must not read its logit (that thread may already be writing its gradient
  // over it, in place or in shared memory).
  template <class I, class A>
  __device__ __forceinline__ void only_positive(bool, I& p, A&) const {}
};

struct WarpGroup {
  static constexpr int kSize = 32;
  int lane;
  __device__ __forceinline__ void sync() const { __syncwarp(); }
  __device__ __forceinline__ int rank() const { return lane; }
  __device__ __forceinline__ bool leader() const { return lane == 0; }
  template <class A>
  __device__ __forceinline__ void max_sum(A& M, A& s) const {
    for (int o = 16; o > 0; o >>= 1) merge(M, s, __shfl_xor_sync(kFull, M, o), __shfl_xor_sync(kFull, s, o));
  }
  template <class V>
  __device__ __forceinline__ V sum(V v) const {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    return v;
  }
  template <class I, class A>
  __device__ __forceinline__ void only_positive(bool have, I& p, A& u) const {
    const int src = __ffs(__ballot_sync(kFull, have)) - 1;
    p = __shfl_sync(kFull, p, src);
    u = __shfl_sync(kFull, u, src);
  }
};

// Per-warp partials of a block reduction (static shared memory of the kernels).
template <int NT, class A>
struct BlockScratch {
  A a[NT / 32], b[NT / 32];
  int64_t i[NT / 32];
};

template <int NT, class A>
struct BlockGroup {
  static constexpr int kSize = NT, kW = NT / 32;
  BlockScratch<NT, A>* sh;
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  __device__ __forceinline__ int rank() const { return threadIdx.x; }
  __device__ __forceinline__ bool leader() const { return threadIdx.x == 0; }
  __device__ __forceinline__ int lane() const { return threadIdx.x & 31; }
  __device__ __forceinline__ int warp() const { return threadIdx.x >> 5; }
  __device__ __forceinline__ void max_sum(A& M, A& s) const {
    WarpGroup{lane()}.max_sum(M, s);
    if (lane() == 0) sh->a[warp()] = M, sh->b[warp()] = s;
    __syncthreads();
    M = sh->a[0];
    s = sh->b[0];
    // Rolled: unrolled, ptxas hoisted all the loads and spilled elsewhere in the kernel.
#pragma unroll 1
    for (int j = 1; j < kW; ++j) merge(M, s, sh->a[j], sh->b[j]);
    __syncthreads();  // the scratch is free again
  }
  template <class V>
  __device__ __forceinline__ V sum(V v) const {
    v = WarpGroup{lane()}.sum(v);
    if (lane() == 0) sh->a[warp()] = A(v);  // counts: exact below 2^24 (only 0, 1, more matter)
    __syncthreads();
    A t = 0;
#pragma unroll 1
    for (int j = 0; j < kW; ++j) t += sh->a[j];
    __syncthreads();
    return V(t);
  }
  template <class I>
  __device__ __forceinline__ void only_positive(bool have, I& p, A& u) const {
    const unsigned holders = __ballot_sync(kFull, have);
    const int src = holders ? __ffs(holders) - 1 : 0;
    const I wp = __shfl_sync(kFull, p, src);
    const A wu = __shfl_sync(kFull, u, src);
    if (lane() == 0) {
      sh->i[warp()] = holders ? int64_t(wp) : int64_t(-1);
      sh->a[warp()] = wu;
    }
    __syncthreads();
    int j = 0;
    while (j < kW - 1 && sh->i[j] < 0) ++j;
    p = I(sh->i[j]);
    u = sh->a[j];
    __syncthreads();
  }
};

// Pass-1 statistics of some of a segment's labels: M, the max of eta and the negatives' u's
// (floored at the lowest finite value, so that exp(-inf - M) is an exact 0 even when eta and
// every u are -inf: staged rows hold -inf for ignored labels and positives); s, the sum of
// exp(u - M) over the negatives; the number of positives and the position of the last one
// seen (`pos`, meaningful when npos > 0).
template <class A>
__device__ __forceinline__ A lowest();
template <> __device__ __forceinline__ float lowest<float>() { return -3.402823466e38f; }
template <> __device__ __forceinline__ double lowest<double>() { return -1.7976931348623157e308; }

template <class A, class I>
struct Part {
  A M, s;
  int npos;
  I pos;
  static __device__ __forceinline__ Part start(A eta) { return {nan_max(eta, lowest<A>()), A(0), 0, I(0)}; }
};

// Pass 1 of one position p into x: a negative into the max and the sum, a positive counted
// (M is the max of eta and the negatives: see positive_event).
template <class A, class Row, class I>
__device__ __forceinline__ void accumulate_one(const Row& R, I p, Part<A, I>& x) {
  const Elem e = R.get(p);
  if (e.ign) return;
  if (e.pos) {
    ++x.npos;
    x.pos = p;
    return;
  }
  const A u = R.u(p, e);
  const A Mn = nan_max(x.M, u);
  if (!(Mn == x.M)) {
    x.s *= exp_(x.M - Mn);
    x.M = Mn;
  }
  x.s += exp_(u - x.M);  // u = M = +inf gives NaN, as in the reference
}

// Pass 1 of the N positions p .. p + N - 1 of one segment of a staged row (no flags to test:
// ignored labels and positives hold -inf there): one max over the N and at most one rescale
// where accumulate_one tests and branches per label (the flat schedule's hot loop).
template <int N, class A, class Row, class I>
__device__ __forceinline__ void accumulate_run(const Row& R, I p, Part<A, I>& x) {
  static_assert(Row::kSparse, "staged rows only: no per-label flags");
  A u[N];
#pragma unroll
  for (int i = 0; i < N; ++i) u[i] = R.u(p + i, Elem{});
  A Mn = x.M;
#pragma unroll
  for (int i = 0; i < N; ++i) Mn = nan_max(Mn, u[i]);
  if (!(Mn == x.M)) {  // as accumulate_one: a NaN max rescales (and poisons) every time
    x.s *= exp_(x.M - Mn);
    x.M = Mn;
  }
  A e[N];
#pragma unroll
  for (int i = 0; i < N; ++i) e[i] = exp_(u[i] - x.M);
  // Pairwise: a shorter chain of dependent adds than one after another.
#pragma unroll
  for (int w = 1; w < N; w <<= 1)
#pragma unroll
    for (int i = 0; i + w < N; i += 2 * w) e[i] += e[i + w];
  x.s += e[0];
}

// Staged rows' positives (bitmask) of the words first, first + stride, ... of [p0, p1) (see
// StagedRow::for_positives) into x: counted, the last one's position kept.
template <class A, class Row, class I>
__device__ __forceinline__ void accumulate_positives(const Row& R, I p0, I p1, int first,
                                                     int stride, Part<A, I>& x) {
  R.for_positives(p0, p1, first, stride, [&](int p) {
    ++x.npos;
    x.pos = p;
  });
}

// Pass 1 over positions p0 + first, p0 + first + stride, ... below p1, into x.
template <int kUnroll, class A, class Row, class I>
__device__ __forceinline__ void accumulate(const Row& R, I p0, I p1, int first, int stride,
                                           Part<A, I>& x) {
#pragma unroll kUnroll
  for (I p = p0 + first; p < p1; p += stride) accumulate_one(R, p, x);
  if constexpr (Row::kSparse) accumulate_positives(R, p0, p1, first, stride, x);
}

// What the gradient of a segment needs (the same in every thread of its group).
template <class A>
struct Closed {
  A M, Aden, S, loss;  // Aden: A of SPEC 3 (= D of the null event when no positive)
};

// Segment k (positions [s0, s1)) from its pass-1 statistics x combined over group g (`mine`:
// this thread saw x.pos): its loss and S = sum_p w_p / D_p, then writes its eta gradient.
// A single positive (the usual case: segments hold labels that rarely co-occur) is known from
// pass 1; several take pass 2 over the segment by g (its other threads add exact zeros).
template <class Group, class T, class A, class Row, class I>
__device__ Closed<A> close_segment(const Params<T, A>& P, const Row& R, int64_t row, I k, I s0,
                                   I s1, A eta, Part<A, I> x, bool mine, const Group& g) {
  constexpr int G = Group::kSize;
  constexpr int kUnrollPasses = G > 32 ? 1 : 4;
  const A M = x.M;
  const A e_eta = exp_(eta - M);
  const A Aden = e_eta + x.s;
  A loss, S;
  if (x.npos == 1) {
    // Its owner reads it (no other thread may: in place, the owner's pass 3 may already be
    // writing over it) and hands it to the group.
    I p = x.pos;
    A u = mine ? R.positive_u(p) : A(0);
    g.only_positive(mine, p, u);
    const PositiveEvent<A> ev = positive_event(R.weight(p, R.get(p)), Aden, u - M);
    loss = ev.loss;  // (weights, flags, order: read-only inputs)
    S = ev.f;
  } else if (x.npos > 1) {
    loss = 0;
    S = 0;
    if constexpr (Row::kSparse) {
      R.for_positives(s0, s1, g.rank(), G, [&](int p) {
        const PositiveEvent<A> ev =
            positive_event(R.weight(p, Elem{}), Aden, R.positive_u(p) - M);
        loss += ev.loss;
        S += ev.f;
      });
    } else {
#pragma unroll kUnrollPasses
      for (I p = s0 + g.rank(); p < s1; p += G) {
        const Elem e = R.get(p);
        if (!e.pos) continue;
        const PositiveEvent<A> ev = positive_event(R.weight(p, e), Aden, R.u(p, e) - M);
        loss += ev.loss;
        S += ev.f;
      }
    }
    loss = g.sum(loss);
    S = g.sum(S);
  } else {
    loss = log_(Aden) + M - eta;
    S = A(1) / Aden;
  }
  if (P.grad_eta && g.leader())  // exp(eta) S, minus 1 for the null event
    P.grad_eta[row * P.m + k] = (e_eta * S - (x.npos ? A(0) : A(1))) * P.scale;
  return Closed<A>{M, Aden, S, loss};
}

// What pass 3 takes from a closed segment: S times grad_scale, so that a negative's
// gradient is one multiply (the compiler did not hoist S * scale out of the flat schedule's
// loop, where the segment changes inside it).
template <class A>
__device__ __forceinline__ Closed<A> scaled_for_gradients(Closed<A> c, A scale) {
  c.S *= scale;
  return c;
}

// Pass 3 of one position p: its gradient times grad_scale (negatives: exp(u - M) * S;
// positives: -w_p * A / D_p; ignored: 0; c from scaled_for_gradients), read before it is
// written, by the same thread: grad may alias z.
template <class A, class Row, class I>
__device__ __forceinline__ void gradient_one(const Row& R, I p, const Closed<A>& c) {
  const Elem e = R.get(p);
  A gr = 0;
  if (!e.ign) {
    const A u = R.u(p, e), ex = exp_(u - c.M);
    gr = e.pos ? -R.weight(p, e) * c.Aden / (c.Aden + ex) * R.P.scale : ex * c.S;
    // Staged rows: ignored labels and positives hold -inf: exactly 0 (also when S is NaN)
    if constexpr (Row::kSparse) gr = u == neg_inf<A>() ? A(0) : gr;
  }
  R.put(p, e, gr);
}

// Pass 3 of the N positions p .. p + N - 1 of one segment of a staged row (as
// accumulate_run: no flags, one run of loads, then the N gradients). (Skipping the -inf test
// where S is finite saved 2 of the run's ~47 instructions in the SASS: not kept.)
template <int N, class A, class Row, class I>
__device__ __forceinline__ void gradient_run(const Row& R, I p, const Closed<A>& c) {
  static_assert(Row::kSparse, "staged rows only: no per-label flags");
  A u[N];
#pragma unroll
  for (int i = 0; i < N; ++i) u[i] = R.u(p + i, Elem{});
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const A gr = exp_(u[i] - c.M) * c.S;
    R.put(p + i, Elem{}, u[i] == neg_inf<A>() ? A(0) : gr);  // as gradient_one
  }
}

// Staged rows: the gradients of the positives (bitmask) of the words first, first + stride,
// ... of [p0, p1), written over the 0 that gradient_one left there.
template <class A, class Row, class I>
__device__ __forceinline__ void positive_gradients(const Row& R, I p0, I p1, int first,
                                                   int stride, const Closed<A>& c) {
  R.for_positives(p0, p1, first, stride, [&](int p) {
    const A ex = exp_(R.positive_u(p) - c.M);
    R.put(p, Elem{}, -R.weight(p, Elem{}) * c.Aden / (c.Aden + ex) * R.P.scale);
  });
}

// Pass 3 over positions p0 + first, p0 + first + stride, ... below p1. `sync` orders a
// group's writes (staged rows write the positives' gradients over the zeros just written).
template <int kUnroll, class A, class Row, class I, class Sync>
__device__ __forceinline__ void write_gradients(const Row& R, I p0, I p1, int first, int stride,
                                                const Closed<A>& closed, Sync&& sync) {
  const Closed<A> c = scaled_for_gradients(closed, R.P.scale);
#pragma unroll kUnroll
  for (I p = p0 + first; p < p1; p += stride) gradient_one(R, p, c);
  if constexpr (Row::kSparse) {
    sync();
    positive_gradients(R, p0, p1, first, stride, c);
  }
}

// Segment k of `row`, handled by group g: the three passes (see the top of shl_cuda.cu). Writes
// the segment's gradients and grad_eta; returns its loss (the same in every thread of g).
template <class Group, class T, class A, class Row>
__device__ A segment(const Params<T, A>& P, const Row& R, int64_t row, typename Row::Index k,
                     const Group& g) {
  using I = typename Row::Index;
  constexpr int G = Group::kSize;
  // The block's loops stay rolled (each thread has few elements of a segment there); the
  // lanes' and warps' loops are unrolled for more loads in flight.
  constexpr int kUnrollPasses = G > 32 ? 1 : 4;
  const I s0 = static_cast<I>(P.offsets[k]), s1 = static_cast<I>(P.offsets[k + 1]);
  const A eta = P.eta ? P.eta[k] : A(0);
  auto x = Part<A, I>::start(eta);
  accumulate<kUnrollPasses>(R, s0, s1, g.rank(), G, x);
  const bool mine = x.npos > 0;
  g.max_sum(x.M, x.s);
  x.npos = g.sum(x.npos);
  const Closed<A> c = close_segment(P, R, row, k, s0, s1, eta, x, mine, g);
  write_gradients<kUnrollPasses>(R, s0, s1, g.rank(), G, c, [&] { g.sync(); });
  return c.loss;
}

// The row's segments over the block's NT threads. First the segments of at least
// P.block_min labels (default kBlockFactor * NT), which the schedule (largest first) lists
// first: each by the whole block, so that no single warp carries a segment much larger
// than its share of the row while the others wait at the next barrier (a Dirichlet split
// of 32768 labels into 100 segments has segments of several thousand labels; without a
// schedule, none). Then the rest: warp w takes the remaining schedule indices
// i = w (mod NT/32), 32 at a time (one per lane); a segment of at most kSmall labels is
// handled by its lane alone, a larger one by the whole warp.
// Writes loss[row] (block-wide sum in a fixed order: deterministic); ends with a
// __syncthreads, so the row's gradient writes are visible to the whole block.
constexpr int kBlockFactor = 2;

// loss[row] = the sum of every thread's acc, in a fixed order (deterministic); ends with a
// __syncthreads (the row's gradient writes are then visible to the whole block).
template <int NT, class T, class A>
__device__ __forceinline__ void store_row_loss(const Params<T, A>& P, int64_t row, A acc,
                                               BlockScratch<NT, A>* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  acc = WarpGroup{lane}.sum(acc);
  if (lane == 0) scratch->a[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    A total = 0;
    for (int j = 0; j < NT / 32; ++j) total += scratch->a[j];
    P.loss[row] = total * P.scale;
  }
  __syncthreads();  // the scratch is reused by the next row
}

template <int NT, class T, class A, class Row>
__device__ void row_loss(const Params<T, A>& P, const Row& R, int64_t row,
                         BlockScratch<NT, A>* scratch) {
  using I = typename Row::Index;
  constexpr int kW = NT / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const I m = static_cast<I>(P.m);
  A acc = 0;
  I h = 0;  // schedule indices [0, h) went to the whole block
  if (P.schedule) {
    for (; h < m; ++h) {  // block-uniform: every thread reads the same sizes
      const I k = I(P.schedule[h]);
      const int64_t at_least = P.block_min >= 0 ? P.block_min : int64_t(kBlockFactor) * NT;
      if (P.offsets[k + 1] - P.offsets[k] < at_least) break;
      const A l = segment(P, R, row, k, BlockGroup<NT, A>{scratch});
      if (threadIdx.x == 0) acc += l;
    }
  }
  // Lane l of warp w, round j: schedule index i = h + w + kW (32 j + l).
  for (I first = h + warp; first < m; first += NT) {
    const I i = first + I(kW) * lane;
    const bool valid = i < m;
    const I k = !valid ? I(0) : P.schedule ? I(P.schedule[i]) : i;
    const bool small = valid && P.offsets[k + 1] - P.offsets[k] <= kSmall;
    if (small) acc += segment(P, R, row, k, LaneGroup{});
    unsigned big = __ballot_sync(kFull, valid && !small);
    while (big) {  // warp-uniform: the whole warp takes each large segment in turn
      const int b = __ffs(big) - 1;
      big &= big - 1;
      const A l = segment(P, R, row, __shfl_sync(kFull, k, b), WarpGroup{lane});
      if (lane == 0) acc += l;
    }
  }
  store_row_loss<NT>(P, row, acc, scratch);
}

}  // namespace
}  // namespace shl
