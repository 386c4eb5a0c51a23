"""qkv_attention: the eager reference against attention from its definition
(fp64), both qkv orders, and bad input."""

import math

import pytest
import torch
from helpers import DEVICE, assert_lowp_close, launched_pointers, poisoned, rel_err

from adm_fast import ops


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


# --- the Triton kernels and the SDPA backend -------------------------------------------

import adm_fast  # noqa: E402

HEAD_DIMS = (32, 64, 96, 128, 192, 256)
# T: 8², 8² + the pooled token, 16², and 32² (batch 1, one layout per head dim to
# keep the interpreter run short).
FP32_CASES = [(t, c, legacy, 1 if t == 1024 else 2)
              for c in HEAD_DIMS for t in (64, 65, 256) for legacy in (True, False)]
FP32_CASES += [(1024, c, i % 2 == 0, 1) for i, c in enumerate(HEAD_DIMS)]


def attention_case(batch, heads, c, t, dtype):
    return ((torch.randn(batch, 3 * heads * c, t, device=DEVICE) + 0.3).to(dtype)
            .requires_grad_(True))


def run_backend(backend, qkv, heads, legacy, dout):
    leaf = qkv.detach().clone().requires_grad_(True)
    with adm_fast.use_backend({"qkv_attention": backend}):
        out = ops.qkv_attention(leaf, heads, legacy=legacy)
    (grad,) = torch.autograd.grad(out, leaf, dout)
    return out, grad


def exact(qkv, heads, legacy, dout):
    leaf = qkv.detach().double().requires_grad_(True)
    out = attention_fp64(leaf, heads, legacy)
    (grad,) = torch.autograd.grad(out, leaf, dout.double())
    return out, grad


@pytest.mark.parametrize("t, c, legacy, batch", FP32_CASES)
def test_triton_fp32(t, c, legacy, batch):
    heads = 1 if c >= 192 else 2
    qkv = attention_case(batch, heads, c, t, torch.float32)
    dout = torch.randn(batch, heads * c, t, device=DEVICE)
    with poisoned():
        out, grad = run_backend("triton", qkv, heads, legacy, dout)
    ref, ref_grad = exact(qkv, heads, legacy, dout)
    assert rel_err(out, ref) <= 2e-5 and rel_err(grad, ref_grad) <= 2e-5


@pytest.mark.parametrize("tiles", [(16, 16), (16, 32), (32, 16)])
@pytest.mark.parametrize("legacy", [True, False])
def test_triton_small_tiles(tiles, legacy, monkeypatch):
    """The small tiles GPUs use for fp32 and long heads: every mask and loop."""
    import adm_fast.kernels.qkv_attention as A

    monkeypatch.setattr(A, "INTERPRETER_CONFIG", (*tiles, 4, 1))
    qkv = attention_case(1, 2, 96, 65, torch.float32)
    dout = torch.randn(1, 2 * 96, 65, device=DEVICE)
    out, grad = run_backend("triton", qkv, 2, legacy, dout)
    ref, ref_grad = exact(qkv, 2, legacy, dout)
    assert rel_err(out, ref) <= 2e-5 and rel_err(grad, ref_grad) <= 2e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("t, c, legacy", [(65, 64, False), (256, 128, True), (64, 96, True),
                                          (64, 192, False)])
def test_low_precision_within_twice_torch(t, c, legacy, backend, dtype):
    """Forward and dqkv within twice the error of the eager path at that
    precision (guided-diffusion's arithmetic), both against fp64."""
    heads = 2
    qkv = attention_case(2, heads, c, t, dtype)
    dout = torch.randn(2, heads * c, t, device=DEVICE).to(dtype)
    with poisoned():
        out, grad = run_backend(backend, qkv, heads, legacy, dout)
    lowp, lowp_grad = run_backend("eager", qkv, heads, legacy, dout)
    ref, ref_grad = exact(qkv, heads, legacy, dout)
    assert out.dtype == grad.dtype == dtype
    assert_lowp_close(out, ref, lowp, "out")
    assert_lowp_close(grad, ref_grad, lowp_grad, "dqkv")


@pytest.mark.parametrize("legacy", [True, False])
def test_sdpa_fp32(legacy):
    qkv = attention_case(2, 3, 64, 65, torch.float32)
    dout = torch.randn(2, 3 * 64, 65, device=DEVICE)
    out, grad = run_backend("sdpa", qkv, 3, legacy, dout)
    ref, ref_grad = exact(qkv, 3, legacy, dout)
    assert rel_err(out, ref) <= 2e-5 and rel_err(grad, ref_grad) <= 2e-5


def test_auto_on_cpu_follows_measurements():
    """On CPU, SDPA from 1024 tokens, eager below (qkv_attention's preferences)."""
    assert "sdpa: chosen" in ops.explain("qkv_attention", torch.randn(1, 3 * 64, 1024), 1, True)
    assert "eager: chosen" in ops.explain("qkv_attention", torch.randn(1, 3 * 64, 256), 1, True)


