// group_norm_act on the CPU for channels-last x ([N, HW, C] in memory, C
// contiguous): the layout oneDNN's convolutions are fastest in here, so a UNet
// run channels_last keeps it from conv to norm to conv.
//
// A group's values are strided (cg of every C), so the work goes by rows: each
// task takes a chunk of one sample's rows and accumulates per-channel partial
// sums along the contiguous C axis (vectorised), which are then folded into
// per-group statistics. Within a chunk the statistics are two-pass (mean, then
// squared deviations from it) in fp32; chunks combine in double
// (group_moments). The elementwise math is the NCHW kernel's, per channel.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace adm_fast_cpu {
namespace {

// Rows per task: about 16K values, and at most 512 rows summed in fp32.
int64_t chunk_rows(int64_t C) { return std::max<int64_t>(1, std::min<int64_t>(512, 16384 / C)); }

// Each helper takes a block of `rows` rows of C values: one call per block,
// not per row (a row of 64 channels is a few vectors, less than a call costs).
template <typename T>
ADM_FMA_CLONES void add_rows(const T* x, float* acc, int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r, x += C) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += to_f(x[c]);
  }
}

template <typename T>
ADM_FMA_CLONES void add_sq_rows(const T* x, const float* mu, float* acc, int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r, x += C) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float d = to_f(x[c]) - mu[c];
      acc[c] += d * d;
    }
  }
}

// Per-channel sums of f(block) over each chunk of rows, into part[task][C],
// in parallel over (sample, chunk) tasks; then per (n, c) in double.
// block_fn(n, first row, rows, acc).
template <typename F>
std::vector<double> channel_sums(int64_t N, int64_t HW, int64_t C, int width, F&& block_fn) {
  const int64_t rows = chunk_rows(C), chunks = (HW + rows - 1) / rows;
  std::vector<float> part(static_cast<size_t>(N * chunks * width * C), 0.0f);
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, r0 = (task % chunks) * rows;
      block_fn(n, r0, std::min(HW, r0 + rows) - r0, part.data() + task * width * C);
    }
  });
  std::vector<double> total(static_cast<size_t>(N * width * C), 0.0);
  for (int64_t task = 0; task < N * chunks; ++task) {
    const int64_t n = task / chunks;
    for (int64_t k = 0; k < width * C; ++k) total[n * width * C + k] += part[task * width * C + k];
  }
  return total;
}

// Per-(n, c) vectors broadcast from per-(n, g) values.
std::vector<float> per_channel(const float* per_group, int64_t N, int64_t C, int64_t G) {
  std::vector<float> out(static_cast<size_t>(N * C));
  const int64_t cg = C / G;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) out[n * C + c] = per_group[n * G + c / cg];
  return out;
}

struct Affine {  // per-(n, c) fp32 parameters, as the NCHW kernel's Channel
  std::vector<float> w, b, one_s, sh;
};

Affine affine(const float* weight, const float* bias, const float* scale, const float* shift,
              int64_t N, int64_t C) {
  Affine p{std::vector<float>(N * C), std::vector<float>(N * C), std::vector<float>(N * C),
           std::vector<float>(N * C)};
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = n * C + c;
      p.w[i] = weight ? weight[c] : 1.0f;
      p.b[i] = bias ? bias[c] : 0.0f;
      p.one_s[i] = scale ? 1.0f + scale[i] : 1.0f;
      p.sh[i] = shift ? shift[i] : 0.0f;
    }
  return p;
}

template <typename T, bool ACT>
ADM_FMA_CLONES void apply_rows(const T* x, T* y, const float* mu, const float* a, const float* d,
                               int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r, x += C, y += C) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float h = (to_f(x[c]) - mu[c]) * a[c] + d[c];
      if constexpr (ACT) {
        y[c] = from_f<T>(vsilu(h));
      } else {
        y[c] = from_f<T>(h);
      }
    }
  }
}

// g = dy·SiLU'(h2) (or dy), and x̂, for one row. ACT is a template
// parameter: a branch in the loop would keep it scalar.
struct GradRow {
  const float *mu, *rstd, *w, *b, *one_s, *sh;
};

// ∂L/∂h2 from dy: through SiLU when ACT (h2 recomputed from x̂), else dy.
template <bool ACT>
static inline float grad_h2(float dy, float xhat, const GradRow& p, int64_t c) {
  if constexpr (ACT) {
    const float h = (xhat * p.w[c] + p.b[c]) * p.one_s[c] + p.sh[c];
    const float sig = vsigmoid(h);
    return dy * sig * (1.0f + h * (1.0f - sig));
  } else {
    return dy;
  }
}

