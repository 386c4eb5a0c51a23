// One DDPM / DDIM sampling step in CUDA, one pass over x_t, the model output,
// the guidance gradient and the noise. Blocks are laid out (chunk, sample) so
// the sample's coefficients are block-wide scalars. Threads run through a
// sample in x's memory order (x and the outputs coalesced); each other tensor
// is read with its own strides, NCHW or channels-last (on a GPU the model
// output and the guidance gradient come out channels_last, x and the noise
// NCHW). Arithmetic in the order of adm_fast/ops/diffusion_step.py, in fp32.
#include "../step_codes.h"
#include "common.cuh"
#include "kernels.h"

namespace adm_fast_cuda {
namespace {

using namespace adm_fast;  // the step codes (csrc/step_codes.h)

constexpr int kThreads = 256;

__device__ __forceinline__ float pred_x0(float x, float out, float a, float b, int mean_type,
                                         bool clip) {
  float x0 = mean_type == kMeanEps ? a * x - b * out
             : (mean_type == kMeanXStart ? out : a * out - b * x);
  // Selects, not fminf/fmaxf, which would turn a NaN into ±1 where torch.clamp keeps it.
  return clip ? (x0 < -1.0f ? -1.0f : (x0 > 1.0f ? 1.0f : x0)) : x0;
}

// The sizes and every tensor's strides; x's also index sample and x0.
struct Geometry {
  int64_t b, c, hw;
  Strides3 x, out, noise, grad;
};

Geometry geometry_of(const StepArgs& a) {
  return {a.b, a.c, a.hw, a.sx, a.sout, a.snoise, a.sgrad};
}

__device__ __forceinline__ int64_t at(const Strides3& s, int64_t n, int64_t ch, int64_t p) {
  return n * s.b + ch * s.c + p * s.hw;
}

// The channel and position of a sample's i-th element in x's memory order.
__device__ __forceinline__ void locate(const Geometry& g, int64_t i, int64_t& ch, int64_t& p) {
  if (g.x.c == 1 && g.c > 1) {
    ch = i % g.c;
    p = i / g.c;
  } else {
    ch = i / g.hw;
    p = i % g.hw;
  }
}

template <typename T, typename To>
__global__ void ddpm_kernel(const T* __restrict__ x, const To* __restrict__ out,
                            const T* __restrict__ noise, const T* __restrict__ grad,
                            const float* __restrict__ coefs, float* __restrict__ sample,
                            float* __restrict__ x0_out, Geometry g, int mean_type, int var_type,
                            bool clip) {
  const int64_t n = blockIdx.y, i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, b = g.b;
  if (i >= g.c * g.hw) return;
  const float a = coefs[kDdpmA * b + n], bb = coefs[kDdpmB * b + n];
  const float c1 = coefs[kDdpmC1 * b + n], c2 = coefs[kDdpmC2 * b + n];
  const float lo = coefs[kDdpmLo * b + n], hi = coefs[kDdpmHi * b + n];
  const float fixed_var = coefs[kDdpmVar * b + n], nonzero = coefs[kDdpmNonzero * b + n];
  int64_t ch, p;
  locate(g, i, ch, p);
  const int64_t row = at(g.x, n, ch, p);
  const float xv = to_f(x[row]), o = to_f(out[at(g.out, n, ch, p)]);
  float log_var, var;
  if (var_type == kVarFixed) {
    log_var = lo;
    var = fixed_var;
  } else {
    const float v = to_f(out[at(g.out, n, g.c + ch, p)]);
    log_var = var_type == kVarLearnedRange
                  ? ((v + 1.0f) / 2.0f) * hi + (1.0f - (v + 1.0f) / 2.0f) * lo
                  : v;
    var = expf(log_var);
  }
  const float x0 = pred_x0(xv, o, a, bb, mean_type, clip);
  float mean = mean_type == kMeanXPrev ? o : c1 * x0 + c2 * xv;
  if (grad != nullptr) mean += var * to_f(grad[at(g.grad, n, ch, p)]);
  sample[row] = mean + nonzero * expf(0.5f * log_var) * to_f(noise[at(g.noise, n, ch, p)]);
  x0_out[row] = x0;
}

template <typename T, typename To>
__global__ void ddim_kernel(const T* __restrict__ x, const To* __restrict__ out,
                            const T* __restrict__ noise, const T* __restrict__ grad,
                            const float* __restrict__ coefs, float* __restrict__ sample,
                            float* __restrict__ x0_out, Geometry g, int mean_type, bool clip,
                            float eta) {
  const int64_t n = blockIdx.y, i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, b = g.b;
  if (i >= g.c * g.hw) return;
  const float a = coefs[kDdimA * b + n], bb = coefs[kDdimB * b + n];
  const float recip = coefs[kDdimRecip * b + n], recipm1 = coefs[kDdimRecipm1 * b + n];
  const float ab = coefs[kDdimAlphaBar * b + n], ab_prev = coefs[kDdimAlphaBarPrev * b + n];
  const float nonzero = coefs[kDdimNonzero * b + n];
  int64_t ch, p;
  locate(g, i, ch, p);
  const int64_t row = at(g.x, n, ch, p);
  const float xv = to_f(x[row]);
  float x0 = pred_x0(xv, to_f(out[at(g.out, n, ch, p)]), a, bb, mean_type, clip);
  if (grad != nullptr) {
    float eps = (recip * xv - x0) / recipm1;
    eps = eps - sqrtf(1.0f - ab) * to_f(grad[at(g.grad, n, ch, p)]);
    x0 = recip * xv - recipm1 * eps;
  }
  const float eps = (recip * xv - x0) / recipm1;
  const float sigma = eta * sqrtf((1.0f - ab_prev) / (1.0f - ab)) * sqrtf(1.0f - ab / ab_prev);
  float s = x0 * sqrtf(ab_prev) + sqrtf(1.0f - ab_prev - sigma * sigma) * eps;
  if (eta != 0.0f) s += nonzero * sigma * to_f(noise[at(g.noise, n, ch, p)]);
  sample[row] = s;
  x0_out[row] = x0;
}

template <typename F>
cudaError_t dispatch2(DType t, DType to, F&& f) {
  auto inner = [&](auto xt) -> cudaError_t {
    using X = decltype(xt);
    switch (to) {
      case DType::kFloat: return f(X{}, float{});
      case DType::kHalf: return f(X{}, __half{});
      case DType::kBFloat16: return f(X{}, __nv_bfloat16{});
    }
    return cudaErrorInvalidValue;
  };
  switch (t) {
    case DType::kFloat: return inner(float{});
    case DType::kHalf: return inner(__half{});
    case DType::kBFloat16: return inner(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

dim3 grid_for(const StepArgs& a) {
  return dim3(unsigned((a.c * a.hw + kThreads - 1) / kThreads), unsigned(a.b));
}

}  // namespace

cudaError_t ddpm_step(const StepArgs& a, int var_type, cudaStream_t stream) {
  return dispatch2(a.dtype, a.out_dtype, [&](auto xt, auto ot) {
    using T = decltype(xt);
    using To = decltype(ot);
    ddpm_kernel<T, To><<<grid_for(a), kThreads, 0, stream>>>(
        static_cast<const T*>(a.x), static_cast<const To*>(a.model_out),
        static_cast<const T*>(a.noise), static_cast<const T*>(a.grad), a.coefs, a.sample, a.x0,
        geometry_of(a), a.mean_type, var_type, a.clip);
    return cudaGetLastError();
  });
}

cudaError_t ddim_step(const StepArgs& a, float eta, cudaStream_t stream) {
  return dispatch2(a.dtype, a.out_dtype, [&](auto xt, auto ot) {
    using T = decltype(xt);
    using To = decltype(ot);
    ddim_kernel<T, To><<<grid_for(a), kThreads, 0, stream>>>(
        static_cast<const T*>(a.x), static_cast<const To*>(a.model_out),
        static_cast<const T*>(a.noise), static_cast<const T*>(a.grad), a.coefs, a.sample, a.x0,
        geometry_of(a), a.mean_type, a.clip, eta);
    return cudaGetLastError();
  });
}

}  // namespace adm_fast_cuda
