// The flat schedule of a staged row (row_loss_flat) and the windows of rows larger than
// shared memory.
// Part of csrc/shl_cuda.cu, included only there (its helpers live in the same
// anonymous namespace).
#pragma once
#include "shl_cuda_passes.cuh"

namespace shl {
namespace {

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
// The passes' loops step over a thread's range in runs of kFlatRun positions: a run inside
// one segment (the usual case: segments are hundreds of labels, a thread's range tens) takes
// accumulate_run / gradient_run, one boundary test and one max test for the run; a run
// holding a segment's end or the range's end goes label by label. Every lane of a warp
// takes the same number of runs, so the lanes stay in step (see row_loss_flat).
constexpr int kFlatRun = 4;

// Steps p over [a, b) as both passes do: run(p) for a run of kFlatRun positions inside one
// segment, else one(p) label by label up to the next run's start, after next(p) where a
// segment ends at p. next updates s1 (the caller's end of the current segment, read here
// through the reference).
template <class Run, class One, class Next>
__device__ __forceinline__ void step_in_runs(int a, int b, const int& s1, Run run, One one,
                                             Next next) {
  int lim = s1 < b ? s1 : b;  // runs end at the segment's end or the range's
  for (int p = a;;) {
    if (p + kFlatRun <= lim) {  // the usual case tests p alone
      run(p);
      p += kFlatRun;
      continue;
    }
    if (p >= b) break;
    const int e = p + kFlatRun < b ? p + kFlatRun : b;
#pragma unroll 1
    for (; p < e; ++p) {
      if (p == s1) next(p);
      one(p);
    }
    lim = s1 < b ? s1 : b;
  }
}

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
template <int NT, class T, class A, class Row>
__device__ A row_loss_flat(const Params<T, A>& P, const Row& R, int64_t row,
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
    step_in_runs(
        r.a, r.b, s1, [&](int p) { accumulate_run<kFlatRun>(R, p, x); },
        [&](int p) { accumulate_one(R, p, x); },
        [&](int p) {
          settle(p);
          do ++k; while (offset(k + 1) <= p);  // skips empty segments
          s0 = p, s1 = offset(k + 1), ps = p, eta = eta_of(k);
          x = X::start(eta);
        });
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
    Closed<A> c = scaled_for_gradients(stats[k - W.k0], P.scale);
    step_in_runs(
        r.a, r.b, s1, [&](int p) { gradient_run<kFlatRun>(R, p, c); },
        [&](int p) { gradient_one(R, p, c); },
        [&](int p) {
          positive_gradients(R, ps, p, 0, 1, c);
          do ++k; while (offset(k + 1) <= p);
          s1 = offset(k + 1), ps = p;
          c = scaled_for_gradients(stats[k - W.k0], P.scale);
        });
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

}  // namespace
}  // namespace shl
