// 3x3, stride-1, pad-1 convolution by Winograd's F(2x2, 3x3) on channels-last
// fp32 maps: each 2x2 output tile comes from a 4x4 input tile through 16
// products per (input, output) channel pair instead of 36. The input and
// output transforms are additions only (B and A hold 0 and ±1), so they add
// little rounding; the 16 products per tile are 16 matrix products
// V[ξ][tiles][C]·U[ξ][C][O] (small_gemm_strips: U by strips of 16 columns).
//
// The work goes by blocks of tiles, one block per task: transform the block's
// input tiles into V, multiply, transform back into y, while V and M (each 16
// rows per tile) are still in cache. Done as three whole-map passes instead,
// V and M are 4x the map each and the traffic lost to oneDNN at 64 px; only
// small maps, where V and M fit in cache whole, take the three passes.
//
// Tile (n, i, j) reads input rows 2i-1..2i+2 and columns 2j-1..2j+2 (zero
// outside: the padding) and writes output rows 2i, 2i+1 and columns 2j, 2j+1
// that exist (odd sizes drop the last row or column).
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "kernels.h"
#include "parallel.h"
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

// (u, v) -> A(u, v) = (u, u + v, u - v, -v), per channel.
ADM_CLONES void grad_rows(const float* u, const float* v, float* t0, float* t1, float* t2,
                          float* t3, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    t0[c] = u[c];
    t1[c] = u[c] + v[c];
    t2[c] = u[c] - v[c];
    t3[c] = -v[c];
  }
}

struct Map {
  int64_t N, H, W, th, tw;  // th x tw tiles per sample
};

// Tile t's 16 transformed rows into V[ξ·stride + ...] (C values each).
void input_tile(const float* x, const Map& g, int64_t C, int64_t t, float* V, int64_t stride,
                const float* zero, float* r) {
  const int64_t n = t / (g.th * g.tw), i = (t / g.tw) % g.th, j = t % g.tw;
  const float* d[4][4];
  for (int a = 0; a < 4; ++a) {
    const int64_t h = 2 * i - 1 + a;
    for (int b = 0; b < 4; ++b) {
      const int64_t w = 2 * j - 1 + b;
      d[a][b] = (h >= 0 && h < g.H && w >= 0 && w < g.W) ? x + ((n * g.H + h) * g.W + w) * C
                                                          : zero;
    }
  }
  // Rows: r[a][b] = Σ_k Bᵀ[a][k] d[k][b]; then columns into V[(a, b)].
  for (int b = 0; b < 4; ++b)
    input_rows(d[0][b], d[1][b], d[2][b], d[3][b], r + (0 * 4 + b) * C, r + (1 * 4 + b) * C,
               r + (2 * 4 + b) * C, r + (3 * 4 + b) * C, C);
  for (int a = 0; a < 4; ++a)
    input_rows(r + (a * 4 + 0) * C, r + (a * 4 + 1) * C, r + (a * 4 + 2) * C,
               r + (a * 4 + 3) * C, V + (a * 4 + 0) * stride, V + (a * 4 + 1) * stride,
               V + (a * 4 + 2) * stride, V + (a * 4 + 3) * stride, C);
}

// Tile t's 2x2 outputs from its 16 product rows M[ξ·stride + ...] (O values each).
void output_tile(const float* M, int64_t stride, const float* bias, const Map& g, int64_t O,
                 int64_t t, float* y, float* s, float* out) {
  const int64_t n = t / (g.th * g.tw), i = (t / g.tw) % g.th, j = t % g.tw;
  for (int b = 0; b < 4; ++b)
    output_rows(M + (0 * 4 + b) * stride, M + (1 * 4 + b) * stride, M + (2 * 4 + b) * stride,
                M + (3 * 4 + b) * stride, s + (0 * 4 + b) * O, s + (1 * 4 + b) * O, O);
  for (int p = 0; p < 2; ++p)
    output_rows(s + (p * 4 + 0) * O, s + (p * 4 + 1) * O, s + (p * 4 + 2) * O,
                s + (p * 4 + 3) * O, out + (p * 2 + 0) * O, out + (p * 2 + 1) * O, O);
  for (int p = 0; p < 2; ++p) {
    const int64_t h = 2 * i + p;
    if (h >= g.H) continue;
    for (int q = 0; q < 2; ++q) {
      const int64_t w = 2 * j + q;
      if (w >= g.W) continue;
      float* dst = y + ((n * g.H + h) * g.W + w) * O;
      std::copy(out + (p * 2 + q) * O, out + (p * 2 + q + 1) * O, dst);
      if (bias) add_bias(dst, bias, O);
    }
  }
}

