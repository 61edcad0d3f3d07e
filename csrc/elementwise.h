// Fused elementwise multi-label losses (BCE, sigmoid focal, asymmetric): loss and dl/dz of
// one (row, label) pair, shared by the CPU (elementwise_cpu.cpp) and CUDA
// (elementwise_cuda.cu) kernels, plus the arguments of one fused pass.
#pragma once
#include <math.h>
#include <stdint.h>

#include "dtype.h"

#ifdef __CUDACC__
#define SHL_HD __host__ __device__ __forceinline__
#else
#define SHL_HD inline
#endif

namespace shl {

enum class ElemKind : int { kBCE = 0, kFocal = 1, kASL = 2 };

struct ElemParams {
  double alpha = -1.0;  // focal: weight of positives (negatives: 1 - alpha); < 0 = none
  double gamma = 0.0;   // focal exponent
  double gamma_pos = 0.0, gamma_neg = 0.0;  // ASL exponents
  double clip = 0.0;    // ASL probability margin of negatives (0 = off)
  double eps = 1e-8;    // ASL clamp inside the logs
  bool detach = false;  // ASL: focal weight treated as a constant in the gradient
};

struct ElemArgs {
  const void* z = nullptr;  // [B, C] logits, dtype z_type
  DType z_type = DType::kF32;  // the accumulation dtype is float64 for kF64, else float32
  int64_t B = 0, C = 0;
  const uint8_t* pos = nullptr;         // [B, C] nonzero = positive
  const uint8_t* ign = nullptr;         // [B, C] nonzero = ignored (loss and grad 0); null = none
  const void* weight = nullptr;         // [C] acc, multiplies every term of label c; null = 1
  const void* pos_weight = nullptr;     // [C] acc, multiplies the positive term; null = 1
  ElemKind kind = ElemKind::kBCE;
  ElemParams p;
  double grad_scale = 1.0;              // multiplies grad (1/(B*C) for "mean")
  void* loss_rows = nullptr;            // out [B] acc: per-row sum of the losses; null = skip
  void* loss_total = nullptr;           // out 0-dim acc: grad_scale * the sum of the row
                                        // losses, rows in order (needs loss_rows); null = skip
  void* loss_el = nullptr;              // out [B, C] z dtype: the losses; null = skip
  void* grad = nullptr;                 // out [B, C] z dtype: grad_scale * dl/dz; null = skip
  int num_threads = 0;                  // CPU: OpenMP threads (0 = runtime default)
  int device = -1;                      // CUDA: device of the tensors; -1 = ask the driver
};

// Return nullptr on success, else a static error message.
const char* elementwise_fused_cpu(const ElemArgs& a);
#ifdef SHL_WITH_CUDA
const char* elementwise_fused_cuda(const ElemArgs& a, void* stream);
#endif

// C math overloads that exist on host and device alike.
SHL_HD float m_exp(float x) { return expf(x); }
SHL_HD double m_exp(double x) { return exp(x); }
SHL_HD float m_log(float x) { return logf(x); }
SHL_HD double m_log(double x) { return log(x); }
SHL_HD float m_log1p(float x) { return log1pf(x); }
SHL_HD double m_log1p(double x) { return log1p(x); }
SHL_HD float m_abs(float x) { return fabsf(x); }
SHL_HD double m_abs(double x) { return fabs(x); }
template <class T>
SHL_HD T m_max0(T x) { return x > T(0) ? x : T(0); }  // NaN -> 0: callers add a NaN-carrying term

// Exponent n of m_ipow: a small non-negative integer (0..15) given by its bits, each 1 or 0
// as a T (not a bool: GCC does not vectorise a select on a loop-invariant bool).
template <class T>
struct IntExp {
  T b1, b2, b4, b8;
  SHL_HD IntExp() : b1(0), b2(0), b4(0), b8(0) {}
  explicit IntExp(double n)  // n: an integer in [0, kMaxIntExp]
      : b1(T(int(n) & 1)), b2(T((int(n) >> 1) & 1)), b4(T((int(n) >> 2) & 1)),
        b8(T((int(n) >> 3) & 1)) {}
};
constexpr int kMaxIntExp = 15;
inline bool is_int_exp(double g) { return g >= 0 && g <= kMaxIntExp && g == double(int(g)); }

// b^n by repeated squaring, branch-free (selects on the bits of n): a few ulp from pow, and
// b^0 = 1 for every b (NaN and 0 included), as pow.
template <class T>
SHL_HD T m_ipow(T b, const IntExp<T>& n) {
  const T b2 = b * b, b4 = b2 * b2, b8 = b4 * b4;
  T r = n.b1 != T(0) ? b : T(1);
  r = n.b2 != T(0) ? r * b2 : r;
  r = n.b4 != T(0) ? r * b4 : r;
  r = n.b8 != T(0) ? r * b8 : r;
  return r;
}

// How the focal weights (powers with the exponents gamma, gamma_pos, gamma_neg) are taken:
// kAny, any exponent, as exp(gamma * log(base)) from logs the formula has anyway; kInt,
// exponents that are integers in [0, kMaxIntExp] (ElemCoef::int_exps), by multiplication.
enum class PowMode : int { kAny = 0, kInt = 1 };

// Loss parameters converted once to the accumulation type.
template <class T>
struct ElemCoef {
  T alpha_pos, alpha_neg, gamma, gamma_pos, gamma_neg, clip, eps, log_eps;
  T focal_grad;  // 0 when the ASL focal weight is detached, else 1 (a T, not a bool: GCC
                 // does not vectorise a select on a loop-invariant bool)
  // Integer exponents for PowMode::kInt: gamma (focal), gamma_pos, gamma_neg and
  // gamma_neg - 1 (ASL; 0 when gamma_neg is 0).
  IntExp<T> n_gamma, n_pos, n_neg, n_neg1;
  bool int_exps;  // the exponents of the loss kind all allow PowMode::kInt
  explicit ElemCoef(const ElemParams& p)
      : alpha_pos(p.alpha < 0 ? T(1) : T(p.alpha)), alpha_neg(p.alpha < 0 ? T(1) : T(1 - p.alpha)),
        gamma(T(p.gamma)), gamma_pos(T(p.gamma_pos)), gamma_neg(T(p.gamma_neg)), clip(T(p.clip)),
        eps(T(p.eps)), log_eps(T(log(p.eps))), focal_grad(p.detach ? T(0) : T(1)),
        int_exps(is_int_exp(p.gamma) && is_int_exp(p.gamma_pos) && is_int_exp(p.gamma_neg)) {
    if (int_exps) {
      n_gamma = IntExp<T>(p.gamma);
      n_pos = IntExp<T>(p.gamma_pos);
      n_neg = IntExp<T>(p.gamma_neg);
      n_neg1 = IntExp<T>(p.gamma_neg >= 1 ? p.gamma_neg - 1 : 0.0);
    }
  }
};

// Loss and dl/dz of one pair with logit z, target y and the pair's weight a (label weight,
// times pos_weight or the focal alpha of its side). Built from one exp and one log1p (or log)
// of -|z| so that nothing cancels for large |z|; NaN in z gives NaN loss and grad.
// Branch-free: every math call runs unconditionally and results are selected, so that the CPU
// loop vectorises (with SIMD libm variants) and CUDA threads do not diverge.
// PM = kInt needs c.int_exps; Clip = false (ASL) needs c.clip == 0. The defaults take any
// parameters.
template <ElemKind Kind, class T, PowMode PM = PowMode::kAny, bool Clip = true>
SHL_HD void elem_loss_grad(T z, bool y, T a, const ElemCoef<T>& c, T& loss, T& grad) {
  if (Kind == ElemKind::kBCE || Kind == ElemKind::kFocal) {
    // Both are functions of s = the logit pointing away from the target.
    const T s = y ? -z : z;
    const T e = m_exp(-m_abs(s));
    const T l1 = m_log1p(e);
    const T r = T(1) / (T(1) + e);
    const T sig_s = s >= T(0) ? r : e * r;   // sigmoid(s) = 1 - p_t
    const T sig_ms = s >= T(0) ? e * r : r;  // sigmoid(-s) = p_t
    const T sp = m_max0(s) + l1;             // softplus(s) = BCE of the pair
    T gs;
    if (Kind == ElemKind::kBCE) {
      loss = a * sp;
      gs = a * sig_s;
    } else {
      // (1 - p_t)^gamma = exp(-gamma * softplus(-s)); gamma = 0 gives exactly 1.
      T w;
      if (PM == PowMode::kInt) {
        w = m_ipow(sig_s, c.n_gamma);
      } else {
        const T pw = m_exp(-c.gamma * (m_max0(-s) + l1));
        w = c.gamma == T(0) ? T(1) : pw;
      }
      loss = a * w * sp;
      gs = a * w * (c.gamma * sig_ms * sp + sig_s);
    }
    grad = y ? -gs : gs;
  } else {
    const T e = m_exp(-m_abs(z));
    const T r = T(1) / (T(1) + e);
    const T p = z >= T(0) ? r : e * r;  // sigmoid(z)
    const T q = z >= T(0) ? e * r : r;  // 1 - sigmoid(z), without cancellation
    // Both sides are computed and the target's one is selected at the end.
    // Positive: -log(max(p, eps)) * (1 - p)^gamma_pos. torch.clamp(min=eps) passes the
    // gradient at equality; written as !(p < eps) so that NaN stays NaN.
    // Negative, with probability shifting: x = min(1 - p + clip, 1) (clip = 0: x = 1 - p),
    // loss -log(max(x, eps)) * (1 - x)^gamma_neg with 1 - x = max(p - clip, 0). Only
    // clip > 0 can clamp (1 - p <= 1), so no select on clip itself is needed.
    const T xs = Clip ? q + c.clip : q;
    const bool clamped = Clip && xs > T(1);
    const T x = clamped ? T(1) : xs;
    const T pm = Clip ? (clamped ? T(0) : m_max0(p - c.clip)) : p;
    const T dpm = clamped ? T(0) : p * q;  // d(1 - x)/dz
    const bool in_p = !(p < c.eps);
    const bool in_n = !(x < c.eps);
    T L_p, L_n;             // the clamped logs
    T w_p, w_n, dw_n;       // q^gamma_pos, pm^gamma_neg and d(pm^gamma_neg)/dz
    if (!Clip) {
      // x = q, pm = p: both logs from one log1p, and d(p^g)/dz = g * p^g * q.
      const T l1 = m_log1p(e);
      const T log_p = -(m_max0(-z) + l1);
      const T log_q = -(m_max0(z) + l1);
      L_p = in_p ? log_p : c.log_eps;
      L_n = in_n ? log_q : c.log_eps;
      if (PM == PowMode::kInt) {
        w_p = m_ipow(q, c.n_pos);
        w_n = m_ipow(p, c.n_neg);
      } else {
        // One exp for the target's side; exponent 0 gives exactly 1 (pow(0, 0) = 1).
        const T pw = m_exp((y ? c.gamma_pos : c.gamma_neg) * (y ? log_q : log_p));
        w_p = c.gamma_pos == T(0) ? T(1) : pw;
        w_n = c.gamma_neg == T(0) ? T(1) : pw;
      }
      dw_n = c.gamma_neg * w_n * q;  // 0 at gamma_neg = 0
    } else {
      // One log for the target's side, log(max(p, eps)) or log(max(x, eps)), as the torch
      // formula takes it (the clamp also keeps 0 and subnormals, which send the SIMD log to
      // its slow scalar path, out of the log).
      const T u = y ? p : x;
      L_p = L_n = m_log(u < c.eps ? c.eps : u);
      T pn1;  // pm^(gamma_neg - 1), used where pm > 0 only
      if (PM == PowMode::kInt) {
        w_p = m_ipow(q, c.n_pos);
        pn1 = m_ipow(pm, c.n_neg1);
      } else {
        // q^gamma_pos or pm^(gamma_neg - 1) (one log and one exp), pm^gamma_neg = that * pm.
        // Base 0 is replaced by r (in [1/2, 1]; a constant would let GCC fold the log of it
        // and call the log with the base itself), as log(0) sends the SIMD log to its slow
        // scalar path: for pm (most negatives when clip > 0), pow(0, g) is selected below;
        // q = 0 only with p = 1, where the positive loss and grad are 0 for any finite w_p;
        // NaN in the base is carried by the logs L_p, L_n.
        const T b = y ? q : pm;
        const T pw = m_exp((y ? c.gamma_pos : c.gamma_neg - T(1)) * m_log(b > T(0) ? b : r));
        w_p = c.gamma_pos == T(0) ? T(1) : pw;
        pn1 = pw;
      }
      // pow(0, g) = 0 for g > 0 (and its derivative taken as 0), pow(pm, 0) = 1.
      const T w_on = pm > T(0) ? pn1 * pm : T(0);
      w_n = c.gamma_neg == T(0) ? T(1) : w_on;
      const T dw_on = pm > T(0) ? c.gamma_neg * pn1 * dpm : T(0);
      dw_n = c.gamma_neg == T(0) ? T(0) : dw_on;  // pm^(gamma-1) may be inf at gamma 0
    }
    const T dL_p = in_p ? q : T(0);
    const T g_p = w_p * (c.focal_grad * c.gamma_pos * p * L_p - dL_p);
    const T dL_n = in_n ? -dpm / x : T(0);
    const T g_n = -(dL_n * w_n + L_n * c.focal_grad * dw_n);
    loss = -a * (y ? L_p * w_p : L_n * w_n);
    grad = a * (y ? g_p : g_n);
  }
}

}  // namespace shl
