// adm_fast CPU kernels: plain C++ over raw pointers (no tensors).
//
// Layout: x is NCHW-contiguous, seen as [N, C, HW] (HW = 1 for [N, C]).
// Small per-channel vectors (weight, bias) and per-sample vectors (scale,
// shift: [N, C]) arrive as contiguous fp32, or nullptr when absent.
// Statistics are fp32 values accumulated in chunks into doubles.
#pragma once

#include <cstdint>

namespace adm_fast_cpu {

template <typename T>
void group_norm_act_fwd(const T* x, T* y, float* mean, float* rstd, const float* weight,
                        const float* bias, const float* scale, const float* shift, int64_t N,
                        int64_t C, int64_t HW, int64_t G, double eps, bool act);

// g = dy·SiLU'(h2) (or dy); per (n, c): r1 = Σ g, r2 = Σ g·x̂. Writes dx and, per
// (n, c), dscale = w·r2 + b·r1, dshift = r1, t1 = (1+s)·r1, t2 = (1+s)·r2 (the
// caller sums t2, t1 over n for dweight, dbias). Any output may be nullptr.
template <typename T>
void group_norm_act_bwd(const T* dy, const T* x, const float* mean, const float* rstd,
                        const float* weight, const float* bias, const float* scale,
                        const float* shift, T* dx, float* dscale, float* dshift, float* t1,
                        float* t2, int64_t N, int64_t C, int64_t HW, int64_t G, bool act);

// The same for channels-last x, seen as [N, HW, C] (C contiguous); same outputs.
template <typename T>
void group_norm_act_fwd_nhwc(const T* x, T* y, float* mean, float* rstd, const float* weight,
                             const float* bias, const float* scale, const float* shift,
                             int64_t N, int64_t C, int64_t HW, int64_t G, double eps, bool act);

template <typename T>
void group_norm_act_bwd_nhwc(const T* dy, const T* x, const float* mean, const float* rstd,
                             const float* weight, const float* bias, const float* scale,
                             const float* shift, T* dx, float* dscale, float* dshift, float* t1,
                             float* t2, int64_t N, int64_t C, int64_t HW, int64_t G, bool act);

// One DDPM / DDIM step (adm_fast.ops.diffusion_step), fp32; coefs is [rows, B].
// model_out is [B, C or 2C, HW] with sample stride out_stride; mean_type and
// var_type are the codes of csrc/step_codes.h.
void ddpm_step(const float* x, const float* model_out, const float* noise, const float* grad,
               const float* coefs, float* sample, float* x0_out, int64_t B, int64_t CHW,
               int64_t out_stride, int mean_type, int var_type, bool clip);

void ddim_step(const float* x, const float* model_out, const float* noise, const float* grad,
               const float* coefs, float* sample, float* x0_out, int64_t B, int64_t CHW,
               int64_t out_stride, int mean_type, bool clip, float eta);

// y = conv2d(x, w, bias, padding=1) by Winograd F(2x2, 3x3) for channels-last
// fp32 x [N, H, W, C] -> y [N, H, W, O], from U = G·w·Gᵀ in strips of 16
// output channels, [16][S = ceil(O/16)][C][16] (zero past O), the layout the
// products read (winograd_f23_weight, from w[o·so + c·sc + ky·sy + kx·sx]: any
// layout of [O, C, 3, 3]); bias [O] or nullptr. csrc/cpu/conv3x3_winograd.cpp. Needs
// has_avx2_fma().
inline int64_t winograd_strips(int64_t O) { return (O + 15) / 16; }
void winograd_f23_weight(const float* w, float* U, int64_t O, int64_t C, int64_t so,
                         int64_t sc, int64_t sy, int64_t sx);

// The weights' gradient, in three steps, for tiles t0..t0+nt (T = N·ceil(H/2)·
// ceil(W/2) in all): their 16 transformed input rows V[ξ·stride + k·C] from
// channels-last x, their 16 transformed gradient rows Ŷ[ξ·stride + k·O] from
// channels-last dy; then, from dUt[ξ] = Σ Ŷ[ξ]ᵀ·V[ξ] over all tiles ([16][O][C],
// the caller's products), dw in channels-last order [O][3][3][C].
void winograd_f23_transform_input(const float* x, float* V, int64_t N, int64_t H, int64_t W,
                                  int64_t C, int64_t t0, int64_t nt, int64_t stride);
void winograd_f23_transform_grad(const float* dy, float* Yh, int64_t N, int64_t H, int64_t W,
                                 int64_t O, int64_t t0, int64_t nt, int64_t stride);
void winograd_f23_weight_grad(const float* dUt, float* dw, int64_t O, int64_t C);
void winograd_f23_conv(const float* x, const float* U, const float* bias, float* y, int64_t N,
                       int64_t H, int64_t W, int64_t C, int64_t O);

// c = a·b, fp32, a [M, K] and c [M, N] row-major, b in strips of 16 columns
// [ceil(N/16)][K][16] (zero past N), one thread, AVX2+FMA
// (csrc/cpu/conv3x3_gemm.cpp); has_avx2_fma(): whether this CPU runs it.
bool has_avx2_fma();
void small_gemm_strips(const float* a, const float* b, float* c, int64_t M, int64_t K,
                       int64_t N);

}  // namespace adm_fast_cpu
