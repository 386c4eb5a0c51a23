// group_norm_act in CUDA: y = SiLU((GN(x)·w + b)·(1 + s) + sh), fwd and bwd.
//
// Forward: a group of at most kFusedMax elements is done by one block through
// shared memory (one read, one write). Larger groups: split statistics (Chan
// merges of 16-byte-vector chunks, fp32), a tiny finalize, and an elementwise
// apply with 16-byte loads and stores. Backward: per-channel Σ g and Σ g·x̂
// (split along HW), a finalize per group, an elementwise dx. NCHW and
// channels_last (NHWC) differ only in how an element's channel is found.
#include <algorithm>

#include "common.cuh"
#include "kernels.h"

namespace adm_fast_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kFusedMax = 4096;

struct Layout {  // where element (n, c, hw) of x lives
  int64_t c, hw;
  bool cl;
  __device__ __forceinline__ int64_t at(int64_t n, int64_t ch, int64_t p) const {
    return cl ? (n * hw + p) * c + ch : (n * c + ch) * hw + p;
  }
  // The e-th element of group (n, g): NCHW runs through channels, NHWC through
  // the group's channels at each position (so runs are contiguous either way).
  __device__ __forceinline__ int64_t group_elem(int64_t n, int64_t g, int64_t cg,
                                                int64_t e) const {
    return cl ? at(n, g * cg + e % cg, e / cg) : (n * c + g * cg) * hw + e;
  }
  __device__ __forceinline__ int64_t channel_of(int64_t m) const {
    return cl ? m % c : (m / hw) % c;
  }
  __device__ __forceinline__ int64_t sample_of(int64_t m) const { return m / (c * hw); }
};

struct Params {  // fp32 per-channel vectors, any may be null
  const float* w;
  const float* b;
  const float* s;
  const float* sh;
  int64_t c;
  __device__ __forceinline__ void get(int64_t n, int64_t ch, float& w_, float& b_, float& one_s,
                                      float& sh_) const {
    w_ = w ? w[ch] : 1.0f;
    b_ = b ? b[ch] : 0.0f;
    one_s = s ? 1.0f + s[n * c + ch] : 1.0f;
    sh_ = sh ? sh[n * c + ch] : 0.0f;
  }
};

template <typename T>
__global__ void gn_fwd_fused(const T* __restrict__ x, T* __restrict__ y, float* mean,
                             float* rstd, Params prm, Layout L, int64_t groups, int64_t cg,
                             float eps, bool act) {
  extern __shared__ float buf[];
  const int64_t ng = blockIdx.x, n = ng / groups, g = ng % groups, m = cg * L.hw;
  for (int64_t e = threadIdx.x; e < m; e += blockDim.x) buf[e] = to_f(x[L.group_elem(n, g, cg, e)]);
  __syncthreads();
  float sum = 0.0f, cnt = 0.0f;
  for (int64_t e = threadIdx.x; e < m; e += blockDim.x) {
    sum += buf[e];
    cnt += 1.0f;
  }
  const float local_mean = cnt > 0.0f ? sum / cnt : 0.0f;
  float m2 = 0.0f;
  for (int64_t e = threadIdx.x; e < m; e += blockDim.x) {
    const float d = buf[e] - local_mean;
    m2 += d * d;
  }
  const Stats st = block_merge(Stats{cnt, local_mean, m2});
  const float mu = st.mean, r = rsqrtf(st.m2 / st.n + eps);
  if (threadIdx.x == 0) {
    mean[ng] = mu;
    rstd[ng] = r;
  }
  for (int64_t e = threadIdx.x; e < m; e += blockDim.x) {
    const int64_t ch = g * cg + (L.cl ? e % cg : e / L.hw);
    float w, b, one_s, sh;
    prm.get(n, ch, w, b, one_s, sh);
    float h = (buf[e] - mu) * (r * w * one_s) + (b * one_s + sh);
    if (act) h = silu(h);
    y[L.group_elem(n, g, cg, e)] = from_f<T>(h);
  }
}

