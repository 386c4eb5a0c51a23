// 3x3, stride-1, pad-1 convolution by Winograd's F(2x2, 3x3) on channels-last
// fp32 maps: each 2x2 output tile comes from a 4x4 input tile through 16
// products per (input, output) channel pair instead of 36. The transforms are
// additions only (B and A hold 0 and ±1), so they add little rounding; the 16
// products are one batched matrix product (the caller's at::bmm) of
// V[16][tiles][C] by the transformed weights U[16][C][O].
//
// Both transforms run along the contiguous channel axis, in parallel over
// tiles. Tile (n, i, j) reads input rows 2i-1..2i+2 and columns 2j-1..2j+2
// (zero outside: the padding) and writes output rows 2i, 2i+1 and columns 2j,
// 2j+1 that exist (odd sizes drop the last row or column).
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace adm_fast_cpu {
namespace {

// d[0..3] -> Bᵀd with Bᵀ = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]], per channel.
ADM_CLONES void input_rows(const float* d0, const float* d1, const float* d2, const float* d3,
                           float* t0, float* t1, float* t2, float* t3, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    t0[c] = d0[c] - d2[c];
    t1[c] = d1[c] + d2[c];
    t2[c] = d2[c] - d1[c];
    t3[c] = d1[c] - d3[c];
  }
}

// s[0..3] -> Aᵀs with Aᵀ = [[1,1,1,0],[0,1,-1,-1]], per channel.
ADM_CLONES void output_rows(const float* s0, const float* s1, const float* s2, const float* s3,
                            float* y0, float* y1, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    y0[c] = s0[c] + s1[c] + s2[c];
    y1[c] = s1[c] - s2[c] - s3[c];
  }
}

ADM_CLONES void add_bias(float* y, const float* bias, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) y[c] += bias[c];
}

}  // namespace

void winograd_f23_input(const float* x, float* V, int64_t N, int64_t H, int64_t W, int64_t C) {
  const int64_t th = (H + 1) / 2, tw = (W + 1) / 2, T = N * th * tw;
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    // d: the 4x4 tile (zeros where it hangs over the edge); r: Bᵀd by rows.
    std::vector<float> zero(C, 0.0f), r(16 * C);
    const float* d[4][4];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (th * tw), i = (t / tw) % th, j = t % tw;
      for (int a = 0; a < 4; ++a) {
        const int64_t h = 2 * i - 1 + a;
        for (int b = 0; b < 4; ++b) {
          const int64_t w = 2 * j - 1 + b;
          d[a][b] = (h >= 0 && h < H && w >= 0 && w < W) ? x + ((n * H + h) * W + w) * C
                                                          : zero.data();
        }
      }
      // Rows: r[a][b] = Σ_k Bᵀ[a][k] d[k][b]; then columns into V[(a, b)].
      for (int b = 0; b < 4; ++b)
        input_rows(d[0][b], d[1][b], d[2][b], d[3][b], &r[(0 * 4 + b) * C], &r[(1 * 4 + b) * C],
                   &r[(2 * 4 + b) * C], &r[(3 * 4 + b) * C], C);
      for (int a = 0; a < 4; ++a)
        input_rows(&r[(a * 4 + 0) * C], &r[(a * 4 + 1) * C], &r[(a * 4 + 2) * C],
                   &r[(a * 4 + 3) * C], V + ((a * 4 + 0) * T + t) * C,
                   V + ((a * 4 + 1) * T + t) * C, V + ((a * 4 + 2) * T + t) * C,
                   V + ((a * 4 + 3) * T + t) * C, C);
    }
  });
}

void winograd_f23_output(const float* M, const float* bias, float* y, int64_t N, int64_t H,
                         int64_t W, int64_t O) {
  const int64_t th = (H + 1) / 2, tw = (W + 1) / 2, T = N * th * tw;
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> s(8 * O), out(4 * O);  // s: Aᵀm by rows (2 x 4); out: the 2x2 tile
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (th * tw), i = (t / tw) % th, j = t % tw;
      auto m = [&](int a, int b) { return M + ((a * 4 + b) * T + t) * O; };
      for (int b = 0; b < 4; ++b)
        output_rows(m(0, b), m(1, b), m(2, b), m(3, b), &s[(0 * 4 + b) * O], &s[(1 * 4 + b) * O],
                    O);
      for (int p = 0; p < 2; ++p)
        output_rows(&s[(p * 4 + 0) * O], &s[(p * 4 + 1) * O], &s[(p * 4 + 2) * O],
                    &s[(p * 4 + 3) * O], &out[(p * 2 + 0) * O], &out[(p * 2 + 1) * O], O);
      for (int p = 0; p < 2; ++p) {
        const int64_t h = 2 * i + p;
        if (h >= H) continue;
        for (int q = 0; q < 2; ++q) {
          const int64_t w = 2 * j + q;
          if (w >= W) continue;
          float* dst = y + ((n * H + h) * W + w) * O;
          std::copy(&out[(p * 2 + q) * O], &out[(p * 2 + q) * O] + O, dst);
          if (bias) add_bias(dst, bias, O);
        }
      }
    }
  });
}

}  // namespace adm_fast_cpu