// Tile t's 2x2 output gradients (zero where the map has no output) into their
// 16 transformed rows Ŷ = A·dY·Aᵀ (A = [[1,0],[1,1],[1,-1],[0,-1]]), the
// transpose of output_tile's transform: Ŷ[ξ·stride + ...] (O values each).
void grad_tile(const float* dy, const Map& g, int64_t O, int64_t t, float* Yh, int64_t stride,
               const float* zero, float* r) {
  const int64_t n = t / (g.th * g.tw), i = (t / g.tw) % g.th, j = t % g.tw;
  const float* d[2][2];
  for (int p = 0; p < 2; ++p)
    for (int q = 0; q < 2; ++q) {
      const int64_t h = 2 * i + p, w = 2 * j + q;
      d[p][q] = (h < g.H && w < g.W) ? dy + ((n * g.H + h) * g.W + w) * O : zero;
    }
  // Rows: r[a][q] = Σ_p A[a][p] d[p][q]; then columns into Ŷ[(a, b)].
  for (int q = 0; q < 2; ++q)
    grad_rows(d[0][q], d[1][q], r + (0 * 2 + q) * O, r + (1 * 2 + q) * O, r + (2 * 2 + q) * O,
              r + (3 * 2 + q) * O, O);
  for (int a = 0; a < 4; ++a)
    grad_rows(r + (a * 2 + 0) * O, r + (a * 2 + 1) * O, Yh + (a * 4 + 0) * stride,
              Yh + (a * 4 + 1) * stride, Yh + (a * 4 + 2) * stride, Yh + (a * 4 + 3) * stride,
              O);
}

// fn(k, zero, r) for tiles k = 0..nt-1 in parallel, with a zero row of C values
// (the padding) and `scratch` floats per thread.
template <typename Fn>
void over_tiles(int64_t nt, int64_t C, int64_t scratch, const Fn& fn) {
  parallel_for(0, nt, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> zero(C, 0.0f), r(scratch);
    for (int64_t k = begin; k < end; ++k) fn(k, zero.data(), r.data());
  });
}

// U = G·g·Gᵀ per 3x3 g, for the kernels k[tap·ks + o] (o < n) of one input
// channel, with G = [[1,0,0],[1/2,1/2,1/2],[1/2,-1/2,1/2],[0,0,1]]: in double
// and rounded once; U's row ξ goes to u[ξ·stride + o]. t (12·n doubles) holds
// G·g. Each loop runs along o with a few streams, so that it vectorizes.
ADM_CLONES void weight_rows(const float* __restrict k, int64_t ks, float* __restrict u,
                            int64_t stride, int64_t n, double* __restrict t) {
  for (int j = 0; j < 3; ++j) {
    const float *g0 = k + j * ks, *g1 = k + (3 + j) * ks, *g2 = k + (6 + j) * ks;
    double *t0 = t + (0 * 3 + j) * n, *t1 = t + (1 * 3 + j) * n;
    double *t2 = t + (2 * 3 + j) * n, *t3 = t + (3 * 3 + j) * n;
    for (int64_t o = 0; o < n; ++o) {
      const double a = g0[o], b = g1[o], c = g2[o];
      t0[o] = a;
      t1[o] = 0.5 * (a + b + c);
      t2[o] = 0.5 * (a - b + c);
      t3[o] = c;
    }
  }
  for (int r = 0; r < 4; ++r) {
    const double *a = t + (r * 3 + 0) * n, *b = t + (r * 3 + 1) * n, *c = t + (r * 3 + 2) * n;
    float *u0 = u + (r * 4 + 0) * stride, *u1 = u + (r * 4 + 1) * stride;
    float *u2 = u + (r * 4 + 2) * stride, *u3 = u + (r * 4 + 3) * stride;
    for (int64_t o = 0; o < n; ++o) {
      u0[o] = static_cast<float>(a[o]);
      u1[o] = static_cast<float>(0.5 * (a[o] + b[o] + c[o]));
      u2[o] = static_cast<float>(0.5 * (a[o] - b[o] + c[o]));
      u3[o] = static_cast<float>(c[o]);
    }
  }
}