def test_triton_rejects_strided_tokens_clearly():
    qkv = torch.randn(1, 3 * 64, 32, device=DEVICE)[..., ::2]
    with adm_fast.use_backend("triton"), pytest.raises(ops.BackendNotSupported,
                                                       match="tokens are not contiguous"):
        ops.qkv_attention(qkv, 1)


# --- channels_last_1d: qkv as conv1x1 gives it for channels_last maps ---------------

from adm_fast.ops.impl import layout_of  # noqa: E402
from adm_fast.ops.qkv_attention import QKV_ATTENTION  # noqa: E402


def channels_last_1d(t):
    """The [N, C, T] view of a channels_last map: channels contiguous."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


# (T, head dim, legacy, dout's layout); odd T and head dims, both orders, dout
# in either layout (proj_out's conv1x1 gives it channels_last_1d).
NTC_CASES = [(65, 96, True, "ntc"), (65, 96, False, "nct"), (64, 192, False, "ntc"),
             (256, 64, True, "nct"), (64, 256, True, "ntc"), (65, 32, False, "ntc"),
             pytest.param(1024, 64, False, "ntc", marks=pytest.mark.slow)]


def run_in_place(qkv, heads, legacy, dout, monkeypatch):
    """out and dqkv from the Triton kernels, checked to be in qkv's layout and
    read from and written to in place (no copy of qkv, out or dout)."""
    import adm_fast.kernels.qkv_attention as A

    launches = launched_pointers(A, monkeypatch)
    qkv = qkv.detach().requires_grad_(True)
    with adm_fast.use_backend({"qkv_attention": "triton"}), poisoned():
        out = ops.qkv_attention(qkv, heads, legacy=legacy)
        (grad,) = torch.autograd.grad(out, qkv, dout)
    assert layout_of(out) == layout_of(qkv) and grad.stride() == qkv.stride()
    assert out.stride() == QKV_ATTENTION.fake(qkv, heads, legacy)[0].stride()
    reads = {name: ptrs for name, ptrs in launches}
    assert {qkv.data_ptr(), out.data_ptr()} <= reads["attn_fwd_kernel"]
    assert {out.data_ptr(), dout.data_ptr()} <= reads["attn_bwd_delta_kernel"]
    for name in ("attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"):
        assert {qkv.data_ptr(), dout.data_ptr(), grad.data_ptr()} <= reads[name], name
    return out, grad


@pytest.mark.parametrize("t, c, legacy, dout_layout", NTC_CASES)
def test_triton_channels_last_1d_fp32(t, c, legacy, dout_layout, monkeypatch):
    heads = 1 if c >= 192 else 2
    qkv = channels_last_1d(attention_case(2, heads, c, t, torch.float32))
    dout = torch.randn(2, heads * c, t, device=DEVICE)
    if dout_layout == "ntc":
        dout = channels_last_1d(dout)
    assert layout_of(qkv) == "channels_last_1d"
    out, grad = run_in_place(qkv, heads, legacy, dout, monkeypatch)
    ref, ref_grad = exact(qkv, heads, legacy, dout)
    assert rel_err(out, ref) <= 2e-5 and rel_err(grad, ref_grad) <= 2e-5


@pytest.mark.parametrize("legacy", [True, False])
def test_triton_nchw_qkv_takes_channels_last_dout(legacy, monkeypatch):
    qkv = attention_case(1, 2, 96, 65, torch.float32)
    dout = channels_last_1d(torch.randn(1, 2 * 96, 65, device=DEVICE))
    out, grad = run_in_place(qkv, 2, legacy, dout, monkeypatch)
    assert out.is_contiguous() and grad.is_contiguous()
    ref, ref_grad = exact(qkv, 2, legacy, dout)
    assert rel_err(out, ref) <= 2e-5 and rel_err(grad, ref_grad) <= 2e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t, c, legacy", [(65, 64, False), (64, 96, True), (64, 192, False)])
def test_triton_channels_last_1d_low_precision(t, c, legacy, dtype, monkeypatch):
    heads = 2
    qkv = channels_last_1d(attention_case(2, heads, c, t, dtype))
    dout = channels_last_1d(torch.randn(2, heads * c, t, device=DEVICE).to(dtype))
    out, grad = run_in_place(qkv, heads, legacy, dout, monkeypatch)
    lowp, lowp_grad = run_backend("eager", qkv, heads, legacy, dout)
    ref, ref_grad = exact(qkv, heads, legacy, dout)
    assert out.dtype == grad.dtype == dtype
    assert_lowp_close(out, ref, lowp, "out")
    assert_lowp_close(grad, ref_grad, lowp_grad, "dqkv")


def test_triton_takes_channels_last_1d_and_refuses_other_strides_clearly():
    qkv = channels_last_1d(torch.randn(1, 3 * 64, 32, device=DEVICE))
    with adm_fast.use_backend("triton"):
        assert "triton: chosen" in ops.explain("qkv_attention", qkv, 1, True)
    neither = torch.randn(1, 32, 3 * 64 * 2, device=DEVICE).transpose(1, 2)[:, ::2]
    why = "tokens are not contiguous and neither are its channels"
    with adm_fast.use_backend("triton"), pytest.raises(ops.BackendNotSupported, match=why):
        ops.qkv_attention(neither, 1)
