// Native CPU kernel of the fused SHL loss (SPEC section 3): one pass per row gives the row
// loss and its gradient. OpenMP splits rows only and each row is computed by the same code
// whatever thread runs it, so results are bitwise independent of the thread count.
//
// Per row: collect the positives in a short list; then segment by segment u = z + delta into
// segment-ordered scratch (ignored labels -inf) fused with the segment's max, and the
// negatives' exp-sum (a segment of at least a vector block of labels at once, shorter ones
// in runs); segments are finished in groups of about kGroup positions: the null events of
// the group in one vectorised loop, the events of the segments holding positives, the
// gradient. So a segment of a few labels costs little more than its labels. Identity order
// (order == nullptr) reads z and writes grad contiguously, group by group. With an order, the
// row is first copied contiguously into an original-order scratch that the segments gather
// from, and grad is written contiguously at the end by gathering through the inverse order,
// so z and grad in memory are never touched out of order. grad may alias z: every z value
// is read before the gradient over it is written (segments do not overlap).
//
// Vectorisation report: g++ -std=gnu++17 -O3 -march=native -fno-math-errno -fopenmp
//   -Icsrc -c csrc/shl_cpu.cpp -o /dev/null -fopt-info-vec-optimized
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#ifdef SHL_WITH_OPENMP
#include <omp.h>
#endif

#include "row_sums.h"
#include "shl_args.h"
#include "shl_event.h"

#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
// GCC defaults to 256-bit vectors; the exp loop is FMA-bound and 512-bit halves it here.
#pragma GCC target("prefer-vector-width=512")
#endif

