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
#include "parallel.h"
#include "vec.h"

namespace adm_fast_cpu {
namespace {

// Rows per task: about 16K values, and at most 512 rows summed in fp32.
int64_t chunk_rows(int64_t C) { return std::max<int64_t>(1, std::min<int64_t>(512, 16384 / C)); }

// Below torch's own grain (at::internal::GRAIN_SIZE, 32K values) a call runs on
// one thread: a parallel region costs its fork and join, and on a core another
// process wants, waking a sleeping worker can cost milliseconds.
constexpr int64_t kSerialBelow = 32768;
int64_t grain_for(int64_t values, int64_t tasks) { return values < kSerialBelow ? tasks : 1; }

// One task per sample (statistics, then normalisation, in one parallel region
// instead of one for each) when the samples share out evenly enough among the
// threads; the arithmetic per sample is the same either way.
bool by_sample(int64_t N) {
  const int64_t t = at::get_num_threads();
  return t > 1 && N >= t && (N % t == 0 || N >= 4 * t);
}

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
  parallel_for(0, N * chunks, grain_for(N * HW * C, N * chunks), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, r0 = (task % chunks) * rows;
      fn(n, r0, std::min(HW, r0 + rows) - r0);
    }
  });
}

// Per-(n, g) mean and (biased) variance with one pass over x from memory:
// each chunk of rows (small enough to stay in cache between its two sweeps)
// gives per-channel sums and squared deviations from the chunk's own
// per-channel means (chunk_moments); the pieces then combine exactly, in
// double, by the law of total variance: M2 = Σ M2_i + Σ n_i·(mean_i − mean)²
// (Chan et al.'s parallel variance; combine_moments). A third sweep over a
// tensor that no longer fits in cache cost as much as the normalisation itself.
template <typename T>
void chunk_moments(const T* xs, int64_t nr, int64_t C, float* sum) {
  add_rows(xs, sum, nr, C);
  std::vector<float> mu(sum, sum + C);
  for (float& m : mu) m /= static_cast<float>(nr);
  add_sq_rows(xs, mu.data(), sum + C, nr, C);
}

// Sample n's G means and variances from its chunks' pieces ([chunks][2][C]).
void combine_moments(const float* part, int64_t HW, int64_t C, int64_t G, int64_t rows,
                     float* mean, float* var) {
  const int64_t cg = C / G, chunks = (HW + rows - 1) / rows;
  const double count = static_cast<double>(cg * HW);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t c0 = g * cg;
    double total = 0.0;
    for (int64_t k = 0; k < chunks; ++k)
      for (int64_t c = c0; c < c0 + cg; ++c) total += part[k * 2 * C + c];
    const double mg = total / count;
    double m2 = 0.0;
    for (int64_t k = 0; k < chunks; ++k) {
      const double nr = static_cast<double>(std::min(HW, (k + 1) * rows) - k * rows);
      const float* piece = part + k * 2 * C;
      for (int64_t c = c0; c < c0 + cg; ++c) {
        const double d = piece[c] / nr - mg;
        m2 += piece[C + c] + nr * d * d;
      }
    }
    mean[g] = static_cast<float>(mg);
    var[g] = static_cast<float>(m2 / count);
  }
}

// Sample n's normalisation y = (x − mu)·a + d per channel, from its groups'
// mean and variance (the variance becomes rstd in place).
void sample_coefs(int64_t n, int64_t C, int64_t G, double eps, const float* mean, float* rstd,
                  const Affine& p, float* mu, float* a, float* d) {
  for (int64_t g = 0; g < G; ++g)
    rstd[g] = 1.0f / std::sqrt(rstd[g] + static_cast<float>(eps));
  const int64_t cg = C / G;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t i = n * C + c;
    mu[c] = mean[c / cg];
    a[c] = rstd[c / cg] * p.w[i] * p.one_s[i];
    d[c] = p.b[i] * p.one_s[i] + p.sh[i];
  }
}

