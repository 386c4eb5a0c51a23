"""Double backward (a gradient penalty): every kernel implementation gives it,
its backward then being the reference's, differentiated (ops/op.py); sdpa's
attention is first-order, as torch's fused SDPA kernels are, and says so."""

import pytest
import torch
from helpers import CPU_EXT, rel_err

from adm_fast import ops
from adm_fast.ops import use_backend


def _penalty_grad(setting, fn, leaves):
    with use_backend(setting):
        out = fn()
        grads = torch.autograd.grad(out.square().mean(), leaves, create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        return [g.detach() for g in grads] + list(torch.autograd.grad(penalty, leaves))


def _gn_case(derived: bool):
    """derived: the shift computed from the scale's leaf, as ResBlock's halves
    of one embedding projection both come from one tensor."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 64, 4, 4, generator=g) + 0.5).requires_grad_(True)
    w = (torch.randn(64, generator=g) + 1).requires_grad_(True)
    b = torch.randn(64, generator=g).requires_grad_(True)
    s = torch.randn(2, 64, generator=g).requires_grad_(True)
    sh = torch.randn(2, 64, generator=g).requires_grad_(True)

    def fn():
        shift = s * 0.5 if derived else sh
        return ops.group_norm_act(x, 32, w, b, s, shift, act=True)
    return fn, [x, w, b, s] if derived else [x, w, b, s, sh]


def _attention_case():
    g = torch.Generator().manual_seed(1)
    qkv = (torch.randn(2, 3 * 2 * 16, 17, generator=g) + 0.2).requires_grad_(True)
    return (lambda: ops.qkv_attention(qkv, 2)), [qkv]


@pytest.mark.skipif(not CPU_EXT, reason="the C++ CPU extension is not built")
@pytest.mark.parametrize("derived", [False, True])
def test_the_cpu_group_norm_kernel_gives_double_backward(derived):
    """derived: an input computed from another one (8-20% off before)."""
    fn, leaves = _gn_case(derived)
    want = _penalty_grad("eager", fn, leaves)
    got = _penalty_grad({"group_norm_act": "cpu"}, fn, leaves)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5


def test_the_triton_attention_kernel_gives_double_backward(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fn, leaves = _attention_case()
    want = _penalty_grad("eager", fn, leaves)
    try:
        got = _penalty_grad({"qkv_attention": "triton"}, fn, leaves)
    except ops.BackendNotSupported as e:
        pytest.skip(f"triton cannot run here: {str(e).splitlines()[-1]}")
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5


def test_sdpa_attention_is_first_order():
    fn, leaves = _attention_case()
    with pytest.raises(RuntimeError, match="not implemented"):
        _penalty_grad({"qkv_attention": "sdpa"}, fn, leaves)
