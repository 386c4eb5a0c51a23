// C = A·B, fp32, single-threaded, for the products inside a Winograd
// convolution: K and N are a UNet's channel counts (32-256), M a block of tiles;
// A and C row-major, B (a weight transform, made once and kept) in strips of
// 16 columns. MKL's batched sgemm runs such short-K shapes at about half the
// FMA peak; this runs much nearer it (docs/performance.md).
//
// An AVX2+FMA register tile of 6 rows x 16 columns (12 accumulators) walks K
// with one broadcast of A and two loads of B per 12 FMAs; the rows of A stay
// in L1 for the N/16 strips, B (K x N: 256 KB at 256 x 256) in L2. Callers
// check has_avx2_fma() first: elsewhere small_gemm_strips does nothing.
#include <algorithm>
#include <cstdint>

#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define ADM_HAVE_AVX2_GEMM 1
#endif

namespace adm_fast_cpu {
namespace {

#ifdef ADM_HAVE_AVX2_GEMM
// Lanes [0, n) of 8 (n < 8): a mask for maskload/maskstore.
__attribute__((target("avx2,fma"))) static inline __m256i lanes(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx);
}

// A 6 x 16 block of C: rows `m` <= 6 and columns `cols` <= 16 of it exist.
// Rows past m read row m-1 again (their sums are dropped): twelve named
// accumulators stay in registers, where an array of them went to the stack.
template <bool FULL>
__attribute__((target("avx2,fma"))) void tile(const float* a, int64_t lda, const float* b,
                                              int64_t ldb, float* c, int64_t ldc, int64_t K,
                                              int64_t m, int64_t cols) {
  const float* r[6];
  for (int i = 0; i < 6; ++i) r[i] = a + std::min<int64_t>(i, m - 1) * lda;
  const float *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3], *r4 = r[4], *r5 = r[5];
  const __m256i m0 = FULL || cols >= 8 ? _mm256_set1_epi32(-1) : lanes(cols);
  const __m256i m1 = FULL ? _mm256_set1_epi32(-1)
                          : (cols > 8 ? lanes(cols - 8) : _mm256_setzero_si256());
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < K; ++k, b += ldb) {
    const __m256 b0 = FULL ? _mm256_loadu_ps(b) : _mm256_maskload_ps(b, m0);
    const __m256 b1 = FULL ? _mm256_loadu_ps(b + 8) : _mm256_maskload_ps(b + 8, m1);
    __m256 av = _mm256_broadcast_ss(r0 + k);
    c00 = _mm256_fmadd_ps(av, b0, c00);
    c01 = _mm256_fmadd_ps(av, b1, c01);
    av = _mm256_broadcast_ss(r1 + k);
    c10 = _mm256_fmadd_ps(av, b0, c10);
    c11 = _mm256_fmadd_ps(av, b1, c11);
    av = _mm256_broadcast_ss(r2 + k);
    c20 = _mm256_fmadd_ps(av, b0, c20);
    c21 = _mm256_fmadd_ps(av, b1, c21);
    av = _mm256_broadcast_ss(r3 + k);
    c30 = _mm256_fmadd_ps(av, b0, c30);
    c31 = _mm256_fmadd_ps(av, b1, c31);
    av = _mm256_broadcast_ss(r4 + k);
    c40 = _mm256_fmadd_ps(av, b0, c40);
    c41 = _mm256_fmadd_ps(av, b1, c41);
    av = _mm256_broadcast_ss(r5 + k);
    c50 = _mm256_fmadd_ps(av, b0, c50);
    c51 = _mm256_fmadd_ps(av, b1, c51);
  }
  const __m256 out[6][2] = {{c00, c01}, {c10, c11}, {c20, c21},
                            {c30, c31}, {c40, c41}, {c50, c51}};
  for (int64_t i = 0; i < m; ++i, c += ldc) {
    if (FULL) {
      _mm256_storeu_ps(c, out[i][0]);
      _mm256_storeu_ps(c + 8, out[i][1]);
    } else {
      _mm256_maskstore_ps(c, m0, out[i][0]);
      _mm256_maskstore_ps(c + 8, m1, out[i][1]);
    }
  }
}

// One product, b in strips: strip j is [K][16], contiguous, so that a tile
// walks it in order. Row-major, a strip's K rows lay N floats apart (1 KB at
// N = 256) and crowded a few sets of L1: 64 x 256 x 256 ran 1.3x slower so.
__attribute__((target("avx2,fma"))) void strip_rows(const float* a, const float* b, float* c,
                                                    int64_t M, int64_t K, int64_t N) {
  for (int64_t i = 0; i < M; i += 6) {
    const int64_t m = std::min<int64_t>(6, M - i);
    for (int64_t j = 0; j < N; j += 16) {
      const int64_t cols = std::min<int64_t>(16, N - j);
      const float* strip = b + j * K;  // (j / 16) strips of K x 16 before it
      if (cols == 16) {
        tile<true>(a + i * K, K, strip, 16, c + i * N + j, N, K, m, 16);
      } else {
        tile<false>(a + i * K, K, strip, 16, c + i * N + j, N, K, m, cols);
      }
    }
  }
}
#endif

}  // namespace

bool has_avx2_fma() {
#ifdef ADM_HAVE_AVX2_GEMM
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

void small_gemm_strips(const float* a, const float* b, float* c, int64_t M, int64_t K,
                       int64_t N) {
#ifdef ADM_HAVE_AVX2_GEMM
  strip_rows(a, b, c, M, K, N);
#else
  (void)a, (void)b, (void)c, (void)M, (void)K, (void)N;
#endif
}

}  // namespace adm_fast_cpu
