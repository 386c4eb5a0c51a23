"""Triton kernels, one module per op spec file of adm_fast.ops (its name).

Kernels here know pointers, strides and dtypes only: no model, no module, no
diffusion, nothing from adm_fast.ops. Each op's Triton implementation names its
module (TritonImpl.module); the triton backend imports it (adm_fast/ops/backends.py).
"""