// Sample n's parameter gradients from its per-channel sums r1 = Σ g, r2 =
// Σ g·x̂ (sums[0..C), sums[C..2C)), and dx's coefficients k, c1, c2.
void sample_grad_coefs(int64_t n, int64_t C, int64_t G, int64_t HW, const double* sums,
                       const Affine& p, float* dscale, float* dshift, float* t1, float* t2,
                       float* k, float* c1, float* c2) {
  const int64_t cg = C / G;
  const double m = static_cast<double>(cg * HW);
  for (int64_t g = 0; g < G; ++g) {
    double a1 = 0.0, a2 = 0.0;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
      const int64_t i = n * C + c;
      const double r1 = sums[c], r2 = sums[C + c];
      if (dshift) dshift[i] = static_cast<float>(r1);
      if (dscale) dscale[i] = static_cast<float>(p.w[i] * r2 + p.b[i] * r1);
      if (t1) t1[i] = static_cast<float>(p.one_s[i] * r1);
      if (t2) t2[i] = static_cast<float>(p.one_s[i] * r2);
      a1 += p.w[i] * p.one_s[i] * r1;
      a2 += p.w[i] * p.one_s[i] * r2;
    }
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
      k[c] = p.one_s[n * C + c] * p.w[n * C + c];
      c1[c] = static_cast<float>(a1 / m);
      c2[c] = static_cast<float>(a2 / m);
    }
  }
}

}  // namespace

// Both kernels run one of two schedules with the same arithmetic per sample
// (the bytes do not depend on the thread count): by_sample, one parallel
// region whose tasks each take whole samples; else by chunks of rows across
// all samples, one region for the statistics and one for the outputs.
template <typename T>
void group_norm_act_fwd_nhwc(const T* x, T* y, float* mean, float* rstd, const float* weight,
                             const float* bias, const float* scale, const float* shift,
                             int64_t N, int64_t C, int64_t HW, int64_t G, double eps, bool act) {
  const int64_t rows = chunk_rows(C), chunks = (HW + rows - 1) / rows;
  const Affine p = affine(weight, bias, scale, shift, N, C);
  const auto apply_fn = act ? apply_rows<T, true> : apply_rows<T, false>;
  if (by_sample(N) && N * HW * C >= kSerialBelow) {
    parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> part(static_cast<size_t>(chunks * 2 * C)), mu(C), a(C), d(C);
      for (int64_t n = begin; n < end; ++n) {
        std::fill(part.begin(), part.end(), 0.0f);
        for (int64_t k = 0; k < chunks; ++k) {
          const int64_t r0 = k * rows;
          chunk_moments(x + (n * HW + r0) * C, std::min(HW, r0 + rows) - r0, C,
                        part.data() + k * 2 * C);
        }
        combine_moments(part.data(), HW, C, G, rows, mean + n * G, rstd + n * G);
        sample_coefs(n, C, G, eps, mean + n * G, rstd + n * G, p, mu.data(), a.data(), d.data());
        apply_fn(x + n * HW * C, y + n * HW * C, mu.data(), a.data(), d.data(), HW, C);
      }
    });
    return;
  }
  std::vector<float> part(static_cast<size_t>(N * chunks * 2 * C), 0.0f);
  over_rows(N, HW, C, [&](int64_t n, int64_t r0, int64_t nr) {
    chunk_moments(x + (n * HW + r0) * C, nr, C, part.data() + (n * chunks + r0 / rows) * 2 * C);
  });
  std::vector<float> mu(N * C), a(N * C), d(N * C);
  for (int64_t n = 0; n < N; ++n) {
    combine_moments(part.data() + n * chunks * 2 * C, HW, C, G, rows, mean + n * G, rstd + n * G);
    sample_coefs(n, C, G, eps, mean + n * G, rstd + n * G, p, mu.data() + n * C, a.data() + n * C,
                 d.data() + n * C);
  }
  over_rows(N, HW, C, [&](int64_t n, int64_t row, int64_t nr) {
    const int64_t o = (n * HW + row) * C;
    apply_fn(x + o, y + o, mu.data() + n * C, a.data() + n * C, d.data() + n * C, nr, C);
  });
}

