// The only CPU file that touches tensors: checks (csrc/checks.h), allocation,
// dtype dispatch, and the CPU kernels of the adm_fast_native ops.
#include <ATen/ATen.h>
#include <torch/extension.h>  // pybind11 with the at::Tensor type caster
#include <torch/library.h>

#include <cstring>
#include <string>
#include <tuple>

#include "../checks.h"
#include "kernels.h"

namespace adm_fast_cpu {
namespace {

using at::Tensor;
using c10::optional;

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

// x as [N, HW, C] with C contiguous (channels_last, or the [N, C, T] view of a
// channels_last map), rather than NCHW-contiguous.
bool channels_last_like(const Tensor& x) {
  return !x.is_contiguous() && x.dim() >= 3 && x.movedim(1, -1).is_contiguous();
}

// true: channels-last x; false: NCHW-contiguous.
bool check_cpu_x(const char* op, const Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor");
  const bool nhwc = channels_last_like(x);
  TORCH_CHECK(nhwc || x.is_contiguous(), op,
              ": the CPU kernels take NCHW-contiguous or channels-last x");
  return nhwc;
}

// t in x's layout (a copy only where it is not already).
Tensor like_layout(const Tensor& t, const Tensor& x, bool nhwc) {
  Tensor u = t.to(x.scalar_type());
  return nhwc ? u.movedim(1, -1).contiguous().movedim(-1, 1) : u.contiguous();
}

std::tuple<Tensor, Tensor, Tensor> group_norm_act_fwd_op(
    const Tensor& x, int64_t groups, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& scale, const optional<Tensor>& shift,
    double eps, bool act) {
  constexpr const char* op = "adm_fast_native::group_norm_act_fwd";
  adm_fast::check_group_norm(op, x, groups, weight, bias, scale, shift);
  adm_fast::check_eps(op, eps);
  const bool nhwc = check_cpu_x(op, x);
  const int64_t n = x.size(0), c = x.size(1), hw = x.numel() / (n * c);
  Tensor w = f32(weight), b = f32(bias), s = f32(scale), sh = f32(shift);
  Tensor y = at::empty_like(x);  // x's strides: NCHW or channels-last
  Tensor mean = at::empty({n, groups}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({n, groups}, x.options().dtype(at::kFloat));
  ADM_DISPATCH(x.scalar_type(), "gn_fwd", [&] {
    auto fwd = nhwc ? group_norm_act_fwd_nhwc<scalar_t> : group_norm_act_fwd<scalar_t>;
    fwd(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), mean.data_ptr<float>(),
        rstd.data_ptr<float>(), ptr(w), ptr(b), ptr(s), ptr(sh), n, c, hw, groups, eps, act);
  });
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> group_norm_act_bwd_op(
    const Tensor& dy, const Tensor& x, int64_t groups, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& scale, const optional<Tensor>& shift,
    const Tensor& mean, const Tensor& rstd, bool act, bool need_wb) {
  constexpr const char* op = "adm_fast_native::group_norm_act_bwd";
  adm_fast::check_group_norm(op, x, groups, weight, bias, scale, shift);
  adm_fast::check_group_norm_backward(op, dy, x, groups, mean, rstd);
  const bool nhwc = check_cpu_x(op, x);
  const int64_t n = x.size(0), c = x.size(1), hw = x.numel() / (n * c);
  Tensor g = like_layout(dy, x, nhwc);
  Tensor w = f32(weight), b = f32(bias), s = f32(scale), sh = f32(shift);
  Tensor m = mean.to(at::kFloat).contiguous(), r = rstd.to(at::kFloat).contiguous();
  Tensor dx = at::empty_like(x);
  auto opts = x.options().dtype(at::kFloat);
  Tensor ds = scale.has_value() ? at::empty({n, c}, opts) : Tensor();
  Tensor dsh = shift.has_value() ? at::empty({n, c}, opts) : Tensor();
  Tensor t1 = need_wb ? at::empty({n, c}, opts) : Tensor();
  Tensor t2 = need_wb ? at::empty({n, c}, opts) : Tensor();
  ADM_DISPATCH(x.scalar_type(), "gn_bwd", [&] {
    auto bwd = nhwc ? group_norm_act_bwd_nhwc<scalar_t> : group_norm_act_bwd<scalar_t>;
    bwd(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), ptr(m), ptr(r), ptr(w), ptr(b), ptr(s),
        ptr(sh), dx.data_ptr<scalar_t>(), ds.defined() ? ds.data_ptr<float>() : nullptr,
        dsh.defined() ? dsh.data_ptr<float>() : nullptr, need_wb ? t1.data_ptr<float>() : nullptr,
        need_wb ? t2.data_ptr<float>() : nullptr, n, c, hw, groups, act);
  });
  return adm_fast::group_norm_grads(x, dx, t1, t2, ds, dsh, weight, bias, scale, shift,
                                   need_wb);
}

struct StepArgs {
  Tensor x, out, noise, grad, coefs;
  int64_t b, chw;
};

// Inputs as contiguous fp32 (copies only where they are not already).
StepArgs step_args(const Tensor& x, const Tensor& model_out, const Tensor& noise,
                   const Tensor& coefs, const optional<Tensor>& grad) {
  TORCH_CHECK(x.device().is_cpu(), "adm_fast_native step: x must be a CPU tensor");
  const int64_t b = x.size(0), chw = b ? x.numel() / b : 0;
  auto f = [](const Tensor& t) { return t.to(at::kFloat).contiguous(); };
  return {f(x), f(model_out), f(noise), grad.has_value() ? f(*grad) : Tensor(), f(coefs), b,
          chw};
}

// fp32 outputs: what the step ops' out_dtypes (adm_fast.ops.diffusion_step) give for the
// fp32 coefficients adm_fast passes; a direct caller casts as it likes.
std::tuple<Tensor, Tensor> ddpm_step_op(const Tensor& x, const Tensor& model_out,
                                        const Tensor& noise, const Tensor& coefs,
                                        const optional<Tensor>& grad, int64_t mean_type,
                                        int64_t var_type, bool clip) {
  adm_fast::check_step("adm_fast_native::ddpm_step", x, model_out, noise, coefs, grad,
                       adm_fast::kDdpmRows, mean_type, var_type);
  TORCH_CHECK(var_type >= 0, "adm_fast_native::ddpm_step: var_type code ", var_type,
              " is negative");
  StepArgs a = step_args(x, model_out, noise, coefs, grad);
  Tensor sample = at::empty_like(a.x), x0 = at::empty_like(a.x);
  ddpm_step(ptr(a.x), ptr(a.out), ptr(a.noise), ptr(a.grad), ptr(a.coefs),
            sample.data_ptr<float>(), x0.data_ptr<float>(), a.b, a.chw, a.out.stride(0),
            static_cast<int>(mean_type), static_cast<int>(var_type), clip);
  return {sample, x0};
}

std::tuple<Tensor, Tensor> ddim_step_op(const Tensor& x, const Tensor& model_out,
                                        const Tensor& noise, const Tensor& coefs,
                                        const optional<Tensor>& grad, int64_t mean_type,
                                        bool clip, double eta) {
  adm_fast::check_step("adm_fast_native::ddim_step", x, model_out, noise, coefs, grad,
                       adm_fast::kDdimRows, mean_type, -1);
  TORCH_CHECK(std::isfinite(eta), "adm_fast_native::ddim_step: eta must be finite, got ", eta);
  StepArgs a = step_args(x, model_out, noise, coefs, grad);
  Tensor sample = at::empty_like(a.x), x0 = at::empty_like(a.x);
  ddim_step(ptr(a.x), ptr(a.out), ptr(a.noise), ptr(a.grad), ptr(a.coefs),
            sample.data_ptr<float>(), x0.data_ptr<float>(), a.b, a.chw, a.out.stride(0),
            static_cast<int>(mean_type), clip, static_cast<float>(eta));
  return {sample, x0};
}

constexpr const char* kConvOp = "adm_fast_native::conv3x3_winograd";

void check_conv_x(const char* op, const Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor");
  TORCH_CHECK(x.dim() == 4, op, ": x must be [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be fp32, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": x must be channels_last (its channels contiguous)");
}

// c: the input channels x has, or -1 where there is no x to match.
void check_conv_weight(const char* op, const Tensor& weight, int64_t c = -1) {
  TORCH_CHECK(weight.device().is_cpu(), op, ": weight must be a CPU tensor");
  TORCH_CHECK(weight.scalar_type() == at::kFloat, op, ": weight must be fp32, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && (c < 0 || weight.size(1) == c) && weight.size(2) == 3 &&
                  weight.size(3) == 3,
              op, ": weight must be [O, C", c < 0 ? "" : "=", c < 0 ? "" : std::to_string(c),
              ", 3, 3], got ", weight.sizes());
}

// U [16, ceil(O'/16), C', 16] of weight [O, C, 3, 3] in any layout (strips of
// 16 output channels, zero past O'); turned: of the kernel turned by 180° with
// its in/out channels swapped (C' = O, O' = C), which ∇x's convolution takes,
// read in place through negated strides.
Tensor winograd_weight(const Tensor& weight, bool turned) {
  const int64_t o = weight.size(0), c = weight.size(1);
  const int64_t so = weight.stride(0), sc = weight.stride(1), sy = weight.stride(2),
                sx = weight.stride(3);
  Tensor u = at::empty({16, winograd_strips(turned ? c : o), turned ? o : c, 16},
                       weight.options());
  if (u.numel() == 0) return u;
  const float* w = weight.data_ptr<float>();
  if (turned) {
    winograd_f23_weight(w + 2 * sy + 2 * sx, u.data_ptr<float>(), c, o, sc, so, -sy, -sx);
  } else {
    winograd_f23_weight(w, u.data_ptr<float>(), o, c, so, sc, sy, sx);
  }
  return u;
}

// The convolution from U: what conv3x3_winograd does after the weights' transform.
Tensor conv_from_u(const char* op, const Tensor& x, const Tensor& u, const Tensor& weight,
                   const optional<Tensor>& bias, int64_t o) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat &&
                    bias->sizes() == at::IntArrayRef{o},
                op, ": bias must be a CPU fp32 [", o, "] tensor, got ", bias->scalar_type(), " ",
                bias->sizes());
  }
  Tensor y = at::empty({n, o, h, w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  if (c == 0) {  // no inputs: the bias alone
    return bias.has_value() ? y.copy_(bias->view({1, o, 1, 1}).expand_as(y)) : y.zero_();
  }
  if (!has_avx2_fma()) {  // the products need AVX2+FMA: elsewhere, torch's convolution
    TORCH_CHECK(weight.defined(), op,
                ": this CPU lacks AVX2+FMA: take conv3x3_winograd (from the weight), not U");
    return at::conv2d(x, weight, bias, 1, 1).contiguous(at::MemoryFormat::ChannelsLast);
  }
  Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  Tensor uc = u.defined() ? u : winograd_weight(weight, false);
  winograd_f23_conv(x.data_ptr<float>(), uc.data_ptr<float>(),
                    b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(), n, h, w, c,
                    o);
  return y;
}

// y = conv2d(x, weight, bias, padding=1) for channels-last fp32 x [N, C, H, W]
// and weight [O, C, 3, 3], by Winograd F(2x2, 3x3) (csrc/cpu/conv3x3_winograd.cpp).
Tensor conv3x3_winograd_op(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias) {
  check_conv_x(kConvOp, x);
  check_conv_weight(kConvOp, weight, x.size(1));
  return conv_from_u(kConvOp, x, Tensor(), weight, bias, weight.size(0));
}

// The weights' transform alone, U [16, ceil(O/16), C, 16] (turned: [16,
// ceil(C/16), O, 16], of the kernel that ∇x's convolution takes), for a caller
// that keeps it across calls.
Tensor conv3x3_winograd_weight_op(const Tensor& weight, bool turned) {
  constexpr const char* op = "adm_fast_native::conv3x3_winograd_weight";
  check_conv_weight(op, weight);
  TORCH_CHECK(has_avx2_fma(), op, ": the Winograd products need AVX2+FMA, which this CPU lacks");
  return winograd_weight(weight, turned);
}

// conv3x3_winograd from its weights' transform U (conv3x3_winograd_weight) for
// out_channels outputs: U is [16, ceil(out_channels/16), C, 16].
Tensor conv3x3_winograd_u_op(const Tensor& x, const Tensor& u, int64_t out_channels,
                             const optional<Tensor>& bias) {
  constexpr const char* op = "adm_fast_native::conv3x3_winograd_u";
  check_conv_x(op, x);
  TORCH_CHECK(out_channels >= 0, op, ": out_channels must be >= 0, got ", out_channels);
  TORCH_CHECK(u.device().is_cpu() && u.scalar_type() == at::kFloat && u.is_contiguous(), op,
              ": u must be a contiguous CPU fp32 tensor");
  TORCH_CHECK(u.dim() == 4 && u.size(0) == 16 && u.size(1) == winograd_strips(out_channels) &&
                  u.size(2) == x.size(1) && u.size(3) == 16,
              op, ": u must be [16, ", winograd_strips(out_channels), ", C=", x.size(1),
              ", 16] for ", out_channels, " output channels, got ", u.sizes());
  TORCH_CHECK(has_avx2_fma(), op, ": the Winograd products need AVX2+FMA, which this CPU lacks");
  return conv_from_u(op, x, u, Tensor(), bias, out_channels);
}

// The weights' gradient of that convolution, [O, C, 3, 3] channels_last, from
// channels-last fp32 x [N, C, H, W] and dy [N, O, H, W]: Winograd's 16
// products per tile as 16 matrix products Ŷ[ξ]ᵀ·V[ξ] summed over the tiles
// (torch's, i.e. MKL's), 2.25x fewer multiplications than the direct reduction.
Tensor conv3x3_winograd_weight_grad_op(const Tensor& x, const Tensor& dy) {
  constexpr const char* op = "adm_fast_native::conv3x3_winograd_weight_grad";
  TORCH_CHECK(x.device().is_cpu() && dy.device().is_cpu(), op,
              ": x and dy must be CPU tensors");
  TORCH_CHECK(x.dim() == 4 && dy.dim() == 4 && dy.size(0) == x.size(0) &&
                  dy.size(2) == x.size(2) && dy.size(3) == x.size(3),
              op, ": x must be [N, C, H, W] and dy [N, O, H, W], got ", x.sizes(), " and ",
              dy.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && dy.scalar_type() == at::kFloat, op,
              ": x and dy must be fp32, got ", x.scalar_type(), " and ", dy.scalar_type());
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  dy.is_contiguous(at::MemoryFormat::ChannelsLast),
              op, ": x and dy must be channels_last (their channels contiguous)");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), o = dy.size(1);
  if (n * h * w == 0 || c == 0 || o == 0) return at::zeros({o, c, 3, 3}, x.options());
  const int64_t t = n * ((h + 1) / 2) * ((w + 1) / 2);
  // By chunks of tiles whose V and Ŷ take ~2 MB (they stay in cache between the
  // transforms and the product), at least 64 tiles a chunk (the products' K).
  const int64_t tb = std::min<int64_t>(
      t, std::max<int64_t>(64, ((2 << 20) / (16 * (c + o) * 4)) / 8 * 8));
  Tensor v = at::empty({16, tb, c}, x.options()), yh = at::empty({16, tb, o}, x.options());
  Tensor dut = at::zeros({16, o, c}, x.options());
  for (int64_t t0 = 0; t0 < t; t0 += tb) {
    const int64_t nt = std::min(tb, t - t0);
    winograd_f23_transform_input(x.data_ptr<float>(), v.data_ptr<float>(), n, h, w, c, t0, nt,
                                 tb * c);
    winograd_f23_transform_grad(dy.data_ptr<float>(), yh.data_ptr<float>(), n, h, w, o, t0, nt,
                                tb * o);
    dut.baddbmm_(yh.narrow(1, 0, nt).transpose(1, 2), v.narrow(1, 0, nt));
  }
  Tensor dw = at::empty({o, c, 3, 3}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  winograd_f23_weight_grad(dut.data_ptr<float>(), dw.data_ptr<float>(), o, c);
  return dw;
}

}  // namespace
}  // namespace adm_fast_cpu

