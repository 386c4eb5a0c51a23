"""qkv_attention: the eager reference against attention from its definition
(fp64), both qkv orders, and bad input."""

import math

import pytest
import torch

from adm_fast import ops
from conftest import rel_err


def attention_fp64(qkv, heads, legacy):
    """softmax(qᵀk/√C)v, heads split from their definition, in fp64."""
    n, width, t = qkv.shape
    c = width // (3 * heads)
    parts = qkv.double().reshape(n, heads, 3, c, t) if legacy else \
        qkv.double().reshape(n, 3, heads, c, t).transpose(1, 2)
    q, k, v = parts.unbind(2)
    w = torch.softmax(torch.einsum("nhct,nhcs->nhts", q, k) / math.sqrt(c), dim=-1)
    return torch.einsum("nhts,nhcs->nhct", w, v).reshape(n, heads * c, t)


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("heads, c, t", [(2, 64, 64), (1, 96, 65), (3, 32, 256), (1, 192, 17)])
def test_qkv_attention_reference(legacy, heads, c, t):
    qkv = torch.randn(2, 3 * heads * c, t) + 0.3
    qkv.requires_grad_(True)
    out = ops.qkv_attention(qkv, heads, legacy=legacy)
    assert out.shape == (2, heads * c, t)
    ref = attention_fp64(qkv, heads, legacy)
    assert rel_err(out, ref) <= 2e-5
    g = torch.randn_like(out)
    (dq,) = torch.autograd.grad(out, qkv, g)
    (dq_ref,) = torch.autograd.grad(ref, qkv, g.double())
    assert rel_err(dq, dq_ref) <= 2e-5


@pytest.mark.parametrize("qkv, heads, err, match", [
    (torch.randn(2, 190, 8), 2, ValueError, "not divisible by 3 \\* num_heads"),
    (torch.randn(190, 8), 2, ValueError, r"must be \[N, 3\*H\*C, T\]"),
    (torch.zeros(2, 192, 8, dtype=torch.int64), 2, TypeError, "floating-point"),
    (torch.randn(2, 192, 8), 0, ValueError, "positive int"),
])
def test_qkv_attention_bad_inputs(qkv, heads, err, match):
    with pytest.raises(err, match=match):
        ops.qkv_attention(qkv, heads)
