// CUDA backend of the fused SHL kernel: loss rows and gradients of SPEC section 3 in one
// launch; the contract (scaling, label order, nullable inputs) is in shl_args.h.
//
// Design: one block per row (grid-stride over rows). When the row fits shared memory
// (about C * (sizeof(z) + 1/8) bytes: bf16 up to ~109k labels on sm_90) it is staged there
// in segment order, read and written coalesced, with -inf in place of the ignored labels
// and the positives (marked in a bitmask, their logits read from global memory), so the
// per-element passes read no flags (shl_staged_kernel); otherwise the segments gather from
// global memory (shl_fused_kernel).
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
//   1. max M of eta and the non-ignored u's, online sum of exp(u - M) over the
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
// weight(p, e), put(p, e, g) (stores grad_scale * g); and Index, the type of positions and
// segment ids: 64-bit in global memory, 32-bit for a staged row (C < 2^31 there), which
// halves the index arithmetic and the registers it holds in the per-element loops.
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
    P.grad[base + e.id] = DevConv<T>::store(g * P.scale);
  }
};

// From the row staged in shared memory in segment order (see shl_staged_kernel): zs holds z
// for the negatives and -inf for the ignored labels and the positives, so the per-element
// passes read no flags (exp(-inf - M) = 0 keeps those out of every sum); the positives, few,
// are marked in a bitmask (bit p of word p / 32) and their logits read from global memory
// (intact until the row's gradient goes out). The gradient replaces z in zs. kSparse tells
// segment() to take the positives from the bitmask.
// zs[p] and bit p of pos_bits are position p of the row, also when only a window of the row
// is staged (see Params::windows): then zs and pos_bits point before shared memory, by the
// window's first position (bitmask: its word), so that the per-element passes index them as
// for a whole row.
template <class T, class A>
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
    return P.delta ? z + P.delta[c] : z;
  }
  __device__ __forceinline__ A u(int p, const Elem&) const {
    const A z = DevConv<T>::load(zs[p]);
    return P.delta ? z + P.delta[id(p)] : z;
  }
  __device__ __forceinline__ A weight(int p, const Elem&) const {
    return P.w ? P.w[id(p)] : A(1);
  }
  __device__ __forceinline__ void put(int p, const Elem&, A g) const {
    zs[p] = DevConv<T>::store(g * P.scale);
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

// Pass-1 statistics of some of a segment's labels: M, the max of eta and the non-ignored u's
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

// Pass 1 of one position p into x.
template <class A, class Row, class I>
__device__ __forceinline__ void accumulate_one(const Row& R, I p, Part<A, I>& x) {
  const Elem e = R.get(p);
  if (e.ign) return;
  const A u = R.u(p, e);
  const A Mn = nan_max(x.M, u);
  if (!(Mn == x.M)) {
    x.s *= exp_(x.M - Mn);
    x.M = Mn;
  }
  if (e.pos) {
    ++x.npos;
    x.pos = p;
  } else {
    x.s += exp_(u - x.M);  // u = M = +inf gives NaN, as in the reference
  }
}

// Staged rows' positives (bitmask) of the words first, first + stride, ... of [p0, p1) (see
// StagedRow::for_positives) into x: in the max, not in the sum.
template <class A, class Row, class I>
__device__ __forceinline__ void accumulate_positives(const Row& R, I p0, I p1, int first,
                                                     int stride, Part<A, I>& x) {
  R.for_positives(p0, p1, first, stride, [&](int p) {
    const A u = R.positive_u(p);
    const A Mn = nan_max(x.M, u);
    if (!(Mn == x.M)) {
      x.s *= exp_(x.M - Mn);
      x.M = Mn;
    }
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
    const A wp = R.weight(p, R.get(p));  // weights, flags, order: read-only inputs
    const A D = Aden + exp_(u - M);
    loss = wp * (log_(D) + M - u);
    S = wp / D;
  } else if (x.npos > 1) {
    loss = 0;
    S = 0;
    if constexpr (Row::kSparse) {
      R.for_positives(s0, s1, g.rank(), G, [&](int p) {
        const A u = R.positive_u(p), wp = R.weight(p, Elem{});
        const A D = Aden + exp_(u - M);
        loss += wp * (log_(D) + M - u);
        S += wp / D;
      });
    } else {
#pragma unroll kUnrollPasses
      for (I p = s0 + g.rank(); p < s1; p += G) {
        const Elem e = R.get(p);
        if (!e.pos) continue;
        const A u = R.u(p, e), wp = R.weight(p, e);
        const A D = Aden + exp_(u - M);
        loss += wp * (log_(D) + M - u);
        S += wp / D;
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

// Pass 3 of one position p: its gradient (negatives: exp(u - M) * S; positives:
// -w_p * A / D_p; ignored: 0), read before it is written, by the same thread: grad may alias z.
template <class A, class Row, class I>
__device__ __forceinline__ void gradient_one(const Row& R, I p, const Closed<A>& c) {
  const Elem e = R.get(p);
  A gr = 0;
  if (!e.ign) {
    const A u = R.u(p, e), ex = exp_(u - c.M);
    gr = e.pos ? -R.weight(p, e) * c.Aden / (c.Aden + ex) : ex * c.S;
    // Staged rows: ignored labels and positives hold -inf: exactly 0 (also when S is NaN)
    if constexpr (Row::kSparse) gr = u == neg_inf<A>() ? A(0) : gr;
  }
  R.put(p, e, gr);
}

// Staged rows: the gradients of the positives (bitmask) of the words first, first + stride,
// ... of [p0, p1), written over the 0 that gradient_one left there.
template <class A, class Row, class I>
__device__ __forceinline__ void positive_gradients(const Row& R, I p0, I p1, int first,
                                                   int stride, const Closed<A>& c) {
  R.for_positives(p0, p1, first, stride, [&](int p) {
    const A ex = exp_(R.positive_u(p) - c.M);
    R.put(p, Elem{}, -R.weight(p, Elem{}) * c.Aden / (c.Aden + ex));
  });
}

// Pass 3 over positions p0 + first, p0 + first + stride, ... below p1. `sync` orders a
// group's writes (staged rows write the positives' gradients over the zeros just written).
template <int kUnroll, class A, class Row, class I, class Sync>
__device__ __forceinline__ void write_gradients(const Row& R, I p0, I p1, int first, int stride,
                                                const Closed<A>& c, Sync&& sync) {
#pragma unroll kUnroll
  for (I p = p0 + first; p < p1; p += stride) gradient_one(R, p, c);
  if constexpr (Row::kSparse) {
    sync();
    positive_gradients(R, p0, p1, first, stride, c);
  }
}

// Segment k of `row`, handled by group g: the three passes (see the top of the file). Writes
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

// The flat schedule of a staged row (the default; ShlArgs::cuda_flat): every thread gets the
// same share of the row whatever the segments. Thread t owns positions [t Q, (t + 1) Q), Q
// about C / NT, chosen so that the lanes of a warp, Q elements apart, read 32 different
// banks of shared memory (an odd stride in 4-byte words; see flat_share). Pass 1 is one loop
// over the range (a piece: the part of one segment in it, settled where the segment ends): a
// segment inside the range is closed there; the segments crossing a range boundary are
// joined by one segmented scan of their pass-1 statistics over the block, and the thread
// holding a segment's last position (its closer) merges the scan's value before it with its
// own piece and closes the segment (loss, S, eta gradient; with several positives, pass 2
// over the segment's bitmask words by that thread). Closed segments leave M, A, S in shared
// memory (one entry per segment); after a barrier pass 3 is one loop over the range again.
// Against row_loss: no thread waits on another's large segment, no group reduction per
// segment (one scan and three barriers per row), and a warp's lanes run their loops in
// step.
template <class A>
struct Carry {  // a value of the segmented scan
  Part<A, int> x;  // pass-1 statistics of the segment open at the end of the window
  int reset;       // that segment began inside the window: nothing before it adds to x
};

template <class A>
__device__ __forceinline__ Carry<A> no_carry() {
  return Carry<A>{{neg_inf<A>(), A(0), 0, 0}, 1};
}

template <class A>
__device__ __forceinline__ Carry<A> shfl_up(const Carry<A>& c, int d) {
  Carry<A> o;
  o.x.M = __shfl_up_sync(kFull, c.x.M, d);
  o.x.s = __shfl_up_sync(kFull, c.x.s, d);
  o.x.npos = __shfl_up_sync(kFull, c.x.npos, d);
  o.x.pos = __shfl_up_sync(kFull, c.x.pos, d);
  o.reset = __shfl_up_sync(kFull, c.reset, d);
  return o;
}

// c = before, then c (the scan's operator): before's statistics continue into c's unless c's
// segment began after it.
template <class A>
__device__ __forceinline__ void follow(Carry<A>& c, const Carry<A>& before) {
  if (!c.reset) {
    A M = before.x.M, s = before.x.s;
    merge(M, s, c.x.M, c.x.s);
    c.x.M = M;
    c.x.s = s;
    if (c.x.npos == 0) c.x.pos = before.x.pos;
    c.x.npos += before.x.npos;
  }
  c.reset |= before.reset;
}

template <int NT, class A>
struct FlatShared {
  Carry<A> warp[NT / 32];  // the scan's warp totals, then their inclusive prefixes
  int any_empty;           // some segment has no label
};

// The flat schedule keeps every segment's Closed statistics in dynamic shared memory, after
// the row and its bitmask (written by the segment's closer, read by every thread with a
// piece of it).
template <class A>
__host__ __device__ constexpr int64_t flat_stats_bytes(int64_t m) {
  return m * int64_t(sizeof(Closed<A>));
}

// Segmented scan over the block's threads in order: the combined value of threads 0..t-1
// (no_carry for thread 0). Fixed order: deterministic.
template <int NT, class A>
__device__ Carry<A> scan_before(Carry<A> c, FlatShared<NT, A>* sh) {
  constexpr int kW = NT / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int d = 1; d < 32; d <<= 1) {
    const Carry<A> o = shfl_up(c, d);
    if (lane >= d) follow(c, o);
  }
  if (lane == 31) sh->warp[warp] = c;
  __syncthreads();
  if (warp == 0) {  // the warps' totals, scanned by warp 0 (each lane its own slot)
    Carry<A> t = lane < kW ? sh->warp[lane] : no_carry<A>();
    for (int d = 1; d < kW; d <<= 1) {
      const Carry<A> o = shfl_up(t, d);
      if (lane >= d) follow(t, o);
    }
    if (lane < kW) sh->warp[lane] = t;
  }
  __syncthreads();
  if (warp > 0) follow(c, sh->warp[warp - 1]);
  Carry<A> before = shfl_up(c, 1);
  if (lane == 0) before = warp > 0 ? sh->warp[warp - 1] : no_carry<A>();
  return before;
}

// Positions per thread of the flat schedule for rows of C labels: at least C / NT, with a
// stride of an odd number of 4-byte words (2-byte types: Q = 2 mod 4; else Q odd).
template <int NT, class T>
__device__ __forceinline__ int flat_share(int C) {
  constexpr int kStep = sizeof(T) >= 4 ? 1 : 4 / int(sizeof(T));
  int q = ((C + NT - 1) / NT + kStep - 1) / kStep;
  return (q | 1) * kStep;
}

// A window of a staged row: segments [k0, k1), positions [lo, hi).
struct Window {
  int k0, k1, lo, hi;
};

template <class T, class A>
__device__ __forceinline__ Window window(const Params<T, A>& P, int w) {
  const int k0 = P.windows[w], k1 = P.windows[w + 1];
  return {k0, k1, static_cast<int>(P.offsets[k0]), static_cast<int>(P.offsets[k1])};
}

// A thread's range [a, b) of the flat schedule over window W and the segment holding
// position a (first of the window's segments with a label at or after a), the same for
// every row.
struct FlatRange {
  int a, b, k0;
};

template <int NT, class T, class A>
__device__ FlatRange flat_range(const Params<T, A>& P, const Window& W) {
  const int L = W.hi - W.lo, Q = flat_share<NT, T>(L);
  FlatRange r;
  r.a = int(threadIdx.x) * Q < L ? W.lo + int(threadIdx.x) * Q : W.hi;
  r.b = r.a + Q < W.hi ? r.a + Q : W.hi;
  int lo = W.k0, hi = W.k1 - 1;  // the first k with offsets[k + 1] > a
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (P.offsets[mid + 1] > r.a) hi = mid;
    else lo = mid + 1;
  }
  r.k0 = lo;
  return r;
}

// The window W of the row (stats: an entry per segment of W); returns this thread's part of
// the row loss (store_row_loss adds them up). The gradient is in zs after the caller's next
// barrier.
template <int NT, class T, class A>
__device__ A row_loss_flat(const Params<T, A>& P, const StagedRow<T, A>& R, int64_t row,
                           const Window& W, const FlatRange& r, Closed<A>* stats,
                           FlatShared<NT, A>* sh) {
  using X = Part<A, int>;
  auto offset = [&](int k) { return static_cast<int>(P.offsets[k]); };
  auto eta_of = [&](int k) { return P.eta ? P.eta[k] : A(0); };
  A acc = 0;
  // The segment pieces at either end of the range: `head`, of a segment begun before a and
  // ending in the range (this thread closes it), and `tail`, of one going on past b (its
  // statistics enter the scan).
  X head = X::start(A(0));
  int head_k = -1;
  Carry<A> tail = no_carry<A>();
  // Pass 1: one loop over the range, whatever its segments, so that the lanes of a warp stay
  // in step (a loop per piece would have them wait for each other's pieces in turn); a
  // piece is settled where its segment ends (a branch the lanes take at different times).
  if (r.a < r.b) {
    int k = r.k0, s0 = offset(k), s1 = offset(k + 1), ps = r.a;
    A eta = eta_of(k);
    X x = X::start(eta);
    // The piece [ps, pe) of segment k is complete and pe is where the segment ends: the
    // segment is closed here, or it is the head. (Only the last piece can be the tail: kept
    // out of the loop, the tail holds no registers there.)
    auto settle = [&](int pe) {
      accumulate_positives(R, ps, pe, 0, 1, x);
      if (ps == s0) {  // the whole segment is here
        const Closed<A> c = close_segment(P, R, row, k, s0, s1, eta, x, true, LaneGroup{});
        stats[k - W.k0] = c;
        acc += c.loss;
      } else {
        head = x, head_k = k;
      }
    };
#pragma unroll 4
    for (int p = r.a; p < r.b; ++p) {
      if (p == s1) {
        settle(p);
        do ++k; while (offset(k + 1) <= p);  // skips empty segments
        s0 = p, s1 = offset(k + 1), ps = p, eta = eta_of(k);
        x = X::start(eta);
      }
      accumulate_one(R, p, x);
    }
    if (r.b == s1) {
      settle(r.b);
    } else {
      accumulate_positives(R, ps, r.b, 0, 1, x);
      tail = Carry<A>{x, ps == s0 ? 1 : 0};
    }
  }
  const Carry<A> before = scan_before<NT>(tail, sh);
  if (head_k >= 0) {  // close the segment begun before a
    Carry<A> h{head, 0};
    follow(h, before);
    const Closed<A> c = close_segment(P, R, row, head_k, offset(head_k), offset(head_k + 1),
                                      eta_of(head_k), h.x, true, LaneGroup{});
    stats[head_k - W.k0] = c;
    acc += c.loss;
  }
  __syncthreads();  // every segment's statistics are in `stats`
  // Pass 3, one loop over the range as pass 1; each piece's positives once it is written.
  if (r.a < r.b) {
    int k = r.k0, s1 = offset(k + 1), ps = r.a;
    Closed<A> c = stats[k - W.k0];
#pragma unroll 4
    for (int p = r.a; p < r.b; ++p) {
      if (p == s1) {
        positive_gradients(R, ps, p, 0, 1, c);
        do ++k; while (offset(k + 1) <= p);
        s1 = offset(k + 1), ps = p;
        c = stats[k - W.k0];
      }
      gradient_one(R, p, c);
    }
    positive_gradients(R, ps, r.b, 0, 1, c);
  }
  if (sh->any_empty) {  // segments without labels: the null event alone
    for (int j = W.k0 + threadIdx.x; j < W.k1; j += NT) {
      const int s0 = offset(j);
      if (offset(j + 1) != s0) continue;
      const A eta = eta_of(j);
      acc += close_segment(P, R, row, j, s0, s0, eta, X::start(eta), false, LaneGroup{}).loss;
    }
  }
  return acc;
}

// Unstaged: one block per row (grid-stride), positions gathered from global memory. The
// fallback for rows too large for shared memory. At least 4 blocks per SM lets ptxas use up
// to 64 registers (with a bare bound of 256 it squeezed to 40 registers and spilled).
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
// sector per element). C is below 2^31 here (the row fits shared memory).
// V elements per access: 16-byte loads and stores of z and grad when the pointers are
// aligned and either C % V == 0 or the asynchronous staging runs (checked on the host; see
// RowSplit), else V = 1; kUnroll accesses in flight per
// thread (a row is read in a few memory round trips, not one per 512 elements; one 16-byte
// access at a time keeps the 16-byte variants within 64 registers: sm_90 ptxas spilled
// with two). fp64 spills either way (a correctness path on GPUs).
// NT threads per block: 512 (two blocks per SM, 64 registers each) by default, or 256
// (three blocks, hence three rows, per SM when three rows fit shared memory; a knob to
// compare on a GPU, see ShlArgs::cuda_staged_threads).
constexpr int kStagedThreads = 512;

template <int NT>
constexpr int staged_min_blocks() { return NT >= 512 ? 2 : 3; }

template <int N, class T>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, class T>
__device__ __forceinline__ Pack<N, T> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<N, T>*>(p);
}

// Staging moves z and grad as raw bits (trivial types: the packs stay in registers).
template <int Bytes> struct BitsOf;
template <> struct BitsOf<2> { using type = uint16_t; };
template <> struct BitsOf<4> { using type = uint32_t; };
template <> struct BitsOf<8> { using type = uint64_t; };
template <class T>
using Bits = typename BitsOf<sizeof(T)>::type;

template <class T>
__host__ __device__ constexpr int64_t staged_z_bytes(int64_t C) {
  return (C * int64_t(sizeof(T)) + 15) / 16 * 16;
}

// The positives' bitmask: bit p % 32 of word p / 32 (words counted from the first position
// staged, rounded down to a word), in whole 16-byte groups of words (cleared 16 bytes at a
// time): room for C + 31 bits, C labels starting anywhere in a word.
__host__ __device__ constexpr int64_t staged_bits_bytes(int64_t C) {
  return (C + 31 + 127) / 128 * 16;
}

template <int NT>
__device__ __forceinline__ void clear_bits(uint32_t* bits, int C) {
  uint4* words = reinterpret_cast<uint4*>(bits);
  const int n = static_cast<int>(staged_bits_bytes(C) / 16);
  for (int q = threadIdx.x; q < n; q += NT) words[q] = make_uint4(0, 0, 0, 0);
}

// -inf as the raw bits of T (what staging writes for ignored labels and positives).
template <class T> struct NegInfBits;
template <> struct NegInfBits<float> { static constexpr uint32_t v = 0xff800000u; };
template <> struct NegInfBits<double> { static constexpr uint64_t v = 0xfff0000000000000ull; };
template <> struct NegInfBits<__half> { static constexpr uint16_t v = 0xfc00u; };
template <> struct NegInfBits<__nv_bfloat16> { static constexpr uint16_t v = 0xff80u; };

template <int N> struct UintOf;
template <> struct UintOf<1> { using type = uint8_t; };
template <> struct UintOf<2> { using type = uint16_t; };
template <> struct UintOf<4> { using type = uint32_t; };
template <> struct UintOf<8> { using type = uint64_t; };

// Which positions a staging pass takes: all (a whole row; no test in the loops, which keep
// the registers they had) or those of a window [lo, lo + L).
struct AllPositions {
  static constexpr bool kAll = true;
  int lo = 0;
  __device__ __forceinline__ bool operator()(int) const { return true; }
};
struct WindowPositions {
  static constexpr bool kAll = false;
  int lo, L;
  __device__ __forceinline__ bool operator()(int p) const { return unsigned(p - lo) < unsigned(L); }
};

// The V elements at row column c0 (z bits, positive and ignored flags as V bytes, their
// positions) into zs in segment order: z for the negatives, -inf for ignored labels and
// positives, the positives also set in pos_bits. Packs without flags (nearly all) take the
// short path. `mapped`: xv holds the positions (else identity). Only the positions `keep`
// takes are staged (zs and pos_bits indexed by position, as in StagedRow).
template <int V, class T, class Flags, class Pos, class Keep>
__device__ __forceinline__ void scatter_pack(const Pack<V, Bits<T>>& zv, Flags pv, Flags iv,
                                             const Pack<V, Pos>& xv, bool mapped, int c0,
                                             const Keep& keep, Bits<T>* zs, uint32_t* pos_bits) {
  const bool flagged = (pv | iv) != 0;
#pragma unroll
  for (int t = 0; t < V; ++t) {
    const int p = mapped ? int(xv.v[t]) : c0 + t;
    if (!keep(p)) continue;
    Bits<T> bits = zv.v[t];
    if (flagged) {
      const bool ign = (iv >> (8 * t)) & 0xff, pos = (pv >> (8 * t)) & 0xff;
      if (ign || pos) bits = NegInfBits<T>::v;
      if (pos && !ign) atomicOr(pos_bits + (p >> 5), 1u << (p & 31));
    }
    zs[p] = bits;
  }
}

// A row as a head of h single elements (up to where z[base + h] starts 16 bytes: z itself is
// 16-byte aligned), n packs of V and a tail of fewer than V single elements, whatever C: the
// asynchronous staging and the unstaging take rows of any length 16 bytes at a time (the
// plain-load staging only rows of whole packs: with a head and tail it spilled registers).
// V = 1: no head, no tail. A pass visits the packs [first, end) (all but for windows of
// rows in identity order, see packs_for).
struct RowSplit {
  int h, n;
  int first, end;
};

template <int V>
__device__ __forceinline__ RowSplit row_split(int64_t base, int C) {
  const int h = static_cast<int>((V - base % V) % V);
  const int head = h < C ? h : C;
  const int n = (C - head) / V;
  return {head, n, 0, n};
}

// The packs of r a pass over the positions `keep` takes visits: every pack, except for a
// window of a row in identity order (`mapped` false: positions are columns), where only the
// packs meeting its columns [lo, lo + L) hold any (one read of the row for all windows).
__device__ __forceinline__ RowSplit packs_for(const RowSplit& r, const AllPositions&, int,
                                              bool) {
  return r;
}

__device__ __forceinline__ RowSplit packs_for(RowSplit r, const WindowPositions& k, int V,
                                              bool mapped) {
  if (mapped) return r;
  const int a = k.lo - r.h, b = k.lo + k.L - r.h;  // from the first pack's first column
  r.first = a <= 0 ? 0 : a / V;
  const int e = b <= 0 ? 0 : (b + V - 1) / V;
  r.end = e < r.n ? e : r.n;
  return r;
}

// The positions of the V columns from c (16-byte loads when c is a multiple of V).
template <int V, class Pos>
__device__ __forceinline__ Pack<V, Pos> load_positions(const Pos* position, int64_t c) {
  if (c % V == 0) return load_pack<V>(position + c);
  Pack<V, Pos> x;
#pragma unroll
  for (int t = 0; t < V; ++t) x.v[t] = position[c + t];
  return x;
}

// Column of the i-th element of the head and tail of a row split as r.
__device__ __forceinline__ int edge_column(const RowSplit& r, int V, int i) {
  return i < r.h ? i : r.h + r.n * V + (i - r.h);
}

// Stages the head and tail of the row (fewer than 2V elements) one element per thread.
template <int V, int NT, class T, class A, class Pos, class Keep>
__device__ __forceinline__ void stage_edges(const Params<T, A>& P, const Pos* position,
                                            int64_t base, int C, const RowSplit& r,
                                            const Keep& keep, Bits<T>* zs, uint32_t* pos_bits) {
  const Bits<T>* z = reinterpret_cast<const Bits<T>*>(P.z);
  for (int i = threadIdx.x; i < C - r.n * V; i += NT) {
    const int c = edge_column(r, V, i);
    Pack<1, Pos> xv;
    if (position) xv.v[0] = position[c];
    scatter_pack<1, T>(Pack<1, Bits<T>>{{z[base + c]}}, P.pos[base + c],
                       P.ign ? P.ign[base + c] : uint8_t(0), xv, position != nullptr, c, keep,
                       zs, pos_bits);
  }
}

template <int V, int NT, class T, class A, class Pos, class Keep>
__device__ __forceinline__ void unstage_edges(const Params<T, A>& P, const Pos* position,
                                              int64_t base, int C, const RowSplit& r,
                                              const Keep& keep, const Bits<T>* zs) {
  Bits<T>* grad = reinterpret_cast<Bits<T>*>(P.grad);
  for (int i = threadIdx.x; i < C - r.n * V; i += NT) {
    const int c = edge_column(r, V, i);
    const int p = position ? int(position[c]) : c;
    if (keep(p)) grad[base + c] = zs[p];
  }
}

// Reads the row (coalesced) and scatters the positions `keep` takes into zs in segment
// order (see scatter_pack; pos_bits cleared beforehand), C a multiple of V. Pos: the type of
// the position map (int32_t, or uint16_t for C <= 65536: half the reads); position null:
// identity.
template <int V, int NT, class T, class A, class Pos, class Keep>
__device__ __forceinline__ void stage_row(const Params<T, A>& P, const Pos* position,
                                          int64_t base, int C, const Keep& keep, T* zs_,
                                          uint32_t* pos_bits) {
  constexpr int kUnroll = V == 1 ? 3 : V == 2 ? 2 : 1;
  const RowSplit r = packs_for(RowSplit{0, C / V, 0, C / V}, keep, V, position != nullptr);
  const int n = r.end;
  const Bits<T>* z = reinterpret_cast<const Bits<T>*>(P.z);
  Bits<T>* zs = reinterpret_cast<Bits<T>*>(zs_);
  using Flags = typename UintOf<V>::type;  // a pack's V flag bytes as one integer
  for (int q0 = r.first + threadIdx.x; q0 < n; q0 += NT * kUnroll) {
    Pack<V, Bits<T>> zv[kUnroll];
    Flags pv[kUnroll], iv[kUnroll];
    Pack<V, Pos> xv[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t c = int64_t(q0 + j * NT) * V;
      if (q0 + j * NT < n) {
        zv[j] = load_pack<V>(z + base + c);
        pv[j] = *reinterpret_cast<const Flags*>(P.pos + base + c);
        iv[j] = P.ign ? *reinterpret_cast<const Flags*>(P.ign + base + c) : Flags(0);
        if (position) xv[j] = load_pack<V>(position + c);
      }
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int q = q0 + j * NT;
      if (q < n)
        scatter_pack<V, T>(zv[j], pv[j], iv[j], xv[j], position != nullptr, q * V, keep, zs,
                           pos_bits);
    }
  }
}

// Writes the gradient of the positions `keep` takes (in zs) to their columns of the row:
// whole packs where every element is kept (always, for a whole row), else element by
// element.
template <int V, int NT, class T, class A, class Pos, class Keep>
__device__ __forceinline__ void unstage_row(const Params<T, A>& P, const Pos* position,
                                            int64_t base, int C, const Keep& keep,
                                            const T* zs_) {
  constexpr int kUnroll = V == 1 ? 4 : V == 2 ? 2 : 1;
  const RowSplit r = packs_for(row_split<V>(base, C), keep, V, position != nullptr);
  const Bits<T>* zs = reinterpret_cast<const Bits<T>*>(zs_);
  Bits<T>* grad = reinterpret_cast<Bits<T>*>(P.grad);
  for (int q0 = r.first + threadIdx.x; q0 < r.end; q0 += NT * kUnroll) {
    Pack<V, Bits<T>> gv[kUnroll];
    unsigned in[kUnroll];  // bit t: element t is in the window
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int q = q0 + j * NT;
      in[j] = 0;
      if (q < r.end) {
        const int c = r.h + q * V;
        Pack<V, Pos> xv;
        if (position) xv = load_positions<V>(position, c);
#pragma unroll
        for (int t = 0; t < V; ++t) {
          const int p = position ? int(xv.v[t]) : c + t;
          const bool inside = keep(p);
          gv[j].v[t] = zs[inside ? p : keep.lo];
          in[j] |= unsigned(inside) << t;
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int q = q0 + j * NT;
      Bits<T>* g = grad + base + r.h + int64_t(q) * V;
      if constexpr (Keep::kAll) {
        if (q < r.end) *reinterpret_cast<Pack<V, Bits<T>>*>(g) = gv[j];
      } else if (in[j] == (1u << V) - 1) {
        *reinterpret_cast<Pack<V, Bits<T>>*>(g) = gv[j];
      } else if (in[j]) {
#pragma unroll
        for (int t = 0; t < V; ++t)
          if ((in[j] >> t) & 1) g[t] = gv[j].v[t];
      }
    }
  }
  if (V > 1) unstage_edges<V, NT>(P, position, base, C, r, keep, zs);
}

// Asynchronous staging (16-byte packs of 2- and 4-byte z): each thread copies its packs of
// the row (z and flags) into its own slots of a ring in shared memory with cp.async, kRing
// packs ahead of the one it scatters, so that more of the row is in flight than registers
// would hold; the first kRing packs of a block's next row are copied while the current row
// computes. The thread reads only its own slots: no barrier. Positions, the head and the
// tail are plain loads.
constexpr int kRing = 2;

template <int V, int NT, class T>
struct Ring {
  using Flags = typename UintOf<V>::type;
  Pack<V, Bits<T>> z[kRing][NT];
  Flags pos[kRing][NT], ign[kRing][NT];
};

template <int V, class T>
__host__ __device__ constexpr bool async_staging_ok() { return V >= 4 && sizeof(T) <= 4; }  // cp.async: >= 4 B

// Copies pack j (the thread's j-th: q = r.first + threadIdx.x + j NT) of the row at `base`,
// split as r, into ring slot j % kRing (nothing past the pass's packs); the caller commits.
template <int V, int NT, class T, class A>
__device__ __forceinline__ void ring_copy(const Params<T, A>& P, int64_t base,
                                          const RowSplit& r, int j, Ring<V, NT, T>* ring) {
  const int q = r.first + threadIdx.x + j * NT;
  if (q >= r.end) return;
  const int slot = j % kRing;
  const int64_t c = base + r.h + int64_t(q) * V;
  async_copy<16>(&ring->z[slot][threadIdx.x], reinterpret_cast<const Bits<T>*>(P.z) + c);
  async_copy<V>(&ring->pos[slot][threadIdx.x], P.pos + c);
  if (P.ign) async_copy<V>(&ring->ign[slot][threadIdx.x], P.ign + c);
}

// The first kRing packs of a pass over the row at `base` taking the positions `keep` takes
// (the copies stage_row_async would start with).
template <int V, int NT, class T, class A, class Keep>
__device__ __forceinline__ void ring_prefetch(const Params<T, A>& P, int64_t base, int C,
                                              const Keep& keep, bool mapped,
                                              Ring<V, NT, T>* ring) {
  const RowSplit r = packs_for(row_split<V>(base, C), keep, V, mapped);
#pragma unroll
  for (int j = 0; j < kRing; ++j) {
    ring_copy<V, NT>(P, base, r, j, ring);
    async_commit();
  }
}

// stage_row through the ring; `prefetched`: ring_prefetch already copied the first packs.
template <int V, int NT, class T, class A, class Pos, class Keep>
__device__ __forceinline__ void stage_row_async(const Params<T, A>& P, const Pos* position,
                                                int64_t base, int C, const Keep& keep, T* zs_,
                                                uint32_t* pos_bits, Ring<V, NT, T>* ring,
                                                bool prefetched) {
  const RowSplit r = packs_for(row_split<V>(base, C), keep, V, position != nullptr);
  Bits<T>* zs = reinterpret_cast<Bits<T>*>(zs_);
  if (!prefetched) ring_prefetch<V, NT>(P, base, C, keep, position != nullptr, ring);
  for (int j = 0, q = r.first + threadIdx.x; q < r.end; ++j, q += NT) {
    const int c = r.h + q * V;
    Pack<V, Pos> xv;
    if (position) xv = load_positions<V>(position, c);
    async_wait<kRing - 1>();  // pack j is in (one group committed per pack)
    const int slot = j % kRing;
    const Pack<V, Bits<T>> zv = ring->z[slot][threadIdx.x];
    const auto pv = ring->pos[slot][threadIdx.x];
    const auto iv = P.ign ? ring->ign[slot][threadIdx.x] : decltype(pv)(0);
    scatter_pack<V, T>(zv, pv, iv, xv, position != nullptr, c, keep, zs, pos_bits);
    ring_copy<V, NT>(P, base, r, j + kRing, ring);  // into the slot just read
    async_commit();
  }
  async_wait<0>();  // (only empty groups can be left)
  stage_edges<V, NT>(P, position, base, C, r, keep, zs, pos_bits);
}

// Stages the positions `keep` takes of the row at `base` (zs, pos_bits indexed by position):
// through the ring when there is one, else with plain loads.
template <int V, int NT, class T, class A, class Keep>
__device__ __forceinline__ void stage(const Params<T, A>& P, int64_t base, const Keep& keep,
                                      T* zs, uint32_t* pos_bits, Ring<V, NT, T>* ring,
                                      bool prefetched) {
  const int C = static_cast<int>(P.C);
  if constexpr (async_staging_ok<V, T>()) {
    if (ring) {
      if (P.position16)
        stage_row_async<V, NT>(P, P.position16, base, C, keep, zs, pos_bits, ring, prefetched);
      else
        stage_row_async<V, NT>(P, P.position, base, C, keep, zs, pos_bits, ring, prefetched);
      return;
    }
  }
  if (P.position16) stage_row<V, NT>(P, P.position16, base, C, keep, zs, pos_bits);
  else stage_row<V, NT>(P, P.position, base, C, keep, zs, pos_bits);
}

template <int V, int NT, class T, class A, class Keep>
__device__ __forceinline__ void unstage(const Params<T, A>& P, int64_t base, const Keep& keep,
                                        const T* zs) {
  const int C = static_cast<int>(P.C);
  if (P.position16) unstage_row<V, NT>(P, P.position16, base, C, keep, zs);
  else unstage_row<V, NT>(P, P.position, base, C, keep, zs);
}

// The flat schedule's per-segment statistics, after the L labels staged at zs.
template <class T, class A>
__device__ __forceinline__ Closed<A>* stats_after(T* zs, int L) {
  return reinterpret_cast<Closed<A>*>(reinterpret_cast<unsigned char*>(zs) + staged_z_bytes<T>(L));
}

// Windowed (flat schedule only): the row in P.n_windows windows, each a pass that reads
// the row and stages, computes and writes the window's positions; a separate kernel, so
// that the whole-row kernel keeps its registers (the windows' position tests spilled it).
template <int V, int NT, bool Flat, bool Windowed, class T, class A>
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
      const StagedRow<T, A> R{P, zw, bw, base};
      if constexpr (Flat) {
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

// Dynamic shared memory of L staged labels (the window, its bitmask) and, for the flat
// schedule, the statistics of n segments.
template <class T, class A>
constexpr int64_t window_bytes(int64_t L, int64_t n) {
  return staged_bits_bytes(L) + staged_z_bytes<T>(L) + flat_stats_bytes<A>(n);
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
// window_labels). Returns the dynamic shared memory to launch with, or 0
// when there is no host copy, a segment alone does not fit or more than kMaxWindows windows
// would be needed (unstaged kernel then).
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
    return bits + staged_z_bytes<T>(L) + flat_stats_bytes<A>(segments) <= room;
  };
  int n = 0;
  int64_t labels = 0, rest = 0;  // the longest window; the most bytes before the bitmask
  P.windows[0] = 0;
  for (int64_t k = 0; k < a.m;) {
    const int64_t k0 = k;
    while (k < a.m && fits(off[k + 1] - off[k0], k + 1 - k0)) ++k;
    if (k == k0 || n == kMaxWindows) return 0;
    labels = std::max(labels, off[k] - off[k0]);
    rest = std::max(rest, staged_z_bytes<T>(off[k] - off[k0]) + flat_stats_bytes<A>(k - k0));
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

inline bool aligned(const void* p, int64_t n) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(n) == 0;  // null is aligned
}

// Lets shl_staged_kernel<V, NT, Flat, Windowed, T, A> take `bytes` of dynamic shared memory: above 48 KiB a
// kernel must opt in; the carveout hint asks for the largest shared-memory split so that two
// blocks fit per SM (the driver may otherwise pick a split that fits only one). Done once
// per device and size (then remembered: the attributes stay set).
template <int V, int NT, bool Flat, bool Windowed, class T, class A>
cudaError_t prepare_staged(int bytes) {
  static PerDevice allowed;  // largest `bytes` prepared so far, per device
  const int dev = current_device();
  if (dev >= 0 && allowed.get(dev) >= bytes) return cudaSuccess;
  if (bytes > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(shl_staged_kernel<V, NT, Flat, Windowed, T, A>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (e != cudaSuccess) return e;
  }
  if (cudaFuncSetAttribute(shl_staged_kernel<V, NT, Flat, Windowed, T, A>,
                           cudaFuncAttributePreferredSharedMemoryCarveout,
                           cudaSharedmemCarveoutMaxShared) != cudaSuccess)
    cudaGetLastError();  // only a hint
  allowed.set(dev, bytes);
  return cudaSuccess;
}

template <int V, int NT, bool Flat, bool Windowed, class T, class A>
cudaError_t launch_staged(const Params<T, A>& P, unsigned blocks, int bytes, cudaStream_t stream) {
  const cudaError_t e = prepare_staged<V, NT, Flat, Windowed, T, A>(bytes);
  if (e != cudaSuccess) return e;
  launch_kernel(shl_staged_kernel<V, NT, Flat, Windowed, T, A>, blocks, NT, bytes, stream, P);
  return cudaSuccess;
}

template <int V, class T, class A>
cudaError_t launch_staged(const Params<T, A>& P, unsigned blocks, int bytes, int threads,
                          bool flat, cudaStream_t stream) {
  if (P.n_windows > 1) return launch_staged<V, kStagedThreads, true, true>(P, blocks, bytes, stream);
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
  cudaError_t e = prepare_staged<V, kStagedThreads, true, false, T, A>(bytes);
  if (e == cudaSuccess)
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        blocks_per_sm, shl_staged_kernel<V, kStagedThreads, true, false, T, A>, kStagedThreads,
        bytes);
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
  if (bytes) P.bits_offset = static_cast<int>(staged_z_bytes<T>(a.C) +
                                             (flat ? flat_stats_bytes<A>(a.m) : 0));
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
  part[threadIdx.x] = s;
  __syncthreads();
  for (int half = kReduceThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) *(is_loss ? loss_total : grad_eta_total + j) = part[0];
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
