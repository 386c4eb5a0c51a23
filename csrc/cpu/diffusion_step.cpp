// One DDPM / DDIM sampling step on the CPU, in one pass (fp32). Arithmetic in
// the order of adm_fast/ops/step_math.py (guided-diffusion's).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "kernels.h"
#include "vec.h"

// No fused multiply-adds here: x_0 = a·x − b·eps cancels heavily near t = T
// (a, b ~ 100), and contracting it would round differently from the eager
// step the samplers are checked against.
#if defined(__GNUC__) && !defined(__clang__)
#define ADM_NO_FMA __attribute__((optimize("fp-contract=off")))
#else
#define ADM_NO_FMA
#endif

namespace adm_fast_cpu {
namespace {

constexpr int64_t kGrain = 16384;

ADM_NO_FMA inline float pred_x0(float x, float out, float a, float b, int mean_type, bool clip) {
  float x0 = mean_type == 0 ? a * x - b * out : mean_type == 1 ? out : a * out - b * x;
  return clip ? std::fmin(std::fmax(x0, -1.0f), 1.0f) : x0;
}

ADM_CLONES ADM_NO_FMA void ddpm_row(const float* x, const float* out, const float* v, const float* noise,
                         const float* grad, float* sample, float* x0_out, int64_t n,
                         const float* k, int mean_type, int var_type, bool clip) {
  const float a = k[0], b = k[1], c1 = k[2], c2 = k[3], lo = k[4], hi = k[5], fixed_var = k[6],
              nonzero = k[7];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float log_var, var;
    if (var_type == 2) {
      log_var = lo;
      var = fixed_var;
    } else {
      if (var_type == 1) {
        const float frac = (v[j] + 1.0f) / 2.0f;
        log_var = frac * hi + (1.0f - frac) * lo;
      } else {
        log_var = v[j];
      }
      var = vexp(log_var);
    }
    const float x0 = pred_x0(x[j], out[j], a, b, mean_type, clip);
    float mean = mean_type == 2 ? out[j] : c1 * x0 + c2 * x[j];
    if (grad) mean += var * grad[j];
    sample[j] = mean + nonzero * vexp(0.5f * log_var) * noise[j];
    x0_out[j] = x0;
  }
}

ADM_CLONES ADM_NO_FMA void ddim_row(const float* x, const float* out, const float* noise, const float* grad,
                         float* sample, float* x0_out, int64_t n, const float* k, int mean_type,
                         bool clip, float sigma, float sqrt_ab_prev, float eps_coef,
                         float guide) {
  const float a = k[0], b = k[1], recip = k[2], recipm1 = k[3], nonzero = k[6];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float x0 = pred_x0(x[j], out[j], a, b, mean_type, clip);
    if (grad) {
      float eps = (recip * x[j] - x0) / recipm1;
      eps = eps - guide * grad[j];
      x0 = recip * x[j] - recipm1 * eps;
    }
    const float eps = (recip * x[j] - x0) / recipm1;
    float s = x0 * sqrt_ab_prev + eps_coef * eps;
    if (sigma != 0.0f) s += nonzero * sigma * noise[j];
    sample[j] = s;
    x0_out[j] = x0;
  }
}

template <typename F>
void over_samples(int64_t B, int64_t CHW, F&& fn) {
  const int64_t chunks = (CHW + kGrain - 1) / kGrain;
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / chunks, start = (i % chunks) * kGrain;
      fn(n, start, std::min(kGrain, CHW - start));
    }
  });
}

}  // namespace

void ddpm_step(const float* x, const float* model_out, const float* noise, const float* grad,
               const float* coefs, float* sample, float* x0_out, int64_t B, int64_t CHW,
               int64_t out_stride, int mean_type, int var_type, bool clip) {
  over_samples(B, CHW, [&](int64_t n, int64_t start, int64_t len) {
    float k[8];
    for (int r = 0; r < 8; ++r) k[r] = coefs[r * B + n];
    const int64_t row = n * CHW + start;
    const float* out = model_out + n * out_stride + start;
    ddpm_row(x + row, out, var_type == 2 ? nullptr : out + CHW, noise + row,
             grad ? grad + row : nullptr, sample + row, x0_out + row, len, k, mean_type,
             var_type, clip);
  });
}

void ddim_step(const float* x, const float* model_out, const float* noise, const float* grad,
               const float* coefs, float* sample, float* x0_out, int64_t B, int64_t CHW,
               int64_t out_stride, int mean_type, bool clip, float eta) {
  over_samples(B, CHW, [&](int64_t n, int64_t start, int64_t len) {
    float k[7];
    for (int r = 0; r < 7; ++r) k[r] = coefs[r * B + n];
    const float ab = k[4], ab_prev = k[5];
    const float sigma =
        eta * std::sqrt((1.0f - ab_prev) / (1.0f - ab)) * std::sqrt(1.0f - ab / ab_prev);
    const int64_t row = n * CHW + start;
    ddim_row(x + row, model_out + n * out_stride + start, noise + row,
             grad ? grad + row : nullptr, sample + row, x0_out + row, len, k, mean_type, clip,
             sigma, std::sqrt(ab_prev), std::sqrt(1.0f - ab_prev - sigma * sigma),
             std::sqrt(1.0f - ab));
  });
}

}  // namespace adm_fast_cpu
