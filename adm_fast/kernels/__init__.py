"""Triton kernels, installed as adm_fast.kernels.

Kernels here know pointers, strides and dtypes only: no model, no module, no
diffusion. adm_fast.ops registers them as backends.
"""
