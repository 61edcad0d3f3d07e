// Bindings of the CPU kernels (csrc/*.cpp).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#ifdef SHL_WITH_OPENMP
#include <omp.h>
#endif

#include "../csrc/shl_args.h"
#include "tensor_view.h"

namespace py = pybind11;

namespace shl {
namespace {

void check_cpu(const TensorView& v) {
  if (!v.on_cpu())
    throw py::value_error(v.name + ": expected a CPU tensor, got DLPack device type " +
                          std::to_string(v.device.device_type) + "; move it with .cpu()");
}

// Optional tensors may be None (returns an empty view); present ones are fully checked.
TensorView arg(const py::object& obj, const char* name, bool optional,
               std::initializer_list<DType> dtypes, const char* dtype_what,
               std::initializer_list<int64_t> shape) {
  TensorView v = view(obj, name, optional);
  if (obj.is_none()) return v;
  check_cpu(v);
  check_dtype(v, dtypes, dtype_what);
  check_shape(v, shape);
  return v;
}

void fused_cpu(const py::object& z_, const py::object& pos_, const py::object& ign_,
               const py::object& order_, const py::object& offsets_, const py::object& w_,
               const py::object& eta_, const py::object& delta_, double grad_scale,
               const py::object& loss_, const py::object& grad_, const py::object& grad_eta_,
               int num_threads) {
  TensorView z = view(z_, "z");
  check_cpu(z);
  check_dtype(z, {DType::kF32, DType::kF64, DType::kF16, DType::kBF16},
              "float32, float64, float16 or bfloat16");
  if (z.shape.size() != 2) {
    std::string got = "(";
    for (auto s : z.shape) got += std::to_string(s) + ",";
    throw py::value_error("z: expected a 2-D tensor [B, C], got shape " + got + ")");
  }
  const int64_t B = z.shape[0], C = z.shape[1];
  const DType zt = to_dtype(z.dtype);
  const bool f64 = zt == DType::kF64;
  const DType acc = f64 ? DType::kF64 : DType::kF32;
  const char* acc_what = f64 ? "float64 (the accumulation dtype of float64 z)"
                             : "float32 (the accumulation dtype of non-float64 z)";

  TensorView offsets = view(offsets_, "offsets");
  check_cpu(offsets);
  check_dtype(offsets, {DType::kI64}, "int64");
  if (offsets.shape.size() != 1 || offsets.shape[0] < 1)
    throw py::value_error("offsets: expected a 1-D tensor [m + 1] with m >= 0");
  const int64_t m = offsets.shape[0] - 1;

  const auto flags = {DType::kU8};
  TensorView pos = arg(pos_, "pos", false, flags, "uint8 or bool", {B, C});
  TensorView ign = arg(ign_, "ign", true, flags, "uint8 or bool", {B, C});
  TensorView order = arg(order_, "order", true, {DType::kI64}, "int64", {C});
  TensorView w = arg(w_, "w", true, {acc}, acc_what, {C});
  TensorView eta = arg(eta_, "eta", true, {acc}, acc_what, {m});
  TensorView delta = arg(delta_, "delta", true, {acc}, acc_what, {C});
  TensorView loss = arg(loss_, "loss", false, {acc}, acc_what, {B});
  TensorView grad = arg(grad_, "grad", false, {zt}, "the dtype of z", {B, C});
  TensorView grad_eta = arg(grad_eta_, "grad_eta", true, {acc}, acc_what, {B, m});

  ShlArgs a;
  a.z = z.data;
  a.z_dtype = zt;
  a.B = B;
  a.C = C;
  a.m = m;
  a.pos = pos.ptr<const uint8_t>();
  a.ign = ign.ptr<const uint8_t>();
  a.order = order.ptr<const int64_t>();
  a.offsets = offsets.ptr<const int64_t>();
  a.w = w.data;
  a.eta = eta.data;
  a.delta = delta.data;
  a.grad_scale = grad_scale;
  a.loss = loss.data;
  a.grad = grad.data;
  a.grad_eta = grad_eta.data;
  a.num_threads = num_threads;
  const char* err;
  {
    py::gil_scoped_release nogil;
    err = shl_fused_cpu(a);
  }
  if (err) throw std::runtime_error(err);
}

}  // namespace

void register_cpu(py::module_& m) {
  m.def("omp_max_threads", []() {
#ifdef SHL_WITH_OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  m.def("shl_fused_cpu", &fused_cpu, py::arg("z"), py::arg("pos"), py::arg("ign"),
        py::arg("order"), py::arg("offsets"), py::arg("w"), py::arg("eta"), py::arg("delta"),
        py::arg("grad_scale"), py::arg("loss"), py::arg("grad"), py::arg("grad_eta"),
        py::arg("num_threads") = 0,
        "Fused SHL loss + gradient on CPU (see csrc/shl_args.h); tensors as DLPack "
        "capsules, optional ones may be None. Raises RuntimeError when the kernel fails.");
}

}  // namespace shl
