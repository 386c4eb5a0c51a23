// The only CUDA-side file that touches tensors: checks, allocation (through
// PyTorch's caching allocator), launches on PyTorch's current stream with
// every launch's status checked (argument checks: csrc/checks.h), and the CUDA
// kernels of the adm_fast_native ops. Built only against a CUDA build of PyTorch.
// Only c10's CUDA headers: ATen/cuda/CUDAContext.h pulls in cuBLAS, cuSPARSE and
// cuSOLVER headers, which a toolkit of nvcc and the runtime alone lacks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <atomic>
#include <string>
#include <tuple>

#include "../checks.h"
#include "kernels.h"

namespace adm_fast_cuda {
namespace {

using at::Tensor;
using c10::optional;

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat;
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "adm_fast CUDA kernels take fp32/fp16/bf16, got ", t.scalar_type());
  }
  return DType::kFloat;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "adm_fast CUDA ", what, " failed: ", cudaGetErrorString(err));
}

void check_cuda(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device());
}

Tensor f32(const optional<Tensor>& t, const Tensor& like, const char* name) {
  if (!t.has_value()) return Tensor();
  check_cuda(*t, like, name);
  return t->to(at::kFloat).contiguous();
}

const float* ptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// Multiprocessors of the device, read once per device (the caller holds a guard
// on it). cudaDeviceGetAttribute is the runtime's own, no math library needed.
int sm_count(int device) {
  static std::atomic<int> counts[64];  // zero-initialised; racing writers store the same value
  TORCH_CHECK(device >= 0 && device < 64, "adm_fast CUDA kernels: device index ", device,
              " out of range");
  int n = counts[device].load(std::memory_order_relaxed);
  if (n == 0) {
    check_launch(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device),
                 "cudaDeviceGetAttribute(multiprocessors)");
    n = n > 0 ? n : 1;
    counts[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// x as [N, C, HW]: NCHW-contiguous (false), or channels-last (true): C
// contiguous, as channels_last maps are and the [N, C, T] view of one that
// attention's norm takes; the kernels see [N, HW, C] either way.
bool layout_of(const Tensor& x) {
  if (x.is_contiguous()) return false;
  TORCH_CHECK(x.dim() >= 3 && x.movedim(1, -1).is_contiguous(),
              "x must be contiguous or channels-last (its channels contiguous), got strides ",
              x.strides());
  return true;
}

// t in x's layout (a copy only where it is not already).
Tensor like_layout(const Tensor& t, const Tensor& x, bool channels_last) {
  Tensor u = t.to(x.scalar_type());
  return channels_last ? u.movedim(1, -1).contiguous().movedim(-1, 1) : u.contiguous();
}

GroupNormArgs args_of(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& s,
                      const Tensor& sh, int64_t groups, double eps, bool act) {
  TORCH_CHECK(x.dim() >= 2 && groups > 0 && x.size(1) % groups == 0,
              "x must be [N, C, *spatial] with num_groups dividing C");
  GroupNormArgs a{};
  a.dtype = dtype_of(x);
  a.x = x.data_ptr();
  a.weight = ptr(w);
  a.bias = ptr(b);
  a.scale = ptr(s);
  a.shift = ptr(sh);
  a.n = x.size(0);
  a.c = x.size(1);
  a.hw = x.numel() / std::max<int64_t>(1, a.n * a.c);
  a.groups = groups;
  a.eps = static_cast<float>(eps);
  a.act = act;
  a.channels_last = layout_of(x);
  a.sm_count = sm_count(x.get_device());
  return a;
}

std::tuple<Tensor, Tensor, Tensor> group_norm_act_fwd_op(
    const Tensor& x, int64_t groups, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& scale, const optional<Tensor>& shift,
    double eps, bool act) {
  constexpr const char* op = "adm_fast_native::group_norm_act_fwd";
  adm_fast::check_group_norm(op, x, groups, weight, bias, scale, shift);
  adm_fast::check_eps(op, eps);
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor w = f32(weight, x, "weight"), b = f32(bias, x, "bias"), s = f32(scale, x, "scale"),
         sh = f32(shift, x, "shift");
  GroupNormArgs a = args_of(x, w, b, s, sh, groups, eps, act);
  Tensor y = at::empty_like(x);
  Tensor mean = at::empty({a.n, groups}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({a.n, groups}, x.options().dtype(at::kFloat));
  a.y = y.data_ptr();
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  Tensor ws = at::empty({std::max<int64_t>(1, group_norm_act_forward_workspace(a))},
                        x.options().dtype(at::kFloat));
  check_launch(group_norm_act_forward(a, ws.data_ptr<float>(),
                                      c10::cuda::getCurrentCUDAStream().stream()),
               "group_norm_act forward");
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> group_norm_act_bwd_op(
    const Tensor& dy, const Tensor& x, int64_t groups, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& scale, const optional<Tensor>& shift,
    const Tensor& mean, const Tensor& rstd, bool act, bool need_wb) {
  constexpr const char* op = "adm_fast_native::group_norm_act_bwd";
  adm_fast::check_group_norm(op, x, groups, weight, bias, scale, shift);
  adm_fast::check_group_norm_backward(op, dy, x, groups, mean, rstd);
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor w = f32(weight, x, "weight"), b = f32(bias, x, "bias"), s = f32(scale, x, "scale"),
         sh = f32(shift, x, "shift");
  GroupNormBackwardArgs a{};
  a.fwd = args_of(x, w, b, s, sh, groups, 0.0, act);
  Tensor g = like_layout(dy, x, a.fwd.channels_last);
  Tensor m = mean.to(at::kFloat).contiguous(), r = rstd.to(at::kFloat).contiguous();
  Tensor dx = at::empty_like(x);
  auto opts = x.options().dtype(at::kFloat);
  Tensor ds = scale.has_value() ? at::empty({a.fwd.n, a.fwd.c}, opts) : Tensor();
  Tensor dsh = shift.has_value() ? at::empty({a.fwd.n, a.fwd.c}, opts) : Tensor();
  Tensor t1 = need_wb ? at::empty({a.fwd.n, a.fwd.c}, opts) : Tensor();
  Tensor t2 = need_wb ? at::empty({a.fwd.n, a.fwd.c}, opts) : Tensor();
  a.dy = g.data_ptr();
  a.dx = dx.data_ptr();
  a.mean = m.data_ptr<float>();
  a.rstd = r.data_ptr<float>();
  a.dscale = ds.defined() ? ds.data_ptr<float>() : nullptr;
  a.dshift = dsh.defined() ? dsh.data_ptr<float>() : nullptr;
  a.t1 = need_wb ? t1.data_ptr<float>() : nullptr;
  a.t2 = need_wb ? t2.data_ptr<float>() : nullptr;
  Tensor ws = at::empty({std::max<int64_t>(1, group_norm_act_backward_workspace(a))}, opts);
  check_launch(group_norm_act_backward(a, ws.data_ptr<float>(),
                                       c10::cuda::getCurrentCUDAStream().stream()),
               "group_norm_act backward");
  return adm_fast::group_norm_grads(x, dx, t1, t2, ds, dsh, weight, bias, scale, shift,
                                   need_wb);
}

// t's strides as [B, C, HW]: NCHW-contiguous or channels-last (C contiguous).
Strides3 strides3(const Tensor& t, const char* name) {
  const int64_t c = t.size(1), hw = t.numel() / std::max<int64_t>(1, t.size(0) * c);
  if (t.is_contiguous()) return {c * hw, hw, 1};
  TORCH_CHECK(t.dim() >= 3 && t.movedim(1, -1).is_contiguous(), name,
              " must be NCHW-contiguous or channels-last (its channels contiguous), got strides ",
              t.strides());
  return {c * hw, 1, c};
}

StepArgs step_args(const Tensor& x, const Tensor& model_out, const Tensor& noise,
                   const Tensor& coefs, const Tensor& grad) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  check_cuda(model_out, x, "model_out");
  check_cuda(noise, x, "noise");
  check_cuda(coefs, x, "coefs");
  TORCH_CHECK(noise.scalar_type() == x.scalar_type(), "noise must have x's dtype");
  StepArgs a{};
  a.dtype = dtype_of(x);
  a.out_dtype = dtype_of(model_out);
  a.x = x.data_ptr();
  a.model_out = model_out.data_ptr();
  a.noise = noise.data_ptr();
  a.sx = strides3(x, "x");
  a.sout = strides3(model_out, "model_out");
  a.snoise = strides3(noise, "noise");
  if (grad.defined()) {
    check_cuda(grad, x, "grad");
    TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "grad must have x's dtype");
    a.grad = grad.data_ptr();
    a.sgrad = strides3(grad, "grad");
  }
  a.b = x.size(0);
  a.c = x.size(1);
  a.hw = x.numel() / std::max<int64_t>(1, a.b * a.c);
  return a;
}

// fp32 outputs: what the step ops' out_dtypes (adm_fast.ops.diffusion_step) give for the
// fp32 coefficients adm_fast passes; a direct caller casts as it likes.
std::tuple<Tensor, Tensor> run_step(const Tensor& x, const Tensor& model_out, const Tensor& noise,
                                    const Tensor& coefs, const optional<Tensor>& grad,
                                    int64_t mean_type, bool clip, bool ddim, int64_t var_type,
                                    double eta) {
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor c = coefs.to(at::kFloat).contiguous();
  StepArgs a = step_args(x, model_out, noise, c, grad.has_value() ? *grad : Tensor());
  // In x's layout, which x's strides index (adm_fast.ops.diffusion_step.like_x): a
  // channels-last x is dense, so empty_like keeps its strides.
  auto empty_out = [&] {
    return x.is_contiguous() ? at::empty(x.sizes(), x.options().dtype(at::kFloat))
                             : at::empty_like(x, x.options().dtype(at::kFloat));
  };
  Tensor sample = empty_out(), x0 = empty_out();
  a.coefs = c.data_ptr<float>();
  a.sample = sample.data_ptr<float>();
  a.x0 = x0.data_ptr<float>();
  a.mean_type = static_cast<int>(mean_type);
  a.clip = clip;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(ddim ? ddim_step(a, static_cast<float>(eta), stream)
                    : ddpm_step(a, static_cast<int>(var_type), stream),
               ddim ? "ddim_step" : "ddpm_step");
  return {sample, x0};
}

std::tuple<Tensor, Tensor> ddpm_step_op(const Tensor& x, const Tensor& model_out,
                                        const Tensor& noise, const Tensor& coefs,
                                        const optional<Tensor>& grad, int64_t mean_type,
                                        int64_t var_type, bool clip) {
  adm_fast::check_step("adm_fast_native::ddpm_step", x, model_out, noise, coefs, grad,
                       adm_fast::kDdpmRows, mean_type, var_type);
  TORCH_CHECK(var_type >= 0, "adm_fast_native::ddpm_step: var_type code ", var_type,
              " is negative");
  return run_step(x, model_out, noise, coefs, grad, mean_type, clip, false, var_type, 0.0);
}

std::tuple<Tensor, Tensor> ddim_step_op(const Tensor& x, const Tensor& model_out,
                                        const Tensor& noise, const Tensor& coefs,
                                        const optional<Tensor>& grad, int64_t mean_type,
                                        bool clip, double eta) {
  adm_fast::check_step("adm_fast_native::ddim_step", x, model_out, noise, coefs, grad,
                       adm_fast::kDdimRows, mean_type, -1);
  TORCH_CHECK(std::isfinite(eta), "adm_fast_native::ddim_step: eta must be finite, got ", eta);
  return run_step(x, model_out, noise, coefs, grad, mean_type, clip, true, 0, eta);
}

}  // namespace
}  // namespace adm_fast_cuda

// The schemas are defined in Python (adm_fast/ops/native.py); this registers the
// CUDA kernels for them.
TORCH_LIBRARY_IMPL(adm_fast_native, CUDA, m) {
  m.impl("group_norm_act_fwd", &adm_fast_cuda::group_norm_act_fwd_op);
  m.impl("group_norm_act_bwd", &adm_fast_cuda::group_norm_act_bwd_op);
  m.impl("ddpm_step", &adm_fast_cuda::ddpm_step_op);
  m.impl("ddim_step", &adm_fast_cuda::ddim_step_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("build_info", [] {
#ifndef ADM_FAST_CUDA_ARCHS
#define ADM_FAST_CUDA_ARCHS "unknown"
#endif
    return std::string("CUDA ") + std::to_string(CUDART_VERSION / 1000) + "." +
           std::to_string(CUDART_VERSION % 1000 / 10) + ", kernels for TORCH_CUDA_ARCH_LIST=" +
           ADM_FAST_CUDA_ARCHS;
  });
}