template <typename T, bool VEC>
__global__ void gn_stats(const T* __restrict__ x, float* part, Layout L, int64_t groups,
                         int64_t cg, int64_t per, int split) {
  constexpr int V = VEC ? Vec16<T>::N : 1;
  const int64_t ng = blockIdx.x, n = ng / groups, g = ng % groups;
  const int64_t m = cg * L.hw, start = blockIdx.y * per, end = min(m, start + per);
  Stats st{0.0f, 0.0f, 0.0f};
  for (int64_t e = start + threadIdx.x * V; e < end; e += int64_t(blockDim.x) * V) {
    float v[V];
    const T* p = x + L.group_elem(n, g, cg, e);
    if constexpr (VEC) {
      const Vec16<T> chunk = load16(p);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = to_f(chunk.v[j]);
    } else {
      v[0] = to_f(*p);
    }
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < V; ++j) s += v[j];
    const float mu = s / V;
    float q = 0.0f;
#pragma unroll
    for (int j = 0; j < V; ++j) q += (v[j] - mu) * (v[j] - mu);
    st = merge(st, Stats{float(V), mu, q});
  }
  st = block_merge(st);
  if (threadIdx.x == 0) {
    float* out = part + (ng * split + blockIdx.y) * 3;
    out[0] = st.n;
    out[1] = st.mean;
    out[2] = st.m2;
  }
}

__global__ void gn_stats_finalize(const float* part, float* mean, float* rstd, int split,
                                  float eps) {
  const int64_t ng = blockIdx.x;
  Stats st{0.0f, 0.0f, 0.0f};
  for (int s = threadIdx.x; s < split; s += blockDim.x) {
    const float* p = part + (ng * split + s) * 3;
    st = merge(st, Stats{p[0], p[1], p[2]});
  }
  st = warp_merge(st);
  if (threadIdx.x == 0) {
    mean[ng] = st.mean;
    rstd[ng] = rsqrtf(st.m2 / st.n + eps);
  }
}

template <typename T, bool VEC>
__global__ void gn_fwd_apply(const T* __restrict__ x, T* __restrict__ y, const float* mean,
                             const float* rstd, Params prm, Layout L, int64_t total,
                             int64_t groups, int64_t cg, bool act) {
  constexpr int V = VEC ? Vec16<T>::N : 1;
  const int64_t m0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (m0 >= total) return;
  float v[V];
  if constexpr (VEC) {
    const Vec16<T> chunk = load16(x + m0);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = to_f(chunk.v[j]);
  } else {
    v[0] = to_f(x[m0]);
  }
  const int64_t n = L.sample_of(m0);
  Vec16<T> out;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int64_t ch = L.channel_of(m0 + j), grp = n * groups + ch / cg;
    float w, b, one_s, sh;
    prm.get(n, ch, w, b, one_s, sh);
    float h = (v[j] - mean[grp]) * (rstd[grp] * w * one_s) + (b * one_s + sh);
    if (act) h = silu(h);
    if constexpr (VEC) {
      out.v[j] = from_f<T>(h);
    } else {
      y[m0] = from_f<T>(h);
    }
  }
  if constexpr (VEC) store16(y + m0, out);
}

// The V values of x and dy at off, as floats (one 16-byte load each when VEC).
template <typename T, bool VEC>
__device__ __forceinline__ void load_x_dy(const T* x, const T* dy, int64_t off, float* xv,
                                          float* dv) {
  if constexpr (VEC) {
    const Vec16<T> a = load16(x + off), d = load16(dy + off);
#pragma unroll
    for (int j = 0; j < Vec16<T>::N; ++j) {
      xv[j] = to_f(a.v[j]);
      dv[j] = to_f(d.v[j]);
    }
  } else {
    xv[0] = to_f(x[off]);
    dv[0] = to_f(dy[off]);
  }
}

// Per (n, c) over one range of positions: Σ g and Σ g·x̂ (NCHW: rows are contiguous).
template <typename T, bool VEC>
__global__ void gn_bwd_reduce_nchw(const T* __restrict__ x, const T* __restrict__ dy,
                                   const float* mean, const float* rstd, Params prm, Layout L,
                                   int64_t groups, int64_t cg, int64_t per, int split, bool act,
                                   float* part) {
  constexpr int V = VEC ? Vec16<T>::N : 1;
  const int64_t nc = blockIdx.x, n = nc / L.c, ch = nc % L.c, grp = n * groups + ch / cg;
  const int64_t start = blockIdx.y * per, end = min(L.hw, start + per);
  float w, b, one_s, sh;
  prm.get(n, ch, w, b, one_s, sh);
  const float mu = mean[grp], r = rstd[grp];
  float r1 = 0.0f, r2 = 0.0f;
  const T* xr = x + nc * L.hw;
  const T* dr = dy + nc * L.hw;
  for (int64_t p = start + threadIdx.x * V; p < end; p += int64_t(blockDim.x) * V) {
    float xv[V], dv[V];
    load_x_dy<T, VEC>(xr, dr, p, xv, dv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float xhat = (xv[j] - mu) * r;
      const float g = act ? dv[j] * silu_grad((xhat * w + b) * one_s + sh) : dv[j];
      r1 += g;
      r2 += g * xhat;
    }
  }
  r1 = block_sum(r1);
  r2 = block_sum(r2);
  if (threadIdx.x == 0) {
    const int64_t nct = gridDim.x;
    part[int64_t(blockIdx.y) * nct + nc] = r1;
    part[(int64_t(split) + blockIdx.y) * nct + nc] = r2;
  }
}

