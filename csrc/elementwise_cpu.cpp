// CPU fused elementwise losses (see elementwise.h): OpenMP over rows; each row goes in chunks
// through one branch-free loop over arrays (convert, formula, select for ignore) that GCC
// vectorises, libm calls included where glibc has SIMD variants (libmvec).

// No FP-exception traps, so that GCC may if-convert (select) floating-point code under a
// condition; results, NaN and inf included, are unchanged. Set for the whole file so that
// every inlined function agrees.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <math.h>

#include <algorithm>
#include <vector>

// glibc's libmvec has SIMD variants of these; declaring them lets GCC vectorise the loop.
// (glibc declares them itself only under -ffast-math, which would break NaN handling.)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
#if __GLIBC_PREREQ(2, 35)
#define SHL_SIMD_MATH __attribute__((__simd__("notinbranch")))
extern "C" {
float expf(float) SHL_SIMD_MATH;
float logf(float) SHL_SIMD_MATH;
float log1pf(float) SHL_SIMD_MATH;
double exp(double) SHL_SIMD_MATH;
double log(double) SHL_SIMD_MATH;
double log1p(double) SHL_SIMD_MATH;
}
#endif
#endif

#include "dtype.h"
#include "elementwise.h"
#include "row_sums.h"

// With AVX-512, 512-bit vectors for the loops below (GCC's default for -march=native is 256):
// the math calls (libmvec's 16-lane variants) and selects halve in number. ~1.5x on a Xeon
// with AVX-512 (Ice Lake class).
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#pragma GCC target("prefer-vector-width=512")
#endif

#ifdef SHL_WITH_OPENMP
#include <omp.h>
#endif

namespace shl {
namespace {

constexpr int64_t kChunk = 256;
constexpr int64_t kSerialBelow = 1 << 15;  // elements; smaller problems skip the thread start

template <DType ZT, ElemKind K, PowMode PM, bool Clip>
void run(const ElemArgs& a) {
  using S = typename HostStorage<ZT>::type;
  using Tr = Conv<S>;
  using A = typename Tr::A;
  const ElemCoef<A> c(a.p);
  const int64_t B = a.B, C = a.C;
  // Per-label weights of the positive / negative term, and an all-zero ignore row when
  // there is no ignore mask, so that the loops below load unconditionally.
  std::vector<A> a_pos(C), a_neg(C);
  const A* wt = static_cast<const A*>(a.weight);
  const A* pw = static_cast<const A*>(a.pos_weight);
  for (int64_t j = 0; j < C; ++j) {
    const A w = wt ? wt[j] : A(1);
    a_pos[j] = (pw ? w * pw[j] : w) * c.alpha_pos;
    a_neg[j] = w * c.alpha_neg;
  }
  const std::vector<uint8_t> no_ign(a.ign ? 0 : C, 0);
  const S* z = static_cast<const S*>(a.z);
  A* rows = static_cast<A*>(a.loss_rows);
  S* lel = static_cast<S*>(a.loss_el);
  S* g = static_cast<S*>(a.grad);
  const A gscale = A(a.grad_scale);
  const A* ap = a_pos.data();
  const A* an = a_neg.data();
#ifdef SHL_WITH_OPENMP
  const int nt = a.num_threads > 0 ? a.num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(nt) if (B * C >= kSerialBelow)
#endif
  for (int64_t i = 0; i < B; ++i) {
    const S* zr = z + i * C;
    const uint8_t* yr = a.pos + i * C;
    const uint8_t* ir = a.ign ? a.ign + i * C : no_ign.data();
    const ElemCoef<A> cr = c;  // a private copy: loads from the shared one are not hoisted
    A zb[kChunk], yb[kChunk], sb[kChunk], lb[kChunk], gb[kChunk];
    A sum = A(0);
    for (int64_t j0 = 0; j0 < C; j0 += kChunk) {
      const int64_t n = std::min(kChunk, C - j0);
      // Inputs as A first: with bytes in the main loop GCC finds no vector shape for mixed
      // 1- and 8-byte lanes (AVX-512, float64), and fp16 conversions do not vectorise.
      for (int64_t k = 0; k < n; ++k) {
        zb[k] = Tr::load(zr[j0 + k]);
        yb[k] = yr[j0 + k] ? A(1) : A(0);
        sb[k] = ir[j0 + k] ? A(1) : A(0);
      }
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        const int64_t j = j0 + k;
        const A yf = yb[k];
        const bool y = yf != A(0);
        A l, gr;
        // Exact for finite weights (x * 1 + w * 0 = x); a select here would become masked
        // loads that GCC does not vectorise.
        elem_loss_grad<K, A, PM, Clip>(zb[k], y, ap[j] * yf + an[j] * (A(1) - yf), cr, l, gr);
        const bool skip = sb[k] != A(0);
        lb[k] = skip ? A(0) : l;
        gb[k] = skip ? A(0) : gr * gscale;
      }
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < n; ++k) sum += lb[k];
      if (lel)
        for (int64_t k = 0; k < n; ++k) lel[i * C + j0 + k] = Tr::store(lb[k]);
      if (g)
        for (int64_t k = 0; k < n; ++k) g[i * C + j0 + k] = Tr::store(gb[k]);
    }
    if (rows) rows[i] = sum;
  }
}

