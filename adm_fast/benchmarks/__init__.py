"""adm_fast's benchmarks, importable (`adm-fast bench` runs them in-process;
bench/ in the repository keeps gpu_check and results/).

  sample          whole classifier-guided sampling loops of the released ADM
                  layouts (or a tiny one on CPU): adm_fast's backends against
                  guided-diffusion's eager computation and torch.compile,
                  checked in the same run to give the same samples
  models          UNet forward and training step, eager vs adm_fast vs compile
  <op>           the per-op benchmarks, one per op spec file of adm_fast.ops
                  (conv3x3, diffusion_step, group_norm_act, qkv_attention):
                  GB/s or TFLOP/s against the device ceilings, error against
                  fp64, ratio to eager
  train           a training step: bytes saved for backward, time, GPU peak
                  and the largest batch that fits
"""

import importlib

_WHERE = {"PEAK_GBPS": "common", "PEAK_TFLOPS_BF16": "common", "step_flops": "flops",
          "TINY": "sample", "run_sample_bench": "sample"}
__all__ = list(_WHERE)


def __getattr__(name):  # imported on first use: `adm-fast bench --help` needs no torch
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
