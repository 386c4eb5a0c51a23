// The only CPU file that touches tensors: checks, allocation, dtype dispatch,
// and the torch.library registration of the adm_fast_cpu ops (so torch.compile
// and the adm_fast custom ops can call them like any PyTorch op).
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "kernels.h"

namespace adm_fast_cpu {
namespace {

using at::Tensor;
using c10::optional;

#define CHECK_CPU(t, name) TORCH_CHECK((t).device().is_cpu(), name " must be a CPU tensor")

// float, bfloat16 and half only: the kernels are instantiated for those.
#define ADM_DISPATCH(TYPE, NAME, ...)                                         \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                              \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)             \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

Tensor f32(const optional<Tensor>& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : Tensor();
}

const float* ptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

void check_x(const Tensor& x, int64_t groups) {
  CHECK_CPU(x, "x");
  TORCH_CHECK(x.dim() >= 2, "x must be [N, C, *spatial]");
  TORCH_CHECK(x.is_contiguous(), "the CPU group_norm_act takes NCHW-contiguous x");
  TORCH_CHECK(groups > 0 && x.size(1) % groups == 0, "num_groups must divide C");
}

std::tuple<Tensor, Tensor, Tensor> group_norm_act_fwd_op(
    const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& scale, const optional<Tensor>& shift, int64_t groups, double eps,
    bool act) {
  check_x(x, groups);
  const int64_t n = x.size(0), c = x.size(1), hw = x.numel() / std::max<int64_t>(1, n * c);
  Tensor w = f32(weight), b = f32(bias), s = f32(scale), sh = f32(shift);
  Tensor y = at::empty_like(x);
  Tensor mean = at::empty({n, groups}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({n, groups}, x.options().dtype(at::kFloat));
  ADM_DISPATCH(x.scalar_type(), "gn_fwd", [&] {
    group_norm_act_fwd<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                 mean.data_ptr<float>(), rstd.data_ptr<float>(), ptr(w), ptr(b),
                                 ptr(s), ptr(sh), n, c, hw, groups, eps, act);
  });
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> group_norm_act_bwd_op(
    const Tensor& dy, const Tensor& x, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& scale, const optional<Tensor>& shift,
    const Tensor& mean, const Tensor& rstd, int64_t groups, bool act, bool need_wb) {
  check_x(x, groups);
  const int64_t n = x.size(0), c = x.size(1), hw = x.numel() / std::max<int64_t>(1, n * c);
  Tensor g = dy.to(x.scalar_type()).contiguous();
  Tensor w = f32(weight), b = f32(bias), s = f32(scale), sh = f32(shift);
  Tensor m = mean.to(at::kFloat).contiguous(), r = rstd.to(at::kFloat).contiguous();
  Tensor dx = at::empty_like(x);
  auto opts = x.options().dtype(at::kFloat);
  Tensor ds = scale.has_value() ? at::empty({n, c}, opts) : Tensor();
  Tensor dsh = shift.has_value() ? at::empty({n, c}, opts) : Tensor();
  Tensor t1 = need_wb ? at::empty({n, c}, opts) : Tensor();
  Tensor t2 = need_wb ? at::empty({n, c}, opts) : Tensor();
  ADM_DISPATCH(x.scalar_type(), "gn_bwd", [&] {
    group_norm_act_bwd<scalar_t>(
        g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), ptr(m), ptr(r), ptr(w), ptr(b), ptr(s),
        ptr(sh), dx.data_ptr<scalar_t>(), ds.defined() ? ds.data_ptr<float>() : nullptr,
        dsh.defined() ? dsh.data_ptr<float>() : nullptr, need_wb ? t1.data_ptr<float>() : nullptr,
        need_wb ? t2.data_ptr<float>() : nullptr, n, c, hw, groups, act);
  });
  auto empty = x.new_empty({0});
  Tensor dw = need_wb && weight.has_value() ? t2.sum(0).to(weight->scalar_type()) : empty;
  Tensor db = need_wb && bias.has_value() ? t1.sum(0).to(bias->scalar_type()) : x.new_empty({0});
  return {dx, dw, db, ds.defined() ? ds.to(scale->scalar_type()) : x.new_empty({0}),
          dsh.defined() ? dsh.to(shift->scalar_type()) : x.new_empty({0})};
}

struct StepArgs {
  Tensor x, out, noise, grad, coefs;
  int64_t b, chw;
};

StepArgs step_args(const Tensor& x, const Tensor& model_out, const Tensor& noise,
                   const Tensor& coefs, const optional<Tensor>& grad, int64_t rows) {
  CHECK_CPU(x, "x");
  const int64_t b = x.size(0), chw = x.numel() / std::max<int64_t>(1, b);
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(0) == rows && coefs.size(1) == b,
              "coefs must be [", rows, ", B]");
  auto f = [](const Tensor& t) { return t.to(at::kFloat).contiguous(); };
  return {f(x), f(model_out), f(noise), grad.has_value() ? f(*grad) : Tensor(), f(coefs), b,
          chw};
}

std::tuple<Tensor, Tensor> finish(const Tensor& sample, const Tensor& x0, const Tensor& x,
                                  const Tensor& model_out, bool guided) {
  const auto x0_type = at::promote_types(x.scalar_type(), model_out.scalar_type());
  const auto s_type = guided ? at::promote_types(x0_type, at::kFloat) : x0_type;
  return {sample.to(s_type), x0.to(x0_type)};
}

std::tuple<Tensor, Tensor> ddpm_step_op(const Tensor& x, const Tensor& model_out,
                                        const Tensor& noise, const Tensor& coefs,
                                        const optional<Tensor>& grad, int64_t mean_type,
                                        int64_t var_type, bool clip) {
  StepArgs a = step_args(x, model_out, noise, coefs, grad, 8);
  Tensor sample = at::empty_like(a.x), x0 = at::empty_like(a.x);
  ddpm_step(ptr(a.x), ptr(a.out), ptr(a.noise), ptr(a.grad), ptr(a.coefs),
            sample.data_ptr<float>(), x0.data_ptr<float>(), a.b, a.chw, a.out.stride(0),
            static_cast<int>(mean_type), static_cast<int>(var_type), clip);
  return finish(sample, x0, x, model_out, grad.has_value());
}

std::tuple<Tensor, Tensor> ddim_step_op(const Tensor& x, const Tensor& model_out,
                                        const Tensor& noise, const Tensor& coefs,
                                        const optional<Tensor>& grad, int64_t mean_type,
                                        bool clip, double eta) {
  StepArgs a = step_args(x, model_out, noise, coefs, grad, 7);
  Tensor sample = at::empty_like(a.x), x0 = at::empty_like(a.x);
  ddim_step(ptr(a.x), ptr(a.out), ptr(a.noise), ptr(a.grad), ptr(a.coefs),
            sample.data_ptr<float>(), x0.data_ptr<float>(), a.b, a.chw, a.out.stride(0),
            static_cast<int>(mean_type), clip, static_cast<float>(eta));
  return finish(sample, x0, x, model_out, grad.has_value());
}

}  // namespace
}  // namespace adm_fast_cpu

