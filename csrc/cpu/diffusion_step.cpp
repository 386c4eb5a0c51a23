// One DDPM / DDIM sampling step on the CPU, in one pass (fp32). Arithmetic in
// the order of adm_fast/ops/diffusion_step.py (guided-diffusion's).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "../step_codes.h"
#include "kernels.h"
#include "parallel.h"
#include "vec.h"

// No fused multiply-adds here (setup.py compiles csrc/cpu with
// -ffp-contract=off): x_0 = a·x − b·eps cancels heavily near t = T (a, b ~
// 100), and contracting it would round differently from the eager step the
// samplers are checked against.
//
// The per-call choices (mean type, variance type, clipping, guidance, noise)
// are template parameters, so each inner loop is branch-free and vectorises;
// a branch inside it kept GCC from vectorising at all.

namespace adm_fast_cpu {
namespace {

using namespace adm_fast;  // the step codes (csrc/step_codes.h)

constexpr int64_t kGrain = 16384;

template <int MEAN, bool CLIP>
inline float pred_x0(float x, float out, float a, float b) {
  float x0 = MEAN == kMeanEps ? a * x - b * out : MEAN == kMeanXStart ? out : a * out - b * x;
  // Selects, not std::fmin/fmax: those are library calls that keep the loop
  // scalar (13x slower), and they would turn a NaN into ±1 where torch.clamp
  // keeps it.
  return CLIP ? (x0 < -1.0f ? -1.0f : (x0 > 1.0f ? 1.0f : x0)) : x0;
}

template <int MEAN, int VAR, bool CLIP, bool GRAD>
ADM_CLONES void ddpm_row(const float* x, const float* out, const float* v, const float* noise,
                         const float* grad, float* sample, float* x0_out, int64_t n,
                         const float* k) {
  const float a = k[kDdpmA], b = k[kDdpmB], c1 = k[kDdpmC1], c2 = k[kDdpmC2], lo = k[kDdpmLo],
              hi = k[kDdpmHi], fixed_var = k[kDdpmVar], nonzero = k[kDdpmNonzero];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float log_var, var;
    if constexpr (VAR == kVarFixed) {
      log_var = lo;
      var = fixed_var;
    } else {
      if constexpr (VAR == kVarLearnedRange) {
        const float frac = (v[j] + 1.0f) / 2.0f;
        log_var = frac * hi + (1.0f - frac) * lo;
      } else {
        log_var = v[j];
      }
      var = vexp(log_var);
    }
    const float x0 = pred_x0<MEAN, CLIP>(x[j], out[j], a, b);
    float mean = MEAN == kMeanXPrev ? out[j] : c1 * x0 + c2 * x[j];
    if constexpr (GRAD) mean += var * grad[j];
    sample[j] = mean + nonzero * vexp(0.5f * log_var) * noise[j];
    x0_out[j] = x0;
  }
}

template <int MEAN, bool CLIP, bool GRAD, bool NOISE>
ADM_CLONES void ddim_row(const float* x, const float* out, const float* noise, const float* grad,
                         float* sample, float* x0_out, int64_t n, const float* k, float sigma,
                         float sqrt_ab_prev, float eps_coef, float guide) {
  const float a = k[kDdimA], b = k[kDdimB], recip = k[kDdimRecip], recipm1 = k[kDdimRecipm1],
              nonzero = k[kDdimNonzero];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float x0 = pred_x0<MEAN, CLIP>(x[j], out[j], a, b);
    if constexpr (GRAD) {
      float eps = (recip * x[j] - x0) / recipm1;
      eps = eps - guide * grad[j];
      x0 = recip * x[j] - recipm1 * eps;
    }
    const float eps = (recip * x[j] - x0) / recipm1;
    float s = x0 * sqrt_ab_prev + eps_coef * eps;
    if constexpr (NOISE) s += nonzero * sigma * noise[j];
    sample[j] = s;
    x0_out[j] = x0;
  }
}

// Runtime choices -> one of the instantiations above.
using DdpmFn = void (*)(const float*, const float*, const float*, const float*, const float*,
                        float*, float*, int64_t, const float*);
