// Small vectorisable helpers for the CPU kernels: loops over contiguous fp32
// rows that GCC/Clang turn into SIMD code, and an exp that vectorises (the
// libm one does not). Functions carry target_clones so one portable build runs
// AVX-512 or AVX2+FMA code where the CPU has it (chosen at load time).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
// The x86-64 levels: v3 is AVX2 with FMA (plain "avx2" clones have no FMA).
#define ADM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ADM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ADM_CLONES
#endif

// The build turns off floating-point contraction (the step kernels must round
// as the eager step does); the normalisation kernels have no such contract and
// may fuse a·b + c into one FMA (the SiLU loop runs 1.4x faster with it).
#if defined(__GNUC__) && !defined(__clang__)
#define ADM_CONTRACT __attribute__((optimize("fp-contract=fast")))
#else
#define ADM_CONTRACT
#endif
#define ADM_FMA_CLONES ADM_CLONES ADM_CONTRACT

namespace adm_fast_cpu {

// e^f for |f| <= ln2/2: degree-7 Taylor polynomial (error below fp32 rounding).
static inline float exp_reduced(float f) {
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  return p * f + 1.0f;
}

// e^x = 2^n·e^f for x in [-87, 88] (normal results only): n = round(x/ln2) by
// the 1.5·2^23 trick (nearbyint may touch the FP environment), f = x - n·ln2 in
// two parts (Cody–Waite) so the reduction adds no error of its own: one
// product x·log2(e) would be off by |n|·2^-24 and cost 4e-6 relative at -87.
static inline float exp_in_range(float x) {
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float f = (x - n * 0.693145751953125f) - n * 1.428606820309417e-6f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return exp_reduced(f) * scale;
}

// exp(x) as torch's: overflow to inf past FLT_MAX (x > 88.72), subnormal
// results below FLT_MIN, 0 below -103.97, NaN for NaN. The same reduction as
// exp_in_range, 2^n applied as two normal factors 2^⌊n/2⌋·2^⌈n/2⌉ (each
// product by a power of two is exact until the last one overflows or goes
// subnormal, rounding once), so over exp_in_range's range the bytes are its.
// x is clamped to [-104, 89], where e^x is already 0 and inf in fp32 (a
// clamp at 88 gave 1.65e38 for inf: the sample's noise term went finite).
// Selects, not fmin/fmax (library calls), so loops over it vectorise.
static inline float vexp(float x) {
  x = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float f = (x - n * 0.693145751953125f) - n * 1.428606820309417e-6f;
  const int32_t ni = static_cast<int32_t>(n), lo = ni >> 1;  // n in [-150, 128]
  const uint32_t b1 = static_cast<uint32_t>(lo + 127) << 23;
  const uint32_t b2 = static_cast<uint32_t>(ni - lo + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &b1, sizeof(s1));
  std::memcpy(&s2, &b2, sizeof(s2));
  return exp_reduced(f) * s1 * s2;
}

// 1/(1 + e^-h), from e = e^-|h| (never overflows): r = 1/(1 + e) for h >= 0,
// e·r below. No select feeds the division: GCC would if-convert a clamped
// argument by also dividing by the clamp's constant, e^88, in every lane, and
// those quotients are subnormal (microcode assists: SiLU loops ran 3x slower
// on an AVX2 EPYC). The clamp of -|h| at -87 is an integer min on its bits
// (for non-positive floats, a larger signed pattern is a more negative value);
// below -87, e^-|h| is taken as 0 (true value < 1.7e-38), so SiLU(-inf) is
// NaN as in torch.
static inline float vsigmoid(float h) {
  int32_t hb;
  std::memcpy(&hb, &h, sizeof(hb));
  int32_t ab = hb | static_cast<int32_t>(0x80000000u);  // -|h|
  const int32_t lim = static_cast<int32_t>(0xC2AE0000u);  // -87.0f
  const bool under = ab > lim;                             // -|h| < -87 (or NaN)
  ab = under ? lim : ab;
  float a;
  std::memcpy(&a, &ab, sizeof(a));
  const float e = under ? 0.0f : exp_in_range(a);
  const float r = 1.0f / (1.0f + e);
  return hb >= 0 ? r : e * r;
}

static inline float vsilu(float h) { return h * vsigmoid(h); }

template <typename T>
static inline float to_f(T v) {
  return static_cast<float>(v);
}

template <typename T>
static inline T from_f(float v) {
  return static_cast<T>(v);
}

}  // namespace adm_fast_cpu