// A thread's buffer `slot` of at least n floats, kept for its next call: a
// fresh V and M per call (up to 4 MB) cost a zero-fill and, past malloc's mmap
// threshold, a page fault per 4 KB: on an 8x8 map at 256 channels, more than
// half of the call (docs/performance.md).
float* scratch(int slot, int64_t n) {
  thread_local std::vector<float> buffers[4];
  std::vector<float>& b = buffers[slot];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}

}  // namespace

void winograd_f23_conv(const float* x, const float* U, const float* bias, float* y, int64_t N,
                       int64_t H, int64_t W, int64_t C, int64_t O) {
  const Map g{N, H, W, (H + 1) / 2, (W + 1) / 2};
  const int64_t T = N * g.th * g.tw;
  const int64_t su = winograd_strips(O) * C * 16;  // from one ξ's U to the next
  if (16 * T * (C + O) * static_cast<int64_t>(sizeof(float)) <= (4 << 20)) {
    // A small map with many channels (256 on 8x8): V and M fit in cache whole,
    // and U (up to 4 MB) is the big operand, so each product reads its U[ξ]
    // once, in passes over all tiles, instead of once per block.
    float* V = scratch(0, 16 * T * C);
    float* M = scratch(1, 16 * T * O);
    winograd_f23_transform_input(x, V, N, H, W, C, 0, T, T * C);
    parallel_for(0, 16, 1, [&](int64_t begin, int64_t end) {
      for (int64_t xi = begin; xi < end; ++xi)
        small_gemm_strips(V + xi * T * C, U + xi * su, M + xi * T * O, T, C, O);
    });
    parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
      std::vector<float> s(8 * O), out(4 * O);
      for (int64_t t = begin; t < end; ++t)
        output_tile(M + t * O, T * O, bias, g, O, t, y, s.data(), out.data());
    });
    return;
  }
  // 48 tiles a block (a multiple of the product's 6-row tile): V and M then
  // take 16·48·(C + O) floats, 384 KB at 64 + 64 channels; fewer when the map
  // has too few tiles to give each thread two blocks.
  const int64_t per_thread = (T + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  const int64_t tb = std::max<int64_t>(6, std::min<int64_t>(48, (per_thread + 5) / 6 * 6));
  const int64_t blocks = (T + tb - 1) / tb;
  parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    float* V = scratch(2, 16 * tb * C);
    float* M = scratch(3, 16 * tb * O);
    std::vector<float> zero(C, 0.0f), r(16 * C), s(8 * O), out(4 * O);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t t0 = blk * tb, nt = std::min(tb, T - t0);
      for (int64_t k = 0; k < nt; ++k)
        input_tile(x, g, C, t0 + k, V + k * C, tb * C, zero.data(), r.data());
      for (int xi = 0; xi < 16; ++xi)
        small_gemm_strips(V + xi * tb * C, U + xi * su, M + xi * tb * O, nt, C, O);
      for (int64_t k = 0; k < nt; ++k)
        output_tile(M + k * O, tb * O, bias, g, O, t0 + k, y, s.data(), out.data());
    }
  });
}