template <int MEAN, int VAR>
DdpmFn ddpm_pick(bool clip, bool grad) {
  if (clip) return grad ? ddpm_row<MEAN, VAR, true, true> : ddpm_row<MEAN, VAR, true, false>;
  return grad ? ddpm_row<MEAN, VAR, false, true> : ddpm_row<MEAN, VAR, false, false>;
}
template <int MEAN>
DdpmFn ddpm_pick(int var, bool clip, bool grad) {
  return var == kVarLearned        ? ddpm_pick<MEAN, kVarLearned>(clip, grad)
         : var == kVarLearnedRange ? ddpm_pick<MEAN, kVarLearnedRange>(clip, grad)
                                   : ddpm_pick<MEAN, kVarFixed>(clip, grad);
}
DdpmFn ddpm_pick(int mean, int var, bool clip, bool grad) {
  return mean == kMeanEps      ? ddpm_pick<kMeanEps>(var, clip, grad)
         : mean == kMeanXStart ? ddpm_pick<kMeanXStart>(var, clip, grad)
                               : ddpm_pick<kMeanXPrev>(var, clip, grad);
}

using DdimFn = void (*)(const float*, const float*, const float*, const float*, float*, float*,
                        int64_t, const float*, float, float, float, float);
template <int MEAN, bool CLIP>
DdimFn ddim_pick(bool grad, bool noise) {
  if (grad) return noise ? ddim_row<MEAN, CLIP, true, true> : ddim_row<MEAN, CLIP, true, false>;
  return noise ? ddim_row<MEAN, CLIP, false, true> : ddim_row<MEAN, CLIP, false, false>;
}
template <int MEAN>
DdimFn ddim_pick(bool clip, bool grad, bool noise) {
  return clip ? ddim_pick<MEAN, true>(grad, noise) : ddim_pick<MEAN, false>(grad, noise);
}
DdimFn ddim_pick(int mean, bool clip, bool grad, bool noise) {
  return mean == kMeanEps      ? ddim_pick<kMeanEps>(clip, grad, noise)
         : mean == kMeanXStart ? ddim_pick<kMeanXStart>(clip, grad, noise)
                               : ddim_pick<kMeanXPrev>(clip, grad, noise);
}

template <typename F>
void over_samples(int64_t B, int64_t CHW, F&& fn) {
  const int64_t chunks = (CHW + kGrain - 1) / kGrain;
  parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
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
  const DdpmFn row_fn = ddpm_pick(mean_type, var_type, clip, grad != nullptr);
  over_samples(B, CHW, [&](int64_t n, int64_t start, int64_t len) {
    float k[adm_fast::kDdpmRows];
    for (int r = 0; r < adm_fast::kDdpmRows; ++r) k[r] = coefs[r * B + n];
    const int64_t row = n * CHW + start;
    const float* out = model_out + n * out_stride + start;
    row_fn(x + row, out, var_type == adm_fast::kVarFixed ? nullptr : out + CHW, noise + row,
           grad ? grad + row : nullptr, sample + row, x0_out + row, len, k);
  });
}

void ddim_step(const float* x, const float* model_out, const float* noise, const float* grad,
               const float* coefs, float* sample, float* x0_out, int64_t B, int64_t CHW,
               int64_t out_stride, int mean_type, bool clip, float eta) {
  over_samples(B, CHW, [&](int64_t n, int64_t start, int64_t len) {
    float k[adm_fast::kDdimRows];
    for (int r = 0; r < adm_fast::kDdimRows; ++r) k[r] = coefs[r * B + n];
    const float ab = k[adm_fast::kDdimAlphaBar], ab_prev = k[adm_fast::kDdimAlphaBarPrev];
    const float sigma =
        eta * std::sqrt((1.0f - ab_prev) / (1.0f - ab)) * std::sqrt(1.0f - ab / ab_prev);
    const int64_t row = n * CHW + start;
    // sigma is per sample: whether the noise term exists is chosen here.
    const DdimFn row_fn = ddim_pick(mean_type, clip, grad != nullptr, sigma != 0.0f);
    row_fn(x + row, model_out + n * out_stride + start, noise + row,
           grad ? grad + row : nullptr, sample + row, x0_out + row, len, k, sigma,
           std::sqrt(ab_prev), std::sqrt(1.0f - ab_prev - sigma * sigma), std::sqrt(1.0f - ab));
  });
}

}  // namespace adm_fast_cpu