template <typename T, bool ACT>
ADM_FMA_CLONES void grad_sums_rows(const T* x, const T* dy, const GradRow& p, float* s1, float* s2,
                                   int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r, x += C, dy += C) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float xhat = (to_f(x[c]) - p.mu[c]) * p.rstd[c];
      const float g = grad_h2<ACT>(to_f(dy[c]), xhat, p, c);
      s1[c] += g;
      s2[c] += g * xhat;
    }
  }
}

template <typename T, bool ACT>
ADM_FMA_CLONES void dx_rows(const T* x, const T* dy, T* dx, const GradRow& p, const float* k,
                            const float* c1, const float* c2, int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r, x += C, dy += C, dx += C) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float xhat = (to_f(x[c]) - p.mu[c]) * p.rstd[c];
      const float g = grad_h2<ACT>(to_f(dy[c]), xhat, p, c);
      dx[c] = from_f<T>(p.rstd[c] * (g * k[c] - c1[c] - xhat * c2[c]));
    }
  }
}

// fn(n, first row, rows) over the chunks of rows, in parallel.
template <typename F>
void over_rows(int64_t N, int64_t HW, int64_t C, F&& fn) {
  const int64_t rows = chunk_rows(C), chunks = (HW + rows - 1) / rows;
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, r0 = (task % chunks) * rows;
      fn(n, r0, std::min(HW, r0 + rows) - r0);
    }
  });
}

// Per-(n, g) mean and (biased) variance with one pass over x from memory:
// each task finds, for its chunk of rows (small enough to stay in cache
// between its two sweeps), per-channel sums and squared deviations from the
// chunk's own per-channel means; the pieces then combine exactly, in double,
// by the law of total variance: M2 = Σ M2_i + Σ n_i·(mean_i − mean)² (Chan et
// al.'s parallel variance). A third sweep over a tensor that no longer fits
// in cache cost as much as the normalisation itself.
template <typename T>
void group_moments(const T* x, int64_t N, int64_t HW, int64_t C, int64_t G, float* mean,
                   float* var) {
  const int64_t rows = chunk_rows(C), chunks = (HW + rows - 1) / rows;
  std::vector<float> part(static_cast<size_t>(N * chunks * 2 * C), 0.0f);
  over_rows(N, HW, C, [&](int64_t n, int64_t r0, int64_t nr) {
    const T* xs = x + (n * HW + r0) * C;
    float* sum = part.data() + (n * chunks + r0 / rows) * 2 * C;
    add_rows(xs, sum, nr, C);
    std::vector<float> mu(sum, sum + C);
    for (float& m : mu) m /= static_cast<float>(nr);
    add_sq_rows(xs, mu.data(), sum + C, nr, C);
  });
  const int64_t cg = C / G;
  const double count = static_cast<double>(cg * HW);
  for (int64_t ng = 0; ng < N * G; ++ng) {
    const int64_t n = ng / G, c0 = (ng % G) * cg;
    double total = 0.0;
    for (int64_t k = 0; k < chunks; ++k)
      for (int64_t c = c0; c < c0 + cg; ++c) total += part[(n * chunks + k) * 2 * C + c];
    const double mg = total / count;
    double m2 = 0.0;
    for (int64_t k = 0; k < chunks; ++k) {
      const double nr = static_cast<double>(std::min(HW, (k + 1) * rows) - k * rows);
      const float* piece = part.data() + (n * chunks + k) * 2 * C;
      for (int64_t c = c0; c < c0 + cg; ++c) {
        const double d = piece[c] / nr - mg;
        m2 += piece[C + c] + nr * d * d;
      }
    }
    mean[ng] = static_cast<float>(mg);
    var[ng] = static_cast<float>(m2 / count);
  }
}

}  // namespace

