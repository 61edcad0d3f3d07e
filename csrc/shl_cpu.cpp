// Native CPU kernel of the fused SHL loss (SPEC section 3): one pass per row gives the row
// loss and its gradient. OpenMP splits rows only and each row is computed by the same code
// whatever thread runs it, so results are bitwise independent of the thread count.
//
// Per row: collect the positives in a short list; then per segment: u = z + delta into
// segment-ordered scratch (ignored labels -inf) fused with the max, exp-sum over the
// negatives, the positive (or null) events, and the gradient. Identity order (order ==
// nullptr) reads z and writes grad contiguously, segment by segment. With an order, the row
// is first copied contiguously into an original-order scratch that the segments gather
// from, and grad is written contiguously at the end by gathering through the inverse order,
// so z and grad in memory are never touched out of order. grad may alias z: every z value
// is read before the gradient over it is written.
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
// last partial block runs full width with its dead lanes masked (scratch is padded by L),
// so no exp runs in a scalar tail loop.
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
    // Slots past e are dead here (later segments fill their own afterwards): store all.
    const int n = static_cast<int>(e - b);
    for (int j = 0; j < L; ++j) {
      const A ex = j < n ? exp_acc(v[b + j] - M) : A(0);
      v[b + j] = ex;
      sm[j] += ex;
    }
  }
  return fold<A, L / 2>(sm);
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

// One row. zr and gr may be the same row (in-place): every z value a segment needs is
// read before that segment's gradient is written, and segments do not overlap.
template <class T, class A, bool kIgn, bool kDelta>
void process_row(const Args<A>& a, const T* zr, T* gr, int64_t i, A* x, A* v,
                 std::vector<Positive<A>>& plist) {
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

  A row_loss = 0;
  size_t pi = 0;
  for (int64_t k = 0; k < a.m; ++k) {
    const int64_t s = a.off[k], e = a.off[k + 1];
    const A eta = a.eta ? a.eta[k] : A(0);
    const auto mk = a.ord ? gather_max<A>(x, a.ord, v, s, e)
                          : load_max<T, A, kIgn, kDelta>(zr, ir, a.delta, v, s, e);
    // A NaN key may win or lose the max (a float max would not vectorise without
    // -ffinite-math-only); either way the NaN reaches the sums below, so the loss is NaN.
    const A umax = Key<A>::value(mk);
    const A M = umax > eta ? umax : eta;

    // Positives leave the negatives' sum: their slots become -inf (exp -> 0).
    const size_t p0 = pi;
    while (pi < plist.size() && plist[pi].posn < e) v[plist[pi++].posn] = ninf;
    const size_t p1 = pi;

    const A sneg = exp_sum<A>(v, s, e, M);
    const A e_eta = exp_acc(eta - M);
    const A Aden = e_eta + sneg;
    A F, g_eta;
    if (p0 == p1) {  // null event: D = A, g_c = e_c / D, g_eta = e_eta / D - 1 = -sneg / D
      F = A(1) / Aden;
      row_loss += std::log(Aden) + M - eta;
      g_eta = -sneg * F;
    } else {
      F = 0;
      for (size_t q = p0; q < p1; ++q) {
        Positive<A>& p = plist[q];
        const A wp = a.w ? a.w[p.c] : A(1);
        const A D = Aden + exp_acc(p.u - M);
        row_loss += wp * (std::log(D) + M - p.u);
        p.g = -wp * Aden / D;
        F += wp / D;
      }
      g_eta = e_eta * F;
    }
    if (a.geta) a.geta[i * a.m + k] = g_eta * a.scale;

    const A f = F * a.scale;
    if (a.ord) {
      scale<A>(v, f, s, e);
      for (size_t q = p0; q < p1; ++q) v[plist[q].posn] = plist[q].g * a.scale;
    } else {
      store_scaled<T, A>(v, f, gr, s, e);
      for (size_t q = p0; q < p1; ++q) gr[plist[q].c] = Conv<T>::store(plist[q].g * a.scale);
    }
  }
  a.loss[i] = row_loss * a.scale;
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
    AlignedBuf<A> x(a.ord ? C : 0), v(C + L);
    if (v.p) std::fill(v.p + C, v.p + C + L, A(0));
    std::vector<Positive<A>> plist;
#ifdef SHL_WITH_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t i = 0; i < B; ++i) {
      if (!x.p || !v.p) {
        failed = 1;
        continue;
      }
      try {
        const T* zr = z + i * C;
        T* gr = g + i * C;
        if (a.ign) {
          if (a.delta) process_row<T, A, true, true>(a, zr, gr, i, x.p, v.p, plist);
          else process_row<T, A, true, false>(a, zr, gr, i, x.p, v.p, plist);
        } else {
          if (a.delta) process_row<T, A, false, true>(a, zr, gr, i, x.p, v.p, plist);
          else process_row<T, A, false, false>(a, zr, gr, i, x.p, v.p, plist);
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