void winograd_f23_weight(const float* w, float* U, int64_t O, int64_t C, int64_t so,
                         int64_t sc, int64_t sy, int64_t sx) {
  // Per strip of 16 output channels and input channel: its 3x3 kernels are
  // gathered, from any layout of w, into 9 rows along o, so that weight_rows
  // runs along o in vector registers. Computed per (o, c) with scattered
  // reads, in scalar double, the transform took a third of the convolution's
  // time at 192 channels on a 16x16 map.
  const int64_t S = winograd_strips(O);
  if (O % 16) {  // the last strip's lanes past O stay zero
    for (int xi = 0; xi < 16; ++xi)
      for (int64_t c = 0; c < C; ++c)
        std::fill_n(U + ((xi * S + S - 1) * C + c) * 16, 16, 0.0f);
  }
  // By strips, then input channels: each of U's 16 rows takes one full
  // 64-byte line per step, in order (16 write streams). By input channels
  // across all strips it was 256 streams at 256 channels and 1.8x slower.
  parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    float k[9 * 16];
    double t[12 * 16];
    for (int64_t s = begin; s < end; ++s) {
      const int64_t n = std::min<int64_t>(16, O - s * 16);
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t o = 0; o < n; ++o)
          for (int ky = 0; ky < 3; ++ky)
            for (int kx = 0; kx < 3; ++kx)
              k[(ky * 3 + kx) * 16 + o] = w[(s * 16 + o) * so + c * sc + ky * sy + kx * sx];
        weight_rows(k, 16, U + (s * C + c) * 16, S * C * 16, n, t);
      }
    }
  });
}

void winograd_f23_transform_input(const float* x, float* V, int64_t N, int64_t H, int64_t W,
                                  int64_t C, int64_t t0, int64_t nt, int64_t stride) {
  const Map g{N, H, W, (H + 1) / 2, (W + 1) / 2};
  over_tiles(nt, C, 16 * C, [&](int64_t k, const float* zero, float* r) {
    input_tile(x, g, C, t0 + k, V + k * C, stride, zero, r);
  });
}

void winograd_f23_transform_grad(const float* dy, float* Yh, int64_t N, int64_t H, int64_t W,
                                 int64_t O, int64_t t0, int64_t nt, int64_t stride) {
  const Map g{N, H, W, (H + 1) / 2, (W + 1) / 2};
  over_tiles(nt, O, 8 * O, [&](int64_t k, const float* zero, float* r) {
    grad_tile(dy, g, O, t0 + k, Yh + k * O, stride, zero, r);
  });
}

ADM_CLONES void weight_grad_rows(const float* d0, const float* d1, const float* d2,
                                 const float* d3, float* t0, float* t1, float* t2, int64_t C) {
  // Gᵀ·(d0..d3) with Gᵀ = [[1, 1/2, 1/2, 0], [0, 1/2, -1/2, 0], [0, 1/2, 1/2, 1]].
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const float p = 0.5f * (d1[c] + d2[c]), m = 0.5f * (d1[c] - d2[c]);
    t0[c] = d0[c] + p;
    t1[c] = m;
    t2[c] = p + d3[c];
  }
}

void winograd_f23_weight_grad(const float* dUt, float* dw, int64_t O, int64_t C) {
  // dw = Gᵀ·dU·G per (o, c), the transpose of winograd_f23_weight's U = G·g·Gᵀ:
  // rows then columns, along the contiguous input channels of dUt [16][O][C],
  // into dw in channels-last order [O][3][3][C]. (A half is exact: each value
  // rounds twice, a few ulp of the largest term.)
  parallel_for(0, O, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> r(12 * C);  // r[ky][b] = Σ_a Gᵀ[ky][a]·dU[a][b]
    for (int64_t o = begin; o < end; ++o) {
      const float* d = dUt + o * C;
      const int64_t s = O * C;  // from one ξ to the next
      for (int b = 0; b < 4; ++b)
        weight_grad_rows(d + (0 * 4 + b) * s, d + (1 * 4 + b) * s, d + (2 * 4 + b) * s,
                         d + (3 * 4 + b) * s, r.data() + (0 * 4 + b) * C,
                         r.data() + (1 * 4 + b) * C, r.data() + (2 * 4 + b) * C, C);
      float* k = dw + o * 9 * C;
      for (int ky = 0; ky < 3; ++ky)
        weight_grad_rows(r.data() + (ky * 4 + 0) * C, r.data() + (ky * 4 + 1) * C,
                         r.data() + (ky * 4 + 2) * C, r.data() + (ky * 4 + 3) * C,
                         k + (ky * 3 + 0) * C, k + (ky * 3 + 1) * C, k + (ky * 3 + 2) * C, C);
    }
  });
}

}  // namespace adm_fast_cpu
