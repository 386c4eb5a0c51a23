"""Whole models on the fused backends, and torch.compile over the op layer."""

import pytest
import torch

import adm_fast
from conftest import DEVICE, NUMERIC_CASES, build_case, case_inputs, load_case, rel_err

GN_ON_TRITON = {"group_norm_act": "triton"}


def _forward_and_grads(model, case, batch):
    """Output, input gradient and parameter gradients on the first `batch` samples."""
    kw = {} if case["flags"]["kind"] == "classifier" else case_inputs(case)
    kw = {k: v[:batch].to(DEVICE) for k, v in kw.items()}
    x = case["x"][:batch].to(DEVICE).clone().requires_grad_(True)
    out = model(x, case["t"][:batch].to(DEVICE), **kw)
    if case["flags"]["kind"] == "classifier":
        y = case["y"][:batch].to(DEVICE)
        loss = torch.log_softmax(out, -1)[torch.arange(len(out)), y].sum()
    else:
        loss = out.square().mean()
    return out, torch.autograd.grad(loss, [x] + list(model.parameters()), allow_unused=True)


def _assert_grads_close(grads, ref_grads, tol):
    """Per tensor, relative to its own scale, with a floor at 1e-2 of the largest
    gradient: some gradients are zero in exact arithmetic (a conv bias right
    before a GroupNorm) and hold only rounding noise (~1e-7 of the largest)."""
    floor = 1e-2 * max(r.abs().max().item() for r in ref_grads if r is not None)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            scale = max(r.abs().max().item(), floor)
            assert (g - r).abs().max().item() <= tol * scale


@pytest.mark.parametrize("name", NUMERIC_CASES)
def test_reference_models_on_triton_group_norm(name):
    """Forward, input gradient (the classifier's grad_log_p_y) and parameter
    gradients on the Triton GroupNorm kernels equal eager within 1e-4."""
    case = load_case(name)
    model = build_case(case).to(DEVICE)
    batch = 1 if DEVICE == "cpu" else len(case["x"])  # the interpreter is slow
    ref_out, ref_grads = _forward_and_grads(model, case, batch)
    with adm_fast.use_backend(GN_ON_TRITON):
        out, grads = _forward_and_grads(model, case, batch)
    assert rel_err(out, ref_out) <= 1e-4
    assert rel_err(out, case["out"][:batch].to(DEVICE)) <= 1e-4
    _assert_grads_close(grads, ref_grads, 1e-4)


@pytest.mark.parametrize("setting, name", [("auto", "unet_cond_scaleshift_legacyattn"),
                                           ("gn_triton", "unet_uncond_addnorm_newattn")])
def test_torch_compile_traces_without_graph_breaks(setting, name):
    case = load_case(name)
    model = build_case(case).to(DEVICE)
    x, t, kw = case["x"][:1].to(DEVICE), case["t"][:1].to(DEVICE), case_inputs(case)
    kw = {k: v[:1].to(DEVICE) for k, v in kw.items()}
    torch._dynamo.reset()
    with adm_fast.use_backend("auto" if setting == "auto" else GN_ON_TRITON):
        explanation = torch._dynamo.explain(model)(x, t, **kw)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        if setting == "gn_triton":
            ops_in_graph = str(explanation.graphs[0].graph)
            assert "adm_fast.group_norm_act" in ops_in_graph


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: Inductor compiles the "
                    "Triton kernels into the graph")
def test_inductor_compiles_fused_ops_on_gpu():
    case = load_case("unet_cond_scaleshift_legacyattn")
    model = build_case(case).cuda()
    x, t, y = case["x"].cuda(), case["t"].cuda(), case["y"].cuda()
    with torch.no_grad():
        ref = model(x, t, y=y)
        with adm_fast.use_backend("auto"):
            out = torch.compile(model)(x, t, y=y)
    assert rel_err(out, ref) <= 1e-4
