"""A model's precision as a dtype: guided-diffusion's use_fp16 recipe, in fp16 or bf16.

Beside the models because it is a fact about their layers (which run in the
low dtype and which stay fp32), needed alike by presets, checkpoint loading
and benchmarks.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["apply_dtype"]


def apply_dtype(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """None/fp32: all fp32. fp16/bf16: guided-diffusion's use_fp16 recipe (the
    torso's convolutions in that dtype; embeddings, norms and head in fp32)."""
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be None, float32, float16 or bfloat16, got {dtype}")
    # Tensor by tensor through .data, as Module.float() does for plain tensors: a
    # model of fake tensors (adm-fast bench plan) cannot be converted by
    # Module._apply, which swaps fake parameters and fails on their weak refs.
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point() and t.dtype != torch.float32:
            t.data = t.data.float()
    if dtype == torch.float16:
        model.convert_to_fp16()
    elif dtype == torch.bfloat16:
        model.convert_to_bf16()
    return model