// NHWC: each thread owns V consecutive channels and walks a range of positions,
// so a warp reads contiguous memory.
template <typename T, bool VEC>
__global__ void gn_bwd_reduce_nhwc(const T* __restrict__ x, const T* __restrict__ dy,
                                   const float* mean, const float* rstd, Params prm, Layout L,
                                   int64_t groups, int64_t cg, int64_t per, int split, bool act,
                                   float* part, int64_t nrows) {
  constexpr int V = VEC ? Vec16<T>::N : 1;
  const int64_t n = blockIdx.x;
  const int64_t c0 = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  if (c0 >= L.c) return;
  const int64_t start = blockIdx.z * per, end = min(L.hw, start + per);
  float w[V], b[V], one_s[V], sh[V], mu[V], r[V], r1[V], r2[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    prm.get(n, c0 + j, w[j], b[j], one_s[j], sh[j]);
    const int64_t grp = n * groups + (c0 + j) / cg;
    mu[j] = mean[grp];
    r[j] = rstd[grp];
    r1[j] = r2[j] = 0.0f;
  }
  for (int64_t p = start; p < end; ++p) {
    const int64_t off = L.at(n, c0, p);
    float xv[V], dv[V];
    load_x_dy<T, VEC>(x, dy, off, xv, dv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float xhat = (xv[j] - mu[j]) * r[j];
      const float g = act ? dv[j] * silu_grad((xhat * w[j] + b[j]) * one_s[j] + sh[j]) : dv[j];
      r1[j] += g;
      r2[j] += g * xhat;
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    part[int64_t(blockIdx.z) * nrows + n * L.c + c0 + j] = r1[j];
    part[(int64_t(split) + blockIdx.z) * nrows + n * L.c + c0 + j] = r2[j];
  }
}

// Per (n, g), one warp: the small gradients and the group coefficients c1, c2.
__global__ void gn_bwd_finalize(const float* part, Params prm, int64_t c, int64_t groups,
                                int64_t cg, int split, float inv_m, float* dscale,
                                float* dshift, float* t1, float* t2, float* coef) {
  const int64_t ng = blockIdx.x, n = ng / groups, g = ng % groups, nrows = gridDim.x / groups * c;
  float k1 = 0.0f, k2 = 0.0f;
  for (int64_t cl = threadIdx.x; cl < cg; cl += blockDim.x) {
    const int64_t ch = g * cg + cl, row = n * c + ch;
    float r1 = 0.0f, r2 = 0.0f;
    for (int s = 0; s < split; ++s) {
      r1 += part[int64_t(s) * nrows + row];
      r2 += part[(int64_t(split) + s) * nrows + row];
    }
    float w, b, one_s, sh;
    prm.get(n, ch, w, b, one_s, sh);
    if (dshift) dshift[row] = r1;
    if (dscale) dscale[row] = w * r2 + b * r1;
    if (t1) t1[row] = one_s * r1;
    if (t2) t2[row] = one_s * r2;
    k1 += w * one_s * r1;
    k2 += w * one_s * r2;
  }
  k1 = warp_sum(k1);
  k2 = warp_sum(k2);
  if (threadIdx.x == 0) {
    coef[ng] = k1 * inv_m;
    coef[gridDim.x + ng] = k2 * inv_m;
  }
}

template <typename T, bool VEC>
__global__ void gn_bwd_apply(const T* __restrict__ x, const T* __restrict__ dy,
                             T* __restrict__ dx, const float* mean, const float* rstd,
                             const float* coef, Params prm, Layout L, int64_t total,
                             int64_t groups, int64_t cg, int64_t ngroups_total, bool act) {
  constexpr int V = VEC ? Vec16<T>::N : 1;
  const int64_t m0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (m0 >= total) return;
  float xv[V], dv[V];
  load_x_dy<T, VEC>(x, dy, m0, xv, dv);
  const int64_t n = L.sample_of(m0);
  Vec16<T> out;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int64_t ch = L.channel_of(m0 + j), grp = n * groups + ch / cg;
    float w, b, one_s, sh;
    prm.get(n, ch, w, b, one_s, sh);
    const float r = rstd[grp], xhat = (xv[j] - mean[grp]) * r;
    const float g = act ? dv[j] * silu_grad((xhat * w + b) * one_s + sh) : dv[j];
    const float d = r * (g * one_s * w - coef[grp] - xhat * coef[ngroups_total + grp]);
    if constexpr (VEC) {
      out.v[j] = from_f<T>(d);
    } else {
      dx[m0] = from_f<T>(d);
    }
  }
  if constexpr (VEC) store16(dx + m0, out);
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int vec_elems(DType t) { return t == DType::kFloat ? 4 : 8; }

// 16-byte vectors line up with channels (NCHW: rows of HW; NHWC: C) and the
// pointers are 16-byte aligned.
bool vectorisable(const GroupNormArgs& a, const void* p1, const void* p2) {
  const int v = vec_elems(a.dtype);
  const bool fits = a.channels_last ? (a.c % v == 0 && (a.c / a.groups) % v == 0)
                                    : (a.hw % v == 0);
  auto ok = [](const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15) == 0; };
  return fits && ok(p1) && ok(p2);
}

