// Small vectorisable helpers for the CPU kernels: loops over contiguous fp32
// rows that GCC/Clang turn into SIMD code, and an exp that vectorises (the
// libm one does not). Functions carry target_clones so one portable build runs
// AVX-512 or AVX2 code where the CPU has it (chosen at load time).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ADM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ADM_CLONES
#endif

namespace adm_fast_cpu {

// exp(x) for x in fp32 range: 2^n·2^f with f in [-1/2, 1/2] and a degree-7
// polynomial for 2^f (relative error < 1e-8, below fp32 rounding). Written so
// the compiler vectorises it: selects instead of fmin/fmax, rounding by the
// 1.5·2^23 trick instead of nearbyint (which may touch the FP environment).
static inline float vexp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;
  const float f = (t - n) * 0.69314718055994531f;
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

static inline float vsigmoid(float h) { return 1.0f / (1.0f + vexp(-h)); }

template <typename T>
static inline float to_f(T v) {
  return static_cast<float>(v);
}

template <typename T>
static inline T from_f(float v) {
  return static_cast<T>(v);
}

}  // namespace adm_fast_cpu