TORCH_LIBRARY(adm_fast_cpu, m) {
  m.def(
      "group_norm_act_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? "
      "shift, int num_groups, float eps, bool act) -> (Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_act_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, "
      "Tensor? shift, Tensor mean, Tensor rstd, int num_groups, bool act, bool need_wb) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ddpm_step(Tensor x, Tensor model_out, Tensor noise, Tensor coefs, Tensor? grad, "
      "int mean_type, int var_type, bool clip) -> (Tensor, Tensor)");
  m.def(
      "ddim_step(Tensor x, Tensor model_out, Tensor noise, Tensor coefs, Tensor? grad, "
      "int mean_type, bool clip, float eta) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(adm_fast_cpu, CPU, m) {
  m.impl("group_norm_act_fwd", &adm_fast_cpu::group_norm_act_fwd_op);
  m.impl("group_norm_act_bwd", &adm_fast_cpu::group_norm_act_bwd_op);
  m.impl("ddpm_step", &adm_fast_cpu::ddpm_step_op);
  m.impl("ddim_step", &adm_fast_cpu::ddim_step_op);
}

// Importing the module registers the ops above; build_info() says how it was built.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("build_info", [] {
    std::string info = "compiler ";
#if defined(__clang__)
    info += "clang " __clang_version__;
#elif defined(__GNUC__)
    info += "gcc " __VERSION__;
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    info += "; SIMD clones avx512f/avx2/default";
#else
    info += "; portable SIMD";
#endif
    return info;
  });
}
