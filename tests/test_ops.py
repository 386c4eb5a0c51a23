"""The op layer: references against independent fp64 formulas, input checks,
and the backend dispatcher."""

import math

import pytest
import torch

import adm_fast
from adm_fast import ops
from adm_fast.ops import dispatch
from conftest import rel_err


def gn_act_fp64(x, g, w, b, scale, shift, eps, act):
    """GroupNorm from its definition, in fp64."""
    x = x.double()
    n, c = x.shape[:2]
    xg = x.reshape(n, g, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    h = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    bc = (1,) * (x.dim() - 2)
    h = h * w.double().reshape(c, *bc) + b.double().reshape(c, *bc)
    if scale is not None:
        h = h * (1 + scale.double().reshape(n, c, *bc)) + shift.double().reshape(n, c, *bc)
    return h * torch.sigmoid(h) if act else h


GN_SHAPES = [(2, 64, 8, 8), (1, 96, 7, 7), (3, 64, 5, 9), (2, 128, 16, 16), (4, 2048)]


@pytest.mark.parametrize("shape, channels_last",
                         [(s, False) for s in GN_SHAPES] + [(s, True) for s in GN_SHAPES[:4]])
@pytest.mark.parametrize("mode", ["adagn", "act", "plain"])
def test_group_norm_act_reference(shape, mode, channels_last):
    n, c = shape[:2]
    x = torch.randn(shape) * 3 + 1.5  # non-zero mean
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(c) + 1, torch.randn(c)
    scale = torch.randn(n, c) if mode == "adagn" else None
    shift = torch.randn(n, c) if mode == "adagn" else None
    act = mode != "plain"
    out = ops.group_norm_act(x, 32, w, b, scale, shift, act=act)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, gn_act_fp64(x, 32, w, b, scale, shift, 1e-5, act)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_statistics_in_fp32(dtype):
    # A large offset ruins E[x²]−E[x]² in low precision; fp32 statistics survive it.
    x = (torch.randn(2, 64, 8, 8) + 200).to(dtype)
    w, b = torch.ones(64), torch.zeros(64)
    out = ops.group_norm_act(x, 32, w, b, act=False)
    assert out.dtype == dtype
    ref = gn_act_fp64(x, 32, w, b, None, None, 1e-5, False)
    eps = torch.finfo(dtype).eps
    assert (out.double() - ref).abs().max() <= 8 * eps * ref.abs().max()


@pytest.mark.parametrize("kw, err, match", [
    (dict(scale=torch.zeros(2, 32), shift=torch.zeros(2, 32)), ValueError, r"scale must have shape \(2, 64\)"),
    (dict(num_groups=48), ValueError, "num_groups=48 must divide the 64 channels"),
    (dict(x=torch.zeros(2, 64, 4, 4, dtype=torch.int32)), TypeError, "floating-point"),
    (dict(weight=torch.zeros(32)), ValueError, r"weight must have shape \(64,\)"),
    (dict(weight=torch.zeros(64, device="meta")), ValueError, "weight is on meta but x is on cpu"),
    (dict(x=torch.zeros(64)), ValueError, r"must be \[N, C, \*spatial\]"),
])
def test_group_norm_act_bad_inputs(kw, err, match):
    args = dict(x=torch.randn(2, 64, 4, 4), num_groups=32, weight=torch.ones(64),
                bias=torch.zeros(64))
    args.update(kw)
    with pytest.raises(err, match=match):
        ops.group_norm_act(**args)


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


class Fp64Only(dispatch.Backend):
    """A test backend that only takes fp64 inputs (and records its calls)."""

    name = "fp64only"
    priority = 100

    def __init__(self):
        super().__init__()
        self.calls = 0

        def gn(*args):
            self.calls += 1
            return dispatch.backends()["eager"].ops["group_norm_act"](*args)

        self.ops = {"group_norm_act": gn}

    def not_supported_reasons(self, op, *args, **kwargs):
        why = super().not_supported_reasons(op, *args, **kwargs)
        if not why and args[0].dtype != torch.float64:
            why.append(f"dtype {args[0].dtype} is not float64")
        return why


@pytest.fixture
def fp64only(monkeypatch):
    backend = Fp64Only()
    monkeypatch.setitem(dispatch._BACKENDS, backend.name, backend)
    return backend


def test_auto_picks_best_supported_and_explains(fp64only):
    w, b = torch.ones(64), torch.zeros(64)
    x32 = torch.randn(2, 64, 4, 4)
    ops.group_norm_act(x32, 32, w, b)
    assert fp64only.calls == 0  # fp32: auto falls back to eager
    ops.group_norm_act(x32.double(), 32, w, b)
    assert fp64only.calls == 1
    text = adm_fast.explain("group_norm_act", x32, 32, w, b, None, None, 1e-5, True)
    assert "fp64only: not supported: dtype torch.float32 is not float64" in text
    assert "eager: chosen" in text


def test_explicit_backend_is_strict(fp64only):
    w, b = torch.ones(64), torch.zeros(64)
    with adm_fast.use_backend("fp64only"):
        with pytest.raises(ops.BackendNotSupported, match="fp64only: dtype torch.float32"):
            ops.group_norm_act(torch.randn(2, 64, 4, 4), 32, w, b)
        with pytest.raises(ops.BackendNotSupported, match="no implementation of qkv_attention"):
            ops.qkv_attention(torch.randn(1, 6, 4), 1)
        ops.group_norm_act(torch.randn(2, 64, 4, 4, dtype=torch.float64), 32, w, b)
    assert fp64only.calls == 1


def test_use_backend_nests_and_env(monkeypatch):
    assert ops.current_backend() == "auto"
    with adm_fast.use_backend("eager"):
        assert ops.current_backend() == "eager"
        with adm_fast.use_backend("auto"):
            assert ops.current_backend() == "auto"
        assert ops.current_backend() == "eager"
    assert ops.current_backend() == "auto"
    monkeypatch.setenv("ADM_FAST_BACKEND", "eager")
    assert ops.current_backend() == "eager"
    monkeypatch.setenv("ADM_FAST_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="unknown adm_fast backend 'cuda-magic'; known: auto, eager"):
        ops.current_backend()
    with pytest.raises(ValueError, match="unknown adm_fast backend"):
        with adm_fast.use_backend("nope"):
            pass