namespace shl {
namespace {

// Branch-free expf (Cephes polynomial after Cody-Waite reduction by ln 2) so that loops
// calling it vectorise. Max error 1.01 ulp on [-87.3, 0]; results below FLT_MIN
// (x < -87.34) flush to 0, -inf gives 0, NaN stays NaN. x > 88 gives +inf (2^n must fit
// the exponent field); the kernel only calls it with x - max <= 0.
inline float exp_f32(float x) {
  const float lo = -87.33654475f, hi = 88.0f;
  float xc = x < lo ? lo : x;  // comparisons with NaN are false: NaN passes through
  xc = xc > hi ? hi : xc;
  // Adding 1.5 * 2^23 rounds x*log2(e) to the nearest integer, held in the low mantissa bits.
  const float shifter = 12582912.0f;
  const float kf = xc * 1.44269504088896341f + shifter;
  const float n = kf - shifter;
  int32_t ki;
  std::memcpy(&ki, &kf, 4);
  ki -= 0x4B400000;  // bit pattern of the shifter
  float r = xc - n * 0.693359375f;  // ln 2 split in two so n * hi-part is exact
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const uint32_t sbits = static_cast<uint32_t>(ki + 127) << 23;
  float s;
  std::memcpy(&s, &sbits, 4);
  float y = p * s;
  y = x < lo ? 0.0f : y;
  y = x > hi ? std::numeric_limits<float>::infinity() : y;
  return y;
}

// Branch-free logf for positive normal x (Cephes polynomial on [sqrt(1/2), sqrt(2)) after
// splitting off the exponent), so that loops calling it vectorise: under 1 ulp there
// (checked on every 7th normal float); NaN and +inf give NaN; wrong for 0, subnormal and
// negative x, which its one caller never passes (a null event's A >= 1, or NaN). Tests of
// specials in selects kept GCC 12 from vectorising the loop; x - x (NaN for NaN and inf)
// carries NaN through without one.
inline float log_normal_f32(float x) {
  int32_t b;
  std::memcpy(&b, &x, 4);
  int32_t e = ((b >> 23) & 0xff) - 127;
  b = (b & 0x007fffff) | 0x3f800000;
  float t;
  std::memcpy(&t, &b, 4);  // the mantissa, in [1, 2)
  const bool hi = t > 1.41421356237f;
  t = hi ? t * 0.5f : t;
  e += hi;
  t -= 1.0f;
  const float t2 = t * t;
  float y = 7.0376836292E-2f;
  y = y * t - 1.1514610310E-1f;
  y = y * t + 1.1676998740E-1f;
  y = y * t - 1.2420140846E-1f;
  y = y * t + 1.4249322787E-1f;
  y = y * t - 1.6668057665E-1f;
  y = y * t + 2.0000714765E-1f;
  y = y * t - 2.4999993993E-1f;
  y = y * t + 3.3333331174E-1f;
  y = y * t * t2;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;  // ln 2 split in two, as in exp_f32
  y += -0.5f * t2;
  const float r = (t + y) + 0.693359375f * fe;
  return r + (x - x);
}

inline float exp_acc(float x) { return exp_f32(x); }
inline double exp_acc(double x) { return std::exp(x); }

// Per-thread scratch, cache-line aligned; p is null when the allocation failed (no
// exception may leave an OpenMP worksharing loop).
template <class V>
struct AlignedBuf {
  V* p = nullptr;
  explicit AlignedBuf(size_t n) {
    const size_t bytes = ((n * sizeof(V) + 63) / 64) * 64;
    p = static_cast<V*>(std::aligned_alloc(64, bytes ? bytes : 64));
  }
  ~AlignedBuf() { std::free(p); }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
};

template <class A>
struct Positive {
  int64_t posn;  // segment-ordered position
  int64_t c;     // original label id
  A u;           // z + delta
  A g;           // gradient (unscaled, before grad_scale)
};

template <class A>
struct Args {
  int64_t B, C, m;
  const uint8_t *pos, *ign;
  const int32_t* ord;  // [C] segment position -> original id; null = identity
  const int32_t* inv;  // [C] original id -> segment position; null = identity
  const int64_t* off;
  const A *w, *eta, *delta;
  A scale;
  A* loss;
  A* geta;
};

// Block width of the explicit-lane loops: one 512-bit register of acc values. Lane j of a
// block always holds element base + j, so reductions have a fixed order.
template <class A>
constexpr int kL = 64 / sizeof(A);

// Integer key with the order of the float values (for non-NaN), and back.
template <class A>
struct Key;
template <>
struct Key<float> {
  using type = int32_t;
  static int32_t of(float f) {
    int32_t b;
    std::memcpy(&b, &f, 4);
    return b ^ ((b >> 31) & 0x7fffffff);
  }
  static float value(int32_t k) {
    const int32_t b = k ^ ((k >> 31) & 0x7fffffff);
    float f;
    std::memcpy(&f, &b, 4);
    return f;
  }
};
template <>
struct Key<double> {
  using type = int64_t;
  static int64_t of(double f) {
    int64_t b;
    std::memcpy(&b, &f, 8);
    return b ^ ((b >> 63) & 0x7fffffffffffffffLL);
  }
  static double value(int64_t k) {
    const int64_t b = k ^ ((k >> 63) & 0x7fffffffffffffffLL);
    double f;
    std::memcpy(&f, &b, 8);
    return f;
  }
};

template <class T, class A, bool kIgn, bool kDelta>
inline A load(const T* z, const uint8_t* ig, const A* delta, int64_t c) {
  A u = Conv<T>::load(z[c]);
  if (kDelta) u += delta[c];
  if (kIgn) u = ig[c] ? -std::numeric_limits<A>::infinity() : u;
  return u;
}

// x[0..C) = z + delta in original order, ignored labels -inf (order given).
template <class T, class A, bool kIgn, bool kDelta>
void load_row(const T* __restrict z, const uint8_t* __restrict ig, const A* __restrict delta,
              A* __restrict x, int64_t C) {
  for (int64_t c = 0; c < C; ++c) x[c] = load<T, A, kIgn, kDelta>(z, ig, delta, c);
}

// Identity order: v[s..e) = z + delta (ignored -inf) and its max key, in one pass.
template <class T, class A, bool kIgn, bool kDelta>
typename Key<A>::type load_max(const T* __restrict z, const uint8_t* __restrict ig,
                               const A* __restrict delta, A* __restrict v, int64_t s,
                               int64_t e) {
  auto mk = Key<A>::of(-std::numeric_limits<A>::infinity());
  for (int64_t p = s; p < e; ++p) {
    const A u = load<T, A, kIgn, kDelta>(z, ig, delta, p);
    v[p] = u;
    const auto ku = Key<A>::of(u);
    mk = ku > mk ? ku : mk;
  }
  return mk;
}

// Order given: v[s..e) = x[ord[s..e)] (segment order) and its max key, in one pass.
template <class A>
typename Key<A>::type gather_max(const A* __restrict x, const int32_t* __restrict ord,
                                 A* __restrict v, int64_t s, int64_t e) {
  auto mk = Key<A>::of(-std::numeric_limits<A>::infinity());
  for (int64_t p = s; p < e; ++p) {
    const A u = x[ord[p]];
    v[p] = u;
    const auto ku = Key<A>::of(u);
    mk = ku > mk ? ku : mk;
  }
  return mk;
}

// The max key of v[s..e) (a segment's values once its positives are out).
template <class A>
typename Key<A>::type max_key(const A* __restrict v, int64_t s, int64_t e) {
  auto mk = Key<A>::of(-std::numeric_limits<A>::infinity());
  for (int64_t p = s; p < e; ++p) {
    const auto ku = Key<A>::of(v[p]);
    mk = ku > mk ? ku : mk;
  }
  return mk;
}

// Sums sm[0..2W) pairwise (halving): a fixed order.
template <class A, int W>
inline A fold(A* sm) {
  for (int j = 0; j < W; ++j) sm[j] += sm[j + W];
  if constexpr (W > 1) {
    return fold<A, W / 2>(sm);
  } else {
    return sm[0];
  }
}

// exp(v - M) in place over v[s..e); returns the sum. Blocks of L lanes, lane j always
// summing elements b + j and lanes combined in a fixed tree, so the order is fixed; the
// last partial block runs full width with its dead lanes masked (v is padded by L), so no
// exp runs in a scalar tail loop; it stores only its live lanes (the next segment's values
// are already in place).
template <class A>
inline A exp_sum(A* __restrict v, int64_t s, int64_t e, A M) {
  constexpr int L = kL<A>;
  A sm[L];
  for (int j = 0; j < L; ++j) sm[j] = 0;
  int64_t b = s;
  for (; b + L <= e; b += L) {
    for (int j = 0; j < L; ++j) {
      const A ex = exp_acc(v[b + j] - M);
      v[b + j] = ex;
      sm[j] += ex;
    }
  }
  if (b < e) {
    const int n = static_cast<int>(e - b);
    for (int j = 0; j < L; ++j) {
      const A ex = j < n ? exp_acc(v[b + j] - M) : A(0);
      if (j < n) v[b + j] = ex;
      sm[j] += ex;
    }
  }
  return fold<A, L / 2>(sm);
}

// The same for a run of short segments [k0, k1) (each shorter than kL): u - M per segment,
// then exp over the whole run in one vectorised loop, then each segment's sum one element
// after another, so that a segment of a few labels does not pay for a block of L lanes.
template <class A>
void exp_sum_short(A* __restrict v, const int64_t* off, int64_t k0, int64_t k1,
                   const A* __restrict M, A* __restrict sneg) {
  for (int64_t k = k0; k < k1; ++k)
    for (int64_t p = off[k]; p < off[k + 1]; ++p) v[p] -= M[k];
  const int64_t s = off[k0], e = off[k1];
  for (int64_t p = s; p < e; ++p) v[p] = exp_acc(v[p]);
  for (int64_t k = k0; k < k1; ++k) {
    A t = 0;
    for (int64_t p = off[k]; p < off[k + 1]; ++p) t += v[p];
    sneg[k] = t;
  }
}

// Identity order: g[s..e) = v[s..e) * f in z's dtype.
template <class T, class A>
void store_scaled(const A* __restrict v, A f, T* __restrict g, int64_t s, int64_t e) {
  for (int64_t p = s; p < e; ++p) g[p] = Conv<T>::store(v[p] * f);
}

// Order given: g[c] = v[inv[c]], contiguous writes and gathered reads from scratch.
template <class T, class A>
void store_gathered(const A* __restrict v, const int32_t* __restrict inv, T* __restrict g,
                    int64_t C) {
  for (int64_t c = 0; c < C; ++c) g[c] = Conv<T>::store(v[inv[c]]);
}

template <class A>
void scale(A* __restrict v, A f, int64_t s, int64_t e) {
  for (int64_t p = s; p < e; ++p) v[p] *= f;
}

// Sum of x[0..n) in L lanes folded in a fixed tree (the row loss over its segments).
template <class A>
A sum_lanes(const A* __restrict x, int64_t n) {
  constexpr int L = kL<A>;
  A sm[L];
  for (int j = 0; j < L; ++j) sm[j] = 0;
  int64_t b = 0;
  for (; b + L <= n; b += L)
    for (int j = 0; j < L; ++j) sm[j] += x[b + j];
  for (int j = 0; b + j < n; ++j) sm[j] += x[b + j];
  return fold<A, L / 2>(sm);
}

// A row's statistics per segment ([m] each, per-thread scratch): the stabiliser M, the
// negatives' sum of exp(u - M), exp(eta - M), the gradient factor f (grad = f * exp(u - M)
// for a negative label), the segment's loss and eta gradient (used when ShlArgs::grad_eta
// is not given), and m zeros (the null logits when ShlArgs::eta is not given).
template <class A>
struct SegRow {
  A *M, *sneg, *e_eta, *f, *loss, *geta, *zeros;
};

inline float log_null(float x) { return log_normal_f32(x); }  // x >= 1 or NaN
inline double log_null(double x) { return std::log(x); }

// The null event of a segment (SPEC section 3; right for a segment without positives,
// replaced by positive_events for the others): D = A = e_eta + sneg, loss log(A) + M - eta,
// gradient e_c / A for the labels and -sneg / A for eta, times scale.
template <class A>
struct NullEvent {
  A e_eta, f, loss, geta;
};

template <class A>
inline NullEvent<A> null_event(A eta, A M, A sneg, A scale) {
  const A e_eta = exp_acc(eta - M);
  const A Aden = e_eta + sneg;  // >= 1 (M is attained), or NaN
  const A F = A(1) / Aden;
  return {e_eta, F * scale, log_null(Aden) + M - eta, -sneg * F * scale};
}

// null_event of segments [0, m) into the arrays: one vectorised loop, whose iterations
// overlap (segment by segment, each short segment's exp, log and division waited for the
// previous one's). Not inlined: inlined into process_row, GCC 12 did not vectorise it.
template <class A>
__attribute__((noinline)) void null_events(int64_t m, const A* __restrict eta,
                                           const A* __restrict M, const A* __restrict sneg,
                                           A scale, A* __restrict e_eta, A* __restrict f,
                                           A* __restrict loss, A* __restrict geta) {
  for (int64_t k = 0; k < m; ++k) {
    const NullEvent<A> ev = null_event<A>(eta[k], M[k], sneg[k], scale);
    e_eta[k] = ev.e_eta;
    f[k] = ev.f;
    loss[k] = ev.loss;
    geta[k] = ev.geta;
  }
}

// The segments holding positives (plist[0, n), in segment order, of segments k0 and later):
// each positive c is an event, D = A + exp(u_c - M), loss w_c (log D + M - u_c) (as
// positive_event), gradient
// -w_c A / D for c, e_l * sum w_c / D for the segment's other labels and e_eta * sum w_c / D
// for eta (times scale); they replace the segment's null event.
template <class A>
void positive_events(const Args<A>& a, const SegRow<A>& r, Positive<A>* plist, size_t n,
                     int64_t k0, A* __restrict geta) {
  size_t q = 0;
  int64_t k = k0;
  while (q < n) {
    while (a.off[k + 1] <= plist[q].posn) ++k;  // the segment holding this positive
    const A M = r.M[k], Aden = r.e_eta[k] + r.sneg[k];
    // summed in double: a segment may hold thousands of positives (float32 sums of 18k
    // lost 3.5e-5 of the loss)
    double loss = 0, F = 0;
    for (; q < n && plist[q].posn < a.off[k + 1]; ++q) {
      Positive<A>& p = plist[q];
      const PositiveEvent<A> ev = positive_event(a.w ? a.w[p.c] : A(1), Aden, p.u - M);
      loss += ev.loss;
      p.g = -ev.f * Aden;  // -w A / D
      F += ev.f;
    }
    r.loss[k] = A(loss);
    r.f[k] = A(F) * a.scale;
    geta[k] = r.e_eta[k] * A(F) * a.scale;
  }
}

// Segments [k0, k1) of row i, whose negatives' sums are in r.sneg, with the positives
// plist[p0, p1): their events (r.loss, eta gradient) and their gradient (into gr, or into v
// when an order is given).
template <class T, class A>
void finish_segments(const Args<A>& a, const SegRow<A>& r, int64_t i, int64_t k0, int64_t k1,
                     std::vector<Positive<A>>& plist, size_t p0, size_t p1, A* v, T* gr) {
  // (the eta gradient goes to scratch when not asked for: no branch in the loops)
  A* geta = a.geta ? a.geta + i * a.m : r.geta;
  null_events<A>(k1 - k0, (a.eta ? a.eta : r.zeros) + k0, r.M + k0, r.sneg + k0, a.scale,
                 r.e_eta + k0, r.f + k0, r.loss + k0, geta + k0);
  positive_events<A>(a, r, plist.data() + p0, p1 - p0, k0, geta);
  for (int64_t k = k0; k < k1; ++k) {
    if (a.ord) scale<A>(v, r.f[k], a.off[k], a.off[k + 1]);
    else store_scaled<T, A>(v, r.f[k], gr, a.off[k], a.off[k + 1]);
  }
  for (size_t q = p0; q < p1; ++q) {
    const Positive<A>& p = plist[q];
    if (a.ord) v[p.posn] = p.g * a.scale;
    else gr[p.c] = Conv<T>::store(p.g * a.scale);
  }
}

// Positions per group of segments finished together (see process_row): 4 KB of fp32 values.
constexpr int64_t kGroup = 1024;

// One row. zr and gr may be the same row (in-place): every z value a segment needs is read
// before that segment's gradient is written, and segments do not overlap.
template <class T, class A, bool kIgn, bool kDelta>
void process_row(const Args<A>& a, const T* zr, T* gr, int64_t i, A* x, A* v,
                 const SegRow<A>& r, std::vector<Positive<A>>& plist) {
  const A ninf = -std::numeric_limits<A>::infinity();
  const int64_t C = a.C;
  const uint8_t* pr = a.pos + i * C;
  const uint8_t* ir = kIgn ? a.ign + i * C : nullptr;

  if (a.ord) load_row<T, A, kIgn, kDelta>(zr, ir, a.delta, x, C);

  // Positives (not ignored), skipping 64 zero flags at a time.
  plist.clear();
  auto add = [&](int64_t c) {
    if (kIgn && ir[c]) return;
    const A u = a.ord ? x[c] : load<T, A, false, kDelta>(zr, ir, a.delta, c);
    plist.push_back({a.inv ? a.inv[c] : c, c, u, A(0)});
  };
  int64_t c = 0;
  for (; c + 64 <= C; c += 64) {
    uint64_t any = 0;
    for (int k = 0; k < 8; ++k) {
      uint64_t word;
      std::memcpy(&word, pr + c + 8 * k, 8);
      any |= word;
    }
    if (!any) continue;
    for (int k = 0; k < 64; ++k)
      if (pr[c + k]) add(c + k);
  }
  for (; c < C; ++c)
    if (pr[c]) add(c);
  if (a.inv) {  // into segment order; usually a handful, so insertion sort
    auto less = [](const Positive<A>& p, const Positive<A>& q) { return p.posn < q.posn; };
    if (plist.size() > 32) {
      std::sort(plist.begin(), plist.end(), less);
    } else {
      for (size_t j = 1; j < plist.size(); ++j)
        for (size_t k = j; k > 0 && less(plist[k], plist[k - 1]); --k)
          std::swap(plist[k], plist[k - 1]);
    }
  }

  // Segment by segment: u in segment order and the stabiliser M = max(max u, eta) over the
  // negatives (see positive_event), then the negatives' sum: at once for a segment of at least a
  // block of lanes, in runs for shorter ones (exp_sum_short). Segments are finished (events,
  // gradient) in groups of about kGroup positions, the events of a group in one vectorised
  // loop. Segment by segment, each short segment cost ~75 ns (a block of exp lanes, a tree
  // of sums, a chain of exp, log and division); now a segment of a few labels costs little
  // more than its labels.
  size_t pi = 0;   // first positive not yet dropped from the sums
  size_t gp = 0;   // first positive of the group
  int64_t g0 = 0;  // first segment of the group
  int64_t k0 = 0;  // first segment of the pending run of short ones
  // Positives leave the negatives' sums and max: their slots become -inf (exp -> 0).
  const size_t npos = plist.size();
  int64_t next_pos = npos ? plist[0].posn : INT64_MAX;  // position of plist[pi]
  for (int64_t k = 0; k < a.m; ++k) {
    const int64_t s = a.off[k], e = a.off[k + 1];
    auto mk = a.ord ? gather_max<A>(x, a.ord, v, s, e)
                    : load_max<T, A, kIgn, kDelta>(zr, ir, a.delta, v, s, e);
    if (next_pos < e) {  // a segment holding positives: a second pass for the max without them
      for (; pi < npos && plist[pi].posn < e; ++pi) v[plist[pi].posn] = ninf;
      next_pos = pi < npos ? plist[pi].posn : INT64_MAX;
      // Floored at the lowest finite value (a NaN key stays above it): a segment of
      // positives alone with eta = -inf gets A = 0 (loss 0), not exp(-inf - -inf) = NaN.
      // (Only here: the floor applied to every segment made rows of thousands of segments
      // up to 2x slower, with no change in the vectorisation report.)
      const auto floor = Key<A>::of(std::numeric_limits<A>::lowest());
      const auto rest = max_key<A>(v, s, e);
      mk = rest > floor ? rest : floor;
    }
    // A group's gradient is written in one burst at its end: without asking for its cache
    // lines early the stores stalled (a row of 64 segments 15% slower than segment by
    // segment; with the prefetch 7% faster).
    if (!a.ord)
      for (int64_t p = s; p < e; p += 64 / sizeof(T)) __builtin_prefetch(gr + p, 1, 3);
    // A NaN key may win or lose the max (a float max would not vectorise without
    // -ffinite-math-only); either way the NaN reaches the sums below, so the loss is NaN.
    const A umax = Key<A>::value(mk);
    const A eta = a.eta ? a.eta[k] : A(0);
    r.M[k] = umax > eta ? umax : eta;
    const bool last = k + 1 == a.m || e - a.off[g0] >= kGroup;
    if (e - s >= kL<A>) {
      if (k0 < k) exp_sum_short<A>(v, a.off, k0, k, r.M, r.sneg);
      r.sneg[k] = exp_sum<A>(v, s, e, r.M[k]);
      k0 = k + 1;
    } else if (last) {
      exp_sum_short<A>(v, a.off, k0, k + 1, r.M, r.sneg);
      k0 = k + 1;
    }
    if (last) {
      finish_segments<T, A>(a, r, i, g0, k + 1, plist, gp, pi, v, gr);
      g0 = k + 1;
      gp = pi;
    }
  }
  a.loss[i] = sum_lanes<A>(r.loss, a.m) * a.scale;
  if (a.ord) store_gathered<T, A>(v, a.inv, gr, C);
}

template <class T, class A>
const char* run(const ShlArgs& sa, const int32_t* ord, const int32_t* inv) {
  constexpr int L = kL<A>;
  Args<A> a{sa.B, sa.C, sa.m, sa.pos, sa.ign, ord, inv, sa.offsets,
            static_cast<const A*>(sa.w), static_cast<const A*>(sa.eta),
            static_cast<const A*>(sa.delta), static_cast<A>(sa.grad_scale),
            static_cast<A*>(sa.loss), static_cast<A*>(sa.grad_eta)};
  const T* z = static_cast<const T*>(sa.z);
  T* g = static_cast<T*>(sa.grad);
  const int64_t B = a.B, C = a.C;
  int failed = 0;
#ifdef SHL_WITH_OPENMP
  const int nt = sa.num_threads > 0 ? sa.num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(nt) if (nt > 1 && B > 1) reduction(| : failed)
#endif
  {
    // v is padded by one block: exp_sum's masked lanes past a segment's end stay in bounds.
    AlignedBuf<A> x(a.ord ? C : 0), v(C + L), stats(7 * a.m);
    if (v.p) std::fill(v.p + C, v.p + C + L, A(0));
    A* s = stats.p;
    const SegRow<A> r{s, s + a.m, s + 2 * a.m, s + 3 * a.m, s + 4 * a.m, s + 5 * a.m,
                      s + 6 * a.m};
    if (s) std::fill(r.zeros, r.zeros + a.m, A(0));
    std::vector<Positive<A>> plist;
#ifdef SHL_WITH_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t i = 0; i < B; ++i) {
      if (!x.p || !v.p || !stats.p) {
        failed = 1;
        continue;
      }
      try {
        const T* zr = z + i * C;
        T* gr = g + i * C;
        if (a.ign) {
          if (a.delta) process_row<T, A, true, true>(a, zr, gr, i, x.p, v.p, r, plist);
          else process_row<T, A, true, false>(a, zr, gr, i, x.p, v.p, r, plist);
        } else {
          if (a.delta) process_row<T, A, false, true>(a, zr, gr, i, x.p, v.p, r, plist);
          else process_row<T, A, false, false>(a, zr, gr, i, x.p, v.p, r, plist);
        }
      } catch (const std::bad_alloc&) {
        failed = 1;
      }
    }
  }
  return failed ? "shl_fused_cpu: out of memory for the per-thread scratch" : nullptr;
}

// int32 copies of order and of its inverse (half the index traffic of int64), built after
// checking that order is a permutation (the kernel indexes with it unchecked). Building
// costs about as much as a row, so the last order seen by this calling thread is kept and
// reused when its contents are unchanged (one memcmp).
struct OrderIndex {
  std::vector<int64_t> order;
  std::vector<int32_t> ord, inv;
};

// Null when order is not a permutation of 0..C-1; may throw std::bad_alloc.
const OrderIndex* order_index(const int64_t* order, int64_t C) {
  thread_local OrderIndex cache;
  const size_t n = static_cast<size_t>(C);
  if (cache.order.size() == n && std::memcmp(cache.order.data(), order, n * 8) == 0)
    return &cache;
  cache.order.clear();  // invalid until fully rebuilt
  cache.ord.assign(n, 0);
  cache.inv.assign(n, -1);
  for (int64_t p = 0; p < C; ++p) {
    const int64_t c = order[p];
    if (c < 0 || c >= C || cache.inv[c] >= 0) return nullptr;
    cache.ord[p] = static_cast<int32_t>(c);
    cache.inv[c] = static_cast<int32_t>(p);
  }
  cache.order.assign(order, order + n);
  return &cache;
}

// ShlArgs::loss_total and grad_eta_total, when asked: the sums over rows, rows in order
// (deterministic), accumulated in double (fp32 rows: more accurate than an fp32 sum).
template <class A>
void sum_rows(const ShlArgs& a) {
  if (a.loss_total)
    sum_in_order(static_cast<const A*>(a.loss), a.B, 1.0, static_cast<A*>(a.loss_total));
  if (a.grad_eta_total) {
    const A* g = static_cast<const A*>(a.grad_eta);
    std::vector<double> t(static_cast<size_t>(a.m), 0.0);
    for (int64_t i = 0; i < a.B; ++i)
      for (int64_t k = 0; k < a.m; ++k) t[k] += g[i * a.m + k];
    A* out = static_cast<A*>(a.grad_eta_total);
    for (int64_t k = 0; k < a.m; ++k) out[k] = static_cast<A>(t[k]);
  }
}

void sum_rows(const ShlArgs& a) {
  if (a.z_dtype == DType::kF64) sum_rows<double>(a);
  else sum_rows<float>(a);
}

const char* run_and_sum(const ShlArgs& a, const int32_t* o, const int32_t* iv) {
  const char* err = nullptr;
  switch (a.z_dtype) {
    case DType::kF32: err = run<float, float>(a, o, iv); break;
    case DType::kF64: err = run<double, double>(a, o, iv); break;
    case DType::kBF16: err = run<BF16, float>(a, o, iv); break;
    case DType::kF16: err = run<F16, float>(a, o, iv); break;
    default: return "z: unsupported dtype (float32, float64, float16, bfloat16)";
  }
  if (!err) sum_rows(a);
  return err;
}

}  // namespace

