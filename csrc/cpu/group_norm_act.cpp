// group_norm_act on the CPU: y = SiLU((GN(x)·w + b)·(1 + s) + sh), fwd and bwd.
//
// One task per (sample, group): the group's C/G·HW elements are contiguous in
// NCHW and small enough to stay in cache, so the two statistics passes and the
// output pass read memory about once. bf16/fp16 groups are widened to fp32 once
// into a per-thread buffer. Math as in kernels/group_norm_act.py.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "vec.h"

namespace adm_fast_cpu {
namespace {

constexpr int64_t kChunk = 512;  // fp32 partial sums this long, then doubles

ADM_FMA_CLONES double row_sum(const float* x, int64_t n) {
  double total = 0.0;
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t m = std::min(kChunk, n - i);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < m; ++j) s += x[i + j];
    total += s;
  }
  return total;
}

ADM_FMA_CLONES double row_sq_dev(const float* x, int64_t n, float mean) {
  double total = 0.0;
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t m = std::min(kChunk, n - i);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < m; ++j) {
      const float d = x[i + j] - mean;
      s += d * d;
    }
    total += s;
  }
  return total;
}

ADM_FMA_CLONES void row_apply(const float* x, float* y, int64_t n, float mean, float a, float d,
                              bool act) {
  if (act) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float h = (x[j] - mean) * a + d;
      y[j] = vsilu(h);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = (x[j] - mean) * a + d;
  }
}

struct Channel {  // one channel's fp32 parameters
  float w, b, one_s, sh;
};

// Σ g and Σ g·x̂ over one row, g = ∂L/∂h2.
ADM_FMA_CLONES void row_grad_sums(const float* x, const float* dy, int64_t n, float mean,
                                  float rstd, Channel p, bool act, double* r1, double* r2) {
  double t1 = 0.0, t2 = 0.0;
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t m = std::min(kChunk, n - i);
    float s1 = 0.0f, s2 = 0.0f;
    if (act) {
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t j = 0; j < m; ++j) {
        const float xhat = (x[i + j] - mean) * rstd;
        const float h = (xhat * p.w + p.b) * p.one_s + p.sh;
        const float sig = vsigmoid(h);
        const float g = dy[i + j] * sig * (1.0f + h * (1.0f - sig));
        s1 += g;
        s2 += g * xhat;
      }
    } else {
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t j = 0; j < m; ++j) {
        const float xhat = (x[i + j] - mean) * rstd;
        s1 += dy[i + j];
        s2 += dy[i + j] * xhat;
      }
    }
    t1 += s1;
    t2 += s2;
  }
  *r1 = t1;
  *r2 = t2;
}

ADM_FMA_CLONES void row_dx(const float* x, const float* dy, float* dx, int64_t n, float mean,
                           float rstd, Channel p, bool act, float c1, float c2) {
  const float k = p.one_s * p.w;
  if (act) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float xhat = (x[j] - mean) * rstd;
      const float h = (xhat * p.w + p.b) * p.one_s + p.sh;
      const float sig = vsigmoid(h);
      const float g = dy[j] * sig * (1.0f + h * (1.0f - sig));
      dx[j] = rstd * (g * k - c1 - xhat * c2);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float xhat = (x[j] - mean) * rstd;
      dx[j] = rstd * (dy[j] * k - c1 - xhat * c2);
    }
  }
}

Channel channel(const float* weight, const float* bias, const float* scale, const float* shift,
                int64_t n, int64_t c, int64_t C) {
  return Channel{weight ? weight[c] : 1.0f, bias ? bias[c] : 0.0f,
                 scale ? 1.0f + scale[n * C + c] : 1.0f, shift ? shift[n * C + c] : 0.0f};
}

// The group's elements as fp32: the input itself, or widened into buf.
template <typename T>
const float* widen(const T* src, int64_t m, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    buf.resize(m);
    for (int64_t j = 0; j < m; ++j) buf[j] = static_cast<float>(src[j]);
    return buf.data();
  }
}

template <typename T>
float* out_row(T* dst, int64_t m, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return dst;
  } else {
    buf.resize(m);
    return buf.data();
  }
}