template <typename T>
void group_norm_act_fwd_nhwc(const T* x, T* y, float* mean, float* rstd, const float* weight,
                             const float* bias, const float* scale, const float* shift,
                             int64_t N, int64_t C, int64_t HW, int64_t G, double eps, bool act) {
  group_moments(x, N, HW, C, G, mean, rstd);  // rstd holds the variance here
  for (int64_t ng = 0; ng < N * G; ++ng)
    rstd[ng] = 1.0f / std::sqrt(rstd[ng] + static_cast<float>(eps));
  const std::vector<float> mu = per_channel(mean, N, C, G), r = per_channel(rstd, N, C, G);
  const Affine p = affine(weight, bias, scale, shift, N, C);
  std::vector<float> a(N * C), d(N * C);
  for (int64_t i = 0; i < N * C; ++i) {
    a[i] = r[i] * p.w[i] * p.one_s[i];
    d[i] = p.b[i] * p.one_s[i] + p.sh[i];
  }
  const auto apply_fn = act ? apply_rows<T, true> : apply_rows<T, false>;
  over_rows(N, HW, C, [&](int64_t n, int64_t row, int64_t rows) {
    const int64_t o = (n * HW + row) * C;
    apply_fn(x + o, y + o, mu.data() + n * C, a.data() + n * C, d.data() + n * C, rows, C);
  });
}

template <typename T>
void group_norm_act_bwd_nhwc(const T* dy, const T* x, const float* mean, const float* rstd,
                             const float* weight, const float* bias, const float* scale,
                             const float* shift, T* dx, float* dscale, float* dshift, float* t1,
                             float* t2, int64_t N, int64_t C, int64_t HW, int64_t G, bool act) {
  const int64_t cg = C / G;
  const double m = static_cast<double>(cg * HW);
  const std::vector<float> mu = per_channel(mean, N, C, G), r = per_channel(rstd, N, C, G);
  const Affine p = affine(weight, bias, scale, shift, N, C);
  auto rows_of = [&](int64_t n) {
    const int64_t o = n * C;
    return GradRow{mu.data() + o, r.data() + o, p.w.data() + o, p.b.data() + o,
                   p.one_s.data() + o, p.sh.data() + o};
  };
  const auto sums_fn = act ? grad_sums_rows<T, true> : grad_sums_rows<T, false>;
  const auto dx_fn = act ? dx_rows<T, true> : dx_rows<T, false>;
  auto sums = channel_sums(N, HW, C, 2, [&](int64_t n, int64_t row, int64_t rows, float* acc) {
    const int64_t o = (n * HW + row) * C;
    sums_fn(x + o, dy + o, rows_of(n), acc, acc + C, rows, C);
  });
  std::vector<float> k(N * C), c1(N * C), c2(N * C);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      double a1 = 0.0, a2 = 0.0;
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
        const int64_t i = n * C + c;
        const double r1 = sums[n * 2 * C + c], r2 = sums[n * 2 * C + C + c];
        if (dshift) dshift[i] = static_cast<float>(r1);
        if (dscale) dscale[i] = static_cast<float>(p.w[i] * r2 + p.b[i] * r1);
        if (t1) t1[i] = static_cast<float>(p.one_s[i] * r1);
        if (t2) t2[i] = static_cast<float>(p.one_s[i] * r2);
        a1 += p.w[i] * p.one_s[i] * r1;
        a2 += p.w[i] * p.one_s[i] * r2;
      }
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
        const int64_t i = n * C + c;
        k[i] = p.one_s[i] * p.w[i];
        c1[i] = static_cast<float>(a1 / m);
        c2[i] = static_cast<float>(a2 / m);
      }
    }
  }
  over_rows(N, HW, C, [&](int64_t n, int64_t row, int64_t rows) {
    const int64_t o = (n * HW + row) * C;
    dx_fn(x + o, dy + o, dx + o, rows_of(n), k.data() + n * C, c1.data() + n * C,
          c2.data() + n * C, rows, C);
  });
}

#define ADM_INSTANTIATE(T)                                                                   \
  template void group_norm_act_fwd_nhwc<T>(const T*, T*, float*, float*, const float*,       \
                                           const float*, const float*, const float*, int64_t, \
                                           int64_t, int64_t, int64_t, double, bool);          \
  template void group_norm_act_bwd_nhwc<T>(                                                  \
      const T*, const T*, const float*, const float*, const float*, const float*,            \
      const float*, const float*, T*, float*, float*, float*, float*, int64_t, int64_t,      \
      int64_t, int64_t, bool);
ADM_INSTANTIATE(float)
ADM_INSTANTIATE(c10::BFloat16)
ADM_INSTANTIATE(c10::Half)
#undef ADM_INSTANTIATE

}  // namespace adm_fast_cpu