struct ForwardPlan {
  bool fused;
  int split;
  int64_t per;
};

ForwardPlan plan_forward(const GroupNormArgs& a) {
  const int64_t cg = a.c / a.groups, m = cg * a.hw;
  if (m <= kFusedMax) return {true, 1, m};
  const int64_t want = cdiv(4LL * std::max(1, a.sm_count), a.n * a.groups);
  const int split = int(std::max<int64_t>(1, std::min<int64_t>(want, cdiv(m, 4096))));
  const int64_t per = cdiv(cdiv(m, split), 16) * 16;
  return {false, int(cdiv(m, per)), per};
}

struct BackwardPlan {
  int split;
  int64_t per;
  int64_t channel_blocks;  // NHWC only
};

constexpr int kNhwcThreads = 64;

BackwardPlan plan_backward(const GroupNormArgs& a) {
  const int64_t sm4 = 4LL * std::max(1, a.sm_count);
  if (a.channels_last) {
    const int64_t cb = cdiv(a.c, int64_t(kNhwcThreads) * vec_elems(a.dtype));
    const int split = int(std::max<int64_t>(1, std::min<int64_t>(cdiv(sm4, a.n * cb), a.hw)));
    const int64_t per = cdiv(a.hw, split);
    return {int(cdiv(a.hw, per)), per, cb};
  }
  const int split = int(std::max<int64_t>(
      1, std::min<int64_t>(cdiv(sm4, a.n * a.c), cdiv(a.hw, 2048))));
  const int64_t per = cdiv(cdiv(a.hw, split), 16) * 16;
  return {int(cdiv(a.hw, per)), per, 0};
}

