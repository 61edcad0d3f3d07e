// targets.h on CPUs: one vectorisable pass, rows split by OpenMP for large batches.
#include <cstdint>
#include <cstring>

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

template <class P, class I>
void csr_to_mask(const CsrArgs& a, int64_t* check, int nt) {
  const P* ptr = static_cast<const P*>(a.indptr);
  const I* ids = static_cast<const I*>(a.indices);
  const int64_t B = a.B, C = a.C, nnz = a.nnz;
  bool bad = (B > 0 && ptr[0] != 0) || int64_t(ptr[B]) != nnz;
  for (int64_t r = 0; r < B && !bad; ++r) bad = ptr[r + 1] < ptr[r];
  check[kCsrBadIndptr] = bad;
  check[kCsrMinId] = INT64_MAX;
  check[kCsrMaxId] = INT64_MIN;
  check[kCsrDuplicate] = 0;
  if (bad) return;  // the rows' ranges cannot be trusted
  int64_t lo = INT64_MAX, hi = INT64_MIN;
  for (int64_t k = 0; k < nnz; ++k) {
    const int64_t id = ids[k];
    lo = id < lo ? id : lo;
    hi = id > hi ? id : hi;
  }
  check[kCsrMinId] = lo;
  check[kCsrMaxId] = hi;
  if (nnz > 0 && (lo < 0 || hi >= C)) return;
  int dup = 0;
#ifdef SHL_WITH_OPENMP
#pragma omp parallel for num_threads(nt) if (nt > 1 && B * C >= (int64_t(1) << 16)) \
    reduction(| : dup) schedule(static)
#endif
  for (int64_t r = 0; r < B; ++r) {
    uint8_t* row = a.out + r * C;
    std::memset(row, 0, static_cast<size_t>(C));
    for (int64_t k = ptr[r]; k < int64_t(ptr[r + 1]); ++k) {
      dup |= row[ids[k]];
      row[ids[k]] = 1;
    }
  }
  check[kCsrDuplicate] = dup;
}

template <class P>
void csr_to_mask_ids(const CsrArgs& a, int64_t* check, int nt) {
  if (a.indices_type == DType::kI32) csr_to_mask<P, int32_t>(a, check, nt);
  else csr_to_mask<P, int64_t>(a, check, nt);
}

int threads(int requested) {
#ifdef SHL_WITH_OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

}  // namespace

const char* csr_to_mask_cpu(const CsrArgs& a, int64_t* check) {
  if (a.B < 0 || a.C < 0 || a.nnz < 0) return "csr_to_mask_cpu: negative size";
  if (!a.indptr || (a.nnz > 0 && !a.indices) || (a.B * a.C > 0 && !a.out))
    return "csr_to_mask_cpu: indptr, indices and out are required";
  const bool ok_types = (a.indptr_type == DType::kI32 || a.indptr_type == DType::kI64) &&
                        (a.indices_type == DType::kI32 || a.indices_type == DType::kI64);
  if (!ok_types) return "csr_to_mask_cpu: indptr and indices must be int32 or int64";
  const int nt = threads(a.num_threads);
  if (a.indptr_type == DType::kI32) csr_to_mask_ids<int32_t>(a, check, nt);
  else csr_to_mask_ids<int64_t>(a, check, nt);
  return nullptr;
}

const char* targets_to_mask_cpu(const MaskArgs& a, int* bad) {
  if (a.n < 0) return "targets_to_mask_cpu: negative size";
  if (a.n > 0 && (!a.t || !a.out)) return "targets_to_mask_cpu: t and out are required";
  const int nt = threads(a.num_threads);
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
