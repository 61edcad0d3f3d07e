// Sums over rows for the CPU kernels' reduced outputs (ShlArgs::loss_total,
// ElemArgs::loss_total): rows in order (deterministic), accumulated in double (fp32 rows: more
// accurate than an fp32 sum).
#pragma once
#include <cstdint>

namespace shl {

// *out = scale * (x[0] + x[stride] + ... + x[(n - 1) * stride])
template <class A>
void sum_in_order(const A* x, int64_t n, double scale, A* out, int64_t stride = 1) {
  double t = 0;
  for (int64_t i = 0; i < n; ++i) t += x[i * stride];
  *out = static_cast<A>(t * scale);
}

}  // namespace shl