template <typename T>
void narrow(const float* src, T* dst, int64_t m) {
  if constexpr (!std::is_same_v<T, float>) {
    for (int64_t j = 0; j < m; ++j) dst[j] = static_cast<T>(src[j]);
  }
}

}  // namespace

template <typename T>
void group_norm_act_fwd(const T* x, T* y, float* mean, float* rstd, const float* weight,
                        const float* bias, const float* scale, const float* shift, int64_t N,
                        int64_t C, int64_t HW, int64_t G, double eps, bool act) {
  const int64_t cg = C / G, m = cg * HW;
  parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xbuf, ybuf;
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / G, c0 = (ng % G) * cg;
      const float* xg = widen(x + (n * C + c0) * HW, m, xbuf);
      const float mu = static_cast<float>(row_sum(xg, m) / m);
      const float var = static_cast<float>(row_sq_dev(xg, m, mu) / m);
      const float r = 1.0f / std::sqrt(var + static_cast<float>(eps));
      mean[ng] = mu;
      rstd[ng] = r;
      T* yg = y + (n * C + c0) * HW;
      float* yf = out_row(yg, m, ybuf);
      for (int64_t c = 0; c < cg; ++c) {
        const Channel p = channel(weight, bias, scale, shift, n, c0 + c, C);
        row_apply(xg + c * HW, yf + c * HW, HW, mu, r * p.w * p.one_s, p.b * p.one_s + p.sh,
                  act);
      }
      narrow(yf, yg, m);
    }
  });
}

template <typename T>
void group_norm_act_bwd(const T* dy, const T* x, const float* mean, const float* rstd,
                        const float* weight, const float* bias, const float* scale,
                        const float* shift, T* dx, float* dscale, float* dshift, float* t1,
                        float* t2, int64_t N, int64_t C, int64_t HW, int64_t G, bool act) {
  const int64_t cg = C / G, m = cg * HW;
  parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xbuf, dybuf, dxbuf;
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / G, c0 = (ng % G) * cg;
      const float* xg = widen(x + (n * C + c0) * HW, m, xbuf);
      const float* dyg = widen(dy + (n * C + c0) * HW, m, dybuf);
      const float mu = mean[ng], r = rstd[ng];
      double c1 = 0.0, c2 = 0.0;
      for (int64_t c = 0; c < cg; ++c) {
        const int64_t ch = c0 + c;
        const Channel p = channel(weight, bias, scale, shift, n, ch, C);
        double r1, r2;
        row_grad_sums(xg + c * HW, dyg + c * HW, HW, mu, r, p, act, &r1, &r2);
        if (dshift) dshift[n * C + ch] = static_cast<float>(r1);
        if (dscale) dscale[n * C + ch] = static_cast<float>(p.w * r2 + p.b * r1);
        if (t1) t1[n * C + ch] = static_cast<float>(p.one_s * r1);
        if (t2) t2[n * C + ch] = static_cast<float>(p.one_s * r2);
        c1 += p.w * p.one_s * r1;
        c2 += p.w * p.one_s * r2;
      }
      const float k1 = static_cast<float>(c1 / m), k2 = static_cast<float>(c2 / m);
      T* dxg = dx + (n * C + c0) * HW;
      float* dxf = out_row(dxg, m, dxbuf);
      for (int64_t c = 0; c < cg; ++c) {
        const Channel p = channel(weight, bias, scale, shift, n, c0 + c, C);
        row_dx(xg + c * HW, dyg + c * HW, dxf + c * HW, HW, mu, r, p, act, k1, k2);
      }
      narrow(dxf, dxg, m);
    }
  });
}

#define ADM_INSTANTIATE(T)                                                                    \
  template void group_norm_act_fwd<T>(const T*, T*, float*, float*, const float*,             \
                                      const float*, const float*, const float*, int64_t,      \
                                      int64_t, int64_t, int64_t, double, bool);               \
  template void group_norm_act_bwd<T>(const T*, const T*, const float*, const float*,         \
                                      const float*, const float*, const float*, const float*, \
                                      T*, float*, float*, float*, float*, int64_t, int64_t,   \
                                      int64_t, int64_t, bool);
ADM_INSTANTIATE(float)
ADM_INSTANTIATE(c10::BFloat16)
ADM_INSTANTIATE(c10::Half)
#undef ADM_INSTANTIATE

}  // namespace adm_fast_cpu
