// Bindings of the fused elementwise losses (csrc/elementwise*.{h,cpp,cu}): BCE, sigmoid focal
// and asymmetric loss. Inputs and preallocated outputs arrive as DLPack capsules.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "../csrc/elementwise.h"
#include "tensor_view.h"

namespace py = pybind11;

namespace shl {
namespace {

// Checks every tensor (shape, dtype, device) and fills the kernel arguments.
ElemArgs make_args(const py::object& z_, const py::object& pos_, const py::object& ign_,
                   const py::object& weight_, const py::object& pos_weight_,
                   const py::object& loss_rows_, const py::object& loss_el_,
                   const py::object& grad_, const py::object& loss_total_, int kind,
                   double alpha, double gamma, double gamma_pos, double gamma_neg, double clip,
                   double eps, bool detach, double grad_scale, bool cuda) {
  TensorView z = view(z_, "z");
  if (z.shape.size() != 2) throw py::value_error("z: expected a 2-D tensor [B, C]");
  check_dtype(z, {DType::kF32, DType::kF64, DType::kF16, DType::kBF16},
              "float32, float64, float16 or bfloat16");
  if (cuda ? !z.on_cuda() : !z.on_cpu())
    throw py::value_error(std::string("z: must be a ") + (cuda ? "CUDA" : "CPU") + " tensor");
  const int64_t B = z.shape[0], C = z.shape[1];
  const DType zd = to_dtype(z.dtype);
  const DType acc = zd == DType::kF64 ? DType::kF64 : DType::kF32;
  const char* acc_name = zd == DType::kF64 ? "float64 (the logits are float64)" : "float32";
  auto mask = [&](const py::object& o, const char* name, bool optional) {
    TensorView v = view(o, name, optional);
    if (!present(v) && optional) return v;
    check_shape(v, {B, C});
    check_dtype(v, {DType::kU8}, "uint8 or bool");
    check_same_device(z, v);
    return v;
  };
  auto vec = [&](const py::object& o, const char* name, std::initializer_list<int64_t> shape,
                 DType dt, const char* what) {
    TensorView v = view(o, name, true);
    if (!present(v)) return v;
    check_shape(v, shape);
    check_dtype(v, {dt}, what);
    check_same_device(z, v);
    return v;
  };
  TensorView pos = mask(pos_, "pos", false), ign = mask(ign_, "ign", true);
  TensorView w = vec(weight_, "weight", {C}, acc, acc_name);
  TensorView pw = vec(pos_weight_, "pos_weight", {C}, acc, acc_name);
  TensorView rows = vec(loss_rows_, "loss_rows", {B}, acc, acc_name);
  TensorView lel = vec(loss_el_, "loss_el", {B, C}, zd, "the logits' dtype");
  TensorView g = vec(grad_, "grad", {B, C}, zd, "the logits' dtype");
  TensorView total = vec(loss_total_, "loss_total", {}, acc, acc_name);
  if (present(total) && !present(rows))
    throw py::value_error("loss_total: given without loss_rows (it sums the row losses)");
  if (!present(rows) && !present(lel))
    throw py::value_error("loss_rows: one of loss_rows / loss_el is required");
  if (kind < 0 || kind > 2) throw py::value_error("kind: expected 0 (bce), 1 (focal) or 2 (asl)");
  if (!(eps > 0)) throw py::value_error("eps: must be > 0");
  ElemArgs a;
  a.z = z.data;
  a.z_type = zd;
  a.device = z.device.device_type == kDLCUDA ? static_cast<int>(z.device.device_id) : -1;
  a.B = B;
  a.C = C;
  a.pos = pos.ptr<uint8_t>();
  a.ign = ign.ptr<uint8_t>();
  a.weight = w.data;
  a.pos_weight = pw.data;
  a.kind = static_cast<ElemKind>(kind);
  a.p.alpha = alpha;
  a.p.gamma = gamma;
  a.p.gamma_pos = gamma_pos;
  a.p.gamma_neg = gamma_neg;
  a.p.clip = clip;
  a.p.eps = eps;
  a.p.detach = detach;
  a.grad_scale = grad_scale;
  a.loss_rows = rows.data;
  a.loss_total = total.data;
  a.loss_el = lel.data;
  a.grad = g.data;
  return a;
}

}  // namespace

void register_elementwise(py::module_& m) {
  const char* doc =
      "Fused elementwise loss and gradient. z [B, C]; pos/ign uint8 [B, C]; weight/pos_weight "
      "[C] acc dtype (float64 for float64 z, else float32); outputs (written, never read): "
      "loss_rows [B] acc, loss_el [B, C] and grad [B, C] (z dtype, times grad_scale), "
      "loss_total 0-dim acc (grad_scale times the sum of the row losses; needs loss_rows). "
      "kind: 0 bce, 1 focal, 2 asl.";
  m.def(
      "elementwise_fused_cpu",
      [](py::object z, py::object pos, py::object ign, py::object weight, py::object pos_weight,
         py::object loss_rows, py::object loss_el, py::object grad, int kind, double alpha,
         double gamma, double gamma_pos, double gamma_neg, double clip, double eps, bool detach,
         double grad_scale, int num_threads, py::object loss_total) {
        ElemArgs a = make_args(z, pos, ign, weight, pos_weight, loss_rows, loss_el, grad,
                               loss_total, kind, alpha, gamma, gamma_pos, gamma_neg, clip, eps,
                               detach, grad_scale, false);
        a.num_threads = num_threads;
        const char* err;
        {
          py::gil_scoped_release nogil;
          err = elementwise_fused_cpu(a);
        }
        if (err) throw std::runtime_error(err);
      },
      doc, py::arg("z"), py::arg("pos"), py::arg("ign"), py::arg("weight"),
      py::arg("pos_weight"), py::arg("loss_rows"), py::arg("loss_el"), py::arg("grad"),
      py::kw_only(), py::arg("kind"), py::arg("alpha"), py::arg("gamma"), py::arg("gamma_pos"),
      py::arg("gamma_neg"), py::arg("clip"), py::arg("eps"), py::arg("detach"),
      py::arg("grad_scale"), py::arg("num_threads") = 0, py::arg("loss_total") = py::none());
#ifdef SHL_WITH_CUDA
  m.def(
      "elementwise_fused_cuda",
      [](py::object z, py::object pos, py::object ign, py::object weight, py::object pos_weight,
         py::object loss_rows, py::object loss_el, py::object grad, int kind, double alpha,
         double gamma, double gamma_pos, double gamma_neg, double clip, double eps, bool detach,
         double grad_scale, uintptr_t stream, py::object loss_total) {
        ElemArgs a = make_args(z, pos, ign, weight, pos_weight, loss_rows, loss_el, grad,
                               loss_total, kind, alpha, gamma, gamma_pos, gamma_neg, clip, eps,
                               detach, grad_scale, true);
        const char* err = elementwise_fused_cuda(a, reinterpret_cast<void*>(stream));
        if (err) throw std::runtime_error(err);
      },
      doc, py::arg("z"), py::arg("pos"), py::arg("ign"), py::arg("weight"),
      py::arg("pos_weight"), py::arg("loss_rows"), py::arg("loss_el"), py::arg("grad"),
      py::kw_only(), py::arg("kind"), py::arg("alpha"), py::arg("gamma"), py::arg("gamma_pos"),
      py::arg("gamma_neg"), py::arg("clip"), py::arg("eps"), py::arg("detach"),
      py::arg("grad_scale"), py::arg("stream") = 0, py::arg("loss_total") = py::none());
#endif
}

}  // namespace shl
