"""adm_fast.patch on guided-diffusion-structured models (tests/gd_like.py)."""

import pytest
import torch
from gd_like import foreign
from helpers import (
    NUMERIC_CASES,
    assert_grads_close,
    build_case,
    case_inputs,
    load_case,
    rel_err,
    run_case,
)

import adm_fast
from adm_fast.models import unet


def _params(model):
    return {k: p.data_ptr() for k, p in model.named_parameters()}


def _param_grads(model, case):
    kw = {} if case["flags"]["kind"] == "classifier" else case_inputs(case)
    out = model(case["x"], case["t"], **kw)
    return torch.autograd.grad(out.square().mean(), list(model.parameters()), allow_unused=True)


@pytest.mark.parametrize("name", NUMERIC_CASES)
def test_look_alike_is_guided_diffusion(name):
    """The fixture reproduces guided-diffusion's own outputs, so patching it is
    a fair stand-in for patching guided-diffusion."""
    case = load_case(name)
    model = foreign(build_case(case))
    assert type(model).__module__ == "gd_like"
    out, grad = run_case(model, case)
    assert rel_err(out, case["out"]) <= 1e-5
    if grad is not None:
        assert rel_err(grad, case["grad_log_p_y"]) <= 1e-5


@pytest.mark.parametrize("name", NUMERIC_CASES)
def test_patch_keeps_outputs_grads_and_parameters(name):
    case = load_case(name)
    model = foreign(build_case(case))
    ptrs = _params(model)
    ref_out, ref_grad = run_case(model, case)
    ref_pgrads = _param_grads(model, case)
    assert adm_fast.patch(model) is model
    assert _params(model) == ptrs  # the very same parameter tensors
    adm_types = {type(m).__module__.split(".")[0] for m in model.modules()
                 if type(m).__name__ in ("ResBlock", "AttentionBlock", "GroupNorm32",
                                         "QKVAttention", "QKVAttentionLegacy")}
    assert adm_types == {"adm_fast"}
    assert type(model).__module__.startswith("adm_fast") and model.patched
    out, grad = run_case(model, case)
    assert rel_err(out, ref_out) <= 1e-4
    if grad is not None:
        assert rel_err(grad, ref_grad) <= 1e-4
    assert_grads_close(_param_grads(model, case), ref_pgrads, 1e-4)


def test_patch_of_adm_fast_model_is_a_no_op():
    case = load_case("unet_cond_scaleshift_legacyattn")
    model = build_case(case)
    ptrs = _params(model)
    before, _ = run_case(model, case)
    assert adm_fast.patch(model) is model and model.patched == []
    after, _ = run_case(model, case)
    assert _params(model) == ptrs and torch.equal(before, after)


def test_patch_fuses_norm_silu_sequences_anywhere():
    from gd_like import GroupNorm32

    norm = GroupNorm32(32, 64)
    seq = torch.nn.Sequential(norm, torch.nn.SiLU(), torch.nn.Conv2d(64, 8, 1))
    holder = torch.nn.Module()
    holder.head = seq
    x = torch.randn(2, 64, 4, 4)
    ref = seq(x)
    adm_fast.patch(holder)
    assert type(holder.head).__name__ == "NormActSequential"
    assert type(holder.head[0]).__module__ == "adm_fast.models.nn"
    assert rel_err(holder.head(x), ref) <= 1e-6


def test_patch_leaves_structural_look_alikes_alone():
    class ResBlock(torch.nn.Module):  # right name, wrong structure
        def forward(self, x):
            return x

    m = torch.nn.Sequential(ResBlock())
    adm_fast.patch(m)
    assert type(m[0]) is ResBlock and not isinstance(m[0], unet.UNetModel)
