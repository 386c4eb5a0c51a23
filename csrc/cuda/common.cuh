// Shared device helpers for adm_fast's CUDA kernels: dtype conversion, 16-byte
// vectors, and block reductions of (sum) and (count, mean, M2) statistics.
// Torch-free: raw pointers and CUDA only, so it compiles with plain nvcc.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace adm_fast_cuda {

constexpr int kWarp = 32;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// 16 bytes of T: one vectorised load or store.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <typename T>
__device__ __forceinline__ Vec16<T> load16(const T* p) {
  return *reinterpret_cast<const Vec16<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void store16(T* p, const Vec16<T>& v) {
  *reinterpret_cast<Vec16<T>*>(p) = v;
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Welford/Chan statistics: merging never forms E[x²] − E[x]².
struct Stats {
  float n, mean, m2;
};

__device__ __forceinline__ Stats merge(Stats a, Stats b) {
  const float n = a.n + b.n;
  if (n == 0.0f) return a;
  const float delta = b.mean - a.mean;
  const float wb = b.n / n;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

__device__ __forceinline__ Stats warp_merge(Stats s) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    Stats o{__shfl_xor_sync(0xffffffffu, s.n, offset),
            __shfl_xor_sync(0xffffffffu, s.mean, offset),
            __shfl_xor_sync(0xffffffffu, s.m2, offset)};
    s = merge(s, o);
  }
  return s;
}

// Every thread of the block gets the merged statistics. blockDim.x must be a
// multiple of 32 and at most 1024.
__device__ __forceinline__ Stats block_merge(Stats s) {
  __shared__ Stats warps[32];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  s = warp_merge(s);
  if (lane == 0) warps[warp] = s;
  __syncthreads();
  const int nwarps = blockDim.x / kWarp;
  s = lane < nwarps ? warps[lane] : Stats{0.0f, 0.0f, 0.0f};
  s = warp_merge(s);
  __syncthreads();  // warps[] may be reused by the next call
  return s;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warps[32];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) warps[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x / kWarp;
  v = lane < nwarps ? warps[lane] : 0.0f;
  v = warp_sum(v);
  __syncthreads();
  return v;
}

__device__ __forceinline__ float silu(float h) { return h / (1.0f + __expf(-h)); }

__device__ __forceinline__ float silu_grad(float h) {
  const float sig = 1.0f / (1.0f + __expf(-h));
  return sig * (1.0f + h * (1.0f - sig));
}

}  // namespace adm_fast_cuda