template <typename T>
cudaError_t forward_impl(const GroupNormArgs& a, float* ws, cudaStream_t stream) {
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const int64_t cg = a.c / a.groups, total = a.n * a.c * a.hw;
  const Params prm{a.weight, a.bias, a.scale, a.shift, a.c};
  const Layout L{a.c, a.hw, a.channels_last};
  const ForwardPlan plan = plan_forward(a);
  if (plan.fused) {
    gn_fwd_fused<T><<<a.n * a.groups, kThreads, plan.per * sizeof(float), stream>>>(
        x, y, a.mean, a.rstd, prm, L, a.groups, cg, a.eps, a.act);
    return cudaGetLastError();
  }
  const bool vec = vectorisable(a, x, y);
  const dim3 sgrid(unsigned(a.n * a.groups), unsigned(plan.split));
  if (vec) {
    gn_stats<T, true><<<sgrid, kThreads, 0, stream>>>(x, ws, L, a.groups, cg, plan.per, plan.split);
  } else {
    gn_stats<T, false><<<sgrid, kThreads, 0, stream>>>(x, ws, L, a.groups, cg, plan.per, plan.split);
  }
  gn_stats_finalize<<<a.n * a.groups, kWarp, 0, stream>>>(ws, a.mean, a.rstd, plan.split, a.eps);
  const int v = vec ? vec_elems(a.dtype) : 1;
  const unsigned blocks = unsigned(cdiv(cdiv(total, v), kThreads));
  if (vec) {
    gn_fwd_apply<T, true><<<blocks, kThreads, 0, stream>>>(x, y, a.mean, a.rstd, prm, L, total,
                                                            a.groups, cg, a.act);
  } else {
    gn_fwd_apply<T, false><<<blocks, kThreads, 0, stream>>>(x, y, a.mean, a.rstd, prm, L, total,
                                                             a.groups, cg, a.act);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_impl(const GroupNormBackwardArgs& b, float* ws, cudaStream_t stream) {
  const GroupNormArgs& a = b.fwd;
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(b.dy);
  T* dx = static_cast<T*>(b.dx);
  const int64_t cg = a.c / a.groups, total = a.n * a.c * a.hw, nrows = a.n * a.c;
  const Params prm{a.weight, a.bias, a.scale, a.shift, a.c};
  const Layout L{a.c, a.hw, a.channels_last};
  const BackwardPlan plan = plan_backward(a);
  float* part = ws;
  float* coef = ws + 2LL * plan.split * nrows;
  const bool vec = vectorisable(a, x, dy) && vectorisable(a, dx, nullptr);
  if (a.channels_last) {
    const int v = vec ? vec_elems(a.dtype) : 1;
    const dim3 grid(unsigned(a.n), unsigned(cdiv(a.c, int64_t(kNhwcThreads) * v)),
                    unsigned(plan.split));
    if (vec) {
      gn_bwd_reduce_nhwc<T, true><<<grid, kNhwcThreads, 0, stream>>>(
          x, dy, b.mean, b.rstd, prm, L, a.groups, cg, plan.per, plan.split, a.act, part, nrows);
    } else {
      gn_bwd_reduce_nhwc<T, false><<<grid, kNhwcThreads, 0, stream>>>(
          x, dy, b.mean, b.rstd, prm, L, a.groups, cg, plan.per, plan.split, a.act, part, nrows);
    }
  } else {
    const dim3 grid(unsigned(nrows), unsigned(plan.split));
    if (vec) {
      gn_bwd_reduce_nchw<T, true><<<grid, kThreads, 0, stream>>>(
          x, dy, b.mean, b.rstd, prm, L, a.groups, cg, plan.per, plan.split, a.act, part);
    } else {
      gn_bwd_reduce_nchw<T, false><<<grid, kThreads, 0, stream>>>(
          x, dy, b.mean, b.rstd, prm, L, a.groups, cg, plan.per, plan.split, a.act, part);
    }
  }
  gn_bwd_finalize<<<a.n * a.groups, kWarp, 0, stream>>>(
      part, prm, a.c, a.groups, cg, plan.split, 1.0f / float(cg * a.hw), b.dscale, b.dshift,
      b.t1, b.t2, coef);
  const int v = vec ? vec_elems(a.dtype) : 1;
  const unsigned blocks = unsigned(cdiv(cdiv(total, v), kThreads));
  if (vec) {
    gn_bwd_apply<T, true><<<blocks, kThreads, 0, stream>>>(x, dy, dx, b.mean, b.rstd, coef, prm,
                                                            L, total, a.groups, cg,
                                                            a.n * a.groups, a.act);
  } else {
    gn_bwd_apply<T, false><<<blocks, kThreads, 0, stream>>>(x, dy, dx, b.mean, b.rstd, coef,
                                                             prm, L, total, a.groups, cg,
                                                             a.n * a.groups, a.act);
  }
  return cudaGetLastError();
}

}  // namespace

int64_t group_norm_act_forward_workspace(const GroupNormArgs& a) {
  const ForwardPlan plan = plan_forward(a);
  return plan.fused ? 0 : a.n * a.groups * plan.split * 3;
}

cudaError_t group_norm_act_forward(const GroupNormArgs& a, float* workspace,
                                   cudaStream_t stream) {
  if (a.c % a.groups != 0) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat: return forward_impl<float>(a, workspace, stream);
    case DType::kHalf: return forward_impl<__half>(a, workspace, stream);
    case DType::kBFloat16: return forward_impl<__nv_bfloat16>(a, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t group_norm_act_backward_workspace(const GroupNormBackwardArgs& b) {
  const BackwardPlan plan = plan_backward(b.fwd);
  return 2LL * plan.split * b.fwd.n * b.fwd.c + 2LL * b.fwd.n * b.fwd.groups;
}

cudaError_t group_norm_act_backward(const GroupNormBackwardArgs& b, float* workspace,
                                    cudaStream_t stream) {
  if (b.fwd.c % b.fwd.groups != 0) return cudaErrorInvalidValue;
  switch (b.fwd.dtype) {
    case DType::kFloat: return backward_impl<float>(b, workspace, stream);
    case DType::kHalf: return backward_impl<__half>(b, workspace, stream);
    case DType::kBFloat16: return backward_impl<__nv_bfloat16>(b, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace adm_fast_cuda
