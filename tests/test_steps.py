"""The fused sampling-step ops: argument checks and registration (their
numbers are checked against guided-diffusion in test_reference_diffusion)."""

import pytest
import torch

from adm_fast import ops

X = torch.randn(2, 3, 4, 4)


def args(**kw):
    base = dict(x=X, model_out=torch.randn(2, 6, 4, 4), noise=torch.randn_like(X),
                coefs=torch.rand(8, 2))
    base.update(kw)
    return base


@pytest.mark.parametrize("kw, err, match", [
    (dict(coefs=torch.rand(7, 2)), ValueError, r"coefs must be \[8, 2\]"),
    (dict(model_out=torch.randn(2, 3, 4, 4)), ValueError, r"model_out must be \[2, 6, 4, 4\]"),
    (dict(noise=torch.randn(2, 3, 4, 5)), ValueError, "noise must have x's shape"),
    (dict(grad=torch.randn(1, 3, 4, 4)), ValueError, "grad must have x's shape"),
    (dict(mean_type="v"), ValueError, "mean_type must be one of"),
    (dict(var_type="fixed_large"), ValueError, "var_type must be one of"),
    (dict(x=X.long()), TypeError, "x must be a floating-point tensor"),
    (dict(coefs=torch.rand(8, 2, device="meta")), ValueError, "coefs is on meta"),
])
def test_ddpm_step_bad_inputs(kw, err, match):
    with pytest.raises(err, match=match):
        ops.ddpm_step(**args(**kw))


def test_ddim_step_bad_inputs():
    with pytest.raises(ValueError, match=r"coefs must be \[7, 2\]"):
        ops.ddim_step(**args())
    with pytest.raises(ValueError, match="does not match x"):
        ops.ddim_step(**args(model_out=torch.randn(2, 4, 4, 4), coefs=torch.rand(7, 2)))


def test_fixed_variance_takes_c_channels_and_no_noise_at_t0():
    coefs = torch.rand(8, 2) + 0.1
    coefs[7] = torch.tensor([0.0, 1.0])  # sample 0 is at t = 0
    out = torch.randn(2, 3, 4, 4)
    a, _ = ops.ddpm_step(X, out, torch.randn_like(X), coefs, var_type="fixed")
    b, _ = ops.ddpm_step(X, out, torch.randn_like(X), coefs, var_type="fixed")
    assert a.shape == X.shape
    assert torch.equal(a[0], b[0])  # t = 0: the mean, no noise
    assert not torch.equal(a[1], b[1])


def test_steps_are_registered_and_explained():
    text = ops.explain("ddim_step", X, torch.randn(2, 6, 4, 4), torch.randn_like(X),
                       torch.rand(7, 2), None, "eps", True, 0.0)
    assert "eager: chosen" in text