const char* shl_fused_cpu(const ShlArgs& a) {
  if (a.B < 0 || a.C < 0 || a.m < 0) return "shl_fused_cpu: negative size";
  if (!a.offsets) return "offsets: required";
  if (a.B > 0 && !a.loss) return "loss: required";
  if (a.B > 0 && a.C > 0 && (!a.z || !a.pos || !a.grad))
    return "shl_fused_cpu: z, pos and grad are required";
  if (a.C > INT32_MAX) return "shl_fused_cpu: more than 2^31 - 1 labels";
  if (a.offsets[0] != 0 || a.offsets[a.m] != a.C) return "offsets: must start at 0 and end at C";
  for (int64_t k = 0; k < a.m; ++k)
    if (a.offsets[k + 1] < a.offsets[k]) return "offsets: must not decrease";
  if (a.B == 0) {
    sum_rows(a);  // sums of no rows: 0
    return nullptr;
  }

  const OrderIndex* idx = nullptr;
  if (a.order && a.C > 0) {
    try {
      idx = order_index(a.order, a.C);
    } catch (const std::bad_alloc&) {
      return "shl_fused_cpu: out of memory for the order index";
    }
    if (!idx) return "order: must be a permutation of 0..C-1";
  }
  const int32_t* o = idx ? idx->ord.data() : nullptr;
  const int32_t* iv = idx ? idx->inv.data() : nullptr;
  return run_and_sum(a, o, iv);
}

}  // namespace shl
