// adm_fast CUDA kernels: the host-side API (torch-free: raw pointers, sizes,
// strides by layout, cudaStream_t). csrc/cuda/bindings.cpp is the only caller
// that knows tensors. Every function launches on `stream` and returns the
// launch status; nothing here allocates (the caller passes a workspace).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace adm_fast_cuda {

enum class DType { kFloat, kHalf, kBFloat16 };

// y = SiLU((GN(x)·w + b)·(1 + s) + sh) on x [N, C, HW], NCHW or channels-last
// ([N, HW, C] in memory: NHWC, or the [N, C, T] view of it). weight/bias: fp32
// [C]; scale/shift: fp32 [N, C] contiguous; any may be null. mean/rstd: fp32
// [N·G] outputs.
struct GroupNormArgs {
  DType dtype;
  const void* x;
  void* y;
  float* mean;
  float* rstd;
  const float* weight;
  const float* bias;
  const float* scale;
  const float* shift;
  int64_t n, c, hw, groups;
  float eps;
  bool act;
  bool channels_last;
  int sm_count;  // multiprocessors, to size the split reductions
};

// Floats of workspace group_norm_act_forward needs for these arguments.
int64_t group_norm_act_forward_workspace(const GroupNormArgs& a);
cudaError_t group_norm_act_forward(const GroupNormArgs& a, float* workspace,
                                   cudaStream_t stream);

// Backward: dx (x's dtype, x's layout) and fp32 [N, C] outputs dscale, dshift,
// t1 = (1+s)·Σ g, t2 = (1+s)·Σ g·x̂ (the caller sums t2, t1 over N for
// dweight, dbias); any of those four may be null.
struct GroupNormBackwardArgs {
  GroupNormArgs fwd;  // x, weight, bias, scale, shift, sizes, layout (y unused)
  const void* dy;     // same dtype and layout as x
  void* dx;
  const float* mean;
  const float* rstd;
  float* dscale;
  float* dshift;
  float* t1;
  float* t2;
};

int64_t group_norm_act_backward_workspace(const GroupNormBackwardArgs& a);
cudaError_t group_norm_act_backward(const GroupNormBackwardArgs& a, float* workspace,
                                    cudaStream_t stream);

// Strides of a tensor viewed as [B, C, HW]: element (n, ch, p) at n·b + ch·c + p·hw.
struct Strides3 {
  int64_t b, c, hw;
};

// One DDPM / DDIM step (adm_fast.ops.diffusion_step). x, noise, grad: [B, C, HW]
// of dtype `dtype`; model_out [B, C or 2C, HW] of out_dtype, the variance half
// from channel C; each with its own strides, NCHW-contiguous or channels-last
// (C contiguous), x dense in its layout. coefs fp32 [rows, B]; grad may be
// null. mean_type and var_type are the codes of csrc/step_codes.h. sample and
// x0 are written as fp32 with x's strides.
struct StepArgs {
  DType dtype, out_dtype;
  const void* x;
  const void* model_out;
  const void* noise;
  const void* grad;
  const float* coefs;
  float* sample;
  float* x0;
  int64_t b, c, hw;
  Strides3 sx, sout, snoise, sgrad;
  int mean_type;
  bool clip;
};

cudaError_t ddpm_step(const StepArgs& a, int var_type, cudaStream_t stream);
cudaError_t ddim_step(const StepArgs& a, float eta, cudaStream_t stream);

}  // namespace adm_fast_cuda