template <typename T>
void group_norm_act_bwd_nhwc(const T* dy, const T* x, const float* mean, const float* rstd,
                             const float* weight, const float* bias, const float* scale,
                             const float* shift, T* dx, float* dscale, float* dshift, float* t1,
                             float* t2, int64_t N, int64_t C, int64_t HW, int64_t G, bool act) {
  const int64_t rows = chunk_rows(C), chunks = (HW + rows - 1) / rows;
  const std::vector<float> mu = per_channel(mean, N, C, G), r = per_channel(rstd, N, C, G);
  const Affine p = affine(weight, bias, scale, shift, N, C);
  auto rows_of = [&](int64_t n) {
    const int64_t o = n * C;
    return GradRow{mu.data() + o, r.data() + o, p.w.data() + o, p.b.data() + o,
                   p.one_s.data() + o, p.sh.data() + o};
  };
  const auto sums_fn = act ? grad_sums_rows<T, true> : grad_sums_rows<T, false>;
  const auto dx_fn = act ? dx_rows<T, true> : dx_rows<T, false>;
  // per-channel r1, r2 of sample n in double: its chunks' fp32 sums, in order
  auto add_chunks = [&](const float* part, double* total) {
    for (int64_t k = 0; k < chunks; ++k)
      for (int64_t j = 0; j < 2 * C; ++j) total[j] += part[k * 2 * C + j];
  };
  if (by_sample(N) && N * HW * C >= kSerialBelow) {
    parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> part(static_cast<size_t>(chunks * 2 * C)), k(C), c1(C), c2(C);
      std::vector<double> total(static_cast<size_t>(2 * C));
      for (int64_t n = begin; n < end; ++n) {
        std::fill(part.begin(), part.end(), 0.0f);
        for (int64_t q = 0; q < chunks; ++q) {
          const int64_t r0 = q * rows, o = (n * HW + r0) * C;
          float* acc = part.data() + q * 2 * C;
          sums_fn(x + o, dy + o, rows_of(n), acc, acc + C, std::min(HW, r0 + rows) - r0, C);
        }
        std::fill(total.begin(), total.end(), 0.0);
        add_chunks(part.data(), total.data());
        sample_grad_coefs(n, C, G, HW, total.data(), p, dscale, dshift, t1, t2, k.data(),
                          c1.data(), c2.data());
        const int64_t o = n * HW * C;
        dx_fn(x + o, dy + o, dx + o, rows_of(n), k.data(), c1.data(), c2.data(), HW, C);
      }
    });
    return;
  }
  std::vector<float> part(static_cast<size_t>(N * chunks * 2 * C), 0.0f);
  over_rows(N, HW, C, [&](int64_t n, int64_t r0, int64_t nr) {
    const int64_t o = (n * HW + r0) * C;
    float* acc = part.data() + (n * chunks + r0 / rows) * 2 * C;
    sums_fn(x + o, dy + o, rows_of(n), acc, acc + C, nr, C);
  });
  std::vector<float> k(N * C), c1(N * C), c2(N * C);
  std::vector<double> total(static_cast<size_t>(2 * C));
  for (int64_t n = 0; n < N; ++n) {
    std::fill(total.begin(), total.end(), 0.0);
    add_chunks(part.data() + n * chunks * 2 * C, total.data());
    sample_grad_coefs(n, C, G, HW, total.data(), p, dscale, dshift, t1, t2, k.data() + n * C,
                      c1.data() + n * C, c2.data() + n * C);
  }
  over_rows(N, HW, C, [&](int64_t n, int64_t row, int64_t nr) {
    const int64_t o = (n * HW + row) * C;
    dx_fn(x + o, dy + o, dx + o, rows_of(n), k.data() + n * C, c1.data() + n * C,
          c2.data() + n * C, nr, C);
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
