"""Non-finite inputs through the ops (issue 26, S4): a kernel gives eager's
values where that costs nothing, and where it would cost, the difference is
the one its op's docstring states — never a finite value where eager's is not.
"""

import math

import pytest
import torch
from helpers import CPU_EXT

from adm_fast import ops

needs_ext = pytest.mark.skipif(not CPU_EXT, reason="the C++ CPU extension is not built")
INF, NAN = math.inf, math.nan


def _step(backend, x, out, noise, coefs, grad, mean_type, var_type):
    with ops.use_backend(backend):
        return ops.ddpm_step(x, out, noise, coefs, grad, mean_type, var_type, False)


@needs_ext
def test_the_cpu_step_takes_exp_as_torch_does_over_the_whole_float_range():
    """exp(log_var / 2) through the noise term: overflow to inf past FLT_MAX
    (it stopped at e^88 = 1.65e38, so a log variance of +inf gave 8.8e37),
    subnormal results, 0 at -inf, NaN for NaN."""
    half = torch.cat([torch.linspace(-110, 95, 8001),
                      torch.tensor([88.72, 88.7228, 88.723, 88.73, 89.0, 89.1, -87.0, -87.5,
                                    -103.2, -103.9, -104.0, -104.5, INF, -INF, NAN])])
    v = 2 * half  # exact: log_var / 2 is each value above
    n = v.numel()
    x = torch.zeros(1, 1, n)
    out = torch.cat([x, v.view(1, 1, n)], dim=1)  # mean part 0, variance part v
    coefs = torch.zeros(8, 1)
    coefs[7] = 1  # nonzero: the noise term
    args = (x, out, torch.ones(1, 1, n), coefs, None, "x_prev", "learned")
    got, want = _step("cpu", *args)[0], _step("eager", *args)[0]
    assert want.isinf().sum() > 100 and (want != 0).logical_and(want.abs() < 1.2e-38).any()
    torch.testing.assert_close(got, want, rtol=3e-7, atol=3e-45, equal_nan=True)


@needs_ext
@pytest.mark.parametrize("var_type, where", [("fixed", "lo"), ("learned", "v"),
                                             ("learned_range", "hi")])
def test_an_infinite_log_variance_gives_eagers_infinities(var_type, where):
    g = torch.Generator().manual_seed(4)
    x, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    out = torch.randn(2, 3 if var_type == "fixed" else 6, 4, 4, generator=g) * 0.5
    coefs = torch.rand(8, 2, generator=g) + 0.1
    coefs[4], coefs[5], coefs[7] = -3.0, -1.0, 1.0
    if where == "lo":
        coefs[4, 0] = INF
    elif where == "hi":
        coefs[5, 0] = INF
    else:
        out[0, 3:] = INF
    args = (x, out, noise, coefs, None, "eps", var_type)
    got, want = _step("cpu", *args)[0], _step("eager", *args)[0]
    assert (~want[0].isfinite()).any() and want[1].isfinite().all()
    torch.testing.assert_close(got, want, equal_nan=True)


@needs_ext
@pytest.mark.parametrize("value", [INF, -INF, NAN])
def test_winograd_conv_is_non_finite_exactly_where_eager_is(value):
    """Winograd's transforms subtract inputs from each other, so an output
    eager gives as ±inf may be NaN here (ops/conv3x3.py's docstring says so);
    the outputs that are finite and those that are not are eager's."""
    from adm_fast.ops.backends import CPU

    if not CPU.ext.has_avx2_fma():
        pytest.skip("the Winograd products need AVX2+FMA")
    g = torch.Generator().manual_seed(26)
    x = torch.randn(2, 8, 6, 6, generator=g)
    x[0, 3, 2, 2] = value
    x[1, :, 0, 5] = value
    x[1, 5, 4, 1] = value
    x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(16, 8, 3, 3, generator=g), torch.randn(16, generator=g)
    with ops.use_backend("cpu"):
        got = ops.conv3x3(x, w, b)
    want = torch.nn.functional.conv2d(x, w, b, padding=1)
    assert torch.equal(got.isfinite(), want.isfinite())
    assert (~want.isfinite()).sum() > 100
    torch.testing.assert_close(got[want.isfinite()], want[want.isfinite()], rtol=1e-4, atol=1e-4)
    if value != value:
        assert got[~want.isfinite()].isnan().all()


@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("part", ["q", "k", "v"])
@pytest.mark.parametrize("tokens", [1, 17])
def test_sdpa_attention_is_non_finite_where_eager_is(value, part, tokens):
    """One token's q, k or v non-finite: with T = 1, SDPA returned v as it is
    (the softmax of one score is 1) where eager's NaN score gives NaN; over
    T ∈ {1, 17, 64, 256, 1024}, fp32/bf16/fp16, both layouts and channel
    orders, T = 1 was the only difference."""
    g = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(2, 3 * 2 * 16, tokens, generator=g)
    start = {"q": 0, "k": 16, "v": 32}[part]  # legacy order: head 0's q, k, v
    qkv[0, start:start + 16, 0] = value
    with ops.use_backend("eager"):
        want = ops.qkv_attention(qkv, 2)
    with ops.use_backend("sdpa"):
        got = ops.qkv_attention(qkv, 2)
    assert (~want.isfinite()).any()
    assert torch.equal(got.isfinite(), want.isfinite())
    torch.testing.assert_close(got, want, equal_nan=True)
