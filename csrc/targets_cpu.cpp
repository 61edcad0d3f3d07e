// targets.h on CPUs: one vectorisable pass, rows split by OpenMP for large batches.
#include <cstdint>

#ifdef SHL_WITH_OPENMP
#include <omp.h>
#endif

#include "targets.h"

namespace shl {
namespace {

template <class T>
int to_mask(const T* __restrict t, uint8_t* __restrict out, int64_t n, int nt) {
  int bad = 0;
#ifdef SHL_WITH_OPENMP
#pragma omp parallel for num_threads(nt) if (nt > 1 && n >= (int64_t(1) << 16)) \
    reduction(| : bad) schedule(static)
#endif
  for (int64_t i = 0; i < n; ++i) {
    const auto v = Conv<T>::load(t[i]);
    out[i] = v != 0;
    bad |= static_cast<int>((v != 0) & (v != 1));  // NaN too: it is neither
  }
  return bad;
}

}  // namespace

const char* targets_to_mask_cpu(const MaskArgs& a, int* bad) {
  if (a.n < 0) return "targets_to_mask_cpu: negative size";
  if (a.n > 0 && (!a.t || !a.out)) return "targets_to_mask_cpu: t and out are required";
#ifdef SHL_WITH_OPENMP
  const int nt = a.num_threads > 0 ? a.num_threads : omp_get_max_threads();
#else
  const int nt = 1;
#endif
  switch (a.t_dtype) {
    case DType::kF32: *bad = to_mask(static_cast<const float*>(a.t), a.out, a.n, nt); break;
    case DType::kF64: *bad = to_mask(static_cast<const double*>(a.t), a.out, a.n, nt); break;
    case DType::kF16: *bad = to_mask(static_cast<const F16*>(a.t), a.out, a.n, nt); break;
    case DType::kBF16: *bad = to_mask(static_cast<const BF16*>(a.t), a.out, a.n, nt); break;
    default: return "t: unsupported dtype (float32, float64, float16, bfloat16)";
  }
  return nullptr;
}

}  // namespace shl
