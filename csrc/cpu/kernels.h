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

// One DDPM / DDIM step (adm_fast.ops.step_math), fp32; coefs is [rows, B].
// model_out is [B, C or 2C, HW] with sample stride out_stride; mean_type and
// var_type are the codes of csrc/step_codes.h.
void ddpm_step(const float* x, const float* model_out, const float* noise, const float* grad,
               const float* coefs, float* sample, float* x0_out, int64_t B, int64_t CHW,
               int64_t out_stride, int mean_type, int var_type, bool clip);

void ddim_step(const float* x, const float* model_out, const float* noise, const float* grad,
               const float* coefs, float* sample, float* x0_out, int64_t B, int64_t CHW,
               int64_t out_stride, int mean_type, bool clip, float eta);

// Winograd F(2x2, 3x3) transforms for channels-last fp32 maps x [N, H, W, C]:
// V [16, T, C] with T = N·⌈H/2⌉·⌈W/2⌉ tiles; y [N, H, W, O] from M [16, T, O]
// (bias: [O] or nullptr). csrc/cpu/winograd.cpp.
void winograd_f23_input(const float* x, float* V, int64_t N, int64_t H, int64_t W, int64_t C);
void winograd_f23_output(const float* M, const float* bias, float* y, int64_t N, int64_t H,
                         int64_t W, int64_t O);

}  // namespace adm_fast_cpu
