// ShlArgs from the DLPack capsules passed to shl_fused_cpu / shl_fused_cuda: every check of
// the fused SHL bindings in one place (device kind, same device, dtypes, shapes, aliasing).
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "../csrc/shl_args.h"
#include "tensor_view.h"

namespace shl {
namespace py = pybind11;

enum class Backend { kCPU, kCUDA };

namespace detail {
inline int64_t nbytes(const TensorView& v) { return v.numel() * ((v.dtype.bits + 7) / 8); }

// A view on z's device (None allowed when optional) with the given dtype and shape.
inline TensorView arg(const py::object& obj, const char* name, const TensorView& z, bool optional,
                      DType dt, const char* dt_name, std::initializer_list<int64_t> shape) {
  TensorView v = view(obj, name, optional);
  if (obj.is_none()) return v;
  check_same_device(z, v);
  check_dtype(v, {dt}, dt_name);
  check_shape(v, shape);
  return v;
}
}  // namespace detail

inline ShlArgs shl_args_from_capsules(Backend where, const py::object& z_, const py::object& pos_,
                                      const py::object& ign_, const py::object& order_,
                                      const py::object& offsets_, const py::object& w_,
                                      const py::object& eta_, const py::object& delta_,
                                      double grad_scale, const py::object& loss_,
                                      const py::object& grad_, const py::object& grad_eta_) {
  using detail::arg;
  const TensorView z = view(z_, "z");
  const std::string dev = std::to_string(z.device.device_type);
  if (where == Backend::kCPU && !z.on_cpu())
    throw py::value_error("z: expected a CPU tensor, got DLPack device type " + dev +
                          "; move it with .cpu() or use a GPU backend");
  if (where == Backend::kCUDA && !z.on_cuda())
    throw py::value_error("z: must be a CUDA tensor for the cuda backend (DLPack device type " +
                          dev + "); use the cpu backend or move it with .cuda()");
  check_dtype(z, {DType::kF32, DType::kF64, DType::kF16, DType::kBF16},
              "float32, float64, float16 or bfloat16");
  if (z.shape.size() != 2) {
    std::string got = "(";
    for (auto s : z.shape) got += std::to_string(s) + ",";
    throw py::value_error("z: expected a 2-D tensor [B, C], got shape " + got + ")");
  }
  const int64_t B = z.shape[0], C = z.shape[1];
  const DType zt = to_dtype(z.dtype);
  const DType acc = zt == DType::kF64 ? DType::kF64 : DType::kF32;
  const char* acc_name = zt == DType::kF64 ? "float64 (the accumulation dtype of float64 z)"
                                           : "float32 (the accumulation dtype of non-float64 z)";

  TensorView offsets = view(offsets_, "offsets");
  check_same_device(z, offsets);
  check_dtype(offsets, {DType::kI64}, "int64");
  if (offsets.shape.size() != 1 || offsets.shape[0] < 1)
    throw py::value_error("offsets: expected a 1-D tensor [m + 1] with m >= 0");
  const int64_t m = offsets.shape[0] - 1;

  const TensorView pos = arg(pos_, "pos", z, false, DType::kU8, "uint8 or bool", {B, C});
  const TensorView ign = arg(ign_, "ign", z, true, DType::kU8, "uint8 or bool", {B, C});
  const TensorView order = arg(order_, "order", z, true, DType::kI64, "int64", {C});
  const TensorView w = arg(w_, "w", z, true, acc, acc_name, {C});
  const TensorView eta = arg(eta_, "eta", z, true, acc, acc_name, {m});
  const TensorView delta = arg(delta_, "delta", z, true, acc, acc_name, {C});
  const TensorView loss = arg(loss_, "loss", z, false, acc, acc_name, {B});
  const TensorView grad = arg(grad_, "grad", z, false, zt, "the dtype of z", {B, C});
  const TensorView grad_eta = arg(grad_eta_, "grad_eta", z, true, acc, acc_name, {B, m});
  // In place is grad == z exactly; a partial overlap would be read after being written.
  const auto zb = reinterpret_cast<uintptr_t>(z.data), gb = reinterpret_cast<uintptr_t>(grad.data);
  if (gb != zb && gb < zb + detail::nbytes(z) && zb < gb + detail::nbytes(grad))
    throw py::value_error("grad: overlaps z without being z; pass z itself (in place) or a "
                          "separate tensor");

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
  a.device = z.device.device_type == kDLCUDA ? static_cast<int>(z.device.device_id) : -1;
  return a;
}

// The optional sums over rows (ShlArgs::loss_total, grad_eta_total; None = skip), checked
// against z (a's z as a view) like the other outputs.
inline void set_row_sums(ShlArgs& a, const TensorView& z, const py::object& loss_total,
                         const py::object& grad_eta_total) {
  const DType acc = a.z_dtype == DType::kF64 ? DType::kF64 : DType::kF32;
  const char* acc_name = a.z_dtype == DType::kF64 ? "float64" : "float32";
  if (!loss_total.is_none())
    a.loss_total = detail::arg(loss_total, "loss_total", z, false, acc, acc_name, {}).data;
  if (!grad_eta_total.is_none()) {
    if (!a.grad_eta && a.B > 0 && a.m > 0)  // (an empty grad_eta may have no data pointer)
      throw py::value_error("grad_eta_total: given without grad_eta (it sums its rows)");
    a.grad_eta_total =
        detail::arg(grad_eta_total, "grad_eta_total", z, false, acc, acc_name, {a.m}).data;
  }
}

}  // namespace shl