// The schemas are defined in Python (adm_fast/ops/native.py); this registers the
// CPU kernels for them.
TORCH_LIBRARY_IMPL(adm_fast_native, CPU, m) {
  m.impl("group_norm_act_fwd", &adm_fast_cpu::group_norm_act_fwd_op);
  m.impl("group_norm_act_bwd", &adm_fast_cpu::group_norm_act_bwd_op);
  m.impl("ddpm_step", &adm_fast_cpu::ddpm_step_op);
  m.impl("ddim_step", &adm_fast_cpu::ddim_step_op);
  m.impl("conv3x3_winograd", &adm_fast_cpu::conv3x3_winograd_op);
  m.impl("conv3x3_winograd_weight", &adm_fast_cpu::conv3x3_winograd_weight_op);
  m.impl("conv3x3_winograd_u", &adm_fast_cpu::conv3x3_winograd_u_op);
  m.impl("conv3x3_winograd_weight_grad", &adm_fast_cpu::conv3x3_winograd_weight_grad_op);
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
  // Whether the Winograd ops run here (their products need AVX2+FMA).
  mod.def("has_avx2_fma", [] { return adm_fast_cpu::has_avx2_fma(); });
  // Whether two CPU tensors of one layout hold the same bytes: the Winograd
  // weight cache's check on every call. torch.equal runs it as a parallel
  // region, and on a machine whose cores are busy each region waits for a
  // descheduled thread (ms); one memcmp of a weight takes microseconds.
  mod.def("bytes_equal", [](const at::Tensor& a, const at::Tensor& b) {
    TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "bytes_equal: CPU tensors only");
    TORCH_CHECK(a.sizes() == b.sizes() && a.strides() == b.strides() &&
                    a.scalar_type() == b.scalar_type(),
                "bytes_equal: the tensors must have one shape, strides and dtype");
    TORCH_CHECK(a.is_non_overlapping_and_dense() && b.is_non_overlapping_and_dense(),
                "bytes_equal: the tensors must be dense");
    for (auto s : a.strides()) TORCH_CHECK(s >= 0, "bytes_equal: negative strides");
    const void* pa = a.data_ptr();
    const void* pb = b.data_ptr();
    const size_t n = a.nbytes();
    // A fake or meta tensor has no bytes (its data pointer is null): refuse, not read.
    TORCH_CHECK(n == 0 || (pa != nullptr && pb != nullptr),
                "bytes_equal: a tensor holds no data (meta or fake)");
    pybind11::gil_scoped_release released;
    return std::memcmp(pa, pb, n) == 0;
  });
}
