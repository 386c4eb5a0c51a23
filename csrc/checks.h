// What the CPU and CUDA bindings share (both register kernels for the
// adm_fast_native ops, whose schemas adm_fast/ops/native.py defines): the
// argument checks — anything under torch.ops is public, so every shape, dtype,
// device and code is checked here, with a message, before a kernel reads a
// pointer — and the assembly of the backward's outputs.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

#include "step_codes.h"

namespace adm_fast {

using at::Tensor;
using c10::optional;

inline bool is_kernel_float(const Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

inline void check_float_on(const Tensor& t, const Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be floating point, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

inline void check_optional(const optional<Tensor>& t, const Tensor& x, at::IntArrayRef shape,
                           const char* op, const char* name) {
  if (!t.has_value()) return;
  check_float_on(*t, x, op, name);
  TORCH_CHECK(t->sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
              t->sizes());
}

// x [N, C, *spatial] (non-empty, fp32/fp16/bf16), groups dividing C, the
// per-channel and per-sample vectors shaped [C] and [N, C].
inline void check_group_norm(const char* op, const Tensor& x, int64_t groups,
                             const optional<Tensor>& weight, const optional<Tensor>& bias,
                             const optional<Tensor>& scale, const optional<Tensor>& shift) {
  TORCH_CHECK(x.dim() >= 2, op, ": x must be [N, C, *spatial], got ", x.sizes());
  TORCH_CHECK(is_kernel_float(x), op, ": x must be fp32, fp16 or bf16, got ", x.scalar_type());
  TORCH_CHECK(x.numel() > 0, op, ": x is empty (adm_fast.ops.group_norm_act takes empty inputs)");
  const int64_t n = x.size(0), c = x.size(1);
  TORCH_CHECK(groups > 0 && c % groups == 0, op, ": num_groups=", groups, " must divide the ", c,
              " channels");
  check_optional(weight, x, {c}, op, "weight");
  check_optional(bias, x, {c}, op, "bias");
  check_optional(scale, x, {n, c}, op, "scale");
  check_optional(shift, x, {n, c}, op, "shift");
}

inline void check_group_norm_backward(const char* op, const Tensor& dy, const Tensor& x,
                                      int64_t groups, const Tensor& mean, const Tensor& rstd) {
  check_float_on(dy, x, op, "dy");
  TORCH_CHECK(dy.sizes() == x.sizes(), op, ": dy must have x's shape ", x.sizes(), ", got ",
              dy.sizes());
  auto stats = [&](const Tensor& t, const char* name) {
    check_float_on(t, x, op, name);
    TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == groups, op, ": ", name,
                " must be [N, num_groups] = [", x.size(0), ", ", groups, "], got ", t.sizes());
  };
  stats(mean, "mean");
  stats(rstd, "rstd");
}

// x [B, C, *spatial]; model_out [B, C or 2C, *spatial] (2C exactly when the
// variance is learned; var_type < 0: DDIM, either); noise and grad x's shape;
// coefs [rows, B]; the type codes in range.
inline void check_step(const char* op, const Tensor& x, const Tensor& model_out,
                       const Tensor& noise, const Tensor& coefs, const optional<Tensor>& grad,
                       int64_t rows, int64_t mean_type, int64_t var_type) {
  TORCH_CHECK(mean_type >= 0 && mean_type < kMeanTypes, op, ": mean_type code ", mean_type,
              " is not one of 0..", kMeanTypes - 1);
  TORCH_CHECK(var_type < kVarTypes, op, ": var_type code ", var_type, " is not one of 0..",
              kVarTypes - 1);
  TORCH_CHECK(x.dim() >= 2, op, ": x must be [B, C, *spatial], got ", x.sizes());
  TORCH_CHECK(is_kernel_float(x), op, ": x must be fp32, fp16 or bf16, got ", x.scalar_type());
  check_float_on(model_out, x, op, "model_out");
  check_float_on(noise, x, op, "noise");
  check_float_on(coefs, x, op, "coefs");
  const int64_t b = x.size(0), c = x.size(1);
  const bool spatial_ok = model_out.dim() == x.dim() && model_out.size(0) == b &&
                          model_out.sizes().slice(2) == x.sizes().slice(2);
  const int64_t oc = model_out.dim() >= 2 ? model_out.size(1) : -1;
  const bool channels_ok = var_type < 0 ? (oc == c || oc == 2 * c)
                                        : oc == (var_type == kVarFixed ? c : 2 * c);
  TORCH_CHECK(spatial_ok && channels_ok, op, ": model_out ", model_out.sizes(),
              " does not fit x ", x.sizes(), var_type < 0 ? " (C or 2C channels)"
              : var_type == kVarFixed ? " (C channels for a fixed variance)"
                                      : " (2C channels for a learned variance)");
  TORCH_CHECK(noise.sizes() == x.sizes(), op, ": noise must have x's shape ", x.sizes(),
              ", got ", noise.sizes());
  if (grad.has_value()) {
    check_float_on(*grad, x, op, "grad");
    TORCH_CHECK(grad->sizes() == x.sizes(), op, ": grad must have x's shape ", x.sizes(),
                ", got ", grad->sizes());
  }
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(0) == rows && coefs.size(1) == b, op,
              ": coefs must be [", rows, ", ", b, "], got ", coefs.sizes());
}

inline void check_eps(const char* op, double eps) {
  // adm_fast/ops/group_norm_act.py checks the same rule, for every backend.
  TORCH_CHECK(std::isfinite(eps) && eps > 0.0, op, ": eps must be a finite number > 0, got ", eps);
}

// group_norm_act_bwd's five outputs from the kernels' dx and fp32 [N, C]
// partials: dweight = Σ_n t2, dbias = Σ_n t1 (when need_wb), dscale, dshift;
// each in its input's dtype, and an empty tensor where there is no input or
// the gradient was not asked for.
inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> group_norm_grads(
    const Tensor& x, const Tensor& dx, const Tensor& t1, const Tensor& t2, const Tensor& ds,
    const Tensor& dsh, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& scale, const optional<Tensor>& shift, bool need_wb) {
  auto none = [&] { return x.new_empty({0}); };
  return {dx, need_wb && weight.has_value() ? t2.sum(0).to(weight->scalar_type()) : none(),
          need_wb && bias.has_value() ? t1.sum(0).to(bias->scalar_type()) : none(),
          ds.defined() ? ds.to(scale->scalar_type()) : none(),
          dsh.defined() ? dsh.to(shift->scalar_type()) : none()};
}

}  // namespace adm_fast