// The variant of the formula, chosen once per call: integer exponents by multiplication
// (the defaults: focal gamma 2, ASL gamma_pos 1 and gamma_neg 4) and ASL without clip.
template <DType ZT, ElemKind K, bool Clip>
void run_pow(const ElemArgs& a) {
  if (ElemCoef<double>(a.p).int_exps) return run<ZT, K, PowMode::kInt, Clip>(a);
  return run<ZT, K, PowMode::kAny, Clip>(a);
}

template <DType ZT>
void run_kind(const ElemArgs& a) {
  switch (a.kind) {
    case ElemKind::kBCE: return run<ZT, ElemKind::kBCE, PowMode::kAny, true>(a);
    case ElemKind::kFocal: return run_pow<ZT, ElemKind::kFocal, true>(a);
    case ElemKind::kASL:
      if (a.p.clip == 0) return run_pow<ZT, ElemKind::kASL, false>(a);
      return run_pow<ZT, ElemKind::kASL, true>(a);
  }
}

}  // namespace

const char* elementwise_fused_cpu(const ElemArgs& a) {
  if (a.B < 0 || a.C < 0) return "elementwise_fused_cpu: negative B or C";
  if (a.kind != ElemKind::kBCE && a.kind != ElemKind::kFocal && a.kind != ElemKind::kASL)
    return "elementwise_fused_cpu: unknown loss kind";
  if (!a.loss_rows && !a.loss_el) return "elementwise_fused_cpu: no loss output";
  if (a.loss_total && !a.loss_rows) return "elementwise_fused_cpu: loss_total needs loss_rows";
  if (a.B * a.C > 0 && (!a.z || !a.pos)) return "elementwise_fused_cpu: z and pos are required";
  switch (a.z_type) {
    case DType::kF32: run_kind<DType::kF32>(a); break;
    case DType::kF64: run_kind<DType::kF64>(a); break;
    case DType::kF16: run_kind<DType::kF16>(a); break;
    case DType::kBF16: run_kind<DType::kBF16>(a); break;
    default: return "elementwise_fused_cpu: unsupported logits dtype";
  }
  if (a.loss_total) {
    if (a.z_type == DType::kF64)
      sum_in_order(static_cast<const double*>(a.loss_rows), a.B, a.grad_scale,
                   static_cast<double*>(a.loss_total));
    else
      sum_in_order(static_cast<const float*>(a.loss_rows), a.B, a.grad_scale,
                   static_cast<float*>(a.loss_total));
  }
  return nullptr;
}

}  // namespace shl
