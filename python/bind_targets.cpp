// Bindings of the float-targets-to-mask conversion (csrc/targets*.{h,cpp,cu}).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../csrc/targets.h"
#include "tensor_view.h"

namespace py = pybind11;

namespace shl {
namespace {

// t (any shape, floating) and out (uint8, t's number of elements and device), checked.
MaskArgs make_args(const TensorView& t, const py::object& out_, bool cuda) {
  const TensorView out = view(out_, "out");
  check_dtype(t, {DType::kF32, DType::kF64, DType::kF16, DType::kBF16},
              "float32, float64, float16 or bfloat16 (bool and uint8 need no conversion)");
  if (cuda ? !t.on_cuda() : !t.on_cpu())
    throw py::value_error(std::string("t: must be a ") + (cuda ? "CUDA" : "CPU") + " tensor");
  check_dtype(out, {DType::kU8}, "uint8");
  check_same_device(t, out);
  if (out.numel() != t.numel())
    throw py::value_error("out: expected " + std::to_string(t.numel()) + " elements (t's), got " +
                          std::to_string(out.numel()));
  MaskArgs a;
  a.t = t.data;
  a.t_dtype = to_dtype(t.dtype);
  a.n = t.numel();
  a.out = out.ptr<uint8_t>();
  a.device = t.on_cuda() ? static_cast<int>(t.device.device_id) : -1;
  return a;
}

// indptr [B+1] and indices (1-D int32/int64), out uint8 [B, C], all on one device: checked.
CsrArgs make_csr_args(const py::object& indptr_, const py::object& indices_,
                      const py::object& out_, bool cuda) {
  const TensorView ptr = view(indptr_, "indptr"), ids = view(indices_, "indices");
  const TensorView out = view(out_, "out");
  for (const TensorView* v : {&ptr, &ids}) {
    check_dtype(*v, {DType::kI32, DType::kI64}, "int32 or int64");
    if (v->shape.size() != 1)
      throw py::value_error(std::string(v == &ptr ? "indptr" : "indices") + ": expected 1-D");
  }
  if (cuda ? !out.on_cuda() : !out.on_cpu())
    throw py::value_error(std::string("out: must be a ") + (cuda ? "CUDA" : "CPU") + " tensor");
  check_dtype(out, {DType::kU8}, "uint8");
  if (out.shape.size() != 2) throw py::value_error("out: expected a 2-D tensor [B, C]");
  check_same_device(out, ptr);
  check_same_device(out, ids);
  CsrArgs a;
  a.B = out.shape[0];
  a.C = out.shape[1];
  if (ptr.shape[0] != a.B + 1)
    throw py::value_error("indptr: expected B+1=" + std::to_string(a.B + 1) + " entries, got " +
                          std::to_string(ptr.shape[0]));
  a.indptr = ptr.data;
  a.indptr_type = to_dtype(ptr.dtype);
  a.indices = ids.data;
  a.indices_type = to_dtype(ids.dtype);
  a.nnz = ids.shape[0];
  a.out = out.ptr<uint8_t>();
  a.device = out.on_cuda() ? static_cast<int>(out.device.device_id) : -1;
  return a;
}

}  // namespace

void register_targets(py::module_& m) {
  m.def(
      "csr_to_mask_cpu",
      [](py::object indptr, py::object indices, py::object out, int num_threads) {
        CsrArgs a = make_csr_args(indptr, indices, out, false);
        a.num_threads = num_threads;
        int64_t check[kCsrChecks];
        const char* err;
        {
          py::gil_scoped_release nogil;
          err = csr_to_mask_cpu(a, check);
        }
        if (err) throw std::runtime_error(err);
        return py::make_tuple(check[kCsrBadIndptr] != 0, check[kCsrMinId], check[kCsrMaxId],
                              check[kCsrDuplicate] != 0);
      },
      "CSR (indptr [B+1], indices) to the dense uint8 mask out [B, C]; returns (indptr "
      "malformed, smallest id, largest id, an id twice in a row): out is complete only when "
      "indptr is well formed and the ids lie in [0, C).",
      py::arg("indptr"), py::arg("indices"), py::arg("out"), py::arg("num_threads") = 0);
  m.def(
      "targets_to_mask_cpu",
      [](py::object t, py::object out, int num_threads) {
        MaskArgs a = make_args(view(t, "t"), out, false);
        a.num_threads = num_threads;
        int bad = 0;
        const char* err;
        {
          py::gil_scoped_release nogil;
          err = targets_to_mask_cpu(a, &bad);
        }
        if (err) throw std::runtime_error(err);
        return bad != 0;
      },
      "out = (t != 0) as uint8 in one pass (t: dense 0/1 targets of a floating dtype); returns "
      "whether some value of t is neither 0 nor 1.",
      py::arg("t"), py::arg("out"), py::arg("num_threads") = 0);
#ifdef SHL_WITH_CUDA
  m.def(
      "targets_to_mask_cuda",
      [](py::object t, py::object out, py::object bad_, uintptr_t stream) {
        const TensorView tv = view(t, "t");
        MaskArgs a = make_args(tv, out, true);
        const TensorView bad = view(bad_, "bad");
        check_dtype(bad, {DType::kI32}, "int32");
        check_shape(bad, {1});
        check_same_device(tv, bad);
        const char* err = targets_to_mask_cuda(a, bad.ptr<int32_t>(), reinterpret_cast<void*>(stream));
        if (err) throw std::runtime_error(err);
      },
      "out = (t != 0) as uint8 in one pass on the stream; bad (int32 [1]) becomes 1 where some "
      "value of t is neither 0 nor 1, else 0 (read it after the launch: a host sync).",
      py::arg("t"), py::arg("out"), py::arg("bad"), py::arg("stream") = 0);
  m.def(
      "csr_to_mask_cuda",
      [](py::object indptr, py::object indices, py::object out, py::object check_,
         uintptr_t stream) {
        CsrArgs a = make_csr_args(indptr, indices, out, true);
        if (a.B < 1) throw py::value_error("out: needs at least one row");
        const TensorView check = view(check_, "check");
        check_dtype(check, {DType::kI64}, "int64");
        check_shape(check, {kCsrChecks});
        if (!check.on_cuda() || check.device.device_id != a.device)
          throw py::value_error("check: must be on out's CUDA device");
        const char* err = csr_to_mask_cuda(a, check.ptr<int64_t>(), reinterpret_cast<void*>(stream));
        if (err) throw std::runtime_error(err);
      },
      "csr_to_mask_cpu on the stream: check (int64 [4]) receives (indptr malformed, smallest "
      "id, largest id, an id twice in a row) (read it after the launch: a host sync).",
      py::arg("indptr"), py::arg("indices"), py::arg("out"), py::arg("check"),
      py::arg("stream") = 0);
#endif
}

}  // namespace shl
